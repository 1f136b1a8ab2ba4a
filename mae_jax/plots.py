"""Pictures of Sentinel-1 tiles and MAE reconstructions, for logs, reports and eyeballing.

Everything here works on dB images in the project's band order (``data_pipeline/schema.py``) and
returns plain uint8 arrays, so callers can hand them to any logger or write them with
:func:`write_png`. The false colour is the usual SAR composite: R = VV, G = VH, B = VV-VH of one
season. Each channel is stretched over a *fixed* dB range (:data:`DISPLAY_RANGES_DB`) rather than
per-image percentiles, so the same colour means the same backscatter in every tile and at every
training step.
"""

from __future__ import annotations

import io

import matplotlib.figure
from matplotlib.backends import backend_agg
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
# Pixels without data are black; pixels hidden by the MAE mask are grey, as in He et al.'s
# figures, so the two are never confused.
NODATA_RGB = (0, 0, 0)
MASKED_RGB = (128, 128, 128)
COLUMN_TITLES = ('input', 'masked', 'reconstruction')


def _check_season(season: str) -> None:
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
  _check_season(season)
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


def _as_batch(name: str, array: np.ndarray) -> np.ndarray:
  array = np.asarray(array)
  if array.ndim == 3:  # A single tile is a batch of one.
    array = array[None]
  if array.ndim != 4 or array.shape[-1] != schema.NUM_CHANNELS:
    raise ValueError(f'{name} must be (N, H, W, {schema.NUM_CHANNELS}), got {array.shape}')
  return array


def reconstruction_figure(original_db: np.ndarray,
                          masked_db: np.ndarray,
                          reconstruction_db: np.ndarray,
                          season: str = 'summer',
                          *,
                          panel_inches: float = 2.0,
                          dpi: int = 100) -> np.ndarray:
  """Renders an input / masked / reconstruction grid, one tile per row.

  Args:
    original_db: (N, H, W, 12) input tiles in dB (NaN = no data).
    masked_db: Same shape; NaN where the MAE masked a patch. Pixels that are NaN in all channels
      here but have data in ``original_db`` are drawn grey; true no-data stays black.
    reconstruction_db: Same shape; the model's prediction with the visible patches pasted back.
    season: Season shown, one of ``schema.SEASONS``.
    panel_inches: Width and height of one panel in inches.
    dpi: Resolution of the rendered figure.

  Returns:
    (height, width, 3) uint8 RGB image of the whole figure.

  Raises:
    ValueError: On mismatched or malformed shapes, or an unknown season.
  """
  _check_season(season)
  original_db = _as_batch('original_db', original_db)
  masked_db = _as_batch('masked_db', masked_db)
  reconstruction_db = _as_batch('reconstruction_db', reconstruction_db)
  if not original_db.shape == masked_db.shape == reconstruction_db.shape:
    raise ValueError(f'Shapes differ: original {original_db.shape}, masked {masked_db.shape}, '
                     f'reconstruction {reconstruction_db.shape}')

  masked_rgb = sar_false_colour(masked_db, season)
  hidden = np.isnan(masked_db).all(axis=-1) & ~np.isnan(original_db).all(axis=-1)
  masked_rgb[hidden] = MASKED_RGB
  columns = (sar_false_colour(original_db, season), masked_rgb,
             sar_false_colour(reconstruction_db, season))

  num_rows = original_db.shape[0]
  # A bare Figure with its own Agg canvas: no pyplot, so no global backend switch and no figure
  # registry that could leak figures across calls in a long training run.
  figure = matplotlib.figure.Figure(figsize=(3 * panel_inches, num_rows * panel_inches + 0.3),
                                    dpi=dpi, facecolor='white')
  canvas = backend_agg.FigureCanvasAgg(figure)
  axes = figure.subplots(num_rows, 3, squeeze=False)
  for row in range(num_rows):
    for col, images in enumerate(columns):
      ax = axes[row, col]
      ax.imshow(images[row], interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title(f'{COLUMN_TITLES[col]} ({season})' if col == 0 else COLUMN_TITLES[col],
                     fontsize=9)
  figure.tight_layout(pad=0.3)
  canvas.draw()
  # Copy out of the canvas buffer so the array outlives the figure; drop the opaque alpha.
  rgb = np.array(canvas.buffer_rgba())[..., :3]
  figure.clear()
  return rgb


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
