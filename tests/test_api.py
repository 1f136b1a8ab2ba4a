"""mae_jax.load and the Python API (mae_jax.tools.api): each kind of path, predict against the
command line's rasters and a direct model pass, embed against embed_split, input errors, and an
import of mae_jax that stays free of JAX.

The fine-tuned models are untrained (``inference.save_initialised``) at the tiny 32 px size, on
the session dataset's input contract: a WorldCover fine-tuning head and a VCF linear probe, so
both checkpoint kinds load. The truths are independent of the API: the rasters written by
``predict.run`` (the command), ``model.apply`` on inputs normalised here with numpy, and
``embed.embed_split`` over the same dataset tiles.
"""

import json
import os
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

import mae_jax
from configs import downstream as downstream_configs
from data_pipeline import input as data_input
from data_pipeline import schema
from mae_jax import checkpoint as ckpt_lib
from mae_jax.models import hf_convert
from mae_jax.models import mae
from mae_jax.tools import embed
from mae_jax.tools import export
from mae_jax.tools import inference
from mae_jax.tools import predict
from tests.conftest import make_tiny_config

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (task, head kind): a fine-tuning head and a linear probe.
HEADS = (('worldcover', 'finetune'), ('vcf', 'linear_probe'))
# 32 px windows, default overlap 4 px (stride 28): origins 0, 28, 38 down and 0, 28, 43 across.
HEIGHT, WIDTH = 70, 75
CRS = 'EPSG:32633'
TRANSFORM = from_origin(499_980.0, 5_300_040.0, 10.0, 10.0)
FILE_NODATA = -9999.0  # The GeoTIFF's declared no-data; NaN in the array.
# No-data in every band: covers the last window (38.., 43..) entirely, so it is skipped.
NODATA_ROWS, NODATA_COLS = slice(36, HEIGHT), slice(41, WIDTH)
ALL_NAN, PARTIAL = (5, 5), (7, 7)  # NaN in every band / in all but the last (still valid).
ZERO, FLOOR = (9, 9), (11, 11)  # VV and VH exactly 0 / below the noise floor: no-data.
# Embeddings and outputs computed two ways (other batches, another process) agree up to
# float32 summation order.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def scene_array(seed=0):
  """(H, W, 12) float32 dB in band order with the no-data block (NaN) and pixels set."""
  rng = np.random.default_rng(seed)
  level = np.repeat(np.repeat(rng.uniform(-15.0, -7.0, (8, 8)), 16, 0), 16, 1)
  vv = level[:HEIGHT, :WIDTH, None] + rng.normal(0.0, 2.0, (HEIGHT, WIDTH, 4))
  vh = vv - 6.0 + rng.normal(0.0, 2.0, (HEIGHT, WIDTH, 4))
  image = np.concatenate([vv - vh, vv, vh], axis=-1).astype(np.float32)
  image[NODATA_ROWS, NODATA_COLS] = np.nan
  image[ALL_NAN] = np.nan
  image[PARTIAL][:-1] = np.nan
  for pixel, value in ((ZERO, 0.0), (FLOOR, -60.0)):
    image[pixel][:4] = np.nan
    image[pixel][4:] = value
  return image


def expected_nodata():
  mask = np.zeros((HEIGHT, WIDTH), bool)
  mask[NODATA_ROWS, NODATA_COLS] = True
  for pixel in (ALL_NAN, ZERO, FLOOR):
    mask[pixel] = True
  return mask


def write_tif(path, image):
  """The array as a 12-band GeoTIFF; NaN becomes the declared no-data value."""
  bands = np.where(np.isnan(image), FILE_NODATA, image).transpose(2, 0, 1)
  with rasterio.open(path, 'w', driver='GTiff', width=WIDTH, height=HEIGHT, count=12,
                     dtype='float32', crs=CRS, transform=TRANSFORM, nodata=FILE_NODATA) as out:
    out.write(bands.astype(np.float32))
  return str(path)


def quantised(images, contract):
  """Model input as the dataset stores tiles, computed here: clipped, float16."""
  return np.clip(images, *contract.clip_range).astype(np.float16)


@pytest.fixture(scope='module')
def contract(tiny_dataset):
  return data_input.HostDataset(tiny_dataset, 'test').contract


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory, tiny_dataset, contract):
  """{task: workdir of an untrained tiny downstream model on the dataset's contract}."""
  out = {}
  for task, kind in HEADS:
    config = downstream_configs.build(task, kind, 'tiny')
    config.model = ml_collections.ConfigDict(make_tiny_config(tiny_dataset).model.to_dict())
    config.model.drop_path_rate = 0.0
    if kind == 'finetune':
      config.head.options = {'channels': 8}
    out[task] = str(tmp_path_factory.mktemp(task))
    inference.save_initialised(config, out[task], contract)
  return out


@pytest.fixture(scope='module')
def models(workdirs):
  return {task: mae_jax.load(path) for task, path in workdirs.items()}


@pytest.fixture(scope='module')
def scene(tmp_path_factory):
  """(GeoTIFF path, the array it was written from)."""
  image = scene_array()
  return write_tif(tmp_path_factory.mktemp('scene') / 'scene.tif', image), image


@pytest.fixture(scope='module')
def pretrain_workdir(tmp_path_factory, tiny_dataset, contract):
  """A pretraining workdir as ``mae_jax.trainers.pretrain`` saves one (step, params, the
  metadata its readers use), of random weights: the tools read only the encoder's params and
  the metadata, and training one would take most of this file's time."""
  config = make_tiny_config(tiny_dataset)
  model = mae.model_from_config(config.model)
  rng = np.random.default_rng(0)
  params = flax.traverse_util.unflatten_dict({
      path: (0.1 * rng.standard_normal(shape)).astype(np.float32)
      for path, shape in hf_convert.param_shapes(model).items()})
  metadata = {'task': 'pretrain', 'model': config.model.to_dict(),
              'input_contract': contract.to_dict(),
              'config': json.loads(config.to_json_best_effort())}
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), async_save=False)
  checkpointer.save(3, {'step': np.int32(3), 'params': params}, metadata, force=True)
  checkpointer.close()
  return workdir


@pytest.fixture(scope='module')
def exported(pretrain_workdir, tmp_path_factory):
  return export.export(pretrain_workdir, str(tmp_path_factory.mktemp('export') / 'encoder'),
                       part='encoder')


# --- Import and load ---------------------------------------------------------------------------


def test_import_mae_jax_does_not_import_jax():
  code = ('import sys, mae_jax\n'
          'assert "jax" not in sys.modules, "import mae_jax imported jax"\n'
          'load = mae_jax.load\n'
          'assert callable(load) and "load" in dir(mae_jax)\n'
          'assert "jax" not in sys.modules, "mae_jax.load imported jax before a call"\n'
          'try:\n'
          '  mae_jax.no_such_name\n'
          'except AttributeError as e:\n'
          '  assert "no_such_name" in str(e)\n'
          'else:\n'
          '  raise AssertionError("no AttributeError")\n')
  done = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=60, check=False)
  assert done.returncode == 0, done.stderr


def test_load_each_kind_of_path(workdirs, models, pretrain_workdir, exported, contract, tmp_path):
  worldcover, vcf = models['worldcover'], models['vcf']
  assert (worldcover.task, worldcover.source, worldcover.weights) == (
      'worldcover', 'finetune', 'best')
  assert worldcover.contract == contract and worldcover.band_names == schema.BAND_NAMES
  assert worldcover.tile_size == 32
  assert worldcover.class_names == schema.WORLDCOVER_NAMES
  assert worldcover.class_codes == schema.WORLDCOVER_CODES
  assert worldcover.checkpoint == os.path.join(workdirs['worldcover'], 'checkpoints', '0')
  assert repr(worldcover).startswith("Model(task='worldcover', source='finetune', tile_size=32")
  assert (vcf.task, vcf.class_names) == ('vcf', None)
  # One step folder, and the last weights instead of the best.
  step = mae_jax.load(os.path.join(workdirs['vcf'], 'checkpoints', '0'), use_best=False)
  assert (step.task, step.weights) == ('vcf', 'last')

  encoder = mae_jax.load(pretrain_workdir)
  from_export = mae_jax.load(exported)
  for model, source in ((encoder, 'pretrain'), (from_export, 'export')):
    assert (model.task, model.source, model.class_names) == ('embedding', source, None)
    assert model.contract == contract and model.tile_size == 32
    with pytest.raises(ValueError, match='without a head: predict needs a fine-tuning'):
      model.predict(np.zeros((32, 32, 12), np.float32))
  assert 'export' in repr(from_export)

  with pytest.raises(FileNotFoundError, match='does not exist'):
    mae_jax.load(tmp_path / 'missing')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='no committed checkpoint'):
    mae_jax.load(tmp_path / 'empty')
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'config.json').write_text(json.dumps({'model_type': 'vit_mae'}))
  with pytest.raises(ValueError, match='no "mae_jax" entry'):
    mae_jax.load(foreign)


# --- predict -----------------------------------------------------------------------------------


@pytest.mark.parametrize('task', ['worldcover', 'vcf'])
def test_predict_array_equals_the_command_line_rasters(workdirs, models, scene, task, tmp_path):
  path, image = scene
  outputs = {'output': str(tmp_path / 'map.tif')}
  if task == 'worldcover':
    outputs.update(probabilities=str(tmp_path / 'probabilities.tif'),
                   confidence=str(tmp_path / 'confidence.tif'))
  stats = predict.run(workdirs[task], [path], progress=False, **outputs)
  assert (stats['windows'], stats['skipped']) == (8, 1)
  with rasterio.open(outputs['output']) as src:
    map_values = src.read(1)

  result = models[task].predict(image)
  assert (result.windows, result.skipped) == (8, 1)
  nodata = expected_nodata()
  np.testing.assert_array_equal(~result.valid, nodata)
  if task == 'vcf':
    cover = result.tree_cover
    assert cover.shape == (HEIGHT, WIDTH) and cover.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(cover), nodata)
    np.testing.assert_allclose(cover, map_values, rtol=0, atol=1e-6)
    assert np.ptp(cover[~nodata]) > 0  # Windows do differ.
    assert result.probabilities is None and result.tile_tree_cover is None
  else:
    probabilities = result.probabilities
    assert probabilities.shape == (HEIGHT, WIDTH, 11) and probabilities.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(probabilities).all(-1), nodata)
    np.testing.assert_allclose(probabilities[~nodata].sum(-1), 1.0, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(result.codes, map_values)
    np.testing.assert_array_equal(
        result.codes[~nodata], np.asarray(schema.WORLDCOVER_CODES)[result.class_index[~nodata]])
    assert (result.class_index[nodata] == -1).all() and (result.codes[nodata] == 0).all()
    top2 = np.sort(probabilities[~nodata], axis=-1)[:, -2:]
    untied = top2[:, 1] - top2[:, 0] > 1e-6
    assert untied.mean() > 0.99
    np.testing.assert_array_equal(probabilities[~nodata].argmax(-1)[untied],
                                  result.class_index[~nodata][untied])
    np.testing.assert_array_equal(result.confidence[~nodata], probabilities[~nodata].max(-1))
    assert len(np.unique(result.codes[~nodata])) > 1  # The map is not one class.
    # The rasters hold the same probabilities as uint8 round(p * 254), 255 = no-data.
    with rasterio.open(outputs['probabilities']) as src:
      stored = src.read().transpose(1, 2, 0)
      assert src.descriptions == schema.WORLDCOVER_NAMES and src.nodata == 255
      np.testing.assert_allclose(src.scales, [1 / 254] * 11)
    with rasterio.open(outputs['confidence']) as src:
      confidence = src.read(1)
    expected = np.where(np.isnan(probabilities), 255, np.rint(probabilities * 254))
    np.testing.assert_array_equal(stored, expected)
    np.testing.assert_array_equal(confidence, stored.max(-1))
    # argmax of the stored probabilities is the map's class wherever it is not tied.
    unique = (stored == stored.max(-1, keepdims=True)).sum(-1) == 1
    np.testing.assert_array_equal(
        np.asarray(schema.WORLDCOVER_CODES)[stored.argmax(-1)][unique & ~nodata],
        map_values[unique & ~nodata])

  # The GeoTIFF through the API: the same values on the file's grid.
  from_file = models[task].predict(path)
  assert from_file.crs == rasterio.crs.CRS.from_string(CRS)
  assert from_file.transform.almost_equals(TRANSFORM)
  assert any('units: dB' in note for note in from_file.notes)
  for name in ('valid', 'probabilities', 'codes', 'confidence', 'tree_cover'):
    if getattr(result, name) is not None:
      np.testing.assert_array_equal(getattr(from_file, name), getattr(result, name))
  # A batch of two scenes: each as predicted alone.
  pair = models[task].predict(np.stack([image, image[::-1]]))
  single = models[task].predict(image[::-1])
  values = 'probabilities' if task == 'worldcover' else 'tree_cover'
  assert getattr(pair, values).shape[:3] == (2, HEIGHT, WIDTH)
  np.testing.assert_allclose(getattr(pair, values)[0], getattr(result, values), **TOLERANCE)
  np.testing.assert_allclose(getattr(pair, values)[1], getattr(single, values), **TOLERANCE)


def direct_outputs(loaded, tiles, mean, std):
  """``model.apply`` on tiles (8, 32, 32, 12) normalised here: (x - mean) / std, no-data 0."""
  x = tiles.astype(np.float32)
  normalised = np.where(np.isfinite(x), (x - mean) / std, 0.0).astype(np.float32)
  with jax.set_mesh(loaded.mesh), nn.logical_axis_rules(loaded.rules):
    return np.asarray(jax.jit(loaded.model.apply)(loaded.variables, normalised))


@pytest.mark.parametrize('task', ['worldcover', 'vcf'])
def test_predict_normalises_with_the_checkpoint_contract(workdirs, models, contract, task):
  rng = np.random.default_rng(1)
  tiles = np.concatenate([rng.normal(6.0, 3.0, (8, 32, 32, 4)),
                          rng.normal(-11.0, 3.0, (8, 32, 32, 4)),
                          rng.normal(-17.0, 3.0, (8, 32, 32, 4))], axis=-1).astype(np.float32)
  tiles[0, :5] = np.nan  # Some rows without data.
  tiles[1, :, :, 2] = 45.0  # Clipped to 30 dB.
  tiles[2] = np.nan  # A tile without data.
  result = models[task].predict(tiles)
  loaded = inference.load_downstream(workdirs[task])
  mean = np.asarray(contract.mean, np.float32)
  std = np.asarray(contract.std, np.float32)
  direct = direct_outputs(loaded, quantised(tiles, contract), mean, std)
  ignored = direct_outputs(loaded, quantised(tiles, contract), 0.0, 1.0)
  valid = np.isfinite(tiles).any(-1)
  assert valid[[0, 1, 3]].all(-1).any() and not valid[2].any()
  if task == 'worldcover':
    expected = np.asarray(jax.nn.softmax(direct, axis=-1))
    np.testing.assert_allclose(result.probabilities[valid], expected[valid], **TOLERANCE)
    assert np.isnan(result.probabilities[2]).all()
    # Not vacuous: without the contract's statistics the probabilities are others.
    assert np.abs(np.asarray(jax.nn.softmax(ignored, -1)) - expected)[valid].max() > 1e-3
  else:
    # One window per tile: every valid pixel holds the tile's output.
    per_tile = result.tile_tree_cover
    assert per_tile.shape == (8,) and np.isnan(per_tile[2])
    keep = [0, 1, 3, 4, 5, 6, 7]
    np.testing.assert_allclose(per_tile[keep], direct[keep], **TOLERANCE)
    np.testing.assert_array_equal(result.tree_cover[valid],
                                  np.broadcast_to(per_tile[:, None, None], valid.shape)[valid])
    assert np.abs(ignored - direct)[keep].max() > 1e-3
  one = models[task].predict(tiles[3])
  values = 'probabilities' if task == 'worldcover' else 'tree_cover'
  assert getattr(one, values).shape[:2] == (32, 32)
  np.testing.assert_allclose(getattr(one, values), getattr(result, values)[3], **TOLERANCE)
  # Linear power, stated, gives the same (float16 may round a value differently).
  linear = models[task].predict(10.0 ** (tiles / 10.0), units='linear')
  np.testing.assert_allclose(getattr(linear, values), getattr(result, values), rtol=0,
                             atol=1e-3 if task == 'worldcover' else 0.05)


# --- embed -------------------------------------------------------------------------------------


def test_embed_equals_embed_split_for_every_kind_of_path(workdirs, models, pretrain_workdir,
                                                         exported, tiny_dataset):
  tiles = data_input.read_split_index(tiny_dataset, 'test', features=(schema.IMAGE,))[
      schema.IMAGE]
  # No-data borders: the mean pool leaves patches out.
  assert tiles.shape == (16, 32, 32, 12) and np.isnan(tiles.astype(np.float32)).any()
  encoder = mae_jax.load(pretrain_workdir)
  expected = embed.embed_split(pretrain_workdir, tiny_dataset, 'test', pool='mean',
                               batch_size=16).columns['embedding']
  got = encoder.embed(tiles, pool='mean', batch_size=8)  # Two batches.
  assert got.shape == (16, 32) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, **TOLERANCE)
  np.testing.assert_allclose(encoder.embed(tiles[5], pool='mean'), got[5], **TOLERANCE)  # (D,)
  # The export: the same encoder, read back from transformers' layout.
  np.testing.assert_allclose(mae_jax.load(exported).embed(tiles, pool='mean'), got,
                             **TOLERANCE)
  # A fine-tuned model's encoder (its best weights), as embed_split reads it; the cls pool.
  expected = embed.embed_split(workdirs['worldcover'], tiny_dataset, 'test',
                               batch_size=16).columns['embedding']
  np.testing.assert_allclose(models['worldcover'].embed(tiles), expected, **TOLERANCE)
  # A tile without any valid pixel has a NaN row.
  empty = np.full((1, 32, 32, 12), np.nan, np.float32)
  assert np.isnan(encoder.embed(empty)).all()


# --- Errors ------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_value_errors(models):
  model = models['worldcover']
  good = scene_array()[:32, :32]
  integers = np.nan_to_num(good).astype(np.int16)
  cases = {
      'eleven bands': (good[..., :11], r'11 bands on its last axis .* takes 12, in the order'),
      'bands first': (good.transpose(2, 0, 1), r'bands look first: np.moveaxis\(x, 0, -1\)'),
      'integers': (integers, r'dtype int16; expected floating-point dB'),
      'two axes': (good[..., 0], r'shape \(32, 32\) \(2-D\); expected \(H, W, 12\) or'),
      'five axes': (good[None, None], r'\(5-D\)'),
      'empty': (good[:0], 'empty'),
      'linear unstated': (10.0 ** (good / 10.0), "units='dB' contradicts the values: linear"),
      'not an array': ({'x': 1}, 'expected a numpy array'),
  }
  for name, (x, pattern) in cases.items():
    with pytest.raises(ValueError, match=pattern):
      model.predict(x)
    with pytest.raises(ValueError, match=pattern):
      model.embed(x)
  with pytest.raises(ValueError, match="tiles must be 32 x 32 px .* got 40 x 32"):
    model.embed(np.zeros((2, 40, 32, 12), np.float32))
  with pytest.raises(ValueError, match='pool must be one of'):
    model.embed(good, pool='max')
  with pytest.raises(ValueError, match='units must be one of'):
    model.predict(good, units='dBm')
  with pytest.raises(ValueError, match='half the window'):
    model.predict(good, overlap=16)
