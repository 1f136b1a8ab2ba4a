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
