"""Per-tile labels from GeoTIFFs: MODIS VCF percent tree cover and ESA WorldCover classes.

Two downstream targets, as the poster's authors defined them in their released code:

* :func:`vcf_tile_mean`: one number per tile, the area-weighted mean of MOD44B
  ``Percent_Tree_Cover`` (or one of the other two VCF percentage bands) over the valid 250 m VCF
  cells that cover the tile. 200 (water) counts as 0 % tree cover, as the authors did; 253 (fill),
  NaN and anything else outside 0..100 are missing. Too little valid area gives
  ``schema.VCF_MISSING`` (NaN) instead of a mean over a sliver of the tile.
* :func:`worldcover_tile`: a (H, W) uint8 map of class indices 0..10 (``schema.IGNORE_INDEX`` for
  no data) on the tile's own grid, read through a nearest-neighbour ``WarpedVRT`` so only the
  source blocks under the tile are decoded, never the whole 36000 x 36000 product tile.

:func:`check_same_crs` is for callers that need a label raster and an image in one CRS; every
error names the file(s) involved. Unreadable rasters raise :class:`RasterReadError`.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Sequence

import numpy as np
import rasterio
import rasterio.crs
import rasterio.errors
import rasterio.io
import rasterio.warp
import rasterio.windows
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from data_pipeline import schema

# --- Errors and opening ----------------------------------------------------------------------


class RasterReadError(OSError):
  """A raster file exists but GDAL cannot read it (corrupt, truncated, not a raster)."""


@contextlib.contextmanager
def open_raster(path) -> Iterator[rasterio.io.DatasetReader]:
  """Opens a raster for reading; errors raised while it is open name the file.

  A missing local file raises FileNotFoundError; GDAL failures on open or on any read inside the
  ``with`` block (rasterio's RasterioIOError and friends, e.g. a truncated GeoTIFF whose header
  survived but whose strips did not) raise :class:`RasterReadError` with the path in the message.

  Args:
    path: Local path or GDAL path (``/vsi...`` or a URL are passed through unchecked).

  Yields:
    The open rasterio dataset.
  """
  path = os.fspath(path)
  # Local files get a plain FileNotFoundError; GDAL's own message for them is a generic
  # "No such file or directory" RasterioIOError that is easy to mistake for corruption.
  if not path.startswith('/vsi') and '://' not in path and not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file')
  try:
    with rasterio.open(path) as dataset:
      yield dataset
  except rasterio.errors.RasterioError as error:
    # rasterio's read errors say "See previous exception"; GDAL's reason is in the cause.
    detail = f'{error}' + (f': {error.__cause__}' if error.__cause__ is not None else '')
    raise RasterReadError(f'{path}: cannot read raster ({detail})') from error


def check_same_crs(path_a, path_b) -> rasterio.crs.CRS:
  """Checks that two rasters share one CRS and returns it.

  Args:
    path_a: First raster (e.g. a label GeoTIFF).
    path_b: Second raster (e.g. the image it labels).

  Returns:
    The common CRS.

  Raises:
    ValueError: Naming both files and both CRSs when they differ, or the file without a CRS.
    FileNotFoundError, RasterReadError: As :func:`open_raster`.
  """
  crss = []
  for path in (path_a, path_b):
    with open_raster(path) as dataset:
      if dataset.crs is None:
        raise ValueError(f'{os.fspath(path)}: raster has no CRS, cannot compare it with '
                         f'{os.fspath(path_b if path is path_a else path_a)}')
      crss.append(dataset.crs)
  if crss[0] != crss[1]:
    raise ValueError(f'CRS mismatch: {os.fspath(path_a)} is in {crss[0].to_string()} but '
                     f'{os.fspath(path_b)} is in {crss[1].to_string()}; reproject one of them '
                     'first (e.g. worldcover_tile reads a label onto an image grid)')
  return crss[0]


# --- MODIS VCF -------------------------------------------------------------------------------

VCF_BANDS = ('Percent_Tree_Cover', 'Percent_NonTree_Vegetation', 'Percent_NonVegetated')
# 1-based band index of each VCF percentage band when a GeoTIFF has no band descriptions: the
# order of MOD44B's science data sets (and of Earth Engine's MODIS/006/MOD44B bands).
VCF_BAND_INDEX = {name: index for index, name in enumerate(VCF_BANDS, start=1)}
VCF_WATER = 200
VCF_FILL = 253
VCF_VALID_RANGE = (0.0, 100.0)
# Sample points per side for the sub-grid weighting (see vcf_tile_mean). 256 x 256 points over a
# 4.48 km tile are 17.5 m apart, so each ~232 m VCF cell gets ~13 x 13 points and an edge cell's
# weight is off by at most half a point row: < 4 % of that cell, < 0.2 % of the tile.
DEFAULT_SUBGRID = 256


def vcf_tile_mean(source, tile_bounds: Sequence[float], tile_crs,
                  band: str | int = 'Percent_Tree_Cover', min_valid_fraction: float = 0.5, *,
                  year: int | None = None, water_value: float | None = 0.0,
                  method: str = 'auto', subgrid: int = DEFAULT_SUBGRID,
                  return_valid_fraction: bool = False):
  """Area-weighted mean of a MODIS VCF band over one tile.

  Pixel values: 0..100 are percentages; 200 (water) becomes ``water_value`` (0 by default: open
  water has no trees, as in the authors' loader; for ``Percent_NonVegetated`` 100 is the
  physical value, None makes water missing); 253 (fill), NaN and any other value are missing. A
  nodata value declared by the file is honoured when it lies outside 0..100 (e.g. 253 or 255); one
  inside 0..100 is ignored, since it would turn real 0 % cells into gaps. Unlike the authors'
  loader, which set NaN to 0 % and did not handle 253, missing cells are left out of the mean.

  Weighting: each VCF cell weighs the area it shares with the tile.

  * ``'exact'``: the overlap of every cell rectangle with the tile rectangle, computed in closed
    form (product of the x and y overlaps). Exact when the tile and the raster share a CRS. With
    different CRSs the tile is replaced by the bounding box of its reprojected outline
    (``rasterio.warp.transform_bounds``), which is slightly larger than the true footprint.
  * ``'subgrid'``: ``subgrid x subgrid`` points evenly spaced over the tile in the tile's CRS, each
    projected into the raster's CRS and assigned to the cell it falls in; a cell weighs the
    number of its points. It follows the true (curved, rotated) footprint when CRSs differ, e.g.
    an EPSG:4326 chip over the MODIS sinusoidal grid. Equal point weights are equal areas for a
    projected tile CRS; for an EPSG:4326 tile they vary with cos(latitude), by about
    tan(latitude) x the tile's latitude span in radians (7e-4 for a 4.5 km chip at 45 degrees),
    which is ignored. The same holds for 'exact' areas measured in degrees.
  * ``'auto'`` (default): ``'exact'`` when the CRSs are equal, else ``'subgrid'``.

  Parts of the tile outside the raster count as missing area.

  Args:
    source: A GeoTIFF path, or ``(array, transform)`` / ``(array, transform, crs)`` with a 2-D
      array of VCF values and its affine transform (crs None or absent: the tile's CRS).
    tile_bounds: (left, bottom, right, top) of the tile in ``tile_crs``.
    tile_crs: CRS of the tile, anything ``rasterio.crs.CRS.from_user_input`` accepts.
    band: For a path: a VCF band name (:data:`VCF_BANDS`) or a 1-based band index. Names are
      looked up in the band descriptions, where ``<band>_<year>`` also matches (the authors'
      ``modis44b006veg`` chips hold ``Percent_Tree_Cover_2020`` etc.); without descriptions the
      name maps to :data:`VCF_BAND_INDEX`. Ignored for an array.
    min_valid_fraction: Smallest valid share of the tile's area for a mean; below it the result
      is ``schema.VCF_MISSING`` (NaN).
    year: Picks ``<band>_<year>`` when the descriptions list several years.
    water_value: Value given to water (200) cells; None makes them missing.
    method: 'auto', 'exact' or 'subgrid' (see above).
    subgrid: Points per tile side for 'subgrid'.
    return_valid_fraction: Also return the valid area fraction.

  Returns:
    The mean as a Python float (NaN when too little is valid), or ``(mean, valid_fraction)``.

  Raises:
    ValueError: Bad arguments, a rotated raster, a band that is not found (naming the file and
      its band descriptions) or a raster without a CRS.
    FileNotFoundError, RasterReadError: For an unreadable path (see :func:`open_raster`).
  """
  if method not in ('auto', 'exact', 'subgrid'):
    raise ValueError(f"method must be 'auto', 'exact' or 'subgrid', got {method!r}")
  if not 0.0 <= min_valid_fraction <= 1.0:
    raise ValueError(f'min_valid_fraction must lie in [0, 1], got {min_valid_fraction}')
  if isinstance(subgrid, bool) or not isinstance(subgrid, (int, np.integer)) or subgrid < 1:
    raise ValueError(f'subgrid must be a positive integer, got {subgrid!r}')
  tile_bounds = check_bounds(tile_bounds, 'tile_bounds')
  tile_crs = rasterio.crs.CRS.from_user_input(tile_crs)

  if isinstance(source, (tuple, list)):
    values, transform, crs = _vcf_from_array(source, tile_crs)
    nodata = None
    same_crs = crs == tile_crs
    if method == 'auto':
      method = 'exact' if same_crs else 'subgrid'
    region = tile_bounds if same_crs else _reproject_bounds(tile_bounds, tile_crs, crs)
  else:
    name = os.fspath(source)
    with open_raster(name) as dataset:
      if dataset.crs is None:
        raise ValueError(f'{name}: raster has no CRS')
      crs = dataset.crs
      _check_rectilinear(dataset.transform, name)
      index = _vcf_band_index(dataset, band, year, name)
      same_crs = crs == tile_crs
      if method == 'auto':
        method = 'exact' if same_crs else 'subgrid'
      region = tile_bounds if same_crs else _reproject_bounds(tile_bounds, tile_crs, crs)
      window = _covering_window(region, dataset.transform, dataset.height, dataset.width)
      nodata = dataset.nodatavals[index - 1]
      if window is None:
        values = np.zeros((0, 0), np.float64)
        transform = dataset.transform
      else:
        values = dataset.read(index, window=window)
        transform = dataset.window_transform(window)

  vcf, valid = _vcf_values(values, water_value, nodata)
  if method == 'exact':
    weights = _overlap_weights(transform, vcf.shape, region)
    total = (region[2] - region[0]) * (region[3] - region[1])
  else:
    weights = _subgrid_weights(transform, vcf.shape, tile_bounds, tile_crs, crs, subgrid,
                               same_crs)
    total = float(subgrid * subgrid)
  valid_weight = float(weights[valid].sum()) if vcf.size else 0.0
  fraction = valid_weight / total if total > 0 else 0.0
  if valid_weight <= 0 or fraction < min_valid_fraction:
    mean = schema.VCF_MISSING
  else:
    mean = float(np.sum(weights[valid] * vcf[valid]) / valid_weight)
  if return_valid_fraction:
    return mean, fraction
  return mean


def _vcf_from_array(source, tile_crs):
  """(values, transform, crs) of an in-memory VCF raster."""
  if len(source) == 2:
    array, transform = source
    crs = None
  elif len(source) == 3:
    array, transform, crs = source
  else:
    raise ValueError('an in-memory VCF source is (array, transform) or (array, transform, crs), '
                     f'got {len(source)} items')
  array = np.asarray(array)
  if array.ndim != 2:
    raise ValueError(f'an in-memory VCF array must be 2-D, got shape {array.shape}')
  if not isinstance(transform, Affine):
    raise ValueError(f'transform must be an affine.Affine, got {type(transform).__name__}')
  _check_rectilinear(transform, 'in-memory VCF array')
  crs = tile_crs if crs is None else rasterio.crs.CRS.from_user_input(crs)
  return array, transform, crs


def _vcf_band_index(dataset, band, year, name) -> int:
  """1-based index of the requested VCF band in an open dataset."""
  if isinstance(band, (int, np.integer)) and not isinstance(band, bool):
    if not 1 <= band <= dataset.count:
      raise ValueError(f'{name}: band {band} out of range, the file has {dataset.count} bands')
    return int(band)
  if not isinstance(band, str):
    raise ValueError(f'band must be a VCF band name or a 1-based index, got {band!r}')
  descriptions = [d or '' for d in dataset.descriptions]
  if not any(descriptions):
    if band not in VCF_BAND_INDEX:
      raise ValueError(f'{name}: no band descriptions to look up {band!r}; known VCF bands '
                       f'{VCF_BANDS}, or pass a 1-based index')
    index = VCF_BAND_INDEX[band]
    if index > dataset.count:
      raise ValueError(f'{name}: has {dataset.count} bands and no band descriptions, so '
                       f'{band!r} (band {index}) cannot be found')
    return index
  matches = []
  for i, description in enumerate(descriptions, start=1):
    if year is not None:
      if description == f'{band}_{year}':
        matches.append(i)
    elif description == band:
      matches.append(i)
    elif description.startswith(band + '_') and description[len(band) + 1:].isdigit():
      # <band>_<year>; suffixes like Percent_Tree_Cover_SD (a standard deviation) do not match.
      matches.append(i)
  if not matches:
    what = f'{band!r}' + (f' for year {year}' if year is not None else '')
    raise ValueError(f'{name}: no band {what}; band descriptions are {descriptions}')
  if len(matches) > 1:
    found = [descriptions[i - 1] for i in matches]
    raise ValueError(f'{name}: several bands match {band!r}: {found}; pass year=')
  return matches[0]


def _vcf_values(values, water_value, nodata) -> tuple[np.ndarray, np.ndarray]:
  """VCF values as float64 with water replaced, and the mask of valid cells."""
  vcf = np.asarray(values, dtype=np.float64).copy()
  low, high = VCF_VALID_RANGE
  with np.errstate(invalid='ignore'):
    valid = np.isfinite(vcf) & (vcf >= low) & (vcf <= high)
  if nodata is not None and np.isfinite(nodata) and not low <= nodata <= high:
    valid &= vcf != nodata
  water = vcf == VCF_WATER
  if water_value is not None:
    vcf[water] = float(water_value)
    valid |= water
  # Missing cells get 0 so that a weight of 0 times them is 0, never NaN.
  vcf[~valid] = 0.0
  return vcf, valid


def _overlap_weights(transform: Affine, shape, region) -> np.ndarray:
  """Area of each cell rectangle inside the region rectangle (left, bottom, right, top)."""
  rows, cols = shape
  if rows == 0 or cols == 0:
    return np.zeros(shape, np.float64)
  left, bottom, right, top = region
  x_edges = transform.c + transform.a * np.arange(cols + 1, dtype=np.float64)
  y_edges = transform.f + transform.e * np.arange(rows + 1, dtype=np.float64)
  x_overlap = _interval_overlap(x_edges, left, right)
  y_overlap = _interval_overlap(y_edges, bottom, top)
  return y_overlap[:, None] * x_overlap[None, :]


def _interval_overlap(edges: np.ndarray, low: float, high: float) -> np.ndarray:
  """Length of [edges[i], edges[i+1]] (either direction) inside [low, high]."""
  start = np.minimum(edges[:-1], edges[1:])
  end = np.maximum(edges[:-1], edges[1:])
  return np.clip(np.minimum(end, high) - np.maximum(start, low), 0.0, None)


def _subgrid_weights(transform: Affine, shape, tile_bounds, tile_crs, crs, subgrid: int,
                     same_crs: bool) -> np.ndarray:
  """Number of tile sample points (subgrid x subgrid, in the tile's CRS) in each cell."""
  weights = np.zeros(shape, np.float64)
  rows, cols = shape
  if rows == 0 or cols == 0:
    return weights
  left, bottom, right, top = tile_bounds
  steps = (np.arange(subgrid, dtype=np.float64) + 0.5) / subgrid
  xs, ys = np.meshgrid(left + steps * (right - left), top - steps * (top - bottom))
  xs, ys = xs.ravel(), ys.ravel()
  if not same_crs:
    xs, ys = rasterio.warp.transform(tile_crs, crs, xs, ys)
    xs, ys = np.asarray(xs), np.asarray(ys)
  inverse = ~transform
  col_f, row_f = inverse @ (xs, ys)
  col = np.floor(col_f).astype(np.int64)
  row = np.floor(row_f).astype(np.int64)
  inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
  np.add.at(weights, (row[inside], col[inside]), 1.0)
  return weights


# --- ESA WorldCover --------------------------------------------------------------------------

# Warp approximation error (source pixels) small enough that GDAL's approximate transformer falls
# back to transforming every pixel exactly. Not 0: rasterio 1.4.4 fails to build a WarpedVRT with
# tolerance=0 ("Pointer 'hDS' is NULL in 'GDALSetProjection'").
EXACT_TOLERANCE = 1e-9


def worldcover_tile(path, tile_transform: Affine, tile_crs, tile_shape: Sequence[int], *,
                    tolerance: float = EXACT_TOLERANCE) -> np.ndarray:
  """ESA WorldCover class indices on a tile's grid.

  The product tile is read through a ``WarpedVRT`` defined on the tile grid with nearest
  resampling: GDAL maps every tile pixel centre into the source and decodes only the source
  blocks under the tile. Tile pixels outside the source raster and source pixels with code 0 (or
  the file's declared nodata) become ``schema.IGNORE_INDEX``; codes 10..100 map to 0..10 through
  ``schema.worldcover_codes_to_indices``.

  Args:
    path: WorldCover GeoTIFF (e.g. ``ESA_WorldCover_10m_2020_v100_N00E006_Map.tif``) or the
      authors' ``esaworldcover-2020/<identifier>.tif`` chip.
    tile_transform: Affine transform of the tile grid.
    tile_crs: CRS of the tile grid.
    tile_shape: (height, width) of the tile in pixels.
    tolerance: GDAL's approximation error of the warp transform, in source pixels. The default
      (:data:`EXACT_TOLERANCE`) makes GDAL transform every pixel centre exactly, so a label equals
      a nearest-neighbour lookup; GDAL's own default of 0.125 is faster but can move class edges
      by a pixel.

  Returns:
    uint8 array of shape ``tile_shape``, values 0..10 or 255.

  Raises:
    ValueError: Bad tile shape or transform, or a source without a CRS.
    FileNotFoundError, RasterReadError: For an unreadable path.
  """
  height, width = _check_shape(tile_shape)
  if not isinstance(tile_transform, Affine):
    raise ValueError(f'tile_transform must be an affine.Affine, got {type(tile_transform)}')
  tile_crs = rasterio.crs.CRS.from_user_input(tile_crs)
  name = os.fspath(path)
  with open_raster(name) as dataset:
    if dataset.crs is None:
      raise ValueError(f'{name}: raster has no CRS')
    source_nodata = dataset.nodata
    if source_nodata is None:
      source_nodata = schema.WORLDCOVER_NODATA_CODE
    with WarpedVRT(dataset, crs=tile_crs, transform=tile_transform, width=width, height=height,
                   resampling=Resampling.nearest, src_nodata=source_nodata,
                   nodata=schema.WORLDCOVER_NODATA_CODE, tolerance=tolerance) as vrt:
      codes = vrt.read(1)
  # A declared nodata other than 0 arrives as 0 through the VRT; code 0 is no data either way.
  return schema.worldcover_codes_to_indices(codes)


# --- Helpers ---------------------------------------------------------------------------------


def check_bounds(bounds, what: str = 'bounds', hint: str = '') -> tuple[float, float, float, float]:
  """(left, bottom, right, top) as finite floats with left < right and bottom < top."""
  try:
    left, bottom, right, top = (float(v) for v in bounds)
  except (TypeError, ValueError):
    raise ValueError(f'{what} must be (left, bottom, right, top), got {bounds!r}') from None
  if not all(math.isfinite(v) for v in (left, bottom, right, top)):
    raise ValueError(f'{what} must be finite, got {bounds!r}')
  if not (left < right and bottom < top):
    raise ValueError(f'{what} must have left < right and bottom < top, got {bounds!r}'
                     + (f' {hint}' if hint else ''))
  return left, bottom, right, top


def _check_shape(shape) -> tuple[int, int]:
  """(height, width) as positive ints."""
  try:
    height, width = (int(v) for v in shape)
  except (TypeError, ValueError):
    raise ValueError(f'tile_shape must be (height, width), got {shape!r}') from None
  if height < 1 or width < 1:
    raise ValueError(f'tile_shape must be positive, got {shape!r}')
  return height, width


def _check_rectilinear(transform: Affine, name: str) -> None:
  """Rejects rotated or sheared grids, whose cells are not axis-aligned rectangles."""
  if transform.b != 0 or transform.d != 0:
    raise ValueError(f'{name}: rotated or sheared raster grids are not supported '
                     f'(transform {tuple(transform)[:6]})')


def _reproject_bounds(bounds, src_crs, dst_crs) -> tuple[float, float, float, float]:
  """Bounding box, in dst_crs, of the densified outline of bounds in src_crs."""
  return tuple(rasterio.warp.transform_bounds(src_crs, dst_crs, *bounds, densify_pts=21))


def _covering_window(region, transform: Affine, height: int,
                     width: int) -> rasterio.windows.Window | None:
  """The whole-pixel window covering the region, clipped to the raster; None if disjoint."""
  window = rasterio.windows.from_bounds(*region, transform=transform)
  col_start = max(int(math.floor(window.col_off)), 0)
  row_start = max(int(math.floor(window.row_off)), 0)
  col_stop = min(int(math.ceil(window.col_off + window.width)), width)
  row_stop = min(int(math.ceil(window.row_off + window.height)), height)
  if col_stop <= col_start or row_stop <= row_start:
    return None
  return rasterio.windows.Window(col_start, row_start, col_stop - col_start,
                                 row_stop - row_start)

