r"""Turns Sentinel-1 acquisitions into the model's input: one 12-band seasonal stack in dB.

  python -m data_pipeline.ingest.prepare --output stack.tif INPUT [INPUT ...] \
      [--year 2020] [--units auto|dB|linear] [--noresample] [--bounds W,S,E,N] [--overwrite]
  python -m mae_jax.tools.predict ... stack.tif     # or mae_jax.tools.embed

What ``mae_jax.tools.predict`` and ``mae_jax.tools.embed`` read is one GeoTIFF of the 12 channels
of ``schema.BAND_NAMES`` (VV-VH, VV, VH; winter, spring, summer, fall) in dB on a 10 m UTM grid:
what the dataset builder makes of GeoTIFF acquisitions, tile by tile. This command makes the same
thing for a whole scene, with the builder's own code, so that a stack made here equals the tiles
a dataset would hold of the same files:

* inputs (INPUT): single-band GeoTIFFs, one per acquisition and polarisation (ASF RTC, pyroSAR,
  BigEarthNet, Earth Engine exports...; date and polarisation from the file name, its folder's
  name or its tags: ``composite.Acquisition.from_file``), folders of them (``*.tif`` and
  ``*.tiff`` below them; files that are not VV or VH by name or tags, such as ASF's incidence
  angle and layover maps or HH / HV, are skipped and counted), or STAC: an item JSON, an item
  collection, or a local static catalog or collection JSON (every item below it), read with
  pystac. A STAC item's GeoTIFF data assets are its acquisitions: the polarisation from the
  asset key (``vv``, ``vh``), its ``sar:polarizations`` or its file name; the date from the
  item's datetime (or start_datetime). Other assets are skipped and counted. Asset hrefs that
  are URLs go to GDAL as they are (Planetary Computer's need signing first); nothing here
  fetches anything itself;
* the composite year (``--year``; by default the year with the most acquisition dates, ties to
  the later one): winter of year Y is December of Y-1 to February of Y (``composite.season_of``),
  and files of other years are left out and counted;
* units: dB or linear power, detected per file (``composite.detect_units``) or stated with
  ``--units``; stated units that a file's values clearly contradict are refused
  (``composite.decide_units``), since linear power read as dB puts every pixel tens of dB off;
  linear power is converted to dB;
* grid: 10 m pixels in a UTM zone (``--crs`` overrides): the inputs' own when they all share one,
  else the zone of their centre (``tiling.utm_crs``), origin snapped to the 10 m lattice and
  extent covering every input (or ``--bounds``, lon/lat) as ``tiling.grid_for_bounds`` makes the
  dataset grid. An input whose pixels are not on that grid (another pixel size, a geographic or
  other CRS, pixel edges off the lattice) is resampled onto it as the builder does (bilinear in
  linear power: ``tiling.read_on_tile``); ``--noresample`` refuses such inputs instead;
* compositing: ``geotiff.tile_image``, the builder's (per season, the median of the valid dB
  values of the year's acquisitions; ``composite.compose_tile``), block by block; no data is the
  builder's too (the files' nodata, NaN, exact 0, values below the -50 dB noise floor).

A season without any acquisition is no data: its three channels (VV-VH, VV and VH of that
season) are NaN everywhere, never 0 or a copy of another season. The model already masks
no-data: ``mae_jax.preprocess.normalise`` sets non-finite values to 0 (the mean) after z-scoring
and returns the validity mask, and datasets built from such archives get statistics for these
channels from the same product's other seasons (``data_pipeline.writer``). A polarisation
without any file (a VV-only product such as pyroSAR's sample) is the same: its channels and
VV-VH are NaN. How much a missing season costs is measured by ``bench/bench_seasons.py``.

Each decision (inputs, year, each season with its acquisitions or its absence, units, grid and
resampling) is printed once. The output is one float32 GeoTIFF, tiled and DEFLATE-compressed,
NaN as nodata, band descriptions ``schema.BAND_NAMES`` and tags saying how it was made. It is
written under a temporary name in the output folder and renamed when complete: on any error
nothing is left, and an existing file is replaced only with ``--overwrite``. Errors name the
input and the flag to change.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import math
import os
import sys
import uuid
from typing import Callable, Iterable, Sequence

import numpy as np
import rasterio
import rasterio.coords
import rasterio.crs
import rasterio.errors
import rasterio.warp
import rasterio.windows
from affine import Affine
from rasterio.enums import Resampling

from data_pipeline import schema
from data_pipeline.ingest import composite
from data_pipeline.ingest import labels
from data_pipeline.ingest import tiling
from data_pipeline.ingest.sources import common
from data_pipeline.ingest.sources import geotiff

# The builder's per-tile processing, as configs/data/geotiff.py sets it by default
# (tests/test_prepare.py checks that the two agree).
METHOD = composite.DEFAULT_METHOD
NODATA_VALUES = composite.DEFAULT_NODATA_VALUES
NOISE_FLOOR_DB = composite.DEFAULT_NOISE_FLOOR_DB
RESAMPLING = 'bilinear'
RESAMPLE_IN_LINEAR_POWER = True
PIXEL_SIZE = schema.PIXEL_SIZE_M
# Side of the output's GeoTIFF tiles, and of the blocks composited at a time: a block holds one
# float32 layer per acquisition, so memory stays a few MB per acquisition whatever the scene.
BLOCK = 512
# Longest output side accepted. A Sentinel-1 IW scene is about 250 km across (25 000 px); inputs
# spread over a continent (files of several areas given together) would make a mostly empty
# stack of terabytes, so they are refused with a hint instead.
MAX_SIDE = 60_000
RASTER_SUFFIXES = ('.tif', '.tiff')
UNITS_FLAG = '--units'
NO_RESAMPLE_FLAG = '--noresample'
# Longest side of the decimated read the units are decided on (geotiff.scan_scene's too).
_SAMPLE_SIDE = 512
# Tolerances for "on the grid": pixel size relative, lattice offset in pixels (float text in
# GeoTIFF headers, as tiling's snapping allows).
_PIXEL_SIZE_TOLERANCE = 1e-6
_LATTICE_TOLERANCE = 1e-6
_SEASON_SPANS = {'winter': 'December {prev} to February {year}', 'spring': 'March to May {year}',
                 'summer': 'June to August {year}', 'fall': 'September to November {year}'}
_UNIT_WORDS = {'dB': 'dB', 'linear': 'linear power'}
_METHOD_WORDS = {'median_db': 'median of dB', 'mean_db': 'mean of dB',
                 'mean_linear': 'mean of linear power'}


@dataclasses.dataclass
class Result:
  """What :func:`prepare` made: the output, its grid and every decision, one line each."""
  output: str
  year: int
  crs: rasterio.crs.CRS
  transform: Affine
  width: int
  height: int
  seasons: dict[str, list[datetime.date]]  # season -> dates composited (empty: absent)
  decisions: list[str]
  valid_fraction: dict[str, float]  # band name -> share of pixels that are not no-data


def _count(n: int, what: str) -> str:
  return f'{n} {what}{"s" * (n != 1)}'


# --- Finding acquisitions ----------------------------------------------------------------------


def _is_raster(path: str) -> bool:
  return path.lower().endswith(RASTER_SUFFIXES)


def find_acquisitions(inputs: Sequence[str], units: str = 'auto'
                      ) -> tuple[list[composite.Acquisition], list[str]]:
  """The acquisitions of the inputs: GeoTIFFs, folders of them, STAC JSON files.

  Args:
    inputs: Paths as the user gave them.
    units: 'auto', 'dB' or 'linear', recorded in every acquisition.

  Returns:
    ``(found, notes)``: the acquisitions (each file once, in input order) and lines about what
    was skipped: GeoTIFFs in folders and STAC assets that are not VV or VH backscatter
    (incidence angle or layover maps, HH / HV).

  Raises:
    FileNotFoundError: An input that does not exist, or a folder without GeoTIFFs.
    ValueError: A file without a date or polarisation, a file that is neither a GeoTIFF nor a
      STAC JSON, a STAC item without VV or VH assets (each naming the input).
  """
  if not inputs:
    raise ValueError('no input given: name GeoTIFF files, folders of them, or STAC item / '
                     'catalog JSON files')
  found, notes, seen = [], [], set()

  def add(acquisition: composite.Acquisition) -> None:
    if acquisition.path not in seen:
      seen.add(acquisition.path)
      found.append(acquisition)

  for given in inputs:
    path = os.path.expanduser(os.fspath(given))
    if '://' not in path and not os.path.exists(path):
      raise FileNotFoundError(f'input {given!r} does not exist')
    if os.path.isdir(path):
      files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                     for name in names if _is_raster(name))
      if not files:
        raise FileNotFoundError(f'input folder {given!r} holds no GeoTIFF '
                                f'({", ".join(RASTER_SUFFIXES)} files, searched recursively)')
      skipped = []
      for file in files:
        try:
          add(composite.Acquisition.from_file(os.path.abspath(file), units=units))
        except ValueError:
          try:
            composite.parse_polarisation(file)
          except ValueError:
            # Not VV or VH by its name (ASF's inc_map / ls_map / dem layers, HH / HV): a file
            # beside the acquisitions, not one of them. Named files are never skipped.
            skipped.append(os.path.basename(file))
            continue
          raise
      if skipped:
        shown = ', '.join(skipped[:4]) + (', ...' if len(skipped) > 4 else '')
        notes.append(f'input folder {given}: skipped {_count(len(skipped), "GeoTIFF")} that are '
                     f'not VV or VH acquisitions by name or tags ({shown})')
    elif path.lower().endswith('.json'):
      stac_found, stac_notes = stac_acquisitions(path, units)
      notes.extend(stac_notes)
      for acquisition in stac_found:
        add(acquisition)
    elif _is_raster(path) or '://' in path:
      if '://' not in path:
        path = os.path.abspath(path)
      add(composite.Acquisition.from_file(path, units=units))
    else:
      raise ValueError(f'input {given!r} is neither a GeoTIFF ({", ".join(RASTER_SUFFIXES)}), '
                       'a folder of them, nor a STAC item / catalog JSON file')
  return found, notes


def _asset_is_raster(asset) -> bool:
  """A GeoTIFF data asset (not a thumbnail, a metadata file or a tile service)."""
  media_type = (asset.media_type or '').lower()
  roles = asset.roles or ()
  if roles and 'data' not in roles:
    return False
  return 'tiff' in media_type or _is_raster(asset.href.split('?')[0])


def _asset_polarisation(key: str, asset) -> str | None:
  """The polarisation of one asset (key, sar:polarizations, title or file name), or None."""
  candidates = {'VV', 'VH', 'HH', 'HV'}
  if key.upper() in candidates:
    return key.upper()
  listed = asset.extra_fields.get('sar:polarizations') or []
  if len(listed) == 1 and str(listed[0]).upper() in candidates:
    return str(listed[0]).upper()
  for text in (asset.title or '', os.path.basename(asset.href.split('?')[0])):
    try:
      return composite.parse_polarisation(text)
    except ValueError:  # None named, or HH / HV: not an acquisition the model takes.
      continue
  return None


def stac_acquisitions(path: str, units: str = 'auto'
                      ) -> tuple[list[composite.Acquisition], list[str]]:
  """The VV and VH acquisitions of a STAC item, item collection, catalog or collection JSON.

  Catalogs and collections are walked recursively (a local static catalog: every link is a
  file). Asset hrefs are made absolute against the JSON they are in; URLs are passed to GDAL
  as they are (this module fetches nothing itself).

  Returns:
    ``(acquisitions, notes)``: the acquisitions and lines about skipped assets.

  Raises:
    ImportError: pystac is not installed.
    ValueError: Not a STAC JSON, an item without a date, or one without any VV / VH asset.
  """
  try:
    import pystac  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'{path}: reading STAC needs pystac: pip install "mae_jax[data]"') from e
  try:
    with open(path) as f:
      kind = json.load(f).get('type')
  except (OSError, ValueError, AttributeError) as e:
    raise ValueError(f'{path}: not a readable STAC JSON file ({e})') from None
  try:
    if kind == 'Feature':
      items = [pystac.Item.from_file(path)]
    elif kind == 'FeatureCollection':
      items = list(pystac.ItemCollection.from_file(path))
    elif kind in ('Catalog', 'Collection'):
      items = list(pystac.read_file(path).get_items(recursive=True))
    else:
      raise ValueError(f'its type is {kind!r}, not Feature, FeatureCollection, Catalog or '
                       'Collection')
  except (pystac.STACError, ValueError, KeyError, OSError) as e:
    raise ValueError(f'{path}: cannot read it as STAC: {e}') from None
  if not items:
    raise ValueError(f'{path}: the STAC {kind} holds no item')
  out, skipped = [], collections.Counter()
  for item in items:
    where = f'STAC item {item.id!r} ({path})'
    when = item.datetime or item.common_metadata.start_datetime
    if when is None:
      raise ValueError(f'{where}: no datetime or start_datetime, so no acquisition date')
    rasters = {key: asset for key, asset in item.assets.items() if _asset_is_raster(asset)}
    chosen = 0
    for key, asset in rasters.items():
      polarisation = _asset_polarisation(key, asset)
      if polarisation not in composite.POLARISATIONS:
        skipped[f'{key} ({polarisation or "not VV or VH"})'] += 1
        continue
      href = asset.get_absolute_href() or asset.href
      acquisition = composite.Acquisition(path=href, polarisation=polarisation,
                                          date=when.date(), units=units)
      out.append(acquisition)
      chosen += 1
    if not chosen:
      raise ValueError(f'{where}: no VV or VH GeoTIFF asset among its assets '
                       f'{sorted(item.assets)} (GeoTIFF data assets: {sorted(rasters)}); an asset '
                       'is VV or VH by its key, its sar:polarizations or its file name')
  notes = []
  if skipped:
    listing = ', '.join(f'{n} x {what}' for what, n in sorted(skipped.items()))
    notes.append(f'STAC {path}: skipped GeoTIFF assets that are not VV / VH backscatter: '
                 f'{listing}')
  return out, notes


# --- The composite year ------------------------------------------------------------------------


def composite_year(date: datetime.date) -> int:
  """The composite year a date belongs to (December counts towards the next year's winter)."""
  return date.year + 1 if date.month == 12 else date.year


def choose_year(dates: Iterable[datetime.date], year: int | None = None) -> tuple[int, str]:
  """(the composite year, the line saying why): ``year`` if given, else the year with the most
  distinct acquisition dates (ties: the later year).

  Raises:
    ValueError: No date at all, or a given year without any acquisition (naming the years that
      have some).
  """
  counts = collections.Counter(composite_year(d) for d in set(dates))
  if not counts:
    raise ValueError('no acquisition found in the inputs')
  listing = ', '.join(f'{y}: {_count(n, "date")}' for y, n in sorted(counts.items()))
  if year is not None:
    if year not in counts:
      raise ValueError(f'--year {year}: no acquisition of composite year {year} among the inputs '
                       f'(years with acquisitions: {listing}; winter of year Y starts in December '
                       'of Y-1)')
    return year, f'year: {year} (--year; acquisition dates per composite year: {listing})'
  chosen = max(counts, key=lambda y: (counts[y], y))
  return chosen, (f'year: {chosen}, the year with the most acquisition dates ({listing}); '
                  '--year chooses another')


# --- Units, grid and resampling ----------------------------------------------------------------


def _units_sample(path: str) -> np.ndarray:
  """A decimated read of band 1 as float64, the file's nodata and the fill values as NaN."""
  with labels.open_raster(path) as dataset:
    scale = max(1, math.ceil(max(dataset.width, dataset.height) / _SAMPLE_SIDE))
    shape = (max(1, dataset.height // scale), max(1, dataset.width // scale))
    sample = dataset.read(1, out_shape=shape, masked=True, resampling=Resampling.nearest)
  values = np.ma.filled(sample.astype(np.float64), np.nan)
  for value in NODATA_VALUES:
    values[values == value] = np.nan
  return values


def check_file(path: str) -> rasterio.crs.CRS:
  """Opens one acquisition file: one band, a CRS. Returns its CRS.

  Raises:
    ValueError: Several bands or no CRS (naming the file and what to do).
  """
  with labels.open_raster(path) as dataset:
    if dataset.count != 1:
      hint = (' (it looks like a ready 12-band stack: give it to predict as it is)'
              if dataset.count == schema.NUM_CHANNELS else '')
      raise ValueError(f'{path}: has {dataset.count} bands, but an acquisition file has one '
                       f'(VV or VH of one date){hint}; split it into one file per band, e.g. '
                       'gdal_translate -b 1')
    if dataset.crs is None:
      raise ValueError(f'{path}: raster has no CRS; acquisitions must be map rasters (terrain '
                       'corrected, e.g. RTC or GRD processed with SNAP / GAMMA / pyroSAR), not '
                       'GCP-only SAFE GRD TIFFs')
    return dataset.crs


def off_grid_reason(crs, transform: Affine, grid: tiling.TileGrid) -> str | None:
  """Why a raster's pixels are not the grid's (so it must be resampled), or None if they are.

  On the grid means: the same CRS, north-up square pixels of the grid's size, and pixel edges on
  the grid's lattice; then reading it onto the grid returns its pixels unchanged.
  """
  crs = rasterio.crs.CRS.from_user_input(crs)
  if crs.is_geographic:
    return f'CRS {crs.to_string()} is geographic (degrees)'
  if crs != grid.crs:
    return f'CRS {crs.to_string()} is not the grid\'s {grid.crs.to_string()}'
  a, b, c, d, e, f = tuple(transform)[:6]
  if b or d or a <= 0 or not math.isclose(a, -e, rel_tol=_PIXEL_SIZE_TOLERANCE):
    return f'pixels of {math.hypot(a, d):g} x {math.hypot(b, e):g} m are not north-up squares'
  size = grid.pixel_size
  if not math.isclose(a, size, rel_tol=_PIXEL_SIZE_TOLERANCE):
    return f'pixel size {a:g} m, not {size:g} m'
  dx = (c - grid.transform.c) / size
  dy = (f - grid.transform.f) / size
  if abs(dx - round(dx)) > _LATTICE_TOLERANCE or abs(dy - round(dy)) > _LATTICE_TOLERANCE:
    return (f'pixel edges are off the {size:g} m lattice by {(dx - round(dx)) * size:+.3g} m, '
            f'{(dy - round(dy)) * size:+.3g} m')
  return None


def choose_crs(crss: Sequence[rasterio.crs.CRS], lonlat: Sequence[float],
               crs=None) -> tuple[rasterio.crs.CRS, str]:
  """(the grid CRS, why): ``crs`` if given, the inputs' UTM zone when they all share one, else
  the UTM zone of the centre of ``lonlat`` (west, south, east, north)."""
  if crs:
    return common.check_crs(crs, '--crs'), '--crs'
  epsgs = {c.to_epsg() for c in crss}
  if len(epsgs) == 1:
    epsg = epsgs.pop()
    if epsg is not None and (32601 <= epsg <= 32660 or 32701 <= epsg <= 32760):
      return rasterio.crs.CRS.from_epsg(epsg), 'the UTM zone every input is in'
  centre = ((lonlat[0] + lonlat[2]) / 2, (lonlat[1] + lonlat[3]) / 2)
  return tiling.utm_crs(*centre), (f'the UTM zone of the inputs\' centre ({centre[0]:.3f}, '
                                   f'{centre[1]:.3f})')


def _window_tile(grid: tiling.TileGrid, window: rasterio.windows.Window) -> tiling.TileSpec:
  """A block of the grid as a TileSpec (what tiling.read_on_tile and geotiff.tile_image take)."""
  transform = rasterio.windows.transform(window, grid.transform)
  width, height = int(window.width), int(window.height)
  left, top = transform.c, transform.f
  right, bottom = left + width * grid.pixel_size, top - height * grid.pixel_size
  lons, lats = rasterio.warp.transform(grid.crs, tiling.WGS84, [(left + right) / 2],
                                       [(bottom + top) / 2])
  return tiling.TileSpec(row=int(window.row_off), col=int(window.col_off), transform=transform,
                         crs=grid.crs,
                         bounds=rasterio.coords.BoundingBox(left, bottom, right, top),
                         width=width, height=height,
                         centre_lonlat=(float(lons[0]), float(lats[0])),
                         tile_id=f'block_{int(window.row_off)}_{int(window.col_off)}')


def decide_units(chosen: Sequence[composite.Acquisition], units: str
                 ) -> tuple[dict[str, str], str]:
  """(path -> 'dB' or 'linear', the decision line): per file, detected or stated and checked
  (``composite.decide_units``) on a decimated read."""
  decided, counts = {}, collections.Counter()
  for acquisition in chosen:
    decided[acquisition.path], how = composite.decide_units(
        _units_sample(acquisition.path), units, name=acquisition.path, flag=UNITS_FLAG)
    counts[(decided[acquisition.path], how)] += 1
  parts = [f'{_UNIT_WORDS[u]} {how} in {_count(n, "file")}'
           for (u, how), n in sorted(counts.items())]
  converted = ' -> converted to dB (10 log10)' if 'linear' in decided.values() else ''
  stated = '' if units == 'auto' else f' ({UNITS_FLAG} {units})'
  return decided, f'units: {"; ".join(parts)}{converted}{stated}'


def season_lines(chosen: Sequence[composite.Acquisition], year: int, method: str
                 ) -> tuple[dict[str, list[datetime.date]], list[str]]:
  """(season -> its acquisition dates, one line per season: its acquisitions, or its absence
  and the channels that are NaN for it)."""
  seasons = {s: set() for s in schema.SEASONS}
  files = collections.Counter()
  for acquisition in chosen:
    season = composite.season_of(acquisition.date, year)
    seasons[season].add(acquisition.date)
    files[(season, acquisition.polarisation)] += 1
  lines = []
  for season in schema.SEASONS:
    span = _SEASON_SPANS[season].format(prev=year - 1, year=year)
    dates = sorted(seasons[season])
    if not dates:
      channels = [f'{p}_{season}' for p in schema.PRODUCTS]
      lines.append(f'season {season} ({span}): absent, no acquisition -> {", ".join(channels)} '
                   'are NaN (no data; the model masks no-data)')
      continue
    listed = ', '.join(str(d) for d in dates[:6]) + (', ...' if len(dates) > 6 else '')
    line = (f'season {season} ({span}): {_count(len(dates), "acquisition date")} ({listed}); '
            f'{files[(season, "VV")]} VV + {files[(season, "VH")]} VH files, '
            f'{_METHOD_WORDS[method]}')
    missing = [p for p in composite.POLARISATIONS if not files[(season, p)]]
    if missing:
      nan = [f'{p.lower()}_{season}' for p in missing] + [f'vv_minus_vh_{season}']
      line += f'; no {" or ".join(missing)} -> {", ".join(nan)} are NaN'
    lines.append(line)
  return {s: sorted(d) for s, d in seasons.items()}, lines


def choose_grid(chosen: Sequence[composite.Acquisition], crss: Sequence[rasterio.crs.CRS],
                bounds: Sequence[float] | None = None, crs=None
                ) -> tuple[tiling.TileGrid, str]:
  """(the output grid, the decision line): 10 m pixels in :func:`choose_crs`'s CRS over every
  input (or ``bounds``, lon/lat), snapped as ``tiling.grid_for_bounds`` snaps the dataset grid.

  Raises:
    ValueError: A grid over :data:`MAX_SIDE` pixels on a side (inputs of several areas).
  """
  if bounds:
    lonlat = labels.check_bounds(bounds, '--bounds')
  else:
    lonlat = common.union_bounds([common.footprint(a.path) for a in chosen])
  grid_crs, why = choose_crs(crss, lonlat, crs)
  if bounds:
    grid = tiling.grid_for_bounds(lonlat, tiling.WGS84, PIXEL_SIZE, 1, crs=grid_crs)
  else:
    # Extents in the grid CRS itself: exact for inputs already in it (no lon/lat round trip).
    boxes = [common.Footprint(a.path, common.bounds_in(a.path, grid_crs)) for a in chosen]
    grid = tiling.grid_for_bounds(common.union_bounds(boxes), grid_crs, PIXEL_SIZE, 1,
                                  crs=grid_crs)
  if max(grid.width, grid.height) > MAX_SIDE:
    raise ValueError(
        f'the inputs span {grid.width * PIXEL_SIZE / 1000:.0f} x '
        f'{grid.height * PIXEL_SIZE / 1000:.0f} km (lon/lat '
        f'{tuple(round(v, 3) for v in lonlat)}), more than {MAX_SIDE} px of {PIXEL_SIZE:g} m on '
        'a side: give the files of one area at a time, or cut it with --bounds W,S,E,N (degrees)')
  return grid, (f'grid: {grid.crs.to_string()} ({why}), {PIXEL_SIZE:g} m pixels, {grid.width} x '
                f'{grid.height} px, top-left corner ({grid.transform.c:.0f}, '
                f'{grid.transform.f:.0f}) on the {PIXEL_SIZE:g} m lattice'
                + (' (--bounds)' if bounds else ''))


def resampling_line(chosen: Sequence[composite.Acquisition], crss: Sequence[rasterio.crs.CRS],
                    grid: tiling.TileGrid, resample: bool = True) -> str:
  """The resampling decision: which inputs are off the grid and why (:func:`off_grid_reason`).

  Raises:
    ValueError: Some are and ``resample`` is False (naming :data:`NO_RESAMPLE_FLAG`).
  """
  reasons = {}
  for acquisition, file_crs in zip(chosen, crss):
    with labels.open_raster(acquisition.path) as dataset:
      reason = off_grid_reason(file_crs, dataset.transform, grid)
    if reason:
      reasons[acquisition.path] = reason
  if not reasons:
    return 'resampling: none, every input file is on the grid (read as stored)'
  if not resample:
    listing = '; '.join(f'{p}: {r}' for p, r in list(reasons.items())[:3])
    more = f' (and {len(reasons) - 3} more)' if len(reasons) > 3 else ''
    raise ValueError(f'{len(reasons)} input file{"s are" if len(reasons) > 1 else " is"} not on '
                     f'the model\'s {PIXEL_SIZE:g} m UTM grid ({listing}{more}) and resampling is '
                     f'off ({NO_RESAMPLE_FLAG}): drop {NO_RESAMPLE_FLAG} to resample '
                     '(bilinear in linear power, as the dataset builder does), or resample them '
                     'yourself')
  by_reason = collections.Counter(reasons.values())
  shown = '; '.join(f'{_count(n, "file")}: {r}' for r, n in sorted(by_reason.items()))
  return (f'resampling: {shown} -> resampled onto the grid (bilinear in linear power, '
          f'tiling.read_on_tile; {NO_RESAMPLE_FLAG} refuses instead)')


# --- Output ------------------------------------------------------------------------------------


def check_output(output: str, overwrite: bool) -> str:
  """The absolute output path, after refusing what must not be written (before any work).

  Raises:
    FileExistsError: It exists and ``overwrite`` is off, or it is a folder.
    FileNotFoundError, PermissionError: Its folder does not exist or cannot be written.
  """
  output = os.path.abspath(os.path.expanduser(output))
  if os.path.isdir(output):
    raise FileExistsError(f'--output {output} is a folder; name the GeoTIFF file to write')
  if os.path.lexists(output) and not overwrite:
    raise FileExistsError(f'--output {output} exists; pass --overwrite to replace it')
  folder = os.path.dirname(output)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'--output {output}: the folder {folder} does not exist')
  if not os.access(folder, os.W_OK | os.X_OK):
    raise PermissionError(f'--output {output}: the folder {folder} is read-only (or not yours); '
                          'nothing was written')
  return output


def _temporary_name(output: str) -> str:
  folder, name = os.path.split(output)
  return os.path.join(folder, f'.{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp')


def _remove(path: str) -> None:
  for leftover in (path, path + '.aux.xml', path + '.msk'):
    if os.path.lexists(leftover):
      os.remove(leftover)


# --- The whole command -------------------------------------------------------------------------


def prepare(inputs: Sequence[str], output: str, *, year: int | None = None, units: str = 'auto',
            method: str = METHOD, resample: bool = True, overwrite: bool = False,
            bounds: Sequence[float] | None = None, crs=None,
            log: Callable[[str], None] = print) -> Result:
  """Makes the model's 12-band input stack of ``inputs`` in ``output`` (see the module docstring).

  Args:
    inputs: GeoTIFF files, folders of them, STAC item / item collection / catalog JSON files.
    output: The GeoTIFF to write; its folder must exist.
    year: Composite year; None = the year with the most acquisition dates.
    units: 'auto' (detected per file), 'dB' or 'linear' (checked against the values).
    method: A key of ``composite.METHODS``.
    resample: Resample inputs that are not on the 10 m grid; False refuses them.
    overwrite: Replace an existing ``output``.
    bounds: (west, south, east, north) in degrees to cut the stack to; None = every input.
    crs: Grid CRS (projected, metres) instead of the UTM zone.
    log: Called once with each decision line.

  Returns:
    A :class:`Result`.

  Raises:
    ValueError, FileNotFoundError, FileExistsError, PermissionError, labels.RasterReadError:
      Bad inputs or settings, each naming the input and the flag to change; nothing is written.
  """
  if units not in composite.UNITS:
    raise ValueError(f'{UNITS_FLAG} {units!r} is not one of {composite.UNITS}')
  if method not in composite.METHODS:
    raise ValueError(f'--method {method!r} is not one of {tuple(composite.METHODS)}')
  output = check_output(output, overwrite)
  decisions = []

  def decide(line: str) -> None:
    decisions.append(line)
    log(line)

  # Inputs and the year.
  found, notes = find_acquisitions(inputs, units)
  for line in notes:
    decide(line)
  year, why = choose_year([f.date for f in found], year)
  chosen = [f for f in found if composite.season_of(f.date, year) is not None]
  left_out = len(found) - len(chosen)
  decide(f'inputs: {_count(len(found), "acquisition file")} from {_count(len(inputs), "input")}; '
         + why + (f'; {_count(left_out, "file")} of other years left out' if left_out else ''))
  crss = [check_file(f.path) for f in chosen]
  decided, line = decide_units(chosen, units)
  decide(line)
  seasons, lines = season_lines(chosen, year, method)
  for line in lines:
    decide(line)
  grid, line = choose_grid(chosen, crss, bounds, crs)
  decide(line)
  decide(resampling_line(chosen, crss, grid, resample))

  settings = geotiff.Settings(
      kind='acquisitions', year=year, method=method, nodata_values=tuple(NODATA_VALUES),
      noise_floor_db=NOISE_FLOOR_DB, resampling=RESAMPLING,
      resample_in_linear_power=RESAMPLE_IN_LINEAR_POWER, min_valid_fraction=0.0,
      labels=common.LabelSettings())
  # The builder's planning of each file (its nodata fill; a file without any valid pixel is
  # refused), with the units decided above.
  scenes = [geotiff.scan_scene(f.path, settings, decided[f.path], f.polarisation,
                               composite.season_of(f.date, year)) for f in chosen]
  boxes = {s.path: common.bounds_in(s.path, grid.crs) for s in scenes}
  tags = _tags(year, seasons, chosen, method, grid, decisions)
  valid = _write(output, grid, scenes, boxes, settings, tags)
  total = grid.width * grid.height
  fractions = {name: float(valid[i] / total) for i, name in enumerate(schema.BAND_NAMES)}
  shares = [100 * v for v in fractions.values() if v > 0]  # Not empty: _write checks it.
  spread = f'{min(shares):.1f}' + (f' to {max(shares):.1f}' if max(shares) - min(shares) >= 0.05
                                   else '')
  log(f'wrote {output}: {schema.NUM_CHANNELS} bands float32 dB, {grid.width} x {grid.height} px; '
      f'{_count(len(shares), "band")} with data ({spread} % of their pixels valid), '
      f'{schema.NUM_CHANNELS - len(shares)} all NaN')
  return Result(output=output, year=year, crs=grid.crs, transform=grid.transform,
                width=grid.width, height=grid.height,
                seasons={s: sorted(d) for s, d in seasons.items()}, decisions=decisions,
                valid_fraction=fractions)


def _tags(year: int, seasons: dict[str, list[datetime.date]],
          chosen: Sequence[composite.Acquisition], method: str, grid: tiling.TileGrid,
          decisions: Sequence[str]) -> dict[str, str]:
  """GeoTIFF tags that say how the stack was made."""
  return {
      'MAE_JAX_STACK': 'data_pipeline.ingest.prepare',
      'UNITS': schema.UNITS,
      'COMPOSITE_YEAR': str(year),
      'COMPOSITE': composite.composite_description(method, NODATA_VALUES, NOISE_FLOOR_DB),
      'SEASONS_PRESENT': ','.join(s for s in schema.SEASONS if seasons[s]) or 'none',
      'SEASON_DATES': json.dumps({s: [str(d) for d in sorted(v)] for s, v in seasons.items()}),
      'SOURCES': json.dumps([f.path for f in chosen]),
      'GRID': f'{grid.crs.to_string()} {grid.pixel_size:g} m',
      'DECISIONS': json.dumps(list(decisions)),
  }


def _write(output: str, grid: tiling.TileGrid, scenes: Sequence[geotiff.SceneFile],
           boxes: dict[str, tuple[float, float, float, float]], settings: geotiff.Settings,
           tags: dict[str, str]) -> np.ndarray:
  """Composites block by block into a temporary file, renamed to ``output`` when complete.

  Returns the number of valid pixels per band.

  Raises:
    ValueError: No valid pixel at all (nothing is written).
  """
  profile = dict(driver='GTiff', width=grid.width, height=grid.height,
                 count=schema.NUM_CHANNELS, dtype='float32', crs=grid.crs,
                 transform=grid.transform, nodata=float('nan'), tiled=True, blockxsize=BLOCK,
                 blockysize=BLOCK, compress='deflate', predictor=3, interleave='pixel',
                 BIGTIFF='IF_SAFER')
  valid = np.zeros(schema.NUM_CHANNELS, np.int64)
  tmp = _temporary_name(output)
  try:
    with rasterio.open(tmp, 'w', **profile) as out:
      for index, name in enumerate(schema.BAND_NAMES, start=1):
        out.set_band_description(index, name)
      out.update_tags(**tags)
      for row in range(0, grid.height, BLOCK):
        for col in range(0, grid.width, BLOCK):
          window = rasterio.windows.Window(col, row, min(BLOCK, grid.width - col),
                                           min(BLOCK, grid.height - row))
          tile = _window_tile(grid, window)
          covering = tuple(s for s in scenes if common.Footprint(s.path, boxes[s.path])
                           .intersects(tile.bounds))
          if covering:
            image = geotiff.tile_image(geotiff.TileUnit(tile=tile, scenes=covering,
                                                        worldcover=(), vcf=()), settings)
          else:
            image = np.full(tile.shape + (schema.NUM_CHANNELS,), np.nan, np.float32)
          valid += np.isfinite(image).sum(axis=(0, 1))
          out.write(np.moveaxis(image, -1, 0).astype(np.float32), window=window)
    if not valid.any():
      raise ValueError(f'no valid pixel in any input on the grid (every value no data: NaN, '
                       f'the files\' nodata, {NODATA_VALUES} or below {NOISE_FLOOR_DB} dB); '
                       'nothing was written')
    os.replace(tmp, output)
  except BaseException:
    _remove(tmp)
    raise
  return valid


# --- Command line ------------------------------------------------------------------------------


def _parse_bounds(values) -> tuple[float, ...] | None:
  if not values:
    return None
  try:
    bounds = tuple(float(v) for v in values)
  except ValueError:
    bounds = ()
  if len(bounds) != 4:
    raise ValueError(f'--bounds {",".join(values)}: expected four numbers W,S,E,N in degrees')
  return bounds


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  flag_values = flags.FLAGS
  try:
    prepare(argv[1:], flag_values.output, year=flag_values.year, units=flag_values.units,
            method=flag_values.method, resample=flag_values.resample,
            overwrite=flag_values.overwrite, bounds=_parse_bounds(flag_values.bounds),
            crs=flag_values.crs)
  except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ImportError,
          labels.RasterReadError, rasterio.errors.RasterioError) as e:
    # Bad inputs or settings: the message names the file and the flag; a traceback adds nothing.
    print(f'data_pipeline.ingest.prepare: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def console_main() -> None:
  """The command (``python -m`` or a console script such as ``mae-jax-prepare``)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  # Flags are defined here, not at import, so importing this module defines nothing.
  flags.DEFINE_string('output', None, 'The 12-band GeoTIFF to write (its folder must exist).')
  flags.DEFINE_integer('year', None, 'Composite year (winter starts in December of the year '
                       'before); default: the year with the most acquisition dates.')
  flags.DEFINE_enum('units', 'auto', list(composite.UNITS), 'Units of the inputs: auto '
                    '(detected per file), dB or linear (refused when the values contradict it).')
  flags.DEFINE_enum('method', METHOD, list(composite.METHODS), 'Per-season composite.')
  flags.DEFINE_bool('resample', True, 'Resample inputs that are not on the 10 m UTM grid '
                    '(--noresample refuses them instead).')
  flags.DEFINE_list('bounds', None, 'W,S,E,N in degrees to cut the stack to (default: every '
                    'input).')
  flags.DEFINE_string('crs', None, 'Grid CRS (projected, metres) instead of the UTM zone.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing output file.')
  flags.mark_flags_as_required(['output'])
  from data_pipeline import console  # pylint: disable=g-import-not-at-top
  console.run(main, __name__)


if __name__ == '__main__':
  console_main()
