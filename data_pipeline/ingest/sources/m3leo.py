"""Source ``m3leo``: the poster authors' released chips (M3LEO / geetiles layout).

Config: ``configs/data/m3leo.py``. Each chip of an area (``m3leo.ChipSet``) becomes one tile with
its WorldCover label map and VCF target, in the split the authors' CSV gives it; chips missing
from the CSV, or without an S1 file, are counted and left out. Chips with a constant channel are
skipped and counted, as the authors did. A label chip must be in the S1 chip's CRS: they are cut
from the same geometry, so a different CRS means mixed-up files.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from data_pipeline.ingest import labels
from data_pipeline.ingest import m3leo
from data_pipeline import schema
from data_pipeline import writer
from data_pipeline.ingest.sources import common

COMPOSITE = ('Earth Engine COPERNICUS/S1_GRD seasonal medians of dB (2020), stored by the '
             'authors as uint8 = 255 (dB + 30) / 30; decoded to dB here')


@functools.lru_cache(maxsize=None)
def _chip_set(aoi_dir: str) -> m3leo.ChipSet:
  return m3leo.ChipSet(aoi_dir)


def chip_examples(unit: tuple[str, str, str], passes: str, tile_size: int, vcf_band: str,
                  vcf_min_valid_fraction: float) -> list:
  """One chip (area folder, region, id) -> one tile example, or a Skip with the reason."""
  aoi_dir, region, identifier = unit
  chips = _chip_set(aoi_dir)
  s1_path = chips.chip_path(identifier, m3leo.S1_DATASET)
  image = chips.read_s1(identifier, passes)
  if image.shape[:2] != (tile_size, tile_size):
    raise ValueError(_size_mismatch(s1_path, image.shape[:2], tile_size))
  if m3leo.constant_channels(image).size:
    return [writer.Skip('constant channel')]
  sources = [s1_path]
  worldcover = np.full((tile_size, tile_size), schema.IGNORE_INDEX, np.uint8)
  if chips.available(m3leo.WORLDCOVER_DATASET, [identifier]):
    path = chips.chip_path(identifier, m3leo.WORLDCOVER_DATASET)
    labels.check_same_crs(path, s1_path)
    worldcover = chips.worldcover(identifier, tile_size)
    sources.append(path)
  vcf = schema.VCF_MISSING
  if chips.available(m3leo.VCF_DATASET, [identifier]):
    path = chips.chip_path(identifier, m3leo.VCF_DATASET)
    labels.check_same_crs(path, s1_path)
    vcf = chips.vcf_target(identifier, band=vcf_band, min_valid_fraction=vcf_min_valid_fraction)
    sources.append(path)
  chip = chips[identifier]
  return [{schema.IMAGE: image, schema.WORLDCOVER: worldcover, schema.VCF: np.float32(vcf),
           schema.LAT: chip.lat, schema.LON: chip.lon, schema.REGION: region,
           schema.TILE_ID: identifier, schema.CRS: m3leo.CHIP_CRS,
           schema.TRANSFORM: np.asarray(tuple(chip.transform(tile_size))[:6], np.float64),
           schema.SOURCES: schema.join_sources(sources)}]


def _size_mismatch(path: str, shape: tuple[int, int], tile_size: int) -> str:
  fix = f'; set --config.tile_size={shape[0]}' if shape[0] == shape[1] else ''
  return f'{path}: chip is {shape[0]} x {shape[1]} px, config.tile_size is {tile_size}{fix}'


def _check_chip_size(chips: m3leo.ChipSet, identifier: str, tile_size: int) -> None:
  """One chip's size against the tile size, from its header: a wrong tile size then stops the
  build while planning, not after the first shards are written."""
  path = chips.chip_path(identifier, m3leo.S1_DATASET)
  with labels.open_raster(path) as dataset:
    shape = (dataset.height, dataset.width)
  if shape != (tile_size, tile_size):
    raise ValueError(_size_mismatch(path, shape, tile_size))


def plan(config) -> common.Plan:
  """Work units per split (one per chip), and per area the chips left out."""
  tile_size = common.check_tile_size(config)
  units, centres, left_out = {}, {}, {}
  for index, area in enumerate(config.areas):
    region = common.region_of(area, index)
    chips = m3leo.ChipSet(area.dir)
    missing = 0
    size_checked = False
    for split in schema.SPLITS:
      listed = chips.identifiers(split)
      present = chips.available(m3leo.S1_DATASET, listed)
      missing += len(listed) - len(present)
      if present and not size_checked:  # The chips of an area share one size.
        _check_chip_size(chips, present[0], tile_size)
        size_checked = True
      units.setdefault(split, []).extend(
          (os.path.abspath(area.dir), region, identifier) for identifier in present)
      lons, lats = centres.setdefault(split, ([], []))
      lons.extend(chips[i].lon for i in present)
      lats.extend(chips[i].lat for i in present)
    left_out[area.dir] = {'not_in_split_csv': sum(chip.split is None for chip in chips),
                          'no_s1_file': missing}
  make_examples = functools.partial(
      chip_examples, passes=config.passes, tile_size=config.tile_size,
      vcf_band=config.vcf_band, vcf_min_valid_fraction=config.vcf_min_valid_fraction)
  units = {split: u for split, u in units.items() if u}
  common.check_shards(config, units, 'chips')
  areas = ', '.join(a.dir for a in config.areas)
  return common.Plan(
      units=units, make_examples=make_examples,
      contract=schema.InputContract(tile_size=config.tile_size, composite=COMPOSITE),
      description=f"Sentinel-1 tiles from the authors' chips: {areas} ({config.passes} passes)",
      left_out=left_out, centres=centres)
