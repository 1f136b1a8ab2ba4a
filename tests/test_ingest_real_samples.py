"""Real Sentinel-1 through ingestion: the samples in ../shared/samples/ (skipped where absent).

What the samples lack is built here, and said so:
  * BigEarthNet-S1 (three adjacent real 10 m patches in Austria, VV and VH in dB, one summer
    date): the other three seasons are SYNTHETIC copies of the real acquisition shifted by a
    seasonal offset, and the WorldCover and VCF labels are SYNTHETIC rasters over the area (the
    real WorldCover sample lies at the equator, no MOD44B sample exists offline).
  * pyroSAR (one real 20 m VV acquisition in dB, nodata -99 declared): the VH is SYNTHETIC
    (VV - 6 dB) since the sample has none, and a SYNTHETIC -99 border is written into a copy
    (the real cut-out has no no-data pixel); it checks resampling 20 m -> 10 m and no-data.
"""

import os
import shutil

import numpy as np
import pytest
import rasterio
import rasterio.warp

import configs.data.geotiff as geotiff_config
from data_pipeline.ingest import build
from data_pipeline import schema
from tests import ingest_fixtures as fx

SAMPLES = '/work/shared/samples'
BEN = os.path.join(SAMPLES, 'bigearthnet_s1_tiny')
PYROSAR = os.path.join(SAMPLES, 'pyrosar_s1_db',
                       'S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif')
AUSTRIA = [f'S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_{n}' for n in (39, 40, 41)]
# Plausible dB ranges (real 1st..99th percentiles -25..+2 for VV and -37..-9 for VH), widened
# to the extremes real scenes reach.
VV_RANGE, VH_RANGE = (-35.0, 15.0), (-45.0, 5.0)
SEASON_OFFSET_DB = {'20170115': -1.5, '20170415': 0.5, '20171015': -0.5}  # SYNTHETIC dates


def _austria_scenes(folder):
  """Real summer files, plus SYNTHETIC other-season files derived from them."""
  folder.mkdir()
  for patch in AUSTRIA:
    for polarisation in ('VV', 'VH'):
      real = os.path.join(BEN, patch, f'{patch}_{polarisation}.tif')
      shutil.copy(real, folder)
      with rasterio.open(real) as f:
        values, profile = f.read(1), f.profile
      for date, offset in SEASON_OFFSET_DB.items():
        name = f'SYNTHETIC_{date}T165043_{patch[-5:]}_{polarisation}.tif'
        with rasterio.open(folder / name, 'w', **profile) as f:
          f.write(values + np.float32(offset), 1)


@pytest.mark.skipif(not os.path.isdir(BEN), reason='BigEarthNet sample not present')
def test_bigearthnet_patches_become_tiles_in_plausible_db(tmp_path):
  _austria_scenes(tmp_path / 'scenes')
  with rasterio.open(os.path.join(BEN, AUSTRIA[0], f'{AUSTRIA[0]}_VV.tif')) as f:
    real_vv = f.read(1)
    left, top = f.transform.c, f.transform.f
  bounds = rasterio.warp.transform_bounds('EPSG:32633', 'EPSG:4326', left, top - 360 * 10,
                                          left + 120 * 10, top)
  config = geotiff_config.get_config()
  config.areas[0].scenes = str(tmp_path / 'scenes' / '*.tif')
  config.year = 2017
  config.tile_size = 40
  config.num_shards = 1
  config.worldcover = fx.worldcover_over(tmp_path / 'SYNTHETIC_worldcover.tif', bounds)
  config.vcf = fx.vcf_over(tmp_path / 'SYNTHETIC_vcf.tif', bounds)
  _, report = build.build(config, str(tmp_path / 'ds'))
  tiles = {t: ex for split in fx.read_dataset(tmp_path / 'ds').values() for t, ex in split.items()}
  assert len(tiles) == 3 * 9  # a 120 x 360 px strip in 40 px tiles, all kept
  assert report['left_out']['europe_0']['tiles_without_scene'] == 0

  image = np.stack([ex[schema.IMAGE] for ex in tiles.values()]).astype(np.float32)
  vv = image[..., schema.product_indices('vv')]
  vh = image[..., schema.product_indices('vh')]
  assert np.isfinite(image).all()  # the real patches have no no-data
  for values, (low, high) in ((vv, VV_RANGE), (vh, VH_RANGE)):
    assert low < np.percentile(values, 1) and np.percentile(values, 99) < high
  assert 3.0 < np.median(image[..., schema.product_indices('vv_minus_vh')]) < 9.0
  # The summer channel is the real acquisition itself (same 10 m lattice).
  top_left = tiles[f'32633_{int(left)}_{int(top)}']
  np.testing.assert_allclose(top_left[schema.IMAGE][..., schema.band_index('vv', 'summer')],
                             real_vv[:40, :40], atol=0.02)
  assert all(ex[schema.REGION] == schema.REGIONS.index('europe') for ex in tiles.values())


@pytest.mark.skipif(not os.path.exists(PYROSAR), reason='pyroSAR sample not present')
def test_pyrosar_scene_is_resampled_with_its_nodata(tmp_path):
  folder = tmp_path / 'scenes'
  folder.mkdir()
  with rasterio.open(PYROSAR) as f:
    vv, profile = f.read(1), f.profile
  assert profile['nodata'] == -99 and not (vv == -99).any()
  vv[:, :60] = -99  # SYNTHETIC no-data border: the real cut-out is fully valid
  with rasterio.open(folder / os.path.basename(PYROSAR), 'w', **profile) as f:
    f.write(vv, 1)
  with rasterio.open(folder / os.path.basename(PYROSAR).replace('_VV_', '_VH_'), 'w',
                     **profile) as f:
    # SYNTHETIC VH: VV - 6 dB plus 1.5 dB of noise, so that VV-VH is not a constant.
    vh = vv - 6 + 1.5 * np.random.default_rng(0).standard_normal(vv.shape)
    f.write(np.where(vv == -99, vv, vh).astype(np.float32), 1)
  for date in ('20150110', '20150710', '20151010'):  # SYNTHETIC other seasons, VV and VH
    for polarisation, values in (('VV', vv), ('VH', vh)):
      with rasterio.open(folder / f'SYNTHETIC_{date}T173017_{polarisation}.tif', 'w',
                         **profile) as f:
        f.write(np.where(vv == -99, vv, values - 1).astype(np.float32), 1)
  config = geotiff_config.get_config()
  config.areas[0].scenes = str(folder / '*.tif')
  config.year = 2015
  config.tile_size = 64
  config.num_shards = 1
  config.min_valid_fraction = 0.05
  _, report = build.build(config, str(tmp_path / 'ds'))
  tiles = [ex for split in fx.read_dataset(tmp_path / 'ds').values() for ex in split.values()]
  image = np.stack([ex[schema.IMAGE] for ex in tiles]).astype(np.float32)
  spring_vv = image[..., schema.band_index('vv', 'spring')]
  valid = spring_vv[np.isfinite(spring_vv)]
  # -99 never leaks in (neither as a value nor blended into neighbours by the resampling).
  assert valid.min() > VV_RANGE[0] and valid.max() < VV_RANGE[1]
  assert np.isnan(spring_vv).any()  # the no-data border stays no-data
  np.testing.assert_array_equal(np.isnan(image[..., schema.band_index('vv', 'winter')]),
                                np.isnan(spring_vv))  # same border in every season
  assert all(ex[schema.CRS].decode() == 'EPSG:32631' for ex in tiles)
  total = sum(report[s]['examples'] for s in schema.SPLITS if s in report)
  assert total == len(tiles) > 4
