"""Tests of the synthetic Sentinel-1 dataset against real-data ranges and speckle theory."""

import time

import numpy as np
import pytest
from scipy import ndimage, special, stats

from data_pipeline import schema
from data_pipeline import synthetic

VV = schema.product_indices('vv')
VH = schema.product_indices('vh')
RATIO = schema.product_indices('vv_minus_vh')
TREE = schema.WORLDCOVER_NAMES.index('tree_cover')
CROP = schema.WORLDCOVER_NAMES.index('cropland')
WATER = schema.WORLDCOVER_NAMES.index('permanent_water')
MANGROVES = schema.WORLDCOVER_NAMES.index('mangroves')
DB = 10.0 / np.log(10.0)  # dB per neper


def _class_fractions(tile):
  return np.bincount(tile.worldcover.ravel(), minlength=256)[:schema.NUM_CLASSES] / (
      tile.worldcover.size)


@pytest.fixture(scope='module')
def small_tiles():
  return list(synthetic.generate_tiles(seed=0, count=200, tile_size=32))


@pytest.fixture(scope='module')
def tiles_96():
  return list(synthetic.generate_tiles(seed=1, count=40, tile_size=96))


def test_same_arguments_give_identical_tiles():
  a = synthetic.generate_tile(7, 3, tile_size=64)
  b = synthetic.generate_tile(7, 3, tile_size=64)
  np.testing.assert_array_equal(a.image, b.image)  # NaNs compare equal here
  np.testing.assert_array_equal(a.worldcover, b.worldcover)
  assert (a.vcf, a.lat, a.lon, a.region, a.tile_id) == (b.vcf, b.lat, b.lon, b.region, b.tile_id)

  other_index = synthetic.generate_tile(7, 4, tile_size=64)
  other_seed = synthetic.generate_tile(8, 3, tile_size=64)
  for other in (other_index, other_seed):
    assert not np.array_equal(a.image, other.image, equal_nan=True)
    assert a.lat != other.lat


def test_region_for_index_is_deterministic_and_covers_all_regions():
  regions = [synthetic.region_for_index(0, i) for i in range(100)]
  assert regions == [synthetic.region_for_index(0, i) for i in range(100)]
  # Uniform over 5 regions: each expects 20 of 100, fewer than 5 has probability < 1e-4.
  counts = {r: regions.count(r) for r in schema.REGIONS}
  assert min(counts.values()) >= 5, counts
  assert synthetic.generate_tile(0, 5, 32).region == regions[5]
  with pytest.raises(ValueError):
    synthetic.generate_tile(0, 0, 32, region='atlantis')


def test_generate_tiles_yields_consecutive_tiles():
  tiles = list(synthetic.generate_tiles(seed=2, count=3, tile_size=32, start=10))
  assert [t.tile_id for t in tiles] == ['syn-2-0000010', 'syn-2-0000011', 'syn-2-0000012']
  np.testing.assert_array_equal(tiles[1].image, synthetic.generate_tile(2, 11, 32).image)


def test_shapes_dtypes_and_coordinates(small_tiles):
  # Generous continental bounding boxes, from a map.
  boxes = {'europe': ((35, 72), (-25, 45)), 'south_america': ((-56, 13), (-82, -34)),
           'conus': ((24, 50), (-125, -66)), 'china': ((18, 54), (73, 135)),
           'africa': ((-35, 38), (-18, 52))}
  for tile in small_tiles:
    assert tile.image.shape == (32, 32, 12) and tile.image.dtype == np.float32
    assert tile.worldcover.shape == (32, 32) and tile.worldcover.dtype == np.uint8
    assert set(np.unique(tile.worldcover)) <= set(range(schema.NUM_CLASSES)) | {255}
    assert isinstance(tile.vcf, float) and isinstance(tile.lat, float)
    (lat_lo, lat_hi), (lon_lo, lon_hi) = boxes[tile.region]
    assert lat_lo <= tile.lat <= lat_hi and lon_lo <= tile.lon <= lon_hi


def test_backscatter_matches_real_sentinel1_ranges(tiles_96):
  image = np.stack([t.image for t in tiles_96])
  vv, vh, ratio = image[..., VV], image[..., VH], image[..., RATIO]
  # Real Sentinel-1: mostly -25..+2 dB VV and -37..-9 dB VH (1st..99th percentile), VV-VH median
  # +5..+7.
  assert -25 < np.nanmedian(vv) < 2
  assert -37 < np.nanmedian(vh) < -9
  assert 4.0 < np.nanmedian(ratio) < 8.0
  vv_lo, vv_hi = np.nanpercentile(vv, [1, 99])
  vh_lo, vh_hi = np.nanpercentile(vh, [1, 99])
  # The central 98 % lies within those ranges, give or take a few dB of speckle, and spreads
  # over most of them (water to towns) rather than collapsing onto one surface.
  assert -30 < vv_lo and vv_hi < 6 and vv_hi - vv_lo > 12, (vv_lo, vv_hi)
  assert -42 < vh_lo and vh_hi < -4 and vh_hi - vh_lo > 12, (vh_lo, vh_hi)


def test_values_within_clip_range_with_bright_reflectors(small_tiles):
  image = np.stack([t.image for t in small_tiles])
  lo, hi = schema.CLIP_RANGE_DB
  assert lo <= np.nanmin(image) and np.nanmax(image) <= hi
  # Corner reflectors in towns reach well above any natural surface (about +3 dB at most).
  assert np.nanmax(image[..., VV]) > 10.0


def test_ratio_channel_is_vv_minus_vh_exactly(tiles_96):
  for tile in tiles_96:
    expected = tile.image[..., VV] - tile.image[..., VH]
    np.testing.assert_array_equal(tile.image[..., RATIO], expected)


def test_water_is_darker_than_forest():
  gaps = []
  for index in range(30):
    tile = synthetic.generate_tile(0, index, 96, region='south_america')
    water, forest = tile.worldcover == WATER, tile.worldcover == TREE
    if water.sum() >= 100 and forest.sum() >= 100:
      vv = tile.image[..., VV]
      gaps.append(np.nanmedian(vv[forest]) - np.nanmedian(vv[water]))
  # Specular water (about -22 dB VV) against volume scattering forest (about -7.5 dB).
  assert len(gaps) >= 3
  assert min(gaps) > 8.0, gaps


def test_crops_change_more_over_the_seasons_than_forest():
  tiles = [synthetic.generate_tile(3, i, 128, region='europe') for i in range(12)]
  image = np.stack([t.image for t in tiles])
  labels = np.stack([t.worldcover for t in tiles])

  def seasonal_range(cls):
    medians = np.nanmedian(image[labels == cls][:, VH], axis=0)
    return medians.max() - medians.min()

  # Temperate crops gain 5-8 dB VH at peak biomass; forest canopies change by about 1 dB.
  assert seasonal_range(TREE) < 2.5
  assert seasonal_range(CROP) > 2.5
  assert seasonal_range(CROP) > seasonal_range(TREE) + 1.5


def test_speckle_matches_gamma_theory():
  looks = synthetic.LOOKS
  rng = np.random.default_rng(0)
  samples = synthetic.speckle(rng, np.full(1_000_000, 2.0, dtype=np.float32), looks) / 2.0
  assert samples.dtype == np.float32
  # Gamma(L, 1/L): mean 1, std 1/sqrt(L).
  assert abs(samples.mean() - 1.0) < 0.003
  assert abs(samples.std() - 1.0 / np.sqrt(looks)) < 0.003
  # In dB: mean 10 log10(e) (digamma(L) - ln L), std 10 log10(e) sqrt(trigamma(L)).
  db = 10.0 * np.log10(samples.astype(np.float64))
  assert abs(db.mean() - DB * (special.digamma(looks) - np.log(looks))) < 0.01
  assert abs(db.std() - DB * np.sqrt(special.polygamma(1, looks))) < 0.01
  ks = stats.kstest(samples[:100_000], stats.gamma(a=looks, scale=1.0 / looks).cdf)
  assert ks.pvalue > 1e-3


def test_tile_speckle_is_independent_per_season_and_polarisation():
  # On water, everything but speckle is the same in every season or constant over the tile, so
  # the season-to-season dB difference is the difference of two independent speckle draws.
  for index in range(40):
    tile = synthetic.generate_tile(0, index, 128, region='south_america')
    water = tile.worldcover == WATER
    if water.sum() >= 3000 and not np.isnan(tile.image[water]).any():
      break
  else:
    pytest.fail('no tile with enough water')
  pixels = tile.image[water]
  vv_diff = pixels[:, VV[0]] - pixels[:, VV[2]]
  vh_diff = pixels[:, VH[0]] - pixels[:, VH[2]]
  expected = np.sqrt(2.0) * DB * np.sqrt(special.polygamma(1, synthetic.LOOKS))  # ~3.1 dB
  assert abs(vv_diff.std() / expected - 1.0) < 0.06
  assert abs(vh_diff.std() / expected - 1.0) < 0.06
  assert abs(np.corrcoef(vv_diff, vh_diff)[0, 1]) < 0.08


def test_nodata_pixels_are_ignored_labels(small_tiles):
  with_border, with_missing_season = 0, 0
  for tile in small_tiles:
    missing = np.isnan(tile.image)
    no_pixel = missing.all(axis=-1)
    np.testing.assert_array_equal(no_pixel, tile.worldcover == schema.IGNORE_INDEX)
    assert not no_pixel.all()
    with_border += no_pixel.any()
    # Any other missing value belongs to a season missing over the whole tile, all 3 products.
    missing_bands = missing[~no_pixel].all(axis=0)
    assert np.array_equal(missing[~no_pixel].any(axis=0), missing_bands)
    seasons = {schema.BAND_NAMES[b].split('_')[-1] for b in np.flatnonzero(missing_bands)}
    for season in seasons:
      assert all(missing_bands[schema.band_index(p, season)] for p in schema.PRODUCTS)
    with_missing_season += len(seasons)
  # About 30 % and 3 % of 200 tiles: binomial 3-sigma bounds.
  assert 0.2 * len(small_tiles) <= with_border <= 0.4 * len(small_tiles)
  assert 1 <= with_missing_season <= 15


def test_vcf_follows_tree_cover(tiles_96):
  vcf = np.array([t.vcf for t in tiles_96])
  tree = np.array([_class_fractions(t)[TREE] / (t.worldcover != 255).mean() for t in tiles_96])
  assert vcf.min() >= 0.0 and vcf.max() <= 100.0
  assert np.corrcoef(vcf, tree)[0, 1] > 0.9
  # A closed forest tile has most of its area under canopy; without forest, only the scattered
  # trees of shrubland, wetland or farmland remain (MODIS puts shrubland near 10-20 %).
  assert (vcf[tree > 0.9] > 65).all() and (tree > 0.9).any()
  assert (vcf[tree < 0.02] < 25).all() and (tree < 0.02).any()


def test_region_mix_differs_between_europe_and_south_america():
  def mean_fractions(region):
    return np.mean([_class_fractions(synthetic.generate_tile(0, i, 64, region=region))
                    for i in range(40)], axis=0)

  europe, south_america = mean_fractions('europe'), mean_fractions('south_america')
  assert south_america[TREE] > europe[TREE] + 0.15  # Amazon and Atlantic forests
  assert europe[CROP] > south_america[CROP] + 0.1
  assert europe[MANGROVES] == 0.0  # too cold for mangroves


def test_labels_are_learnable_from_backscatter(tiles_96):
  # Nearest class centroid on speckle-averaged seasonal VV and VH: far better than chance.
  def features(tile):
    bands = np.nan_to_num(tile.image[..., VV + VH], nan=-20.0)
    return ndimage.uniform_filter(bands, size=(5, 5, 1))

  def pixels(tiles):
    x = np.concatenate([features(t).reshape(-1, 8) for t in tiles])
    y = np.concatenate([t.worldcover.ravel() for t in tiles])
    full = ~np.isnan(np.concatenate([t.image.reshape(-1, 12) for t in tiles])).any(axis=1)
    return x[full], y[full]

  x_train, y_train = pixels(tiles_96[:20])
  x_test, y_test = pixels(tiles_96[20:])
  classes = np.unique(y_train)
  centroids = np.stack([x_train[y_train == c].mean(axis=0) for c in classes])
  predicted = classes[((x_test[:, None] - centroids[None]) ** 2).sum(-1).argmin(axis=1)]
  majority = np.bincount(y_test).max() / len(y_test)
  accuracy = (predicted == y_test).mean()
  # About 0.65 against 0.37: grass, shrub, bare and fallow fields look alike to a centroid.
  assert accuracy > majority + 0.2, (accuracy, majority)


def test_full_size_tile():
  start = time.perf_counter()
  tile = synthetic.generate_tile(0, 0, tile_size=448)
  elapsed = time.perf_counter() - start
  assert tile.image.shape == (448, 448, 12) and tile.worldcover.shape == (448, 448)
  assert len(np.unique(tile.worldcover[tile.worldcover != 255])) >= 2
  assert elapsed < 2.0  # about 0.13 s on one core; generous for loaded CI machines
