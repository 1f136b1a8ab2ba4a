"""On-device input preprocessing: compact host dtype in, normalised float32 and a validity mask out.

The host ships images in their dataset's storage form (float16 dB with NaN for no-data, or uint8
codes with 0 for no-data: ``data_pipeline.quantise``); decoding to dB, normalisation and masking
happen here, inside the jitted step, where they are nearly free (one fused elementwise pass).
Invalid values become 0 (the mean after normalisation) and are flagged so losses and metrics can
leave them out.

Decoding follows the *data's* storage form, normalisation the *model's* statistics: a model
trained on one form takes data stored in the other (``schema.InputContract.differences``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import quantise


def decode(images: jax.Array, storage: quantise.StorageForm = quantise.FLOAT16) -> jax.Array:
  """Stored images (..., C) -> float32 dB, NaN = no-data."""
  return storage.decode(images, jnp)


def normalise(images: jax.Array, mean: np.ndarray, std: np.ndarray,
              storage: quantise.StorageForm = quantise.FLOAT16):
  """(B, H, W, C) stored images -> (z-scored float32 with no-data = 0, valid bool (B, H, W, C)).

  ``storage``: the form the images are stored in (float16 dB by default; a float32 dB input
  passes as well).
  """
  images = decode(images, storage)
  valid = jnp.isfinite(images)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  normalised = jnp.where(valid, (images - mean) / std, 0.0)
  return normalised, valid


def denormalise(images: jax.Array, mean: np.ndarray, std: np.ndarray) -> jax.Array:
  """The inverse of :func:`normalise` on valid values (back to dB)."""
  return images * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)


def normalise_patches(images: jax.Array, patch_size: int, mean: np.ndarray, std: np.ndarray,
                      storage: quantise.StorageForm = quantise.FLOAT16):
  """(B, H, W, C) stored images -> patchified (normalised float32, valid bool), (B, L, p * p * C).

  Rearranges the compact input into patches first (a half or a quarter of the bytes of float32),
  then decodes and normalises in patch layout, where the channel is still the fastest-varying
  axis.
  """
  from mae_jax.models import mae  # pylint: disable=g-import-not-at-top
  channels = images.shape[-1]
  patches = mae.patchify(images, patch_size)
  grouped = patches.reshape(*patches.shape[:-1], -1, channels)
  normalised, valid = normalise(grouped, mean, std, storage)
  return normalised.reshape(patches.shape), valid.reshape(patches.shape)
