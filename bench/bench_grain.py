r"""Could grain over ArrayRecord files replace the local reader? Throughput and the properties.

  python bench/bench_grain.py                  # 64 synthetic 448 px tiles, as bench_input.py's
  python bench/bench_grain.py --tiles 256 --json /tmp/grain.json
  python bench/bench_grain.py --check          # the checks + one pass per reader, tiny tiles

A comparison, not a dependency: grain is installed for it alone. The TFRecord files are copied
record for record into ArrayRecord files (``group_size:1``, as grain asks; uncompressed, like the
TFRecords). Timed, batch 8, shuffled: ``local`` (``HostDataset(reader='local')``, today's path),
``grain_map`` (``MapDataset`` over ``ArrayRecordDataSource``, T reader threads), ``grain_read``
(the same without parsing), ``grain_loader0`` / ``grain_loaderN`` (``grain.DataLoader`` with an
``IndexSampler``, T reader threads, 0 or N = cores workers); T = the local reader's threads. The
parser is the local reader's own (``example_codec.read_record``) on each record's bytes: it
copies the image into the batch, the only copy after the read (``tf.train.Example`` and a stack
would cost one more). Warm: files page-cached; cold: both copies evicted before each pass
(``bench_input.evict``). Each pass starts a fresh iterator; its time to the first batch (when
grain's workers start) is reported apart, rates are over the other batches; tiles per CPU-second
count this process's threads. Passes alternate over the readers; medians. The checks, on tiny
tiles of their own: (a) exact resume from grain's iterator state; (b) whether global batches
stay the same read by 1, 2 or 4 processes; (c) what grain does with damaged ArrayRecord files.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import zlib

from absl import flags
import grain
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_input  # pylint: disable=g-import-not-at-top,wrong-import-position
from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
from data_pipeline import build_synthetic  # pylint: disable=g-import-not-at-top
from data_pipeline import data_shards
from data_pipeline import example_codec
from data_pipeline import input as data_input
from data_pipeline import schema

BATCH = 8


class ParseBatch:
  """Serialised tf.train.Examples -> their float16 images in one batch array: a batch_fn."""

  def __init__(self, dataset: data_input.HostDataset):
    self.codec = example_codec.codec_for(schema.IMAGE,
                                         dataset.builder.info.features[schema.IMAGE])

  def __call__(self, records) -> np.ndarray:
    codec = self.codec
    out = np.empty((len(records), *codec.shape), codec.dtype)
    raw = {codec.name: out.reshape(len(records), -1).view(np.uint8)}
    for slot, record in enumerate(records):
      example_codec.read_record(None, 0, len(record), f'record {slot} of the batch',
                                {codec.name.encode(): codec}, {}, raw, slot, record)
    return out


def build(path: str, tiles: int, tile_size: int) -> data_input.HostDataset:
  """The dataset bench_input.py builds (8 shards), opened with the local reader."""
  # Each build worker starts TensorFlow (seconds): worth it for 448 px tiles, not tiny ones.
  workers = len(os.sched_getaffinity(0)) if tiles * tile_size**2 > 1 << 24 else 1
  build_synthetic.build(path, tile_size=tile_size, train=tiles, validation=0, test=0,
                        num_shards=8, workers=workers)
  return data_input.HostDataset(path, 'train', process_index=0, process_count=1, reader='local')


def to_array_record(dataset: data_input.HostDataset, out_dir: str) -> list[str]:
  """Copies each TFRecord file of the dataset into an ArrayRecord file; returns their paths."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, os.path.basename(path) + '.array_record')
           for path, *_ in dataset.file_instructions]
  for (path, *_), out in zip(dataset.file_instructions, paths):
    # group_size 1: a record is its own chunk, so a random read decodes one record, not 65536.
    writer = array_record_module.ArrayRecordWriter(out, 'group_size:1,uncompressed')
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      writer.write(record)
    writer.close()
  return paths


def grain_map(source, parse, seed: int, epochs: int | None, threads: int):
  """The MapDataset pipeline (epochs=None: endless), as an IterDataset."""
  ds = grain.MapDataset.source(source).shuffle(seed).repeat(epochs)
  # The prefetch buffer counts batches here; its default (500) would hold GBs of 448 px tiles.
  return ds.batch(BATCH, drop_remainder=True, batch_fn=parse).to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))


def grain_loader(source, parse, seed: int, epochs: int | None, threads: int, workers: int,
                 shard=None, batch: int = BATCH):
  """The DataLoader pipeline; ``parse`` None: batches of record keys."""
  sampler = grain.samplers.IndexSampler(len(source), shard or grain.sharding.NoSharding(),
                                        shuffle=True, num_epochs=epochs, seed=seed)
  # Here the prefetch buffer counts records: 4 batches' worth, not the default 500.
  return grain.DataLoader(
      data_source=source, sampler=sampler, worker_count=workers,
      operations=[grain.transforms.Batch(batch, drop_remainder=True, batch_fn=parse)],
      read_options=grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * BATCH))


def digests(iterator, n: int) -> list[int]:
  """CRC32 of each of the next ``n`` batches: enough to tell equal batches from different."""
  return [zlib.crc32(np.ascontiguousarray(batch).view(np.uint8))
          for batch in itertools.islice(iterator, n)]


def check_resume(source, parse: ParseBatch, workers: int) -> dict[str, bool]:
  """(a) Batches after a restore from the iterator state at step s = the uninterrupted run's."""
  steps = 2 * len(source) // BATCH + 3  # Crosses two epoch boundaries.
  s = steps // 2 + 1  # Mid-epoch.
  pipelines = {'map_iterator': lambda: grain_map(source, parse, 7, None, 2),
               'loader0': lambda: grain_loader(source, parse, 7, None, 2, 0)}
  if workers:
    pipelines[f'loader{workers}'] = lambda: grain_loader(source, parse, 7, None, 2, workers)
  result, whole = {}, {}
  for name, make in pipelines.items():
    whole[name], first, resumed = digests(iter(make()), steps), iter(make()), iter(make())
    digests(first, s)
    resumed.set_state(first.get_state())
    result[f'resume_{name}'] = whole[name][s:] == digests(resumed, steps - s)
  # A MapDataset is random access: batch t is ds[t], so the step alone is a resume state.
  batches = grain.MapDataset.source(source).shuffle(7).repeat().batch(BATCH, batch_fn=parse)
  result['resume_map_index'] = whole['map_iterator'][s:] == digests(
      (batches[t] for t in range(s, steps)), steps - s)
  return result


def check_order(data_dir: str, n: int, seed: int = 7) -> dict[str, bool]:
  """(b) Are the global batches the same read by 1, 2 or 4 processes? As rows, and as sets.

  Order depends on indices only, so grain reads ``RangeDataSource`` / ``MapDataset.range``
  here (rows are record keys); the project's ``ShardedStream`` reads the tiles' ids.
  """
  steps = 2 * n // BATCH + 1
  ids = {}

  def project(p, processes, b):
    stream = data_shards.ShardedStream(data_dir, 'train', data_shards=4, process_index=p,
                                       process_count=processes, reader='local')
    return ([ids.setdefault(t, len(ids)) for t in batch[schema.TILE_ID]]
            for batch in stream.batches(b, seed=seed, start_step=0, num_steps=steps,
                                        shuffle_buffer=256, features=(schema.TILE_ID,)))

  def shard(p, processes):
    return grain.sharding.ShardOptions(p, processes, drop_remainder=True)

  local_batches = {  # (process, process count, local batch) -> that process's batches.
      'index_sampler': lambda p, processes, b: iter(grain_loader(
          grain.sources.RangeDataSource(0, n, 1), None, seed, None, 1, 0, shard(p, processes),
          b)),
      # (No reader threads: their default buffer of 500 records costs seconds here.)
      'elastic_iterator': lambda p, processes, b: iter(grain.experimental.ElasticIterator(
          grain.MapDataset.range(n).shuffle(seed).repeat(), BATCH, shard(p, processes),
          read_options=grain.ReadOptions(num_threads=0))),
      # Process p takes rows [t B + p B/P, t B + (p + 1) B/P) of the global stream at step t.
      'map_slices': lambda p, processes, b: map(
          grain.MapDataset.range(n).shuffle(seed).repeat().batch(b)[p::processes].__getitem__,
          itertools.count()),
      'project_sharded_stream': project}
  result = {}
  for name, local in local_batches.items():
    orders = []  # Per process count: global batch t = process 0's local batch t, then 1's, ...
    for processes in (1, 2, 4):
      streams = [itertools.islice(local(p, processes, BATCH // processes), steps)
                 for p in range(processes)]
      orders.append([[int(i) for part in parts for i in np.ravel(part)]
                     for parts in zip(*streams)])
    result[f'host_count_free_rows_{name}'] = all(o == orders[0] for o in orders)
    result[f'host_count_free_sets_{name}'] = all(
        [sorted(b) for b in o] == [sorted(b) for b in orders[0]] for o in orders)
  return result


def check_bad_records(path: str, out_dir: str, parse: ParseBatch) -> dict:
  """(c) What grain reports for a damaged ArrayRecord file, and whether the rest still reads."""
  with open(path, 'rb') as f:
    data = f.read()
  record = grain.sources.ArrayRecordDataSource([path])[1]
  damages = {'payload_of_record_1': data.find(record[len(record) // 2:][:64]),
             'chunk_header_of_record_0': 72,  # Past riegeli's 64-byte file signature chunk.
             'truncated': None}
  result = {}
  for kind, at in damages.items():
    damaged = os.path.join(out_dir, f'{kind}.array_record')
    with open(damaged, 'wb') as f:
      f.write(data[:len(data) * 3 // 4] if at is None else
              data[:at] + bytes(b ^ 0xFF for b in data[at:at + 16]) + data[at + 16:])
    errors, good = [], []  # (record, message) of each bad record; the good records.
    try:
      source = grain.sources.ArrayRecordDataSource([damaged])
      for i in range(len(source)):
        try:
          parse([source[i]])
          good.append(i)
        except Exception as e:  # pylint: disable=broad-except
          errors.append((i, f'{type(e).__name__}: {e}'))
    except Exception as e:  # pylint: disable=broad-except
      errors.append((-1, f'opening the file: {type(e).__name__}: {e}'))
    first, message = errors[0] if errors else (None, '')
    result[kind] = {
        'detected': bool(errors), 'bad_records': len(errors), 'good_records': len(good),
        'message': message[:300], 'names_file': os.path.basename(damaged) in message,
        'names_record': f'record {first}' in message,
        'reads_on_after_error': bool(errors) and any(i > first for i in good)}
  # Does a pipeline go on past a bad record? grain has no option like max_bad_records.
  damaged = [os.path.join(out_dir, 'payload_of_record_1.array_record')]
  try:
    list(grain.MapDataset.source(grain.sources.ArrayRecordDataSource(damaged))
         .batch(1, batch_fn=parse).to_iter_dataset())
    result['pipeline_stops_at_bad_record'] = False
  except Exception:  # pylint: disable=broad-except
    result['pipeline_stops_at_bad_record'] = True
  return result


def timed_pass(make, batches: int) -> tuple[float, float, float]:
  """(seconds to the first batch, tiles/s, tiles/CPU-s of this process's threads) of a fresh
  iterator; rates are over the batches after the first."""
  t0 = time.perf_counter()
  iterator = iter(make())
  next(iterator)
  t1, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches - 1):
    next(iterator)
  seconds, cpu = time.perf_counter() - t1, time.process_time() - cpu
  for _ in iterator:  # Nothing is left: this ends the iterator (and grain's workers) cleanly.
    raise AssertionError('more batches than expected')
  return t1 - t0, (batches - 1) * BATCH / seconds, (batches - 1) * BATCH / cpu


def measure(dataset, source, parse, paths: list[str], cores: int, args) -> dict:
  """Figures per mode and reader, printed as they come."""
  repeats, warm_epochs = (1, 1) if args.check else (args.repeats, args.warm_epochs)
  threads = data_input._READ_THREADS  # pylint: disable=protected-access
  makers = {
      'local': lambda seed, epochs: dataset.batches(
          BATCH, seed=seed, num_steps=epochs * dataset.num_examples // BATCH),
      'grain_map': lambda seed, epochs: grain_map(source, parse, seed, epochs, threads),
      # grain_map reading the records without parsing them: the most that parsing could leave.
      'grain_read': lambda seed, epochs: grain_map(source, len, seed, epochs, threads)}
  for workers in (0, cores):
    makers[f'grain_loader{workers}'] = lambda seed, epochs, workers=workers: grain_loader(
        source, parse, seed, epochs, threads, workers)
  # Warm-up: page cache, thread pools, imports (worker processes restart every pass anyway).
  for name in [] if args.check else ['local', 'grain_map', 'grain_read', 'grain_loader0']:
    timed_pass(functools.partial(makers[name], 0, 1), dataset.num_examples // BATCH)
  figures = {}
  for mode in ('warm',) if args.check or args.no_cold else ('warm', 'cold'):
    epochs = warm_epochs if mode == 'warm' else 1  # Cold: a second epoch would find it cached.
    runs = {name: [] for name in makers}
    for repeat in range(repeats):
      for name, make in makers.items():
        if mode == 'cold':
          evicted = bench_input.evict(paths)
        runs[name].append(timed_pass(functools.partial(make, repeat + 1, epochs),
                                     epochs * dataset.num_examples // BATCH))
    if mode == 'cold':
      print(f'cold: {evicted}')
    local = statistics.median(r for _, r, _ in runs['local'])
    for name, passes in runs.items():
      first, rate, per_cpu = (statistics.median(values) for values in zip(*passes))
      entry = figures.setdefault(mode, {})[name] = {
          'tiles_s': rate, 'tiles_s_core': rate / cores, 'of_local': rate / local,
          'tiles_per_cpu_s': None if name == f'grain_loader{cores}' else per_cpu,
          'first_batch_s': first}
      cpu_text = f'{per_cpu:7.1f}' if entry['tiles_per_cpu_s'] else '    n/a'
      print(f'{mode} {name:<15} {rate:8.1f} tiles/s = {rate / cores:7.1f} tiles/s/core ({cores} '
            f'cores) | {entry["of_local"]:5.2f} of local | {cpu_text} tiles/CPU-s | first batch '
            f'{first:.2f} s')
  return figures


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiles', type=int, default=0, help='train tiles (64; --check: 32)')
  parser.add_argument('--tile_size', type=int, default=0, help='pixels (448; --check: 32)')
  parser.add_argument('--repeats', type=int, default=3, help='timed passes per reader and mode')
  parser.add_argument('--warm_epochs', type=int, default=4, help='epochs per warm pass')
  parser.add_argument('--no_cold', action='store_true', help='skip the cold-cache passes')
  parser.add_argument('--check', action='store_true',
                      help='the checks, then one warm pass per reader on their tiny tiles')
  parser.add_argument('--json', default='', help='write the figures and checks here')
  args = parser.parse_args(argv)
  if not flags.FLAGS.is_parsed():  # grain reads absl flags; their defaults suit us.
    flags.FLAGS.mark_as_parsed()
  cores = len(os.sched_getaffinity(0))
  print('command: python bench/bench_grain.py ' + ' '.join(sys.argv[1:] if argv is None else argv))
  data_input.configure_tensorflow()
  with tempfile.TemporaryDirectory(dir=os.environ.get('BENCH_TMPDIR')) as tmp:
    size = (args.tiles or 32, args.tile_size or 32) if args.check else (32, 32)
    dataset = small = build(os.path.join(tmp, 'check'), *size)
    ar_paths = to_array_record(small, os.path.join(tmp, 'check_array_record'))
    source, parse = grain.sources.ArrayRecordDataSource(ar_paths), ParseBatch(small)
    checks = check_resume(source, parse, workers=0 if args.check else cores)
    checks.update(check_order(small.data_dir, small.num_examples))
    checks['bad_records'] = check_bad_records(ar_paths[0], tmp, parse)
    if not args.check:
      t0 = time.perf_counter()
      dataset = build(os.path.join(tmp, 'tiles'), args.tiles or 64, args.tile_size or 448)
      ar_paths = to_array_record(dataset, os.path.join(tmp, 'array_record'))
      source, parse = grain.sources.ArrayRecordDataSource(ar_paths), ParseBatch(dataset)
      print(f'{dataset.num_examples} tiles of {dataset.tile_size} px built and copied to '
            f'ArrayRecord files in {time.perf_counter() - t0:.1f} s')
    # The copies and the parser are right: grain's first records are the local reader's.
    checks['same_tiles_as_local'] = bool(np.array_equal(
        parse([source[i] for i in range(BATCH)]),
        next(dataset.eval_batches(BATCH))[schema.IMAGE], equal_nan=True))
    # Both copies: a cold pass of either reader must not find the other's bytes cached.
    paths = sorted({p for p, *_ in dataset.file_instructions}) + ar_paths
    figures = measure(dataset, source, parse, paths, cores, args)
  for name, value in checks.items():
    print(f'check {name}: {value}')
  result = {'tiles': dataset.num_examples, 'tile_size': dataset.tile_size, 'batch': BATCH,
            'cores': cores, 'grain': grain.__version__, 'figures': figures, 'checks': checks}
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
