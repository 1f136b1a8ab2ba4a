"""The MAE encoder with a downstream head: VCF regression or WorldCover segmentation.

``DownstreamModel`` is a :class:`mae.MaskedAutoencoder` that builds only the encoder (same param
names, ``mae.ENCODER_PARAMS``, so a pretraining checkpoint's encoder drops straight in) plus a
``head`` from :mod:`mae_jax.models.heads`. The encoder sees every patch (no masking). With
``freeze_encoder`` no gradient flows into the encoder (linear probing, frozen fine-tuning): the
backward pass stops at the head, and the optimiser also leaves those params untouched
(``optim.create_finetune_optimizer``). ``train`` switches drop path and BatchNorm statistics; a
training and an evaluation model are two clones that share params.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mae_jax.models import heads
from mae_jax.models import mae


class DownstreamModel(mae.MaskedAutoencoder):
  """Encoder + head; ``__call__(images) -> (B,) percent tree cover or (B, H, W, classes) logits."""
  task: str = 'vcf'
  head_kind: str = 'finetune'
  # Extra fields of the head module (sizes), as sorted (name, value) pairs so the module stays
  # hashable.
  head_options: tuple[tuple[str, Any], ...] = ()
  freeze_encoder: bool = False
  drop_path_rate: float = 0.0
  train: bool = False

  def setup(self):
    self._setup_encoder(drop_path_rate=self.drop_path_rate, deterministic=not self.train)
    options = dict(self.head_options)
    if self.task == 'worldcover' or self.head_kind == 'linear_probe':
      options.setdefault('image_size', self.image_size)
    self.head = heads.create_head(self.head_kind, self.task, dtype=self.dtype, **options)

  def features(self, images: jax.Array) -> jax.Array:
    """Encoder tokens (B, 1 + L, D) after the final LayerNorm, cls first."""
    latent, _, _ = self.encode(images)
    if self.freeze_encoder:
      latent = jax.lax.stop_gradient(latent)
    return latent

  def __call__(self, images: jax.Array) -> jax.Array:
    out = self.head(self.features(images), train=self.train)
    return out.astype(jnp.float32)


def model_from_config(config, train: bool = False) -> DownstreamModel:
  """Builds the model from a fine-tuning config (``config.model``, ``.task_name``, ``.head``)."""
  m = config.model
  return DownstreamModel(
      **mae.module_fields(mae.model_from_config(m)), task=config.task_name, head_kind=config.head.kind,
      head_options=tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                for k, v in config.head.options.to_dict().items())),
      freeze_encoder=config.freeze_encoder, drop_path_rate=m.drop_path_rate,
      train=train)


def is_encoder_param(name: str) -> bool:
  return name in mae.ENCODER_PARAMS


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(encoder params, the rest) of a params dict by top-level name."""
  encoder = {k: v for k, v in params.items() if is_encoder_param(k)}
  rest = {k: v for k, v in params.items() if not is_encoder_param(k)}
  return encoder, rest


def init_variables_fn(model: DownstreamModel):
  """rng -> boxed variables {'params', ['batch_stats']} from a one-tile dummy batch."""
  def init(rng):
    params_rng, dropout_rng = jax.random.split(rng)
    images = jnp.zeros((2, model.image_size, model.image_size, model.num_channels), jnp.float32)
    return dict(model.init({'params': params_rng, 'dropout': dropout_rng}, images))
  return init

