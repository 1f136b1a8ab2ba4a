"""Per-host input pipeline: TFDS split -> parsed, shuffled, batched numpy in a compact dtype.

Each process reads an even, disjoint share of the split (``tfds.even_splits`` over processes,
remainder dropped so every host has the same number of batches per epoch). The stream is a
deterministic function of (seed, epoch): epoch ``e`` shuffles file order and records (as raw
serialised bytes, before any decoding) with seeds derived from (seed, e). A run resumed at step
``s`` therefore rebuilds the stream and skips the first ``s * local_batch`` raw records of it,
which costs reading (not decoding) at most one epoch: resumed runs see exactly the batches an
uninterrupted run would have seen.

Images stay float16 dB (NaN = no-data) on the host; ``mae_jax.preprocess`` casts and normalises
them on the device. ``global_batch`` turns per-host batches into one global ``jax.Array``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import numpy as np

from data_pipeline import schema
from data_pipeline import writer

_EPOCH_SEED_STRIDE = 1_000_003


def configure_tensorflow() -> None:
  """Keeps TensorFlow off the GPUs (it only reads files here) so JAX has all their memory."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')


class HostDataset:
  """This process's share of one split, and how to stream it from any step."""

  def __init__(self, data_dir: str, split: str, process_index: int | None = None,
               process_count: int | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    configure_tensorflow()
    self.data_dir = data_dir
    try:
      self.builder = tfds.builder_from_directory(data_dir)
    except Exception as e:  # TFDS raises several types for a missing or broken folder.
      raise FileNotFoundError(f'cannot open a TFDS dataset at {data_dir!r}: {e}') from e
    if split not in self.builder.info.splits:
      raise ValueError(f'{data_dir}: no split {split!r}; available: {list(self.builder.info.splits)}')
    self.contract = writer.contract_from_builder(self.builder, data_dir)
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    num_files = self.builder.info.splits[split].num_shards
    if num_files % self.process_count:
      raise ValueError(f'{data_dir}: split {split!r} has {num_files} files, not a multiple of '
                       f'the {self.process_count} processes; rewrite it with num_shards a '
                       'multiple of the host count')
    self.split = tfds.even_splits(split, n=self.process_count,
                                  drop_remainder=True)[self.process_index]
    self.num_examples = self.builder.info.splits[self.split].num_examples
    if self.num_examples == 0:
      raise ValueError(f'{data_dir}: split {split!r} gives process {self.process_index} no examples')

  @property
  def tile_size(self) -> int:
    return self.builder.info.features[schema.IMAGE].shape[0]

  @property
  def num_channels(self) -> int:
    return self.builder.info.features[schema.IMAGE].shape[-1]

  def _epoch(self, seed: int, epoch: int, shuffle_buffer: int):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    epoch_seed = (seed * _EPOCH_SEED_STRIDE + epoch) % (2**31 - 1)
    read_config = tfds.ReadConfig(shuffle_seed=epoch_seed, interleave_cycle_length=4,
                                  interleave_block_length=1)
    skip = {schema.IMAGE: tfds.decode.SkipDecoding(),
            schema.WORLDCOVER: tfds.decode.SkipDecoding()}
    ds = self.builder.as_dataset(split=self.split, shuffle_files=shuffle_buffer > 1,
                                 read_config=read_config, decoders=skip)
    if shuffle_buffer > 1:
      ds = ds.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    return ds

  def _decode(self, example):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    size, channels = self.tile_size, self.num_channels
    image = tf.io.decode_raw(example[schema.IMAGE], tf.float16)
    labels = tf.io.decode_raw(example[schema.WORLDCOVER], tf.uint8)
    return {
        schema.IMAGE: tf.reshape(image, (size, size, channels)),
        schema.WORLDCOVER: tf.reshape(labels, (size, size)),
        schema.VCF: example[schema.VCF],
        schema.LAT: example[schema.LAT],
        schema.LON: example[schema.LON],
        schema.REGION: example[schema.REGION],
        schema.TILE_ID: example[schema.TILE_ID],
    }

  def batches(self, local_batch: int, *, seed: int, start_step: int = 0,
              num_steps: int, shuffle_buffer: int = 256,
              features: tuple[str, ...] = (schema.IMAGE,)) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``num_steps`` host batches, the first being batch number ``start_step``."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if local_batch > self.num_examples:
      raise ValueError(f'per-host batch {local_batch} exceeds the {self.num_examples} examples '
                       f'process {self.process_index} has in {self.split}')
    position = start_step * local_batch
    first_epoch, offset = divmod(position, self.num_examples)
    last_epoch = math.ceil((position + num_steps * local_batch) / self.num_examples)
    ds = self._epoch(seed, first_epoch, shuffle_buffer).skip(offset)
    for epoch in range(first_epoch + 1, max(last_epoch, first_epoch + 1)):
      ds = ds.concatenate(self._epoch(seed, epoch, shuffle_buffer))
    decode = self._decode
    ds = ds.map(lambda ex: {k: v for k, v in decode(ex).items() if k in features},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).take(num_steps)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds))


def global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """Assembles per-process batches into global arrays split along the batch axis."""
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local_batch.items()}
