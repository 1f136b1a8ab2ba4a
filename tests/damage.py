"""Ways to damage a copy of a dataset or a checkpoint step, for the bad-data and checkpoint
integrity tests and bench/fault_injection.py."""

import os
import shutil

import numpy as np


def copy_dataset(source: str, target: str) -> str:
  shutil.copytree(source, target)
  return target


def shrink_first_image(data_dir: str, file_index: int) -> str:
  """Halves the image bytes of the first record of train file ``file_index`` (as if it had half
  the bands), keeping the TFRecord framing valid; returns the file's path."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = sorted(p for p in os.listdir(data_dir) if '-train.tfrecord' in p)[file_index]
  path = os.path.join(data_dir, path)
  records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
  example = tf.train.Example.FromString(records[0])
  image = example.features.feature['image'].bytes_list.value[0]
  example.features.feature['image'].bytes_list.value[0] = image[:len(image) // 2]
  records[0] = example.SerializeToString()
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
  return path


def largest_data_file(step_dir: str) -> str:
  """The largest of a checkpoint step's OCDBT data files (``state/**/d/*``)."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
           if os.path.basename(root) == 'd' for name in names]
  return max(files, key=os.path.getsize)


def flip_bytes(path: str, count: int = 100, seed: int = 0) -> None:
  """Inverts ``count`` bytes at random offsets past the first 64."""
  data = bytearray(open(path, 'rb').read())
  rng = np.random.default_rng(seed)
  for offset in rng.choice(np.arange(64, len(data)), size=min(count, len(data) - 64),
                           replace=False):
    data[offset] ^= 0xFF
  open(path, 'wb').write(bytes(data))


def truncate(path: str) -> None:
  os.truncate(path, os.path.getsize(path) // 2)


def empty(path: str) -> None:
  open(path, 'wb').close()


# What a disk, a copy or a person can do to one committed checkpoint step (its folder).
CHECKPOINT_DAMAGE = {
    'flipped bytes in a data file': lambda step: flip_bytes(largest_data_file(step)),
    'truncated data file': lambda step: truncate(largest_data_file(step)),
    'missing ocdbt.process_0': lambda step: shutil.rmtree(os.path.join(step, 'state',
                                                                       'ocdbt.process_0')),
    'empty manifest.ocdbt': lambda step: empty(os.path.join(step, 'state', 'manifest.ocdbt')),
    'missing state/_METADATA': lambda step: os.remove(os.path.join(step, 'state', '_METADATA')),
    'truncated metadata': lambda step: truncate(os.path.join(step, 'metadata', 'metadata')),
}
