"""The 10 m UTM tile grid, and reading any raster onto one tile of it.

Issue 3, "Grid and tiles": scenes are resampled to a 10 m grid in the UTM zone of the area, cut
into 448 x 448 tiles, and tiles with too little valid data are dropped and counted. This module
owns that geometry:

* :func:`utm_crs` picks the WGS 84 UTM zone (EPSG:326xx / 327xx) of a point.
* :func:`grid_for_bounds` builds a :class:`TileGrid` over an area: north-up, origin snapped to the
  pixel lattice (so neighbouring tiles and rasters share pixel edges), extent rounded up to whole
  tiles.
* :func:`tiles` cuts a grid into :class:`TileSpec` s (row-major), each with its transform, bounds,
  centre lon/lat and a deterministic id.
* :func:`read_on_tile` reads bands of a GeoTIFF onto one tile through a ``WarpedVRT`` (only the
  source blocks under the tile are decoded), with NaN wherever there is no data; optionally
  resampling backscatter in linear power rather than in dB.
* :func:`valid_fraction` and :func:`filter_tiles` apply the minimum-valid-fraction rule and count
  what was dropped and why.

Unreadable files raise ``labels.RasterReadError`` (through ``labels.open_raster``); every error
names the file.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Iterable, Sequence

import numpy as np
import rasterio
import rasterio.coords
import rasterio.crs
import rasterio.errors
import rasterio.transform
import rasterio.warp
import rasterio.windows
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from data_pipeline.ingest import labels
from data_pipeline import schema

DEFAULT_PIXEL_SIZE = schema.PIXEL_SIZE_M
DEFAULT_TILE_SIZE = 448
WGS84 = rasterio.crs.CRS.from_epsg(4326)
# Snapping tolerance, in pixels: bounds that come out of a reprojection a hair past a lattice line
# (373200.0000001) must not grow the grid by a whole pixel.
_SNAP_EPS = 1e-6
# Densification of bounds reprojections: curved edges between corners can bulge past the corners.
_DENSIFY_PTS = 21

# --- UTM zones -------------------------------------------------------------------------------


def utm_crs(lon: float, lat: float) -> rasterio.crs.CRS:
  """The WGS 84 UTM CRS whose zone contains a point.

  Zones are the regular 6-degree ones: zone = floor((lon + 180) / 6) + 1, EPSG 32600 + zone north
  of the equator and 32700 + zone south of it. Edge cases:

  * A longitude on a zone boundary belongs to the zone east of it (6.0 E is zone 32), except
    lon = 180, the east edge of zone 60, which stays in zone 60 (lon = -180 is zone 1).
  * Longitudes outside [-180, 180] are wrapped into it (190 -> -170).
  * lat = 0 counts as north (EPSG:326xx), where UTM northings start at 0.
  * The Norway (32V) and Svalbard (31X..37X) exceptions of the MGRS grid are not applied, and
    nothing switches to UPS near the poles (beyond 84 N / 80 S): the regular zone is returned,
    which only means more scale distortion there, not wrong coordinates.

  Args:
    lon: Longitude in degrees (WGS 84).
    lat: Latitude in degrees (WGS 84), in [-90, 90].

  Returns:
    The zone's CRS, e.g. EPSG:32633 for (13.3, 48.3).

  Raises:
    ValueError: A non-finite coordinate or a latitude outside [-90, 90].
  """
  lon, lat = float(lon), float(lat)
  if not (math.isfinite(lon) and math.isfinite(lat)):
    raise ValueError(f'utm_crs needs finite coordinates, got lon={lon}, lat={lat}')
  if not -90.0 <= lat <= 90.0:
    raise ValueError(f'latitude must lie in [-90, 90], got {lat}')
  if lon < -180.0 or lon > 180.0:
    lon = (lon + 180.0) % 360.0 - 180.0
  zone = min(int(math.floor((lon + 180.0) / 6.0)) + 1, 60)
  return rasterio.crs.CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


# --- Grid --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """A north-up raster grid in a projected CRS that tiles cut from.

  Attributes:
    crs: Projected CRS with metre units (a UTM zone from :func:`grid_for_bounds`).
    transform: North-up affine transform with square pixels, ``Affine(p, 0, x0, 0, -p, y0)``.
    width: Width in pixels.
    height: Height in pixels.
  """
  crs: rasterio.crs.CRS
  transform: Affine
  width: int
  height: int

  def __post_init__(self):
    object.__setattr__(self, 'crs', rasterio.crs.CRS.from_user_input(self.crs))
    _check_north_up(self.transform, 'TileGrid')
    for name in ('width', 'height'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f'TileGrid.{name} must be a positive integer, got {value!r}')
      object.__setattr__(self, name, int(value))

  @property
  def pixel_size(self) -> float:
    return float(self.transform.a)

  @property
  def bounds(self) -> rasterio.coords.BoundingBox:
    return rasterio.coords.BoundingBox(
        self.transform.c, self.transform.f - self.height * self.pixel_size,
        self.transform.c + self.width * self.pixel_size, self.transform.f)


def grid_for_bounds(bounds: Sequence[float], bounds_crs, pixel_size: float = DEFAULT_PIXEL_SIZE,
                    tile_size: int = DEFAULT_TILE_SIZE, crs=None) -> TileGrid:
  """A tile grid that covers an area with whole tiles.

  The grid's CRS is the UTM zone of the centre of ``bounds`` (see :func:`utm_crs`) unless ``crs``
  is given; an area that straddles zones is still gridded in one zone, so callers split
  continent-sized regions by zone. The bounds are reprojected into that CRS (densified outline, so
  the box contains the whole area), then:

  * the origin (top-left corner) is snapped outwards to the ``pixel_size`` lattice: x0 and y0 are
    multiples of the pixel size, so grids over neighbouring areas (and 10 m UTM products such as
    BigEarthNet or Sentinel-2) share pixel edges and need no resampling shift;
  * the extent is rounded UP to whole tiles, growing to the right and downwards from the origin.
    Edge tiles are kept, not dropped: where they stick out of the data they read as no-data (NaN)
    and are then judged by the valid-fraction rule (:func:`filter_tiles`) like any other tile.

  Args:
    bounds: (left, bottom, right, top) of the area in ``bounds_crs``; areas crossing the
      antimeridian (left > right in degrees) must be split first.
    bounds_crs: CRS of ``bounds``, anything ``rasterio.crs.CRS.from_user_input`` accepts.
    pixel_size: Pixel size in metres.
    tile_size: Tile side in pixels; width and height are multiples of it.
    crs: Grid CRS instead of the UTM zone; must be projected with metre units.

  Returns:
    The grid.

  Raises:
    ValueError: Bad bounds, sizes, or a CRS that is not projected in metres.
  """
  left, bottom, right, top = labels.check_bounds(
      bounds, 'bounds', hint='(split areas that cross the antimeridian)')
  pixel_size = float(pixel_size)
  if not (math.isfinite(pixel_size) and pixel_size > 0):
    raise ValueError(f'pixel_size must be positive, got {pixel_size}')
  tile_size = _check_tile_size(tile_size)
  bounds_crs = rasterio.crs.CRS.from_user_input(bounds_crs)
  if crs is None:
    lons, lats = rasterio.warp.transform(bounds_crs, WGS84, [(left + right) / 2],
                                         [(bottom + top) / 2])
    crs = utm_crs(lons[0], lats[0])
  crs = rasterio.crs.CRS.from_user_input(crs)
  # Pixel sizes are metres: a geographic grid "at 10 m" would be 10 degrees (the EPSG:4326
  # variant of this mistake is a common one).
  if not crs.is_projected or (crs.linear_units or '').lower() not in ('metre', 'meter', 'm'):
    raise ValueError(f'grid CRS must be projected with metre units, got {crs.to_string()}')
  if crs != bounds_crs:
    left, bottom, right, top = rasterio.warp.transform_bounds(
        bounds_crs, crs, left, bottom, right, top, densify_pts=_DENSIFY_PTS)
  x0 = math.floor(left / pixel_size + _SNAP_EPS) * pixel_size
  y0 = math.ceil(top / pixel_size - _SNAP_EPS) * pixel_size
  width = max(math.ceil((right - x0) / pixel_size - _SNAP_EPS), 1)
  height = max(math.ceil((y0 - bottom) / pixel_size - _SNAP_EPS), 1)
  width = math.ceil(width / tile_size) * tile_size
  height = math.ceil(height / tile_size) * tile_size
  return TileGrid(crs=crs, transform=Affine(pixel_size, 0.0, x0, 0.0, -pixel_size, y0),
                  width=width, height=height)


# --- Tiles -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileSpec:
  """One tile of a :class:`TileGrid`: where it is and what it is called.

  Attributes:
    row: Tile row in the grid (0 at the top).
    col: Tile column in the grid (0 at the left).
    transform: The tile's own north-up transform (origin = its top-left corner).
    crs: The grid's CRS.
    bounds: (left, bottom, right, top) in ``crs``.
    width: Width in pixels.
    height: Height in pixels.
    centre_lonlat: (lon, lat) of the tile centre in EPSG:4326.
    tile_id: ``f'{epsg}_{x0}_{y0}'`` with the top-left corner in CRS units, e.g.
      ``'32633_373200_5353200'``: the same area always gets the same id, whatever grid it was cut
      from, as long as the lattice is the same.
    region: One of ``schema.REGIONS``, or None until the caller assigns it.
    sources: The files the tile's pixels were read from, filled in by the caller
      (:meth:`with_sources`).
  """
  row: int
  col: int
  transform: Affine
  crs: rasterio.crs.CRS
  bounds: rasterio.coords.BoundingBox
  width: int
  height: int
  centre_lonlat: tuple[float, float]
  tile_id: str
  region: str | None = None
  sources: tuple[str, ...] = ()

  def __post_init__(self):
    if self.region is not None and self.region not in schema.REGIONS:
      raise ValueError(f'unknown region {self.region!r}; known regions {schema.REGIONS}')
    object.__setattr__(self, 'sources', tuple(os.fspath(s) for s in self.sources))

  @property
  def lon(self) -> float:
    return self.centre_lonlat[0]

  @property
  def lat(self) -> float:
    return self.centre_lonlat[1]

  @property
  def shape(self) -> tuple[int, int]:
    return self.height, self.width

  def with_sources(self, sources: Iterable) -> 'TileSpec':
    """A copy that records the files its pixels came from."""
    return dataclasses.replace(self, sources=tuple(sources))

  def metadata(self) -> dict:
    """JSON-ready record of the tile: id, centre, CRS, transform, bounds, region, sources."""
    return {
        'tile_id': self.tile_id,
        'row': self.row,
        'col': self.col,
        'lon': self.lon,
        'lat': self.lat,
        'crs': self.crs.to_string(),
        'transform': list(self.transform)[:6],
        'bounds': list(self.bounds),
        'width': self.width,
        'height': self.height,
        'region': self.region,
        'sources': list(self.sources),
    }


def tiles(grid: TileGrid, tile_size: int = DEFAULT_TILE_SIZE, *,
          region: str | None = None) -> list[TileSpec]:
  """Cuts a grid into tiles, row-major (left to right, then top to bottom).

  Args:
    grid: A grid whose width and height are multiples of ``tile_size``.
    tile_size: Tile side in pixels.
    region: Region recorded in every tile (one of ``schema.REGIONS``), or None.

  Returns:
    ``(grid.height // tile_size) * (grid.width // tile_size)`` tile specs.

  Raises:
    ValueError: The grid is not a whole number of tiles, or its CRS has no EPSG code (tile ids
      are built from it).
  """
  tile_size = _check_tile_size(tile_size)
  if grid.width % tile_size or grid.height % tile_size:
    raise ValueError(f'grid of {grid.width} x {grid.height} px is not a whole number of '
                     f'{tile_size} px tiles; build it with grid_for_bounds(tile_size=...)')
  epsg = grid.crs.to_epsg()
  if epsg is None:
    raise ValueError(f'tile ids need a CRS with an EPSG code, got {grid.crs.to_string()}')
  size = tile_size * grid.pixel_size
  rows, cols = grid.height // tile_size, grid.width // tile_size
  x0 = grid.transform.c + size * np.arange(cols, dtype=np.float64)
  y0 = grid.transform.f - size * np.arange(rows, dtype=np.float64)
  # All centres in one call: per-tile transforms are slow for country-sized grids.
  centre_x = np.tile(x0 + size / 2, rows)
  centre_y = np.repeat(y0 - size / 2, cols)
  lons, lats = rasterio.warp.transform(grid.crs, WGS84, centre_x, centre_y)
  specs = []
  for row in range(rows):
    for col in range(cols):
      left, top = float(x0[col]), float(y0[row])
      k = row * cols + col
      specs.append(TileSpec(
          row=row, col=col,
          transform=Affine(grid.pixel_size, 0.0, left, 0.0, -grid.pixel_size, top),
          crs=grid.crs,
          bounds=rasterio.coords.BoundingBox(left, top - size, left + size, top),
          width=tile_size, height=tile_size,
          centre_lonlat=(float(lons[k]), float(lats[k])),
          tile_id=f'{epsg}_{_coord_id(left)}_{_coord_id(top)}',
          region=region))
  return specs


def tile_for(transform: Affine, crs, tile_size: int, *, row: int = 0, col: int = 0,
             region: str | None = None) -> TileSpec:
  """The :class:`TileSpec` of one square tile given by its own transform (e.g. an exported patch).

  Its id is built as in :func:`tiles`, so a tile on the same lattice gets the same id whichever
  way it was cut.

  Raises:
    ValueError: A CRS without an EPSG code.
  """
  tile_size = _check_tile_size(tile_size)
  crs = rasterio.crs.CRS.from_user_input(crs)
  epsg = crs.to_epsg()
  if epsg is None:
    raise ValueError(f'tile ids need a CRS with an EPSG code, got {crs.to_string()}')
  xs, ys = zip(*(transform * corner for corner in
                 ((0, 0), (tile_size, 0), (0, tile_size), (tile_size, tile_size))))
  centre = transform * (tile_size / 2, tile_size / 2)
  lons, lats = rasterio.warp.transform(crs, WGS84, [centre[0]], [centre[1]])
  return TileSpec(row=row, col=col, transform=transform, crs=crs,
                  bounds=rasterio.coords.BoundingBox(min(xs), min(ys), max(xs), max(ys)),
                  width=tile_size, height=tile_size,
                  centre_lonlat=(float(lons[0]), float(lats[0])),
                  tile_id=f'{epsg}_{_coord_id(transform.c)}_{_coord_id(transform.f)}',
                  region=region)


def _coord_id(value: float) -> str:
  """A coordinate for a tile id: an integer on metre lattices, else 3 decimals with 'p'."""
  if float(value).is_integer():
    return str(int(value))
  return f'{value:.3f}'.replace('.', 'p')


# --- Reading onto a tile -----------------------------------------------------------------------

# Kernel radius of each resampling, in destination pixels. GDAL widens kernels by the
# downsampling factor, so the source margin read around a tile scales with it
# (see _source_window).
_KERNEL_RADIUS = {
    Resampling.nearest: 0.5, Resampling.bilinear: 1.0, Resampling.cubic: 2.0,
    Resampling.cubic_spline: 2.0, Resampling.lanczos: 3.0,
}
# Area-based methods (average, mode, min, max, med, q1, q3, sum, rms) use the pixel footprint.
_FOOTPRINT_RADIUS = 0.5


def read_on_tile(path, tile: TileSpec, resampling: str | Resampling = 'bilinear',
                 band_indexes: int | Sequence[int] | None = None, nodata: float | None = None,
                 in_linear_power: bool = False) -> np.ndarray:
  """Reads bands of a raster onto a tile's grid, NaN where there is no data.

  Default path: a ``WarpedVRT`` defined on the tile's grid (CRS, transform, size) is read, so
  GDAL maps each tile pixel centre into the source (exactly: ``labels.EXACT_TOLERANCE``) and
  decodes only the source blocks under the tile, never the whole raster. Reads are boundless:
  tile pixels outside the source are NaN. Source pixels equal to ``nodata`` (or, when it is
  None, the file's own nodata value) are NaN too and are left out of interpolation kernels. When
  the tile is on the same lattice as the source (same CRS, pixel edges aligned), 'nearest' and
  'bilinear' return the source pixels unchanged.

  Use 'bilinear' (or 'average' when coarsening) for backscatter and 'nearest' for class maps
  (the result is float32 either way, with NaN for no data; cast after checking it).

  ``in_linear_power=True`` (backscatter in dB only): averaging dB values underestimates the mean
  power (Jensen's inequality; -11.4 vs -7.3 dB for one composite of real Sentinel-1), so the source
  window under the tile plus a margin for the resampling kernel is read at native resolution,
  converted to linear power (10^(dB/10)), reprojected onto the tile with
  ``rasterio.warp.reproject`` from that in-memory array, and converted back (10 log10). Kernels
  that overshoot (cubic, lanczos) can produce power <= 0, which has no dB value and becomes NaN.
  Across CRSs this path uses GDAL's default approximate transformer (at most 1/8 source pixel
  off); within one CRS the mapping is affine and exact.

  A tile that does not intersect the source at all is not an error: it returns all-NaN bands,
  which the valid-fraction rule (:func:`filter_tiles`) then drops, so one loop can read every
  tile of a grid from every candidate scene.

  Args:
    path: GeoTIFF (or any GDAL raster) with a CRS.
    tile: Where to read.
    resampling: A ``rasterio.enums.Resampling`` member or its name.
    band_indexes: 1-based band index or indexes; None reads all bands.
    nodata: Source value meaning no data, overriding the file's (e.g. 0 for Earth Engine's
      default fill, -99 for GAMMA/pyroSAR products).
    in_linear_power: Resample dB values in linear power (see above).

  Returns:
    float32 array of shape (bands, tile.height, tile.width).

  Raises:
    ValueError: Bad arguments, a band index out of range, or a source without a CRS; each names
      the file.
    FileNotFoundError, labels.RasterReadError: Missing, unreadable or truncated file.
  """
  if not isinstance(tile, TileSpec):
    raise TypeError(f'tile must be a TileSpec, got {type(tile).__name__}')
  resampling = _resampling(resampling)
  name = os.fspath(path)
  with labels.open_raster(name) as dataset:
    if dataset.crs is None:
      raise ValueError(f'{name}: raster has no CRS, cannot place it on a tile (GCP-only rasters '
                       'such as raw SAFE GRD TIFFs are not map rasters)')
    indexes = _band_indexes(band_indexes, dataset.count, name)
    src_nodata = dataset.nodata if nodata is None else float(nodata)
    if not _intersects(dataset, tile):
      return np.full((len(indexes), tile.height, tile.width), np.nan, np.float32)
    if in_linear_power:
      return _read_linear_power(dataset, name, tile, indexes, src_nodata, resampling)
    options = {} if src_nodata is None else {'src_nodata': src_nodata}
    with WarpedVRT(dataset, crs=tile.crs, transform=tile.transform, width=tile.width,
                   height=tile.height, resampling=resampling, nodata=np.nan, dtype='float32',
                   tolerance=labels.EXACT_TOLERANCE, **options) as vrt:
      return vrt.read(indexes)


def _read_linear_power(dataset, name: str, tile: TileSpec, indexes: list[int],
                       src_nodata: float | None, resampling: Resampling) -> np.ndarray:
  """read_on_tile's in_linear_power path: native window -> linear -> reproject -> dB."""
  if dataset.transform.b != 0 or dataset.transform.d != 0:
    raise ValueError(f'{name}: in_linear_power needs a north-up source, the transform is '
                     f'rotated ({tuple(dataset.transform)[:6]})')
  out = np.full((len(indexes), tile.height, tile.width), np.nan, np.float64)
  window = _source_window(dataset, tile, resampling)
  if window is None:
    return out.astype(np.float32)
  # float64 so that powers from -50 to +30 dB keep their precision through the resampling sums.
  values = dataset.read(indexes, window=window, out_dtype=np.float64)
  if src_nodata is not None:
    values[values == src_nodata] = np.nan
  power = np.power(10.0, values / 10.0)
  rasterio.warp.reproject(
      power, out, src_transform=dataset.window_transform(window), src_crs=dataset.crs,
      src_nodata=np.nan, dst_transform=tile.transform, dst_crs=tile.crs, dst_nodata=np.nan,
      resampling=resampling, init_dest_nodata=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    decibels = np.where(out > 0, 10.0 * np.log10(out), np.nan)
  return decibels.astype(np.float32)


def _source_window(dataset, tile: TileSpec, resampling: Resampling):
  """Whole-pixel source window under the tile plus the kernel margin, clipped; None if empty."""
  region = _bounds_in(tile, dataset.crs)
  window = rasterio.windows.from_bounds(*region, transform=dataset.transform)
  # Source pixels per tile pixel: > 1 when coarsening, where GDAL widens the kernel to match.
  scale = max(window.width / tile.width, window.height / tile.height, 1.0)
  radius = _KERNEL_RADIUS.get(resampling, _FOOTPRINT_RADIUS)
  margin = int(math.ceil(radius * scale)) + 1
  col_start = max(int(math.floor(window.col_off)) - margin, 0)
  row_start = max(int(math.floor(window.row_off)) - margin, 0)
  col_stop = min(int(math.ceil(window.col_off + window.width)) + margin, dataset.width)
  row_stop = min(int(math.ceil(window.row_off + window.height)) + margin, dataset.height)
  if col_stop <= col_start or row_stop <= row_start:
    return None
  return rasterio.windows.Window(col_start, row_start, col_stop - col_start,
                                 row_stop - row_start)


def _intersects(dataset, tile: TileSpec) -> bool:
  """Whether the tile's footprint can touch the source's extent (False means all-NaN)."""
  try:
    left, bottom, right, top = _bounds_in(tile, dataset.crs)
  except (rasterio.errors.RasterioError, ValueError):
    # The tile cannot be expressed in the source CRS (e.g. far outside its projection's
    # domain): let GDAL decide pixel by pixel rather than guess.
    return True
  if not all(math.isfinite(v) for v in (left, bottom, right, top)):
    return True
  source = rasterio.coords.BoundingBox(*rasterio.transform.array_bounds(
      dataset.height, dataset.width, dataset.transform)[:4])
  # array_bounds returns (west, south, east, north) for any axis direction.
  return left < source.right and right > source.left and bottom < source.top and top > source.bottom


def _bounds_in(tile: TileSpec, crs) -> tuple[float, float, float, float]:
  """The tile's bounds in another CRS (bounding box of its densified outline)."""
  if tile.crs == crs:
    return tuple(tile.bounds)
  return tuple(rasterio.warp.transform_bounds(tile.crs, crs, *tile.bounds,
                                              densify_pts=_DENSIFY_PTS))


def _resampling(resampling) -> Resampling:
  if isinstance(resampling, Resampling):
    return resampling
  try:
    return Resampling[str(resampling)]
  except KeyError:
    raise ValueError(f'unknown resampling {resampling!r}; one of '
                     f'{[r.name for r in Resampling]}') from None


def _band_indexes(band_indexes, count: int, name: str) -> list[int]:
  """1-based band indexes as a list, checked against the file's band count."""
  if band_indexes is None:
    return list(range(1, count + 1))
  if isinstance(band_indexes, (int, np.integer)) and not isinstance(band_indexes, bool):
    band_indexes = [band_indexes]
  indexes = [int(i) for i in band_indexes]
  if not indexes:
    raise ValueError(f'{name}: band_indexes is empty')
  bad = [i for i in indexes if not 1 <= i <= count]
  if bad:
    raise ValueError(f'{name}: band index(es) {bad} out of range, the file has {count} bands '
                     '(indexes are 1-based)')
  return indexes


# --- Valid fraction ----------------------------------------------------------------------------

DROP_EMPTY = 'empty'
DROP_LOW_VALID = 'below_min_valid_fraction'
KEPT = 'kept'


def valid_fraction(image: np.ndarray, channel_axis: int = 0) -> float:
  """Fraction of pixels that are finite in every channel.

  Args:
    image: (C, H, W) as :func:`read_on_tile` returns (or (H, W, C) with ``channel_axis=-1``, the
      stored tile layout), or a single-channel (H, W) array.
    channel_axis: Axis of the channels of a 3-D image.

  Returns:
    A float in [0, 1]; 0 for an image without pixels.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    finite = np.isfinite(image)
  elif image.ndim == 3:
    finite = np.isfinite(image).all(axis=channel_axis)
  else:
    raise ValueError(f'image must be 2-D or 3-D, got shape {image.shape}')
  return float(finite.mean()) if finite.size else 0.0


def filter_tiles(specs_and_images: Iterable[tuple[TileSpec, np.ndarray]],
                 min_valid_fraction: float, channel_axis: int = 0):
  """Keeps tiles with enough valid pixels and counts the rest by reason.

  A tile with no valid pixel at all (outside every source, or all no-data) is always dropped as
  ``'empty'``, even with ``min_valid_fraction=0``; otherwise it is kept when
  ``valid_fraction >= min_valid_fraction`` and dropped as ``'below_min_valid_fraction'`` if not.

  Args:
    specs_and_images: (tile spec, image) pairs; images as for :func:`valid_fraction`.
    min_valid_fraction: Threshold in [0, 1].
    channel_axis: Channel axis of the images.

  Returns:
    ``(kept, counts)``: the kept (spec, image) pairs in input order, and a dict with the number
    of tiles ``'kept'``, ``'empty'`` and ``'below_min_valid_fraction'`` (all keys present).
  """
  min_valid_fraction = float(min_valid_fraction)
  if not 0.0 <= min_valid_fraction <= 1.0:
    raise ValueError(f'min_valid_fraction must lie in [0, 1], got {min_valid_fraction}')
  counts = collections.Counter({KEPT: 0, DROP_EMPTY: 0, DROP_LOW_VALID: 0})
  kept = []
  for spec, image in specs_and_images:
    fraction = valid_fraction(image, channel_axis)
    if fraction == 0.0:
      counts[DROP_EMPTY] += 1
    elif fraction < min_valid_fraction:
      counts[DROP_LOW_VALID] += 1
    else:
      counts[KEPT] += 1
      kept.append((spec, image))
  return kept, dict(counts)


# --- Helpers -----------------------------------------------------------------------------------


def _check_tile_size(tile_size) -> int:
  if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
    raise ValueError(f'tile_size must be a positive integer, got {tile_size!r}')
  return int(tile_size)


def _check_north_up(transform, what: str) -> None:
  """Rejects transforms that are not north-up with square pixels."""
  if not isinstance(transform, Affine):
    raise ValueError(f'{what}.transform must be an affine.Affine, got {type(transform).__name__}')
  if transform.b != 0 or transform.d != 0 or transform.a <= 0 or transform.e != -transform.a:
    raise ValueError(f'{what}.transform must be north-up with square pixels '
                     f'(Affine(p, 0, x0, 0, -p, y0)), got {tuple(transform)[:6]}')
