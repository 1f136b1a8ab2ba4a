"""Source ``geotiff``: Sentinel-1 GeoTIFFs per acquisition, or ready seasonal composites.

Config: ``configs/data/geotiff.py``. Per area of interest, a glob of scene files. Two kinds:

* ``acquisitions``: one single-band GeoTIFF per acquisition and polarisation (sigma0 in dB or
  linear power, stated or detected), with its date and polarisation in the file name or tags
  (``composite.Acquisition.from_file``). Files of the composite year (winter from 1 December of
  the year before) are read onto each tile and reduced per season (``composite.compose_tile``).
* ``composites``: multi-band GeoTIFFs that already hold seasonal composites; bands found by
  their descriptions (``vv_winter`` ... ``vh_fall``, any case) or, without descriptions, 12 bands
  in ``schema.BAND_NAMES`` order or 8 bands VV then VH, each winter..fall. VV-VH is always
  recomputed as VV_dB - VH_dB so that it matches the stored VV and VH exactly.

Planning (before any pixel is read): every file is opened once to check its CRS, to find its
lon/lat footprint and, from a decimated read, to decide its units and refuse a scene without a
single valid pixel. The area is covered by a 10 m UTM grid snapped to the pixel lattice
(``tiling.grid_for_bounds``), cut into tiles; a tile covered by no scene is left out and counted.
Splits come from the area's split CSV (by tile id) or the authors' banding.

Per tile (one work unit): each covering file is read onto the tile's grid through a WarpedVRT
(``tiling.read_on_tile``; bilinear, in linear power for dB inputs by default), no-data masked,
the 12 channels assembled, then the tile is screened (empty / below the valid fraction /
constant channel -> skipped and counted) and labelled from the WorldCover and VCF rasters that
cover it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Sequence

import numpy as np
from rasterio.enums import Resampling

from data_pipeline.ingest import composite
from data_pipeline.ingest import labels
from data_pipeline import schema
from data_pipeline.ingest import tiling
from data_pipeline.ingest.sources import common

KINDS = ('acquisitions', 'composites')
# Longest side of the decimated read that decides units and emptiness at planning time.
_SAMPLE_SIDE = 512


@dataclasses.dataclass(frozen=True)
class Settings:
  """The per-tile processing of a build (picklable: it travels to worker processes)."""
  kind: str
  year: int
  method: str
  nodata_values: tuple[float, ...]
  noise_floor_db: float | None
  resampling: str
  resample_in_linear_power: bool
  min_valid_fraction: float
  labels: common.LabelSettings


@dataclasses.dataclass(frozen=True)
class SceneFile:
  """One file read onto tiles: its bands (1-based) and units ('dB' or 'linear', decided).

  For acquisitions ``bands`` is ``(1,)`` and ``polarisation`` / ``season`` say where it goes; for
  composites ``bands`` lists the VV bands winter..fall then the VH bands.
  """
  path: str
  units: str
  bands: tuple[int, ...]
  nodata: float | None
  polarisation: str = ''
  season: str = ''


@dataclasses.dataclass(frozen=True)
class TileUnit:
  tile: tiling.TileSpec
  scenes: tuple[SceneFile, ...]
  worldcover: tuple[str, ...]
  vcf: tuple[str, ...]


# --- Planning ----------------------------------------------------------------------------------


def composite_bands(descriptions: Sequence[str | None], count: int, path: str) -> tuple[int, ...]:
  """1-based indexes of VV winter..fall then VH winter..fall in a composite file."""
  wanted = [f'{p}_{s}' for p in ('vv', 'vh') for s in schema.SEASONS]
  named = {re.sub(r'[^a-z0-9]+', '_', (d or '').strip().lower()): i
           for i, d in enumerate(descriptions, start=1) if d}
  if any(name in named for name in wanted):
    missing = [name for name in wanted if name not in named]
    if missing:
      raise ValueError(f'{path}: composite lacks bands {missing} (band descriptions: '
                       f'{list(descriptions)}); every season of VV and VH is needed, a season '
                       'without data should be a band of NaN / nodata')
    return tuple(named[name] for name in wanted)
  if count == schema.NUM_CHANNELS:
    return tuple(1 + schema.BAND_NAMES.index(name) for name in wanted)
  if count == 8:
    return tuple(range(1, 9))
  raise ValueError(f'{path}: composite has {count} bands without usable descriptions; expected '
                   f'descriptions naming {wanted}, or 12 bands in {schema.BAND_NAMES} order, or 8 '
                   'bands VV then VH (winter, spring, summer, fall)')


def _fill_value(declared: float | None, nodata_values: Sequence[float]) -> float | None:
  """The source value left out of resampling kernels: the file's own, else the first fill."""
  if declared is not None and not math.isnan(declared):
    return float(declared)
  finite = [v for v in nodata_values if not math.isnan(v)]
  return float(finite[0]) if finite else None


def scan_scene(path: str, settings: Settings, units: str, polarisation: str = '',
               season: str = '') -> SceneFile:
  """Opens a scene once: bands, units (decided from a decimated read when 'auto'), not empty."""
  with labels.open_raster(path) as dataset:
    if dataset.crs is None:
      raise ValueError(f'{path}: raster has no CRS; scenes must be map rasters (GCP-only SAFE '
                       'GRD TIFFs are not)')
    if settings.kind == 'acquisitions':
      if dataset.count != 1:
        raise ValueError(f'{path}: an acquisition file must have one band (VV or VH), found '
                         f'{dataset.count}; multi-band composites need kind=composites')
      bands = (1,)
    else:
      bands = composite_bands(dataset.descriptions, dataset.count, path)
    scale = max(1, math.ceil(max(dataset.width, dataset.height) / _SAMPLE_SIDE))
    shape = (len(bands), max(1, dataset.height // scale), max(1, dataset.width // scale))
    sample = dataset.read(list(bands), out_shape=shape, masked=True,
                          resampling=Resampling.nearest)
    declared = dataset.nodata
  values = np.ma.filled(sample.astype(np.float64), np.nan)
  for value in settings.nodata_values:
    if not math.isnan(value):
      values[values == value] = np.nan
  if units == 'auto':
    if not np.isfinite(values).any():
      raise ValueError(f'{path}: scene has no valid pixel (all NaN, nodata {declared} or '
                       f'{settings.nodata_values}); remove it from the scene list')
    units = composite.detect_units(values, name=path)
  values_db = composite.linear_to_db(values) if units == 'linear' else values
  valid = composite.mask_nodata(values_db, nodata_values=(),
                                noise_floor_db=settings.noise_floor_db)
  if not np.isfinite(valid).any():
    raise ValueError(f'{path}: scene has no valid pixel (all NaN, nodata {declared}, '
                     f'{settings.nodata_values} or below the {settings.noise_floor_db} dB noise '
                     'floor, judged on a decimated read); remove it from the scene list')
  return SceneFile(path=path, units=units, bands=bands,
                   nodata=_fill_value(declared, settings.nodata_values),
                   polarisation=polarisation, season=season)


def _area_scenes(area, index: int, settings: Settings, units: str):
  """The scene files of one area, and how many acquisitions fall outside the composite year."""
  where = f'config.areas[{index}] ({area.name or area.region})'
  paths = common.find_files(area.scenes, f'{where}.scenes')
  outside = 0
  scenes = []
  if settings.kind == 'composites':
    scenes = [scan_scene(path, settings, units) for path in paths]
    return scenes, outside
  polarisations = {p: [] for p in composite.POLARISATIONS}
  for path in paths:
    acquisition = composite.Acquisition.from_file(path, units=units)
    season = composite.season_of(acquisition.date, settings.year)
    if season is None:
      outside += 1
      continue
    scenes.append(scan_scene(path, settings, units, acquisition.polarisation, season))
    polarisations[acquisition.polarisation].append(path)
  for polarisation, found in polarisations.items():
    if not found:
      other = [p for p in composite.POLARISATIONS if p != polarisation][0]
      raise ValueError(
          f'{where}: no {polarisation} acquisition of composite year {settings.year} among '
          f'{len(paths)} files matching {area.scenes!r} ({len(polarisations[other])} {other}); '
          'every tile needs VV and VH. The polarisation comes from the file name or tags '
          '(composite.parse_polarisation)')
  return scenes, outside


def plan(config) -> common.Plan:
  """Tiles, their covering files and splits for every area of ``config``."""
  common.check_tile_size(config)
  if config.kind not in KINDS:
    raise ValueError(f'config.kind {config.kind!r} is not one of {KINDS}')
  if config.composite_method not in composite.METHODS:
    raise ValueError(f'config.composite_method {config.composite_method!r} is not one of '
                     f'{tuple(composite.METHODS)}')
  if config.units not in composite.UNITS:
    raise ValueError(f'config.units {config.units!r} is not one of {composite.UNITS}')
  settings = Settings(
      kind=config.kind, year=int(config.year), method=config.composite_method,
      nodata_values=tuple(float(v) for v in config.nodata_values),
      noise_floor_db=config.noise_floor_db, resampling=config.resampling,
      resample_in_linear_power=bool(config.resample_in_linear_power),
      min_valid_fraction=float(config.min_valid_fraction),
      labels=common.LabelSettings(config.vcf_band, float(config.vcf_min_valid_fraction)))
  worldcover = common.label_footprints(config.worldcover, 'config.worldcover')
  vcf = common.label_footprints(config.vcf, 'config.vcf')

  units, centres, left_out = {}, {}, {}
  for index, area in enumerate(config.areas):
    region = common.region_of(area, index)
    name = area.name or f'{region}_{index}'
    scenes, outside = _area_scenes(area, index, settings, config.units)
    footprints = {s.path: common.footprint(s.path) for s in scenes}
    lonlat = tuple(area.bounds) if area.bounds else common.union_bounds(list(footprints.values()))
    for what, files in (('config.worldcover', worldcover), ('config.vcf', vcf)):
      common.check_labels_overlap(files, lonlat, what, name)
    crs = common.check_crs(area.crs, f'config.areas[{index}].crs') or tiling.utm_crs(
        (lonlat[0] + lonlat[2]) / 2, (lonlat[1] + lonlat[3]) / 2)
    # Scene extents in the grid CRS: exact for scenes already in it (no lon/lat round trip that
    # would add a ring of tiles without data around the area).
    boxes = {s.path: common.bounds_in(s.path, crs) for s in scenes}
    if area.bounds:
      grid = tiling.grid_for_bounds(lonlat, tiling.WGS84, config.pixel_size, config.tile_size,
                                    crs=crs)
    else:
      grid = tiling.grid_for_bounds(common.union_bounds(
          [common.Footprint(p, b) for p, b in boxes.items()]), crs, config.pixel_size,
                                    config.tile_size, crs=crs)
    area_units, area_tiles = [], []
    no_scene = 0
    for tile in tiling.tiles(grid, config.tile_size, region=region):
      covering = [s for s in scenes if common.Footprint(s.path, boxes[s.path]).intersects(
          tile.bounds)]
      if not covering:
        no_scene += 1
        continue
      box = common.tile_lonlat_bounds(tile)
      tile = tile.with_sources([s.path for s in covering])
      area_tiles.append(tile)
      area_units.append(TileUnit(tile=tile, scenes=tuple(covering),
                                 worldcover=common.covering(worldcover, box),
                                 vcf=common.covering(vcf, box)))
    assigned = common.assign_splits(
        [t.tile_id for t in area_tiles], [t.lon for t in area_tiles],
        [t.lat for t in area_tiles], region=region, angle=area.split_angle,
        split_csv=area.split_csv)
    unlisted = common.add_units(units, centres, area_units, area_tiles, assigned)
    left_out[name] = {'tiles_without_scene': no_scene, 'not_in_split_csv': unlisted,
                      'acquisitions_outside_year': outside}

  if config.kind == 'acquisitions':
    method = composite.composite_description(settings.method, settings.nodata_values,
                                             settings.noise_floor_db)
    made = f'seasonal composites of year {settings.year} from per-acquisition GeoTIFFs: {method}'
  else:
    made = 'ready seasonal composites (GeoTIFF), VV-VH recomputed as VV_dB - VH_dB'
  resampled = ('bilinear in linear power' if settings.resample_in_linear_power
               else f'{settings.resampling} in the file units')
  contract = schema.InputContract(
      tile_size=config.tile_size, pixel_size_m=float(config.pixel_size),
      composite=f'{made}; resampled onto a {config.pixel_size:g} m UTM grid, {resampled}')
  common.check_shards(config, units, 'tiles', f'; or cut more tiles with a smaller '
                      f'--config.tile_size (now {config.tile_size})')
  areas = ', '.join(a.name or a.region for a in config.areas)
  return common.Plan(
      units=units, make_examples=functools.partial(tile_examples, settings=settings),
      contract=contract, description=f'Sentinel-1 tiles from GeoTIFF {config.kind}: {areas}',
      left_out=left_out, centres=centres)


# --- Reading one tile ------------------------------------------------------------------------


def _read_scene(scene: SceneFile, tile: tiling.TileSpec, settings: Settings) -> np.ndarray:
  """A scene's bands on the tile, in dB, NaN for no data: (bands, H, W) float32."""
  linear_resampling = settings.resample_in_linear_power and scene.units == 'dB'
  values = tiling.read_on_tile(scene.path, tile, settings.resampling, list(scene.bands),
                               nodata=scene.nodata, in_linear_power=linear_resampling)
  for value in settings.nodata_values:
    if not math.isnan(value):
      values[values == value] = np.nan
  if scene.units == 'linear':
    values = composite.linear_to_db(values)
  return composite.mask_nodata(values, nodata_values=(), noise_floor_db=settings.noise_floor_db)


def _mosaic(layers: Sequence[np.ndarray]) -> np.ndarray:
  """First valid value per pixel and band across overlapping composite files."""
  out = layers[0].copy()
  for layer in layers[1:]:
    missing = np.isnan(out)
    out[missing] = layer[missing]
  return out


def tile_image(unit: TileUnit, settings: Settings) -> np.ndarray:
  """The (H, W, 12) dB image of one tile from its covering files."""
  tile = unit.tile
  if settings.kind == 'composites':
    stack = _mosaic([_read_scene(s, tile, settings) for s in unit.scenes])
    return common.assemble(stack[:4], stack[4:])
  reads = {p: [] for p in composite.POLARISATIONS}
  seasons = {p: [] for p in composite.POLARISATIONS}
  for scene in unit.scenes:
    reads[scene.polarisation].append(_read_scene(scene, tile, settings)[0])
    seasons[scene.polarisation].append(scene.season)
  empty = np.zeros((0,) + tile.shape, np.float32)
  stacks = {p: np.stack(r) if r else empty for p, r in reads.items()}
  return composite.compose_tile(stacks['VV'], stacks['VH'], seasons['VV'], settings.method,
                                vh_seasons=seasons['VH'], nodata_values=(),
                                noise_floor_db=settings.noise_floor_db)


def tile_examples(unit: TileUnit, settings: Settings) -> list:
  """One work unit -> [example] or [writer.Skip(reason)]."""
  image = tile_image(unit, settings)
  skip = common.screen_tile(image, settings.min_valid_fraction)
  if skip is not None:
    return [skip]
  tile = unit.tile
  worldcover = common.worldcover_on_tile(unit.worldcover, tile)
  vcf = common.vcf_on_tile(unit.vcf, tile, settings.labels)
  sources = [s.path for s in unit.scenes] + list(unit.worldcover) + list(unit.vcf)
  return [common.tile_example(tile, image, worldcover, vcf, sources)]

