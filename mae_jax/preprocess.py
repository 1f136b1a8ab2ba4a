"""On-device input preprocessing: compact host dtype in, normalised float32 and a validity mask out.

The host ships float16 dB tiles with NaN for no-data; casting, normalisation and masking happen
here, inside the jitted step, where they are nearly free. Invalid values become 0 (the mean after
normalisation) and are flagged so losses and metrics can leave them out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def normalise(images: jax.Array, mean: np.ndarray, std: np.ndarray):
  """(B, H, W, C) float16 dB -> (z-scored float32 with no-data = 0, valid bool (B, H, W, C))."""
  images = images.astype(jnp.float32)
  valid = jnp.isfinite(images)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  normalised = jnp.where(valid, (images - mean) / std, 0.0)
  return normalised, valid


def denormalise(images: jax.Array, mean: np.ndarray, std: np.ndarray) -> jax.Array:
  """The inverse of :func:`normalise` on valid values (back to dB)."""
  return images * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)


def normalise_patches(images: jax.Array, patch_size: int, mean: np.ndarray, std: np.ndarray):
  """(B, H, W, C) float16 dB -> patchified (normalised float32, valid bool), (B, L, p * p * C).

  Rearranges the compact input into patches first (half the bytes of float32), then casts and
  normalises in patch layout, where the channel is still the fastest-varying axis.
  """
  from mae_jax.models import mae  # pylint: disable=g-import-not-at-top
  channels = images.shape[-1]
  patches = mae.patchify(images, patch_size)
  grouped = patches.reshape(*patches.shape[:-1], -1, channels)
  normalised, valid = normalise(grouped, mean, std)
  return normalised.reshape(patches.shape), valid.reshape(patches.shape)
