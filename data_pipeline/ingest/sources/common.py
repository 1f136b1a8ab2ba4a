"""What every gridded ingestion source shares: plans, footprints, labels on a tile, splits.

A source's ``plan(config)`` decides, before any pixel is read, which tiles exist, where they
lie, which files cover them and which split each belongs to (a :class:`Plan`). Its
``make_examples(unit)`` then reads one unit's pixels and labels into examples for
``data_pipeline.writer``. The helpers here keep the geotiff and Earth Engine sources identical in
everything but how the backscatter is read, which is what makes their outputs comparable.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import Any, Callable, Sequence

import numpy as np
import rasterio.crs
import rasterio.errors
import rasterio.warp

from data_pipeline.ingest import labels
from data_pipeline import schema
from data_pipeline.ingest import splits
from data_pipeline.ingest import tiling
from data_pipeline import writer


@dataclasses.dataclass
class Plan:
  """Everything the writer needs, decided before reading pixels.

  Attributes:
    units: Split -> work units (picklable, with a stable repr: it fingerprints the build).
    make_examples: Picklable function of one unit -> examples or ``writer.Skip`` records.
    contract: The dataset's input contract (statistics are filled in by the writer).
    description: The dataset description for the TFDS metadata.
    left_out: Per area, reason -> number of tiles or chips left out before reading pixels.
    centres: Split -> (lon, lat) lists of the units' tile centres, for the split map.
  """
  units: dict[str, list]
  make_examples: Callable[[Any], list]
  contract: schema.InputContract
  description: str
  left_out: dict[str, dict[str, int]]
  centres: dict[str, tuple[list[float], list[float]]]


# --- Files and footprints --------------------------------------------------------------------


def find_files(pattern: str, what: str) -> list[str]:
  """Sorted absolute paths matching a glob (``**`` allowed); an error naming ``what`` if none."""
  if not pattern:
    raise ValueError(f'{what}: no file pattern given')
  paths = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern),
                                                       recursive=True) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f'{what}: no file matches {pattern!r}')
  return paths


@dataclasses.dataclass(frozen=True)
class Footprint:
  """A raster's extent: lon/lat bounds (west, south, east, north) unless said otherwise."""
  path: str
  bounds: tuple[float, float, float, float]

  def intersects(self, other: Sequence[float]) -> bool:
    west, south, east, north = other
    return (self.bounds[0] < east and west < self.bounds[2] and
            self.bounds[1] < north and south < self.bounds[3])


def footprint(path: str) -> Footprint:
  """The lon/lat footprint of a raster (densified outline); errors name the file."""
  with labels.open_raster(path) as dataset:
    if dataset.crs is None:
      raise ValueError(f'{path}: raster has no CRS, so it cannot be placed on the tile grid')
    bounds = rasterio.warp.transform_bounds(dataset.crs, tiling.WGS84, *dataset.bounds,
                                            densify_pts=21)
  if not all(math.isfinite(v) for v in bounds):
    raise ValueError(f'{path}: its bounds do not map to lon/lat ({bounds}); is its CRS right?')
  return Footprint(path, tuple(float(v) for v in bounds))


def bounds_in(path: str, crs) -> tuple[float, float, float, float]:
  """A raster's bounds in ``crs`` (densified outline when its own CRS differs)."""
  with labels.open_raster(path) as dataset:
    if dataset.crs is None:
      raise ValueError(f'{path}: raster has no CRS, so it cannot be placed on the tile grid')
    if dataset.crs == crs:
      return tuple(float(v) for v in dataset.bounds)
    return tuple(rasterio.warp.transform_bounds(dataset.crs, crs, *dataset.bounds,
                                                densify_pts=21))


def label_footprints(pattern: str, what: str) -> list[Footprint]:
  """Footprints of the label rasters matching a glob; none for an empty pattern."""
  return [footprint(p) for p in find_files(pattern, what)] if pattern else []


def tile_lonlat_bounds(tile: tiling.TileSpec) -> tuple[float, float, float, float]:
  return tuple(rasterio.warp.transform_bounds(tile.crs, tiling.WGS84, *tile.bounds,
                                              densify_pts=21))


def union_bounds(footprints: Sequence[Footprint]) -> tuple[float, float, float, float]:
  array = np.asarray([f.bounds for f in footprints])
  return (float(array[:, 0].min()), float(array[:, 1].min()), float(array[:, 2].max()),
          float(array[:, 3].max()))


def covering(footprints: Sequence[Footprint], bounds: Sequence[float]) -> tuple[str, ...]:
  """Paths of the footprints that intersect lon/lat ``bounds``, in footprint order."""
  return tuple(f.path for f in footprints if f.intersects(bounds))


def check_labels_overlap(footprints: Sequence[Footprint], area_bounds: Sequence[float],
                         what: str, area: str) -> None:
  """A label set that misses the whole area is a CRS (or file) mix-up, not an empty label."""
  if footprints and not any(f.intersects(area_bounds) for f in footprints):
    shown = ', '.join(f'{f.path} {tuple(round(v, 3) for v in f.bounds)}' for f in footprints[:3])
    raise ValueError(
        f'{what}: none of its {len(footprints)} files overlaps area {area} (lon/lat '
        f'{tuple(round(v, 3) for v in area_bounds)}); first ones: {shown}. Check their CRS: a '
        'label whose CRS does not match its coordinates lands somewhere else on the globe')


# --- Labels ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelSettings:
  """How tile labels are made (see ``labels.vcf_tile_mean`` and ``labels.worldcover_tile``)."""
  vcf_band: str = 'Percent_Tree_Cover'
  vcf_min_valid_fraction: float = 0.5


def worldcover_on_tile(paths: Sequence[str], tile: tiling.TileSpec) -> np.ndarray:
  """WorldCover class indices on the tile from every covering product tile (first one wins)."""
  out = np.full(tile.shape, schema.IGNORE_INDEX, np.uint8)
  for path in paths:
    classes = labels.worldcover_tile(path, tile.transform, tile.crs, tile.shape)
    missing = out == schema.IGNORE_INDEX
    out[missing] = classes[missing]
  return out


def vcf_on_tile(paths: Sequence[str], tile: tiling.TileSpec, settings: LabelSettings) -> float:
  """Area-weighted VCF mean over the tile across the covering MODIS rasters.

  Each raster gives its mean over its valid part of the tile and that part's share of the tile;
  MODIS tiles do not overlap, so the shares add up and the means combine weighted by them.
  """
  total = weight = 0.0
  for path in paths:
    mean, fraction = labels.vcf_tile_mean(path, tile.bounds, tile.crs, band=settings.vcf_band,
                                          min_valid_fraction=0.0, return_valid_fraction=True)
    if fraction > 0 and math.isfinite(mean):
      total += mean * fraction
      weight += fraction
  if weight <= 0 or weight < settings.vcf_min_valid_fraction:
    return schema.VCF_MISSING
  return total / weight


# --- Splits ------------------------------------------------------------------------------------


def assign_splits(tile_ids: Sequence[str], lon: Sequence[float], lat: Sequence[float], *,
                  region: str, angle: float | None, split_csv: str) -> list[str | None]:
  """The split of every tile of one area: the split CSV's if given, else the banding split.

  Returns None for tiles a split CSV does not list (they are left out and counted).
  """
  if split_csv:
    listed = splits.read_split_csv(split_csv)
    return [listed.get(tile_id) for tile_id in tile_ids]
  if angle is None:
    if region not in splits.AREA_ANGLES:
      raise ValueError(f'region {region!r} has no banding angle in splits.AREA_ANGLES; set the '
                       "area's split_angle (radians)")
    angle = splits.AREA_ANGLES[region]
  if not len(tile_ids):
    return []
  return [str(s) for s in splits.banding_split(lon, lat, angle)]


# --- Examples ----------------------------------------------------------------------------------


def any_channel_valid_fraction(image: np.ndarray) -> float:
  """Share of pixels with at least one finite channel, for (H, W, C) tiles.

  Not "every channel": a season without any acquisition is no-data for the whole tile (real
  archives have such gaps), and such tiles are kept with that season as NaN rather than dropped.
  """
  return float(np.isfinite(image).any(axis=-1).mean())


def assemble(vv: np.ndarray, vh: np.ndarray) -> np.ndarray:
  """(4, H, W) VV and VH composites in dB -> (H, W, 12) in ``schema.BAND_NAMES`` order."""
  tile = np.empty(vv.shape[1:] + (schema.NUM_CHANNELS,), np.float32)
  tile[..., schema.product_indices('vv')] = np.moveaxis(vv, 0, -1)
  tile[..., schema.product_indices('vh')] = np.moveaxis(vh, 0, -1)
  tile[..., schema.product_indices('vv_minus_vh')] = np.moveaxis(vv - vh, 0, -1)
  return tile


def tile_example(tile: tiling.TileSpec, image: np.ndarray, worldcover: np.ndarray, vcf: float,
                 sources: Sequence[str]) -> dict[str, Any]:
  """A writer example of one georeferenced tile."""
  return {schema.IMAGE: image, schema.WORLDCOVER: worldcover, schema.VCF: np.float32(vcf),
          schema.LAT: np.float32(tile.lat), schema.LON: np.float32(tile.lon),
          schema.REGION: tile.region, schema.TILE_ID: tile.tile_id,
          schema.CRS: tile.crs.to_string(),
          schema.TRANSFORM: np.asarray(tuple(tile.transform)[:6], np.float64),
          schema.SOURCES: schema.join_sources(sources)}


def screen_tile(image: np.ndarray, min_valid_fraction: float) -> writer.Skip | None:
  """A Skip for a tile that must not be written (empty, too little data, constant), else None."""
  from data_pipeline.ingest import m3leo  # pylint: disable=g-import-not-at-top
  fraction = any_channel_valid_fraction(image)
  if fraction == 0.0:
    return writer.Skip(tiling.DROP_EMPTY)
  if fraction < min_valid_fraction:
    return writer.Skip(tiling.DROP_LOW_VALID)
  if m3leo.constant_channels(image).size:
    return writer.Skip('constant channel')
  return None


def add_units(plan_units: dict[str, list], centres: dict[str, tuple[list, list]],
              units: Sequence[Any], tiles: Sequence[tiling.TileSpec],
              assigned: Sequence[str | None]) -> int:
  """Appends units to their splits; returns how many had no split."""
  unlisted = 0
  for unit, tile, split in zip(units, tiles, assigned):
    if split is None:
      unlisted += 1
      continue
    plan_units.setdefault(split, []).append(unit)
    lons, lats = centres.setdefault(split, ([], []))
    lons.append(tile.lon)
    lats.append(tile.lat)
  return unlisted


def region_of(area, index: int) -> str:
  if area.region not in schema.REGIONS:
    raise ValueError(f'config.areas[{index}].region {area.region!r} is not one of '
                     f'{schema.REGIONS}')
  return area.region


def check_crs(value: str, what: str) -> rasterio.crs.CRS | None:
  if not value:
    return None
  try:
    return rasterio.crs.CRS.from_user_input(value)
  except rasterio.errors.CRSError as e:
    raise ValueError(f'{what}: not a CRS: {value!r} ({e})') from e


# --- Build settings ----------------------------------------------------------------------------
# Checked with the names the user types (--config.x=...), before the writer's own checks.


def check_tile_size(config) -> int:
  """``config.tile_size`` as a positive int, or an error naming the flag."""
  value = config.tile_size
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'config.tile_size must be a positive number of pixels, got {value!r} '
                     '(--config.tile_size=...)')
  return int(value)


def check_shards(config, units: dict[str, list], what: str = 'tiles', hint: str = '') -> None:
  """Checks ``config.num_shards``: a positive multiple of ``config.host_count``, and no more
  than any split has units; errors name the flags to change.

  Args:
    config: The build config.
    units: Split -> work units, as in :class:`Plan`.
    what: What a unit is, for the message ('tiles', 'chips', ...).
    hint: Another way to get more units, appended to the message.
  """
  num_shards, host_count = config.num_shards, config.host_count
  if host_count < 1:
    raise ValueError(f'config.host_count must be >= 1, got {host_count} (--config.host_count=...)')
  if num_shards < 1 or num_shards % host_count:
    low = num_shards // host_count * host_count
    choices = ' or '.join(f'--config.num_shards={n}' for n in (low, low + host_count) if n > 0)
    raise ValueError(f'config.num_shards = {num_shards} must be a positive multiple of '
                     f'config.host_count = {host_count}, so that every host reads whole files: '
                     f'set {choices}')
  counts = {split: len(split_units) for split, split_units in units.items() if split_units}
  if not counts:
    return
  split = min(counts, key=counts.get)
  if counts[split] >= num_shards:
    return
  fit = counts[split] // host_count * host_count  # The most shards it can have.
  multiple = f' (a multiple of config.host_count = {host_count})' if host_count > 1 else ''
  fix = (f'set --config.num_shards={fit} or less{multiple}' if fit else
         f'with config.host_count = {host_count} every split needs {host_count} {what} or more')
  raise ValueError(f'split {split!r} has too few {what} ({counts[split]}) for '
                   f'config.num_shards = {num_shards} (a shard needs at least one): {fix}{hint}')
