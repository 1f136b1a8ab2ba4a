"""Bad data at run time (data_pipeline.input): errors that name file and record, or counted skips.

Each test damages its own copy of the session's 32 px dataset (64 train tiles, 8 shards of 8,
so record i of shard s is split record 8 s + i).
"""

import logging
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import example_codec
from data_pipeline import input as data_input
from data_pipeline import schema
from data_pipeline import tfrecord_index

ALL = (schema.IMAGE, schema.WORLDCOVER, schema.VCF, schema.LAT, schema.LON, schema.REGION,
       schema.TILE_ID)
EXPECTED = "expected 24576 \\(32 x 32 x 12 float16\\)"


def copy_of(tiny_dataset, tmp_path):
  copy = tmp_path / 'ds'
  shutil.copytree(tiny_dataset, copy)
  return str(copy)


def shard(data_dir, index):
  name = f's1_tiles-train.tfrecord-{index:05d}-of-00008'
  path = os.path.join(data_dir, name)
  assert os.path.exists(path), os.listdir(data_dir)
  return path


def where(data_dir, shard_index, record):
  """The start of an error message about record ``record`` of train shard ``shard_index``."""
  path = shard(data_dir, shard_index)
  offset = int(tfrecord_index.scan_tfrecord(path)[record][0]) - 12 if record < 8 else None
  return (re.escape(f'{path}: record {record} (split record {8 * shard_index + record}, '
                    f'byte {offset}): '))


def rewrite(path, changes):
  """Rewrites a TFRecord file (valid framing and CRCs) with records replaced by index."""
  records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
  with tf.io.TFRecordWriter(path) as out:
    for i, record in enumerate(records):
      out.write(changes[i](record) if i in changes else record)


def with_bands(record, bands):
  """The record with its image cut to its first ``bands`` bands."""
  example = tf.train.Example.FromString(record)
  value = example.features.feature[schema.IMAGE].bytes_list.value
  image = np.frombuffer(value[0], np.float16).reshape(32, 32, 12)
  value[0] = image[..., :bands].tobytes()
  return example.SerializeToString()


def flip_image_byte(path, record):
  """Flips bits of one byte inside a record's image bytes: framing and protobuf stay valid."""
  offset, length = (int(v) for v in tfrecord_index.scan_tfrecord(path)[record])
  with open(path, 'r+b') as f:
    f.seek(offset)
    data = f.read(length)
    image = tf.train.Example.FromString(data).features.feature[schema.IMAGE].bytes_list.value[0]
    at = offset + data.index(image) + 1001  # A high byte of a float16 pixel.
    f.seek(at)
    byte = f.read(1)[0]
    f.seek(at)
    f.write(bytes([byte ^ 0x40]))


def truncate(path, size):
  with open(path, 'r+b') as f:
    f.truncate(size)


def read_all(dataset, **kwargs):
  return list(dataset.batches(8, seed=3, num_steps=8, features=ALL, **kwargs))


def open_local(data_dir, **kwargs):
  return data_input.HostDataset(data_dir, 'train', process_index=0, process_count=1,
                                reader='local', **kwargs)


def open_tf(data_dir, **kwargs):
  return data_input.HostDataset(data_dir, 'train', process_index=0, process_count=1,
                                reader='tf', **kwargs)


# --- Errors that name the file and the record ----------------------------------------------------


@pytest.mark.parametrize('indexed', [True, False])
def test_corrupt_header(tiny_dataset, tmp_path, indexed):
  data = copy_of(tiny_dataset, tmp_path)
  if not indexed:  # A folder written before the writer indexed its records: scanned.
    os.remove(os.path.join(data, tfrecord_index.INDEX_FILE))
  path = shard(data, 2)
  byte = int(tfrecord_index.scan_tfrecord(path)[3][0]) - 12
  with open(path, 'r+b') as f:  # One bit of record 3's length.
    f.seek(byte)
    value = f.read(1)[0]
    f.seek(byte)
    f.write(bytes([value ^ 1]))
  where = f'{path}: record 3 (split record 19, byte {byte}): corrupt TFRecord header'
  if indexed:  # The index frames the records: only record 3 is bad, found as it is read.
    with pytest.raises(data_input.BadRecordError, match=re.escape(f'{where} (bad length CRC)')):
      read_all(open_local(data))
    dataset = open_local(data, max_bad_records=1)
    read_all(dataset)
    assert len(dataset.bad_records) == 1 and dataset.bad_records[0].startswith(where)
    return
  with pytest.raises(data_input.BadRecordError, match=re.escape(
      f'{where} at byte {byte} (bad length CRC); the dataset metadata says the file holds 8 '
      'records, so records 3..7 cannot be read')):
    read_all(open_local(data))


def test_corrupt_payload_is_caught_by_checksums_only(tiny_dataset, tmp_path):
  data = copy_of(tiny_dataset, tmp_path)
  flip_image_byte(shard(data, 1), 5)
  with pytest.raises(data_input.BadRecordError, match=where(data, 1, 5) + re.escape(
      'corrupt record: its bytes do not match their CRC (TensorFlow: DataLossError: '
      'corrupted record at')):
    read_all(open_local(data, verify_checksums=True))
  # Without the checksums the damage goes unnoticed: the image reads with a changed value.
  clean = read_all(open_local(tiny_dataset))
  changed = 0
  for batch, reference in zip(read_all(open_local(data)), clean):
    assert batch[schema.TILE_ID].tolist() == reference[schema.TILE_ID].tolist()
    changed += int(np.sum(batch[schema.IMAGE].view(np.uint16) !=
                          reference[schema.IMAGE].view(np.uint16)))
  assert changed == 1


def test_undamaged_data_read_the_same_with_checksums(tiny_dataset):
  plain = read_all(open_local(tiny_dataset))
  dataset = open_local(tiny_dataset, verify_checksums=True)
  checked = read_all(dataset)
  assert dataset._verified.all()  # Each record is checked once; later reads take the fast path.
  for a, b in zip(plain, checked):
    for name in ALL:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  evaluation = list(open_local(tiny_dataset, verify_checksums=True).eval_batches(
      16, features=(schema.TILE_ID,)))
  assert sum(int(b[data_input.EXAMPLE_MASK].sum()) for b in evaluation) == 64


def test_malformed_example(tiny_dataset, tmp_path):
  data = copy_of(tiny_dataset, tmp_path)
  rewrite(shard(data, 0), {4: lambda record: record[:len(record) // 2]})
  with pytest.raises(data_input.BadRecordError,
                     match=where(data, 0, 4) + 'malformed tf.train.Example: '):
    read_all(open_local(data))


@pytest.mark.parametrize('bands', [6, 13])
def test_another_band_count(tiny_dataset, tmp_path, bands):
  data = copy_of(tiny_dataset, tmp_path)
  rewrite(shard(data, 7), {1: lambda record: with_bands(record, bands)})
  if bands == 13:  # By hand: 12 bands and one more.
    rewrite(shard(data, 7), {1: lambda record: with_bands(record, 12)})
    example = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(
        shard(data, 7)).skip(1))).numpy())
    value = example.features.feature[schema.IMAGE].bytes_list.value
    image = np.frombuffer(value[0], np.float16).reshape(32, 32, 12)
    value[0] = np.concatenate([image, image[..., :1]], axis=-1).tobytes()
    rewrite(shard(data, 7), {1: lambda record: example.SerializeToString()})
  with pytest.raises(data_input.BadRecordError, match=where(data, 7, 1) + re.escape(
      f"feature 'image' has {2048 * bands} bytes, expected 24576 (32 x 32 x 12 float16): "
      f'looks like {bands} bands instead of 12')):
    read_all(open_local(data))


def test_other_sizes_are_described():
  codec = example_codec.Codec(schema.IMAGE, example_codec.RAW, (448, 448, 12), np.dtype(np.float16))
  assert example_codec._size_problem(codec, 64 * 64 * 12 * 2) == (
      "feature 'image' has 98304 bytes, expected 4816896 (448 x 448 x 12 float16): looks like "
      '64 x 64 px tiles instead of 448 x 448')
  assert example_codec._size_problem(codec, 1001) == (
      "feature 'image' has 1001 bytes, expected 4816896 (448 x 448 x 12 float16)")


def test_truncated_file(tiny_dataset, tmp_path):
  data = copy_of(tiny_dataset, tmp_path)
  path = shard(data, 3)
  offset, length = (int(v) for v in tfrecord_index.scan_tfrecord(path)[6])
  size = offset + 100
  truncate(path, size)
  message = re.escape(
      f'{path}: record 6 (split record 30, byte {offset - 12}): truncated TFRecord file: the '
      f'record at byte {offset - 12} ends at byte {offset + length + 4}, the file has {size}; '
      'the dataset metadata says the file holds 8 records, so records 6..7 cannot be read')
  with pytest.raises(data_input.BadRecordError, match=message):
    read_all(open_local(data))
  # Cut at a record border: a valid TFRecord file, but shorter than the metadata says.
  truncate(path, offset - 12)
  with pytest.raises(data_input.BadRecordError, match=re.escape(
      f'{path}: record 6 (split record 30, byte {offset - 12}): the file ends after 6 records, '
      'the dataset metadata says 8; it was truncated or changed since it was written')):
    read_all(open_local(data))


@pytest.mark.parametrize('reader', ['local', 'tf'])
def test_missing_shard(tiny_dataset, tmp_path, reader):
  data = copy_of(tiny_dataset, tmp_path)
  os.remove(shard(data, 5))
  with pytest.raises(FileNotFoundError, match=re.escape(
      f"{data}: 1 of the 8 files of split 'train' that process 0 reads are missing, though "
      'dataset_info.json lists them: s1_tiles-train.tfrecord-00005-of-00008; the folder is '
      'incomplete')):
    data_input.HostDataset(data, 'train', process_index=0, process_count=1, reader=reader)
  # Each process checks only the files it reads.
  assert data_input.HostDataset(data, 'train', process_index=0, process_count=2,
                                reader=reader).num_examples == 32


# --- The tf.data reader: TensorFlow's errors, located --------------------------------------------


def test_tf_reader_corrupt_record(tiny_dataset, tmp_path):
  data = copy_of(tiny_dataset, tmp_path)
  flip_image_byte(shard(data, 1), 5)
  with pytest.raises(data_input.BadRecordError, match=where(data, 1, 5) + re.escape(
      'corrupt or truncated record (TensorFlow: DataLossError: corrupted record at')):
    read_all(open_tf(data))


def test_tf_reader_truncated_file(tiny_dataset, tmp_path):
  data = copy_of(tiny_dataset, tmp_path)
  path = shard(data, 3)
  offset = int(tfrecord_index.scan_tfrecord(path)[6][0])
  start = where(data, 3, 6)
  truncate(path, offset + 100)
  with pytest.raises(data_input.BadRecordError, match=start + re.escape(
      'corrupt or truncated record (TensorFlow: DataLossError: truncated record at')):
    read_all(open_tf(data))
  # tf.data itself ends a file cut at a record border quietly: the count check catches it.
  truncate(path, offset - 12)
  with pytest.raises(data_input.BadRecordError, match=re.escape(
      f'{path}: record 6 (split record 30, byte {offset - 12}): the file ends after 6 records '
      f'(byte {offset - 12} of {offset - 12}), the dataset metadata says 8')):
    list(open_tf(data).eval_batches(8, features=(schema.TILE_ID,)))


def test_tf_reader_wrong_band_count_and_malformed_example(tiny_dataset, tmp_path):
  data = copy_of(tiny_dataset, tmp_path)
  rewrite(shard(data, 7), {1: lambda record: with_bands(record, 6)})
  with pytest.raises(data_input.BadRecordError, match=where(data, 7, 1) + re.escape(
      "feature 'image' has 12288 bytes, expected 24576 (32 x 32 x 12 float16): looks like 6 "
      'bands instead of 12 (TensorFlow: InvalidArgumentError:')):
    read_all(open_tf(data))
  # Every record of a batch with the same wrong size: an error too, not fewer, bigger tensors.
  data = copy_of(tiny_dataset, tmp_path / 'all')
  for index in range(8):
    rewrite(shard(data, index), {i: lambda record: with_bands(record, 6) for i in range(8)})
  with pytest.raises(data_input.BadRecordError, match=where(data, 0, 0) + 'feature'):
    list(open_tf(data).batches(8, seed=0, num_steps=8, shuffle_buffer=1))
  data = copy_of(tiny_dataset, tmp_path / 'malformed')
  rewrite(shard(data, 0), {4: lambda record: record[:len(record) // 2]})
  with pytest.raises(data_input.BadRecordError,
                     match=where(data, 0, 4) + 'malformed tf.train.Example: '):
    read_all(open_tf(data))


def test_tf_reader_refuses_to_skip(tiny_dataset):
  with pytest.raises(ValueError, match='max_bad_records=3 needs the local reader'):
    open_tf(tiny_dataset, max_bad_records=3)
  with pytest.raises(ValueError, match='max_bad_records must be an integer >= 0'):
    open_local(tiny_dataset, max_bad_records=-1)


# --- Skip mode -----------------------------------------------------------------------------------


def damaged_copy(tiny_dataset, tmp_path):
  """A copy with 12 bad records: split records 2, 13, 30, 31 and 48..55."""
  data = copy_of(tiny_dataset, tmp_path)
  rewrite(shard(data, 0), {2: lambda record: with_bands(record, 6)})  # Record 2.
  flip_image_byte(shard(data, 1), 5)  # Record 13: caught by the CRC.
  offset = int(tfrecord_index.scan_tfrecord(shard(data, 3))[6][0])
  truncate(shard(data, 3), offset + 100)  # Records 30 and 31.
  os.remove(shard(data, 6))  # Records 48..55.
  return data


BAD = [2, 13, 30, 31] + list(range(48, 56))


def missing_values(batch, slot):
  assert np.isnan(batch[schema.IMAGE][slot]).all()
  assert (batch[schema.WORLDCOVER][slot] == schema.IGNORE_INDEX).all()
  for name in (schema.VCF, schema.LAT, schema.LON):
    assert np.isnan(batch[name][slot])
  assert batch[schema.REGION][slot] == -1 and batch[schema.TILE_ID][slot] == b''


def test_skip_mode_fills_flags_and_counts_bad_records(tiny_dataset, tmp_path, caplog):
  data = damaged_copy(tiny_dataset, tmp_path)
  ids = [b for batch in open_local(tiny_dataset).eval_batches(64, features=(schema.TILE_ID,))
         for b in batch[schema.TILE_ID]]  # Tile id by global record index.
  with caplog.at_level(logging.WARNING):
    dataset = open_local(data, max_bad_records=len(BAD), verify_checksums=True)
  assert 'lists them: s1_tiles-train.tfrecord-00006-of-00008; their records will read as bad' \
      in caplog.text
  clean = open_local(tiny_dataset)
  flagged = []
  for epoch in range(2):  # The second epoch meets the same bad records: not counted again.
    kwargs = dict(seed=3, start_step=8 * epoch, num_steps=8, features=ALL)
    for batch, reference in zip(dataset.batches(8, **kwargs), clean.batches(8, **kwargs)):
      assert batch[data_input.BAD_RECORD].dtype == np.bool_
      assert data_input.BAD_RECORD not in reference
      for slot, bad in enumerate(batch[data_input.BAD_RECORD]):
        if bad:
          missing_values(batch, slot)
          flagged.append(ids.index(reference[schema.TILE_ID][slot]))
        else:  # Good records: exactly the clean read, at the same positions.
          for name in ALL:
            np.testing.assert_array_equal(batch[name][slot], reference[name][slot],
                                          err_msg=name)
  assert sorted(flagged) == sorted(BAD * 2)
  assert len(dataset.bad_records) == len(BAD)
  messages = {int(re.search(r'split record (\d+)', m).group(1)): m for m in dataset.bad_records}
  assert sorted(messages) == BAD
  assert messages[2].startswith(f'{shard(data, 0)}: record 2 (split record 2, byte ')
  assert "looks like 6 bands instead of 12" in messages[2]
  assert messages[13].startswith(f'{shard(data, 1)}: record 5 (split record 13, byte ')
  assert 'do not match their CRC' in messages[13]
  assert messages[31] == (f'{shard(data, 3)}: record 7 (split record 31): not read: lost to '
                          'the damage at record 6 (byte ' + messages[31].split('(byte ')[1])
  assert 'truncated TFRecord file' in messages[30]
  assert messages[50] == (f'{os.path.join(data, "s1_tiles-train.tfrecord-00006-of-00008")}: '
                          'record 2 (split record 50): not read: the file is missing')
  assert 'split record 50): not read: the file is missing' in caplog.text  # Logged.
  # An evaluation pass flags them too.
  evaluation = list(dataset.eval_batches(16, features=(schema.TILE_ID,)))
  flags = np.concatenate([b[data_input.BAD_RECORD] for b in evaluation])
  assert np.flatnonzero(flags).tolist() == BAD


def test_skip_mode_raises_past_the_limit(tiny_dataset, tmp_path):
  data = damaged_copy(tiny_dataset, tmp_path)
  dataset = open_local(data, max_bad_records=len(BAD) - 1, verify_checksums=True)
  with pytest.raises(ValueError, match=re.escape(
      f'more than {len(BAD) - 1} bad records in {data}') + r'.*; the last: .*split record'):
    read_all(dataset)
  assert len(dataset.bad_records) == len(BAD)
  # Skip mode off: the first bad record met raises, naming it.
  with pytest.raises(FileNotFoundError, match='tfrecord-00006-of-00008'):
    open_local(data)


def test_skip_mode_with_a_selection(tiny_dataset, tmp_path):
  data = damaged_copy(tiny_dataset, tmp_path)
  dataset = open_local(data, max_bad_records=3, verify_checksums=True, records=[50, 5, 2, 48, 9])
  batch, = dataset.eval_batches(5, features=(schema.TILE_ID, schema.IMAGE))
  assert batch[data_input.BAD_RECORD].tolist() == [True, False, False, True, True]  # 2 5 9 48 50
  assert batch[schema.TILE_ID].tolist()[1:3] == [
      b for b in next(open_local(tiny_dataset, records=[5, 9]).eval_batches(
          2, features=(schema.TILE_ID,)))[schema.TILE_ID]]
  assert [re.search(r'split record (\d+)', m).group(1) for m in dataset.bad_records] == [
      '2', '48', '50']
  assert np.isnan(batch[schema.IMAGE][[0, 3, 4]]).all()
