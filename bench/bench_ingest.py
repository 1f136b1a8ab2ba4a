r"""Ingestion throughput: real-format inputs -> pre-sharded TFDS tiles, in tiles/s.

  .venv/bin/python bench/bench_ingest.py [--rows 3 --cols 4 --dates_per_season 2]

Writes, in a temporary folder, one area of ``rows x cols`` 448 px tiles at 10 m as
  * per-acquisition GeoTIFFs (float32 dB, VV and VH, ``dates_per_season`` dates per season), and
  * an Earth Engine style export of 8-band seasonal composites (GZIP float features + mixer),
plus WorldCover and VCF rasters over the area, and times ``data_pipeline.ingest.build.build`` for the
geotiff source (1 and 2 worker processes) and for the earth_engine source. The time includes
planning (opening every file, counting export records), compositing, labels, quantisation,
serialisation and the metadata: everything from input files to a readable dataset.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import rasterio.warp

import configs.data.earth_engine as ee_config
import configs.data.geotiff as geotiff_config
from data_pipeline.ingest import build
from data_pipeline import input as data_input
from data_pipeline import schema
from tests import ingest_fixtures as fx
from tests.test_ee_export import write_export

_ROWS = flags.DEFINE_integer('rows', 3, 'Tile rows of the area.')
_COLS = flags.DEFINE_integer('cols', 4, 'Tile columns of the area.')
_DATES = flags.DEFINE_integer('dates_per_season', 2, 'Acquisitions per season and polarisation.')
_TILE = 448
_MONTHS = {'winter': (12, 1, 2), 'spring': (3, 4, 5), 'summer': (6, 7, 8), 'fall': (9, 10, 11)}


def _scenes(folder, rows, cols, dates_per_season, rng):
  """Per-acquisition files; returns the (8, H, W) median composites for the EE export."""
  shape = (rows * _TILE, cols * _TILE)
  medians = []
  for polarisation, base in (('VV', -11.0), ('VH', -18.0)):
    for season in schema.SEASONS:
      stack = []
      for k in range(dates_per_season):
        month = _MONTHS[season][k % 3]
        year = 2019 if month == 12 else 2020
        values = (base + 3 * rng.standard_normal(shape)).astype(np.float32)
        fx.write_tif(folder / f'S1A_IW_GRDH_{year}{month:02d}{10 + k:02d}T053000_{polarisation}.tif',
                     values, fx.utm_transform())
        stack.append(values)
      medians.append(np.median(stack, axis=0))
  return np.stack(medians)


def _timed_build(config, output) -> tuple[float, int]:
  start = time.perf_counter()
  _, report = build.build(config, output)
  tiles = sum(report[s]['examples'] for s in schema.SPLITS if s in report)
  return time.perf_counter() - start, tiles


def main(argv):
  del argv
  data_input.configure_tensorflow()
  rows, cols = _ROWS.value, _COLS.value
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    composites = _scenes(root / 'scenes', rows, cols, _DATES.value, rng)
    left, top = fx.ORIGIN
    bounds = rasterio.warp.transform_bounds(fx.UTM33, 'EPSG:4326', left, top - rows * _TILE * 10,
                                            left + cols * _TILE * 10, top)
    worldcover = fx.worldcover_over(root / 'wc.tif', bounds, cells=2048)
    vcf = fx.vcf_over(root / 'vcf.tif', bounds, cells=64)
    files = len(os.listdir(root / 'scenes'))
    print(f'area: {rows} x {cols} tiles of {_TILE} px, {files} acquisition GeoTIFFs '
          f'({_DATES.value} per season and polarisation), cpus={os.cpu_count()}')
    for workers in (1, 2):
      config = geotiff_config.get_config()
      config.areas[0].scenes = str(root / 'scenes' / '*.tif')
      config.worldcover, config.vcf = worldcover, vcf
      config.num_shards, config.workers = 2, workers
      seconds, tiles = _timed_build(config, str(root / f'geotiff_{workers}'))
      print(f'geotiff acquisitions, workers={workers}: {tiles} tiles in {seconds:.1f} s = '
            f'{tiles / seconds:.2f} tiles/s')
    patches = []
    for index in range(rows * cols):
      row, col = divmod(index, cols)
      patches.append(np.moveaxis(
          composites[:, row * _TILE:(row + 1) * _TILE, col * _TILE:(col + 1) * _TILE], 0, -1))
    (root / 'ee').mkdir()
    names = [f'{p}_{s}' for p in ('VV', 'VH') for s in schema.SEASONS]
    prefix = write_export(root / 'ee', np.stack(patches), name='s1', bands=names,
                          compression='GZIP', shard_sizes=[rows * cols], patches_per_row=cols,
                          matrix=list(fx.utm_transform())[:6], dims=(_TILE, _TILE))
    config = ee_config.get_config()
    config.areas[0].prefix = prefix
    config.worldcover, config.vcf = worldcover, vcf
    config.num_shards = 1
    seconds, tiles = _timed_build(config, str(root / 'ee_ds'))
    print(f'earth_engine export (GZIP float features): {tiles} tiles in {seconds:.1f} s = '
          f'{tiles / seconds:.2f} tiles/s')


if __name__ == '__main__':
  app.run(main)
