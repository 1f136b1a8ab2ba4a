r"""Training read path throughput: TFRecord shards -> host batches, against reading the bytes.

  python bench/bench_input.py                      # builds 256 synthetic 448 px tiles in a temp dir
  python bench/bench_input.py --data_dir DIR       # an existing dataset (e.g. real tiles)
  python bench/bench_input.py --readers local,url --no_cold
  python bench/bench_input.py --readers local --no_cold --verify_checksums

Times ``data_pipeline.input.HostDataset.batches`` (the call ``mae_jax.trainers.pretrain`` makes: shuffled
float16 ``image`` batches) over the ``train`` split, per reader, and compares it with simply
reading the same shard files (``readinto`` a reused 8 MiB buffer, from 1 thread and
from one thread per core; the faster is the baseline, so the ratio is the strictest one).
Readers (``--readers``, default ``local,url,tf,local+cache,url+cache``): ``local`` (os reads),
``url`` (the same algorithm through ``tf.io.gfile``, the path ``gs://`` data takes, here on the
same local files), ``tf`` (tf.data, the old URL reader) and ``+cache`` (``host_cache='on'``:
the records kept in memory by the warm-up pass, so timed epochs are those after a first one; a
"cold" pass of it reads no storage at all). The URL/local ratio of the medians, printed last,
holds up under background load, which hits both alike. Cache states:

* warm: files in the page cache (after a warm-up pass); a pass reads ``--warm_epochs`` epochs
  from one ``batches`` call, as training does, so starting the iterator weighs little;
* cold: each timed pass (one epoch) starts with the files evicted from the page cache, with
  ``posix_fadvise(DONTNEED)`` after ``fsync`` (no root needed; ``fincore``, when installed,
  checks that nothing stayed resident).

Raw and read-path passes alternate and medians are reported, so background load on a shared
machine hits both sides of a ratio alike. Per-core figures divide by the cores this process may
run on (``os.sched_getaffinity``); tiles per CPU-second (user + system time of all threads,
``time.process_time``) say how much CPU the path burns. The local and URL readers' one-off search
for the records (kept for the run) is timed separately, per byte source, and not included in
the passes: one read of the folder's ``record_lengths.json`` where the builder wrote one, else a
scan of the headers (local: a 12-byte read per header; URL: 16 MiB sequential chunks).
``--verify_checksums`` adds the local reader with ``verify_checksums=True`` as reader
``local+crc``, timed in the same alternation as the others. It checks each record's payload CRC
the first time a dataset reads it, so each of its passes opens a fresh dataset (outside the
timing, header scan included): with ``--warm_epochs 1`` every timed epoch checks every record,
with more the later epochs of a pass read on the fast path.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline import build_synthetic  # pylint: disable=g-import-not-at-top
from data_pipeline import input as data_input
from data_pipeline import record_files
from data_pipeline import schema

_CHUNK = 8 << 20


def evict(paths: list[str]) -> str:
  """Drops the files' pages from the page cache; returns how many bytes stayed resident."""
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)  # Dirty pages cannot be dropped: write them back first.
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)
  if not shutil.which('fincore'):
    return 'unchecked (no fincore)'
  out = subprocess.run(['fincore', '--bytes', '--noheadings', '--output', 'RES'] + paths,
                       capture_output=True, text=True, check=True).stdout
  return f'{sum(int(v) for v in out.split())} bytes resident after eviction (fincore)'


def read_files(paths: list[str]) -> int:
  """Reads files start to end into one reused buffer; returns the bytes read."""
  buffer = memoryview(bytearray(_CHUNK))
  total = 0
  for path in paths:
    with open(path, 'rb', buffering=0) as f:
      while n := f.readinto(buffer):
        total += n
  return total


def raw_pass(paths: list[str], threads: int) -> float:
  """Seconds to read every file once, split over ``threads`` threads."""
  t0 = time.perf_counter()
  if threads == 1:
    read_files(paths)
  else:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      list(pool.map(read_files, [paths[i::threads] for i in range(threads)]))
  return time.perf_counter() - t0


def read_path_pass(dataset, batch: int, steps: int, seed: int) -> tuple[float, float]:
  """(seconds, CPU seconds) of ``steps`` batches of the training call, iterator included."""
  cpu0, t0 = time.process_time(), time.perf_counter()
  for _ in dataset.batches(batch, seed=seed, num_steps=steps):
    pass
  return time.perf_counter() - t0, time.process_time() - cpu0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default='', help='an existing dataset (else one is built)')
  parser.add_argument('--tile_size', type=int, default=448)
  parser.add_argument('--tiles', type=int, default=256, help='train tiles to build')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5, help='timed passes per measurement')
  parser.add_argument('--warm_epochs', type=int, default=2, help='epochs per warm read-path pass')
  parser.add_argument('--readers', default='local,url,tf,local+cache,url+cache',
                      help="comma-separated HostDataset readers; '+cache': host_cache='on'")
  parser.add_argument('--no_cold', action='store_true', help='skip the cold-cache measurements')
  parser.add_argument('--verify_checksums', action='store_true',
                      help='also time the local reader with verify_checksums=True (local+crc)')
  args = parser.parse_args()
  command = 'python ' + ' '.join(shlex.quote(a) for a in sys.argv)
  print(f'command: {command}')
  data_input.configure_tensorflow()
  cores = len(os.sched_getaffinity(0))

  with tempfile.TemporaryDirectory(dir=os.environ.get('BENCH_TMPDIR')) as tmp:
    data_dir = args.data_dir
    if not data_dir:
      data_dir = os.path.join(tmp, 'tiles')
      t0 = time.perf_counter()
      build_synthetic.build(data_dir, tile_size=args.tile_size, train=args.tiles, validation=0,
                            test=0, num_shards=8, workers=cores)
      print(f'built {args.tiles} synthetic {args.tile_size} px tiles in '
            f'{time.perf_counter() - t0:.1f} s ({data_dir})')
    def open_reader(name):
      reader, _, option = name.partition('+')
      if option not in ('', 'cache'):
        raise ValueError(f'--readers: unknown option {option!r} in {name!r} (only +cache)')
      return data_input.HostDataset(data_dir, 'train', process_index=0, process_count=1,
                                    reader=reader, host_cache='on' if option else 'off')

    datasets = {name: open_reader(name) for name in args.readers.split(',')}
    fresh = {}  # Readers that get a new dataset for every pass.
    if args.verify_checksums:
      def verifying():
        dataset = data_input.HostDataset(data_dir, 'train', process_index=0, process_count=1,
                                         reader='local', verify_checksums=True)
        dataset._record_locations()  # pylint: disable=protected-access
        return dataset
      fresh['local+crc'] = verifying
      datasets['local+crc'] = verifying()
    some = next(iter(datasets.values()))
    paths = sorted({path for path, *_ in some.file_instructions})
    file_bytes = sum(os.path.getsize(p) for p in paths)
    tiles = some.num_examples
    steps = tiles // args.batch
    read_tiles = steps * args.batch
    shape = (args.batch, some.tile_size, some.tile_size, some.num_channels)
    print(f'{tiles} tiles in {len(paths)} files, {file_bytes / 2**20:.0f} MiB '
          f'({file_bytes / tiles / 2**20:.2f} MiB per record); batches {shape} float16 '
          f'(features={schema.IMAGE!r}); {cores} cores; reader threads: local '
          f'{data_input._READ_THREADS}, url on these paths '  # pylint: disable=protected-access
          f'{record_files.read_threads(paths, True, data_input._READ_THREADS)}, '  # pylint: disable=protected-access
          f'url on URLs {record_files.URL_READ_THREADS}')
    for name, dataset in datasets.items():
      if dataset.reader == 'tf':
        continue
      record_files.forget_scans()  # Scans are kept per process: time each source's own.
      print(f'cold: {evict(paths)}')
      t0 = time.perf_counter()
      dataset._record_locations()  # pylint: disable=protected-access
      print(f'{name} reader finds the records (once per run; the folder\'s index, else a header '
            f'scan): {time.perf_counter() - t0:.3f} s cold '
            f'for {tiles} records; {dataset.host_cache_message}')

    def summary(label, rate, cpu_rate, raw):
      cpu_text = f' | {cpu_rate:7.1f} tiles/CPU-s' if cpu_rate else ''
      print(f'{label:<26} {rate:8.1f} tiles/s = {rate / cores:7.1f} tiles/s/core ({cores} cores)'
            f'{cpu_text} | {rate * file_bytes / tiles / 2**20:6.0f} MiB/s | '
            f'raw {raw:7.1f} tiles/s | ratio {rate / raw:.2f}')

    # Warm-up: page cache, thread pools, tf.data graphs, host caches.
    raw_pass(paths, 1)
    for dataset in datasets.values():
      read_path_pass(dataset, args.batch, steps, seed=0)

    for mode in ('warm',) + (() if args.no_cold else ('cold',)):
      prepare = (lambda: evict(paths)) if mode == 'cold' else (lambda: None)
      # Cold passes read one epoch (the next would find the files cached); warm passes read
      # --warm_epochs, as training would, so that starting an iterator weighs as little.
      epochs = 1 if mode == 'cold' else args.warm_epochs
      raw = {1: [], cores: []}
      timed = {reader: ([], []) for reader in datasets}
      for repeat in range(args.repeats):
        for threads in raw:
          prepare()
          raw[threads].append(raw_pass(paths, threads))
        for reader, dataset in datasets.items():
          if reader in fresh:
            dataset = fresh[reader]()
          prepare()
          seconds, cpu = read_path_pass(dataset, args.batch, steps * epochs, seed=repeat + 1)
          timed[reader][0].append(seconds)
          timed[reader][1].append(cpu)
      raw_rates = {threads: tiles / statistics.median(v) for threads, v in raw.items()}
      best = max(raw_rates.values())
      for threads, rate in raw_rates.items():
        summary(f'{mode} raw bytes, {threads} thr', rate, 0, best)
      rates = {}
      for reader, (seconds, cpu) in timed.items():
        rates[reader] = read_tiles * epochs / statistics.median(seconds)
        summary(f'{mode} read path ({reader})', rates[reader],
                read_tiles * epochs / statistics.median(cpu), best)
      for a, b in (('url', 'local'), ('tf', 'local'), ('url+cache', 'url')):
        if a in rates and b in rates:
          print(f'{mode} ratio {a} / {b}: {rates[a] / rates[b]:.2f}')
    print(f'(medians of {args.repeats} passes; a read-path pass is {args.warm_epochs} epochs warm, '
          f'1 cold, of {read_tiles} tiles; ratio = read path tiles/s over the faster raw read of '
          'the same files in the same cache state)')


if __name__ == '__main__':
  main()
