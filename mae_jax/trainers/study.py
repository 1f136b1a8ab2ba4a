r"""Runs the label-efficiency study (configs/study.py) and writes its table and plots.

  python -m mae_jax.trainers.study --config configs/study.py:quick --workdir workdirs/study_quick
  python -m mae_jax.trainers.study --quick --workdir workdirs/study_quick   # the same

Steps: (1) pretrain on the pretraining regions unless ``pretrain_checkpoint`` is given;
(2) for each task, label fraction and init (pretrained / scratch), sweep ``lr_sweep`` on the
first seed and select the rate with the lowest validation loss; (3) run the remaining seeds at
the selected rate; (4) collect each run's test metrics per region into ``results.csv``, write
``results.md`` and ``study.png`` (:mod:`mae_jax.trainers.study_report`). Runs are plain fine-tuning
workdirs under ``<workdir>/runs/<task>/<init>/frac<fraction>/lr<lr>/seed<seed>``; a finished run
(``final_metrics.json`` present) is read, not rerun, so the study resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from mae_jax import cli
from mae_jax import distributed

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/study.py:quick',
                                          'Study config file[:preset].', lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Study folder (runs, results.csv, plots).')
_QUICK = flags.DEFINE_bool('quick', False, 'Insist on the quick preset (the default config); an '
                           'error with --config=...:full.')
flags.mark_flags_as_required(['workdir'])

INITS = ('pretrained', 'scratch')


def run_dir(workdir: str, task: str, init: str, fraction: float, lr: float, seed: int) -> str:
  return os.path.join(workdir, 'runs', task, init, f'frac{fraction:g}', f'lr{lr:g}',
                      f'seed{seed}')


def pretrain_if_needed(study, workdir: str) -> str:
  """The pretraining checkpoint path: the given one, or one trained here (resumable)."""
  if study.pretrain_checkpoint:
    return study.pretrain_checkpoint
  from configs import pretrain as pretrain_configs  # pylint: disable=g-import-not-at-top
  from mae_jax.trainers import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain_configs.preset_config(study.pretrain_preset)
  config.dataset.data_dir = study.data_dir
  config.dataset.regions = tuple(study.pretrain_regions)
  if study.pretrain_steps:
    config.total_steps = study.pretrain_steps
  path = os.path.join(workdir, 'pretrain')
  print(f'== Pretraining {study.pretrain_preset} for {config.total_steps} steps on '
        f'{", ".join(study.pretrain_regions)} -> {path}', flush=True)
  if pretrain.train_and_evaluate(config, path).get('stopped_by'):
    stop_study()
  return path


def stop_study() -> None:
  """Ends the study after a signal stopped a run at a checkpoint (exit 0; a rerun resumes)."""
  print('== The study stopped on a signal; run the same command again to resume it.', flush=True)
  raise SystemExit(0)


def finetune_config(study, task: str, init: str, fraction: float, lr: float, seed: int,
                    checkpoint: str):
  from configs import downstream  # pylint: disable=g-import-not-at-top
  config = downstream.build(task, study.head_kind, study.finetune_preset,
                            study.finetune_protocol)
  config.update(study.finetune_overrides.to_dict())
  config.dataset.data_dir = study.data_dir
  config.seed = seed
  config.label_fraction = fraction
  config.optim.base_lr = lr
  config.init_checkpoint = checkpoint if init == 'pretrained' else ''
  # Runs are short and rerun from scratch if interrupted: one checkpoint, at the end.
  config.checkpoint.every_steps = 10**9
  return config


def run_once(study, workdir, task, init, fraction, lr, seed, checkpoint,
             cache=None) -> dict[str, Any]:
  """One fine-tuning run (or its saved result); ``cache``: the study's compile cache."""
  from mae_jax.trainers import finetune  # pylint: disable=g-import-not-at-top
  path = run_dir(workdir, task, init, fraction, lr, seed)
  done = os.path.join(path, 'final_metrics.json')
  if not os.path.exists(done):
    t0 = time.perf_counter()
    result = finetune.finetune(finetune_config(study, task, init, fraction, lr, seed, checkpoint),
                               path, cache)
    if result.get('stopped'):
      stop_study()
    print(f'   {task} {init} {fraction:g} lr {lr:g} seed {seed}: '
          f'{time.perf_counter() - t0:.0f} s', flush=True)
  with open(done) as f:
    return json.load(f)


def rows_of(study, result: dict[str, Any], task, init, fraction, lr, seed) -> list[dict]:
  """One results.csv row per test region: the headline metric plus the others."""
  from data_pipeline import schema  # pylint: disable=g-import-not-at-top
  from mae_jax.trainers import study_report  # pylint: disable=g-import-not-at-top
  test = result['splits'][study.get('test_split', 'test')]
  validation = result['splits'][study.get('validation_split', 'validation')]
  rows = []
  for region in study.test_regions:
    if region not in schema.REGIONS + ('all',):
      raise ValueError(f'unknown test region {region!r}; regions: {schema.REGIONS} or all')
    if region not in test:
      raise ValueError(f'the test split has no labelled {region} tiles')
    m = test[region]
    row = {'task': task, 'region': region, 'fraction': fraction, 'init': init, 'seed': seed,
           'lr': lr, 'selected_step': result['selected_step'],
           'num_train_examples': result['num_train_examples'],
           'val_loss': validation['all']['loss']}
    keys = ('rmse', 'mae', 'r2') if task == 'vcf' else ('miou', 'overall_accuracy')
    row.update({k: m[k] for k in keys})
    assert study_report.HEADLINE[task].metric in row
    rows.append(row)
  return rows


def source_commit() -> str:
  """The git commit of this source tree, '+ changes' when tracked files differ from it, or
  'unknown' outside a git checkout: results.md says which code produced its figures."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  def git(*args):
    return subprocess.run(['git', '-C', root, *args], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()
  try:
    commit = git('rev-parse', '--short=12', 'HEAD')
    changed = git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  return commit + (' + uncommitted changes' if changed else '')


def panels_of(study, task_runs: dict[tuple[str, float, str], list[str]]) -> dict:
  """Bootstrap panels (study_stats.bootstrap_panel) per (task, test region), from the per-tile
  test statistics of the runs: (task, fraction, init) -> run folders in seed order."""
  from data_pipeline import schema  # pylint: disable=g-import-not-at-top
  from mae_jax.trainers import study_report  # pylint: disable=g-import-not-at-top
  from mae_jax.trainers import study_stats  # pylint: disable=g-import-not-at-top
  panels = {}
  for task in study.tasks:
    loaded = {(fraction, init): [study_stats.load_tile_stats(
                  os.path.join(path, study_stats.TILE_STATS_FILE)) for path in paths]
              for (t, fraction, init), paths in task_runs.items() if t == task}
    for region in study.test_regions:
      cells = {}
      for key, runs in loaded.items():
        regions = {r['region'].tobytes() for r in runs}
        if len(regions) != 1:
          raise ValueError(f'{task} runs of {key} were tested on different tiles')
        keep = (np.ones(runs[0]['region'].shape, bool) if region == 'all' else
                runs[0]['region'] == schema.REGIONS.index(region))
        name = 'sq_error' if task == 'vcf' else 'confusion'
        cells[key] = {name: np.stack([r[name][keep] for r in runs])}
      panels[(task, region)] = study_stats.bootstrap_panel(
          task, study_report.HEADLINE[task].higher_is_better, cells,
          replicates=study.bootstrap_replicates, seed=study.bootstrap_seed)
  return panels


def provenance(study, argv: list[str], tiles: dict[str, int], minutes: float) -> list[str]:
  """The lines at the head of results.md: which code, command, data and seeds."""
  config = json.dumps(json.loads(study.to_json_best_effort()), sort_keys=True)
  return [
      f'- Commit: `{source_commit()}`; command: `{" ".join(argv)}` ({minutes:.1f} min).',
      f'- Seeds {", ".join(str(s) for s in study.seeds)}; learning rates '
      f'{", ".join(f"{lr:g}" for lr in study.lr_sweep)} swept on seed {study.seeds[0]} per '
      '(task, fraction, init), selected on validation loss (selected_lr.json).',
      f'- Data `{study.data_dir}`; test tiles: ' +
      ', '.join(f'{region} {count}' for region, count in tiles.items()) + '.',
      f'- Study config: `{config}`',
  ]


def run_study(study, workdir: str, argv: list[str] | None = None) -> dict[str, str]:
  from mae_jax.trainers import study_report  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'study_config.json'), 'w') as f:
    f.write(study.to_json_best_effort(indent=2))
  t0 = time.perf_counter()
  checkpoint = pretrain_if_needed(study, workdir)
  from mae_jax.trainers import finetune  # pylint: disable=g-import-not-at-top
  # The study's runs differ in data, seed and init values only: they share compiled functions.
  cache = finetune.CompileCache()
  rows, selections, task_runs = [], {}, {}
  seeds = list(study.seeds)
  for task in study.tasks:
    for fraction in study.fractions:
      for init in INITS:
        print(f'== {task}, {fraction * 100:g} % labels, {init}', flush=True)
        sweep = {lr: run_once(study, workdir, task, init, fraction, lr, seeds[0], checkpoint,
                              cache)
                 for lr in study.lr_sweep}
        best_lr = min(sweep, key=lambda lr: sweep[lr]['splits']['validation']['all']['loss'])
        selections[f'{task}/{init}/{fraction:g}'] = best_lr
        for seed in seeds:
          result = (sweep[best_lr] if seed == seeds[0] else
                    run_once(study, workdir, task, init, fraction, best_lr, seed, checkpoint,
                             cache))
          rows.extend(rows_of(study, result, task, init, fraction, best_lr, seed))
          task_runs.setdefault((task, fraction, init), []).append(
              run_dir(workdir, task, init, fraction, best_lr, seed))
  panels = panels_of(study, task_runs)
  tiles = {region: panel['num_tiles'] for (task, region), panel in panels.items()
           if task == study.tasks[0]}
  minutes = (time.perf_counter() - t0) / 60
  paths = study_report.write_report(
      rows, workdir, panels,
      provenance(study, argv or ['python -m mae_jax.trainers.study'], tiles, minutes))
  with open(os.path.join(workdir, 'selected_lr.json'), 'w') as f:
    json.dump(selections, f, indent=2, sort_keys=True)
  minutes = (time.perf_counter() - t0) / 60
  print(f'Study done in {minutes:.1f} min: ' + ', '.join(paths.values()), flush=True)
  with open(paths['markdown']) as f:
    print(f.read(), flush=True)
  return paths


def main(argv):
  cli.start_process(argv)
  config = _CONFIG.value
  if _QUICK.value and config.preset != 'quick':
    raise app.UsageError(f'--quick but --config is the {config.preset!r} preset')
  with distributed.exit_on_error():
    run_study(config, os.path.abspath(_WORKDIR.value),
              ['python -m mae_jax.trainers.study', *sys.argv[1:]])


def console_main() -> None:
  """The ``mae-jax-study`` command (setup.py's console script)."""
  from data_pipeline import console  # pylint: disable=g-import-not-at-top
  console.run(main, __name__)


if __name__ == '__main__':
  console_main()
