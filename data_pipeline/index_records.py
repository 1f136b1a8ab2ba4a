r"""Writes the record index of a dataset folder that lacks one (built before the writer wrote it).

  python -m data_pipeline.index_records DATA_DIR        # a local folder or a URL (gs://...)

``data_pipeline.writer`` lists the length of every record of every shard in the folder's
``tfrecord_index.INDEX_FILE``; the readers (``data_pipeline.input``) find their records there
with one small read. A folder without it is scanned at every start, which on a URL reads the
whole share of each host. This tool scans every shard the metadata lists once (its record
headers, several files at once), checks each against the metadata's record count, and writes
the index in one atomic write. A damaged shard (truncated, a corrupt header, another record
count) is an error naming it, and nothing is written. An index already there is rewritten from
the files (it is derived data).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import time

from absl import app

from data_pipeline import atomic
from data_pipeline import dataset_info
from data_pipeline import record_files
from data_pipeline import tfrecord_index


def index_folder(data_dir: str) -> dict[str, list[int]]:
  """Scans the folder's shards and writes its index; returns {file name: record lengths}."""
  info = dataset_info.read(data_dir)
  remote = '://' in data_dir
  expected = {path: length for split in info.splits.values()
              for path, length in zip(split.paths, split.shard_lengths)}

  def scan(path: str) -> list[int]:
    try:
      size, _ = record_files.stat(path, remote)
      records, damage = record_files.scan_headers(path, size, remote)
    except OSError as e:  # A missing or unreadable shard.
      raise ValueError(f'{path}: cannot be read ({e}); nothing was written') from e
    if damage is not None:
      at, pos, what = damage
      raise ValueError(f'{path}: record {at} (byte {pos}): {what}; nothing was written')
    if len(records) != expected[path]:
      raise ValueError(f'{path}: {len(records)} records, the dataset metadata says '
                       f'{expected[path]}; nothing was written')
    return records[:, 1].tolist()

  paths = list(expected)
  threads = max(1, min(len(paths), record_files.read_threads(paths, remote,
                                                             os.cpu_count() or 1)))
  with concurrent.futures.ThreadPoolExecutor(threads, 'index_records') as pool:
    lengths = dict(zip(paths, pool.map(scan, paths)))
  index = {os.path.basename(path): lengths[path] for path in paths}
  atomic.write_bytes(os.path.join(data_dir, tfrecord_index.INDEX_FILE),
                     json.dumps({tfrecord_index.RECORD_LENGTHS: index}).encode())
  return index


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError('usage: python -m data_pipeline.index_records DATA_DIR')
  data_dir = argv[1].rstrip('/')
  t0 = time.perf_counter()
  try:
    index = index_folder(data_dir)
  except (ValueError, OSError) as e:
    sys.exit(f'index_records: {e}')
  records = sum(len(v) for v in index.values())
  print(f'wrote {os.path.join(data_dir, tfrecord_index.INDEX_FILE)}: {records} records in '
        f'{len(index)} files ({time.perf_counter() - t0:.1f} s)')


if __name__ == '__main__':
  app.run(main)
