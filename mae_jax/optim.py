"""Optimiser and learning-rate schedule from ``config.optim``, built from optax parts.

``mae`` recipe (He et al.): AdamW (0.9, 0.95), lr = base_lr x global_batch / 256, linear warmup
then cosine decay to 0, weight decay 0.05 on weight matrices only. ``poster`` recipe: AdamW
1.5e-4 constant, (0.9, 0.999), weight decay 0.01. Optional global-norm clipping. Gradient
accumulation lives in the train step (micro-batches), so one optimiser step = one train step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
        decay_steps=max(total_steps, warmup + 1), end_value=optim_config.end_lr)
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
                           eps=optim_config.eps,
                           weight_decay=optim_config.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts), schedule


# --- Fine-tuning ------------------------------------------------------------------------------


def _names(path) -> list[str]:
  return [str(getattr(key, 'key', getattr(key, 'name', key))) for key in path]


def layer_index(names: list[str], depth: int) -> int:
  """He et al.'s layer id (``util/lr_decay.py``): embeddings 0, block i -> i + 1, the rest depth + 1."""
  if names[0] in ('patch_embed', 'cls_token', 'pos_embedding'):
    return 0
  if names[0] == 'encoder' and names[1].startswith('block_'):
    return int(names[1][len('block_'):]) + 1
  return depth + 1


def layer_decay_scales(params: Any, depth: int, decay: float) -> Any:
  """Per-param lr multipliers decay ** (depth + 1 - layer id); an array over the layer axis for
  scanned blocks (``encoder/blocks``, leading axis = layer), a float elsewhere."""
  def scale(path, leaf):
    names = _names(path)
    if names[0] == 'encoder' and len(names) > 1 and names[1] == 'blocks':
      per_layer = decay ** (depth - np.arange(depth, dtype=np.float64))  # ids 1..depth
      return jnp.asarray(per_layer.reshape((depth,) + (1,) * (len(leaf.shape) - 1)), jnp.float32)
    return float(decay ** (depth + 1 - layer_index(names, depth)))
  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update by the matching leaf of ``scales`` (floats or broadcastable arrays)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def create_finetune_optimizer(optim_config: Any, global_batch: int, total_steps: int,
                              params: Any, *, depth: int, freeze_encoder: bool,
                              is_encoder_param) -> tuple[optax.GradientTransformation, Any]:
  """AdamW for fine-tuning: optional layer-wise lr decay and a frozen encoder.

  With ``optim_config.layer_decay`` < 1, the update of a param in layer id ``i`` is scaled by
  ``layer_decay ** (depth + 1 - i)``, weight decay included, exactly as He et al.'s param
  groups scale both lr and decoupled decay. With ``freeze_encoder`` the encoder's updates are
  scaled by zero, weight decay included, so it cannot move. (Its Adam moments still exist and
  stay zero, as its gradients are stopped in the model: a simpler state layout, whose sharding
  mirrors the params, at the cost of two encoder-sized buffers.)
  ``params`` may be abstract (shapes only).
  """
  schedule = learning_rate_schedule(optim_config, global_batch, total_steps)
  parts = []
  if optim_config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  parts += [optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2,
                                eps=optim_config.eps),
            optax.add_decayed_weights(optim_config.weight_decay, mask=weight_decay_mask)]
  layer_decay = optim_config.layer_decay
  if layer_decay != 1.0 or freeze_encoder:
    scales = layer_decay_scales(params, depth, layer_decay)
    if freeze_encoder:
      scales = {name: jax.tree.map(lambda s: 0.0 * s, subtree) if is_encoder_param(name)
                else subtree for name, subtree in scales.items()}
    parts.append(scale_by_tree(scales))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  return tx, schedule
