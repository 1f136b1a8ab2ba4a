"""Tests for data_pipeline.ingest.labels: VCF tile means (hand-computed) and WorldCover on a real tile."""

import math
import os

import numpy as np
import pytest
import rasterio
import rasterio.warp
import rasterio.windows
from affine import Affine

from data_pipeline.ingest import labels
from data_pipeline import schema

WORLDCOVER = ('/work/shared/samples/esa_worldcover/'
              'ESA_WorldCover_10m_2020_v100_N00E006_Map.tif')
needs_worldcover = pytest.mark.skipif(not os.path.exists(WORLDCOVER),
                                      reason='real WorldCover sample not available')

# --- MODIS VCF -------------------------------------------------------------------------------

UTM33 = 'EPSG:32633'
ORIGIN = (500000.0, 5000000.0)  # top-left corner of the synthetic VCF raster
CELL = 250.0
NAN = float('nan')
# Percent_Tree_Cover of the 3 x 3 cells under the tile (rows top to bottom): 200 water,
# 253 fill, NaN missing.
TREE = np.array([[10.0, 200.0, 40.0],
                 [253.0, 60.0, NAN],
                 [80.0, 20.0, 100.0]])
# The tile: x 500100..500600, y 4999450..4999950. Overlaps with the cells:
#   columns: cell 0 (500000..500250) 150 m, cell 1 (..500500) 250 m, cell 2 (..500750) 100 m
#   rows:    cell 0 (5000000..4999750) 200 m, cell 1 (..4999500) 250 m, cell 2 (..4999250) 50 m
TILE = (500100.0, 4999450.0, 500600.0, 4999950.0)
# Overlap areas (m^2) = row overlap x column overlap; they sum to the tile's 500 x 500 m.
WEIGHTS = np.array([[30000.0, 50000.0, 20000.0],
                    [37500.0, 62500.0, 25000.0],
                    [7500.0, 12500.0, 5000.0]])
# Valid: all but the fill (37500) and the NaN (25000) cell: 187500 of 250000 m^2 = 0.75.
# Weighted sum, water as 0: 10*30000 + 0*50000 + 40*20000 + 60*62500 + 80*7500 + 20*12500
#   + 100*5000 = 300000 + 800000 + 3750000 + 600000 + 250000 + 500000 = 6200000.
MEAN_WATER_ZERO = 6200000.0 / 187500.0  # 33.0666...
# Water missing: valid 137500 m^2 (0.55), same sum: 6200000 / 137500 = 45.0909...
MEAN_WATER_MISSING = 6200000.0 / 137500.0


def _vcf_raster(shape=(8, 8), background=50.0):
  """Percent_Tree_Cover, Percent_NonTree_Vegetation, Percent_NonVegetated (3, H, W) float32."""
  tree = np.full(shape, background)
  tree[:3, :3] = TREE
  special = (tree == 200) | (tree == 253) | np.isnan(tree)
  # Other bands: the same flags, and 100 - tree (non-vegetated) or 7 (non-tree vegetation) on land.
  nonveg = np.where(special, tree, 100.0 - tree)
  nontree = np.where(special, tree, 7.0)
  return np.stack([tree, nontree, nonveg]).astype(np.float32)


def _write(path, bands, transform, crs, descriptions=None, nodata=None):
  count, height, width = bands.shape
  with rasterio.open(path, 'w', driver='GTiff', width=width, height=height, count=count,
                     dtype=bands.dtype, crs=crs, transform=transform, nodata=nodata) as dataset:
    dataset.write(bands)
    if descriptions:
      dataset.descriptions = tuple(descriptions)
  return str(path)


@pytest.fixture
def vcf_path(tmp_path):
  return _write(tmp_path / 'vcf.tif', _vcf_raster(), Affine(CELL, 0, ORIGIN[0], 0, -CELL,
                                                             ORIGIN[1]), UTM33,
                descriptions=labels.VCF_BANDS)


def test_overlap_weights_by_hand():
  assert WEIGHTS.sum() == 500.0 * 500.0
  np.testing.assert_array_equal(WEIGHTS, np.outer([200.0, 250.0, 50.0], [150.0, 250.0, 100.0]))
  valid = ~np.isin(TREE, [253.0]) & ~np.isnan(TREE)
  water_zero = np.where(TREE == 200, 0.0, TREE)
  assert (WEIGHTS[valid] * water_zero[valid]).sum() == 6200000.0
  assert MEAN_WATER_ZERO == pytest.approx(33.0666667, abs=1e-6)
  assert MEAN_WATER_MISSING == pytest.approx(45.0909091, abs=1e-6)


def test_vcf_tile_mean_hand_computed(vcf_path):
  mean, fraction = labels.vcf_tile_mean(vcf_path, TILE, UTM33, return_valid_fraction=True)
  assert mean == pytest.approx(MEAN_WATER_ZERO, rel=1e-12)
  assert fraction == pytest.approx(0.75, rel=1e-12)
  # Water counted as missing instead of 0 % tree cover.
  mean, fraction = labels.vcf_tile_mean(vcf_path, TILE, UTM33, water_value=None,
                                        return_valid_fraction=True)
  assert mean == pytest.approx(MEAN_WATER_MISSING, rel=1e-12)
  assert fraction == pytest.approx(0.55, rel=1e-12)


def test_vcf_min_valid_fraction(vcf_path):
  assert labels.vcf_tile_mean(vcf_path, TILE, UTM33, min_valid_fraction=0.75) == pytest.approx(
      MEAN_WATER_ZERO)
  assert math.isnan(labels.vcf_tile_mean(vcf_path, TILE, UTM33, min_valid_fraction=0.8))
  # Water missing: 0.55 valid passes the default 0.5, not 0.6.
  assert labels.vcf_tile_mean(vcf_path, TILE, UTM33, water_value=None) == pytest.approx(
      MEAN_WATER_MISSING)
  assert math.isnan(labels.vcf_tile_mean(vcf_path, TILE, UTM33, water_value=None,
                                         min_valid_fraction=0.6))
  assert math.isnan(schema.VCF_MISSING)


def test_vcf_other_bands(vcf_path):
  # Non-vegetated: land 100 - tree, water 100 (set via water_value): 100 - 33.07 = 66.93.
  value = labels.vcf_tile_mean(vcf_path, TILE, UTM33, band='Percent_NonVegetated',
                               water_value=100.0)
  assert value == pytest.approx(100.0 - MEAN_WATER_ZERO, rel=1e-12)
  # Non-tree vegetation: 7 on land, 0 on water: 7 * 137500 / 187500.
  value = labels.vcf_tile_mean(vcf_path, TILE, UTM33, band='Percent_NonTree_Vegetation')
  assert value == pytest.approx(7.0 * 137500.0 / 187500.0, rel=1e-12)
  # By 1-based index.
  assert labels.vcf_tile_mean(vcf_path, TILE, UTM33, band=3, water_value=100.0) == pytest.approx(
      100.0 - MEAN_WATER_ZERO, rel=1e-12)


def test_vcf_array_source_and_subgrid(vcf_path):
  transform = Affine(CELL, 0, ORIGIN[0], 0, -CELL, ORIGIN[1])
  tree = _vcf_raster()[0]
  assert labels.vcf_tile_mean((tree, transform), TILE, UTM33) == pytest.approx(
      MEAN_WATER_ZERO, rel=1e-12)
  assert labels.vcf_tile_mean((tree, transform, UTM33), TILE, UTM33) == pytest.approx(
      MEAN_WATER_ZERO, rel=1e-12)
  # 200 x 200 points 2.5 m apart: the cell edges (150 m and 400 m into the tile) fall between
  # points, so the point counts are exactly proportional to the overlap areas.
  value = labels.vcf_tile_mean(vcf_path, TILE, UTM33, method='subgrid', subgrid=200)
  assert value == pytest.approx(MEAN_WATER_ZERO, rel=1e-12)


def test_vcf_tile_in_another_crs(tmp_path):
  # 40 x 40 cells around UTM 33's central meridian (x = 500000, 15 E): 20 % west of it, 80 % east.
  tree = np.where(np.arange(40)[None, :] < 20, 20.0, 80.0) * np.ones((40, 1))
  transform = Affine(CELL, 0, 495000.0, 0, -CELL, 5005000.0)
  path = _write(tmp_path / 'halves.tif', tree[None].astype(np.float32), transform, UTM33)
  lon, lat = rasterio.warp.transform(UTM33, 'EPSG:4326', [500000.0], [5000000.0])
  lon, lat = lon[0], lat[0]
  assert lon == pytest.approx(15.0)
  # A lon/lat tile straddling the meridian symmetrically: transverse Mercator is symmetric about
  # it, so half the tile's area is on each side and the mean is 50.
  tile = (lon - 0.01, lat - 0.005, lon + 0.01, lat + 0.005)
  assert labels.vcf_tile_mean(path, tile, 'EPSG:4326') == pytest.approx(50.0, abs=1e-6)
  # Bounding-box approximation ('exact' across CRSs) is close but not required to be exact.
  assert labels.vcf_tile_mean(path, tile, 'EPSG:4326', method='exact') == pytest.approx(
      50.0, abs=0.5)
  west = (lon - 0.04, lat - 0.005, lon - 0.02, lat + 0.005)  # all in the 20 % half
  assert labels.vcf_tile_mean(path, west, 'EPSG:4326') == pytest.approx(20.0, abs=1e-9)


def test_vcf_tile_partly_or_wholly_outside(vcf_path):
  # 500 m of the 1000 m wide tile lie west of the raster: valid fraction halves.
  tile = (ORIGIN[0] - 500.0, 4999500.0, ORIGIN[0] + 500.0, 5000000.0)
  mean, fraction = labels.vcf_tile_mean(vcf_path, tile, UTM33, min_valid_fraction=0.0,
                                        return_valid_fraction=True)
  # Inside part: cells (0,0)=10 and (0,1)=200->0 over 250 x 250 m each, row 1 (253, 60) too;
  # valid: 10, 0 (row 0) and 60 (row 1): (10 + 0 + 60) / 3.
  assert fraction == pytest.approx(3 * 62500.0 / 1000.0 / 500.0)
  assert mean == pytest.approx(70.0 / 3.0)
  far = (0.0, 0.0, 1000.0, 1000.0)
  mean, fraction = labels.vcf_tile_mean(vcf_path, far, UTM33, return_valid_fraction=True)
  assert math.isnan(mean) and fraction == 0.0


def test_vcf_band_lookup(tmp_path):
  transform = Affine(CELL, 0, ORIGIN[0], 0, -CELL, ORIGIN[1])
  tree = _vcf_raster()[0]
  years = np.stack([tree * 0 + 5.0, tree]).astype(np.float32)
  path = _write(tmp_path / 'years.tif', years, transform, UTM33,
                descriptions=['Percent_Tree_Cover_2019', 'Percent_Tree_Cover_2020'])
  with pytest.raises(ValueError, match='several bands'):
    labels.vcf_tile_mean(path, TILE, UTM33)
  assert labels.vcf_tile_mean(path, TILE, UTM33, year=2020) == pytest.approx(MEAN_WATER_ZERO)
  assert labels.vcf_tile_mean(path, TILE, UTM33, year=2019) == pytest.approx(5.0)
  with pytest.raises(ValueError, match=r'years\.tif.*Percent_NonVegetated'):
    labels.vcf_tile_mean(path, TILE, UTM33, band='Percent_NonVegetated')
  # No descriptions: names map to MOD44B's band order.
  plain = _write(tmp_path / 'plain.tif', _vcf_raster(), transform, UTM33)
  assert labels.vcf_tile_mean(plain, TILE, UTM33) == pytest.approx(MEAN_WATER_ZERO)
  # A real-like uint8 file declaring 253 as nodata; 255 is not a VCF value either.
  raw = np.where(np.isnan(tree), 255, tree).astype(np.uint8)
  path = _write(tmp_path / 'uint8.tif', raw[None], transform, UTM33, nodata=253)
  assert labels.vcf_tile_mean(path, TILE, UTM33) == pytest.approx(MEAN_WATER_ZERO)


def test_vcf_argument_errors(vcf_path, tmp_path):
  with pytest.raises(ValueError, match='tile_bounds'):
    labels.vcf_tile_mean(vcf_path, (1, 1, 0, 2), UTM33)
  with pytest.raises(ValueError, match='method'):
    labels.vcf_tile_mean(vcf_path, TILE, UTM33, method='mean')
  with pytest.raises(FileNotFoundError, match='missing.tif'):
    labels.vcf_tile_mean(str(tmp_path / 'missing.tif'), TILE, UTM33)


# --- ESA WorldCover --------------------------------------------------------------------------

# ESA's legend, written out: code -> class index.
LEGEND = {10: 0, 20: 1, 30: 2, 40: 3, 50: 4, 60: 5, 70: 6, 80: 7, 90: 8, 95: 9, 100: 10}


def _utm_tile(lon, lat, size=64):
  """A size x size, 10 m EPSG:32632 grid centred near (lon, lat), origin on the 10 m lattice."""
  (x,), (y,) = rasterio.warp.transform('EPSG:4326', 'EPSG:32632', [lon], [lat])
  left = math.floor(x / 10.0) * 10.0 - 10.0 * (size // 2)
  top = math.floor(y / 10.0) * 10.0 + 10.0 * (size // 2)
  return Affine(10.0, 0.0, left, 0.0, -10.0, top)


def _nearest_lookup(transform, size):
  """Independent labels: pixel centres to lon/lat, then the source pixel they fall in."""
  cols, rows = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
  xs = transform.c + transform.a * cols
  ys = transform.f + transform.e * rows
  lons, lats = rasterio.warp.transform('EPSG:32632', 'EPSG:4326', xs.ravel(), ys.ravel())
  lons, lats = np.asarray(lons), np.asarray(lats)
  with rasterio.open(WORLDCOVER) as source:
    t = source.transform
    src_col = np.floor((lons - t.c) / t.a).astype(int)
    src_row = np.floor((lats - t.f) / t.e).astype(int)
    col0, row0 = src_col.min(), src_row.min()
    window = rasterio.windows.Window(col0, row0, src_col.max() - col0 + 1,
                                     src_row.max() - row0 + 1)
    codes = source.read(1, window=window)  # a few hundred pixels a side, not 36000
  picked = codes[src_row - row0, src_col - col0].reshape(size, size)
  lookup = np.full(256, 255, np.uint8)
  for code, index in LEGEND.items():
    lookup[code] = index
  return lookup[picked]


def test_legend_matches_schema():
  assert tuple(LEGEND) == schema.WORLDCOVER_CODES
  assert tuple(LEGEND.values()) == tuple(range(schema.NUM_CLASSES))


@needs_worldcover
def test_worldcover_utm_tile_equals_nearest_lookup():
  # Sao Tome town, north-east of the island: built-up, trees, grassland and sea in one tile.
  transform = _utm_tile(6.73, 0.33)
  tile = labels.worldcover_tile(WORLDCOVER, transform, 'EPSG:32632', (64, 64))
  assert tile.shape == (64, 64) and tile.dtype == np.uint8
  assert set(np.unique(tile)) <= set(range(11)) | {255}
  assert len(np.unique(tile[tile != 255])) >= 3
  expected = _nearest_lookup(transform, 64)
  # Compare every pixel (a 64 x 64 sample of the 10 m grid) and a regular sub-sample too.
  np.testing.assert_array_equal(tile, expected)
  np.testing.assert_array_equal(tile[::7, ::5], expected[::7, ::5])


@needs_worldcover
def test_worldcover_native_grid_window_is_identity():
  with rasterio.open(WORLDCOVER) as source:
    window = rasterio.windows.from_bounds(6.60, 0.20, 6.6048, 0.2040, source.transform)
    window = window.round_offsets().round_lengths()
    codes = source.read(1, window=window)
    transform = source.window_transform(window)
  tile = labels.worldcover_tile(WORLDCOVER, transform, 'EPSG:4326', codes.shape)
  np.testing.assert_array_equal(tile, schema.worldcover_codes_to_indices(codes))
  assert (tile != 255).any()


@needs_worldcover
def test_worldcover_outside_and_no_data_give_ignore():
  # lon 6.0 is the product tile's west edge: half this tile lies outside the file, the other half
  # is open ocean, which v100 marks 0 (no data).
  tile = labels.worldcover_tile(WORLDCOVER, _utm_tile(6.0, 0.3), 'EPSG:32632', (64, 64))
  assert (tile == schema.IGNORE_INDEX).all()
  outside = labels.worldcover_tile(WORLDCOVER, _utm_tile(5.9, 0.3), 'EPSG:32632', (32, 32))
  assert (outside == schema.IGNORE_INDEX).all()


def test_worldcover_synthetic_codes(tmp_path):
  # Every code once, 0 and an unknown code (33) as no data, on a 4326 grid read back 1:1.
  codes = np.array([[10, 20, 30, 40], [50, 60, 70, 80], [90, 95, 100, 0], [33, 10, 10, 10]],
                   np.uint8)
  transform = Affine(0.001, 0, 6.0, 0, -0.001, 1.0)
  path = _write(tmp_path / 'wc.tif', codes[None], transform, 'EPSG:4326', nodata=0)
  tile = labels.worldcover_tile(path, transform, 'EPSG:4326', (4, 4))
  np.testing.assert_array_equal(tile, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 255],
                                       [255, 0, 0, 0]])
  # A grid shifted by 2 pixels west: the two left columns fall outside the file.
  shifted = labels.worldcover_tile(path, Affine(0.001, 0, 5.998, 0, -0.001, 1.0), 'EPSG:4326',
                                   (4, 4))
  np.testing.assert_array_equal(shifted[:, :2], 255)
  np.testing.assert_array_equal(shifted[:, 2:], tile[:, :2])


# --- CRS checks and unreadable files ---------------------------------------------------------


def test_check_same_crs(tmp_path):
  data = np.zeros((1, 4, 4), np.uint8)
  a = _write(tmp_path / 'label_4326.tif', data, Affine(0.001, 0, 6, 0, -0.001, 1), 'EPSG:4326')
  b = _write(tmp_path / 'image_utm.tif', data, Affine(10, 0, 2e5, 0, -10, 3e4), 'EPSG:32632')
  c = _write(tmp_path / 'other_4326.tif', data, Affine(0.001, 0, 7, 0, -0.001, 1), 'EPSG:4326')
  with pytest.raises(ValueError, match=r'label_4326\.tif.*EPSG:4326.*image_utm\.tif.*EPSG:32632'):
    labels.check_same_crs(a, b)
  assert labels.check_same_crs(a, c).to_epsg() == 4326
  if os.path.exists(WORLDCOVER):
    assert labels.check_same_crs(WORLDCOVER, c).to_epsg() == 4326


def test_unreadable_label_names_the_file(tmp_path):
  path = _write(tmp_path / 'cut.tif', np.ones((1, 64, 64), np.uint8) * 10,
                Affine(0.001, 0, 6, 0, -0.001, 1), 'EPSG:4326')
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(labels.RasterReadError, match=r'cut\.tif'):
    labels.worldcover_tile(path, Affine(0.001, 0, 6, 0, -0.001, 1), 'EPSG:4326', (64, 64))
