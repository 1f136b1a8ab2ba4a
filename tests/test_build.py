"""data_pipeline.ingest.build on a small chip set in the poster authors' layout."""

import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_bounds
import tensorflow_datasets as tfds

import configs.data.m3leo as m3leo_config
from data_pipeline.ingest import build
from data_pipeline.ingest import m3leo
from data_pipeline import schema
from data_pipeline.ingest.sources import m3leo as m3leo_source
from tests.test_m3leo import CHIPS, SIZE, _build_area


def _write_label(path, value, bounds, count=1):
  path.parent.mkdir(parents=True, exist_ok=True)
  with rasterio.open(path, 'w', driver='GTiff', width=8, height=8, count=count, dtype='uint8',
                     crs='EPSG:4326', transform=from_bounds(*bounds, 8, 8), nodata=0) as f:
    f.write(np.full((count, 8, 8), value, np.uint8))


def test_authors_chips_become_a_tfds_dataset(tmp_path):
  aoi, written = _build_area(tmp_path)
  train_id, train_bounds = CHIPS[0]
  # Labels for the training chip only: 40 % tree cover, all tree-cover class (code 10).
  _write_label(aoi / m3leo.VCF_DATASET / f'{train_id}.tif', 40, train_bounds)
  _write_label(aoi / m3leo.WORLDCOVER_DATASET / f'{train_id}.tif', 10, train_bounds)
  config = m3leo_config.get_config()
  config.areas[0].dir = str(aoi)
  config.tile_size = SIZE
  config.num_shards = 1
  contract, report = build.build(config, str(tmp_path / 'ds'))

  builder = tfds.builder_from_directory(str(tmp_path / 'ds'))
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 1, 'validation': 1, 'test': 1}
  assert report['left_out'] == {str(aoi): {'not_in_split_csv': 1, 'no_s1_file': 0}}
  example = next(iter(tfds.as_numpy(builder.as_dataset('train'))))
  assert example[schema.TILE_ID].decode() == train_id
  expected = m3leo.read_s1_chip(str(aoi / m3leo.S1_DATASET / f'{train_id}.tif'))
  np.testing.assert_array_equal(example[schema.IMAGE], expected.astype(np.float16))
  assert example[schema.VCF] == 40.0
  np.testing.assert_array_equal(example[schema.WORLDCOVER], 0)  # Code 10 = class 0.
  assert example[schema.LON] == np.float32(0.5 * (train_bounds[0] + train_bounds[2]))
  assert schema.REGIONS[example[schema.REGION]] == 'europe'
  # Chips without label files keep the image and get missing labels.
  test_example = next(iter(tfds.as_numpy(builder.as_dataset('test'))))
  assert np.isnan(test_example[schema.VCF])
  assert (test_example[schema.WORLDCOVER] == schema.IGNORE_INDEX).all()
  assert contract.composite == m3leo_source.COMPOSITE and len(contract.mean) == 12
  assert written  # The fixture wrote the S1 chips that were read back above.


def test_constant_chips_are_skipped_and_counted(tmp_path):
  aoi, written = _build_area(tmp_path)
  train_id, bounds = CHIPS[0]
  bands = written[train_id].copy()
  bands[10] = 0  # A summer without ascending VH: Earth Engine fills it with 0.
  with rasterio.open(aoi / m3leo.S1_DATASET / f'{train_id}.tif', 'r+') as f:
    f.write(bands)
  config = m3leo_config.get_config()
  config.areas[0].dir = str(aoi)
  config.tile_size = SIZE
  config.num_shards = 1
  # The only training chip is constant: its shard would be empty, which the writer refuses.
  with pytest.raises(ValueError, match=r"none of its 1 units gave a tile \(skipped: "
                     r"\{'constant channel': 1\}\)"):
    build.build(config, str(tmp_path / 'ds'))


def test_command_line(tmp_path):
  aoi, _ = _build_area(tmp_path)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-m', 'data_pipeline.ingest.build', '--config', 'configs/data/m3leo.py',
       '--output', str(tmp_path / 'ds'), f'--config.areas[0].dir={aoi}',
       f'--config.tile_size={SIZE}', '--config.num_shards=1'],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'Wrote 3 tiles to {tmp_path / "ds"}' in result.stdout
  assert "'not_in_split_csv': 1" in result.stdout
