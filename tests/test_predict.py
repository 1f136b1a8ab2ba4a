"""Whole-scene prediction (mae_jax.tools.predict): maps, blending, no-data, inputs, errors, memory.

Two tiny models (32 px windows) are fine-tuned from scratch for a couple of steps, once per
module, one per task. The truths are computed here independently of the prediction code: the
window's pixels cut from the array the scene was written from, ``model.apply`` on them, and the
blending weights from the ramp's formula.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import rasterio
import rasterio.shutil
import rasterio.windows
from rasterio.transform import from_origin

from configs import downstream as downstream_configs
from data_pipeline import schema
from mae_jax import checkpoint as ckpt_lib
from mae_jax.tools import inference
from mae_jax.tools import predict
from mae_jax import preprocess
from mae_jax.tools import scene_windows

pytestmark = pytest.mark.integration

TASKS = ('vcf', 'worldcover')
# Not a multiple of the 32 px window; with the default 4 px overlap (stride 28) the window
# origins are 0, 28, 56, 69 down and 0, 28, 56, 78 across, so window (1, 1) at (28, 28) has
# regularly spaced neighbours on every side.
HEIGHT, WIDTH = 101, 110
CRS = 'EPSG:32633'
TRANSFORM = from_origin(499_980.0, 5_300_040.0, 10.0, 10.0)
NODATA = -9999.0
# No-data in every band: covers window (3, 3) (rows 69.., cols 78..) entirely, so it is skipped.
NODATA_ROWS, NODATA_COLS = slice(66, HEIGHT), slice(75, WIDTH)
ALL_NAN_PIXEL = (12, 12)  # NaN in every band: no-data.
PARTIAL_PIXEL = (10, 10)  # NaN in all bands but the last: still valid.
# VV-VH NaN, and VV and VH exactly 0 (Earth Engine's fill) / below the -50 dB noise floor: no-data,
# as in the GeoTIFF ingestion.
ZERO_PIXEL, FLOOR_PIXEL = (14, 14), (16, 16)


def finetune_config(data_dir, task):
  from tests.conftest import make_tiny_config  # pylint: disable=g-import-not-at-top
  config = downstream_configs.build(task, 'finetune', 'tiny')
  config.model = ml_collections.ConfigDict(make_tiny_config(data_dir).model.to_dict())
  config.model.drop_path_rate = 0.0
  config.dataset.data_dir = data_dir
  config.dataset.shuffle_buffer = 16
  config.head.options = {'hidden': (16, 8)} if task == 'vcf' else {'channels': 8}
  config.batch_size = 8
  config.total_steps = 2
  config.eval_every_steps = 2
  config.log_every_steps = 2
  config.checkpoint.async_save = False
  return config


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory, tiny_dataset):
  """{task: fine-tuning workdir}: 2 steps from scratch on the session dataset."""
  from mae_jax.trainers import finetune  # pylint: disable=g-import-not-at-top
  workdirs = {}
  for task in TASKS:
    workdirs[task] = str(tmp_path_factory.mktemp(f'finetune_{task}'))
    finetune.finetune(finetune_config(tiny_dataset, task), workdirs[task])
  return workdirs


@pytest.fixture(scope='module')
def loaded(finetuned):
  return {task: inference.load_downstream(path) for task, path in finetuned.items()}


def scene_array(seed=0):
  """(12, H, W) float32 dB in band order, with the no-data block and pixels set."""
  rng = np.random.default_rng(seed)
  # Regions of different backscatter so that windows predict different things.
  level = np.repeat(np.repeat(rng.uniform(-15.0, -7.0, (1, 8, 8)), 16, 1), 16, 2)
  vv = level[:, :HEIGHT, :WIDTH] + rng.normal(0.0, 2.0, (4, HEIGHT, WIDTH))
  vh = vv - 6.0 + rng.normal(0.0, 2.0, (4, HEIGHT, WIDTH))
  image = np.concatenate([vv - vh, vv, vh]).astype(np.float32)
  image[:, NODATA_ROWS, NODATA_COLS] = NODATA
  image[:, ALL_NAN_PIXEL[0], ALL_NAN_PIXEL[1]] = np.nan
  image[:-1, PARTIAL_PIXEL[0], PARTIAL_PIXEL[1]] = np.nan
  for pixel, value in ((ZERO_PIXEL, 0.0), (FLOOR_PIXEL, -60.0)):
    image[:4, pixel[0], pixel[1]] = np.nan
    image[4:, pixel[0], pixel[1]] = value
  return image


def write_tif(path, bands, descriptions=None, transform=TRANSFORM, nodata=NODATA):
  with rasterio.open(path, 'w', driver='GTiff', width=bands.shape[2], height=bands.shape[1],
                     count=bands.shape[0], dtype=bands.dtype, crs=CRS, transform=transform,
                     nodata=nodata) as out:
    out.write(bands)
    for i, description in enumerate(descriptions or (), start=1):
      out.set_band_description(i, description)
  return str(path)


@pytest.fixture(scope='module')
def scene(tmp_path_factory):
  """(path of the 12-band scene, its array)."""
  image = scene_array()
  return write_tif(tmp_path_factory.mktemp('scene') / 'scene.tif', image), image


@pytest.fixture(scope='module')
def maps(loaded, scene, tmp_path_factory):
  """{task: (map path, stats)} of the scene."""
  out = {}
  folder = tmp_path_factory.mktemp('maps')
  for task in TASKS:
    path = str(folder / f'{task}.tif')
    out[task] = path, predict.predict_scene(loaded[task], [scene[0]], path, batch_size=8,
                                            progress=False)
  return out


def read_map(path):
  with rasterio.open(path) as src:
    return src.read(1)


def expected_nodata():
  mask = np.zeros((HEIGHT, WIDTH), bool)
  mask[NODATA_ROWS, NODATA_COLS] = True
  for pixel in (ALL_NAN_PIXEL, ZERO_PIXEL, FLOOR_PIXEL):
    mask[pixel] = True
  return mask


def direct_outputs(model_and_vars, image, origins):
  """model.apply on the windows at ``origins`` of ``image`` (12, H, W), cut and quantised here
  as the dataset tiles are (no-data NaN, clipped, float16); a batch of 8 (the mesh's size)."""
  windows = []
  for row, col in origins:
    window = image[:, row:row + 32, col:col + 32].transpose(1, 2, 0).copy()
    window[window == NODATA] = np.nan
    windows.append(np.clip(window, *schema.CLIP_RANGE_DB).astype(np.float16))
  batch = np.stack(windows + [windows[0]] * (8 - len(windows)))
  contract = model_and_vars.contract
  mean, std = np.asarray(contract.mean, np.float32), np.asarray(contract.std, np.float32)
  model = model_and_vars.model

  @jax.jit
  def apply(variables, images):
    return model.apply(variables, preprocess.normalise(images, mean, std)[0])

  with jax.set_mesh(model_and_vars.mesh), nn.logical_axis_rules(model_and_vars.rules):
    return np.asarray(apply(model_and_vars.variables, batch))[:len(origins)]


# --- Window grid and taper --------------------------------------------------------------------


def test_window_grid_clamps_the_last_window_and_tapers_only_shared_edges():
  assert scene_windows.origins(101, 32, 28) == [0, 28, 56, 69]
  assert scene_windows.origins(84, 32, 28) == [0, 28, 52]  # 84 = 3 * 28: clamped onto 52.
  assert scene_windows.origins(20, 32, 28) == [0]  # Smaller than a window: padded.
  windows = list(scene_windows.grid(HEIGHT, WIDTH, 32, 4))
  assert len(windows) == 16 and scene_windows.grid_shape(HEIGHT, WIDTH, 32, 4) == (4, 4)
  assert windows[5] == scene_windows.Window(28, 28, 1, 1)
  ramp = scene_windows.ramp(4)
  np.testing.assert_allclose(ramp, scene_windows.FLOOR + (1 - scene_windows.FLOOR) *
                             np.arange(4) / 4)
  # Neighbours' weights in a shared band sum to the same constant everywhere.
  sums = ramp + ramp[::-1]
  np.testing.assert_allclose(sums, sums[0])
  corner = scene_windows.taper(32, 4, windows[0], (4, 4))
  assert (corner[:28, :28] == 1).all() and corner[31, 31] == ramp[0] ** 2
  inner = scene_windows.taper(32, 4, windows[5], (4, 4))
  rows, cols = scene_windows.core(32, 4, windows[5], (4, 4))
  assert (rows, cols) == (slice(4, 28), slice(4, 28))
  assert (inner[rows, cols] == 1).all() and (inner < 1).sum() == 32 * 32 - 24 * 24
  for overlap in (16, 20, -1):
    with pytest.raises(ValueError, match='half the window'):
      scene_windows.check_overlap(32, overlap)


# --- Maps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('task', TASKS)
def test_map_has_the_scene_grid_no_data_and_is_a_cog(maps, task):
  path, stats = maps[task]
  assert stats['windows'] == 15 and stats['skipped'] == 1
  with rasterio.open(path) as src:
    assert (src.height, src.width) == (HEIGHT, WIDTH)
    assert src.crs == rasterio.crs.CRS.from_string(CRS)
    assert src.transform.almost_equals(TRANSFORM)
    assert src.tags(ns='IMAGE_STRUCTURE')['LAYOUT'] == 'COG'
    assert src.compression == rasterio.enums.Compression.deflate
    assert src.profile['tiled'] and src.overviews(1)
    values = src.read(1)
    if task == 'vcf':
      assert src.dtypes[0] == 'float32' and np.isnan(src.nodata)
      nodata = np.isnan(values)
      assert np.isfinite(values[~nodata]).all()
    else:
      assert src.dtypes[0] == 'uint8' and src.nodata == schema.WORLDCOVER_NODATA_CODE
      nodata = values == schema.WORLDCOVER_NODATA_CODE
      assert set(np.unique(values[~nodata])) <= set(schema.WORLDCOVER_CODES)
      colours = src.colormap(1)
      for code, rgb in zip(schema.WORLDCOVER_CODES, schema.WORLDCOVER_COLORS):
        assert colours[code][:3] == rgb
      names = {k: v for k, v in src.tags(1).items() if k.startswith('CLASS_')}
      assert names == {f'CLASS_{code}': name for code, name in
                       zip(schema.WORLDCOVER_CODES, schema.WORLDCOVER_NAMES)}
      assert names['CLASS_10'] == 'tree_cover' and names['CLASS_80'] == 'permanent_water'
    if task == 'vcf':
      assert not any(k.startswith('CLASS_') for k in src.tags(1))
  np.testing.assert_array_equal(nodata, expected_nodata())
  assert not nodata[PARTIAL_PIXEL]


@pytest.mark.parametrize('task', TASKS)
def test_core_of_an_interior_window_is_its_direct_prediction(loaded, maps, scene, task):
  values = read_map(maps[task][0])
  # Window (1, 1) and its left neighbour (1, 0); core: 4 px in from every edge.
  direct = direct_outputs(loaded[task], scene[1], [(28, 28), (28, 0)])
  core = values[32:56, 32:56]
  if task == 'vcf':
    np.testing.assert_allclose(core, direct[0], rtol=0, atol=1e-4)
    # In the 4 px band shared with the left neighbour, the blend follows the two ramps.
    floor = scene_windows.FLOOR
    for i in range(4):
      right = floor + (1 - floor) * i / 4  # Window (1, 1), i px from its left edge.
      left = floor + (1 - floor) * (3 - i) / 4  # Window (1, 0), 3 - i px from its right edge.
      expected = (left * direct[1] + right * direct[0]) / (left + right)
      np.testing.assert_allclose(values[32:56, 28 + i], expected, rtol=0, atol=1e-4)
    assert np.ptp(values[~np.isnan(values)]) > 0  # Windows do differ.
  else:
    codes = np.asarray(schema.WORLDCOVER_CODES)[direct[0].argmax(-1)]
    np.testing.assert_array_equal(core, codes[4:28, 4:28])


def test_three_four_band_files_and_named_bands_give_the_same_map(loaded, maps, scene, tmp_path):
  image = scene[1]
  parts = [write_tif(tmp_path / f'part{i}.tif', image[4 * i:4 * i + 4]) for i in range(3)]
  predict.predict_scene(loaded['vcf'], parts, str(tmp_path / 'split.tif'), batch_size=8,
                        progress=False)
  # Reversed band order, named by descriptions (case and separators do not matter).
  order = list(range(12))[::-1]
  names = [schema.BAND_NAMES[i].upper().replace('_', ' ') for i in order]
  named = write_tif(tmp_path / 'named.tif', image[order], descriptions=names)
  predict.predict_scene(loaded['vcf'], [named], str(tmp_path / 'named_map.tif'), batch_size=8,
                        progress=False)
  reference = read_map(maps['vcf'][0])
  np.testing.assert_array_equal(read_map(str(tmp_path / 'split.tif')), reference)
  np.testing.assert_array_equal(read_map(str(tmp_path / 'named_map.tif')), reference)


def test_linear_power_input_is_converted_to_db(loaded, maps, scene, tmp_path):
  image = scene[1].astype(np.float64)
  # Fill values stay fill values (nodata, and 0 for the 0 dB fill of ZERO_PIXEL).
  linear = np.where((image == NODATA) | (image == 0), image, 10.0 ** (image / 10.0))
  linear = linear.astype(np.float32)
  path = write_tif(tmp_path / 'linear.tif', linear)
  lines = []
  predict.predict_scene(loaded['vcf'], [path], str(tmp_path / 'map.tif'), batch_size=8,
                        progress=False, log=lines.append)
  assert any('linear power' in line for line in lines)
  np.testing.assert_allclose(read_map(str(tmp_path / 'map.tif')), read_map(maps['vcf'][0]),
                             rtol=1e-3)


# --- Errors ---------------------------------------------------------------------------------------


def test_input_paths_take_plain_arguments_after_one_input_flag():
  assert predict.input_paths(['a.tif'], ['b.tif', 'c.tif']) == ['a.tif', 'b.tif', 'c.tif']
  assert predict.input_paths(['a.tif', 'b.tif'], []) == ['a.tif', 'b.tif']
  with pytest.raises(Exception, match='not both'):
    predict.input_paths(['a.tif', 'c.tif'], ['b.tif'])


def bad_inputs(folder, image):
  """name -> (inputs, output, error type, message pattern)."""
  ok = write_tif(folder / 'ok.tif', image)
  four = write_tif(folder / 'four.tif', image[:4])
  shifted = write_tif(folder / 'shifted.tif', image[:4],
                      transform=TRANSFORM * rasterio.Affine.translation(1, 0))
  names = list(schema.BAND_NAMES[:11]) + ['VV']
  misnamed = write_tif(folder / 'misnamed.tif', image, descriptions=names)
  out = str(folder / 'map.tif')
  return {
      'band count': ([ok, four], out, ValueError,
                     r'16 bands in all \(.*ok.tif: 12, .*four.tif: 4\)'),
      'grids': ([four, shifted, four], out, ValueError,
                r'four.tif and .*shifted.tif are not on one grid: transform'),
      'descriptions': ([misnamed], out, ValueError, r"band 12: 'VV'.*do not name"),
      'missing input': ([ok, str(folder / 'nope.tif')], out, FileNotFoundError, 'nope.tif'),
      'output folder': ([ok], str(folder / 'no_such_dir' / 'map.tif'), FileNotFoundError,
                        'output folder .*no_such_dir.* does not exist'),
  }


def test_bad_inputs_are_clear_errors_and_leave_no_files(finetuned, scene, tmp_path):
  cases = bad_inputs(tmp_path, scene[1])
  before = sorted(os.listdir(tmp_path))
  for name, (inputs, output, error, pattern) in cases.items():
    with pytest.raises(error, match=pattern):
      predict.run(finetuned['vcf'], inputs, output, progress=False)
    assert sorted(os.listdir(tmp_path)) == before, name


def test_pretraining_checkpoint_is_a_clear_error(scene, tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'pretrain' / 'checkpoints'),
                                       async_save=False)
  checkpointer.save(1, {'step': jnp.zeros((), jnp.int32)}, {'task': 'pretrain'}, force=True)
  checkpointer.close()
  with pytest.raises(ValueError, match="'pretrain' checkpoint.*no head; fine-tune it first"):
    predict.run(str(tmp_path / 'pretrain'), [scene[0]], str(tmp_path / 'map.tif'))
  with pytest.raises(FileNotFoundError, match='missing'):
    predict.run(str(tmp_path / 'missing'), [scene[0]], str(tmp_path / 'map.tif'))
  assert sorted(os.listdir(tmp_path)) == ['pretrain']


def test_vcf_refuses_probability_rasters_at_start_up(finetuned, scene, tmp_path,
                                                    monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('the checkpoint was loaded before the outputs were checked')

  monkeypatch.setattr(inference, 'load_downstream', fail)
  out = {name: str(tmp_path / f'{name}.tif') for name in ('map', 'probabilities', 'confidence')}
  # A missing input too: the outputs are refused before the inputs are opened.
  missing = [str(tmp_path / 'missing.tif')]
  for extra, pattern in (({'probabilities': out['probabilities']}, '--probabilities: '),
                         ({'confidence': out['confidence']}, '--confidence: '),
                         ({'probabilities': out['probabilities'], 'confidence': out['confidence']},
                          '--probabilities and --confidence: ')):
    with pytest.raises(ValueError, match=pattern + 'class probability and confidence rasters '
                       'are WorldCover outputs, and this is a VCF model'):
      predict.run(finetuned['vcf'], missing, out['map'], **extra)
  with pytest.raises(ValueError, match="--output and --probabilities name the same file"):
    predict.run(finetuned['worldcover'], [scene[0]], out['map'], probabilities=out['map'])
  with pytest.raises(FileNotFoundError, match='output folder .*nowhere'):
    predict.run(finetuned['worldcover'], [scene[0]], out['map'],
                confidence=str(tmp_path / 'nowhere' / 'c.tif'))
  assert os.listdir(tmp_path) == []


def test_bad_settings_and_a_failed_write_leave_the_old_output(loaded, scene, tmp_path,
                                                               monkeypatch):
  output = tmp_path / 'map.tif'
  output.write_bytes(b'old')
  for kwargs, pattern in (({'overlap': 16}, 'half the window'),
                          ({'batch_size': 12}, 'multiple of the data-parallel size 8')):
    with pytest.raises(ValueError, match=pattern):
      predict.predict_scene(loaded['vcf'], [scene[0]], str(output), progress=False, **kwargs)

  def fail(*args, **kwargs):
    raise RuntimeError('disk full')

  monkeypatch.setattr(rasterio.shutil, 'copy', fail)  # After the sums and the tiled map.
  with pytest.raises(RuntimeError, match='disk full'):
    predict.predict_scene(loaded['worldcover'], [scene[0]], str(output), batch_size=8,
                          progress=False)
  assert os.listdir(tmp_path) == ['map.tif'] and output.read_bytes() == b'old'
  # With probability and confidence rasters (one in another folder): all or nothing.
  other = tmp_path / 'other'
  other.mkdir()
  probabilities, confidence = tmp_path / 'p.tif', other / 'c.tif'
  probabilities.write_bytes(b'old p')
  copies = []

  def fail_third(*args, **kwargs):  # The map and the probabilities are copied, then it fails.
    copies.append(args[1])
    if len(copies) == 3:
      raise RuntimeError('disk full')
    return copy(*args, **kwargs)

  monkeypatch.undo()
  copy = rasterio.shutil.copy
  monkeypatch.setattr(rasterio.shutil, 'copy', fail_third)
  with pytest.raises(RuntimeError, match='disk full'):
    predict.predict_scene(loaded['worldcover'], [scene[0]], str(output), batch_size=8,
                          progress=False, probabilities=str(probabilities),
                          confidence=str(confidence))
  assert len(copies) == 3
  assert sorted(os.listdir(tmp_path)) == ['map.tif', 'other', 'p.tif']
  assert os.listdir(other) == []
  assert output.read_bytes() == b'old' and probabilities.read_bytes() == b'old p'


# --- Command line and memory ------------------------------------------------------------------


def write_int8_parts(folder, size):
  """A size x size scene as three 4-band int8 GeoTIFFs (dB, 64 px tiles, uncompressed: quick to
  write, and GDAL's cache then holds few bytes per pixel)."""
  rng = np.random.default_rng(size)
  vv = rng.integers(-16, -6, (4, 64, 64))
  vh = vv - rng.integers(4, 9, (4, 64, 64))
  tile = np.concatenate([vv - vh, vv, vh]).astype(np.int8)
  paths = []
  for part in range(3):
    path = str(folder / f'part{part}_{size}.tif')
    with rasterio.open(path, 'w', driver='GTiff', width=size, height=size, count=4,
                       dtype='int8', crs=CRS, transform=TRANSFORM, nodata=-128, tiled=True,
                       blockxsize=64, blockysize=64, interleave='pixel') as out:
      for row in range(0, size, 512):
        rows = min(512, size - row)
        strip = np.tile(tile[4 * part:4 * part + 4], (1, 8, size // 64 + 1))[:, :rows, :size]
        out.write(strip, window=rasterio.windows.Window(0, row, size, rows))
    paths.append(path)
  return paths


def run_cli(args):
  """Runs ``python -m mae_jax.tools.predict ARGS`` in a fresh process; (its peak RSS in KB, output)."""
  log = os.path.join(os.path.dirname(args[args.index('--output') + 1]), 'log.txt')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(log, 'w') as f:
    process = subprocess.Popen([sys.executable, '-m', 'mae_jax.tools.predict', *args], cwd=root,
                               stdout=f, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)  # This child's own peak, not the running max.
  with open(log) as f:
    text = f.read()
  os.remove(log)
  assert os.waitstatus_to_exitcode(status) == 0, text
  return usage.ru_maxrss, text


def test_cli_and_peak_memory_does_not_grow_with_the_scene(tmp_path):
  # A 128 px model with random weights (few windows per scene), saved as a fine-tuning checkpoint.
  config = downstream_configs.build('worldcover', 'finetune', 'tiny')
  config.model.encoder.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
  config.head.options = {'channels': 8}
  contract = schema.InputContract(tile_size=128, mean=(6.0,) * 4 + (-11.0,) * 4 + (-17.0,) * 4,
                                  std=(3.0,) * 12)
  inference.save_initialised(config, str(tmp_path / 'model'), contract)
  # 1280^2 and 2560^2 px (144 and 529 windows). Holding the scene would take at least the
  # float16 input (24 B/px) and float32 sums of 11 probabilities and a weight (48 B/px):
  # 118 MB for the small scene and 472 MB for the large one, over a ~0.8 GB baseline (jax, 8
  # CPU devices, batches of 64 windows): a ratio of about 1.4. Streamed, the difference is a
  # few MB (GDAL's cache, sized from the 64 px blocks, never from the scene).
  peaks = {}
  for size in (1280, 2560):
    folder = tmp_path / str(size)
    folder.mkdir()
    parts = write_int8_parts(folder, size)
    output = str(folder / 'map.tif')
    # The literal form: one --input, then the other files as plain arguments. The probability
    # and confidence rasters come from the same sums: memory does not grow with them either.
    peaks[size], text = run_cli(['--checkpoint', str(tmp_path / 'model'), '--input', *parts,
                                 '--output', output, '--noprogress', '--probabilities',
                                 str(folder / 'p.tif'), '--confidence', str(folder / 'c.tif')])
    assert 'windows/s' in text
    with rasterio.open(output) as src:
      assert (src.height, src.width) == (size, size)
      codes = src.read(1, out_shape=(64, 64))
      assert set(np.unique(codes)) <= set(schema.WORLDCOVER_CODES)
    corner = rasterio.windows.Window(0, 0, 64, 64)  # Full resolution (overviews average).
    with rasterio.open(str(folder / 'p.tif')) as src:
      assert (src.count, src.height, src.width) == (schema.NUM_CLASSES, size, size)
      stored = src.read(window=corner)
    with rasterio.open(str(folder / 'c.tif')) as src:
      np.testing.assert_array_equal(src.read(1, window=corner), stored.max(0))
    assert sorted(os.listdir(folder)) == sorted(
        ['c.tif', 'map.tif', 'p.tif'] + [os.path.basename(p) for p in parts])
  assert peaks[2560] <= 1.2 * peaks[1280], peaks
