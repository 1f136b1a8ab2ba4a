"""Tests for data_pipeline.ingest.splits: the authors' geographic banding split, their CSVs and maps."""

import math
import os

import numpy as np
import pytest

from data_pipeline import schema
from data_pipeline.ingest import splits

# Five chips of one area. lon spans 10..14 (range 4), lat 40..42 (range 2), so the normalised
# centres are: A (0, 0), B (1, 1), C (0.25, 0.75), D (0.75, 0.25), E (0.5, 0.1).
LON = [10.0, 14.0, 11.0, 13.0, 12.0]
LAT = [40.0, 42.0, 41.5, 40.5, 40.2]
QUARTER = math.pi / 4


def test_constants():
  assert splits.AREA_ANGLES == {'europe': 0.9, 'conus': 0.9, 'china': 1.5,
                                'south_america': 0.2}
  assert splits.STRIPE_PATTERN == ('train', 'train', 'train', 'test', 'validation')
  assert set(splits.STRIPE_PATTERN) == set(schema.SPLITS)
  assert set(splits.AREA_ANGLES) <= set(schema.REGIONS)


def test_direction_hand_computed():
  # |a| >= pi/4: (sign a, (pi/2 - |a|) / (pi/4)); |a| < pi/4: (|a| / (pi/4), 1).
  assert splits.banding_direction(0.9) == pytest.approx((1.0, (math.pi / 2 - 0.9) / QUARTER))
  assert splits.banding_direction(0.9)[1] == pytest.approx(0.8540844, abs=1e-7)
  assert splits.banding_direction(1.5) == pytest.approx((1.0, 0.0901407), abs=1e-7)
  assert splits.banding_direction(0.2) == pytest.approx((0.2546479, 1.0), abs=1e-7)
  assert splits.banding_direction(-0.2) == pytest.approx((0.2546479, 1.0), abs=1e-7)
  assert splits.banding_direction(-0.9) == pytest.approx((-1.0, 0.8540844), abs=1e-7)
  assert splits.banding_direction(0.0) == (0.0, 1.0)
  # Both branches meet at pi/4; pi/2 gives stripes of constant longitude.
  assert splits.banding_direction(QUARTER) == pytest.approx((1.0, 1.0))
  assert splits.banding_direction(math.pi / 2) == pytest.approx((1.0, 0.0))


def test_angle_0p9_hand_computed():
  # dx = 1, dy = (pi/2 - 0.9) / (pi/4) = 0.6707963 / 0.7853982 = 0.8540844.
  # p = x + 0.8540844 y: A 0, B 1.8540844, C 0.25 + 0.6405633 = 0.8905633,
  # D 0.75 + 0.2135211 = 0.9635211, E 0.5 + 0.0854084 = 0.5854084. min 0 (A), max 1.8540844 (B).
  # 60 p / 1.8540844: A 0, B 60 -> 59 (last stripe), C 28.82, D 31.18, E 18.94.
  dy = (math.pi / 2 - 0.9) / QUARTER
  assert 60 * (0.25 + 0.75 * dy) / (1 + dy) == pytest.approx(28.8195, abs=1e-4)
  np.testing.assert_array_equal(splits.stripe_index(LON, LAT, 0.9), [0, 59, 28, 31, 18])
  # 0 % 5 = 0 train, 59 % 5 = 4 validation, 28 % 5 = 3 test, 31 % 5 = 1 train, 18 % 5 = 3 test.
  assert splits.banding_split(LON, LAT, 0.9).tolist() == [
      'train', 'validation', 'test', 'train', 'test']


def test_angle_1p5_hand_computed():
  # dx = 1, dy = (pi/2 - 1.5) / (pi/4) = 0.0707963 / 0.7853982 = 0.0901407.
  # p = x + 0.0901407 y: A 0, B 1.0901407, C 0.25 + 0.0676055 = 0.3176055,
  # D 0.75 + 0.0225352 = 0.7725352, E 0.5 + 0.0090141 = 0.5090141.
  # 60 p / 1.0901407: C 17.48, D 42.52, E 28.02.
  dy = (math.pi / 2 - 1.5) / QUARTER
  assert 60 * (0.5 + 0.1 * dy) / (1 + dy) == pytest.approx(28.0155, abs=1e-4)
  np.testing.assert_array_equal(splits.stripe_index(LON, LAT, 1.5), [0, 59, 17, 42, 28])
  # 17 % 5 = 2 train, 42 % 5 = 2 train, 28 % 5 = 3 test.
  assert splits.banding_split(LON, LAT, 1.5).tolist() == [
      'train', 'validation', 'train', 'train', 'test']


def test_angle_0p2_hand_computed():
  # dx = 0.2 / (pi/4) = 0.2546479, dy = 1.
  # p = 0.2546479 x + y: A 0, B 1.2546479, C 0.0636620 + 0.75 = 0.8136620,
  # D 0.1909859 + 0.25 = 0.4409859, E 0.1273240 + 0.1 = 0.2273240.
  # 60 p / 1.2546479: C 38.91, D 21.09, E 10.87.
  dx = 0.2 / QUARTER
  assert 60 * (0.75 * dx + 0.25) / (1 + dx) == pytest.approx(21.0889, abs=1e-4)
  np.testing.assert_array_equal(splits.stripe_index(LON, LAT, 0.2), [0, 59, 38, 21, 10])
  # 38 % 5 = 3 test, 21 % 5 = 1 train, 10 % 5 = 0 train.
  assert splits.banding_split(LON, LAT, 0.2).tolist() == [
      'train', 'validation', 'test', 'train', 'train']


def test_negative_angle_hand_computed():
  # a = -0.2: x -> 1 - x, so A (1, 0), B (0, 1), C (0.75, 0.75), D (0.25, 0.25), E (0.5, 0.1).
  # dx = 0.2546479, dy = 1. p: A 0.2546479, B 1, C 0.1909859 + 0.75 = 0.9409859,
  # D 0.0636620 + 0.25 = 0.3136620, E 0.1273240 + 0.1 = 0.2273240.
  # The minimum is E (0.2273240), not 0: p is normalised over the observed range
  # [0.2273240, 1] (width 0.7726760), not over [0, dx + dy].
  # 60 (p - 0.2273240) / 0.7726760: A 2.12, B 60 -> 59, C 55.42, D 6.70, E 0.
  dx = 0.2 / QUARTER
  low = 0.5 * dx + 0.1
  assert 60 * (dx - low) / (1 - low) == pytest.approx(2.1218, abs=1e-4)
  np.testing.assert_array_equal(splits.stripe_index(LON, LAT, -0.2), [2, 59, 55, 6, 0])
  assert splits.banding_split(LON, LAT, -0.2).tolist() == [
      'train', 'validation', 'train', 'train', 'train']


def test_negative_steep_angle_follows_the_text_literally():
  # a = -0.9: x -> 1 - x AND dx = sign(a) = -1, so p = -(1 - x) + 0.8540844 y = x + dy y - 1:
  # the two flips cancel and, after min-max, the stripes equal those of +0.9 (documented).
  np.testing.assert_array_equal(splits.stripe_index(LON, LAT, -0.9), [0, 59, 28, 31, 18])


def _grid(num_lon=240, num_lat=180):
  """A dense regular grid of chip centres over a box of 24 x 12 degrees, flattened."""
  lon, lat = np.meshgrid(np.linspace(-5.0, 19.0, num_lon), np.linspace(40.0, 52.0, num_lat))
  return lon.ravel(), lat.ravel()


@pytest.mark.parametrize('angle', [0.9, 1.5, 0.2, -0.2, -1.0, 0.0])
def test_dense_grid_proportions(angle):
  lon, lat = _grid()
  stripes = splits.stripe_index(lon, lat, angle)
  names = splits.banding_split(lon, lat, angle)
  # All 60 stripes are used: 36 train, 12 test, 12 validation by stripe count.
  assert sorted(np.unique(stripes).tolist()) == list(range(60))
  per_split = {name: np.unique(stripes[names == name]).size for name in schema.SPLITS}
  assert per_split == {'train': 36, 'validation': 12, 'test': 12}
  # No stripe holds chips of two splits.
  for stripe in range(60):
    assert np.unique(names[stripes == stripe]).size == 1
  # By chip count roughly 60:20:20 (stripes of a tilted box hold unequal numbers of chips).
  fractions = {name: float(np.mean(names == name)) for name in schema.SPLITS}
  assert fractions['train'] == pytest.approx(0.6, abs=0.03)
  assert fractions['validation'] == pytest.approx(0.2, abs=0.03)
  assert fractions['test'] == pytest.approx(0.2, abs=0.03)


def test_stripes_follow_the_cyclic_pattern_along_the_direction():
  # At angle 0 the direction is (0, 1): stripes are latitude bands, in order from the south.
  lon, lat = _grid(num_lon=3, num_lat=600)
  stripes = splits.stripe_index(lon, lat, 0.0)
  np.testing.assert_array_equal(stripes, np.minimum(
      np.floor((lat - 40.0) / 12.0 * 60).astype(int), 59))
  assert splits.banding_split([0, 0, 0, 0, 0, 0], [0.5, 1.5, 2.5, 3.5, 4.5, 5.5], 0.0,
                              num_stripes=6).tolist() == [
                                  'train', 'train', 'train', 'test', 'validation', 'train']


def test_chips_on_a_stripe_edge_go_to_the_upper_stripe():
  # 61 rows 0.1 degree apart over 6 degrees: row k is exactly on edge k of 60 stripes, although
  # 40.1, 40.2, ... are not exact in binary; rounding must not drop any row to stripe k - 1.
  lat = np.repeat(40.0 + 0.1 * np.arange(61), 3)
  lon = np.tile([1.0, 2.0, 3.0], 61)
  expected = np.minimum(np.repeat(np.arange(61), 3), 59)
  np.testing.assert_array_equal(splits.stripe_index(lon, lat, 0.0), expected)
  # Same at pi/2, direction (1, 0): stripes of constant longitude, on the transposed grid.
  np.testing.assert_array_equal(splits.stripe_index(lat, lon, math.pi / 2), expected)


def test_projection_normalised_over_observed_range():
  # Chips only in the upper-right triangle of their box (x + y >= 1): none near (0, 0). All 60
  # stripes are still used because p is normalised over the chips, not over [0, dx + dy].
  lon, lat = _grid(num_lon=100, num_lat=100)
  x, y = (lon + 5.0) / 24.0, (lat - 40.0) / 12.0
  keep = x + y >= 1.0
  stripes = splits.stripe_index(lon[keep], lat[keep], QUARTER)
  assert sorted(np.unique(stripes).tolist()) == list(range(60))


def test_deterministic_and_independent_of_chip_order():
  lon, lat = _grid(num_lon=50, num_lat=40)
  first = splits.banding_split(lon, lat, 0.9)
  np.testing.assert_array_equal(first, splits.banding_split(lon.copy(), lat.copy(), 0.9))
  order = np.random.default_rng(0).permutation(lon.size)
  np.testing.assert_array_equal(splits.banding_split(lon[order], lat[order], 0.9), first[order])
  np.testing.assert_array_equal(splits.stripe_index(lon[order], lat[order], 0.2),
                                splits.stripe_index(lon, lat, 0.2)[order])


def test_negative_angle_mirrors_x():
  # For -pi/4 < a < 0, a is +|a| applied to the area mirrored east-west.
  lon, lat = _grid(num_lon=60, num_lat=50)
  for angle in (0.2, 0.5):
    np.testing.assert_array_equal(splits.stripe_index(lon, lat, -angle),
                                  splits.stripe_index(-lon, lat, angle))
    # And it is a real change, not the same stripes.
    assert not np.array_equal(splits.stripe_index(lon, lat, -angle),
                              splits.stripe_index(lon, lat, angle))


def test_degenerate_areas():
  # One chip: stripe 0, train.
  assert splits.stripe_index([3.0], [45.0], 0.9).tolist() == [0]
  assert splits.banding_split([3.0], [45.0], 0.9).tolist() == ['train']
  # Repeated identical chips: all stripe 0, no division by zero warnings.
  with np.errstate(all='raise'):
    assert splits.stripe_index([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], 1.5).tolist() == [0, 0, 0]
    # One column of chips (all x equal): the stripes come from y alone; at 0.9, p = dy y.
    stripes = splits.stripe_index([7.0] * 5, [0.0, 1.0, 2.0, 3.0, 4.0], 0.9)
  # y = 0, 0.25, 0.5, 0.75, 1 -> 60 y = 0, 15, 30, 45, 60 -> 59.
  assert stripes.tolist() == [0, 15, 30, 45, 59]
  # One row (all y equal) at angle 0: direction (0, 1), every p equal, so all stripe 0.
  assert splits.stripe_index([0.0, 1.0, 2.0], [5.0, 5.0, 5.0], 0.0).tolist() == [0, 0, 0]


@pytest.mark.parametrize('lon, lat, angle, num_stripes, message', [
    ([0.0, 1.0], [0.0], 0.9, 60, '2 lon and 1 lat'),
    ([], [], 0.9, 60, 'no chips'),
    ([0.0, np.nan], [0.0, 1.0], 0.9, 60, 'lon has 1 non-finite value'),
    ([0.0, 1.0, 2.0], [0.0, 1.0, np.inf], 0.9, 60, 'lat has 1 non-finite value(s) (NaN or inf), '
                                                   'first at chip 2'),
    ([[0.0, 1.0]], [[0.0, 1.0]], 0.9, 60, 'lon must be 1-D'),
    (['a', 'b'], [0.0, 1.0], 0.9, 60, 'lon must be numeric'),
    ([0.0, 1.0], [0.0, 1.0], 2.0, 60, 'angle must be a finite number in [-pi/2, pi/2]'),
    ([0.0, 1.0], [0.0, 1.0], float('nan'), 60, 'angle must be a finite'),
    ([0.0, 1.0], [0.0, 1.0], 0.9, 0, 'num_stripes must be >= 1'),
    ([0.0, 1.0], [0.0, 1.0], 0.9, 2.5, 'num_stripes must be an integer'),
])
def test_clear_errors(lon, lat, angle, num_stripes, message):
  with pytest.raises(ValueError) as error:
    splits.banding_split(lon, lat, angle, num_stripes)
  assert message in str(error.value)


def _write(path, text):
  path.write_text(text, encoding='utf-8')
  return str(path)


def test_read_split_csv(tmp_path):
  path = _write(tmp_path / 'europe_splits.csv',
                'identifier,split,split_communes\n'
                '0a1b2c3d4e5f6,train,test\n'
                '1a1b2c3d4e5f6, val ,train\n'
                '2a1b2c3d4e5f6,test,train\n')
  assert splits.read_split_csv(path) == {'0a1b2c3d4e5f6': 'train',
                                         '1a1b2c3d4e5f6': 'validation',
                                         '2a1b2c3d4e5f6': 'test'}


def test_read_split_csv_with_bom_and_column_order(tmp_path):
  path = tmp_path / 'bom.csv'
  path.write_bytes('\ufeffsplit,identifier\nval,abc\n'.encode('utf-8'))
  assert splits.read_split_csv(str(path)) == {'abc': 'validation'}


@pytest.mark.parametrize('text, message', [
    ('identifier,split\na,train\nb,holdout\n', "line 3: unknown split 'holdout'"),
    ('identifier,split\na,train\nb,\n', "line 3: unknown split ''"),
    ('identifier,split\na,train\na,test\n', "line 3: identifier 'a' already listed on line 2"),
    ('identifier,split\n,train\n', 'line 2: empty identifier'),
    ('identifier,fold\na,train\n', "line 1: missing column(s) ['split']"),
    ('', 'empty file'),
])
def test_read_split_csv_rejects_bad_rows(tmp_path, text, message):
  path = _write(tmp_path / 'bad.csv', text)
  with pytest.raises(ValueError) as error:
    splits.read_split_csv(path)
  assert path in str(error.value)
  assert message in str(error.value)


def test_split_map_png(tmp_path):
  lon, lat = _grid(num_lon=40, num_lat=30)
  names = splits.banding_split(lon, lat, 0.9)
  path = str(tmp_path / 'europe_splits.png')
  splits.split_map_png(path, lon, lat, names, title='europe, angle 0.9')
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.listdir(tmp_path) == ['europe_splits.png']
  # Overwriting replaces the file in place, again without leftovers.
  splits.split_map_png(path, lon[:10], lat[:10], names[:10])
  assert os.listdir(tmp_path) == ['europe_splits.png']


def test_split_map_png_errors_leave_nothing(tmp_path):
  path = str(tmp_path / 'map.png')
  with pytest.raises(ValueError, match=r"unknown split name\(s\) \['val'\]"):
    splits.split_map_png(path, [0.0, 1.0], [0.0, 1.0], ['train', 'val'])
  with pytest.raises(ValueError, match='splits has shape'):
    splits.split_map_png(path, [0.0, 1.0], [0.0, 1.0], ['train'])
  with pytest.raises(ValueError, match='no chips'):
    splits.split_map_png(path, [], [], [])
  assert os.listdir(tmp_path) == []
