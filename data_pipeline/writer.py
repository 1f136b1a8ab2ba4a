"""Writes tiles as pre-sharded TFRecords with TFDS metadata, readable by stock TFDS.

One writer for every source (the embedded synthetic dataset now, real Sentinel-1 later):
  * each split goes to ``num_shards`` files named by TFDS's default template
    (``<name>-<split>.tfrecord-00000-of-00008``); the shard count must be a multiple of the
    number of reading hosts so every host reads whole files;
  * examples are serialised by the features of ``schema.tfds_features`` (image as raw float16
    bytes of dB values clipped to ``schema.CLIP_RANGE_DB``, NaN = no-data);
  * per-channel mean/std of the training split (over valid pixels, of the stored float16 values)
    go into the :class:`schema.InputContract`, saved in the TFDS metadata (``metadata.json``);
  * the whole dataset is written into a temporary sibling folder and renamed into place at the
    end, so a reader never finds a half-written dataset.

Read it back with ``tfds.builder_from_directory(path)``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from typing import Any, Iterable, Mapping

import numpy as np

from data_pipeline import schema

DATASET_NAME = 's1_tiles'
VERSION = '1.0.0'


class ChannelStatistics:
  """Running per-channel sums over valid (finite) values, in float64."""

  def __init__(self, num_channels: int):
    self.count = np.zeros(num_channels, np.float64)
    self.total = np.zeros(num_channels, np.float64)
    self.total_sq = np.zeros(num_channels, np.float64)

  def update(self, image: np.ndarray) -> None:
    values = image.reshape(-1, image.shape[-1]).astype(np.float64)
    valid = np.isfinite(values)
    values = np.where(valid, values, 0.0)
    self.count += valid.sum(0)
    self.total += values.sum(0)
    self.total_sq += np.square(values).sum(0)

  def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
    if np.any(self.count == 0):
      empty = np.flatnonzero(self.count == 0).tolist()
      raise ValueError(f'no valid training pixels in channels {empty}: cannot compute statistics')
    mean = self.total / self.count
    var = np.maximum(self.total_sq / self.count - mean**2, 0.0)
    return mean, np.sqrt(var)


def quantise_image(image_db: np.ndarray, where: str = 'tile') -> np.ndarray:
  """Clips dB values to the schema range and casts to the storage dtype (NaN stays NaN)."""
  if image_db.ndim != 3:
    raise ValueError(f'{where}: image must be (H, W, C), got shape {image_db.shape}')
  if np.isinf(image_db).any():
    raise ValueError(f'{where}: image has infinite values (use NaN for no-data)')
  low, high = schema.CLIP_RANGE_DB
  return np.clip(image_db, low, high).astype(schema.STORAGE_DTYPE)


def _file_template(data_dir: str, split: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.core.ShardedFileTemplate(data_dir=data_dir, dataset_name=DATASET_NAME, split=split,
                                       filetype_suffix='tfrecord')


def write_dataset(output_dir: str, splits: Mapping[str, Iterable[Mapping[str, Any]]],
                  contract: schema.InputContract, num_shards: int = 8, host_count: int = 1,
                  description: str = '', overwrite: bool = False) -> schema.InputContract:
  """Writes every split of ``splits`` (name -> iterable of example dicts) under ``output_dir``.

  Example dicts carry the features of ``schema.tfds_features``; ``image`` may be float32 dB.
  Returns the input contract with the training split's statistics filled in.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if num_shards % host_count:
    raise ValueError(f'num_shards {num_shards} must be a multiple of host_count {host_count} '
                     'so that every host reads whole files')
  if 'train' not in splits:
    raise ValueError(f"splits must include 'train' (for the statistics), got {sorted(splits)}")
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir):
    if not overwrite:
      raise FileExistsError(f'{output_dir} exists; pass overwrite=True to replace it')
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f'.{os.path.basename(output_dir)}.incomplete-{uuid.uuid4().hex[:8]}')
  os.makedirs(staging)
  features = schema.tfds_features(contract.tile_size, contract.num_channels)
  try:
    stats = ChannelStatistics(contract.num_channels)
    split_infos = []
    for split, examples in splits.items():
      template = _file_template(staging, split)
      paths = template.sharded_filepaths(num_shards)
      writers = [tf.io.TFRecordWriter(os.fspath(path)) for path in paths]
      shard_lengths = [0] * num_shards
      num_bytes = 0
      try:
        for index, example in enumerate(examples):
          where = f'{split} example {index} ({example.get(schema.TILE_ID, "?")})'
          example = dict(example)
          expected = (contract.tile_size, contract.tile_size, contract.num_channels)
          if np.shape(example[schema.IMAGE]) != expected:
            raise ValueError(f'{where}: image shape {np.shape(example[schema.IMAGE])} '
                             f'!= {expected} (tile size, tile size, bands)')
          example[schema.IMAGE] = quantise_image(np.asarray(example[schema.IMAGE]), where)
          if split == 'train':
            stats.update(example[schema.IMAGE])
          record = features.serialize_example(example)
          shard = index % num_shards
          writers[shard].write(record)
          shard_lengths[shard] += 1
          num_bytes += len(record)
      finally:
        for writer in writers:
          writer.close()
      if sum(shard_lengths) < num_shards:
        raise ValueError(f'split {split!r} has {sum(shard_lengths)} examples, fewer than its '
                         f'{num_shards} shards')
      split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=shard_lengths,
                                             num_bytes=num_bytes, filename_template=template))
    mean, std = stats.mean_std()
    contract = dataclasses.replace(contract, mean=tuple(mean), std=tuple(std))
    tfds.folder_dataset.write_metadata(
        data_dir=staging, features=features, split_infos=split_infos,
        filename_template=_file_template(staging, 'train'), version=VERSION, check_data=False,
        description=description or 'Sentinel-1 tiles for mae_jax',
        metadata=tfds.core.MetadataDict(input_contract=contract.to_dict()))
    if os.path.exists(output_dir):
      shutil.rmtree(output_dir)
    os.rename(staging, output_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return contract


def read_contract(data_dir: str) -> schema.InputContract:
  """The input contract stored with a dataset written by :func:`write_dataset`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(data_dir)
  return contract_from_builder(builder, data_dir)


def contract_from_builder(builder, data_dir: str) -> schema.InputContract:
  values = builder.info.metadata and builder.info.metadata.get('input_contract')
  if not values:
    raise ValueError(f'{data_dir}: the dataset metadata has no input_contract '
                     '(was it written by data_pipeline.writer?)')
  return schema.InputContract.from_dict(dict(values))
