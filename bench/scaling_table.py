r"""The derived figures of docs/scaling.md: what each host must read, and what a run costs.

  python bench/scaling_table.py [--mfu 0.4] [--tiles 450000]

Nothing here is measured: step rates come from the models' FLOPs (``mae_jax.flops``, counted at
448 px, patch 16, mask 0.75) and a stated MFU against the spec-sheet bf16 peaks
(``mae_jax.flops.PEAK_FLOPS``); bytes per tile are the record sizes ``bench/bench_storage.py``
measured (float16 and uint8 records of 448 px x 12 tiles with their WorldCover label). The
measured figures that docs/scaling.md sets beside them name their own commands.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mae_jax import flops  # pylint: disable=g-import-not-at-top

# Measured record sizes (bench/bench_storage.py): image + WorldCover label + metadata.
RECORD_BYTES = {'float16': 5_017_870, 'uint8': 2_609_422}
# GFLOP per training example at 448 px (bench/README.md, "Model FLOPs per preset").
TRAIN_GFLOP = {'poster': 142.0, 'mae_b': 272.0, 'mae_l': 540.0}
# Systems: (accelerator, accelerators in all, accelerators per host).
SYSTEMS = {
    '8 x H100 (one node)': ('NVIDIA H100', 8, 8),
    'TPU v4-32': ('TPU v4', 16, 4),
    'TPU v5p-128': ('TPU v5p', 64, 4),
    '64 x H100 (SLURM, 8 nodes)': ('NVIDIA H100', 64, 8),
}
# Runs: (preset, epochs).
RUNS = {"the poster's run (poster, 75 epochs)": ('poster', 75),
        "He et al.'s 800 epochs, mae_b": ('mae_b', 800),
        "He et al.'s 800 epochs, mae_l": ('mae_l', 800)}


def rate(device: str, preset: str, mfu: float) -> float:
  """Training examples per second of one accelerator at ``mfu``."""
  return mfu * flops.PEAK_FLOPS[device] / (TRAIN_GFLOP[preset] * 1e9)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mfu', type=float, default=0.4)
  parser.add_argument('--tiles', type=int, default=450_000)
  args = parser.parse_args(argv)
  print(f'Per host, at {args.mfu:.0%} MFU (derived):\n')
  print('| system | preset | tiles/s per accelerator | tiles/s per host | GB/s per host, '
        'float16 | GB/s per host, uint8 | share of the dataset per host, float16 / uint8 (GB) |')
  print('| --- | --- | ---: | ---: | ---: | ---: | ---: |')
  for system, (device, count, per_host) in SYSTEMS.items():
    hosts = count // per_host
    for preset in TRAIN_GFLOP:
      one = rate(device, preset, args.mfu)
      host = one * per_host
      share = [args.tiles * RECORD_BYTES[form] / hosts / 1e9 for form in ('float16', 'uint8')]
      print(f'| {system} | {preset} | {one:,.0f} | {host:,.0f} | '
            f'{host * RECORD_BYTES["float16"] / 1e9:.1f} | {host * RECORD_BYTES["uint8"] / 1e9:.1f} '
            f'| {share[0]:,.0f} / {share[1]:,.0f} |')
  print(f'\nWall time and accelerator-hours of whole runs ({args.tiles:,} tiles; derived):\n')
  print('| run | system | wall time (h) | accelerator-hours |')
  print('| --- | --- | ---: | ---: |')
  for run, (preset, epochs) in RUNS.items():
    examples = args.tiles * epochs
    for system, (device, count, _) in SYSTEMS.items():
      seconds = examples / (rate(device, preset, args.mfu) * count)
      print(f'| {run} | {system} | {seconds / 3600:.2f} | {seconds * count / 3600:,.0f} |')


if __name__ == '__main__':
  main()
