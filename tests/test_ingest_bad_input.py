"""Bad ingestion input: a clear error naming the file, and no dataset a reader could open.

(The corrupt and truncated Earth Engine TFRecord cases are in test_ingest_earth_engine.py.)
"""

import os

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_bounds
import tensorflow_datasets as tfds

import configs.data.m3leo as m3leo_config
from data_pipeline.ingest import build
from data_pipeline.ingest import labels
from data_pipeline.ingest import m3leo
from data_pipeline import schema
from tests import ingest_fixtures as fx
from tests.test_ingest_geotiff import config_for
from tests.test_ingest_geotiff import write_acquisitions
from tests.test_m3leo import CHIPS
from tests.test_m3leo import SIZE
from tests.test_m3leo import _build_area


def assert_nothing_readable(output):
  """No TFDS dataset and no half-written shard at ``output``."""
  if not os.path.exists(output):
    return
  names = os.listdir(output)
  assert 'dataset_info.json' not in names
  assert not [n for n in names if '.incomplete' in n], names
  with pytest.raises(Exception):
    tfds.builder_from_directory(str(output))


def test_truncated_geotiff(tmp_path):
  write_acquisitions(tmp_path / 'scenes')
  victim = tmp_path / 'scenes' / 'S1A_IW_GRDH_20200505T053000_VH.tif'
  data = victim.read_bytes()
  victim.write_bytes(data[:len(data) // 2])
  with pytest.raises((labels.RasterReadError, ValueError), match=str(victim)):
    build.build(config_for(str(tmp_path / 'scenes' / '*.tif')), str(tmp_path / 'ds'))
  assert_nothing_readable(tmp_path / 'ds')


def test_missing_vh(tmp_path):
  write_acquisitions(tmp_path / 'scenes')
  for path in (tmp_path / 'scenes').glob('*_VH.tif'):
    path.unlink()
  with pytest.raises(ValueError, match=r'no VH acquisition of composite year 2020 among 9 files'):
    build.build(config_for(str(tmp_path / 'scenes' / '*.tif')), str(tmp_path / 'ds'))
  assert_nothing_readable(tmp_path / 'ds')


def test_composite_without_vh_bands(tmp_path):
  path = fx.write_tif(tmp_path / 'c.tif', np.full((4, 32, 32), -10, np.float32),
                      fx.utm_transform(), descriptions=['VV_winter', 'VV_spring', 'VV_summer',
                                                        'VV_fall'])
  with pytest.raises(ValueError, match=rf"{path}: composite lacks bands \['vh_winter'"):
    build.build(config_for(path, kind='composites'), str(tmp_path / 'ds'))


def test_all_nodata_scene(tmp_path):
  write_acquisitions(tmp_path / 'scenes')
  victim = tmp_path / 'scenes' / 'S1A_IW_GRDH_20200612T053000_VV.tif'
  fx.write_tif(victim, np.full((64, 96), -99, np.float32), fx.utm_transform(), nodata=-99)
  with pytest.raises(ValueError, match=rf'{victim}: scene has no valid pixel'):
    build.build(config_for(str(tmp_path / 'scenes' / '*.tif')), str(tmp_path / 'ds'))
  assert_nothing_readable(tmp_path / 'ds')


def test_label_in_the_wrong_crs_misses_the_area(tmp_path):
  write_acquisitions(tmp_path / 'scenes')
  # Degree bounds labelled as UTM metres: the label lands off the west coast of Africa.
  wrong = fx.write_tif(tmp_path / 'wc.tif', np.full((8, 8), 10, np.uint8),
                       from_bounds(13.0, 48.0, 13.1, 48.1, 8, 8), crs=fx.UTM33, nodata=0)
  config = config_for(str(tmp_path / 'scenes' / '*.tif'), worldcover=wrong)
  with pytest.raises(ValueError, match=r'config.worldcover: none of its 1 files overlaps area '
                     r'europe_0.*wc\.tif.*Check their CRS'):
    build.build(config, str(tmp_path / 'ds'))
  assert_nothing_readable(tmp_path / 'ds')


def test_label_chip_crs_mismatch_fails_mid_build_without_a_dataset(tmp_path):
  aoi, _ = _build_area(tmp_path)
  train_id, bounds = CHIPS[0]
  label = aoi / m3leo.WORLDCOVER_DATASET / f'{train_id}.tif'
  label.parent.mkdir(parents=True)
  with rasterio.open(label, 'w', driver='GTiff', width=8, height=8, count=1, dtype='uint8',
                     crs='EPSG:3857', transform=from_bounds(*bounds, 8, 8), nodata=0) as f:
    f.write(np.full((1, 8, 8), 10, np.uint8))
  config = m3leo_config.get_config()
  config.areas[0].dir = str(aoi)
  config.tile_size = SIZE
  config.num_shards = 1
  with pytest.raises(ValueError, match=rf'CRS mismatch: {label} is in EPSG:3857 but '
                     rf'.*{train_id}\.tif is in EPSG:4326'):
    build.build(config, str(tmp_path / 'ds'))
  assert_nothing_readable(tmp_path / 'ds')


@pytest.mark.parametrize('overrides, message', [
    ({'num_shards': 4}, r"split '\w+' has too few tiles \(\d\) for config.num_shards = 4 \(a "
     r'shard needs at least one\): set --config.num_shards=\d or less; or cut more tiles with '
     r'a smaller --config.tile_size \(now 32\)'),
    ({'num_shards': 3, 'host_count': 2}, r'config.num_shards = 3 must be a positive multiple of '
     r'config.host_count = 2, .*: set --config.num_shards=2 or --config.num_shards=4'),
    ({'tile_size': 0}, r'config.tile_size must be a positive number of pixels, got 0 '
     r'\(--config.tile_size=...\)'),
], ids=['too many shards', 'shards per host', 'tile size'])
def test_shard_and_tile_size_errors_name_the_flag(tmp_path, overrides, message):
  # A 2 x 3 tile composite: 6 tiles of 32 px over the three splits.
  path = fx.write_tif(tmp_path / 'c.tif', np.full((8, 64, 96), -12, np.float32) +
                      np.arange(64 * 96, dtype=np.float32).reshape(64, 96) / 1e3,
                      fx.utm_transform(), descriptions=[f'{p}_{s}' for p in ('VV', 'VH')
                                                        for s in schema.SEASONS])
  with pytest.raises(ValueError, match=message):
    build.build(config_for(path, kind='composites', **overrides), str(tmp_path / 'ds'))
  assert not (tmp_path / 'ds').exists()


def test_chip_size_other_than_the_tile_size_stops_while_planning(tmp_path):
  aoi, _ = _build_area(tmp_path)
  config = m3leo_config.get_config()
  config.areas[0].dir = str(aoi)
  config.num_shards = 1
  assert config.tile_size != SIZE
  with pytest.raises(ValueError, match=rf'{CHIPS[0][0]}\.tif: chip is {SIZE} x {SIZE} px, '
                     rf'config.tile_size is {config.tile_size}; set --config.tile_size={SIZE}'):
    build.build(config, str(tmp_path / 'ds'))
  # Nothing written: the corrected command needs no --overwrite.
  assert not (tmp_path / 'ds').exists()
