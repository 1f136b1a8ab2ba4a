"""Start-up checks of a config against the mesh and the data, with errors that name the field."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from mae_jax.models import mae
from mae_jax.models import vit


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the field."""


def check_model(model_config: Any) -> None:
  size, patch = model_config.image_size, model_config.patch_size
  if patch <= 0 or size % patch:
    raise ConfigError(f'config.model.patch_size={patch} does not divide '
                      f'config.model.image_size={size}')
  if not 0.0 < model_config.mask_ratio < 1.0:
    raise ConfigError(f'config.model.mask_ratio={model_config.mask_ratio} must lie in (0, 1)')
  if int((size // patch)**2 * (1 - model_config.mask_ratio)) < 1:
    raise ConfigError(f'config.model.mask_ratio={model_config.mask_ratio} leaves no visible patch')
  for part in ('encoder', 'decoder'):
    width, heads = model_config[part].width, model_config[part].heads
    if width % heads:
      raise ConfigError(f'config.model.{part}.width={width} is not divisible by '
                        f'config.model.{part}.heads={heads}')
  attention = model_config.attention_implementation
  for part in ('encoder', 'decoder'):
    head_dim = model_config[part].width // model_config[part].heads
    try:
      vit.resolve_attention(attention, jnp.dtype(model_config.dtype), head_dim)
    except ValueError as e:
      raise ConfigError(f'config.model.{e} (the {part}: head dim {head_dim})') from None
  if model_config.norm_pix_loss not in mae.NORM_PIX_CHOICES:
    raise ConfigError(f'config.model.norm_pix_loss={model_config.norm_pix_loss!r} must be one of '
                      f'{mae.NORM_PIX_CHOICES}')
  if model_config.pos_embedding not in mae.POS_EMBEDDING_CHOICES:
    raise ConfigError(f'config.model.pos_embedding={model_config.pos_embedding!r} must be one of '
                      f'{mae.POS_EMBEDDING_CHOICES}')


def check_batch(batch: int, total_steps: int, data_parallel: int, process_count: int,
                accum: int = 1) -> None:
  """config.batch_size against the mesh, the processes and config.optim.grad_accum_steps."""
  if batch <= 0:
    raise ConfigError(f'config.batch_size={batch} must be positive')
  if accum < 1 or batch % accum:
    raise ConfigError(f'config.batch_size={batch} is not divisible by '
                      f'config.optim.grad_accum_steps={accum}')
  if (batch // accum) % data_parallel:
    raise ConfigError(f'config.batch_size={batch} (per micro-batch {batch // accum}) is not '
                      f'divisible by the data-parallel size {data_parallel} '
                      '(config.mesh data x fsdp)')
  if batch % process_count:
    raise ConfigError(f'config.batch_size={batch} is not divisible by the {process_count} processes')
  if total_steps <= 0:
    raise ConfigError(f'config.total_steps={total_steps} must be positive')


def check_data(model_config: Any, data_dir: str, num_channels: int, tile_size: int) -> None:
  if model_config.num_channels != num_channels:
    raise ConfigError(f'config.model.num_channels={model_config.num_channels} but the dataset at '
                      f'{data_dir} has {num_channels} channels')
  if model_config.image_size != tile_size:
    raise ConfigError(f'config.model.image_size={model_config.image_size} but the dataset at '
                      f'{data_dir} has {tile_size} x {tile_size} tiles')


def check_data_shards(config: Any, process_count: int, num_files: int) -> int:
  """Resolves config.dataset.data_shards (0: one per process) and checks it; returns it."""
  shards = config.dataset.data_shards or process_count
  if shards < 0 or shards % process_count:
    raise ConfigError(f'config.dataset.data_shards={shards} must be a multiple of the '
                      f'{process_count} processes (every process reads whole data shards)')
  if num_files % process_count:
    raise ConfigError(f'{config.dataset.data_dir}: the {config.dataset.train_split} split has '
                      f'{num_files} TFRecord files, not a multiple of the {process_count} '
                      'processes; rewrite it with --num_shards a multiple of the host count')
  if num_files % shards:
    raise ConfigError(f'config.dataset.data_shards={shards} does not divide the {num_files} '
                      f'TFRecord files of the {config.dataset.train_split} split')
  if config.batch_size % shards:
    raise ConfigError(f'config.batch_size={config.batch_size} is not divisible by '
                      f'config.dataset.data_shards={shards}')
  return shards


def check_process_rows(batch_sharding: Any, batch_size: int, process_count: int) -> None:
  """Every process must feed as many rows of the global batch as its devices hold."""
  rows = set()
  for index in batch_sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(*index[0].indices(batch_size)))
  if len(rows) != batch_size // process_count:
    raise ConfigError(f'config.mesh: the devices of one process hold {len(rows)} rows of the '
                      f'global batch of {batch_size}, but each of the {process_count} processes '
                      f'feeds {batch_size // process_count}; make the batch axes (data x fsdp) a '
                      'multiple of the process count')


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_training(config: Any) -> None:
  """The optimiser and the loop's intervals: values that would train the wrong thing without a
  word (a negative or NaN learning rate: gradient ascent or NaN params) or crash after
  compilation (an interval of 0)."""
  optim = config.optim
  rules = [('base_lr', lambda v: v > 0, 'a finite number > 0'),
           ('end_lr', lambda v: v >= 0, 'a finite number >= 0'),
           ('warmup_steps', lambda v: v >= 0, 'a finite number >= 0'),
           ('weight_decay', lambda v: v >= 0, 'a finite number >= 0'),
           ('b1', lambda v: 0 <= v < 1, 'in [0, 1)'),
           ('b2', lambda v: 0 <= v < 1, 'in [0, 1)'),
           ('eps', lambda v: v > 0, 'a finite number > 0'),
           ('grad_clip_norm', lambda v: v >= 0, 'a finite number >= 0 (0 = off)'),
           ('grad_accum_steps', lambda v: v >= 1 and v == int(v), 'a whole number >= 1'),
           ('layer_decay', lambda v: 0 < v <= 1, 'in (0, 1] (1 = off)'),
           ('warmup_epochs', lambda v: v >= 0, 'a finite number >= 0')]
  for name, ok, wanted in rules:
    if name in optim and not (_number(optim[name]) and ok(optim[name])):
      raise ConfigError(f'config.optim.{name}={optim[name]!r} must be {wanted}')
  intervals = [('checkpoint.every_steps', config.checkpoint.every_steps, 1),
               ('checkpoint.keep', config.checkpoint.keep, 1),
               ('log_every_steps', config.log_every_steps, 1)]
  if 'image_every_steps' in config:
    intervals.append(('image_every_steps', config.image_every_steps, 1))
  if 'eval_every_steps' in config:  # 0: once per epoch.
    intervals.append(('eval_every_steps', config.eval_every_steps, 0))
  for name, value, least in intervals:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
      hint = (' (keep < 1 would delete every save as it is written)'
              if name == 'checkpoint.keep' else '')
      raise ConfigError(f'config.{name}={value!r} must be a whole number >= {least}{hint}')
