"""The training read path (data_pipeline.input): both readers, their stream and their parsing."""

import os
import shutil
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipeline import array_pool
from data_pipeline import build_synthetic
from data_pipeline import example_codec
from data_pipeline import input as data_input
from data_pipeline import record_files
from data_pipeline import schema
from data_pipeline import tf_reader
from data_pipeline import tfrecord_index
from data_pipeline import writer

READERS = ('local', 'tf')
ALL = (schema.IMAGE, schema.WORLDCOVER, schema.VCF, schema.LAT, schema.LON, schema.REGION,
       schema.TILE_ID)


def stock_examples(data_dir, split='train'):
  """Every example of a split as stock TFDS decodes it, by tile id."""
  builder = tfds.builder_from_directory(data_dir)
  return {ex[schema.TILE_ID]: ex for ex in tfds.as_numpy(builder.as_dataset(split))}


def tile_ids(dataset, batch=4, **kwargs):
  ids = []
  for b in dataset.batches(batch, features=(schema.TILE_ID,), **kwargs):
    ids.extend(b[schema.TILE_ID].tolist())
  return ids


@pytest.mark.parametrize('reader', READERS)
def test_batches_equal_stock_tfds(tiny_dataset, reader):
  reference = stock_examples(tiny_dataset)
  dataset = data_input.HostDataset(tiny_dataset, 'train', reader=reader)
  seen = []
  for batch in dataset.batches(8, seed=1, num_steps=8, features=ALL):
    assert set(batch) == set(ALL)
    assert batch[schema.IMAGE].shape == (8, 32, 32, 12)
    assert batch[schema.IMAGE].dtype == np.float16
    assert batch[schema.WORLDCOVER].shape == (8, 32, 32)
    assert batch[schema.WORLDCOVER].dtype == np.uint8
    for name in (schema.VCF, schema.LAT, schema.LON):
      assert batch[name].shape == (8,) and batch[name].dtype == np.float32
    assert batch[schema.REGION].dtype == np.int64
    assert batch[schema.TILE_ID].dtype == object
    for i, tile_id in enumerate(batch[schema.TILE_ID]):
      seen.append(tile_id)
      for name in ALL:
        np.testing.assert_array_equal(batch[name][i], reference[tile_id][name], err_msg=name)
  assert sorted(seen) == sorted(reference)  # One epoch is every tile once.


@pytest.mark.parametrize('reader', READERS)
def test_only_requested_features_are_returned(tiny_dataset, reader):
  dataset = data_input.HostDataset(tiny_dataset, 'train', reader=reader)
  batch = next(dataset.batches(4, seed=0, num_steps=1))
  assert list(batch) == [schema.IMAGE]
  batch = next(dataset.batches(4, seed=0, num_steps=1, features=(schema.VCF, schema.TILE_ID)))
  assert sorted(batch) == [schema.TILE_ID, schema.VCF]
  with pytest.raises(ValueError, match="no features \\['elevation'\\]"):
    dataset.batches(4, seed=0, num_steps=1, features=('elevation',))


@pytest.mark.parametrize('reader', READERS)
def test_stream_is_a_function_of_seed_and_resumes_across_epochs(tiny_dataset, reader):
  dataset = data_input.HostDataset(tiny_dataset, 'train', reader=reader)
  # Batches of 6 do not divide the 64 tiles: batches straddle epoch borders.
  full = tile_ids(dataset, batch=6, seed=5, num_steps=25, shuffle_buffer=16)
  assert full == tile_ids(dataset, batch=6, seed=5, num_steps=25, shuffle_buffer=16)
  assert full != tile_ids(dataset, batch=6, seed=6, num_steps=25, shuffle_buffer=16)
  for start in (1, 10, 11, 21):
    assert tile_ids(dataset, batch=6, seed=5, start_step=start, num_steps=25 - start,
                    shuffle_buffer=16) == full[start * 6:], start
  # Every epoch holds every tile once, in its own order.
  epochs = [full[i:i + 64] for i in range(0, 128, 64)]
  assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]
  assert len(set(epochs[0])) == 64


@pytest.mark.parametrize('reader', READERS)
def test_unshuffled_stream_is_file_order(tiny_dataset, reader):
  dataset = data_input.HostDataset(tiny_dataset, 'train', reader=reader)
  ids = tile_ids(dataset, seed=0, num_steps=32, shuffle_buffer=1)
  files = [path for path, *_ in dataset.file_instructions]
  in_file_order = [tf.train.Example.FromString(r.numpy()).features.feature[schema.TILE_ID]
                   .bytes_list.value[0] for r in tf.data.TFRecordDataset(files)]
  if reader == 'local':
    assert ids[:64] == in_file_order
  else:  # The tf.data reader interleaves 4 files record by record.
    assert sorted(ids[:64]) == sorted(in_file_order)
  assert ids[64:] == ids[:64]


def unit_examples(index):
  return build_synthetic.synthetic_examples(index, seed=0, tile_size=16)


@pytest.fixture(scope='module')
def uneven_dataset(tmp_path_factory):
  """10 tiles in 4 shards of 3, 3, 2, 2: two hosts split shard 1 between them."""
  path = str(tmp_path_factory.mktemp('uneven') / 'ds')
  writer.build_dataset(path, {'train': list(range(10))}, unit_examples,
                       schema.InputContract(tile_size=16), num_shards=4, host_count=2)
  return path


@pytest.mark.parametrize('reader', READERS)
def test_hosts_split_files_at_share_borders(uneven_dataset, reader):
  shares = [data_input.HostDataset(uneven_dataset, 'train', process_index=i, process_count=2,
                                   reader=reader) for i in range(2)]
  assert [s.num_examples for s in shares] == [5, 5]
  assert [(s.file_instructions[-1][1:3] if i == 0 else s.file_instructions[0][1:3])
          for i, s in enumerate(shares)] == [(0, 2), (2, 1)]  # Shard 1: 2 tiles, then 1.
  ids = [tile_ids(s, batch=5, seed=2, num_steps=1, shuffle_buffer=8) for s in shares]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == sorted(stock_examples(uneven_dataset))


def add_features(example_bytes):
  """The record with features this code does not know, big and small, before and after."""
  example = tf.train.Example.FromString(example_bytes)
  extra = example.features.feature
  extra['crs_test'].bytes_list.value.append(b'EPSG:32631')
  extra['transform_test'].float_list.value.extend([10.0, 0.0, 500000.0, 0.0, -10.0, 4.6e6])
  extra['counts_test'].int64_list.value.extend([-1, 2, 3])
  extra['big_test'].bytes_list.value.append(os.urandom(200_000))
  extra['empty_test'].SetInParent()
  return example.SerializeToString()


@pytest.mark.parametrize('reader', READERS)
def test_records_with_unknown_features_read_the_same(tiny_dataset, tmp_path, reader):
  copy = tmp_path / 'extra'
  shutil.copytree(tiny_dataset, copy)
  for name in os.listdir(copy):
    if '.tfrecord-' in name:
      records = [r.numpy() for r in tf.data.TFRecordDataset(str(copy / name))]
      with tf.io.TFRecordWriter(str(copy / name)) as out:
        for record in records:
          out.write(add_features(record))
  reference = stock_examples(tiny_dataset)
  dataset = data_input.HostDataset(str(copy), 'train', reader=reader)
  count = 0
  for batch in dataset.batches(8, seed=0, num_steps=8, features=ALL):
    for i, tile_id in enumerate(batch[schema.TILE_ID]):
      count += 1
      for name in ALL:
        np.testing.assert_array_equal(batch[name][i], reference[tile_id][name], err_msg=name)
  assert count == 64


def varint(value):
  out = bytearray()
  value &= (1 << 64) - 1
  while True:
    out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
    value >>= 7
    if not value:
      return bytes(out)


def field(number, wire, payload):
  key = varint(number << 3 | wire)
  return key + (varint(len(payload)) + payload if wire == 2 else payload)


def entry(key, feature):
  return field(1, 2, field(1, 2, key) + field(2, 2, feature))


def test_parser_reads_unpacked_lists_negative_ints_and_repeated_keys(tmp_path):
  """Wire-format cases the protobuf library does not write but parsers must accept."""
  features = b''.join([
      entry(b'tile_id', field(1, 2, field(1, 2, b'old'))),
      entry(b'vcf', field(2, 2, field(1, 5, struct.pack('<f', 42.5)))),  # Unpacked float.
      entry(b'region', field(3, 2, field(1, 0, varint(-3)))),  # Unpacked, negative int64.
      entry(b'shape', field(3, 2, field(1, 2, varint(448) + varint(12)))),  # Packed ints.
      entry(b'tile_id', field(1, 2, field(1, 2, b'new'))),  # A repeated key: the last wins.
  ])
  record = field(7, 0, varint(1)) + field(1, 2, features)  # An unknown field first.
  path = str(tmp_path / 'crafted.tfrecord')
  with tf.io.TFRecordWriter(path) as out:
    out.write(record)
  (offset, length), = tfrecord_index.scan_tfrecord(path)
  codecs = [example_codec.Codec('vcf', example_codec.FLOAT, (), np.dtype(np.float32)),
            example_codec.Codec('region', example_codec.INT, (), np.dtype(np.int64)),
            example_codec.Codec('shape', example_codec.INT, (2,), np.dtype(np.int32)),
            example_codec.Codec('tile_id', example_codec.TEXT, (), np.dtype(object))]
  out = array_pool.empty_batch(codecs, 1)
  files = record_files.LocalFiles([path])
  try:
    with files.open(0) as source:
      example_codec.read_record(source, int(offset), int(length), path,
                                {c.name.encode(): c for c in codecs}, out, {}, 0)
      missing = [example_codec.Codec('lat', example_codec.FLOAT, (), np.dtype(np.float32))]
      with pytest.raises(ValueError, match="crafted.tfrecord: no feature 'lat'"):
        example_codec.read_record(source, int(offset), int(length), path, {b'lat': missing[0]},
                                  array_pool.empty_batch(missing, 1), {}, 0)
  finally:
    files.close()
  assert out['vcf'][0] == 42.5 and out['region'][0] == -3
  assert out['shape'][0].tolist() == [448, 12] and out['tile_id'][0] == b'new'


def test_scan_rejects_corrupt_and_truncated_files(tiny_dataset, tmp_path):
  shard = [n for n in sorted(os.listdir(tiny_dataset)) if '-train.tfrecord-' in n][0]
  data = open(os.path.join(tiny_dataset, shard), 'rb').read()
  records = tfrecord_index.scan_tfrecord(os.path.join(tiny_dataset, shard))
  assert len(records) == 8 and records[0][0] == 12
  truncated = tmp_path / 'truncated'
  truncated.write_bytes(data[:-5])
  with pytest.raises(ValueError, match='truncated TFRecord file'):
    tfrecord_index.scan_tfrecord(str(truncated))
  corrupt = bytearray(data)
  corrupt[int(records[3][0]) - 12] ^= 1  # One bit of the 4th record's length.
  (tmp_path / 'corrupt').write_bytes(bytes(corrupt))
  with pytest.raises(ValueError, match=f'corrupt TFRecord header at byte {records[3][0] - 12}'):
    tfrecord_index.scan_tfrecord(str(tmp_path / 'corrupt'))


def test_a_shard_that_changed_since_it_was_written_is_refused(tiny_dataset, tmp_path):
  copy = tmp_path / 'changed'
  shutil.copytree(tiny_dataset, copy)
  shard = str(copy / sorted(n for n in os.listdir(copy) if '-train.tfrecord-' in n)[0])
  records = [r.numpy() for r in tf.data.TFRecordDataset(shard)]
  with tf.io.TFRecordWriter(shard) as out:
    for record in records[:-1]:
      out.write(record)
  dataset = data_input.HostDataset(str(copy), 'train', reader='local')
  with pytest.raises(ValueError, match='7 records, the dataset metadata says 8'):
    dataset.batches(4, seed=0, num_steps=1)


def test_wrong_image_size_names_the_record(tiny_dataset, tmp_path):
  copy = tmp_path / 'short'
  shutil.copytree(tiny_dataset, copy)
  for name in os.listdir(copy):
    if '-train.tfrecord-' in name:
      records = [tf.train.Example.FromString(r.numpy())
                 for r in tf.data.TFRecordDataset(str(copy / name))]
      with tf.io.TFRecordWriter(str(copy / name)) as out:
        for example in records:
          image = example.features.feature[schema.IMAGE].bytes_list.value
          image[0] = image[0][:-2]
          out.write(example.SerializeToString())
  dataset = data_input.HostDataset(str(copy), 'train', reader='local')
  with pytest.raises(ValueError, match=r"tfrecord-000\d\d-of-00008: record \d+ \(split record "
                     r"\d+, byte \d+\): feature 'image' has 24574 bytes, expected 24576"):
    next(dataset.batches(4, seed=0, num_steps=1))


def test_array_pool_reuses_only_arrays_nobody_holds():
  pool = array_pool.ArrayPool(capacity=3)
  shape, dtype = (4, 1024), np.dtype(np.float16)
  first = pool.empty(shape, dtype)
  address = first.ctypes.data
  del first
  again = pool.empty(shape, dtype)
  assert again.ctypes.data == address  # Released: reused.
  view = again[:2]
  del again
  other = pool.empty(shape, dtype)
  assert other.ctypes.data != address  # A view still holds it: not reused.
  buffer = memoryview(other)
  assert pool.empty(shape, dtype).ctypes.data not in (address, other.ctypes.data)
  del view, buffer


def test_kept_batches_are_never_overwritten(tiny_dataset, monkeypatch):
  monkeypatch.setattr(array_pool, '_POOL_MIN_BYTES', 0)  # Pool even the 32 px batches.
  dataset = data_input.HostDataset(tiny_dataset, 'train')
  kept, copies, addresses = [], [], set()
  for step, batch in enumerate(dataset.batches(4, seed=0, num_steps=40)):
    addresses.add(batch[schema.IMAGE].ctypes.data)
    if step % 7 == 0:
      kept.append(batch[schema.IMAGE][1:])  # A view, like a preview kept for logging.
      copies.append(batch[schema.IMAGE][1:].copy())
  for view, copy in zip(kept, copies):
    np.testing.assert_array_equal(view, copy)
  assert len(addresses) < 40  # Released batches were recycled.


def test_local_folders_get_the_local_reader_and_unknown_readers_are_refused(tiny_dataset):
  assert data_input.HostDataset(tiny_dataset, 'train').reader == 'local'
  with pytest.raises(ValueError, match="reader must be one of"):
    data_input.HostDataset(tiny_dataset, 'train', reader='fast')


# --- Record selections and evaluation passes ---------------------------------------------------


def file_order_ids(data_dir, split='train'):
  """Tile ids of a split in file order (= global record index order), read by stock TFDS."""
  builder = tfds.builder_from_directory(data_dir)
  return [ex[schema.TILE_ID] for ex in
          tfds.as_numpy(builder.as_dataset(split, shuffle_files=False))]


# The tf.data reader keeps a small selection in memory after one read, or rereads it per epoch.
SELECTION_READERS = [('local', None), ('tf', 'cached'), ('tf', 'reread')]


def open_selection(data_dir, reader, cache, monkeypatch, **kwargs):
  if cache == 'reread':
    monkeypatch.setattr(tf_reader, '_TF_CACHE_BYTES', 0)
  dataset = data_input.HostDataset(data_dir, 'train', reader=reader, **kwargs)
  if reader == 'tf':
    assert dataset._tf_reader()._cache_selection() == (cache == 'cached')
  return dataset


@pytest.mark.parametrize('reader,cache', SELECTION_READERS)
def test_a_selection_reads_each_selected_record_once_per_epoch(tiny_dataset, reader, cache,
                                                               monkeypatch):
  ids = file_order_ids(tiny_dataset)
  reference = stock_examples(tiny_dataset)
  selection = np.random.default_rng(0).choice(64, size=13, replace=False)  # Unsorted.
  expected = sorted(ids[i] for i in selection)
  dataset = open_selection(tiny_dataset, reader, cache, monkeypatch, process_index=0,
                           process_count=1, records=selection)
  assert dataset.num_examples == 13 and dataset.share_sizes == (13,)
  np.testing.assert_array_equal(dataset.records, np.sort(selection))
  np.testing.assert_array_equal(dataset.record_indices, np.sort(selection))
  # Batches of 3 straddle epoch borders; 13 steps are 3 epochs.
  stream = tile_ids(dataset, batch=3, seed=4, num_steps=13, shuffle_buffer=16)
  epochs = [stream[i:i + 13] for i in range(0, 39, 13)]
  for epoch in epochs:
    assert sorted(epoch) == expected  # As a multiset: each selected record once.
  assert len({tuple(epoch) for epoch in epochs}) > 1  # Each epoch in its own order.
  assert tile_ids(dataset, batch=3, seed=4, start_step=5, num_steps=8,
                  shuffle_buffer=16) == stream[15:]
  batch = next(dataset.batches(13, seed=0, num_steps=1, features=ALL))
  for i, tile_id in enumerate(batch[schema.TILE_ID]):
    for name in ALL:
      np.testing.assert_array_equal(batch[name][i], reference[tile_id][name], err_msg=name)


@pytest.mark.parametrize('reader,cache', SELECTION_READERS)
def test_processes_split_a_selection_between_them(tiny_dataset, reader, cache, monkeypatch):
  ids = file_order_ids(tiny_dataset)
  selection = [1, 5, 9, 20, 30, 31, 0, 40, 63, 50]  # 7 in the first half, 3 in the second.
  shares = [open_selection(tiny_dataset, reader, cache, monkeypatch, process_index=i,
                           process_count=2, records=selection) for i in range(2)]
  assert [s.num_examples for s in shares] == [7, 3]
  assert shares[0].share_sizes == shares[1].share_sizes == (7, 3)
  read = [tile_ids(s, batch=s.num_examples, seed=1, num_steps=1, shuffle_buffer=16)
          for s in shares]
  assert not set(read[0]) & set(read[1])
  assert sorted(read[0] + read[1]) == sorted(ids[i] for i in selection)


@pytest.mark.parametrize('reader', READERS)
def test_a_one_record_selection_fills_any_batch(tiny_dataset, reader):
  ids = file_order_ids(tiny_dataset)
  dataset = data_input.HostDataset(tiny_dataset, 'train', process_index=0, process_count=1,
                                   reader=reader, records=np.array([37]))
  batches = list(dataset.batches(4, seed=0, num_steps=3, shuffle_buffer=16,
                                 features=(schema.TILE_ID, schema.VCF)))
  assert len(batches) == 3
  for batch in batches:
    assert batch[schema.TILE_ID].tolist() == [ids[37]] * 4
    assert batch[schema.VCF].shape == (4,)
  # 3 records, batches of 8: every batch spans epochs, each a permutation of the 3.
  three = data_input.HostDataset(tiny_dataset, 'train', process_index=0, process_count=1,
                                 reader=reader, records=[2, 33, 60])
  stream = tile_ids(three, batch=8, seed=0, num_steps=3, shuffle_buffer=16)
  epochs = [stream[i:i + 3] for i in range(0, 24, 3)]
  assert all(sorted(e) == sorted([ids[2], ids[33], ids[60]]) for e in epochs)
  assert tile_ids(three, batch=8, seed=0, start_step=2, num_steps=1,
                  shuffle_buffer=16) == stream[16:]
  whole = data_input.HostDataset(tiny_dataset, 'train', process_index=0, process_count=1,
                                 reader=reader)
  with pytest.raises(ValueError, match=r'per-host batch 65 must lie in 1\.\.64'):
    whole.batches(65, seed=0, num_steps=1)  # Without a selection, still a mistake.


def test_bad_selections_are_refused(tiny_dataset):
  def share(records, process_index=0, process_count=1):
    return data_input.HostDataset(tiny_dataset, 'train', process_index, process_count,
                                  records=records)

  with pytest.raises(ValueError, match=r'process 1 of 2 has none of the 3 selected records '
                     r'in its share \(records 32\.\.63 of the split\)'):
    share([0, 1, 2], process_index=1, process_count=2)
  with pytest.raises(ValueError, match='record index 64 out of range: the split has 64'):
    share([3, 64])
  with pytest.raises(ValueError, match='record index -1 out of range'):
    share([-1, 3])
  with pytest.raises(ValueError, match='record index 5 is selected more than once'):
    share([5, 2, 5])
  with pytest.raises(ValueError, match='integer record indices, got dtype bool'):
    share(np.ones(64, bool))
  with pytest.raises(ValueError, match='none of the 0 selected records'):
    share([])


def masked_in(batches, local_batch, features):
  """Tile ids of the real examples of an evaluation pass; checks batch shapes and padding."""
  ids = []
  for batch in batches:
    assert set(batch) == set(features) | {data_input.EXAMPLE_MASK}
    mask = batch[data_input.EXAMPLE_MASK]
    assert mask.dtype == np.bool_ and mask.shape == (local_batch,)
    for name in features:
      assert batch[name].shape[0] == local_batch
    ids.extend(batch[schema.TILE_ID][mask].tolist())
    # Padding follows the real examples and is a real record (here the share's first).
    assert not np.any(mask[np.argmin(mask):]) or mask.all()
  return ids


@pytest.mark.parametrize('reader', READERS)
def test_an_evaluation_pass_reads_the_split_once_in_file_order(tiny_dataset, reader):
  ids = file_order_ids(tiny_dataset, 'validation')
  dataset = data_input.HostDataset(tiny_dataset, 'validation', process_index=0,
                                   process_count=1, reader=reader)
  features = (schema.TILE_ID, schema.IMAGE)
  batches = list(dataset.eval_batches(6, features=features))
  assert len(batches) == dataset.num_eval_batches(6) == 3  # 16 records: 6 + 6 + 4 and 2 pads.
  assert masked_in(batches, 6, features) == ids
  assert batches[-1][data_input.EXAMPLE_MASK].tolist() == [True] * 4 + [False] * 2
  assert batches[-1][schema.TILE_ID][4:].tolist() == [ids[0]] * 2
  assert batches[0][schema.IMAGE].shape == (6, 32, 32, 12)
  reference = stock_examples(tiny_dataset, 'validation')
  np.testing.assert_array_equal(batches[1][schema.IMAGE][0], reference[ids[6]][schema.IMAGE])


@pytest.mark.parametrize('reader', READERS)
def test_evaluation_passes_of_uneven_shares_have_equal_lengths(tiny_dataset, reader):
  ids = file_order_ids(tiny_dataset)
  selection = [1, 5, 9, 20, 30, 31, 0, 40, 63, 50]  # 7 records in share 0, 3 in share 1.
  shares = [data_input.HostDataset(tiny_dataset, 'train', process_index=i, process_count=2,
                                   reader=reader, records=selection) for i in range(2)]
  features = (schema.TILE_ID,)
  passes = [list(s.eval_batches(2, features=features)) for s in shares]
  assert [len(p) for p in passes] == [s.num_eval_batches(2) for s in shares] == [4, 4]
  assert [int(sum(b[data_input.EXAMPLE_MASK].sum() for b in p)) for p in passes] == [7, 3]
  assert [b[data_input.EXAMPLE_MASK].tolist() for b in passes[1]] == [
      [True, True], [True, False], [False, False], [False, False]]
  read = [masked_in(p, 2, features) for p in passes]
  assert read == [[ids[i] for i in sorted(selection) if i < 32],
                  [ids[i] for i in sorted(selection) if i >= 32]]
