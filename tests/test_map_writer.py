"""mae_jax.tools.map_writer: the map from per-pixel sums, its class names, a valid COG; the
WorldCover probability and confidence rasters.

COG validity is checked from the file's bytes by ``tests/cog_check.py`` (the checks of GDAL's
``validate_cloud_optimized_geotiff.py``, which ``rio cogeo validate`` also makes); neither GDAL's
Python bindings nor rio-cogeo is installed here.
"""

import types

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from data_pipeline import schema
from mae_jax.tools import map_writer
from tests import cog_check

TRANSFORM = from_origin(499_980.0, 5_300_040.0, 10.0, 10.0)


def write(tmp_path, task, height, width, seed=0):
  """(COG path, the tiled GTiff it was copied from, expected values) of random sums."""
  rng = np.random.default_rng(seed)
  channels = (1 if task == 'vcf' else schema.NUM_CLASSES) + 1
  sums = rng.uniform(0.0, 1.0, (height, width, channels)).astype(np.float32)
  sums[: height // 3, : width // 4, -1] = 0.0  # No window covered these pixels: no-data.
  accumulator = map_writer.Accumulator(str(tmp_path / f'{task}.sums'), height, width, channels)
  try:
    accumulator.add(0, 0, sums)
    scene = types.SimpleNamespace(height=height, width=width, crs='EPSG:32633',
                                  transform=TRANSFORM)
    tiled, cog = str(tmp_path / f'{task}.tiled.tif'), str(tmp_path / f'{task}.tif')
    map_writer.write_map(accumulator, task, tiled, cog, scene, {'MAE_JAX_TASK': task})
  finally:
    accumulator.close()
  covered = sums[..., -1] > 0
  if task == 'vcf':
    expected = np.where(covered, sums[..., 0] / np.where(covered, sums[..., -1], 1), np.nan)
  else:
    codes = np.asarray(schema.WORLDCOVER_CODES)[sums[..., :-1].argmax(-1)]
    expected = np.where(covered, codes, schema.WORLDCOVER_NODATA_CODE)
  return cog, tiled, expected


@pytest.mark.parametrize('task', ['vcf', 'worldcover'])
@pytest.mark.parametrize('size', [(700, 600), (101, 110)])  # Overviews of 512 / 128 px blocks.
def test_map_is_a_valid_cog_with_class_names(tmp_path, task, size):
  cog, tiled, expected = write(tmp_path, task, *size)
  assert cog_check.cog_errors(cog) == []
  # The checker is not vacuous: the tiled GTiff the COG is copied from has no ghost header.
  assert 'no GDAL structural metadata (ghost header) after the TIFF header' in \
      cog_check.cog_errors(tiled)
  with rasterio.open(cog) as src:
    assert src.tags(ns='IMAGE_STRUCTURE')['LAYOUT'] == 'COG'
    assert src.profile['tiled'] and src.overviews(1)
    assert src.tags()['MAE_JAX_TASK'] == task
    band_tags = src.tags(1)
    values = src.read(1)
    if task == 'worldcover':
      assert {k: v for k, v in band_tags.items() if k.startswith('CLASS_')} == {
          'CLASS_10': 'tree_cover', 'CLASS_20': 'shrubland', 'CLASS_30': 'grassland',
          'CLASS_40': 'cropland', 'CLASS_50': 'built_up', 'CLASS_60': 'bare_sparse_vegetation',
          'CLASS_70': 'snow_and_ice', 'CLASS_80': 'permanent_water',
          'CLASS_90': 'herbaceous_wetland', 'CLASS_95': 'mangroves',
          'CLASS_100': 'moss_and_lichen'}
      assert src.colormap(1)[10][:3] == schema.WORLDCOVER_COLORS[0]
      np.testing.assert_array_equal(values, expected)
    else:
      assert not any(k.startswith('CLASS_') for k in band_tags)
      np.testing.assert_allclose(values, expected, rtol=1e-6)


def test_probability_and_confidence_rasters_hold_the_blend_the_map_is_taken_from(tmp_path):
  height, width = 150, 140  # 128 px blocks: several blocks and an overview.
  rng = np.random.default_rng(1)
  weight = rng.uniform(0.01, 2.0, (height, width, 1)).astype(np.float32)
  weight[:40, :30] = 0.0  # No-data.
  blend = rng.dirichlet(np.full(schema.NUM_CLASSES, 0.3), (height, width)).astype(np.float32)
  sums = np.concatenate([blend * weight, weight], axis=-1)
  paths = {name: (str(tmp_path / f'{name}.tiled.tif'), str(tmp_path / f'{name}.tif'))
           for name in ('map', 'probabilities', 'confidence')}
  accumulator = map_writer.Accumulator(str(tmp_path / 'sums'), height, width, sums.shape[-1])
  scene = types.SimpleNamespace(height=height, width=width, crs='EPSG:32633',
                                transform=TRANSFORM)
  try:
    accumulator.add(0, 0, sums)
    map_writer.write_map(accumulator, 'worldcover', *paths['map'], scene,
                         {'MAE_JAX_TASK': 'worldcover'}, probabilities=paths['probabilities'],
                         confidence=paths['confidence'])
    with pytest.raises(ValueError, match='WorldCover outputs; a VCF model'):
      map_writer.write_map(accumulator, 'vcf', str(tmp_path / 'v.tiled.tif'),
                           str(tmp_path / 'v.tif'), scene, {}, confidence=paths['confidence'])
  finally:
    accumulator.close()
  assert not (tmp_path / 'v.tiled.tif').exists()
  # The truth, from the module docstring's formula: uint8 round(p * 254), 255 = no-data, of
  # p = sums / weight in float32.
  covered = weight[..., 0] > 0
  p = np.divide(sums[..., :-1], np.where(covered, weight[..., 0], 1.0)[..., None],
                dtype=np.float32)
  expected = np.where(covered[..., None], np.rint(np.clip(p, 0, 1) * 254), 255)
  with rasterio.open(paths['probabilities'][1]) as src:
    assert (src.count, src.dtypes[0], src.nodata) == (11, 'uint8', 255)
    assert src.descriptions == schema.WORLDCOVER_NAMES
    assert src.tags(1) == {'CLASS_CODE': '10', 'CLASS_NAME': 'tree_cover'}
    assert src.tags(11) == {'CLASS_CODE': '100', 'CLASS_NAME': 'moss_and_lichen'}
    np.testing.assert_allclose(src.scales, [1 / 254] * 11)
    assert src.offsets == (0.0,) * 11 and src.overviews(1)
    assert src.tags()['MAE_JAX_TASK'] == 'worldcover'
    stored = src.read().transpose(1, 2, 0)
  with rasterio.open(paths['confidence'][1]) as src:
    assert (src.count, src.dtypes[0], src.nodata) == (1, 'uint8', 255)
    assert src.descriptions == ('confidence',)
    confidence = src.read(1)
  with rasterio.open(paths['map'][1]) as src:
    codes = src.read(1)
  for name in ('probabilities', 'confidence'):
    assert cog_check.cog_errors(paths[name][1]) == [], name
  np.testing.assert_array_equal(stored, expected)
  np.testing.assert_array_equal(confidence, stored.max(-1))
  # The stored probabilities sum to 1 within the rounding (11 values, 1/508 each).
  assert np.abs(stored[covered].sum(-1) / 254 - 1).max() <= 11 / 508 + 1e-6
  # Their argmax is the map's class wherever it is not tied.
  unique = (stored == stored.max(-1, keepdims=True)).sum(-1) == 1
  assert (unique & covered).mean() > 0.5
  np.testing.assert_array_equal(
      np.asarray(schema.WORLDCOVER_CODES)[stored.argmax(-1)][unique & covered],
      codes[unique & covered])
  assert (codes[~covered] == schema.WORLDCOVER_NODATA_CODE).all()
