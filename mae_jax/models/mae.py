"""Masked autoencoder (He et al. 2021) for multi-channel SAR tiles, in Flax linen.

One module serves both recipes of the project (``mae``: sin-cos position embeddings, 8 x 512
decoder, per-patch normalised targets; ``poster``: learned position embeddings, one 512-wide
decoder block, raw targets): they differ only in fields set from the config.

Data layout: images are NHWC, already normalised on the device (``mae_jax.preprocess``), with
invalid (no-data) pixels set to 0 and flagged in a boolean ``valid`` array of the same shape.
A patch vector is ordered (row in patch, column in patch, channel), as in MAE and transformers.
Masking keeps ``int(L * (1 - mask_ratio))`` patches chosen by argsort of per-example uniform
noise; the cls token is never masked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.models import vit

NORM_PIX_CHOICES = ('none', 'patch', 'patch_channel')
# Top-level param names of the encoder: what fine-tuning restores from a pretraining checkpoint
# ('pos_embedding' exists only with learned position embeddings).
ENCODER_PARAMS = ('patch_embed', 'cls_token', 'pos_embedding', 'encoder', 'encoder_norm')
POS_EMBEDDING_CHOICES = ('sincos', 'learned')


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, L, p * p * C), patches in row-major order."""
  batch, height, width, channels = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f'image {height}x{width} is not divisible by patch size {patch_size}')
  rows, cols = height // patch_size, width // patch_size
  x = images.reshape(batch, rows, patch_size, cols, patch_size, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """(B, L, p * p * C) -> (B, H, W, C); the inverse of :func:`patchify` for square images."""
  batch, length, _ = patches.shape
  side = int(round(length**0.5))
  if side * side != length:
    raise ValueError(f'{length} patches do not form a square grid')
  x = patches.reshape(batch, side, side, patch_size, patch_size, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(batch, side * patch_size, side * patch_size, channels)


@jax.custom_vjp
def take_rows(x: jax.Array, ids: jax.Array, inverse: jax.Array) -> jax.Array:
  """``x[b, ids[b, i]]`` for (B, L, D) ``x`` and (B, K) ``ids`` of distinct rows.

  ``inverse`` (B, L) gives each row of ``x`` its place in ``ids``, or any value >= K for a
  row not taken. The gradient is then a gather by ``inverse`` rather than the scatter-add
  that ``take_along_axis`` differentiates to (atomics on GPUs); the values are the same.
  """
  return jnp.take_along_axis(x, ids[..., None], axis=1)


def _take_rows_fwd(x, ids, inverse):
  return take_rows(x, ids, inverse), (inverse, x.shape[1])


def _take_rows_bwd(residuals, grad):
  inverse, length = residuals
  # Rows that were not taken read one of the appended zero rows.
  padded = jnp.pad(grad, ((0, 0), (0, length - grad.shape[1]), (0, 0)))
  rows = jnp.take_along_axis(padded, jnp.minimum(inverse, length - 1)[..., None], axis=1)
  return rows, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def random_masking(tokens: jax.Array, noise: jax.Array, keep: int):
  """Keeps the ``keep`` tokens with the smallest noise, per example.

  Returns (kept tokens (B, keep, D), mask (B, L) with 1 = masked, ids_restore (B, L)).
  """
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  kept = take_rows(tokens, ids_shuffle[:, :keep], ids_restore)
  mask = (ids_restore >= keep).astype(jnp.float32)
  return kept, mask, ids_restore


def _group(x: jax.Array, norm_pix: str, channels: int) -> jax.Array:
  """Reshapes (B, L, P) so the last axis is the group normalised together."""
  if norm_pix == 'patch_channel':
    return x.reshape(*x.shape[:-1], -1, channels).swapaxes(-1, -2)
  return x


def target_statistics(target: jax.Array, valid: jax.Array, norm_pix: str, channels: int):
  """Mean and unbiased variance over the valid values of each patch (or patch-channel).

  Returns arrays broadcastable against the (B, L, P) target; (0, 1) when ``norm_pix='none'``.
  The unbiased variance matches MAE's ``target.var(-1)``.
  """
  if norm_pix not in NORM_PIX_CHOICES:
    raise ValueError(f'norm_pix_loss must be one of {NORM_PIX_CHOICES}, got {norm_pix!r}')
  if norm_pix == 'none':
    return jnp.zeros_like(target), jnp.ones_like(target)
  t, v = _group(target, norm_pix, channels), _group(valid, norm_pix, channels)
  count = v.sum(-1, keepdims=True)
  mean = (t * v).sum(-1, keepdims=True) / jnp.maximum(count, 1.0)
  var = (jnp.square(t - mean) * v).sum(-1, keepdims=True) / jnp.maximum(count - 1.0, 1.0)
  mean, var = jnp.broadcast_to(mean, t.shape), jnp.broadcast_to(var, t.shape)
  if norm_pix == 'patch_channel':
    mean, var = (a.swapaxes(-1, -2).reshape(target.shape) for a in (mean, var))
  return mean, var


def reconstruction_loss(target: jax.Array, valid: jax.Array, pred: jax.Array, mask: jax.Array,
                        norm_pix: str, channels: int, eps: float = 1e-6) -> jax.Array:
  """Mean squared error over the valid values of the masked patches.

  With every value valid this equals MAE's per-patch mean over masked patches. No-data values
  are left out of both the target statistics and the error, so no-data borders teach nothing.
  """
  valid = valid.astype(jnp.float32)
  mean, var = target_statistics(target, valid, norm_pix, channels)
  if norm_pix != 'none':
    target = (target - mean) / jnp.sqrt(var + eps)
  err = jnp.square(pred.astype(jnp.float32) - target) * valid
  per_patch_sum = err.sum(-1)
  per_patch_count = valid.sum(-1)
  return (per_patch_sum * mask).sum() / jnp.maximum((per_patch_count * mask).sum(), 1.0)


class MaskedAutoencoder(nn.Module):
  """ViT-MAE with a C-channel patch embedding; see the module docstring."""
  image_size: int = 448
  patch_size: int = 16
  num_channels: int = 12
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  decoder_mlp_dim: int = 2048
  pos_embedding: str = 'sincos'
  mask_ratio: float = 0.75
  norm_pix_loss: str = 'patch'
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat_policy: str = 'none'
  scan_layers: bool = False
  attention_implementation: str = 'auto'

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  @property
  def patch_dim(self) -> int:
    return self.patch_size**2 * self.num_channels

  @property
  def num_kept(self) -> int:
    return int(self.num_patches * (1 - self.mask_ratio))

  def _position_embedding(self, name: str, width: int) -> jax.Array:
    if self.pos_embedding == 'sincos':
      return jnp.asarray(vit.sincos_2d(width, self.grid_size))[None]
    if self.pos_embedding == 'learned':
      return self.param(name, vit.partitioned(nn.initializers.normal(0.02), (None, None, 'embed')),
                        (1, self.num_patches + 1, width), jnp.float32)
    raise ValueError(f'pos_embedding must be one of {POS_EMBEDDING_CHOICES}, '
                     f'got {self.pos_embedding!r}')

  def _transformer(self, depth, heads, mlp_dim, name, **kwargs):
    return vit.Transformer(depth=depth, num_heads=heads, mlp_dim=mlp_dim,
                           layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                           remat_policy=self.remat_policy, scan_layers=self.scan_layers,
                           attention_implementation=self.attention_implementation, name=name,
                           **kwargs)

  def setup(self):
    self._setup_encoder()
    self._setup_decoder()

  def _setup_encoder(self, **transformer_kwargs):
    """The encoder's modules and params: the names listed in ``ENCODER_PARAMS``."""
    if self.image_size % self.patch_size:
      raise ValueError(f'patch_size {self.patch_size} does not divide image_size {self.image_size}')
    if not 0.0 < self.mask_ratio < 1.0:
      raise ValueError(f'mask_ratio must lie in (0, 1), got {self.mask_ratio}')
    token_init = vit.partitioned(nn.initializers.normal(0.02), (None, None, 'embed'))
    self.patch_embed = nn.Dense(self.width, dtype=self.dtype,
                                kernel_init=vit.partitioned(vit.dense_init, ('patch', 'embed')),
                                bias_init=vit.partitioned(nn.initializers.zeros, ('embed',)))
    self.cls_token = self.param('cls_token', token_init, (1, 1, self.width), jnp.float32)
    self.encoder_pos = self._position_embedding('pos_embedding', self.width)
    self.encoder = self._transformer(self.depth, self.heads, self.mlp_dim, 'encoder',
                                     **transformer_kwargs)
    self.encoder_norm = vit.layer_norm(self.layer_norm_eps, self.dtype)

  def _setup_decoder(self):
    token_init = vit.partitioned(nn.initializers.normal(0.02), (None, None, 'embed'))
    self.decoder_embed = nn.Dense(self.decoder_width, dtype=self.dtype,
                                  kernel_init=vit.partitioned(vit.dense_init, ('embed', None)),
                                  bias_init=vit.partitioned(nn.initializers.zeros, ('embed',)))
    self.mask_token = self.param('mask_token', token_init, (1, 1, self.decoder_width), jnp.float32)
    self.decoder_pos = self._position_embedding('decoder_pos_embedding', self.decoder_width)
    self.decoder = self._transformer(self.decoder_depth, self.decoder_heads, self.decoder_mlp_dim,
                                     'decoder')
    self.decoder_norm = vit.layer_norm(self.layer_norm_eps, self.dtype)
    self.decoder_pred = nn.Dense(self.patch_dim, dtype=self.dtype,
                                 kernel_init=vit.partitioned(vit.dense_init, ('embed', 'patch')),
                                 bias_init=vit.partitioned(nn.initializers.zeros, ('patch',)))

  def encode(self, images: jax.Array, noise: jax.Array | None = None):
    """Encodes the visible patches. Without noise every patch is visible (fine-tuning).

    Returns (latent (B, 1 + kept, D) after the final LayerNorm, mask (B, L) or None,
    ids_restore (B, L) or None).
    """
    return self.encode_patches(patchify(images, self.patch_size), noise)

  def encode_patches(self, patches: jax.Array, noise: jax.Array | None = None):
    """:meth:`encode` on already patchified images (B, L, p * p * C)."""
    x = self.patch_embed(patches.astype(self.dtype))
    x = x + self.encoder_pos[:, 1:].astype(self.dtype)
    mask = ids_restore = None
    if noise is not None:
      x, mask, ids_restore = random_masking(x, noise, self.num_kept)
    cls = (self.cls_token + self.encoder_pos[:, :1]).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
    x = nn.with_logical_constraint(x, vit.ACTIVATION_AXES)
    return self.encoder_norm(self.encoder(x)), mask, ids_restore

  def decode(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
    """Predicts every patch (B, L, p * p * C) in float32 from the encoded visible tokens."""
    x = self.decoder_embed(latent)
    batch = x.shape[0]
    num_masked = self.num_patches + 1 - x.shape[1]
    mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype),
                                   (batch, num_masked, self.decoder_width))
    patches = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    # ids_restore is a permutation; its inverse (argsort) carries the gradient back.
    patches = take_rows(patches, ids_restore, jnp.argsort(ids_restore, axis=1))
    x = jnp.concatenate([x[:, :1], patches], axis=1) + self.decoder_pos.astype(x.dtype)
    x = nn.with_logical_constraint(x, vit.ACTIVATION_AXES)
    # Drop cls before the wide prediction layer: its output would be discarded anyway.
    x = self.decoder_norm(self.decoder(x))[:, 1:]
    return self.decoder_pred(x).astype(jnp.float32)

  def __call__(self, images: jax.Array, valid: jax.Array, noise: jax.Array) -> dict[str, jax.Array]:
    """Masks, encodes, decodes and scores a batch. ``noise`` is (B, L) uniform."""
    return self.forward_patches(patchify(images, self.patch_size),
                                patchify(valid, self.patch_size), noise)

  def forward_patches(self, patches: jax.Array, valid_patches: jax.Array,
                      noise: jax.Array) -> dict[str, jax.Array]:
    """:meth:`__call__` on patchified images and validity, (B, L, p * p * C) each.

    The train step patchifies the compact float16 input once and normalises it in patch
    layout (``preprocess.normalise_patches``): on CPUs the transposes of full images cost more
    than many of the matmuls.
    """
    target = patches.astype(jnp.float32)
    latent, mask, ids_restore = self.encode_patches(target, noise)
    pred = self.decode(latent, ids_restore)
    loss = reconstruction_loss(target, valid_patches, pred, mask, self.norm_pix_loss,
                               self.num_channels)
    return {'loss': loss, 'pred': pred, 'mask': mask}


def module_fields(model: MaskedAutoencoder) -> dict[str, Any]:
  """The :class:`MaskedAutoencoder` fields of ``model`` (also of a subclass such as the
  downstream model), to build another module with the same encoder and decoder."""
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(MaskedAutoencoder)
          if f.name not in ('parent', 'name')}


def config_fields(model_config, module: type[nn.Module] = None) -> dict[str, Any]:
  """The fields of ``module`` (default :class:`MaskedAutoencoder`) that ``config.model`` sets.

  One naming rule, no hand-written map: a key of ``config.model`` is the field of the same name,
  ``encoder.<key>`` is ``<key>`` and ``decoder.<key>`` is ``decoder_<key>``. Keys that are no
  field of ``module`` (a fine-tuning config's ``drop_path_rate`` for the plain MAE) are left out.
  """
  names = {f.name for f in dataclasses.fields(module or MaskedAutoencoder)} - {'parent', 'name'}
  values = dict(model_config.encoder)
  values.update((f'decoder_{key}', value) for key, value in model_config.decoder.items())
  values.update((key, value) for key, value in model_config.items()
                if key not in ('encoder', 'decoder'))
  return {key: value for key, value in values.items() if key in names}


def model_from_config(model_config, dtype_override: Any = None,
                      attention_override: str | None = None) -> MaskedAutoencoder:
  """Builds the module from the ``config.model`` section (see :func:`config_fields`).

  Tools that rebuild a saved model on this machine pass ``attention_override='auto'``: the
  attention implementation is a choice of the machine (cuDNN on the GPU a run trained on),
  not part of the model.
  """
  fields = config_fields(model_config)
  fields['dtype'] = jnp.dtype(dtype_override or model_config.dtype)
  if attention_override:
    fields['attention_implementation'] = attention_override
  return MaskedAutoencoder(**fields)
