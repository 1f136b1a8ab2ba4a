r"""What missing seasons cost: fine-tuning with 4, 2 and 1 seasons present on the embedded data.

  python bench/bench_seasons.py [--data_dir data/synthetic_tiny] [--pretrained workdirs/demo] \
      [--workdir /tmp/bench_seasons] [--seeds 0,1] [--fraction 1.0] [--json out.json]

Real archives often hold one or two seasons of a year (a single-date download, BigEarthNet's one
date per patch); the seasons without acquisitions are NaN (no data) in the stack
(``data_pipeline.ingest.prepare``) and in datasets (``data_pipeline.writer``), and the model masks
them. This measures the cost on the embedded synthetic dataset (``make demo`` builds it; built
here with the Makefile's settings when missing):

* settings: all 4 seasons (the embedded dataset itself), 2 seasons (winter + summer) and 1
  season (summer). A variant is the embedded dataset's own tiles (``build_synthetic``'s units
  and examples, same seed and tile size) with the absent seasons' three channels (VV-VH, VV,
  VH) set to NaN in every split, written by the dataset writer, so its statistics go through
  the writer's rule for empty channels (borrowed from the product's present seasons). That the
  variant holds the same tiles is checked: its present channels' training statistics must equal
  the embedded dataset's;
* runs: the quick study's fine-tuning (``configs/study.py:quick``: the ``tiny`` preset, 60 steps
  of batch 32, validation every 20 steps, the step with the lowest validation loss kept), at one
  learning rate (``--lr``; the quick study sweeps 3e-4 and 1e-3 per setting instead), from
  scratch and from the demo's pretrained ``tiny`` checkpoint (``--pretrained``; pretrained on all
  4 seasons; skipped when absent), for each seed;
* reported: WorldCover mIoU and VCF RMSE (percentage points) on the whole test split, mean ±
  sample std over seeds, per setting; a finished run's ``final_metrics.json`` is reused, so an
  interrupted benchmark resumes. Wall time at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from data_pipeline import build_synthetic  # pylint: disable=g-import-not-at-top
from data_pipeline import dataset_info  # pylint: disable=g-import-not-at-top
from data_pipeline import schema  # pylint: disable=g-import-not-at-top
from data_pipeline import writer  # pylint: disable=g-import-not-at-top

# Seasons present in each setting (the others are NaN), in the table's order.
SETTINGS = {
    '4 seasons': schema.SEASONS,
    '2 seasons (winter + summer)': ('winter', 'summer'),
    '1 season (summer)': ('summer',),
}
# The embedded dataset as the Makefile's demo builds it.
EMBEDDED = dict(tile_size=128, train=768, validation=128, test=128, num_shards=8, seed=0)
TASKS = {'worldcover': ('miou', 'mIoU', 3), 'vcf': ('rmse', 'RMSE (pp)', 1)}
# configs/study.py:quick's fine-tuning overrides.
QUICK_STEPS = 60
QUICK_EVAL_EVERY = 20


def masked_examples(index: int, seed: int, tile_size: int, present: tuple[str, ...]) -> list:
  """The embedded dataset's example of tile ``index`` with the seasons not in ``present`` NaN."""
  examples = build_synthetic.synthetic_examples(index, seed=seed, tile_size=tile_size)
  for example in examples:
    image = np.array(example[schema.IMAGE], np.float32)
    for season in schema.SEASONS:
      if season not in present:
        image[..., [schema.band_index(p, season) for p in schema.PRODUCTS]] = np.nan
    example[schema.IMAGE] = image
  return examples


def slug(present: tuple[str, ...]) -> str:
  return 'seasons_' + '_'.join(present)


def ensure_embedded(data_dir: str) -> None:
  """Builds the embedded dataset as the Makefile does when it is missing; checks its shape."""
  if not os.path.exists(os.path.join(data_dir, writer.INFO_FILE)):
    print(f'== Building the embedded dataset in {data_dir} (as make demo does)', flush=True)
    build_synthetic.build(data_dir, EMBEDDED['tile_size'], EMBEDDED['train'],
                          EMBEDDED['validation'], EMBEDDED['test'], EMBEDDED['num_shards'],
                          seed=EMBEDDED['seed'])
  info = dataset_info.read(data_dir)
  sizes = {split: info.splits[split].num_examples for split in schema.SPLITS}
  expected = {split: EMBEDDED[split] for split in schema.SPLITS}
  if sizes != expected or writer.read_contract(data_dir).tile_size != EMBEDDED['tile_size']:
    raise SystemExit(f'{data_dir} is not the embedded dataset of the Makefile ({sizes} tiles, '
                     f'expected {expected} of {EMBEDDED["tile_size"]} px); pass its --data_dir')


def write_variant(data_dir: str, folder: str, present: tuple[str, ...]) -> dict:
  """The variant of ``present`` seasons (built unless complete); returns its borrowed stats."""
  if not os.path.exists(os.path.join(folder, writer.INFO_FILE)):
    t0 = time.perf_counter()
    units = build_synthetic.split_units(EMBEDDED['train'], EMBEDDED['validation'],
                                        EMBEDDED['test'])
    contract = schema.InputContract(tile_size=EMBEDDED['tile_size'],
                                    composite=schema.COMPOSITE_METHOD_SYNTHETIC)
    writer.build_dataset(
        folder, units, functools.partial(masked_examples, seed=EMBEDDED['seed'],
                                         tile_size=EMBEDDED['tile_size'], present=present),
        contract, num_shards=EMBEDDED['num_shards'],
        description=f'The embedded dataset with only {", ".join(present)} present '
                    '(bench/bench_seasons.py)')
    print(f'   wrote {folder} in {time.perf_counter() - t0:.0f} s', flush=True)
  variant, embedded = writer.read_contract(folder), writer.read_contract(data_dir)
  channels = [schema.band_index(p, s) for p in schema.PRODUCTS for s in present]
  # Same tiles: the present channels hold the same values, so the same statistics.
  np.testing.assert_allclose(np.asarray(variant.mean)[channels],
                             np.asarray(embedded.mean)[channels], rtol=1e-9)
  np.testing.assert_allclose(np.asarray(variant.std)[channels],
                             np.asarray(embedded.std)[channels], rtol=1e-9)
  return dataset_info.read(folder).metadata.get('statistics_borrowed', {})


def run_once(args, data_dir: str, path: str, task: str, init: str, seed: int, cache) -> dict:
  """One fine-tuning run of the quick study's length (or its saved result)."""
  done = os.path.join(path, 'final_metrics.json')
  if not os.path.exists(done):
    from configs import downstream  # pylint: disable=g-import-not-at-top
    from mae_jax.trainers import finetune  # pylint: disable=g-import-not-at-top
    config = downstream.build(task, 'finetune', 'tiny')
    config.total_steps = args.steps
    config.eval_every_steps = QUICK_EVAL_EVERY
    config.log_every_steps = args.steps
    config.dataset.data_dir = data_dir
    config.seed = seed
    config.label_fraction = args.fraction
    config.optim.base_lr = args.lr
    config.init_checkpoint = args.pretrained if init == 'pretrained' else ''
    config.checkpoint.every_steps = 10**9  # One checkpoint, at the end.
    t0 = time.perf_counter()
    result = finetune.finetune(config, path, cache)
    if result.get('stopped'):
      raise SystemExit('a run was stopped; run the benchmark again to resume')
    print(f'   {task} {init} seed {seed}: {time.perf_counter() - t0:.0f} s', flush=True)
  with open(done) as f:
    return json.load(f)


def summary(values: list[float], digits: int) -> str:
  mean = float(np.mean(values))
  text = f'{mean:.{digits}f}'
  if len(values) > 1:
    text += f' ± {float(np.std(values, ddof=1)):.{digits}f}'
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default='data/synthetic_tiny')
  parser.add_argument('--pretrained', default='workdirs/demo',
                      help="make demo's pretraining workdir; '' = scratch only")
  parser.add_argument('--workdir', default='/tmp/bench_seasons', help='variants and runs')
  parser.add_argument('--seeds', default='0,1')
  parser.add_argument('--fraction', type=float, default=1.0, help='label fraction')
  parser.add_argument('--steps', type=int, default=QUICK_STEPS)
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--tasks', default='worldcover,vcf')
  parser.add_argument('--json', default='', help='also write every run and the table here')
  args = parser.parse_args()
  t0 = time.perf_counter()
  seeds = [int(s) for s in args.seeds.split(',')]
  tasks = args.tasks.split(',')
  inits = ['scratch']
  if args.pretrained:
    if os.path.isdir(args.pretrained):
      args.pretrained = os.path.abspath(args.pretrained)
      inits.append('pretrained')
    else:
      print(f'== No pretrained checkpoint at {args.pretrained} (make demo makes it): scratch only',
            flush=True)
  data_dir = os.path.abspath(args.data_dir)
  ensure_embedded(data_dir)
  folders, borrowed = {}, {}
  for name, present in SETTINGS.items():
    if present == schema.SEASONS:
      folders[name] = data_dir
      continue
    print(f'== Variant {name}', flush=True)
    folders[name] = os.path.join(os.path.abspath(args.workdir), 'data', slug(present))
    borrowed[name] = write_variant(data_dir, folders[name], present)
    print(f'   statistics borrowed: {len(borrowed[name])} channels, e.g. '
          f'{next(iter(borrowed[name].items()))}', flush=True)

  from mae_jax.trainers import finetune  # pylint: disable=g-import-not-at-top
  # Every setting x task x init has its own compiled functions (scratch runs normalise with
  # their dataset's statistics); the seeds share them.
  cache = finetune.CompileCache(size=64)
  runs = []
  # Seeds outermost: an interrupted benchmark already has whole tables of the first seeds.
  for seed in seeds:
    for name, present in SETTINGS.items():
      for task in tasks:
        for init in inits:
          print(f'== seed {seed}, {name}: {task}, {init}', flush=True)
          path = os.path.join(os.path.abspath(args.workdir), 'runs', slug(present), task, init,
                              f'frac{args.fraction:g}_lr{args.lr:g}_steps{args.steps}',
                              f'seed{seed}')
          result = run_once(args, folders[name], path, task, init, seed, cache)
          metric = TASKS[task][0]
          runs.append({'setting': name, 'task': task, 'init': init, 'seed': seed,
                       metric: result['splits']['test']['all'][metric],
                       'selected_step': result['selected_step']})
  elapsed = time.perf_counter() - t0

  header = ['seasons present'] + [f'{"WorldCover" if t == "worldcover" else "VCF"} '
                                  f'{TASKS[t][1]}, {i}' for t in tasks for i in inits]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' + ' ---: |' * (len(header) - 1)]
  table = {}
  for name in SETTINGS:
    cells = []
    for task in tasks:
      metric, _, digits = TASKS[task]
      for init in inits:
        values = [r[metric] for r in runs
                  if (r['setting'], r['task'], r['init']) == (name, task, init)]
        table[f'{name}/{task}/{init}'] = values
        cells.append(summary(values, digits))
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  print(f'\nTest split ({EMBEDDED["test"]} tiles), {args.fraction * 100:g} % labels, '
        f'{args.steps} steps of batch 32 at lr {args.lr:g}, seeds {seeds} (mean ± sample std):')
  print('\n'.join(lines))
  print(f'\nWall time {elapsed / 60:.1f} min ({len(runs)} runs).', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'runs': runs, 'table': table, 'borrowed': borrowed, 'seconds': elapsed,
                 'args': vars(args)}, f, indent=2)
  if any(not math.isfinite(v) for values in table.values() for v in values):
    raise SystemExit('a run gave a non-finite metric')


if __name__ == '__main__':
  main()
