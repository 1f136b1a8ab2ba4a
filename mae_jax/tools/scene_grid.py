"""Whether a scene's pixels are the model's, and the grid a scene is resampled onto if not.

The model learnt from tiles of square, north-up ``InputContract.pixel_size_m`` pixels
(``schema.PIXEL_SIZE_M``, 10 m) in a projected CRS in metres, the UTM zone of the area
(``data_pipeline.ingest.tiling``). Its features have that scale: a 20 m scene shows it every
field at half the size, and an EPSG:4326 one (Earth Engine's default export CRS) pixels that are
10 m north-south but less east-west. Such a scene is resampled onto the model's grid
(:func:`model_grid`) unless the caller refuses (``--noresample``):

* CRS: the scene's own when it is projected in metres, else (geographic, or projected in feet)
  the UTM zone of the scene's centre (``tiling.utm_crs``);
* pixels: the contract's size, north-up, the origin snapped outwards to a multiple of the pixel
  size and the extent covering the whole scene, as the dataset grid is made
  (``tiling.grid_for_bounds`` with 1 px tiles): a 20 m scene on a 20 m lattice becomes twice as
  many 10 m pixels on the same extent;
* values: :data:`RESAMPLING_NAME`, back to dB (:func:`warp_db`), after no-data is masked
  (``scene_reader``), so fill values stay out of every kernel. This is what the GeoTIFF
  ingestion does by default (``configs/data/geotiff.py``: bilinear, ``resample_in_linear_power``),
  so a resampled scene is made as the training tiles were. Power, not dB, is what may be
  averaged: GDAL widens the bilinear kernel by the scale when coarsening (a 5 m scene), so a
  10 m pixel is a weighted mean of the power under it, where a mean of dB would be biased low
  (Jensen's inequality); when refining (20 m -> 10 m) it interpolates, where power and dB differ
  little. VV-VH is resampled as the ratio VV / VH, its linear value. The weights are
  non-negative, so a resampled value never falls below the noise floor of the values it mixes;
* the map is written on this grid, the model's, not on the files': it is the grid the model
  predicted on, at the resolution it predicts at, and going back to the files' grid would be a
  second resampling (of classes, which have no bilinear). Any GIS reprojects it on the fly.

A pixel size within :data:`PIXEL_SIZE_TOLERANCE` of the contract's is the contract's. A scene
without a CRS cannot be checked; it is read as stored and a line says so.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import rasterio.crs
import rasterio.errors
import rasterio.warp
import rasterio.windows
from affine import Affine
from rasterio.enums import Resampling

from data_pipeline.ingest import composite
from data_pipeline.ingest import tiling

# Relative difference from the contract's pixel size that still counts as the same size (a
# 10.05 m pixel is a 0.5 % scale change, far below what the model can tell).
PIXEL_SIZE_TOLERANCE = 0.01
RESAMPLING = Resampling.bilinear
RESAMPLING_NAME = 'bilinear in linear power'
# Kernel radius of RESAMPLING in model pixels (GDAL widens it by the scale when coarsening).
KERNEL_RADIUS = 1.0
# The flag that turns resampling off, for messages.
NO_RESAMPLE_FLAG = '--noresample'


@dataclasses.dataclass(frozen=True)
class Grid:
  """A raster grid: CRS, pixel -> CRS transform and size."""
  crs: Any
  transform: Affine
  width: int
  height: int

  @property
  def bounds(self) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) around the four corners (also for rotated transforms)."""
    xs, ys = zip(*(self.transform * corner for corner in
                   ((0, 0), (self.width, 0), (0, self.height), (self.width, self.height))))
    return min(xs), min(ys), max(xs), max(ys)


def _in_metres(crs) -> bool:
  if not crs.is_projected:
    return False
  try:
    return crs.linear_units_factor[1] == 1.0
  except rasterio.errors.CRSError:
    return False


def _crs_name(crs) -> str:
  """'EPSG:4326', or the start of a CRS without an authority code."""
  name = crs.to_string()
  return name if len(name) <= 60 else name[:57] + '...'


def model_grid(files: Grid, pixel_size: float, resample: bool = True,
               name: str = 'the scene') -> tuple[Grid | None, str]:
  """(the grid to read a scene on the files' grid ``files`` on, or None when that is the
  model's grid (read as stored); the decision, one line).

  Raises:
    ValueError: The files' grid is not the model's and ``resample`` is False (naming
      :data:`NO_RESAMPLE_FLAG`).
  """
  crs = files.crs
  if crs is None:
    return None, (f'no CRS: pixel size and CRS not checked (the model takes {pixel_size:g} m '
                  'pixels in a projected CRS); read as stored')
  a, b, _, d, e, _ = tuple(files.transform)[:6]
  square = b == 0 and d == 0 and a > 0 and math.isclose(a, -e, rel_tol=1e-6)
  if _in_metres(crs):
    if square and math.isclose(a, pixel_size, rel_tol=PIXEL_SIZE_TOLERANCE):
      return None, f'pixel size {a:g} m, {_crs_name(crs)}: the model\'s grid'
    reason = (f'pixel size {a:g} m' if square else
              f'pixels of {math.hypot(a, d):g} x {math.hypot(b, e):g} m, not north-up squares')
    target_crs = crs
  else:
    kind = 'geographic' if crs.is_geographic else 'not projected in metres'
    reason = f'CRS {_crs_name(crs)} is {kind}'
    target_crs = None  # The UTM zone of the centre.
  if not resample:
    raise ValueError(f'{name}: {reason}, but the model takes {pixel_size:g} m pixels in a '
                     f'projected CRS and resampling is off ({NO_RESAMPLE_FLAG}): drop '
                     f'{NO_RESAMPLE_FLAG} to resample it ({RESAMPLING_NAME}), or resample it '
                     'yourself')
  grid = tiling.grid_for_bounds(files.bounds, crs, pixel_size, tile_size=1, crs=target_crs)
  target = Grid(grid.crs, grid.transform, grid.width, grid.height)
  onto = (f'{pixel_size:g} m' if target_crs is not None
          else f'{_crs_name(target.crs)}, {pixel_size:g} m')
  return target, f'{reason} -> resampled to {onto} ({RESAMPLING_NAME})'


def kernel_margin(scale: float) -> int:
  """Source pixels read around those under a window: the kernel's radius at ``scale`` source
  pixels per model pixel (at least 1), and one more for rounding."""
  return math.ceil(KERNEL_RADIUS * max(scale, 1.0)) + 1


def source_window(files: Grid, crs, transform: Affine, shape: tuple[int, int]):
  """The window of the files' grid to read for a window (``transform``, ``shape``) of a grid in
  ``crs``: the source pixels under it plus the kernel's margin, clipped; None if empty."""
  height, width = shape
  left, bottom, right, top = Grid(crs, transform, width, height).bounds
  if crs != files.crs:
    left, bottom, right, top = rasterio.warp.transform_bounds(crs, files.crs, left, bottom,
                                                              right, top, densify_pts=21)
  cols, rows = zip(*(~files.transform * corner for corner in
                     ((left, top), (right, top), (left, bottom), (right, bottom))))
  # Source pixels per window pixel: > 1 when coarsening, where GDAL widens the kernel.
  margin = kernel_margin(max((max(cols) - min(cols)) / width, (max(rows) - min(rows)) / height))
  col0, row0 = max(math.floor(min(cols)) - margin, 0), max(math.floor(min(rows)) - margin, 0)
  col1 = min(math.ceil(max(cols)) + margin, files.width)
  row1 = min(math.ceil(max(rows)) + margin, files.height)
  if col1 <= col0 or row1 <= row0:
    return None
  return rasterio.windows.Window(col0, row0, col1 - col0, row1 - row0)


def warp_db(values_db: np.ndarray, src_crs, src_transform: Affine, crs, transform: Affine,
            shape: tuple[int, int]) -> np.ndarray:
  """(bands, rows, cols) dB values (NaN = no-data) resampled (:data:`RESAMPLING_NAME`) onto
  the grid (``crs``, ``transform``, ``shape``): float32 dB, NaN where no valid source pixel
  reaches."""
  # float64: powers from -50 to +30 dB keep their precision through the kernel's sums.
  power = np.power(10.0, values_db.astype(np.float64) / 10.0)
  out = np.full((len(values_db),) + tuple(shape), np.nan, np.float64)
  rasterio.warp.reproject(power, out, src_transform=src_transform, src_crs=src_crs,
                          src_nodata=np.nan, dst_transform=transform, dst_crs=crs,
                          dst_nodata=np.nan, resampling=RESAMPLING, init_dest_nodata=True)
  return composite.linear_to_db(out)
