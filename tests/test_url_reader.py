"""The URL reader and the host cache (data_pipeline.record_files, data_pipeline.host_cache).

The URL reader is the local reader's algorithm on ``tf.io.gfile`` byte ranges; given local paths
(``reader='url'``) it must give the local reader's batches bit for bit, whatever the seed,
resume step, selection, evaluation padding or damage. The host cache must change nothing but
where the bytes come from. The session's 32 px dataset has 64 train tiles in 8 shards of 8.
"""

import collections
import gc
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipeline import data_shards
from data_pipeline import host_cache
from data_pipeline import input as data_input
from data_pipeline import record_files
from data_pipeline import schema
from data_pipeline import subsets
from data_pipeline import tfrecord_index
from test_bad_records import flip_image_byte

ALL = (schema.IMAGE, schema.WORLDCOVER, schema.VCF, schema.LAT, schema.LON, schema.REGION,
       schema.TILE_ID)


def open_split(data_dir, reader, split='train', **kwargs):
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  return data_input.HostDataset(data_dir, split, reader=reader, **kwargs)


def assert_same_batches(expected, actual):
  """Equal keys, dtypes, shapes and bytes (NaN payloads included), batch by batch."""
  expected, actual = list(expected), list(actual)
  assert len(expected) == len(actual) > 0
  for step, (a, b) in enumerate(zip(expected, actual)):
    assert set(a) == set(b), step
    for key in a:
      assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (step, key)
      if a[key].dtype == object:
        assert a[key].tolist() == b[key].tolist(), (step, key)
      else:
        assert a[key].tobytes() == b[key].tobytes(), (step, key)


def copy_of(tiny_dataset, tmp_path):
  copy = tmp_path / 'ds'
  shutil.copytree(tiny_dataset, copy)
  return str(copy)


def shard(data_dir, index):
  return os.path.join(data_dir, f's1_tiles-train.tfrecord-{index:05d}-of-00008')


# --- One order on any filesystem -----------------------------------------------------------------


def test_url_batches_are_the_stock_examples(tiny_dataset):
  """Independent truth: every tile of an epoch as stock TFDS decodes it."""
  builder = tfds.builder_from_directory(tiny_dataset)
  reference = {ex[schema.TILE_ID]: ex for ex in tfds.as_numpy(builder.as_dataset('train'))}
  seen = []
  for batch in open_split(tiny_dataset, 'url').batches(16, seed=2, num_steps=4, features=ALL):
    for i, tile_id in enumerate(batch[schema.TILE_ID]):
      seen.append(tile_id)
      for name in ALL:
        np.testing.assert_array_equal(batch[name][i], reference[tile_id][name], err_msg=name)
  assert sorted(seen) == sorted(reference)


@pytest.mark.parametrize('seed,start_step', [(0, 0), (7, 3), (7, 11), (123456789, 20)])
def test_url_and_local_give_the_same_batches(tiny_dataset, seed, start_step):
  # Batch 8 of 64 tiles: an epoch is 8 steps; 3 and 11 resume mid-epoch, 20 in the third.
  kwargs = dict(seed=seed, start_step=start_step, num_steps=6, features=ALL)
  local = list(open_split(tiny_dataset, 'local').batches(8, **kwargs))
  assert_same_batches(local, open_split(tiny_dataset, 'url').batches(8, **kwargs))
  # A resume continues the uninterrupted stream.
  whole = open_split(tiny_dataset, 'url').batches(8, seed=seed, num_steps=start_step + 6,
                                                  features=ALL)
  assert_same_batches(list(whole)[start_step:], local)


def test_tensors_stream_in_pieces_into_the_batch(tiny_dataset, monkeypatch):
  """A 32 px tile fits the parser's first read; with reads of a few hundred bytes every image
  streams: part from the first read, the rest in pieces, as a 448 px tile's does."""
  from data_pipeline import example_codec  # pylint: disable=g-import-not-at-top
  expected = list(open_split(tiny_dataset, 'local').batches(8, seed=3, num_steps=3,
                                                           features=ALL))
  monkeypatch.setattr(example_codec, '_CHUNK', 300)
  monkeypatch.setattr(record_files, 'URL_STREAM_CHUNK', 1000)
  pieces = []
  original = record_files._GFileSource.readinto

  def counted(self, out, offset):
    pieces.append(len(out))
    return original(self, out, offset)

  monkeypatch.setattr(record_files._GFileSource, 'readinto', counted)
  for reader in ('url', 'local'):
    assert_same_batches(expected, open_split(tiny_dataset, reader).batches(8, seed=3,
                                                                           num_steps=3,
                                                                           features=ALL))
  # Each of the 24 records' image (32 x 32 x 12 float16) minus what the first read held, in
  # pieces of 1000 bytes, and its WorldCover label (32 x 32 uint8) likewise.
  images = [n for n in pieces if n > 32 * 32]
  assert len(images) == 24 and all(32 * 32 * 12 * 2 - 300 < n < 32 * 32 * 12 * 2 for n in images)
  assert len(pieces) == 48


def test_a_url_source_reads_ranges_and_names_what_it_cannot_read(tiny_dataset, monkeypatch,
                                                                 tmp_path):
  monkeypatch.setattr(record_files, 'URL_STREAM_CHUNK', 4096)
  path = shard(tiny_dataset, 0)
  data = open(path, 'rb').read()
  files = record_files.UrlFiles([path, str(tmp_path / 'gone.tfrecord')])
  with files.open(0) as source:
    for offset, n in ((0, 10), (5000, 20000), (len(data) - 3000, 3000), (len(data) - 100, 500)):
      out = np.zeros(n, np.uint8)
      got = source.readinto(memoryview(out), offset)
      assert got == min(n, len(data) - offset)
      assert out[:got].tobytes() == data[offset:offset + got]
      assert source.pread(n, offset) == data[offset:offset + n]
  with pytest.raises(OSError, match=r'gone\.tfrecord: cannot read bytes 7\.\.19 '):
    files.read(1, 7, 12)


def test_url_and_local_agree_with_a_label_fraction_and_on_two_processes(tiny_dataset):
  index = data_input.read_split_index(tiny_dataset, 'train', (schema.TILE_ID,))
  records = subsets.select_records(index, fraction=0.1, seed=0)
  assert len(records) == 6 and 0 < np.sum(records < 32) < 6  # Both processes get some.
  for process in range(2):
    opened = {reader: open_split(tiny_dataset, reader, records=records, process_index=process,
                                 process_count=2) for reader in ('local', 'url')}
    # A batch larger than the share's selection spans several epochs.
    kwargs = dict(seed=5, start_step=2, num_steps=4, features=ALL)
    assert_same_batches(opened['local'].batches(9, **kwargs), opened['url'].batches(9, **kwargs))
    assert_same_batches(opened['local'].eval_batches(4, features=ALL),
                        opened['url'].eval_batches(4, features=ALL))


def test_eval_batches_agree_and_read_each_file_through_one_handle(tiny_dataset, monkeypatch):
  local = list(open_split(tiny_dataset, 'local', split='validation', process_index=1,
                          process_count=2).eval_batches(3, features=ALL))
  url = open_split(tiny_dataset, 'url', split='validation', process_index=1, process_count=2)
  url._record_locations()  # Scanned before counting.
  opened, reads = [], []
  original_open = record_files.UrlFiles.open
  original_pread = record_files._GFileSource.pread

  def counted_open(self, index):
    opened.append(index)
    return original_open(self, index)

  def counted_pread(self, n, offset):
    reads.append((self, offset))  # The handle itself: kept alive, its id stays its own.
    return original_pread(self, n, offset)

  monkeypatch.setattr(record_files.UrlFiles, 'open', counted_open)
  monkeypatch.setattr(record_files._GFileSource, 'pread', counted_pread)
  assert_same_batches(local, url.eval_batches(3, features=ALL))
  # The split has 16 records in 8 files; this process reads files 4..7, 2 records each, in
  # batches of 3 in file order: [f4 f4 f5] [f5 f6 f6] [f7 f7 padding = f4's first]. A batch
  # reads the records it has of one file through one open file: 2 per batch.
  files = [url.file_instructions[index][0] for index in opened]
  assert files == [os.path.join(tiny_dataset, f's1_tiles-validation.tfrecord-0000{i}-of-00008')
                   for i in (4, 5, 5, 6, 4, 7)]
  # Through a handle, reads go forward: each record's first read starts past the last one's.
  by_handle = collections.defaultdict(list)
  for handle, offset in reads:
    by_handle[id(handle)].append(offset)
  assert len(by_handle) == len(opened)
  assert all(offsets == sorted(set(offsets)) for offsets in by_handle.values())
  assert [batch[data_input.EXAMPLE_MASK].tolist() for batch in local] == [
      [True] * 3, [True] * 3, [True, True, False]]


def test_the_local_reader_refuses_a_url():
  with pytest.raises(ValueError, match="reader='local' reads local paths only; read a URL with "
                     "reader='url'"):
    data_input.HostDataset('gs://bucket/dataset', 'train', 0, 1, reader='local')


def test_reader_threads_per_byte_source(monkeypatch):
  """URLs wait on the network: many threads. Local paths through the URL code path hold the GIL
  for each piece's bytes: one per core, never more than the local reader's."""
  monkeypatch.setattr(record_files, '_CORES', 3)
  local_paths, urls = ['/data/a.tfrecord'], ['gs://bucket/a.tfrecord']
  assert record_files.read_threads(local_paths, False, 8) == 8
  assert record_files.read_threads(urls, True, 8) == record_files.URL_READ_THREADS >= 16
  assert record_files.read_threads(local_paths, True, 8) == 3
  assert record_files.read_threads(local_paths, True, 2) == 2


def test_same_layout_for_local_and_url_readers(tiny_dataset):
  """A checkpoint records the order, which the local and URL readers share (not tf.data)."""
  layouts, streams = {}, {}
  for reader in ('local', 'url', 'tf'):
    stream = data_shards.ShardedStream(tiny_dataset, 'train', data_shards=4, process_index=0,
                                       process_count=2, reader=reader)
    stream.check_readable()
    layouts[reader] = stream.layout(seed=1, global_batch=16)
    if reader != 'tf':
      streams[reader] = list(stream.batches(8, seed=1, start_step=3, num_steps=3,
                                            shuffle_buffer=64, features=ALL))
  assert layouts['local'] == layouts['url'] and layouts['local']['reader'] == 'local'
  assert layouts['tf']['reader'] == 'tf'
  assert_same_batches(streams['local'], streams['url'])


# --- Bad data: the same rows, the same messages -------------------------------------------------


def skip_mode_batches(data_dir, reader, **kwargs):
  dataset = open_split(data_dir, reader, max_bad_records=16, **kwargs)
  batches = list(dataset.batches(8, seed=3, num_steps=10, features=ALL))
  batches += list(dataset.eval_batches(8, features=ALL))
  return batches, dataset.bad_records


@pytest.mark.parametrize('indexed', [True, False])
def test_truncated_and_corrupt_files_flag_the_same_rows(tiny_dataset, tmp_path, indexed):
  data = copy_of(tiny_dataset, tmp_path)
  if not indexed:
    os.remove(os.path.join(data, tfrecord_index.INDEX_FILE))
  records = tfrecord_index.scan_tfrecord(shard(data, 3))
  os.truncate(shard(data, 3), int(records[5][0]) + 50)  # Records 5..7 of file 3 lost.
  header = int(tfrecord_index.scan_tfrecord(shard(data, 6))[2][0]) - 12
  with open(shard(data, 6), 'r+b') as f:  # Record 2's length no longer matches its CRC.
    f.seek(header)
    byte = f.read(1)[0]
    f.seek(header)
    f.write(bytes([byte ^ 4]))
  offset, length = (int(v) for v in tfrecord_index.scan_tfrecord(shard(data, 1))[4])
  with open(shard(data, 1), 'r+b') as f:  # Record 4's protobuf broken, its framing intact.
    f.seek(offset)
    f.write(b'\xff' * 8)
  local, local_bad = skip_mode_batches(data, 'local')
  url, url_bad = skip_mode_batches(data, 'url')
  assert_same_batches(local, url)
  assert url_bad == local_bad
  # By hand: file 3 loses records 5..7 (split 29..31; its size no longer fits the index, so it
  # is scanned), file 1 record 4 (12), and file 6 record 2 (50) if the index frames its
  # records, else records 2..7 (50..55) too: each flagged wherever it is read.
  flagged = {tile for batch in url for tile, bad in
             zip(batch[schema.TILE_ID].tolist(), batch[data_input.BAD_RECORD]) if bad}
  assert flagged == {b''}  # Bad rows read as missing values: no tile id.
  expected = [12, 29, 30, 31, 50] + ([] if indexed else [51, 52, 53, 54, 55])
  assert len(url_bad) == len(expected)
  eval_flags = np.concatenate([b[data_input.BAD_RECORD] for b in url[10:]])
  assert np.flatnonzero(eval_flags).tolist() == expected


def test_checksums_catch_a_flipped_image_byte_in_both_readers(tiny_dataset, tmp_path):
  data = copy_of(tiny_dataset, tmp_path)
  flip_image_byte(shard(data, 5), 3)  # Inside the image: only the payload CRC sees it.
  results = {}
  for reader in ('local', 'url'):
    batches, bad = skip_mode_batches(data, reader, verify_checksums=True)
    results[reader] = batches
    assert len(bad) == 1 and 'record 3 (split record 43' in bad[0]
    assert 'corrupt record: its bytes do not match their CRC' in bad[0]
  assert_same_batches(results['local'], results['url'])
  clean_local, _ = skip_mode_batches(data, 'local')
  clean_url, _ = skip_mode_batches(data, 'url')
  assert_same_batches(clean_local, clean_url)  # Unchecked, the flipped byte reads in both.


def test_remote_scan_in_chunks_equals_the_local_scan(tiny_dataset, tmp_path):
  """Chunk sizes smaller than a record, around it and larger, on whole and damaged files."""
  path = shard(tiny_dataset, 0)
  damaged = str(tmp_path / 'damaged')
  shutil.copy(path, damaged)
  os.truncate(damaged, os.path.getsize(damaged) - 30)
  truth = [len(r.numpy()) for r in tf.data.TFRecordDataset(path)]  # Independent: TensorFlow.
  local = tfrecord_index.scan(path)
  assert local[1] is None and local[0][:, 1].tolist() == truth
  for file in (path, damaged):
    expected = tfrecord_index.scan(file)
    data = open(file, 'rb').read()
    for chunk in (12, 13, 100, 4096, 30000, 1 << 20):
      got = tfrecord_index.scan(file, lambda offset, n: data[offset:offset + n], len(data), chunk)
      np.testing.assert_array_equal(got[0], expected[0])
      assert got[1] == expected[1]
  record_files.forget_scans()
  assert [record_files.scan(damaged, remote)[1] for remote in (True, False)] == [
      tfrecord_index.scan(damaged)[1]] * 2


def test_the_writers_index_spares_the_scan_and_equals_it(tiny_dataset, tmp_path, monkeypatch,
                                                         caplog):
  data = copy_of(tiny_dataset, tmp_path)
  scans, reads = [], []
  original_scan, original_read = tfrecord_index.scan, record_files.UrlFiles.read
  monkeypatch.setattr(tfrecord_index, 'scan', lambda *a, **k: scans.append(a[0]) or
                      original_scan(*a, **k))
  monkeypatch.setattr(record_files.UrlFiles, 'read', lambda self, *a: reads.append(a) or
                      original_read(self, *a))
  for reader in ('url', 'local'):
    record_files.forget_scans()
    open_split(data, reader)._record_locations()
  assert scans == [] and reads == []  # Neither reader read a record header.
  for index in range(8):  # Independent truth: TensorFlow's own reader.
    truth = [len(r.numpy()) for r in tf.data.TFRecordDataset(shard(data, index))]
    located = record_files.scan(shard(data, index), remote=True)
    assert located[1] is None and located[0][:, 1].tolist() == truth
    np.testing.assert_array_equal(located[0], original_scan(shard(data, index))[0])
  # A file that no longer fits its index is scanned, with a warning naming it.
  scans.clear()
  os.truncate(shard(data, 2), os.path.getsize(shard(data, 2)) - 1)
  record_files.forget_scans()
  with caplog.at_level('WARNING'):
    damaged = record_files.scan(shard(data, 2), remote=True)
  assert scans == [shard(data, 2)] and damaged[1] is not None
  assert f'{shard(data, 2)}: the 8 records record_lengths.json lists do not add up' in caplog.text


def test_scans_are_kept_per_process_until_the_file_changes(tiny_dataset, tmp_path, monkeypatch):
  data = copy_of(tiny_dataset, tmp_path)
  os.remove(os.path.join(data, tfrecord_index.INDEX_FILE))  # Scanned, not read from the index.
  calls = []
  original = tfrecord_index.scan
  monkeypatch.setattr(tfrecord_index, 'scan', lambda *a, **k: calls.append(a[0]) or
                      original(*a, **k))
  for _ in range(2):
    open_split(data, 'url')._record_locations()
  assert len(calls) == 8  # The second dataset scanned nothing.
  os.truncate(shard(data, 2), os.path.getsize(shard(data, 2)) - 1)
  with pytest.raises(data_input.BadRecordError, match='truncated TFRecord file'):
    open_split(data, 'url')._record_locations()
  assert calls[8:] == [shard(data, 2)]


# --- The host cache ------------------------------------------------------------------------------


@pytest.mark.parametrize('reader', ['local', 'url'])
def test_host_cache_changes_nothing_but_where_bytes_come_from(tiny_dataset, tmp_path, reader):
  data = copy_of(tiny_dataset, tmp_path)
  kwargs = dict(seed=9, num_steps=20, features=ALL)  # 2.5 epochs of batch 8.
  plain = list(open_split(data, reader).batches(8, **kwargs))
  cached = open_split(data, reader, host_cache='on')
  assert_same_batches(plain, cached.batches(8, **kwargs))
  assert cached.host_cache_bytes > 0 and cached.host_cache_message.startswith('host cache: ')
  assert cached._cache.filled_bytes == cached.host_cache_bytes  # Every record kept.
  # Later epochs and resumes need no storage: the files may even be gone.
  for name in os.listdir(data):
    if '.tfrecord-' in name:
      os.remove(os.path.join(data, name))
  assert_same_batches(plain[13:], cached.batches(8, seed=9, start_step=13, num_steps=7,
                                                 features=ALL))
  assert_same_batches(open_split(tiny_dataset, reader).eval_batches(5, features=ALL),
                      cached.eval_batches(5, features=ALL))


def test_host_cache_with_checksums_a_selection_and_skipped_records(tiny_dataset, tmp_path):
  data = copy_of(tiny_dataset, tmp_path)
  os.truncate(shard(data, 4), int(tfrecord_index.scan_tfrecord(shard(data, 4))[6][0]))
  records = [1, 2, 3, 30, 33, 38, 39, 60]  # 38 and 39 are lost to the truncation.
  for reader in ('local', 'url'):
    kwargs = dict(records=records, max_bad_records=2, verify_checksums=True)
    plain = open_split(data, reader, **kwargs)
    cached = open_split(data, reader, host_cache='on', **kwargs)
    steps = dict(seed=4, num_steps=6, features=ALL)
    assert_same_batches(plain.batches(5, **steps), cached.batches(5, **steps))
    assert_same_batches(plain.batches(5, start_step=3, **steps),
                        cached.batches(5, start_step=3, **steps))
    assert cached.bad_records == plain.bad_records and len(plain.bad_records) == 2
    assert cached.host_cache_bytes == sum(int(length) for _, _, length, _, _ in
                                          cached._record_locations()[[0, 1, 2, 3, 4, 7]])


def test_host_cache_settings_and_messages(tiny_dataset, monkeypatch):
  gc.collect()  # Datasets of earlier tests end their reservations now, not during this test.
  monkeypatch.setattr(host_cache, '_available', 10 ** 9)
  monkeypatch.setattr(host_cache, '_reserved', 0)
  assert [host_cache.parse(v) for v in ('off', 'AUTO', 'on', 1234, '64G', '1.5T', '500MB')] == [
      'off', 'auto', 'on', 1234, 64 << 30, int(1.5 * 2 ** 40), 500 << 20]
  for bad in ('sometimes', -1, True, 1.5, '12X'):
    with pytest.raises(ValueError, match='host_cache='):
      host_cache.parse(bad)
  with pytest.raises(ValueError, match='host_cache='):
    open_split(tiny_dataset, 'local', host_cache='maybe')

  def decide(reader, setting):
    dataset = open_split(tiny_dataset, reader, host_cache=setting)
    dataset._record_locations()
    return dataset

  assert decide('local', 'off').host_cache_message == 'host cache: off'
  assert decide('local', 'auto').host_cache_bytes == 0  # The page cache keeps local files.
  size = decide('url', 'auto').host_cache_bytes
  assert size == sum(int(tfrecord_index.scan_tfrecord(shard(tiny_dataset, i))[:, 1].sum())
                     for i in range(8))  # Every record's bytes, headers and CRCs not.
  gc.collect()
  assert host_cache._reserved == 0  # The datasets above are gone, their reservations too.
  kept = decide('local', 'on')
  assert kept.host_cache_message == (f'host cache: {size / 1e6:.1f} MB of 800.0 MB available '
                                     'for 64 tiles')
  budget = decide('local', str(size + size // 2))  # The first one holds size of it.
  assert budget.host_cache_bytes == 0 and budget.host_cache_message.startswith(
      f'host cache: does not fit: 64 tiles take {size / 1e6:.1f} MB, ')
  assert 'tf.data' in open_split(tiny_dataset, 'tf', host_cache='on').host_cache_message


def test_index_records_writes_the_writers_index_for_an_older_folder(tiny_dataset, tmp_path,
                                                                      capsys):
  from data_pipeline import index_records  # pylint: disable=g-import-not-at-top
  data = copy_of(tiny_dataset, tmp_path)
  index_path = os.path.join(data, tfrecord_index.INDEX_FILE)
  with open(index_path) as f:
    written = json.load(f)
  os.remove(index_path)  # As a folder built before the writer indexed its shards.
  index_records.main(['index_records', data])
  assert 'record_lengths.json: 96 records in 24 files' in capsys.readouterr().out
  with open(index_path) as f:
    assert json.load(f) == written
  # A damaged shard: an error naming it, and no index.
  os.remove(index_path)
  os.truncate(shard(data, 5), os.path.getsize(shard(data, 5)) - 7)
  with pytest.raises(SystemExit, match=f'index_records: {shard(data, 5)}: record 7 .*truncated'
                     '.*nothing was written'):
    index_records.main(['index_records', data])
  shutil.copy(shard(tiny_dataset, 5), shard(data, 5))
  os.remove(shard(data, 6))
  with pytest.raises(SystemExit, match=f'{shard(data, 6)}: cannot be read'):
    index_records.main(['index_records', data])
  assert not os.path.exists(index_path)
