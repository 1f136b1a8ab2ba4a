"""Tests for data_pipeline.ingest.m3leo: the authors' chip layout, s1grd decoding, splits and errors."""

import json
import os

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_bounds

from data_pipeline.ingest import labels
from data_pipeline.ingest import m3leo
from data_pipeline import schema

SIZE = 64
HASH = '2f8bd3f01ddd5'
# Four chips: (identifier, (west, south, east, north)). The last is a MultiPolygon whose parts
# span 12.10..12.16 x 45.00..45.04, to check bounds over all parts.
CHIPS = (
    ('a1b2c3d4e5f60', (12.00, 45.00, 12.04, 45.04)),
    ('0123456789abc', (12.04, 45.00, 12.08, 45.04)),
    ('fedcba9876543', (12.00, 45.04, 12.04, 45.08)),
    ('00000000000ff', (12.10, 45.00, 12.16, 45.04)),
)
SPLITS_CSV = {'a1b2c3d4e5f60': 'train', '0123456789abc': 'val', 'fedcba9876543': 'test'}

# The file's band layout, written out by hand (1-based GeoTIFF band numbers): per season
# vv_asc, vv_des, vh_asc, vh_des.
FILE_BAND = {
    ('winter', 'vv', 'asc'): 1, ('winter', 'vv', 'des'): 2,
    ('winter', 'vh', 'asc'): 3, ('winter', 'vh', 'des'): 4,
    ('spring', 'vv', 'asc'): 5, ('spring', 'vv', 'des'): 6,
    ('spring', 'vh', 'asc'): 7, ('spring', 'vh', 'des'): 8,
    ('summer', 'vv', 'asc'): 9, ('summer', 'vv', 'des'): 10,
    ('summer', 'vh', 'asc'): 11, ('summer', 'vh', 'des'): 12,
    ('fall', 'vv', 'asc'): 13, ('fall', 'vv', 'des'): 14,
    ('fall', 'vh', 'asc'): 15, ('fall', 'vh', 'des'): 16,
}
EXPECTED_BAND_NAMES = (
    'vv_minus_vh_winter', 'vv_minus_vh_spring', 'vv_minus_vh_summer', 'vv_minus_vh_fall',
    'vv_winter', 'vv_spring', 'vv_summer', 'vv_fall',
    'vh_winter', 'vh_spring', 'vh_summer', 'vh_fall')


def _s1_bands(seed: int) -> np.ndarray:
  """16 x 64 x 64 uint8: band b has base value 20 + 12 b plus a per-band pixel pattern."""
  rows, cols = np.mgrid[0:SIZE, 0:SIZE]
  bands = np.stack([(20 + 12 * b + (rows * 3 + cols * (5 + b) + seed) % 17) for b in range(16)])
  bands = bands.astype(np.uint8)
  # Pixel (0, 0) of winter ascending: VV 170 -> 170 * 30 / 255 - 30 = -10 dB, VH 85 -> -20 dB,
  # so VV-VH = 10 dB, and the authors' value 170 - 85 = 85 = 8.5 x 10.
  bands[0, 0, 0] = 170
  bands[2, 0, 0] = 85
  # VH > VV somewhere, so a negative difference must survive the authors' int16 arithmetic.
  bands[0, 1, 1] = 3
  bands[2, 1, 1] = 250
  return bands


def _write_tif(path, bands, bounds, crs='EPSG:4326', descriptions=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  count, height, width = bands.shape
  with rasterio.open(path, 'w', driver='GTiff', width=width, height=height, count=count,
                     dtype=bands.dtype, crs=crs,
                     transform=from_bounds(*bounds, width, height)) as dataset:
    dataset.write(bands)
    if descriptions:
      dataset.descriptions = tuple(descriptions)


def _polygon(bounds):
  west, south, east, north = bounds
  return [[[west, south], [east, south], [east, north], [west, north], [west, south]]]


def _build_area(root, nested=False):
  """Writes an area 'europe' in the authors' layout; returns (aoi dir, {id: uint8 bands})."""
  aoi = root / 'europe'
  aoi.mkdir()
  stem = f'europe_partitions_aschips_{HASH}'
  features = []
  for identifier, bounds in CHIPS:
    if identifier == '00000000000ff':
      geometry = {'type': 'MultiPolygon', 'coordinates': [
          _polygon((12.10, 45.00, 12.12, 45.02)), _polygon((12.14, 45.02, 12.16, 45.04))]}
    else:
      geometry = {'type': 'Polygon', 'coordinates': _polygon(bounds)}
    features.append({'type': 'Feature', 'geometry': geometry,
                     'properties': {'identifier': identifier, 'area_km2': 19.9}})
  (aoi / f'{stem}.geojson').write_text(json.dumps({
      'type': 'FeatureCollection',
      'crs': {'type': 'name', 'properties': {'name': 'urn:ogc:def:crs:OGC:1.3:CRS84'}},
      'features': features}))
  # The last chip is deliberately missing from the split CSV.
  lines = ['identifier,split'] + [f'{i},{s}' for i, s in SPLITS_CSV.items()]
  (aoi / f'{stem}_splits_60bands_angle09_60-20-20.csv').write_text('\n'.join(lines) + '\n')
  data_dir = aoi / stem if nested else aoi
  written = {}
  # The three chips of the CSV get s1grd files; '00000000000ff' has none.
  for seed, (identifier, bounds) in enumerate(CHIPS[:3]):
    bands = _s1_bands(seed)
    _write_tif(str(data_dir / m3leo.S1_DATASET / f'{identifier}.tif'), bands, bounds)
    written[identifier] = bands
  return aoi, written


@pytest.fixture
def area(tmp_path):
  return _build_area(tmp_path)


def _authors_loader(bands, direction='asc'):
  """The authors' load_s1grd by hand: int16 bands, VV-VH in stored units, order [vv-vh, vv, vh]."""
  x = bands.astype(np.int16)
  vv = [x[FILE_BAND[(s, 'vv', direction)] - 1] for s in ('winter', 'spring', 'summer', 'fall')]
  vh = [x[FILE_BAND[(s, 'vh', direction)] - 1] for s in ('winter', 'spring', 'summer', 'fall')]
  return np.stack([a - b for a, b in zip(vv, vh)] + vv + vh).astype(np.float32)  # (12, H, W)


def test_band_order_is_schema_order():
  assert schema.BAND_NAMES == EXPECTED_BAND_NAMES
  assert m3leo.S1GRD_BANDS == tuple(
      f'{season}_{pol}{direction}' for (season, pol, direction), _ in
      sorted(FILE_BAND.items(), key=lambda item: item[1]))
  assert m3leo.S1_UINT8_STEPS_PER_DB == 8.5


def test_read_s1_matches_hand_decoding(area):
  aoi, written = area
  chips = m3leo.ChipSet(aoi)
  for identifier, bands in written.items():
    image = chips.read_s1(identifier)
    assert image.shape == (SIZE, SIZE, 12) and image.dtype == np.float32
    db = bands.astype(np.float64) * 30.0 / 255.0 - 30.0
    for season in ('winter', 'spring', 'summer', 'fall'):
      vv = db[FILE_BAND[(season, 'vv', 'asc')] - 1]
      vh = db[FILE_BAND[(season, 'vh', 'asc')] - 1]
      np.testing.assert_allclose(image[..., EXPECTED_BAND_NAMES.index(f'vv_{season}')], vv,
                                 rtol=0, atol=1e-5)
      np.testing.assert_allclose(image[..., EXPECTED_BAND_NAMES.index(f'vh_{season}')], vh,
                                 rtol=0, atol=1e-5)
      np.testing.assert_allclose(
          image[..., EXPECTED_BAND_NAMES.index(f'vv_minus_vh_{season}')], vv - vh,
          rtol=0, atol=1e-5)
  # The worked pixel: VV -10 dB, VH -20 dB, VV-VH 10 dB; and one with VV-VH = (3 - 250) * 30/255.
  image = chips.read_s1(CHIPS[0][0])
  np.testing.assert_allclose(image[0, 0, [4, 8, 0]], [-10.0, -20.0, 10.0], atol=1e-5)
  np.testing.assert_allclose(image[1, 1, 0], -29.0588235, atol=1e-5)


def test_authors_units_reproduce_their_loader(area):
  aoi, written = area
  chips = m3leo.ChipSet(aoi)
  for direction in ('asc', 'des'):
    for identifier, bands in written.items():
      image = chips.read_s1(identifier, direction, authors_units=True)
      np.testing.assert_array_equal(image, _authors_loader(bands, direction).transpose(1, 2, 0))
  image = chips.read_s1(CHIPS[0][0], authors_units=True)
  assert image[0, 0, 0] == 85.0  # 8.5 x the 10 dB difference
  assert image[1, 1, 0] == 3 - 250  # negative, no uint8 wrap-around
  db = chips.read_s1(CHIPS[0][0])
  np.testing.assert_allclose(image[..., :4], 8.5 * db[..., :4], atol=1e-4)


def test_descending_passes(area):
  aoi, written = area
  bands = written[CHIPS[1][0]]
  image = m3leo.ChipSet(aoi).read_s1(CHIPS[1][0], passes='des')
  db = bands.astype(np.float64) * 30.0 / 255.0 - 30.0
  np.testing.assert_allclose(image[..., EXPECTED_BAND_NAMES.index('vv_summer')], db[9],
                             atol=1e-5)  # band 10 = summer vv_des
  np.testing.assert_allclose(image[..., EXPECTED_BAND_NAMES.index('vh_fall')], db[15],
                             atol=1e-5)  # band 16 = fall vh_des
  with pytest.raises(ValueError, match='passes'):
    m3leo.read_s1_chip(m3leo.ChipSet(aoi).chip_path(CHIPS[1][0], m3leo.S1_DATASET), 'both')


def test_band_descriptions_are_used_when_they_name_the_bands(tmp_path):
  bands = _s1_bands(0)
  # Same data stored in reversed band order, with descriptions saying so.
  path = str(tmp_path / 'reversed.tif')
  _write_tif(path, bands[::-1].copy(), CHIPS[0][1], descriptions=m3leo.S1GRD_BANDS[::-1])
  plain = str(tmp_path / 'plain.tif')
  _write_tif(plain, bands, CHIPS[0][1])
  np.testing.assert_array_equal(m3leo.read_s1_chip(path), m3leo.read_s1_chip(plain))
  bad = str(tmp_path / 'bad.tif')
  _write_tif(bad, bands, CHIPS[0][1], descriptions=['winter_vvasc'] + ['x'] * 15)
  with pytest.raises(ValueError, match='bad.tif'):
    m3leo.read_s1_chip(bad)


def test_zero_as_nodata(tmp_path):
  bands = _s1_bands(0)
  bands[0, 5, 6] = 0  # winter vv_asc
  path = str(tmp_path / 'zero.tif')
  _write_tif(path, bands, CHIPS[0][1])
  image = m3leo.read_s1_chip(path)
  assert image[5, 6, 4] == -30.0  # default: 0 is the legal floor, -30 dB
  masked = m3leo.read_s1_chip(path, zero_as_nodata=True)
  assert np.isnan(masked[5, 6, 4]) and np.isnan(masked[5, 6, 0])
  assert np.isfinite(masked[5, 6, 8])
  assert np.isfinite(np.delete(masked.reshape(-1, 12), 5 * SIZE + 6, axis=0)).all()


def test_constant_channels(tmp_path):
  bands = _s1_bands(0)
  assert m3leo.constant_channels(m3leo.read_s1_chip(_write_and(tmp_path, 'ok', bands))).size == 0
  # A summer without ascending VH acquisitions: Earth Engine fills it with 0.
  bands[10] = 0
  image = m3leo.read_s1_chip(_write_and(tmp_path, 'gap', bands))
  # VH summer is channel 10; VV-VH summer (2) still varies because VV does.
  assert m3leo.constant_channels(image).tolist() == [10]
  image[..., 3] = np.nan  # No data at all is not a constant channel.
  assert m3leo.constant_channels(image).tolist() == [10]
  image[1:, :, 4] = np.nan
  image[0, :, 4] = 7.0  # One finite value: constant.
  assert m3leo.constant_channels(image).tolist() == [4, 10]
  with pytest.raises(ValueError):
    m3leo.constant_channels(image[..., 0])


def _write_and(tmp_path, name, bands):
  path = str(tmp_path / f'{name}.tif')
  _write_tif(path, bands, CHIPS[0][1])
  return path


def test_chip_set_ids_centres_and_splits(area):
  aoi, _ = area
  chips = m3leo.ChipSet(aoi)
  assert len(chips) == 4 and chips.name == 'europe'
  assert chips.identifiers() == [i for i, _ in CHIPS]
  lon, lat = chips.centres()
  np.testing.assert_allclose(lon, [12.02, 12.06, 12.02, 12.13])
  np.testing.assert_allclose(lat, [45.02, 45.02, 45.06, 45.02])
  assert chips['00000000000ff'].bounds == (12.10, 45.00, 12.16, 45.04)
  assert chips['a1b2c3d4e5f60'].split == 'train'
  assert chips['0123456789abc'].split == 'validation'  # 'val' in the CSV
  assert chips['fedcba9876543'].split == 'test'
  assert chips['00000000000ff'].split is None  # not in the CSV
  assert chips.identifiers('validation') == ['0123456789abc']
  assert chips.identifiers('train') == ['a1b2c3d4e5f60']
  with pytest.raises(ValueError):
    chips.identifiers('val')
  assert chips.available(m3leo.S1_DATASET) == [i for i, _ in CHIPS[:3]]
  transform = chips['a1b2c3d4e5f60'].transform(448)
  assert transform @ (0, 0) == pytest.approx((12.00, 45.04))
  assert transform @ (448, 448) == pytest.approx((12.04, 45.00))


def test_nested_geetiles_folder(tmp_path):
  aoi, written = _build_area(tmp_path, nested=True)
  chips = m3leo.ChipSet(aoi)
  assert chips.data_dir == str(aoi / f'europe_partitions_aschips_{HASH}')
  identifier = CHIPS[2][0]
  np.testing.assert_array_equal(chips.read_s1(identifier, authors_units=True),
                                _authors_loader(written[identifier]).transpose(1, 2, 0))


def test_custom_id_property(tmp_path):
  aoi = tmp_path / 'conus'
  aoi.mkdir()
  (aoi / 'conus_partitions_aschips_abc.geojson').write_text(json.dumps({
      'type': 'FeatureCollection', 'features': [
          {'type': 'Feature', 'properties': {'chip_id': 'abc'},
           'geometry': {'type': 'Polygon', 'coordinates': _polygon((1, 2, 3, 4))}}]}))
  chips = m3leo.ChipSet(aoi, id_property='chip_id', split_csv=False)
  assert chips.identifiers() == ['abc'] and chips['abc'].lon == 2.0
  with pytest.raises(ValueError, match="no 'identifier' property"):
    m3leo.ChipSet(aoi, split_csv=False)
  with pytest.raises(FileNotFoundError, match='_splits_'):
    m3leo.ChipSet(aoi, id_property='chip_id')


def test_split_csv_with_unknown_chip(area):
  aoi, _ = area
  csv = next(aoi.glob('*_splits_*.csv'))
  csv.write_text(csv.read_text() + 'not_a_chip,train\n')
  with pytest.raises(ValueError, match='not_a_chip'):
    m3leo.ChipSet(aoi)


def test_missing_chip_file_names_it(area):
  aoi, _ = area
  chips = m3leo.ChipSet(aoi)
  with pytest.raises(FileNotFoundError, match=r's1grd-2020.00000000000ff\.tif'):
    chips.read_s1('00000000000ff')
  with pytest.raises(FileNotFoundError, match='nope.tif'):
    m3leo.read_s1_chip(str(aoi / 'nope.tif'))
  with pytest.raises(KeyError):
    chips.chip_path('unknown', m3leo.S1_DATASET)


def test_truncated_geotiff_names_the_file(area):
  aoi, _ = area
  chips = m3leo.ChipSet(aoi)
  path = chips.chip_path(CHIPS[0][0], m3leo.S1_DATASET)
  with open(path, 'rb') as f:
    data = f.read()
  for keep in (len(data) // 2, 100):  # data cut, then the header itself cut
    with open(path, 'wb') as f:
      f.write(data[:keep])
    with pytest.raises(labels.RasterReadError, match=CHIPS[0][0]) as info:
      chips.read_s1(CHIPS[0][0])
    assert path in str(info.value)
    assert isinstance(info.value, OSError)


def test_wrong_band_count_names_the_file(tmp_path):
  path = str(tmp_path / 's1grd-2020' / 'fifteen.tif')
  _write_tif(path, _s1_bands(0)[:15].copy(), CHIPS[0][1])
  with pytest.raises(ValueError, match=r'fifteen\.tif.*16 bands.*found 15'):
    m3leo.read_s1_chip(path)
  float_path = str(tmp_path / 'float.tif')
  _write_tif(float_path, _s1_bands(0).astype(np.float32), CHIPS[0][1])
  with pytest.raises(ValueError, match=r'float\.tif.*uint8'):
    m3leo.read_s1_chip(float_path)
