r"""The label-efficiency study: the poster's grid of fine-tuning runs, pretrained vs scratch.

  python -m mae_jax.trainers.study --config configs/study.py:quick --workdir workdirs/study_quick
  python -m mae_jax.trainers.study --config configs/study.py:full --workdir gs://BUCKET/study \
      --config.data_dir=gs://BUCKET/s1_tiles --config.pretrain_checkpoint=gs://BUCKET/mae_b

Grid: tasks (VCF regression, WorldCover segmentation) x label fractions (0.1, 1, 10, 100 %) x
init (pretrained, scratch) x seeds, tested per region on a region inside the pretraining regions
(Europe) and one outside them (South America). Each (task, fraction, init) first sweeps
``lr_sweep`` on the first seed and keeps the learning rate with the lowest validation loss (the
scratch baseline gets exactly the same sweep), then runs the other seeds at that rate. Every run
is an ordinary fine-tuning workdir under ``<workdir>/runs/``; a run that finished is not run
again, so an interrupted study resumes. Outputs: ``results.csv``, ``results.md`` (table with
label-savings factors) and ``study.png``.

Presets:
  * ``quick``: the embedded dataset (``make demo`` builds it, 128 px; its test split of 640
    tiles holds about 130 per region, so that the intervals can call the 1 % and 10 % cells),
    the ``tiny`` model pretrained here for ``pretrain_steps`` on the pretraining regions only,
    then 60 fine-tuning steps of batch 32 per run, 4 seeds (80 runs); about 23 minutes on 2 CPU
    cores.
  * ``probe``: linear probes (frozen encoder, configs/linear_probe.py's tiny recipe: 300 steps
    of batch 32, peak lr 1e-2) of the pretrained and of a random encoder, all labels, 3 seeds,
    on the same data and pretraining as ``quick`` (pass
    ``--config.pretrain_checkpoint=workdirs/study_quick/pretrain`` to reuse it); 12 runs.
  * ``full``: the ``poster`` model and protocol (full fine-tuning, AdamW constant, 100 epochs,
    best validation step); point ``pretrain_checkpoint`` at a pretraining workdir.
"""

import ml_collections

from configs import preset_args
from data_pipeline import schema

PRESETS = ('quick', 'probe', 'full')


def get_config(arg: str = 'quick') -> ml_collections.ConfigDict:
  """``configs/study.py:<preset>`` or ``:preset=<preset>``."""
  preset = preset_args.parse(arg, 'configs/study.py', preset=PRESETS).get('preset', 'quick')
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.data_dir = 'data/synthetic_tiny'
  c.tasks = ('vcf', 'worldcover')
  c.fractions = (0.001, 0.01, 0.1, 1.0)
  c.seeds = (0, 1, 2)
  c.test_regions = ('europe', 'south_america')
  # The same learning rates for pretrained and scratch runs; chosen on validation loss.
  c.lr_sweep = (1e-4, 3e-4, 1e-3)
  # A pretraining workdir or step folder; '' = pretrain here first (on pretrain_regions only).
  c.pretrain_checkpoint = ''
  c.pretrain_preset = 'tiny'
  c.pretrain_steps = 0  # 0 = the preset's total_steps.
  c.pretrain_regions = schema.PRETRAIN_REGIONS
  # Fine-tuning: configs/finetune_<task>.py:preset=<finetune_preset>,protocol=<finetune_protocol>
  # ('' = the preset's default protocol), then these overrides.
  c.finetune_preset = 'tiny'
  c.finetune_protocol = ''
  # 'finetune' (a trained head on a trained encoder) or 'linear_probe' (frozen encoder).
  c.head_kind = 'finetune'
  c.finetune_overrides = ml_collections.ConfigDict()
  # Intervals (mae_jax/trainers/study_stats.py): bootstrap replicates over test tiles and seeds,
  # and the seed of the draws (fixed, so that the same runs give the same table).
  c.bootstrap_replicates = 2000
  c.bootstrap_seed = 0
  if preset == 'quick':
    c.pretrain_steps = 600
    c.seeds = (0, 1, 2, 3)
    c.lr_sweep = (3e-4, 1e-3)
    c.finetune_overrides.total_steps = 60
    c.finetune_overrides.eval_every_steps = 20
  elif preset == 'probe':
    c.pretrain_steps = 600
    c.head_kind = 'linear_probe'
    c.fractions = (1.0,)
    c.lr_sweep = (1e-2 * 256 / 32,)  # The probe recipe's rate (scaled by batch / 256 inside).
  elif preset == 'full':
    c.data_dir = ''
    c.pretrain_preset = 'poster'
    c.finetune_preset = 'poster'
    c.lr_sweep = (5e-5, 1.5e-4, 5e-4)
  else:
    raise ValueError(f'unknown preset {preset!r}: use one of {PRESETS}')
  return c
