r"""Training read path throughput: TFRecord shards -> host batches, in tiles/s and tiles/s/core.

  python bench/bench_input.py                       # builds 64 synthetic 448 px tiles in a temp dir
  python bench/bench_input.py --data_dir DIR        # an existing dataset (e.g. real tiles)

Times ``data_pipeline.input.HostDataset.batches`` (read, shuffle raw records, decode float16
bytes, batch) after one warm-up epoch, so files are in the page cache for both measurements,
and compares it with simply reading the same shard bytes from disk (the upper bound of any
reader of these files). Per-core figures divide by the cores TensorFlow may use.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline import build_synthetic  # pylint: disable=g-import-not-at-top
from data_pipeline import input as data_input


def raw_read_rate(data_dir: str, split: str, tiles: int, repeats: int) -> float:
  """Tiles/s when only reading the split's shard files (Python, 8 MiB chunks)."""
  paths = sorted(glob.glob(os.path.join(data_dir, f'*-{split}.tfrecord-*')))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    for path in paths:
      with open(path, 'rb') as f:
        while f.read(8 << 20):
          pass
    best = min(best, time.perf_counter() - t0)
  return tiles / best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--tile_size', type=int, default=448)
  parser.add_argument('--tiles', type=int, default=64, help='tiles to build without --data_dir')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--epochs', type=int, default=3)
  args = parser.parse_args()
  data_input.configure_tensorflow()

  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir
    if not data_dir:
      data_dir = os.path.join(tmp, 'tiles')
      t0 = time.perf_counter()
      build_synthetic.build(data_dir, tile_size=args.tile_size, train=args.tiles, validation=8,
                            test=8, num_shards=8)
      print(f'built {args.tiles + 16} synthetic tiles of {args.tile_size} px in '
            f'{time.perf_counter() - t0:.1f} s')
    dataset = data_input.HostDataset(data_dir, 'train')
    steps_per_epoch = dataset.num_examples // args.batch
    shape = None
    for _ in dataset.batches(args.batch, seed=0, num_steps=steps_per_epoch):
      pass  # Warm-up: page cache, tf.data autotuning.
    t0 = time.perf_counter()
    for batch in dataset.batches(args.batch, seed=0, start_step=steps_per_epoch,
                                 num_steps=steps_per_epoch * args.epochs):
      shape = batch['image'].shape
    elapsed = time.perf_counter() - t0
    tiles = steps_per_epoch * args.epochs * args.batch
    rate = tiles / elapsed
    cores = len(os.sched_getaffinity(0))
    raw = raw_read_rate(data_dir, 'train', dataset.num_examples, args.epochs)
    mb = batch['image'].nbytes / args.batch / 2**20
    print(f'batches of {shape} float16 ({mb:.1f} MiB per tile), {cores} cores')
    print(f'read path: {rate:8.1f} tiles/s = {rate / cores:7.1f} tiles/s/core '
          f'({rate * mb:.0f} MiB/s)')
    print(f'raw bytes: {raw:8.1f} tiles/s = {raw / cores:7.1f} tiles/s/core; '
          f'read path / raw = {rate / raw:.2f}')


if __name__ == '__main__':
  main()
