r"""Builds a pre-sharded TFDS dataset of 12-channel tiles from real Sentinel-1 data.

  python -m data_pipeline.build --config configs/data/m3leo.py --output DIR [--config.x=y]

Source implemented so far: ``m3leo``, the poster authors' released chips (``m3leo.ChipSet``):
each chip becomes one tile with its WorldCover label map and VCF target, in the split the
authors' CSV gives it (chips missing from the CSV, or without an S1 file, are counted and left
out). Chips with a
constant channel are skipped and counted, as the authors did. The writer is the one the
embedded dataset uses (``data_pipeline.writer``): parallel shard jobs, resumable, TFDS metadata
with the input contract and a build report.
"""

from __future__ import annotations

import functools
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
from ml_collections import config_flags

from data_pipeline import m3leo
from data_pipeline import schema
from data_pipeline import writer

COMPOSITE_M3LEO = ('Earth Engine COPERNICUS/S1_GRD seasonal medians of dB (2020), stored by the '
                   'authors as uint8 = 255 (dB + 30) / 30; decoded to dB here')


@functools.lru_cache(maxsize=None)
def _chip_set(aoi_dir: str) -> m3leo.ChipSet:
  return m3leo.ChipSet(aoi_dir)


def m3leo_examples(unit: tuple[str, str, str], passes: str, tile_size: int, vcf_band: str,
                   vcf_min_valid_fraction: float) -> list:
  """One chip (area folder, region, id) -> one tile example, or a Skip with the reason."""
  aoi_dir, region, identifier = unit
  chips = _chip_set(aoi_dir)
  image = chips.read_s1(identifier, passes)
  if image.shape[:2] != (tile_size, tile_size):
    raise ValueError(f'{chips.chip_path(identifier, m3leo.S1_DATASET)}: chip is '
                     f'{image.shape[0]} x {image.shape[1]} px, config.tile_size is {tile_size}')
  if m3leo.constant_channels(image).size:
    return [writer.Skip('constant channel')]
  if chips.available(m3leo.WORLDCOVER_DATASET, [identifier]):
    worldcover = chips.worldcover(identifier, tile_size)
  else:
    worldcover = np.full((tile_size, tile_size), schema.IGNORE_INDEX, np.uint8)
  vcf = schema.VCF_MISSING
  if chips.available(m3leo.VCF_DATASET, [identifier]):
    vcf = chips.vcf_target(identifier, band=vcf_band, min_valid_fraction=vcf_min_valid_fraction)
  chip = chips[identifier]
  return [{schema.IMAGE: image, schema.WORLDCOVER: worldcover, schema.VCF: np.float32(vcf),
           schema.LAT: chip.lat, schema.LON: chip.lon, schema.REGION: region,
           schema.TILE_ID: identifier}]


def m3leo_units(config) -> tuple[dict[str, list], dict[str, dict[str, int]]]:
  """Work units per split, and per area the chips left out (not in the CSV, no S1 file)."""
  units = {split: [] for split in schema.SPLITS}
  left_out = {}
  for area in config.areas:
    if area.region not in schema.REGIONS:
      raise ValueError(f'config.areas: region {area.region!r} is not one of {schema.REGIONS}')
    chips = m3leo.ChipSet(area.dir)
    missing = 0
    for split in schema.SPLITS:
      listed = chips.identifiers(split)
      present = chips.available(m3leo.S1_DATASET, listed)
      missing += len(listed) - len(present)
      units[split].extend((os.path.abspath(area.dir), area.region, identifier)
                          for identifier in present)
    left_out[area.dir] = {'not_in_split_csv': sum(chip.split is None for chip in chips),
                          'no_s1_file': missing}
  return {split: ids for split, ids in units.items() if ids}, left_out


def build(config, output: str, overwrite: bool = False, progress: bool = False):
  """Builds the dataset of ``config``; returns (contract, report)."""
  if config.source != 'm3leo':
    raise ValueError(f'config.source {config.source!r}: only m3leo is implemented so far')
  units, left_out = m3leo_units(config)
  make_examples = functools.partial(
      m3leo_examples, passes=config.passes, tile_size=config.tile_size,
      vcf_band=config.vcf_band, vcf_min_valid_fraction=config.vcf_min_valid_fraction)
  contract = schema.InputContract(tile_size=config.tile_size, composite=COMPOSITE_M3LEO)
  contract, report = writer.build_dataset(
      output, units, make_examples, contract, num_shards=config.num_shards,
      host_count=config.host_count, workers=config.workers, overwrite=overwrite,
      progress=progress, description=f'Sentinel-1 tiles from the authors\' chips: '
      f'{", ".join(a.dir for a in config.areas)} ({config.passes} passes)')
  report['left_out'] = left_out
  return contract, report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from data_pipeline import input as data_input  # pylint: disable=g-import-not-at-top
  data_input.configure_tensorflow()
  t0 = time.perf_counter()
  _, report = build(flags.FLAGS.config, flags.FLAGS.output, flags.FLAGS.overwrite, progress=True)
  tiles = sum(v['examples'] for k, v in report.items() if k in schema.SPLITS)
  elapsed = time.perf_counter() - t0
  print(f'Wrote {tiles} tiles to {flags.FLAGS.output} in {elapsed:.1f} s '
        f'({tiles / elapsed:.1f} tiles/s): {report}')


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'configs/data/<file>.py', lock_config=True)
  flags.DEFINE_string('output', None, 'Dataset folder to create (or to resume).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing dataset.')
  flags.mark_flags_as_required(['config', 'output'])
  app.run(main)
