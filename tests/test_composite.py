"""Tests for data_pipeline.ingest.composite: real Sentinel-1 samples plus hand-computed composites."""

import datetime
import glob
import math
import os

import numpy as np
import pytest
import rasterio
from affine import Affine

from data_pipeline.ingest import composite
from data_pipeline.ingest import m3leo
from data_pipeline import schema

BEN = '/work/shared/samples/bigearthnet_s1_tiny'
PYROSAR = ('/work/shared/samples/pyrosar_s1_db/'
           'S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif')
needs_ben = pytest.mark.skipif(not os.path.isdir(BEN), reason='BigEarthNet-S1 sample missing')
needs_pyrosar = pytest.mark.skipif(not os.path.exists(PYROSAR), reason='pyroSAR sample missing')

AUSTRIA = 'S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_39'
AUSTRIA_SOUTH = 'S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_40'
IRELAND = 'S1A_IW_GRDH_1SDV_20170617T064724_29UPU_36_85'
PORTUGAL = 'S1A_IW_GRDH_1SDV_20171221T064238_29SND_56_35'
# 1st..99th percentile of real VV and VH backscatter (the real samples).
VV_RANGE_DB = (-25.0, 2.0)
VH_RANGE_DB = (-37.0, -9.0)


def ben_file(patch, polarisation):
  return os.path.join(BEN, patch, f'{patch}_{polarisation}.tif')


def write_tif(path, array, transform=Affine(10, 0, 500000, 0, -10, 5000000), crs='EPSG:32633',
              nodata=None, tags=None):
  array = np.asarray(array, dtype=np.float32)
  with rasterio.open(path, 'w', driver='GTiff', width=array.shape[1], height=array.shape[0],
                     count=1, dtype='float32', crs=crs, transform=transform,
                     nodata=nodata) as dataset:
    dataset.write(array, 1)
    if tags:
      dataset.update_tags(**tags)
  return str(path)


# --- Real data: names, units, compositing ----------------------------------------------------


@needs_ben
def test_real_names_give_dates_and_polarisations():
  expected = {'20170613': datetime.date(2017, 6, 13), '20170617': datetime.date(2017, 6, 17),
              '20171221': datetime.date(2017, 12, 21)}
  paths = sorted(glob.glob(os.path.join(BEN, '*', '*.tif')))
  assert len(paths) == 12
  for path in paths:
    acquisition = composite.Acquisition.from_file(path)
    assert acquisition.date == expected[os.path.basename(path)[17:25]]
    assert acquisition.polarisation == path[-6:-4]
  # The Portuguese December acquisition is winter of the NEXT composite year.
  portugal = composite.Acquisition.from_file(ben_file(PORTUGAL, 'VV'))
  assert composite.season_of(portugal.date, 2018) == 'winter'
  assert composite.season_of(portugal.date, 2017) is None


@needs_pyrosar
def test_pyrosar_name_and_nodata_from_file(tmp_path):
  acquisition = composite.Acquisition.from_file(PYROSAR)
  assert (acquisition.polarisation, acquisition.date) == ('VV', datetime.date(2015, 3, 9))
  assert composite.season_of(acquisition.date, 2015) == 'spring'
  with rasterio.open(PYROSAR) as dataset:
    nodata = dataset.nodata
    raw = dataset.read(1)
    profile = dataset.profile
  assert nodata == -99.0
  # The real file declares -99 but contains no such pixel: fill a corner with its own nodata
  # value, in a copy that keeps the real profile, to check that the declared value is masked.
  filled = raw.copy()
  filled[:10, :20] = nodata
  copy = tmp_path / acquisition.path.split('/')[-1]
  with rasterio.open(copy, 'w', **profile) as dataset:
    dataset.write(filled, 1)
  for path, expected_nan in ((PYROSAR, 0), (str(copy), 200)):
    stacks = composite.read_acquisitions([composite.Acquisition.from_file(path)])
    assert stacks.units[path] == 'dB'
    assert stacks.vv.shape == (1, 217, 268) and stacks.vh.shape == (0, 217, 268)
    assert int(np.isnan(stacks.vv).sum()) == expected_nan
    assert np.nanmin(stacks.vv) > -99 and np.nanmin(stacks.vv) == pytest.approx(raw.min())
    assert np.nanpercentile(stacks.vv, 1) > VV_RANGE_DB[0] - 1
  assert np.isnan(stacks.vv[0, :10, :20]).all()
  np.testing.assert_array_equal(stacks.vv[0, 10:], raw[10:])
  # VV only: the VH channels of a tile are no data, not zero.
  tile = composite.compose_year(stacks, 2015)
  assert np.isnan(tile[..., schema.product_indices('vh')]).all()
  spring_vv = tile[..., schema.band_index('vv', 'spring')]
  np.testing.assert_array_equal(spring_vv[10:], raw[10:])


@needs_ben
def test_detect_units_on_real_values_and_their_linear_power(tmp_path):
  for patch in (AUSTRIA, IRELAND, PORTUGAL):
    for polarisation in composite.POLARISATIONS:
      with rasterio.open(ben_file(patch, polarisation)) as dataset:
        values = dataset.read(1)
      assert composite.detect_units(values) == 'dB'
      assert composite.detect_units(10.0 ** (values / 10.0)) == 'linear'
  # A linear-power copy of a real patch reads back as the real dB values.
  with rasterio.open(ben_file(AUSTRIA, 'VV')) as dataset:
    db, transform, crs = dataset.read(1), dataset.transform, dataset.crs
  path = write_tif(tmp_path / 'S1A_IW_GRDH_1SDV_20170613T165043_linear_VV.tif',
                   10.0 ** (db / 10.0), transform=transform, crs=crs)
  stacks = composite.read_acquisitions([composite.Acquisition.from_file(path)])
  assert stacks.units[path] == 'linear'
  np.testing.assert_allclose(stacks.vv[0], db, atol=1e-4)


@needs_ben
def test_composite_of_a_real_patch():
  acquisitions = [composite.Acquisition.from_file(ben_file(AUSTRIA, p)) for p in ('VV', 'VH')]
  stacks = composite.read_acquisitions(acquisitions)
  vv, vh = stacks.vv[0], stacks.vh[0]
  assert not np.isnan(vv).any() and not np.isnan(vh).any()
  # Only one real date exists per place, so the multi-date stack is SYNTHESISED from it: the real
  # acquisition is summer, with two more summer dates at -2 and +3 dB (so the summer median is
  # the real one); spring = real + 1 dB; fall = two dates at real - 1 and real - 3 dB (mean -2);
  # winter has no acquisition and must come out NaN.
  offsets = (0.0, -2.0, 3.0, 1.0, -1.0, -3.0)
  seasons = ('summer', 'summer', 'summer', 'spring', 'fall', 'fall')
  vv_stack = np.stack([vv + offset for offset in offsets])
  vh_stack = np.stack([vh + offset for offset in offsets])
  tile = composite.compose_tile(vv_stack, vh_stack, seasons, 'median_db')
  assert tile.shape == (120, 120, 12) and tile.dtype == np.float32

  def channel(product, season):
    return tile[..., schema.band_index(product, season)]

  np.testing.assert_allclose(channel('vv', 'summer'), vv, atol=1e-5)
  np.testing.assert_allclose(channel('vh', 'summer'), vh, atol=1e-5)
  np.testing.assert_allclose(channel('vv', 'spring'), vv + 1, atol=1e-5)
  np.testing.assert_allclose(channel('vh', 'fall'), vh - 2, atol=1e-5)
  for product in schema.PRODUCTS:
    assert np.isnan(channel(product, 'winter')).all()  # no data, not 0
  for season in ('spring', 'summer', 'fall'):
    np.testing.assert_allclose(channel('vv_minus_vh', season),
                               channel('vv', season) - channel('vh', season), atol=1e-5)
  # Plausible dB ranges for the real (summer) composite and a positive VV-VH.
  low, high = np.percentile(channel('vv', 'summer'), (1, 99))
  assert VV_RANGE_DB[0] - 3 < low and high < VV_RANGE_DB[1] and -16 < np.median(vv) < -9
  low, high = np.percentile(channel('vh', 'summer'), (1, 99))
  assert VH_RANGE_DB[0] < low and high < VH_RANGE_DB[1] and -21 < np.median(vh) < -14
  assert 3 < np.median(channel('vv_minus_vh', 'summer')) < 9
  # Averaging linear power weights the bright dates more: never below the dB mean (Jensen).
  mean_db = composite.compose_tile(vv_stack, vh_stack, seasons, 'mean_db')
  mean_linear = composite.compose_tile(vv_stack, vh_stack, seasons, 'mean_linear')
  vv_summer = schema.band_index('vv', 'summer')
  np.testing.assert_allclose(mean_db[..., vv_summer], vv + 1 / 3, atol=1e-4)
  assert (mean_linear[..., vv_summer] > mean_db[..., vv_summer]).all()
  # The empty winter is no-data (NaN), not a constant channel: the tile is kept.
  assert composite.constant_channels(tile).size == 0


@needs_ben
def test_real_grid_mismatches_name_both_files():
  north = composite.Acquisition.from_file(ben_file(AUSTRIA, 'VV'))
  south = composite.Acquisition.from_file(ben_file(AUSTRIA_SOUTH, 'VV'))
  ireland = composite.Acquisition.from_file(ben_file(IRELAND, 'VV'))
  with pytest.raises(ValueError, match='grid mismatch') as error:
    composite.read_acquisitions([north, south])
  assert north.path in str(error.value) and south.path in str(error.value)
  with pytest.raises(ValueError, match='CRS mismatch') as error:
    composite.read_acquisitions([north, ireland])
  assert north.path in str(error.value) and ireland.path in str(error.value)


@needs_ben
def test_windows_outside_the_raster_are_nan_not_clipped():
  acquisition = composite.Acquisition.from_file(ben_file(AUSTRIA, 'VV'))
  with rasterio.open(acquisition.path) as dataset:
    values, transform = dataset.read(1), dataset.transform
  stacks = composite.read_acquisitions([acquisition], window=(100, 110, 32, 32))
  assert stacks.vv.shape == (1, 32, 32)
  np.testing.assert_array_equal(stacks.vv[0, :10, :20], values[110:, 100:])
  assert np.isnan(stacks.vv[0, 10:]).all() and np.isnan(stacks.vv[0, :, 20:]).all()
  assert stacks.transform == transform @ Affine.translation(100, 110)


# --- Hand-computed cases ---------------------------------------------------------------------


def test_median_mean_db_and_mean_linear_on_three_dates():
  stack = np.array([-10.0, -20.0, -12.0]).reshape(3, 1, 1)
  seasons = ['summer'] * 3
  median = composite.seasonal_composite(stack, seasons, 'median_db')
  mean_db = composite.seasonal_composite(stack, seasons, 'mean_db')
  mean_linear = composite.seasonal_composite(stack, seasons, 'mean_linear')
  summer = schema.SEASONS.index('summer')
  assert median[summer, 0, 0] == pytest.approx(-12.0)
  assert mean_db[summer, 0, 0] == pytest.approx(-14.0)
  expected = 10 * math.log10((10 ** -1 + 10 ** -2 + 10 ** -1.2) / 3)  # -12.25... dB
  assert mean_linear[summer, 0, 0] == pytest.approx(expected, abs=1e-5)
  for result in (median, mean_db, mean_linear):
    assert result.shape == (4, 1, 1) and result.dtype == np.float32
    others = [i for i in range(4) if i != summer]
    assert np.isnan(result[others]).all()
  with pytest.raises(ValueError, match='unknown composite method'):
    composite.seasonal_composite(stack, seasons, 'max_db')
  with pytest.raises(ValueError, match='unknown seasons'):
    composite.seasonal_composite(stack, ['summer', 'autumn', None])


def test_nodata_values_and_noise_floor_are_excluded():
  # One pixel, five summer dates: NaN, Earth Engine's 0 fill, -99 fill, -60 dB (below the floor),
  # and two real values.
  stack = np.array([np.nan, 0.0, -99.0, -60.0, -10.0, -14.0]).reshape(6, 1, 1)
  mask = composite.nodata_mask(stack[:, 0, 0], nodata_values=(0.0, -99.0))
  np.testing.assert_array_equal(mask, [True, True, True, True, False, False])
  result = composite.seasonal_composite(stack, ['summer'] * 6, 'mean_db',
                                        nodata_values=(0.0, -99.0))
  assert result[schema.SEASONS.index('summer'), 0, 0] == pytest.approx(-12.0)
  # Keeping exact zeros (a legal dB value) and disabling the floor changes the mean.
  kept = composite.seasonal_composite(stack, ['summer'] * 6, 'mean_db', nodata_values=(-99.0,),
                                      noise_floor_db=None)
  assert kept[schema.SEASONS.index('summer'), 0, 0] == pytest.approx((0 - 60 - 10 - 14) / 4)
  # A season whose only date is all no data is NaN, not 0.
  empty = composite.seasonal_composite(np.zeros((1, 2, 2)), ['winter'])
  assert np.isnan(empty).all()
  # Floor is strict: exactly -50 dB is kept.
  assert not composite.nodata_mask(np.array([-50.0]))[0]
  assert composite.nodata_mask(np.array([-50.01, np.inf, -np.inf])).all()


def test_compose_tile_band_order_and_nan_propagation():
  vv = np.array([[[-8.0, -9.0]], [[-12.0, np.nan]]])  # dates: winter, fall
  vh = np.array([[[-15.0, -16.0]], [[-20.0, -21.0]]])
  tile = composite.compose_tile(vv, vh, ['winter', 'fall'])
  assert tile.shape == (1, 2, 12)
  expected = {('vv', 'winter'): [-8, -9], ('vh', 'winter'): [-15, -16],
              ('vv_minus_vh', 'winter'): [7, 7], ('vv', 'fall'): [-12, np.nan],
              ('vh', 'fall'): [-20, -21], ('vv_minus_vh', 'fall'): [8, np.nan]}
  for (product, season), values in expected.items():
    np.testing.assert_allclose(tile[0, :, schema.band_index(product, season)], values)
  for product in schema.PRODUCTS:
    for season in ('spring', 'summer'):
      assert np.isnan(tile[..., schema.band_index(product, season)]).all()
  # VH from other dates than VV.
  tile = composite.compose_tile(vv, vh[:1], ['winter', 'fall'], vh_seasons=['spring'])
  assert np.isnan(tile[..., schema.band_index('vh', 'winter')]).all()
  np.testing.assert_allclose(tile[0, :, schema.band_index('vh', 'spring')], [-15, -16])


def test_season_boundaries():
  date = datetime.date
  assert composite.season_of(date(2019, 11, 30), 2019) == 'fall'
  assert composite.season_of(date(2019, 12, 1), 2019) is None
  assert composite.season_of(date(2019, 12, 1), 2020) == 'winter'
  assert composite.season_of(date(2020, 1, 1), 2020) == 'winter'
  assert composite.season_of(date(2019, 2, 28), 2019) == 'winter'
  assert composite.season_of(date(2020, 2, 29), 2020) == 'winter'  # leap day
  assert composite.season_of(date(2020, 3, 1), 2020) == 'spring'
  assert composite.season_of(date(2020, 5, 31), 2020) == 'spring'
  assert composite.season_of(date(2020, 6, 1), 2020) == 'summer'
  assert composite.season_of(date(2020, 8, 31), 2020) == 'summer'
  assert composite.season_of(date(2020, 9, 1), 2020) == 'fall'
  assert composite.season_of(date(2020, 6, 1), 2021) is None
  assert composite.seasons_of([date(2019, 12, 31), date(2020, 12, 31)], 2020) == ['winter', None]


def test_linear_to_db():
  out = composite.linear_to_db([1.0, 0.1, 0.01, 100.0, 0.0, -0.001, np.nan, np.inf])
  np.testing.assert_allclose(out[:4], [0.0, -10.0, -20.0, 20.0], atol=1e-6)
  assert np.isnan(out[4:]).all() and out.dtype == np.float32


def test_detect_units_clear_and_ambiguous():
  rng = np.random.default_rng(0)
  db = rng.normal(-12, 4, 1000)
  assert composite.detect_units(db) == 'dB'
  assert composite.detect_units(10 ** (db / 10)) == 'linear'
  # NaN and exact zeros are ignored.
  assert composite.detect_units(np.concatenate([10 ** (db / 10), [0.0] * 5000, [np.nan]])) == (
      'linear')
  # All positive but mostly above 1: a bright linear tile or a bright dB tile; refused.
  with pytest.raises(ValueError, match='my_tile.tif: cannot tell dB from linear'):
    composite.detect_units(rng.uniform(0.5, 5.0, 1000), name='my_tile.tif')
  # A third negative: neither rule holds.
  with pytest.raises(ValueError, match='cannot tell'):
    composite.detect_units(np.concatenate([-np.ones(300), np.full(700, 0.2)]))
  # A median of -99 (unmasked fill) is not plausible dB.
  with pytest.raises(ValueError, match='cannot tell'):
    composite.detect_units(np.full(10, -99.0))
  with pytest.raises(ValueError, match='no finite non-zero values'):
    composite.detect_units(np.array([np.nan, 0.0]))


def test_decide_units_checks_stated_units_against_the_values():
  linear = np.array([0.02, 0.05, 0.1, 0.3])
  decibels = np.array([-12.0, -15.0, -8.0])
  assert composite.decide_units(decibels) == ('dB', 'detected')
  assert composite.decide_units(linear, 'linear') == ('linear', 'stated, detected too')
  with pytest.raises(ValueError, match=r'a.tif: --units dB contradicts the values: they look like '
                                       r'linear \(0% negative, median 0.075;.*give --units linear'):
    composite.decide_units(linear, 'dB', name='a.tif')
  with pytest.raises(ValueError, match=r'--in linear contradicts .* look like dB'):
    composite.decide_units(decibels, 'linear', flag='--in')
  ambiguous = np.array([2.0, 3.0, 4.0])  # all positive, median above 1: neither rule holds
  assert composite.decide_units(ambiguous, 'dB') == ('dB', 'stated, the values do not tell')
  with pytest.raises(ValueError, match=r'cannot tell dB from linear.*\(here: --units dB or '):
    composite.decide_units(ambiguous)


def test_dates_from_names_and_tags():
  parse = composite.parse_acquisition_date
  assert parse('/d/S1A_IW_GRDH_1SDV_20170613T165043_20170613T165108_017018_01C579_7EEC_VV.tif') \
      == datetime.date(2017, 6, 13)
  assert parse('S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif') == datetime.date(
      2015, 3, 9)
  assert parse('s1_vh_2021-02-28.tif') == datetime.date(2021, 2, 28)
  assert parse('tile_33UUP_20191201_vv.tif') == datetime.date(2019, 12, 1)
  assert parse('/x/S1B_IW_GRDH_1SDV_20180102T000000_patch/VV.tif') == datetime.date(2018, 1, 2)
  assert parse('vv.tif', {'ACQUISITION_DATE': '2018-07-04'}) == datetime.date(2018, 7, 4)
  assert parse('vv.tif', {'acquisition_time': '2018-07-04T23:59:59.5Z'}) == datetime.date(
      2018, 7, 4)
  assert parse('vv.tif', {'DATE': '20180704'}) == datetime.date(2018, 7, 4)
  assert parse('vv.tif', {'DATE': '2018:07:04 10:00:00'}) == datetime.date(2018, 7, 4)
  with pytest.raises(ValueError, match='the tags say 2018-07-04 but the name says 2018-07-05'):
    parse('vv_2018-07-05.tif', {'DATE': '2018-07-04'})
  with pytest.raises(ValueError, match='bad_tag.tif: cannot parse the date in tag DATE'):
    parse('bad_tag.tif', {'DATE': 'yesterday'})


def test_missing_date_error_names_the_file(tmp_path):
  path = write_tif(tmp_path / 'S1A_IW_GRDH_1SDV_VV.tif', np.full((2, 2), -10.0),
                   tags={'TIFFTAG_DATETIME': '2020:01:01 00:00:00'})  # a write time, not used
  with pytest.raises(ValueError, match='no acquisition date') as error:
    composite.Acquisition.from_file(path)
  assert path in str(error.value)
  tagged = write_tif(tmp_path / 'S1A_VV.tif', np.full((2, 2), -10.0),
                     tags={'ACQUISITION_DATE': '2020-08-01'})
  assert composite.Acquisition.from_file(tagged).date == datetime.date(2020, 8, 1)


def test_polarisations_from_names_and_tags():
  parse = composite.parse_polarisation
  assert parse('S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_39_VH.tif') == 'VH'
  assert parse('S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif') == 'VV'
  assert parse('s1_vh_2021-02-28.tif') == 'VH'
  assert parse('band1.tif', {'POLARISATION': 'VV'}) == 'VV'
  assert parse('band1.tif', {'description': 'VH_dB'}) == 'VH'
  with pytest.raises(ValueError, match='S1A_IW_GRDH_1SDV_20170613.tif: no polarisation'):
    parse('S1A_IW_GRDH_1SDV_20170613.tif')  # the 'SDV' of 1SDV is not a polarisation
  with pytest.raises(ValueError, match='several polarisations'):
    parse('x_VV_VH.tif')
  with pytest.raises(ValueError, match='HH'):
    parse('x_HH.tif')


def test_synthetic_grid_mismatch_names_both_files(tmp_path):
  a = write_tif(tmp_path / 'a_20200101_VV.tif', np.full((4, 4), -10.0))
  b = write_tif(tmp_path / 'b_20200101_VV.tif', np.full((4, 5), -10.0))
  c = write_tif(tmp_path / 'c_20200101_VV.tif', np.full((4, 4), -10.0),
                transform=Affine(10, 0, 500005, 0, -10, 5000000))
  acquisitions = [composite.Acquisition.from_file(p, units='dB') for p in (a, b, c)]
  for other in acquisitions[1:]:
    with pytest.raises(ValueError, match='grid mismatch') as error:
      composite.read_acquisitions([acquisitions[0], other])
    assert a in str(error.value) and other.path in str(error.value)


def test_read_and_compose_year_end_to_end(tmp_path):
  # Five VV/VH pairs of one pixel grid, linear power in some files, with EE-style 0 fills.
  dates = ['20191215', '20200110', '20200701', '20200715', '20201210']
  vv_db = [-8.0, -10.0, -12.0, -14.0, -30.0]
  acquisitions = []
  for day, value in zip(dates, vv_db):
    vv = np.full((2, 3), value)
    vv[0, 0] = 0.0  # Earth Engine fill
    acquisitions.append(composite.Acquisition.from_file(
        write_tif(tmp_path / f'S1_{day}T000000_VV.tif', vv), units='dB'))
    vh = np.full((2, 3), 10 ** ((value - 6) / 10))  # linear power, units detected
    acquisitions.append(composite.Acquisition.from_file(
        write_tif(tmp_path / f'S1_{day}T000000_VH.tif', vh)))
  stacks = composite.read_acquisitions(acquisitions)
  assert stacks.vv.shape == (5, 2, 3) and stacks.vh.shape == (5, 2, 3)
  assert set(stacks.units.values()) == {'dB', 'linear'}
  tile = composite.compose_year(stacks, 2020, 'mean_db')
  # 2019-12-15 and 2020-01-10 are winter 2020; 2020-12-10 belongs to 2021 and is ignored.
  np.testing.assert_allclose(tile[1, 1, schema.band_index('vv', 'winter')], -9.0, atol=1e-5)
  np.testing.assert_allclose(tile[1, 1, schema.band_index('vh', 'summer')], -19.0, atol=1e-4)
  np.testing.assert_allclose(tile[1, 1, schema.product_indices('vv_minus_vh')],
                             [6, np.nan, 6, np.nan], atol=1e-4)
  assert np.isnan(tile[0, 0, schema.product_indices('vv')]).all()  # the 0 fill pixel
  assert 'median_db' in composite.composite_description()
  assert composite.constant_channels is m3leo.constant_channels
