"""Source ``earth_engine``: Earth Engine TFRecord patch exports of seasonal composites.

Config: ``configs/data/earth_engine.py``. Per area, the prefix of one export (``<prefix>-NNNNN
.tfrecord[.gz]`` plus ``<prefix>-mixer.json``, see ``data_pipeline.ingest.ee_export``) whose patches are
tiles: ``patchDimensions`` must be the tile size (after cutting the ``kernelSize`` margin). The
export's bands are mapped to VV and VH per season by ``config.bands``; VV-VH is recomputed as
VV_dB - VH_dB, as in every source. Labels come from WorldCover / VCF GeoTIFFs read onto each
patch's grid, exactly as in the geotiff source.

Planning reads the mixers, counts the records of every shard (decompressing, not parsing) and
parses each shard's first record, so a truncated or corrupt shard, a count that disagrees with
the mixer, or a band name (``config.bands``) or kernel size the export does not have stops the
build before anything is written. A work unit is one shard's records of one split: each shard
is then decompressed once per split and each record parsed once.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import rasterio.crs

from data_pipeline.ingest import composite
from data_pipeline.ingest import ee_export
from data_pipeline import schema
from data_pipeline.ingest import tiling
from data_pipeline.ingest.sources import common

# Project band -> export feature name, VV then VH, winter..fall: the order read_shard returns.
BAND_KEYS = tuple(f'{p}_{s}' for p in ('vv', 'vh') for s in schema.SEASONS)


@dataclasses.dataclass(frozen=True)
class Settings:
  bands: tuple[tuple[str, str], ...]  # (export feature, project band) in BAND_KEYS order
  kernel_size: int
  fill_value: float | None
  compression: str
  units: str
  noise_floor_db: float | None
  min_valid_fraction: float
  labels: common.LabelSettings


@dataclasses.dataclass(frozen=True)
class ShardUnit:
  """The records of one split in one export shard."""
  file: str
  mixer: str
  first_index: int
  records: tuple[int, ...]
  tiles: tuple[tiling.TileSpec, ...]
  worldcover: tuple[tuple[str, ...], ...]
  vcf: tuple[tuple[str, ...], ...]


def _settings(config) -> Settings:
  missing = [key for key in BAND_KEYS if not config.bands.get(key)]
  if missing:
    raise ValueError(f'config.bands must name the export feature of every one of {BAND_KEYS}; '
                     f'missing {missing}')
  if config.units not in ('dB', 'linear'):
    raise ValueError(f"config.units must be 'dB' (COPERNICUS/S1_GRD) or 'linear' "
                     f'(S1_GRD_FLOAT), got {config.units!r}')
  fill = config.fill_value
  return Settings(
      bands=tuple((config.bands[key], key) for key in BAND_KEYS),
      kernel_size=int(config.kernel_size),
      fill_value=None if fill is None or math.isnan(fill) else float(fill),
      compression=config.compression, units=config.units,
      noise_floor_db=config.noise_floor_db, min_valid_fraction=float(config.min_valid_fraction),
      labels=common.LabelSettings(config.vcf_band, float(config.vcf_min_valid_fraction)))


def plan(config) -> common.Plan:
  """Tiles (one per patch), shard record counts and splits of every area's export."""
  common.check_tile_size(config)
  settings = _settings(config)
  worldcover = common.label_footprints(config.worldcover, 'config.worldcover')
  vcf = common.label_footprints(config.vcf, 'config.vcf')
  units, centres, left_out = {}, {}, {}
  for index, area in enumerate(config.areas):
    region = common.region_of(area, index)
    name = area.name or f'{region}_{index}'
    mixer_file = ee_export.mixer_path(area.prefix)
    if not area.prefix:
      raise ValueError(f'config.areas[{index}].prefix: no export prefix given')
    mixer = ee_export.read_mixer(mixer_file)
    if (mixer.patch_width, mixer.patch_height) != (config.tile_size, config.tile_size):
      fix = (f'set --config.tile_size={mixer.patch_width} or export'
             if mixer.patch_width == mixer.patch_height else 'export')
      raise ValueError(f'{mixer_file}: patches are {mixer.patch_width} x {mixer.patch_height} px '
                       f'but config.tile_size is {config.tile_size}; {fix} with '
                       f'patchDimensions [{config.tile_size}, {config.tile_size}]')
    crs = rasterio.crs.CRS.from_user_input(mixer.crs)
    if not crs.is_projected:
      raise ValueError(f'{mixer_file}: export CRS {mixer.crs} is not projected; tiles must be '
                       '10 m pixels in a metric CRS (export with crs set to the UTM zone)')
    files = ee_export.find_export_files(area.prefix)
    counts = [ee_export.count_records(f, settings.compression) for f in files]
    if sum(counts) != mixer.total_patches:
      raise ee_export.ExportError(
          f'{area.prefix}: the {len(files)} shard(s) hold {sum(counts)} records but the mixer '
          f'{mixer_file} says totalPatches = {mixer.total_patches}')
    _check_bands(files, counts, mixer, settings)
    tiles = [tiling.tile_for(mixer.patch_transform(i), crs, config.tile_size,
                             row=mixer.position(i)[0], col=mixer.position(i)[1], region=region)
             for i in range(mixer.total_patches)]
    boxes = [common.tile_lonlat_bounds(t) for t in tiles]
    if tiles:
      area_box = common.union_bounds([common.Footprint('', b) for b in boxes])
      for what, footprints in (('config.worldcover', worldcover), ('config.vcf', vcf)):
        common.check_labels_overlap(footprints, area_box, what, name)
    assigned = common.assign_splits(
        [t.tile_id for t in tiles], [t.lon for t in tiles], [t.lat for t in tiles],
        region=region, angle=area.split_angle, split_csv=area.split_csv)
    unlisted = 0
    first = 0
    for file, count in zip(files, counts):
      for split in schema.SPLITS:
        records = [r for r in range(count) if assigned[first + r] == split]
        if not records:
          continue
        shard_tiles = tuple(tiles[first + r].with_sources([file]) for r in records)
        unit = ShardUnit(
            file=file, mixer=mixer_file, first_index=first, records=tuple(records),
            tiles=shard_tiles,
            worldcover=tuple(common.covering(worldcover, boxes[first + r]) for r in records),
            vcf=tuple(common.covering(vcf, boxes[first + r]) for r in records))
        units.setdefault(split, []).append(unit)
        lons, lats = centres.setdefault(split, ([], []))
        lons.extend(t.lon for t in shard_tiles)
        lats.extend(t.lat for t in shard_tiles)
      unlisted += sum(assigned[first + r] is None for r in range(count))
      first += count
    left_out[name] = {'not_in_split_csv': unlisted}
  contract = schema.InputContract(
      tile_size=config.tile_size, pixel_size_m=float(config.pixel_size),
      composite=f'Earth Engine export of seasonal composites ({config.composite}), bands '
                f'{dict(settings.bands)} in {settings.units}; VV-VH recomputed as VV_dB - VH_dB')
  # A work unit is one export shard's records of a split.
  common.check_shards(config, units, 'export shards with its tiles')
  areas = ', '.join(a.name or a.region for a in config.areas)
  return common.Plan(
      units=units, make_examples=functools.partial(shard_examples, settings=settings),
      contract=contract, description=f'Sentinel-1 tiles from Earth Engine exports: {areas}',
      left_out=left_out, centres=centres)


def _check_bands(files: list[str], counts: list[int], mixer: ee_export.Mixer,
                 settings: Settings) -> None:
  """Parses the first record of every shard, so that bands are checked before writing."""
  first = 0
  for file, count in zip(files, counts):
    try:
      ee_export.check_bands(file, mixer, first, dict(settings.bands), settings.kernel_size,
                            settings.compression)
    except ee_export.ExportError as err:
      raise ee_export.ExportError(
          f"{err}. config.bands gives the export's feature name of each band (e.g. "
          f'--config.bands.vv_winter=VV_winter), config.kernel_size its kernelSize (now '
          f'{settings.kernel_size}: --config.kernel_size=...)') from None
    first += count


def shard_examples(unit: ShardUnit, settings: Settings) -> list:
  """One shard's records of one split -> examples (or Skips), in record order."""
  mixer = ee_export.read_mixer(unit.mixer)
  out = []
  patches = ee_export.read_shard(unit.file, mixer, unit.first_index, dict(settings.bands),
                                 settings.kernel_size, settings.fill_value,
                                 settings.compression, records=unit.records)
  for k, patch in enumerate(patches):
    values = np.moveaxis(patch.data, -1, 0)  # (8, H, W)
    if settings.units == 'linear':
      values = composite.linear_to_db(values)
    values = composite.mask_nodata(values, nodata_values=(),
                                   noise_floor_db=settings.noise_floor_db)
    tile = unit.tiles[k]
    if patch.index != unit.first_index + unit.records[k]:
      raise ee_export.ExportError(f'{unit.file}: read patch {patch.index} where patch '
                                  f'{unit.first_index + unit.records[k]} was planned')
    image = common.assemble(values[:4], values[4:])
    skip = common.screen_tile(image, settings.min_valid_fraction)
    if skip is not None:
      out.append(skip)
      continue
    worldcover = common.worldcover_on_tile(unit.worldcover[k], tile)
    vcf = common.vcf_on_tile(unit.vcf[k], tile, settings.labels)
    sources = [unit.file] + list(unit.worldcover[k]) + list(unit.vcf[k])
    out.append(common.tile_example(tile, image, worldcover, vcf, sources))
  if len(out) != len(unit.records):
    raise ee_export.ExportError(f'{unit.file}: expected records {list(unit.records)}, read '
                                f'{len(out)}; the shard changed since the build was planned')
  return out
