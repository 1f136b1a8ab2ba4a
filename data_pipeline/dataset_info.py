"""A dataset folder's metadata, read without TensorFlow or TensorFlow Datasets.

``data_pipeline.writer`` writes TFDS's metadata files, so that stock TFDS reads the folder
(``tfds.builder_from_directory``): ``dataset_info.json`` (splits, their shard lengths and file
name template), ``features.json`` (the feature spec) and ``metadata.json`` (the input contract
and the build report). Training, evaluation and the tools read them here with ``json``, so they
run where TensorFlow is not installed. :meth:`Split.share` cuts a split as
``tfds.even_splits(split, n, drop_remainder=True)`` does and :meth:`Split.file_instructions`
lists a range of its records as TFDS's file instructions do, so both read the same records
(``tests/test_without_tensorflow.py`` compares them).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

from etils import epath

INFO_FILE = 'dataset_info.json'
FEATURES_FILE = 'features.json'
METADATA_FILE = 'metadata.json'
# TFDS's default name of a shard file, for a dataset_info.json that does not give one.
_DEFAULT_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'

# Kinds of Feature, from the connector TFDS wrote it with.
TENSOR = 'tensor'
CLASS_LABEL = 'class_label'
TEXT = 'text'
OTHER = 'other'  # A connector this reader does not know (reading it is an error).


@dataclasses.dataclass(frozen=True)
class Feature:
  """One feature of ``features.json``.

  ``shape`` has None for an unknown dimension; ``dtype`` is a numpy dtype name ('object' for
  strings); ``encoding`` is TFDS's tensor encoding ('none' or 'bytes'); ``connector`` names the
  TFDS class for messages.
  """
  kind: str
  shape: tuple[int | None, ...] = ()
  dtype: str = ''
  encoding: str = 'none'
  num_classes: int = 0
  connector: str = ''


# File instruction: (path, records skipped at its start, records read, records in the file).
FileInstruction = tuple[str, int, int, int]


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: its shard files (in order) and how many records each holds."""
  name: str
  paths: tuple[str, ...]
  shard_lengths: tuple[int, ...]
  num_bytes: int = 0

  @property
  def num_examples(self) -> int:
    return sum(self.shard_lengths)

  @property
  def num_shards(self) -> int:
    return len(self.shard_lengths)

  def share(self, index: int, count: int) -> tuple[int, int]:
    """[start, stop) records of share ``index`` of ``count`` equal shares, the remainder
    (fewer than ``count`` records at the end) dropped: ``tfds.even_splits(drop_remainder=True)``."""
    if not 0 <= index < count:
      raise ValueError(f'share {index} of {count} does not exist')
    size = self.num_examples // count
    return size * index, size * (index + 1)

  def file_instructions(self, start: int = 0, stop: int | None = None
                        ) -> list[FileInstruction]:
    """The files holding records [start, stop) of the split, each with the records to skip at
    its start and to read, as TFDS's ``SplitInfo.file_instructions`` lists them."""
    stop = self.num_examples if stop is None else stop
    out, first = [], 0
    for path, length in zip(self.paths, self.shard_lengths):
      end = first + length
      if length and start < end and stop > first:  # Empty shards hold nothing to read.
        skip = max(start - first, 0)
        out.append((path, skip, min(stop, end) - first - skip, length))
      first = end
    return out


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a dataset folder's metadata says: its splits, features and metadata dict."""
  data_dir: str
  name: str
  splits: dict[str, Split]
  features: dict[str, Feature]
  metadata: dict[str, Any]


def _read_json(folder: epath.Path, name: str, data_dir: str, required: bool = True):
  path = folder / name
  try:
    return json.loads(path.read_text())
  except FileNotFoundError as e:
    if not required:
      return None
    raise FileNotFoundError(f'cannot open a TFDS dataset at {data_dir!r}: no {name} there '
                            '(not a dataset folder, or its build did not finish)') from e
  except Exception as e:  # pylint: disable=broad-except  # Malformed JSON, a filesystem's own.
    raise FileNotFoundError(f'cannot open a TFDS dataset at {data_dir!r}: {name} cannot be '
                            f'read: {e}') from e


def _shard_name(template: str, dataset: str, split: str, file_format: str, index: int,
                count: int) -> str:
  """A shard's file name from TFDS's template (``{DATASET}-{SPLIT}.{FILEFORMAT}-...``)."""
  fields = {'DATASET': dataset, 'SPLIT': split, 'FILEFORMAT': file_format,
            'SHARD_INDEX': f'{index:05d}', 'NUM_SHARDS': f'{count:05d}',
            'SHARD_X_OF_Y': f'{index:05d}-of-{count:05d}'}
  name = template
  for key, value in fields.items():
    name = name.replace('{' + key + '}', value)
  return name


def _feature(spec: dict[str, Any]) -> Feature:
  connector = spec.get('pythonClassName', '')
  if 'tensor' in spec:
    tensor = spec['tensor']
    shape = tuple(None if int(d) < 0 else int(d)
                  for d in tensor.get('shape', {}).get('dimensions', []))
    dtype = tensor.get('dtype', '')
    return Feature(TENSOR, shape, 'object' if dtype == 'string' else dtype,
                   tensor.get('encoding', 'none'), connector=connector)
  if 'classLabel' in spec:
    return Feature(CLASS_LABEL, (), 'int64', num_classes=int(spec['classLabel'].get(
        'numClasses', 0)), connector=connector)
  if 'text' in spec:
    return Feature(TEXT, (), 'object', connector=connector)
  return Feature(OTHER, connector=connector)


def read(data_dir: str) -> DatasetInfo:
  """The metadata of the dataset folder ``data_dir`` (a local path or a URL).

  Raises:
    FileNotFoundError: No dataset there (no or unreadable ``dataset_info.json``).
    ImportError: ``data_dir`` is a URL and TensorFlow is not installed: such datasets are read
      through TensorFlow's filesystems (``data_pipeline.record_files``).
  """
  if '://' in os.fspath(data_dir) and importlib.util.find_spec('tensorflow') is None:
    raise ImportError(f'{data_dir}: a dataset at a URL is read through tf.io.gfile, which needs '
                      "TensorFlow: pip install 'mae_jax[data]', or copy the dataset to a local "
                      'disk (local folders need no TensorFlow)')
  folder = epath.Path(data_dir)
  info = _read_json(folder, INFO_FILE, data_dir)
  name = info.get('name', '')
  file_format = info.get('fileFormat', 'tfrecord')
  splits = {}
  for split in info.get('splits', []):
    lengths = tuple(int(n) for n in split.get('shardLengths', []))
    template = split.get('filepathTemplate') or _DEFAULT_TEMPLATE
    paths = tuple(os.fspath(folder / _shard_name(template, name, split['name'], file_format, i,
                                                  len(lengths)))
                  for i in range(len(lengths)))
    splits[split['name']] = Split(split['name'], paths, lengths, int(split.get('numBytes', 0)))
  features_spec = _read_json(folder, FEATURES_FILE, data_dir, required=False) or {}
  features = {key: _feature(spec) for key, spec in
              features_spec.get('featuresDict', {}).get('features', {}).items()}
  metadata = _read_json(folder, METADATA_FILE, data_dir, required=False) or {}
  return DatasetInfo(os.fspath(data_dir), name, splits, features, metadata)
