"""Tests for data_pipeline.ingest.prepare (acquisitions -> the model's 12-band stack) and for the
single-date dataset build it goes with.

Truth is independent of the code under test: hand-computed composites of synthetic acquisitions,
the real BigEarthNet-S1 and pyroSAR sample values themselves, a numpy bilinear interpolation of
linear power, and the geometry of a reprojection written here. Real samples live in
/work/shared/samples (tests needing them are skipped where it is absent); what they lack is
made here and named SYNTHETIC.
"""

import datetime
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import rasterio.warp
from affine import Affine

import configs.data.geotiff as geotiff_config
from data_pipeline import quantise
from data_pipeline import schema
from data_pipeline import writer
from data_pipeline.ingest import build
from data_pipeline.ingest import prepare
from data_pipeline.ingest.sources import geotiff
from mae_jax.tools import scene_reader
from tests import ingest_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = '/work/shared/samples'
BEN = os.path.join(SAMPLES, 'bigearthnet_s1_tiny')
PYROSAR = os.path.join(SAMPLES, 'pyrosar_s1_db',
                       'S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif')
AUSTRIA = [f'S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_{n}' for n in (39, 40, 41)]
needs_ben = pytest.mark.skipif(not os.path.isdir(BEN), reason='BigEarthNet-S1 sample missing')
needs_pyrosar = pytest.mark.skipif(not os.path.exists(PYROSAR), reason='pyroSAR sample missing')
# The round trip dB -> linear power -> (identity resampling) -> dB of an on-grid read.
ON_GRID_ATOL_DB = 1e-4


def ben_file(patch, polarisation):
  return os.path.join(BEN, patch, f'{patch}_{polarisation}.tif')


def run(inputs, output, **kwargs):
  """prepare.prepare with its decision lines collected; returns (result, lines)."""
  lines = []
  result = prepare.prepare([str(i) for i in inputs], str(output), log=lines.append, **kwargs)
  return result, lines


def read_stack(path):
  with rasterio.open(path) as f:
    return f.read(), f.profile, f.descriptions, f.tags()


def band(name):
  return schema.BAND_NAMES.index(name)


def austria_stack(tmp_path):
  """(stack, its path) of the three real Austria patches (one summer date)."""
  output = tmp_path / 'austria.tif'
  inputs = [os.path.join(BEN, p) for p in AUSTRIA]
  run(inputs, output)
  return read_stack(output)[0], output


# --- Compositing, hand-checked -----------------------------------------------------------------


def test_hand_checked_composites_of_synthetic_acquisitions(tmp_path):
  """SYNTHETIC constant acquisitions on a 6 x 4 px 10 m UTM grid: medians computed by hand."""
  folder = tmp_path / 'acquisitions'
  transform = fx.utm_transform()

  def write(date, polarisation, value, holes=()):
    image = np.full((4, 6), value, np.float32)
    for (row, col), fill in holes:
      image[row, col] = fill
    fx.write_tif(folder / f'S1_{date}T060000_{polarisation}.tif', image, transform)

  # Year 2020: winter = December 2019 .. February 2020.
  write('20191210', 'VV', -10.0)
  write('20200205', 'VV', -14.0)
  write('20200301', 'VV', -8.0)
  write('20200401', 'VV', -9.0, holes=[((1, 2), np.nan)])
  write('20200501', 'VV', -13.0)
  write('20200701', 'VV', -7.0, holes=[((0, 0), 0.0)])  # 0 is a fill value: no data
  for date, value in (('20191210', -18.0), ('20200205', -20.0), ('20200301', -15.0),
                      ('20200401', -16.0), ('20200501', -21.0), ('20200701', -17.0)):
    write(date, 'VH', value)
  # Other composite years, which must not count: December 2020 is winter of 2021.
  write('20201205', 'VV', -30.0)
  write('20201205', 'VH', -30.0)
  write('20180601', 'VV', -30.0)
  write('20180601', 'VH', -30.0)
  # Layers that ship beside acquisitions (ASF RTC) and other polarisations: skipped.
  fx.write_tif(folder / 'S1_20200301T060000_inc_map.tif', np.full((4, 6), 35.0, np.float32),
               transform)
  write('20200301', 'HH', -5.0)

  result, lines = run([folder], tmp_path / 'stack.tif')
  stack, profile, descriptions, tags = read_stack(tmp_path / 'stack.tif')
  assert result.year == 2020 and tags['COMPOSITE_YEAR'] == '2020'
  assert stack.shape == (12, 4, 6) and profile['dtype'] == 'float32'
  assert descriptions == schema.BAND_NAMES
  expected = {  # Per season: VV, VH (medians by hand), and VV-VH = their difference.
      'winter': (-12.0, -19.0), 'spring': (-9.0, -16.0), 'summer': (-7.0, -17.0)}
  for season, (vv, vh) in expected.items():
    got = {p: stack[band(f'{p}_{season}')] for p in schema.PRODUCTS}
    mask = np.ones((4, 6), bool)
    if season == 'spring':
      mask[1, 2] = False
    if season == 'summer':
      mask[0, 0] = False
    np.testing.assert_allclose(got['vv'][mask], vv, atol=ON_GRID_ATOL_DB)
    np.testing.assert_allclose(got['vh'], vh, atol=ON_GRID_ATOL_DB)
    np.testing.assert_allclose(got['vv_minus_vh'][mask], vv - vh, atol=ON_GRID_ATOL_DB)
  # Spring at (1, 2): the April VV is missing, so the median of -8 and -13.
  assert stack[band('vv_spring'), 1, 2] == pytest.approx(-10.5, abs=ON_GRID_ATOL_DB)
  assert stack[band('vv_minus_vh_spring'), 1, 2] == pytest.approx(5.5, abs=ON_GRID_ATOL_DB)
  # Summer at (0, 0): the only VV is a fill value -> no data, and so is VV-VH; VH is there.
  assert np.isnan(stack[band('vv_summer'), 0, 0])
  assert np.isnan(stack[band('vv_minus_vh_summer'), 0, 0])
  assert stack[band('vh_summer'), 0, 0] == pytest.approx(-17.0, abs=ON_GRID_ATOL_DB)
  # Fall has no acquisition: its three channels are NaN everywhere.
  for product in schema.PRODUCTS:
    assert np.isnan(stack[band(f'{product}_fall')]).all()
  assert tags['SEASONS_PRESENT'] == 'winter,spring,summer'
  text = '\n'.join(lines)
  assert 'year: 2020, the year with the most acquisition dates (2018: 1 date, 2020: 6 dates, ' \
         '2021: 1 date)' in text
  assert '4 files of other years left out' in text
  assert ('skipped 2 GeoTIFFs that are not VV or VH acquisitions by name or tags '
          '(S1_20200301T060000_HH.tif, S1_20200301T060000_inc_map.tif)') in text
  assert 'season winter (December 2019 to February 2020): 2 acquisition dates' in text
  assert 'season fall (September to November 2020): absent' in text
  assert 'vv_minus_vh_fall, vv_fall, vh_fall are NaN' in text
  assert 'units: dB detected in 12 files' in text
  assert 'resampling: none' in text
  # Every decision once: one line per season, one per kind of decision.
  assert sum(line.startswith('season ') for line in lines) == 4
  for kind in ('inputs:', 'units:', 'grid:', 'resampling:', 'wrote '):
    assert sum(line.startswith(kind) for line in lines) == 1, kind
  # --year picks another year, here with one date in each of winter (December) only.
  result, lines = run([folder], tmp_path / 'stack2021.tif', year=2021)
  stack = read_stack(tmp_path / 'stack2021.tif')[0]
  assert result.seasons['winter'] == [datetime.date(2020, 12, 5)]
  np.testing.assert_allclose(stack[band('vv_winter')], -30.0, atol=ON_GRID_ATOL_DB)
  assert np.isnan(stack[[band(f'vv_{s}') for s in ('spring', 'summer', 'fall')]]).all()


def test_choose_year_counts_dates_with_december_in_the_next_year():
  d = datetime.date
  assert prepare.choose_year([d(2019, 12, 1), d(2020, 1, 1), d(2020, 7, 1)])[0] == 2020
  # A tie goes to the later year; two files of one date are one date.
  assert prepare.choose_year([d(2018, 6, 1), d(2018, 6, 1), d(2019, 6, 1)])[0] == 2019
  assert prepare.choose_year([d(2018, 6, 1), d(2018, 7, 1), d(2019, 6, 1)])[0] == 2018
  with pytest.raises(ValueError, match=r'--year 2017: no acquisition .*2018: 1 date'):
    prepare.choose_year([d(2017, 12, 24)], 2017)


def test_defaults_are_the_dataset_builders():
  config = geotiff_config.get_config()
  assert prepare.METHOD == config.composite_method
  assert tuple(prepare.NODATA_VALUES) == tuple(config.nodata_values)
  assert prepare.NOISE_FLOOR_DB == config.noise_floor_db
  assert prepare.RESAMPLING == config.resampling
  assert prepare.RESAMPLE_IN_LINEAR_POWER == config.resample_in_linear_power
  assert prepare.PIXEL_SIZE == config.pixel_size == schema.PIXEL_SIZE_M


# --- Real BigEarthNet: a single date -----------------------------------------------------------


@needs_ben
def test_bigearthnet_single_date_gives_summer_and_three_nan_seasons(tmp_path):
  stack, output = austria_stack(tmp_path)
  assert stack.shape == (12, 360, 120)  # three 120 x 120 patches stacked north to south
  with rasterio.open(output) as f:
    assert f.crs.to_epsg() == 32633
    assert tuple(f.transform)[:6] == (10.0, 0.0, 373200.0, 0.0, -10.0, 5353200.0)
    assert f.profile['tiled'] and f.profile['compress'] == 'deflate'
    assert math.isnan(f.nodata)
  for i, patch in enumerate(AUSTRIA):
    rows = slice(120 * i, 120 * (i + 1))
    for polarisation in ('VV', 'VH'):
      with rasterio.open(ben_file(patch, polarisation)) as f:
        real = f.read(1)
      np.testing.assert_allclose(stack[band(f'{polarisation.lower()}_summer'), rows], real,
                                 atol=ON_GRID_ATOL_DB)
  np.testing.assert_allclose(stack[band('vv_minus_vh_summer')],
                             stack[band('vv_summer')] - stack[band('vh_summer')], atol=1e-5)
  for season in ('winter', 'spring', 'fall'):
    for product in schema.PRODUCTS:
      assert np.isnan(stack[band(f'{product}_{season}')]).all(), (product, season)


@needs_ben
def test_predicts_scene_reader_reads_the_stack_as_a_12_band_scene(tmp_path):
  stack, output = austria_stack(tmp_path)
  scene = scene_reader.for_model(schema.InputContract(), [str(output)])
  assert scene.band_names == schema.BAND_NAMES and len(scene.sources) == 12
  assert scene.files_grid is None  # On the model's grid: read as stored, not resampled.
  assert scene.units == 'dB' and (scene.width, scene.height) == (120, 360)
  assert scene.crs.to_epsg() == 32633 and scene.transform.a == 10.0
  reader = scene_reader.SceneReader(scene, quantise.FLOAT16)
  try:
    window = reader.read(100, 20, 64)
  finally:
    reader.close()
  expected = np.moveaxis(stack[:, 100:164, 20:84], 0, -1).astype(np.float16)
  np.testing.assert_array_equal(window, expected)  # NaN seasons included


@needs_ben
def test_inputs_spread_over_europe_are_refused_and_bounds_cut_them(tmp_path):
  # The whole sample folder: Austria (zone 33), Ireland and Portugal (zone 29).
  with pytest.raises(ValueError, match=r'span 1470 x .*--bounds W,S,E,N'):
    run([BEN], tmp_path / 'all.tif')
  assert not os.listdir(tmp_path)
  stack, _ = austria_stack(tmp_path)
  with rasterio.open(ben_file(AUSTRIA[0], 'VV')) as f:
    left, top = f.transform.c, f.transform.f
  box = rasterio.warp.transform_bounds('EPSG:32633', 'EPSG:4326', left + 200, top - 3400,
                                       left + 1000, top - 200)
  result, lines = run([BEN], tmp_path / 'cut.tif', bounds=box)
  cut = read_stack(tmp_path / 'cut.tif')[0]
  assert result.crs.to_epsg() == 32633
  # The cut lies on the same lattice: its pixels are the full stack's.
  col = round((result.transform.c - left) / 10)
  row = round((top - result.transform.f) / 10)
  assert 0 < col < 20 and 0 < row < 20
  summer = [band(f'{p}_summer') for p in schema.PRODUCTS]
  np.testing.assert_array_equal(cut[summer],
                                stack[summer, row:row + result.height, col:col + result.width])
  assert any('--bounds' in line for line in lines)


# --- Pixel size, CRS and units -----------------------------------------------------------------


def bilinear_power(values_db, src_transform, dst_transform, shape):
  """numpy bilinear interpolation of linear power at the centres of a destination grid (same
  CRS, north-up): the truth for resampling a 20 m scene to 10 m; NaN where a neighbour is
  missing."""
  rows, cols = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
  x, y = dst_transform * (cols, rows)
  u, v = ~src_transform * (x, y)  # Fractional source pixel coordinates (corner = 0).
  u, v = u - 0.5, v - 0.5  # Relative to the source pixel centres.
  c0, r0 = np.floor(u).astype(int), np.floor(v).astype(int)
  fu, fv = u - c0, v - r0
  power = 10 ** (values_db.astype(np.float64) / 10)
  height, width = power.shape
  inside = (c0 >= 0) & (r0 >= 0) & (c0 + 1 < width) & (r0 + 1 < height)
  c0, r0 = np.clip(c0, 0, width - 2), np.clip(r0, 0, height - 2)
  out = ((1 - fv) * ((1 - fu) * power[r0, c0] + fu * power[r0, c0 + 1])
         + fv * ((1 - fu) * power[r0 + 1, c0] + fu * power[r0 + 1, c0 + 1]))
  return np.where(inside, 10 * np.log10(out), np.nan)


@needs_pyrosar
def test_pyrosar_20m_is_resampled_to_10m_and_refused_with_noresample(tmp_path):
  result, lines = run([PYROSAR], tmp_path / 'pyrosar.tif')
  stack, profile, _, _ = read_stack(tmp_path / 'pyrosar.tif')
  with rasterio.open(PYROSAR) as f:
    real, real_transform = f.read(1), f.transform
  assert profile['crs'].to_epsg() == 32631 and profile['transform'].a == 10.0
  assert result.transform.c % 10 == 0 and result.transform.f % 10 == 0
  # The 10 m grid covers the 20 m extent: 268 x 217 px of 20 m, origin snapped outwards.
  assert (result.width, result.height) == (537, 435)
  vv = stack[band('vv_spring')]
  truth = bilinear_power(real, real_transform, result.transform, vv.shape)
  interior = np.isfinite(truth)
  assert interior.mean() > 0.98
  np.testing.assert_allclose(vv[interior], truth[interior], atol=0.01)
  # pyroSAR's sample is VV only: VH and VV-VH are no data, as are the three other seasons.
  assert np.isfinite(vv).mean() > 0.99
  assert np.isnan(np.delete(stack, band('vv_spring'), axis=0)).all()
  text = '\n'.join(lines)
  assert 'pixel size 20 m, not 10 m -> resampled onto the grid' in text
  assert 'no VH -> vh_spring, vv_minus_vh_spring are NaN' in text
  with pytest.raises(ValueError, match=r'pixel size 20 m.*\(--noresample\): drop --noresample'):
    run([PYROSAR], tmp_path / 'refused.tif', resample=False)
  assert not (tmp_path / 'refused.tif').exists()


@needs_pyrosar
def test_command_line_prints_decisions_and_errors_without_a_traceback(tmp_path):
  command = [sys.executable, '-m', 'data_pipeline.ingest.prepare']
  refused = subprocess.run(command + ['--output', str(tmp_path / 'a.tif'), '--noresample',
                                      PYROSAR], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
  assert refused.returncode == 1
  assert 'data_pipeline.ingest.prepare: error:' in refused.stderr
  assert '--noresample' in refused.stderr and 'Traceback' not in refused.stderr
  assert not os.listdir(tmp_path)
  done = subprocess.run(command + [PYROSAR, '--output', str(tmp_path / 'a.tif')], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert 'season spring (March to May 2015): 1 acquisition date (2015-03-09)' in done.stdout
  assert os.listdir(tmp_path) == ['a.tif']


@needs_ben
def test_geographic_input_is_resampled_to_utm(tmp_path):
  """A real patch written in EPSG:4326 here (nearest neighbour, ~2 m pixels), read back onto the
  10 m UTM grid: the original lattice again, every pixel back where it was (the original
  correlates best at no shift, better than at any 1 px shift) and the mean power kept (the
  resampling averages power, not dB)."""
  folder = tmp_path / 'lonlat'
  folder.mkdir()
  patch = AUSTRIA[0]
  originals = {}
  for polarisation in ('VV', 'VH'):
    with rasterio.open(ben_file(patch, polarisation)) as f:
      values, src_transform, bounds = f.read(1), f.transform, f.bounds
    originals[polarisation] = values
    west, south, east, north = rasterio.warp.transform_bounds('EPSG:32633', 'EPSG:4326',
                                                              *bounds)
    dst_transform = Affine(3e-5, 0, west, 0, -2e-5, north)
    shape = (math.ceil((north - south) / 2e-5), math.ceil((east - west) / 3e-5))
    lonlat = np.full(shape, np.nan, np.float32)
    rasterio.warp.reproject(values, lonlat, src_transform=src_transform, src_crs='EPSG:32633',
                            dst_transform=dst_transform, dst_crs='EPSG:4326',
                            resampling=rasterio.warp.Resampling.nearest, dst_nodata=np.nan)
    fx.write_tif(folder / os.path.basename(ben_file(patch, polarisation)), lonlat, dst_transform,
                 crs='EPSG:4326', nodata=np.nan)
  result, lines = run([folder], tmp_path / 'utm.tif')
  stack = read_stack(tmp_path / 'utm.tif')[0]
  assert result.crs.to_epsg() == 32633  # The UTM zone of the centre (13.3 E).
  assert result.transform.a == 10.0
  col = round((src_transform.c - result.transform.c) / 10)
  row = round((result.transform.f - src_transform.f) / 10)
  assert (col - (src_transform.c - result.transform.c) / 10,
          row - (result.transform.f - src_transform.f) / 10) == (0, 0)  # same lattice
  for polarisation, values in originals.items():
    got = stack[band(f'{polarisation.lower()}_summer')]
    assert np.isfinite(got[row:row + 120, col:col + 120]).all()
    mean_power_db = 10 * np.log10(np.mean(10 ** (got[row:row + 120, col:col + 120] / 10)))
    assert mean_power_db == pytest.approx(10 * np.log10(np.mean(10 ** (values / 10))), abs=0.01)

    def correlation(shift_row, shift_col):
      r, c = row + shift_row, col + shift_col
      return np.corrcoef(got[r + 3:r + 117, c + 3:c + 117].ravel(),
                         values[3:117, 3:117].ravel())[0, 1]

    at_zero = correlation(0, 0)
    assert at_zero > 0.99, polarisation
    for shift in ((1, 0), (-1, 0), (0, 1), (0, -1)):
      assert correlation(*shift) < at_zero - 0.02, (polarisation, shift)
  assert any('CRS EPSG:4326 is geographic (degrees)' in line and 'resampled' in line
             for line in lines)
  assert any('the UTM zone of the inputs\' centre' in line for line in lines)
  with pytest.raises(ValueError, match=r'geographic.*--noresample'):
    run([folder], tmp_path / 'refused.tif', resample=False)


@needs_ben
def test_linear_power_is_detected_converted_and_refused_when_stated_as_db(tmp_path):
  folder = tmp_path / 'linear'
  patch = AUSTRIA[0]
  originals = {}
  for polarisation in ('VV', 'VH'):
    with rasterio.open(ben_file(patch, polarisation)) as f:
      originals[polarisation], transform = f.read(1), f.transform
    fx.write_tif(folder / f'SYNTHETIC_linear_20170613T165043_{polarisation}.tif',
                 10 ** (originals[polarisation] / 10), transform)
  _, lines = run([folder], tmp_path / 'auto.tif')
  stack = read_stack(tmp_path / 'auto.tif')[0]
  for polarisation, values in originals.items():
    np.testing.assert_allclose(stack[band(f'{polarisation.lower()}_summer')], values,
                               atol=ON_GRID_ATOL_DB)
  assert 'units: linear power detected in 2 files -> converted to dB (10 log10)' in lines
  with pytest.raises(ValueError, match=r'--units dB contradicts the values: they look like '
                                       r'linear .*give --units linear'):
    run([folder], tmp_path / 'stated_db.tif', units='dB')
  _, lines = run([folder], tmp_path / 'stated_linear.tif', units='linear')
  assert 'units: linear power stated, detected too in 2 files -> converted to dB (10 log10) ' \
         '(--units linear)' in lines
  with pytest.raises(ValueError, match=r'--units linear contradicts the values: they look like dB'):
    run([os.path.join(BEN, patch)], tmp_path / 'stated_linear_db.tif', units='linear')
  assert sorted(os.listdir(tmp_path)) == ['auto.tif', 'linear', 'stated_linear.tif']


# --- STAC --------------------------------------------------------------------------------------


def stac_item(pystac, patch, folder, keys=('vv', 'vh')):
  """A STAC item of one real patch, its files copied beside it without a date in their names."""
  folder.mkdir(parents=True)
  item = pystac.Item(id=patch, geometry=None, bbox=None,
                     datetime=datetime.datetime(2017, 6, 13, 16, 50, 43), properties={})
  for key, polarisation in zip(keys, ('VV', 'VH')):
    shutil.copy(ben_file(patch, polarisation), folder / f'{key}.tif')
    asset = pystac.Asset(href=str(folder / f'{key}.tif'), media_type=pystac.MediaType.COG,
                         roles=['data'])
    if key not in ('vv', 'vh'):
      asset.extra_fields['sar:polarizations'] = [polarisation]
    item.add_asset(key, asset)
  # Assets that are not backscatter: skipped.
  item.add_asset('thumbnail', pystac.Asset(href='preview.png', media_type=pystac.MediaType.PNG,
                                           roles=['thumbnail']))
  shutil.copy(ben_file(patch, 'VV'), folder / 'incidence.tif')
  item.add_asset('incidence', pystac.Asset(href=str(folder / 'incidence.tif'),
                                           media_type=pystac.MediaType.GEOTIFF, roles=['data']))
  return item


@needs_ben
def test_stac_item_and_local_catalog_give_the_stack_of_the_files(tmp_path):
  pystac = pytest.importorskip('pystac')
  reference, _ = austria_stack(tmp_path)
  # One item JSON, asset hrefs relative to it.
  item = stac_item(pystac, AUSTRIA[0], tmp_path / 'item')
  item.set_self_href(str(tmp_path / 'item' / 'item.json'))
  item.make_asset_hrefs_relative()
  item.save_object()
  assert json.loads((tmp_path / 'item' / 'item.json').read_text())['assets']['vv']['href'] == \
      './vv.tif'
  _, lines = run([tmp_path / 'item' / 'item.json'], tmp_path / 'item.tif')
  stack = read_stack(tmp_path / 'item.tif')[0]
  np.testing.assert_array_equal(stack[:, :120], reference[:, :120])
  assert any('skipped GeoTIFF assets that are not VV / VH backscatter: 1 x incidence' in line
             for line in lines)
  # A self-contained catalog of the three patches; one item names its assets by
  # sar:polarizations only.
  catalog = pystac.Catalog(id='austria', description='SYNTHETIC catalog of real patches')
  for index, patch in enumerate(AUSTRIA):
    keys = ('band1', 'band2') if index == 1 else ('vv', 'vh')
    catalog.add_item(stac_item(pystac, patch, tmp_path / 'catalog' / patch, keys))
  catalog.normalize_hrefs(str(tmp_path / 'catalog'))
  catalog.make_all_asset_hrefs_relative()
  catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
  result, lines = run([tmp_path / 'catalog' / 'catalog.json'], tmp_path / 'catalog.tif')
  np.testing.assert_array_equal(read_stack(tmp_path / 'catalog.tif')[0], reference)
  assert result.seasons['summer'] == [datetime.date(2017, 6, 13)]  # the items' datetime
  assert lines[1].startswith('inputs: 6 acquisition files from 1 input')


def test_stac_item_without_backscatter_is_refused(tmp_path):
  pystac = pytest.importorskip('pystac')
  item = pystac.Item(id='hh-only', geometry=None, bbox=None,
                     datetime=datetime.datetime(2020, 1, 1), properties={})
  item.add_asset('hh', pystac.Asset(href='hh.tif', media_type=pystac.MediaType.GEOTIFF,
                                    roles=['data']))
  item.set_self_href(str(tmp_path / 'item.json'))
  item.save_object()
  with pytest.raises(ValueError, match=r"STAC item 'hh-only' .*no VV or VH GeoTIFF asset"):
    run([tmp_path / 'item.json'], tmp_path / 'out.tif')
  (tmp_path / 'other.json').write_text('{"type": "Topology"}')
  with pytest.raises(ValueError, match=r'other.json: cannot read it as STAC'):
    run([tmp_path / 'other.json'], tmp_path / 'out.tif')


# --- Atomic output -----------------------------------------------------------------------------


@needs_ben
def test_a_failure_while_writing_leaves_nothing_and_existing_files_need_overwrite(tmp_path,
                                                                                 monkeypatch):
  inputs = [os.path.join(BEN, p) for p in AUSTRIA]
  output = tmp_path / 'stack.tif'
  calls = []
  real_tile_image = geotiff.tile_image

  def failing(unit, settings):
    calls.append(unit.tile.tile_id)
    if len(calls) == 3:
      raise RuntimeError('SYNTHETIC failure in the third block')
    return real_tile_image(unit, settings)

  monkeypatch.setattr(prepare, 'BLOCK', 64)  # 2 x 6 blocks
  monkeypatch.setattr(geotiff, 'tile_image', failing)
  with pytest.raises(RuntimeError, match='third block'):
    run(inputs, output)
  assert os.listdir(tmp_path) == []  # no output, no temporary file
  monkeypatch.setattr(geotiff, 'tile_image', real_tile_image)
  output.write_bytes(b'SYNTHETIC previous output')
  with pytest.raises(FileExistsError, match=r'exists; pass --overwrite'):
    run(inputs, output)
  assert output.read_bytes() == b'SYNTHETIC previous output'
  run(inputs, output, overwrite=True)
  assert read_stack(output)[0].shape == (12, 360, 120)
  assert os.listdir(tmp_path) == ['stack.tif']
  with pytest.raises(FileNotFoundError, match=r'the folder .*missing does not exist'):
    run(inputs, tmp_path / 'missing' / 'stack.tif')


# --- The single-date dataset build -------------------------------------------------------------


@needs_ben
def test_single_date_archive_builds_with_nan_seasons_and_borrowed_statistics(tmp_path):
  """The real Austria strip (one June date) through the dataset builder: three empty seasons,
  finite statistics (borrowed from summer), no error."""
  folder = tmp_path / 'scenes'
  folder.mkdir()
  for patch in AUSTRIA:
    for polarisation in ('VV', 'VH'):
      shutil.copy(ben_file(patch, polarisation), folder)
  config = geotiff_config.get_config()
  config.areas[0].scenes = str(folder / '*.tif')
  config.year = 2017
  config.tile_size = 40
  config.num_shards = 1
  contract, report = build.build(config, str(tmp_path / 'ds'))
  tiles = [ex for split in fx.read_dataset(tmp_path / 'ds').values() for ex in split.values()]
  assert len(tiles) == 27
  image = np.stack([ex[schema.IMAGE] for ex in tiles]).astype(np.float32)
  summer = [band(f'{p}_summer') for p in schema.PRODUCTS]
  assert np.isfinite(image[..., summer]).all()
  assert np.isnan(np.delete(image, summer, axis=-1)).all()
  assert np.isfinite(contract.mean).all() and np.isfinite(contract.std).all()
  assert min(contract.std) > 0
  borrowed = {f'{p}_{s}': [f'{p}_summer'] for p in schema.PRODUCTS
              for s in ('winter', 'spring', 'fall')}
  assert report['statistics_borrowed'] == borrowed
  metadata = json.loads((tmp_path / 'ds' / 'metadata.json').read_text())
  assert metadata['statistics_borrowed'] == borrowed
  stored = writer.read_contract(str(tmp_path / 'ds'))
  for product in schema.PRODUCTS:
    for season in ('winter', 'spring', 'fall'):
      assert stored.mean[band(f'{product}_{season}')] == stored.mean[band(f'{product}_summer')]
      assert stored.std[band(f'{product}_{season}')] == stored.std[band(f'{product}_summer')]
  # And the summer statistics are those of the training tiles' float16 values (numpy).
  train = np.stack([ex[schema.IMAGE] for ex in fx.read_dataset(tmp_path / 'ds')['train']
                    .values()]).astype(np.float64)
  np.testing.assert_allclose(stored.mean[band('vv_summer')],
                             train[..., band('vv_summer')].mean(), rtol=1e-6)
  np.testing.assert_allclose(stored.std[band('vv_summer')],
                             train[..., band('vv_summer')].std(), rtol=1e-5)
