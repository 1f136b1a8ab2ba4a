"""Ways to damage a copy of a dataset, for the trainer's bad-data tests."""

import os
import shutil


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
