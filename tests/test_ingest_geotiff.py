"""data_pipeline.ingest.build with source 'geotiff': per-acquisition GeoTIFFs -> composited tiles.

Truth is computed here with numpy from the arrays the test wrote: the tile grid lies on the
scenes' own 10 m lattice, so tile pixels are scene pixels and the seasonal medians can be taken
directly.
"""

import datetime
import os

import numpy as np
import pytest
import rasterio
import rasterio.warp
import tensorflow_datasets as tfds

import configs.data.geotiff as geotiff_config
from data_pipeline.ingest import build
from data_pipeline import schema
from data_pipeline.ingest import splits
from tests import ingest_fixtures as fx

TILE = 32
ROWS, COLS = 2, 3
# Two dates per season of composite year 2020 (winter from December 2019), one date outside.
DATES = {'winter': ('20191215', '20200120'), 'spring': ('20200310', '20200505'),
         'summer': ('20200612', '20200820'), 'fall': ('20200915', '20201110')}
OUTSIDE = '20210105'


def _scene_values(seed, polarisation, date):
  rng = np.random.default_rng([seed, ord(polarisation[1]), int(date)])
  base = -11.0 if polarisation == 'VV' else -18.0
  return (base + 3.0 * rng.standard_normal((ROWS * TILE, COLS * TILE))).astype(np.float32)


def write_acquisitions(folder, seed=0, linear_vh=False):
  """VV and VH files per date, 10 m UTM; returns {(polarisation, date): array in dB}."""
  written = {}
  for date in [d for pair in DATES.values() for d in pair] + [OUTSIDE]:
    for polarisation in ('VV', 'VH'):
      values = _scene_values(seed, polarisation, date)
      if date == '20200120' and polarisation == 'VV':
        values[:10, :20] = np.nan  # a no-data corner in one winter acquisition
      written[polarisation, date] = values.copy()
      stored = values
      if linear_vh and polarisation == 'VH':
        stored = np.where(np.isnan(values), 0.0, 10 ** (values / 10)).astype(np.float32)
      fx.write_tif(folder / f'S1A_IW_GRDH_{date}T053000_{polarisation}.tif', stored,
                   fx.utm_transform())
  return written


def expected_image(written, row, col):
  window = np.s_[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE]
  image = np.full((TILE, TILE, 12), np.nan, np.float32)
  for season, dates in DATES.items():
    vv = np.nanmedian([written['VV', d][window] for d in dates], axis=0)
    vh = np.nanmedian([written['VH', d][window] for d in dates], axis=0)
    image[..., schema.band_index('vv', season)] = vv
    image[..., schema.band_index('vh', season)] = vh
    image[..., schema.band_index('vv_minus_vh', season)] = vv - vh
  return image


def area_lonlat():
  left, top = fx.ORIGIN
  return rasterio.warp.transform_bounds(fx.UTM33, 'EPSG:4326', left, top - ROWS * TILE * 10,
                                        left + COLS * TILE * 10, top)


def config_for(scenes, **overrides):
  config = geotiff_config.get_config()
  config.areas[0].scenes = scenes
  config.tile_size = TILE
  config.num_shards = 1
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.parametrize('linear_vh', [False, True], ids=['dB', 'VH in linear power'])
def test_acquisitions_become_seasonal_median_tiles(tmp_path, linear_vh):
  written = write_acquisitions(tmp_path / 'scenes', linear_vh=linear_vh)
  bounds = area_lonlat()
  config = config_for(str(tmp_path / 'scenes' / '*.tif'), year=2020,
                      worldcover=fx.worldcover_over(tmp_path / 'wc.tif', bounds),
                      vcf=fx.vcf_over(tmp_path / 'vcf.tif', bounds))
  contract, report = build.build(config, str(tmp_path / 'ds'))

  tiles = {tid: ex for split in fx.read_dataset(tmp_path / 'ds').values()
           for tid, ex in split.items()}
  assert len(tiles) == ROWS * COLS
  assert report['left_out'] == {'europe_0': {'tiles_without_scene': 0, 'not_in_split_csv': 0,
                                             'acquisitions_outside_year': 2}}
  for row in range(ROWS):
    for col in range(COLS):
      x0, y0 = fx.ORIGIN[0] + col * TILE * 10, fx.ORIGIN[1] - row * TILE * 10
      example = tiles[f'32633_{int(x0)}_{int(y0)}']
      np.testing.assert_allclose(example[schema.IMAGE].astype(np.float32),
                                 expected_image(written, row, col), atol=0.02)
      assert example[schema.CRS].decode() == 'EPSG:32633'
      np.testing.assert_array_equal(example[schema.TRANSFORM], [10, 0, x0, 0, -10, y0])
      lon, lat = rasterio.warp.transform(fx.UTM33, 'EPSG:4326', [x0 + TILE * 5],
                                         [y0 - TILE * 5])
      assert example[schema.LON] == pytest.approx(lon[0], abs=1e-4)
      assert example[schema.LAT] == pytest.approx(lat[0], abs=1e-4)
      sources = example[schema.SOURCES].decode().split('\n')
      assert len([s for s in sources if s.endswith('_VV.tif')]) == 8  # 2021 file not used
      assert sources[-2:] == [str(tmp_path / 'wc.tif'), str(tmp_path / 'vcf.tif')]
      # Left half tree cover (0), right half cropland (3), the no-data row of the raster ignored.
      assert set(np.unique(example[schema.WORLDCOVER])) <= {0, 3, schema.IGNORE_INDEX}
      assert 0.0 < example[schema.VCF] <= 40.0
  # The corner without winter VV in one date takes the other date's value (median of one).
  assert 'seasons' in contract.composite and 'median_db' in contract.composite
  assert os.path.getsize(tmp_path / 'ds' / build.SPLIT_MAP) > 1000


def test_banding_split_and_split_csv(tmp_path):
  write_acquisitions(tmp_path / 'scenes')
  config = config_for(str(tmp_path / 'scenes' / '*.tif'))
  plan = build.plan(config)
  units = [u for split_units in plan.units.values() for u in split_units]
  lon = [u.tile.lon for u in units]
  lat = [u.tile.lat for u in units]
  expected = splits.banding_split(lon, lat, splits.AREA_ANGLES['europe'])
  got = {u.tile.tile_id: split for split, us in plan.units.items() for u in us}
  assert [got[u.tile.tile_id] for u in units] == list(expected)
  # A split CSV wins, and tiles it does not list are left out and counted.
  csv = tmp_path / 'split.csv'
  ids = sorted(got)
  csv.write_text('identifier,split\n' + f'{ids[0]},train\n{ids[1]},val\n{ids[2]},test\n')
  config.areas[0].split_csv = str(csv)
  plan = build.plan(config)
  assert {s: [u.tile.tile_id for u in us] for s, us in plan.units.items()} == {
      'train': [ids[0]], 'validation': [ids[1]], 'test': [ids[2]]}
  assert plan.left_out['europe_0']['not_in_split_csv'] == 3


def test_missing_season_is_nodata_and_low_valid_tiles_are_dropped(tmp_path):
  folder = tmp_path / 'scenes'
  for date in ('20200120', '20200310', '20200612', '20200915'):
    for polarisation in ('VV', 'VH'):
      values = _scene_values(1, polarisation, date)
      values[:, TILE:] = np.nan  # only the first tile column has data
      values[TILE:, :TILE // 2] = np.nan  # and half of its lower tile
      if date == '20200120':
        values[8:] = np.nan  # winter: only the top 8 rows were acquired
      fx.write_tif(folder / f'S1_{date}_{polarisation}.tif', values, fx.utm_transform())
  config = config_for(str(folder / '*.tif'), min_valid_fraction=0.6)
  # Banding could send the only kept tile anywhere: pin the splits with a CSV.
  csv = tmp_path / 'split.csv'
  ids = [f'32633_{int(fx.ORIGIN[0] + c * TILE * 10)}_{int(fx.ORIGIN[1] - r * TILE * 10)}'
         for r in range(ROWS) for c in range(COLS)]
  csv.write_text('identifier,split\n' + ''.join(f'{i},train\n' for i in ids))
  config.areas[0].split_csv = str(csv)
  _, report = build.build(config, str(tmp_path / 'ds'))
  assert report['train']['examples'] == 1
  assert report['train']['skipped'] == {'empty': 4, 'below_min_valid_fraction': 1}
  (example,) = fx.read_dataset(tmp_path / 'ds')['train'].values()
  image = example[schema.IMAGE].astype(np.float32)
  winter = image[..., schema.product_indices('vv')[0]]
  assert np.isfinite(winter[:8]).all()
  assert np.isnan(winter[8:]).all()  # no acquisition there: no-data, not zero
  assert np.isfinite(image[..., schema.band_index('vh', 'summer')]).all()


def test_composites_kind_with_band_descriptions(tmp_path):
  rng = np.random.default_rng(3)
  bands = (-12 + 2 * rng.standard_normal((8, TILE, TILE))).astype(np.float32)
  bands[4:] -= 6
  names = [f'VH_{s}' for s in schema.SEASONS] + [f'VV_{s}' for s in schema.SEASONS]
  # Bands stored VH first: the descriptions, not the order, must decide.
  path = fx.write_tif(tmp_path / 'comp' / 'composite.tif', np.concatenate([bands[4:], bands[:4]]),
                      fx.utm_transform(), descriptions=names)
  config = config_for(path, kind='composites', resample_in_linear_power=False)
  build.build(config, str(tmp_path / 'ds'))
  (example,) = [ex for split in fx.read_dataset(tmp_path / 'ds').values() for ex in split.values()]
  image = example[schema.IMAGE]
  np.testing.assert_array_equal(image[..., schema.product_indices('vv')],
                                np.moveaxis(bands[:4], 0, -1).astype(np.float16))
  np.testing.assert_array_equal(image[..., schema.product_indices('vh')],
                                np.moveaxis(bands[4:], 0, -1).astype(np.float16))
  np.testing.assert_array_equal(
      image[..., schema.product_indices('vv_minus_vh')],
      np.moveaxis(bands[:4] - bands[4:], 0, -1).astype(np.float16))


def test_dates_and_units_are_read_from_files(tmp_path):
  written = write_acquisitions(tmp_path / 'scenes', linear_vh=True)
  plan = build.plan(config_for(str(tmp_path / 'scenes' / '*.tif')))
  unit = plan.units['train'][0]
  units = {(s.polarisation, os.path.basename(s.path)[12:20]): s.units for s in unit.scenes}
  assert set(units.values()) == {'dB', 'linear'}
  assert all(u == ('linear' if p == 'VH' else 'dB') for (p, _), u in units.items())
  seasons = {os.path.basename(s.path)[12:20]: s.season for s in unit.scenes}
  assert seasons == {d: season for season, ds in DATES.items() for d in ds}
  assert written and datetime.date(2019, 12, 15)  # winter starts in December of 2019


def test_statistics_by_region(tmp_path):
  """Per-region training statistics equal numpy's over each region's stored training tiles."""
  write_acquisitions(tmp_path / 'a', seed=1)
  write_acquisitions(tmp_path / 'b', seed=2)
  for folder in ('a', 'b'):  # the second area 8 tiles further east, so ids differ
    for path in (tmp_path / folder).glob('*.tif'):
      if folder == 'b':
        with rasterio.open(path, 'r+') as f:
          f.transform = fx.utm_transform((fx.ORIGIN[0] + 8 * TILE * 10, fx.ORIGIN[1]))
  config = config_for(str(tmp_path / 'a' / '*.tif'), statistics_by_region=True)
  config.areas.append(geotiff_config.area(str(tmp_path / 'b' / '*.tif'), 'south_america'))
  csv = tmp_path / 'split.csv'
  plan = build.plan(config)
  ids = [u.tile.tile_id for us in plan.units.values() for u in us]
  csv.write_text('identifier,split\n' + ''.join(f'{i},train\n' for i in ids))
  for area in config.areas:
    area.split_csv = str(csv)
  build.build(config, str(tmp_path / 'ds'))
  builder = tfds.builder_from_directory(str(tmp_path / 'ds'))
  by_region = builder.info.metadata['statistics_by_region']
  assert sorted(by_region) == ['europe', 'south_america']
  train = fx.read_dataset(tmp_path / 'ds')['train']
  for region in by_region:
    images = np.stack([ex[schema.IMAGE] for ex in train.values()
                       if schema.REGIONS[ex[schema.REGION]] == region]).astype(np.float64)
    np.testing.assert_allclose(by_region[region]['mean'],
                               np.nanmean(images.reshape(-1, 12), axis=0), rtol=1e-6)
    np.testing.assert_allclose(by_region[region]['std'],
                               np.nanstd(images.reshape(-1, 12), axis=0), rtol=1e-5)
