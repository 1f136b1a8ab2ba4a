"""Pictures of Sentinel-1 tiles and MAE reconstructions, for logs, reports and eyeballing.

Everything here works on dB images in the project's band order (``data_pipeline/schema.py``) and
returns plain uint8 arrays, so callers can hand them to any logger or write them with
:func:`data_pipeline.render.write_png`. Tiles are drawn with ``data_pipeline.render.sar_false_colour`` (R = VV,
G = VH, B = VV-VH of one season, fixed dB stretch).
"""

from __future__ import annotations

import matplotlib.figure
from matplotlib.backends import backend_agg
import numpy as np

from data_pipeline import render
from data_pipeline import schema

# Pixels hidden by the MAE mask are grey, as in He et al.'s figures; no-data stays black.
MASKED_RGB = (128, 128, 128)
COLUMN_TITLES = ('input', 'masked', 'reconstruction')


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
  render.check_season(season)
  original_db = _as_batch('original_db', original_db)
  masked_db = _as_batch('masked_db', masked_db)
  reconstruction_db = _as_batch('reconstruction_db', reconstruction_db)
  if not original_db.shape == masked_db.shape == reconstruction_db.shape:
    raise ValueError(f'Shapes differ: original {original_db.shape}, masked {masked_db.shape}, '
                     f'reconstruction {reconstruction_db.shape}')

  masked_rgb = render.sar_false_colour(masked_db, season)
  hidden = np.isnan(masked_db).all(axis=-1) & ~np.isnan(original_db).all(axis=-1)
  masked_rgb[hidden] = MASKED_RGB
  columns = (render.sar_false_colour(original_db, season), masked_rgb,
             render.sar_false_colour(reconstruction_db, season))

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
