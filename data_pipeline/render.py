"""Colour renderings of Sentinel-1 tiles and WorldCover labels as uint8 RGB arrays.

The SAR false colour is the usual composite: R = VV, G = VH, B = VV-VH of one season. Each
channel is stretched over a *fixed* dB range (:data:`DISPLAY_RANGES_DB`) rather than per-image
percentiles, so the same colour means the same backscatter in every tile and at every training
step. Used by dataset inspection (``data_pipeline.ingest.inspect``) and by training plots
(``mae_jax.plots``).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from data_pipeline import atomic
from data_pipeline import schema

# Display stretch per product, in dB: (value shown as 0, value shown as 255). Values outside are
# clipped. The ranges cover typical land backscatter: VV from water/smooth bare soil (-25) to
# forest and towns (0), VH about 5 dB lower, and the VV-VH ratio from surface (0) to volume (15)
# scattering.
DISPLAY_RANGES_DB = {
    'vv': (-25.0, 0.0),
    'vh': (-30.0, -5.0),
    'vv_minus_vh': (0.0, 15.0),
}
# Product shown in the red, green and blue channels.
RGB_PRODUCTS = ('vv', 'vh', 'vv_minus_vh')
# Pixels without data are black (training plots draw masked patches grey, so the two are never
# confused).
NODATA_RGB = (0, 0, 0)


def check_season(season: str) -> None:
  if season not in schema.SEASONS:
    raise ValueError(f'Unknown season {season!r}; expected one of {schema.SEASONS}')


def sar_false_colour(image_db: np.ndarray, season: str = 'summer') -> np.ndarray:
  """Renders one season of a dB tile as an RGB false-colour image.

  R = VV, G = VH, B = VV-VH of ``season``, each linearly mapped from its
  :data:`DISPLAY_RANGES_DB` range to 0..255 (clipped at the ends, rounded to nearest).

  Args:
    image_db: (..., H, W, 12) array in dB, project band order; NaN marks no data.
    season: One of ``schema.SEASONS``.

  Returns:
    (..., H, W, 3) uint8 array. A pixel where any of the three shown bands is NaN is black.

  Raises:
    ValueError: If the channel count is not 12 or the season is unknown.
  """
  check_season(season)
  image_db = np.asarray(image_db)
  if image_db.ndim < 3 or image_db.shape[-1] != schema.NUM_CHANNELS:
    raise ValueError(f'Expected (..., H, W, {schema.NUM_CHANNELS}) dB image, got shape '
                     f'{image_db.shape}')
  # float64 so the stretch of float16 inputs rounds the same way as the hand-computed values.
  bands = np.stack([image_db[..., schema.band_index(p, season)] for p in RGB_PRODUCTS],
                   axis=-1).astype(np.float64)
  low = np.array([DISPLAY_RANGES_DB[p][0] for p in RGB_PRODUCTS])
  high = np.array([DISPLAY_RANGES_DB[p][1] for p in RGB_PRODUCTS])
  nodata = np.isnan(bands).any(axis=-1)
  with np.errstate(invalid='ignore'):  # NaNs are handled through `nodata` below.
    scaled = np.clip((bands - low) / (high - low), 0.0, 1.0)
  rgb = np.rint(np.nan_to_num(scaled) * 255.0).astype(np.uint8)
  # A partly valid pixel would show a misleading hue, so no-data in any shown band blanks it all.
  rgb[nodata] = NODATA_RGB
  return rgb



def worldcover_colour(labels: np.ndarray) -> np.ndarray:
  """(..., H, W) class indices 0..10 (255 = no data) -> (..., H, W, 3) uint8 in ESA's colours."""
  palette = np.zeros((256, 3), np.uint8)
  palette[:schema.NUM_CLASSES] = schema.WORLDCOVER_COLORS
  palette[schema.IGNORE_INDEX] = NODATA_RGB
  return palette[np.asarray(labels, np.uint8)]


def write_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 image as PNG, atomically.

  See :func:`data_pipeline.atomic.write_bytes`: a reader never sees a half-written file. The
  directory must already exist; ``path`` may also be a gs:// URL.

  Args:
    path: Destination file.
    image: (H, W), (H, W, 3) or (H, W, 4) uint8 array.

  Raises:
    ValueError: If the image is not uint8 or has an unsupported shape.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'write_png needs a uint8 image, got {image.dtype}')
  if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
    raise ValueError(f'write_png needs (H, W), (H, W, 3) or (H, W, 4), got {image.shape}')
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image)).save(buffer, format='PNG')
  atomic.write_bytes(path, buffer.getvalue())
