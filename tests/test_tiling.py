"""Tests for data_pipeline.ingest.tiling on real Sentinel-1 GeoTIFFs: grids, tiles and reads onto tiles.

Real samples (``/work/shared/samples``): three vertically adjacent BigEarthNet-S1 VV patches
(120 x 120 px, 10 m, EPSG:32633, no nodata) and a GAMMA/pyroSAR 20 m VV scene (EPSG:32631,
nodata -99). Expected grids, valid fractions and pixel values are worked out by hand from the
files' bounds.
"""

import json
import math
import os
import shutil

import numpy as np
import pytest
import rasterio
import rasterio.warp
from affine import Affine

from data_pipeline.ingest import labels
from data_pipeline import schema
from data_pipeline.ingest import tiling

BEN = '/work/shared/samples/bigearthnet_s1_tiny'
BEN_SCENE = 'S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_'
BEN_NAMES = [BEN_SCENE + suffix for suffix in ('39', '40', '41')]
PYROSAR = ('/work/shared/samples/pyrosar_s1_db/'
           'S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif')
needs_ben = pytest.mark.skipif(not os.path.isdir(BEN), reason='BigEarthNet sample not available')
needs_pyrosar = pytest.mark.skipif(not os.path.exists(PYROSAR),
                                   reason='pyroSAR sample not available')

TILE = 64  # small tiles, so the 120 x 360 px strip spans several of them


def _vv(name):
  return os.path.join(BEN, name, f'{name}_VV.tif')


def _read_source(path):
  with rasterio.open(path) as dataset:
    return dataset.read(1), dataset.transform, dataset.bounds, dataset.crs


def _stacked_patches():
  """The three patches top to bottom (by their transforms), with arrays and bounds."""
  patches = []
  for name in BEN_NAMES:
    array, transform, bounds, crs = _read_source(_vv(name))
    patches.append((name, array, transform, bounds, crs))
  return sorted(patches, key=lambda patch: -patch[3].top)


def _read_tiles(specs, names, **kwargs):
  """Per tile: the VV mosaic of the named patches (they do not overlap), shape (1, H, W)."""
  out = []
  for spec in specs:
    mosaic = None
    for name in names:
      image = tiling.read_on_tile(_vv(name), spec, **kwargs)
      mosaic = image if mosaic is None else np.where(np.isnan(mosaic), image, mosaic)
    out.append(mosaic)
  return out


def _assemble(grid, specs, images):
  """The tile images pasted back into one (H, W) array over the whole grid."""
  canvas = np.full((grid.height, grid.width), np.nan, np.float32)
  for spec, image in zip(specs, images):
    canvas[spec.row * TILE:(spec.row + 1) * TILE, spec.col * TILE:(spec.col + 1) * TILE] = image[0]
  return canvas


@pytest.fixture(scope='module')
def strip():
  """Grid and tiles over the union of the three patches."""
  patches = _stacked_patches()
  bounds = (min(p[3].left for p in patches), min(p[3].bottom for p in patches),
            max(p[3].right for p in patches), max(p[3].top for p in patches))
  grid = tiling.grid_for_bounds(bounds, patches[0][4], tile_size=TILE)
  return patches, grid, tiling.tiles(grid, TILE)


# --- UTM zones ---------------------------------------------------------------------------------


@pytest.mark.parametrize('lon, lat, epsg', [
    (13.3, 48.3, 32633),    # Austria, the BigEarthNet patches
    (-58.0, -34.0, 32721),  # Buenos Aires
    (4.5, 43.6, 32631),     # Rhone delta, the pyroSAR scene
    (6.0, 50.0, 32632),     # on a zone boundary: the zone to the east
    (180.0, 10.0, 32660),   # the east edge of zone 60 stays in zone 60
    (-180.0, 10.0, 32601),
    (190.0, 10.0, 32602),   # wrapped to -170
    (13.3, 0.0, 32633),     # the equator counts as north
    (13.3, -0.001, 32733),
])
def test_utm_crs(lon, lat, epsg):
  assert tiling.utm_crs(lon, lat).to_epsg() == epsg


def test_utm_crs_rejects_bad_coordinates():
  with pytest.raises(ValueError, match='latitude'):
    tiling.utm_crs(0.0, 91.0)
  with pytest.raises(ValueError, match='finite'):
    tiling.utm_crs(float('nan'), 0.0)


# --- Grid and tiles ----------------------------------------------------------------------------


@needs_ben
def test_patches_stack_top_to_bottom(strip):
  patches, _, _ = strip
  # The transforms put _39 on top, then _40, then _41, sharing their horizontal edges.
  assert [p[0][-2:] for p in patches] == ['39', '40', '41']
  for upper, lower in zip(patches, patches[1:]):
    assert upper[3].bottom == lower[3].top
    assert (upper[3].left, upper[3].right) == (lower[3].left, lower[3].right)
  assert all(p[2].a == 10 and p[2].e == -10 for p in patches)


@needs_ben
def test_grid_over_the_strip(strip):
  _, grid, _ = strip
  # Union: x 373200..374400 (120 px), y 5349600..5353200 (360 px); already on the 10 m lattice.
  # Rounded up to 64 px tiles: 128 x 384 px, growing right and down from the origin.
  assert grid.crs.to_epsg() == 32633
  assert grid.transform == Affine(10, 0, 373200, 0, -10, 5353200)
  assert (grid.width, grid.height) == (128, 384)
  assert grid.bounds == (373200, 5353200 - 3840, 373200 + 1280, 5353200)


def test_grid_from_lonlat_bounds_snaps_and_covers():
  utm = (373200.0, 5349600.0, 374400.0, 5353200.0)
  lonlat = rasterio.warp.transform_bounds('EPSG:32633', 'EPSG:4326', *utm)
  grid = tiling.grid_for_bounds(lonlat, 'EPSG:4326', tile_size=TILE)
  assert grid.crs.to_epsg() == 32633  # picked from the centre, ~13.3 E
  x0, y0 = grid.transform.c, grid.transform.f
  assert x0 % 10 == 0 and y0 % 10 == 0
  # The lon/lat box reprojected is a bit larger than the UTM box it came from: still covered.
  assert x0 <= utm[0] and y0 >= utm[3]
  assert grid.bounds.right >= utm[2] and grid.bounds.bottom <= utm[1]
  assert grid.width % TILE == 0 and grid.height % TILE == 0


def test_grid_snaps_origin_outwards():
  grid = tiling.grid_for_bounds((500003.0, 4999001.0, 500997.0, 4999996.0), 'EPSG:32631',
                                tile_size=8)
  # left 500003 -> 500000, top 4999996 -> 5000000; 100 x 100 px -> 104 x 104 (13 tiles of 8).
  assert grid.transform == Affine(10, 0, 500000, 0, -10, 5000000)
  assert (grid.width, grid.height) == (104, 104)
  # A hair past a lattice line (reprojection noise) does not add a pixel.
  grid = tiling.grid_for_bounds((500000.0000001, 4999000.0, 501000.0000001, 5000000.0),
                                'EPSG:32631', tile_size=100)
  assert grid.transform.c == 500000 and grid.width == 100


def test_grid_rejects_geographic_crs_and_bad_bounds():
  with pytest.raises(ValueError, match='projected with metre units'):
    tiling.grid_for_bounds((13.0, 48.0, 13.1, 48.1), 'EPSG:4326', crs='EPSG:4326')
  with pytest.raises(ValueError, match='antimeridian'):
    tiling.grid_for_bounds((179.0, 0.0, -179.0, 1.0), 'EPSG:4326')
  with pytest.raises(ValueError, match='north-up'):
    tiling.TileGrid('EPSG:32633', Affine(10, 0, 0, 0, 10, 0), 8, 8)
  grid = tiling.TileGrid('EPSG:32633', Affine(10, 0, 0, 0, -10, 0), 100, 64)
  with pytest.raises(ValueError, match='whole number'):
    tiling.tiles(grid, TILE)


@needs_ben
def test_tiles_by_hand(strip):
  _, grid, specs = strip
  assert len(specs) == 12
  assert [(s.row, s.col) for s in specs] == [(r, c) for r in range(6) for c in range(2)]
  spec = specs[3]  # row 1, col 1: 640 m right of and 640 m below the origin
  assert (spec.row, spec.col) == (1, 1)
  assert spec.transform == Affine(10, 0, 373840, 0, -10, 5352560)
  assert tuple(spec.bounds) == (373840, 5351920, 374480, 5352560)
  assert spec.shape == (TILE, TILE)
  assert spec.crs == grid.crs
  assert spec.tile_id == '32633_373840_5352560'
  assert len({s.tile_id for s in specs}) == 12
  # README: ~48.29-48.32 N, 13.29-13.31 E.
  for s in specs:
    assert 48.27 < s.lat < 48.33 and 13.28 < s.lon < 13.32
  assert specs[0].lat > specs[-1].lat and specs[1].lon > specs[0].lon
  record = json.loads(json.dumps(spec.with_sources([_vv(BEN_NAMES[1])]).metadata()))
  assert record['crs'] == 'EPSG:32633' and record['transform'][2] == 373840
  assert record['sources'] == [_vv(BEN_NAMES[1])]
  with pytest.raises(ValueError, match='unknown region'):
    tiling.tiles(grid, TILE, region='atlantis')
  assert tiling.tiles(grid, TILE, region='europe')[0].region == 'europe'


# --- Reading onto tiles: BigEarthNet -----------------------------------------------------------


@needs_ben
@pytest.mark.parametrize('resampling', ['nearest', 'bilinear'])
def test_aligned_read_returns_source_pixels(strip, resampling):
  patches, grid, specs = strip
  images = _read_tiles(specs, BEN_NAMES, resampling=resampling)
  assert all(image.shape == (1, TILE, TILE) and image.dtype == np.float32 for image in images)
  # Expected: the three 120 x 120 patches stacked at grid rows 0, 120, 240, columns 0..119;
  # NaN in the 8 columns and 24 rows the whole tiles add beyond the data.
  expected = np.full((grid.height, grid.width), np.nan, np.float32)
  for k, patch in enumerate(patches):
    expected[120 * k:120 * (k + 1), :120] = patch[1]
  np.testing.assert_array_equal(_assemble(grid, specs, images), expected)


@needs_ben
def test_values_are_plausible_db(strip):
  _, grid, specs = strip
  values = _assemble(grid, specs, _read_tiles(specs, BEN_NAMES))
  values = values[np.isfinite(values)]
  assert values.size == 360 * 120
  low, high = np.percentile(values, [1, 99])
  assert -30 < low < high < 5
  assert schema.CLIP_RANGE_DB[0] < values.min() and values.max() < schema.CLIP_RANGE_DB[1]
  assert -15 < np.median(values) < -8


@needs_ben
def test_valid_fractions_and_filter_with_a_gap(strip):
  _, _, specs = strip
  # Leave out the middle patch: grid rows 120..239 become a gap.
  images = _read_tiles(specs, [BEN_NAMES[0], BEN_NAMES[2]])
  # Valid rows per tile row (64 px each): rows 0..119 and 240..359 hold data, so
  # 64, 56 (64..119), 0, 16 (240..255), 64, 40 (320..359). Valid columns: 64, then 56 (64..119).
  rows = [64, 56, 0, 16, 64, 40]
  cols = [64, 56]
  for spec, image in zip(specs, images):
    expected = rows[spec.row] * cols[spec.col] / TILE**2
    assert tiling.valid_fraction(image) == pytest.approx(expected, abs=1e-12), spec.tile_id
  kept, counts = tiling.filter_tiles(zip(specs, images), min_valid_fraction=0.5)
  # Kept: tile rows 0, 1, 4, 5 (fractions >= 0.546875); empty: row 2; too little: row 3.
  assert counts == {'kept': 8, 'empty': 2, 'below_min_valid_fraction': 2}
  assert [s.row for s, _ in kept] == [0, 0, 1, 1, 4, 4, 5, 5]
  _, counts = tiling.filter_tiles(zip(specs, images), min_valid_fraction=0.9)
  assert counts == {'kept': 2, 'empty': 2, 'below_min_valid_fraction': 8}  # only the 1.0s


@needs_ben
def test_read_into_another_zone_picks_source_values(strip):
  patches, _, _ = strip
  source = patches[1][1]
  grid = tiling.grid_for_bounds(patches[1][3], 'EPSG:32633', tile_size=128, crs='EPSG:32632')
  spec = tiling.tiles(grid, 128)[0]
  image = tiling.read_on_tile(_vv(patches[1][0]), spec, resampling='nearest')[0]
  finite = image[np.isfinite(image)]
  # The patch seen from the neighbouring zone is rotated by ~2 degrees: about 120 x 120 of the
  # 128 x 128 px hold data, and nearest only ever copies source pixels.
  assert 0.8 < finite.size / image.size < 0.9
  assert np.isin(finite, source).all()


@needs_ben
def test_tile_outside_the_source_is_all_nan(strip):
  patches, _, _ = strip
  far = tiling.tiles(tiling.grid_for_bounds((500000, 5000000, 500640, 5000640), 'EPSG:32633',
                                            tile_size=TILE), TILE)[0]
  for linear in (False, True):
    image = tiling.read_on_tile(_vv(patches[0][0]), far, in_linear_power=linear)
    assert image.shape == (1, TILE, TILE) and np.isnan(image).all()
  _, counts = tiling.filter_tiles([(far, image)], 0.0)
  assert counts['empty'] == 1


@needs_ben
def test_linear_power_on_an_aligned_grid_returns_source_pixels(strip):
  patches, grid, specs = strip
  images = _read_tiles(specs, BEN_NAMES, in_linear_power=True)
  expected = np.full((grid.height, grid.width), np.nan, np.float32)
  for k, patch in enumerate(patches):
    expected[120 * k:120 * (k + 1), :120] = patch[1]
  # dB -> power -> dB in float64 round-trips to float32 rounding.
  np.testing.assert_allclose(_assemble(grid, specs, images), expected, atol=1e-5, rtol=0)


# --- Reading onto tiles: pyroSAR 20 m scene ----------------------------------------------------


def _pyrosar_grid(tile_size):
  with rasterio.open(PYROSAR) as dataset:
    bounds, crs = dataset.bounds, dataset.crs
  return bounds, tiling.grid_for_bounds(bounds, crs, tile_size=tile_size)


def _copy_with_nodata_block(tmp_path, tag_nodata):
  """The pyroSAR scene with source rows 50..99, cols 100..149 set to -99."""
  with rasterio.open(PYROSAR) as dataset:
    profile, values = dataset.profile, dataset.read()
  values[:, 50:100, 100:150] = -99.0
  if not tag_nodata:
    profile['nodata'] = None
  path = str(tmp_path / f'holed_{tag_nodata}.tif')
  with rasterio.open(path, 'w', **profile) as dataset:
    dataset.write(values)
  return path


@needs_pyrosar
def test_pyrosar_onto_10m_grid():
  bounds, grid = _pyrosar_grid(256)
  # Centre ~4.5 E -> zone 31, the file's own. Origin 620048.24, 4830114.70 snapped outwards to
  # 620040, 4830120; 5360 x 4340 m of data -> 537 x 435 px -> 768 x 512 px of 256 px tiles.
  assert grid.crs.to_epsg() == 32631
  assert grid.transform == Affine(10, 0, 620040, 0, -10, 4830120)
  assert (grid.width, grid.height) == (768, 512)
  specs = tiling.tiles(grid, 256)
  assert len(specs) == 6
  with rasterio.open(PYROSAR) as dataset:
    source = dataset.read(1)
  assert (source == -99).sum() == 0  # the file declares -99 but has no such pixel
  images = [tiling.read_on_tile(PYROSAR, spec) for spec in specs]
  canvas = np.full((grid.height, grid.width), np.nan, np.float32)
  for spec, image in zip(specs, images):
    canvas[spec.row * 256:(spec.row + 1) * 256, spec.col * 256:(spec.col + 1) * 256] = image[0]
  # Valid pixels: those whose centre lies inside the source bounds.
  x = 620040 + 10 * (np.arange(grid.width) + 0.5)
  y = 4830120 - 10 * (np.arange(grid.height) + 0.5)
  inside = (((y > bounds.bottom) & (y < bounds.top))[:, None]
            & ((x > bounds.left) & (x < bounds.right))[None, :])
  assert inside.sum() == 434 * 536  # the first row and column fall just outside
  np.testing.assert_array_equal(np.isfinite(canvas), inside)
  # Bilinear weights are a convex combination: values stay within the source's range.
  values = canvas[inside]
  assert source.min() <= values.min() and values.max() <= source.max()


@needs_pyrosar
def test_pyrosar_nodata_becomes_nan(tmp_path):
  _, grid = _pyrosar_grid(256)
  spec = tiling.tiles(grid, 256)[0]  # x 620040..622600, y 4827560..4830120
  tagged = _copy_with_nodata_block(tmp_path, tag_nodata=True)
  untagged = _copy_with_nodata_block(tmp_path, tag_nodata=False)
  image = tiling.read_on_tile(tagged, spec)[0]
  # The -99 block in map coordinates: x 622048.24..623048.24 (source cols 100..149), of which the
  # tile holds 622048.24..622600; y 4829114.70..4828114.70 (rows 50..99). Tile pixels centred at
  # least one source pixel (20 m) inside it have only -99 neighbours: NaN.
  x = 620040 + 10 * (np.arange(256) + 0.5)
  y = 4830120 - 10 * (np.arange(256) + 0.5)
  deep = (((y < 4829114.70107 - 20) & (y > 4828114.70107 + 20))[:, None]
          & (x > 622048.241204 + 20)[None, :])
  assert deep.sum() > 1000
  assert np.isnan(image[deep]).all()
  assert np.nanmin(image) > -50  # no -99 and no blend of -99 with real values
  # Untagged file: -99 leaks in unless it is passed explicitly.
  assert np.nanmin(tiling.read_on_tile(untagged, spec)[0]) == -99
  np.testing.assert_array_equal(tiling.read_on_tile(untagged, spec, nodata=-99)[0], image)
  linear = tiling.read_on_tile(untagged, spec, nodata=-99, in_linear_power=True)[0]
  np.testing.assert_array_equal(np.isnan(linear), np.isnan(image))


@needs_pyrosar
def test_pyrosar_linear_power_keeps_the_mean_power():
  _, grid = _pyrosar_grid(560)
  spec = tiling.tiles(grid, 560)[0]  # one tile over the whole scene
  db = tiling.read_on_tile(PYROSAR, spec)[0].astype(np.float64)
  linear = tiling.read_on_tile(PYROSAR, spec, in_linear_power=True)[0].astype(np.float64)
  with rasterio.open(PYROSAR) as dataset:
    source = dataset.read(1).astype(np.float64)
  np.testing.assert_array_equal(np.isnan(linear), np.isnan(db))
  # Same weights, power is convex in dB: interpolating power is never below interpolating dB
  # (Jensen), pixel by pixel.
  finite = np.isfinite(db)
  assert np.all(linear[finite] >= db[finite] - 1e-4)
  assert source.min() - 1e-4 <= linear[finite].min() and linear[finite].max() <= source.max() + 1e-4
  # A uniform-ish 40 x 40 source-pixel (800 m) field block, rows 20..59, cols 220..259 (std of
  # its dB values 1.9, speckle-dominated). Compare its mean power with that of the 10 m pixels
  # centred inside it (80 x 80). Bilinear preserves the mean up to a boundary band of about half
  # a source pixel, 1/40 of the block's width per side, where weight leaks to the neighbours
  # outside: with a few dB of contrast that is ~0.01 dB (measured: 0.002), so 0.03 dB is loose
  # enough yet well below the -0.07 dB bias of resampling in dB that it must avoid.
  transform = Affine(20.0, 0.0, 620048.241204, 0.0, -20.0, 4830114.70107)
  left, top = transform @ (220, 20)
  right, bottom = transform @ (260, 60)
  x = spec.transform.c + 10 * (np.arange(spec.width) + 0.5)
  y = spec.transform.f - 10 * (np.arange(spec.height) + 0.5)
  cols = np.flatnonzero((x > left) & (x < right))
  rows = np.flatnonzero((y < top) & (y > bottom))
  assert (rows.size, cols.size) == (80, 80)
  box = np.ix_(rows, cols)

  def mean_power_db(values_db):
    return 10 * math.log10(np.mean(10 ** (values_db / 10)))

  reference = mean_power_db(source[20:60, 220:260])
  assert abs(mean_power_db(linear[box]) - reference) < 0.03
  assert mean_power_db(db[box]) < reference - 0.03  # the dB-domain bias that linear avoids


# --- Valid fraction ----------------------------------------------------------------------------


def test_valid_fraction_and_filter_counts():
  nan = np.nan
  full = np.zeros((2, 4, 4), np.float32)
  half = full.copy()
  half[0, :2] = nan  # rows 0..1 invalid in channel 0 only: still invalid pixels
  quarter = full.copy()
  quarter[1, :, 1:] = nan
  empty = np.full((2, 4, 4), nan, np.float32)
  assert tiling.valid_fraction(full) == 1.0
  assert tiling.valid_fraction(half) == 0.5
  assert tiling.valid_fraction(quarter) == 0.25
  assert tiling.valid_fraction(empty) == 0.0
  assert tiling.valid_fraction(np.moveaxis(half, 0, -1), channel_axis=-1) == 0.5
  assert tiling.valid_fraction(half[0]) == 0.5
  items = [('a', full), ('b', half), ('c', quarter), ('d', empty)]
  kept, counts = tiling.filter_tiles(items, 0.5)
  assert [k for k, _ in kept] == ['a', 'b']  # the threshold itself is kept
  assert counts == {'kept': 2, 'empty': 1, 'below_min_valid_fraction': 1}
  kept, counts = tiling.filter_tiles(items, 0.0)  # an empty tile is never kept
  assert counts == {'kept': 3, 'empty': 1, 'below_min_valid_fraction': 0}
  with pytest.raises(ValueError, match='min_valid_fraction'):
    tiling.filter_tiles(items, 1.5)


# --- Errors ------------------------------------------------------------------------------------


@needs_ben
def test_truncated_geotiff_names_the_file(strip, tmp_path):
  _, _, specs = strip
  path = str(tmp_path / 'cut_VV.tif')
  shutil.copy(_vv(BEN_NAMES[0]), path)
  with open(path, 'rb') as f:
    data = f.read()
  for keep in (len(data) // 2, 100):  # strips cut, then the header itself cut
    with open(path, 'wb') as f:
      f.write(data[:keep])
    for linear in (False, True):
      with pytest.raises(labels.RasterReadError, match=r'cut_VV\.tif') as info:
        tiling.read_on_tile(path, specs[0], in_linear_power=linear)
      assert isinstance(info.value, OSError)
  with pytest.raises(FileNotFoundError, match=r'nope\.tif'):
    tiling.read_on_tile(str(tmp_path / 'nope.tif'), specs[0])


@needs_ben
@pytest.mark.filterwarnings('ignore::rasterio.errors.NotGeoreferencedWarning')
def test_bad_sources_and_arguments_name_the_file(strip, tmp_path):
  _, _, specs = strip
  path = str(tmp_path / 'no_crs.tif')
  with rasterio.open(path, 'w', driver='GTiff', width=4, height=4, count=1,
                     dtype='float32') as dataset:
    dataset.write(np.zeros((1, 4, 4), np.float32))
  with pytest.raises(ValueError, match=r'no_crs\.tif.*no CRS'):
    tiling.read_on_tile(path, specs[0])
  vv = _vv(BEN_NAMES[0])
  with pytest.raises(ValueError, match=r'_39_VV\.tif.*out of range'):
    tiling.read_on_tile(vv, specs[0], band_indexes=[2])
  with pytest.raises(ValueError, match='unknown resampling'):
    tiling.read_on_tile(vv, specs[0], resampling='magic')
  assert tiling.read_on_tile(vv, specs[0], band_indexes=1).shape == (1, TILE, TILE)
