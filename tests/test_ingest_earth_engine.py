"""data_pipeline.ingest.build with source 'earth_engine', checked against the GeoTIFF path.

One set of seasonal composites is written twice, as a GeoTIFF and as an Earth Engine style
export (float features per band, mixer, GZIP and not, two shards); both builds must give the
same tiles, labels, ids and splits.
"""

import numpy as np
import pytest
import rasterio.warp

import configs.data.earth_engine as ee_config
import configs.data.geotiff as geotiff_config
from data_pipeline.ingest import build
from data_pipeline.ingest import ee_export
from data_pipeline import schema
from tests import ingest_fixtures as fx
from tests.test_ee_export import write_export

TILE = 16
ROWS, COLS = 3, 4
FILL = -9999.0
BAND_NAMES = [f'{p}_{s}' for p in ('VV', 'VH') for s in schema.SEASONS]


@pytest.fixture(scope='module')
def composites():
  """(8, H, W) dB composites over a 3 x 4 tile area, VV then VH, with no-data holes."""
  rng = np.random.default_rng(7)
  values = (-12 + 3 * rng.standard_normal((8, ROWS * TILE, COLS * TILE))).astype(np.float32)
  values[4:] -= 6
  values[:, :5, :7] = np.nan  # a hole in every band
  values[0, 20:, 40:] = np.nan  # no winter VV in a corner
  values[:, TILE:2 * TILE, :TILE] = np.nan  # one empty tile: skipped in both paths
  return values


def _labels(tmp_path):
  left, top = fx.ORIGIN
  bounds = rasterio.warp.transform_bounds(fx.UTM33, 'EPSG:4326', left, top - ROWS * TILE * 10,
                                          left + COLS * TILE * 10, top)
  return (fx.worldcover_over(tmp_path / 'labels' / 'wc.tif', bounds),
          fx.vcf_over(tmp_path / 'labels' / 'vcf.tif', bounds))


def _ee_export(tmp_path, composites, compression):
  patches = []
  for index in range(ROWS * COLS):
    row, col = divmod(index, COLS)
    patch = composites[:, row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE]
    patches.append(np.moveaxis(np.where(np.isnan(patch), FILL, patch), 0, -1))
  folder = tmp_path / f'ee_{compression or "raw"}'
  folder.mkdir()
  return write_export(folder, np.stack(patches), name='s1', bands=BAND_NAMES,
                      compression=compression, shard_sizes=[5, 7], patches_per_row=COLS,
                      matrix=list(fx.utm_transform())[:6], dims=(TILE, TILE))


def _ee_build(tmp_path, prefix, worldcover, vcf, name='ee', **overrides):
  config = ee_config.get_config()
  config.areas[0].prefix = prefix
  config.fill_value = FILL
  config.tile_size = TILE
  config.num_shards = 1
  config.worldcover, config.vcf = worldcover, vcf
  config.update(overrides)
  return build.build(config, str(tmp_path / name))


@pytest.mark.parametrize('compression', ['GZIP', ''], ids=['gzip', 'uncompressed'])
def test_earth_engine_export_gives_the_geotiff_tiles(tmp_path, composites, compression):
  worldcover, vcf = _labels(tmp_path)
  tif = fx.write_tif(tmp_path / 'tif' / 'composite.tif', composites, fx.utm_transform(),
                     nodata=float('nan'), descriptions=BAND_NAMES)
  config = geotiff_config.get_config()
  config.kind = 'composites'
  config.areas[0].scenes = tif
  config.resample_in_linear_power = False
  config.tile_size = TILE
  config.num_shards = 1
  config.worldcover, config.vcf = worldcover, vcf
  _, tif_report = build.build(config, str(tmp_path / 'from_tif'))
  _, ee_report = _ee_build(tmp_path, _ee_export(tmp_path, composites, compression),
                           worldcover, vcf)

  from_tif = fx.read_dataset(tmp_path / 'from_tif')
  from_ee = fx.read_dataset(tmp_path / 'ee')
  assert {s: sorted(t) for s, t in from_tif.items()} == {s: sorted(t) for s, t in from_ee.items()}
  assert sum(len(t) for t in from_ee.values()) == ROWS * COLS - 1
  for split in schema.SPLITS:
    assert tif_report[split]['skipped'] == ee_report[split]['skipped']
  for split, tiles in from_tif.items():
    for tile_id, expected in tiles.items():
      got = from_ee[split][tile_id]
      for key in (schema.IMAGE, schema.WORLDCOVER, schema.TRANSFORM, schema.CRS, schema.LAT,
                  schema.LON, schema.REGION):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f'{tile_id} {key}')
      np.testing.assert_allclose(got[schema.VCF], expected[schema.VCF], rtol=1e-6)
  # And both equal the composites themselves (first tile: top-left).
  first = from_ee['train'].get(f'32633_{int(fx.ORIGIN[0])}_{int(fx.ORIGIN[1])}') or next(
      iter(t for s in from_ee.values() for t in s.values()))
  row = int((fx.ORIGIN[1] - first[schema.TRANSFORM][5]) // (10 * TILE))
  col = int((first[schema.TRANSFORM][2] - fx.ORIGIN[0]) // (10 * TILE))
  patch = composites[:, row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE]
  np.testing.assert_array_equal(first[schema.IMAGE][..., schema.product_indices('vv')],
                                np.moveaxis(patch[:4], 0, -1).astype(np.float16))


def test_corrupt_export_shard_stops_before_writing(tmp_path, composites):
  prefix = _ee_export(tmp_path, composites, 'GZIP')
  shard = f'{prefix}-00001.tfrecord.gz'
  data = bytearray(open(shard, 'rb').read())
  data[len(data) // 2:len(data) // 2 + 64] = b'\x00' * 64
  with open(shard, 'wb') as f:
    f.write(bytes(data))
  with pytest.raises(ee_export.ExportError, match=r's1-00001\.tfrecord\.gz'):
    _ee_build(tmp_path, prefix, '', '')
  assert not (tmp_path / 'ee').exists()


def test_truncated_export_shard_names_the_file(tmp_path, composites):
  prefix = _ee_export(tmp_path, composites, '')
  shard = f'{prefix}-00000.tfrecord'
  data = open(shard, 'rb').read()
  with open(shard, 'wb') as f:
    f.write(data[:len(data) - 100])
  with pytest.raises(ee_export.ExportError, match=r's1-00000\.tfrecord'):
    _ee_build(tmp_path, prefix, '', '')
  assert not (tmp_path / 'ee').exists()


def test_wrong_band_names_stop_before_writing_and_the_fixed_rerun_builds(tmp_path, composites):
  patches = [np.moveaxis(composites[:, r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE], 0, -1)
             for r in range(ROWS) for c in range(COLS)]
  names = [f'{name}_median' for name in BAND_NAMES]  # Not the config's default names.
  (tmp_path / 'export').mkdir()
  prefix = write_export(tmp_path / 'export', np.nan_to_num(np.stack(patches), nan=FILL),
                        name='s1', bands=names, shard_sizes=[5, 7], patches_per_row=COLS,
                        matrix=list(fx.utm_transform())[:6], dims=(TILE, TILE))
  with pytest.raises(ee_export.ExportError, match=r"s1-00000\.tfrecord\.gz.*: missing band "
                     r"feature 'VV_winter'; the record has \['VH_fall_median'") as error:
    _ee_build(tmp_path, prefix, '', '')
  assert not (tmp_path / 'ee').exists()  # Nothing written: the rerun needs no --overwrite.
  assert 'record 0 (patch 0)' in str(error.value)
  assert '--config.bands.vv_winter=' in str(error.value)
  bands = {key: f'{key[:2].upper()}{key[2:]}_median' for key in ee_config.get_config().bands}
  _, report = _ee_build(tmp_path, prefix, '', '', bands=bands)
  assert sum(report[split]['examples'] for split in schema.SPLITS) == ROWS * COLS - 1


def test_patch_size_other_than_the_tile_size_names_the_flag(tmp_path, composites):
  prefix = _ee_export(tmp_path, composites, 'GZIP')
  with pytest.raises(ValueError, match=rf'patches are {TILE} x {TILE} px but config.tile_size is '
                     rf'32; set --config.tile_size={TILE} or export with patchDimensions'):
    _ee_build(tmp_path, prefix, '', '', tile_size=32)
