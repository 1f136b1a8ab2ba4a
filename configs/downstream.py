r"""Shared builder of the fine-tuning and linear-probing configs (one place for their fields).

Used by ``configs/finetune_vcf.py``, ``configs/finetune_worldcover.py`` and
``configs/linear_probe.py``; see those files for the commands. The model section is the
pretraining preset of the same name (``configs/pretrain.py``), so a checkpoint of that preset fits.

The argument after the file's colon: ``<preset>`` or ``preset=<preset>,protocol=<protocol>``
(and ``task=vcf|worldcover`` for linear probing), e.g. ``configs/finetune_vcf.py:preset=mae_b,
protocol=poster``. Presets are the pretraining presets. Protocols:
  * ``poster`` (default for ``poster`` and ``tiny``): what the poster's authors ran: full
    fine-tuning, AdamW 1.5e-4 constant for backbone and head, (0.9, 0.999), weight decay 0.01,
    batch 8, 100 epochs, the step with the lowest validation loss selected, then tested.
  * ``mae`` (default for ``mae_*``): He et al.'s fine-tuning recipe: AdamW (0.9, 0.999),
    lr 5e-4 x batch / 256 with 5 warmup epochs then cosine, weight decay 0.05, layer-wise lr
    decay 0.75, drop path 0.1, batch 1024 (or the whole training set if smaller), 100 epochs.
  * ``linear_probe`` (always for ``configs/linear_probe.py``): He et al.'s linear probe: frozen
    encoder, BatchNorm without affine parameters before one linear layer, LARS replaced by
    AdamW 1e-3 x batch / 256 (no weight decay) with warmup + cosine, 90 epochs.
Pretrained and scratch runs of one study share all of this; only ``init_checkpoint`` differs.
"""

from __future__ import annotations

import ml_collections

from configs import preset_args
from configs import pretrain

TASKS = ('vcf', 'worldcover')
PROTOCOLS = ('poster', 'mae', 'linear_probe')


def head_options(task: str, head_kind: str, preset: str) -> dict:
  """Sizes of the head module (fields of mae_jax.models.heads); small ones for ``tiny``."""
  tiny = preset == 'tiny'
  if head_kind == 'linear_probe':  # VCF: the cls token or the mean patch token ('mean').
    return {'pool': 'cls'} if task == 'vcf' else {}
  if task == 'vcf':  # Authors: tokens 785 -> 196, width 768 -> 192, then 512, 256, 128, 1.
    return {'hidden': (128, 64, 32)} if tiny else {}
  # SETR-PUP: 256 channels per stage; 16 for tiny, where the 128 px stages would otherwise cost
  # more than the encoder on a CPU (32 channels: 0.62 s per step of 32 tiles, 16: 0.34 s).
  return {'channels': 16} if tiny else {}


def get_config(arg: str, task: str | None = None,
               head_kind: str = 'finetune') -> ml_collections.ConfigDict:
  """Reads a config file's argument (``preset=...,protocol=...,task=...``) into a config.

  ``task`` is the task of a file made for one (``finetune_vcf.py``); without it the argument may
  name one (``linear_probe.py``, default vcf).
  """
  where = f'configs/{"linear_probe" if head_kind == "linear_probe" else f"finetune_{task}"}.py'
  choices = {'preset': pretrain.PRESETS}
  if head_kind != 'linear_probe':
    choices['protocol'] = PROTOCOLS[:2]
  if task is None:
    choices['task'] = TASKS
  args = preset_args.parse(arg, where, **choices)
  return build(task or args.get('task', 'vcf'), head_kind, args.get('preset', 'tiny'),
               args.get('protocol'))


def build(task: str, head_kind: str, preset: str,
          protocol: str | None = None) -> ml_collections.ConfigDict:
  """The config of one fine-tuning or linear-probing run.

  Args:
    task: One of ``TASKS``.
    head_kind: 'finetune' or 'linear_probe'.
    preset: A pretraining preset (``configs.pretrain.PRESETS``): the model.
    protocol: One of ``PROTOCOLS``; None = the preset's default (see the module docstring).
      Linear probing always uses 'linear_probe'.
  """
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}: use one of {TASKS}')
  if head_kind == 'linear_probe':
    protocol = 'linear_probe'
  elif not protocol:
    protocol = 'mae' if preset.startswith('mae_') else 'poster'
  if protocol not in PROTOCOLS:
    raise ValueError(f'unknown protocol {protocol!r}: use one of {PROTOCOLS}')
  base = pretrain.preset_config(preset)
  c = ml_collections.ConfigDict()
  c.task = 'finetune'  # The entrypoint's dispatch (mae_jax.main).
  c.task_name = task  # 'vcf' (per-tile percent tree cover) or 'worldcover' (11 classes).
  c.protocol = protocol
  c.seed = 0  # Head init, label subset, data order and drop path all derive from it.
  # A pretraining workdir (its latest step) or one checkpoints/<step> folder; '' = from scratch.
  c.init_checkpoint = ''
  # Or the encoder of MAE weights published in PyTorch (official .pth, transformers folder or
  # .safetensors; mae_jax/pretrained.py), with the channel rule 'mean' or 'repeat'. Exclusive
  # with init_checkpoint; normalisation then uses this dataset's statistics.
  c.init_from = ''
  c.init_from_channels = 'mean'
  # The fine-tuning data's input contract must equal the checkpoint's (bands, order, units,
  # clipping, quantisation); True accepts a difference (it is logged).
  c.allow_contract_mismatch = False
  # Fraction of the labelled training tiles used: nested subsets per seed
  # (data_pipeline.subsets.LABEL_FRACTIONS = 0.1, 1, 10, 100 %), at least one tile.
  c.label_fraction = 1.0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.data_dir = base.dataset.data_dir
  c.dataset.train_split = 'train'
  c.dataset.validation_split = 'validation'
  c.dataset.test_split = 'test'
  # Regions (data_pipeline.schema.REGIONS) whose tiles are trained on; () = all. Evaluation
  # always reports every region present plus the whole split.
  c.dataset.train_regions = ()
  # Batches read and copied to the devices ahead of the step, on a thread, so the copy (308 MB
  # for 64 tiles at 448 px) overlaps the step; 0 = read each batch when its step starts.
  c.dataset.device_prefetch = 2
  c.dataset.shuffle_buffer = 256
  # As in pretraining (configs/pretrain.py): parts the training subset is cut into (0 = one per
  # process; a fixed number keeps the data order on any host count, but small label fractions
  # need at least one selected tile in every part), payload CRC checks, bad records to skip,
  # the reader, the host cache (training subset and validation split) and whether a resume may
  # change the data order.
  c.dataset.data_shards = 0
  c.dataset.verify_checksums = base.dataset.verify_checksums
  c.dataset.max_bad_records = 0
  c.dataset.reader = base.dataset.reader
  c.dataset.host_cache = base.dataset.host_cache
  c.dataset.allow_new_data_order = False

  c.model = base.model
  c.model.drop_path_rate = 0.0
  c.head = ml_collections.ConfigDict()
  c.head.kind = head_kind  # 'finetune' or 'linear_probe'
  c.head.options = head_options(task, head_kind, preset)
  c.freeze_encoder = head_kind == 'linear_probe'

  # Length: total_steps if > 0, else epochs over the (label-fraction) training set.
  c.total_steps = 0
  c.epochs = 100
  c.stop_at_step = 0  # Stop early with a checkpoint (time-boxed jobs, resume tests); 0 = off.
  c.batch_size = 8
  c.optim = ml_collections.ConfigDict(dict(
      schedule='constant', base_lr=1.5e-4, scale_lr_by_batch=False, warmup_steps=0,
      warmup_epochs=0.0, end_lr=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
      grad_clip_norm=0.0, layer_decay=1.0, grad_accum_steps=1))
  # Validation every this many steps (0: once per epoch); the best validation loss is kept as
  # the model (select_best) or the last step is (False).
  c.eval_every_steps = 0
  c.select_best = True
  c.eval_batch_size = 0  # 0: batch_size.
  c.num_images = 4  # Tiles drawn as SAR / label / prediction PNGs at the end.

  c.mesh = base.mesh
  c.logical_rules = base.logical_rules
  # As in pretraining (configs/pretrain.py): checksum failures fall back unless strict, and
  # allow_changes names the guarded fields a resume may change.
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=2, async_save=True,
                                                strict=False))
  c.allow_changes = ''
  c.log_every_steps = 50
  c.peak_tflops_per_device = 0.0

  if protocol == 'mae':
    c.batch_size = 1024
    c.optim.update(schedule='warmup_cosine', base_lr=5e-4, scale_lr_by_batch=True,
                   warmup_epochs=5.0, weight_decay=0.05, layer_decay=0.75)
    c.model.drop_path_rate = 0.1
  elif protocol == 'linear_probe':
    c.batch_size = 1024 if preset != 'tiny' else 32
    c.epochs = 90
    c.optim.update(schedule='warmup_cosine', base_lr=1e-3, scale_lr_by_batch=True,
                   warmup_epochs=10.0, weight_decay=0.0)
  if preset == 'tiny':
    c.batch_size = 32
    c.total_steps = 150
    c.eval_every_steps = 25
    c.log_every_steps = 25
    c.checkpoint.every_steps = 50
    if protocol == 'poster':
      c.optim.base_lr = 3e-4
    elif protocol == 'linear_probe':  # Short: one warmup epoch, peak lr 1e-2 at batch 32.
      c.total_steps = 300
      c.eval_every_steps = 50
      c.optim.update(base_lr=1e-2 * 256 / 32, warmup_epochs=1.0)
  return c
