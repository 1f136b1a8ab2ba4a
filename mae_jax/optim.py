"""Optimiser and learning-rate schedule from ``config.optim``, built from optax parts.

``mae`` recipe (He et al.): AdamW (0.9, 0.95), lr = base_lr x global_batch / 256, linear warmup
then cosine decay to 0, weight decay 0.05 on weight matrices only. ``poster`` recipe: AdamW
1.5e-4 constant, (0.9, 0.999), weight decay 0.01. Optional global-norm clipping. Gradient
accumulation lives in the train step (micro-batches), so one optimiser step = one train step.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

# Parameters that never get weight decay, besides every bias and LayerNorm parameter.
NO_DECAY_NAMES = ('pos_embedding', 'decoder_pos_embedding', 'cls_token', 'mask_token')


def peak_learning_rate(optim_config: Any, global_batch: int) -> float:
  lr = optim_config.base_lr
  if optim_config.scale_lr_by_batch:
    lr = lr * global_batch / 256.0
  return lr


def learning_rate_schedule(optim_config: Any, global_batch: int, total_steps: int) -> optax.Schedule:
  peak = peak_learning_rate(optim_config, global_batch)
  if optim_config.schedule == 'constant':
    return optax.constant_schedule(peak)
  if optim_config.schedule == 'warmup_cosine':
    warmup = min(optim_config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim_config.get('end_lr', 0.0))
  raise ValueError(f"config.optim.schedule must be 'constant' or 'warmup_cosine', "
                   f'got {optim_config.schedule!r}')


def weight_decay_mask(params: Any) -> Any:
  """True for weight matrices (named 'kernel'); False for biases, norms, embeddings, tokens."""
  def decays(path, _):
    names = [getattr(key, 'key', getattr(key, 'name', None)) for key in path]
    return names[-1] == 'kernel' and not any(n in NO_DECAY_NAMES for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(optim_config: Any, global_batch: int, total_steps: int):
  """Returns (optax transformation, schedule)."""
  schedule = learning_rate_schedule(optim_config, global_batch, total_steps)
  parts = []
  if optim_config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                           eps=optim_config.get('eps', 1e-8),
                           weight_decay=optim_config.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts), schedule
