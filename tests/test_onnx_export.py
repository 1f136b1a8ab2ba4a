"""ONNX export of fine-tuned models (mae_jax.tools.onnx_export, export --format=onnx) and their
STAC MLM item (mae_jax.tools.stac_mlm).

Tiny models of every head (SETR-PUP with and without a final resize, the VCF head, both linear
probes) are written with ``inference.save_initialised``, its initialiser swapped for random
draws of every weight and BatchNorm statistic (an initialised model has unit BatchNorms, zero
biases and unit LayerNorms, which would hide a missing or misplaced op). The truth is mae_jax
itself: ``model.apply`` on the same tiles clipped and normalised by ``preprocess.normalise``, as
prediction does; no-data follows ``mae_jax.tools.predict`` (a pixel without a valid band has no
prediction).

Real tiles come from the BigEarthNet-S1 sample (skipped where absent): the summer VV and VH are
real; the other three seasons are SYNTHETIC copies shifted by fixed dB offsets, as in
tests/test_ingest_real_samples.py, and the NaN pixels are put in here.
"""

import copy
import hashlib
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import downstream as downstream_configs
from data_pipeline import quantise
from data_pipeline import schema
from mae_jax import checkpoint as ckpt_lib
from mae_jax import preprocess
from mae_jax.models import downstream
from mae_jax.tools import export
from mae_jax.tools import inference

onnx = pytest.importorskip('onnx')  # The [onnx] extra.
ort = pytest.importorskip('onnxruntime')
pystac = pytest.importorskip('pystac')
from mae_jax.tools import onnx_export  # pylint: disable=g-import-not-at-top,wrong-import-position
from mae_jax.tools import stac_mlm  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = '/work/shared/samples'
BEN = os.path.join(SAMPLES, 'bigearthnet_s1_tiny')
AUSTRIA = [f'S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_{n}' for n in (39, 40, 41)]
# SYNTHETIC seasons: the real summer acquisition shifted by these dB.
SEASON_OFFSET_DB = {'winter': -1.5, 'spring': 0.5, 'summer': 0.0, 'fall': -0.5}
TOLERANCE = 1e-4  # Max abs difference, onnxruntime vs JAX (logits; percent tree cover).

# name: (task, head kind, tile px, patch px, head options, model overrides).
MODELS = {
    # 2 x 2 tokens, four x2 stages to 32 px: no final resize.
    'worldcover': ('worldcover', 'finetune', 32, 16, {'channels': 8}, {}),
    'vcf': ('vcf', 'finetune', 32, 16, {'hidden': (16, 8)}, {}),
    # 3 x 3 tokens: three stages reach 24 px, then the final resize to 36; learned position
    # embeddings and scanned layers.
    'worldcover_resized': ('worldcover', 'finetune', 36, 12, {'channels': 8},
                           {'pos_embedding': 'learned', 'scan_layers': True}),
    'vcf_probe': ('vcf', 'linear_probe', 32, 8, {'pool': 'mean'}, {}),
    'worldcover_probe': ('worldcover', 'linear_probe', 32, 16, {}, {}),
    # Fine-tuned on uint8 tiles: the graph quantises its input as they were stored.
    'worldcover_uint8': ('worldcover', 'finetune', 32, 16, {'channels': 8}, {}),
}
UINT8_MODELS = ('worldcover_uint8',)
MEAN = (5.5,) * 4 + (-12.0,) * 4 + (-18.5,) * 4
STD = (2.5,) * 4 + (3.5,) * 4 + (4.0,) * 4


def model_config(task, kind, size, patch, head_options, overrides):
  config = downstream_configs.build(task, kind, 'tiny')
  config.model.image_size = size
  config.model.patch_size = patch
  config.model.encoder.update(dict(width=32, depth=2, heads=2, mlp_dim=64))
  config.model.update(overrides)
  config.head.options = head_options
  config.mesh.num_devices = 1
  return config


def random_init_fn(seed, gain):
  """A stand-in for ``downstream.init_variables_fn`` that draws every variable at random.

  Random weights and BatchNorm statistics (means off 0, variances far from 1) leave no identity
  for a missing or misplaced op to hide behind. Kernels are scaled by their fan-in (times
  ``gain``) and biases are small, so activations stay in range and keep their spatial
  variation through the head: a saturated sigmoid or a one-class map would agree with anything.
  Drawn in numpy: nothing for XLA to compile.
  """
  real = downstream.init_variables_fn

  def init_variables_fn(model):
    abstract = jax.eval_shape(real(model), jax.random.key(0))  # Boxed, with axis names.
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
      # The variable's name: the last dict key (boxed params add an attribute after it).
      name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
      shape = leaf.shape
      if name == 'var':
        value = rng.uniform(0.3, 3.0, shape)
      elif name == 'scale':
        value = rng.uniform(0.5, 1.5, shape)
      elif len(shape) >= 2:
        value = rng.normal(0.0, gain * (np.prod(shape) / shape[-1])**-0.5, shape)
      else:  # Biases and BatchNorm means.
        value = rng.normal(0.0, 0.1, shape)
      return jnp.asarray(value, leaf.dtype)

    values = jax.tree_util.tree_map_with_path(draw, abstract)
    return lambda rng_key: values

  return init_variables_fn


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """{name: (restored model, export folder)} for every entry of MODELS."""
  out = {}
  for seed, (name, (task, kind, size, patch, options, overrides)) in enumerate(MODELS.items()):
    folder = tmp_path_factory.mktemp(name)
    contract = schema.InputContract(tile_size=size, mean=MEAN, std=STD)
    if name in UINT8_MODELS:
      contract = contract.with_storage('uint8')
    with pytest.MonkeyPatch.context() as patch_init:
      # Gain 2 keeps the SETR-PUP maps varied through four ReLU stages; 1 keeps the VCF head's
      # sigmoid out of saturation.
      patch_init.setattr(downstream, 'init_variables_fn',
                         random_init_fn(seed, 2.0 if task == 'worldcover' else 1.0))
      inference.save_initialised(model_config(task, kind, size, patch, options, overrides),
                                 str(folder / 'run'), contract)
    export.export_onnx(str(folder / 'run'), str(folder / 'onnx'))
    loaded = inference.load_downstream(str(folder / 'run'), mesh_config={'num_devices': 1})
    out[name] = loaded, str(folder / 'onnx')
  return out


_SESSIONS = {}


def session(folder):
  """An onnxruntime session of ``folder``/model.onnx, one per folder (each test's is fresh)."""
  if folder not in _SESSIONS:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    _SESSIONS[folder] = ort.InferenceSession(os.path.join(folder, 'model.onnx'), options,
                                             providers=['CPUExecutionProvider'])
  return _SESSIONS[folder]


def run_onnx(folder, tiles):
  sess = session(folder)
  names = [o.name for o in sess.get_outputs()]
  return dict(zip(names, sess.run(None, {'backscatter_db': tiles})))


_APPLY = {}


def jax_output(loaded, tiles, quantised=True):
  """mae_jax's output for raw dB tiles: clipped as tiles are made (and for a uint8 model
  through its codes, unless not ``quantised``), normalised, applied in float32 (the graph's
  precision, whatever dtype a run trains in)."""
  contract = loaded.contract
  clipped = np.clip(tiles, *contract.clip_range)
  form = quantise.form_of(contract)
  if form.is_codes and quantised:
    clipped = form.round_trip(clipped)
  normalised, valid = preprocess.normalise(clipped, np.asarray(contract.mean),
                                           np.asarray(contract.std))
  if loaded.model not in _APPLY:
    _APPLY[loaded.model] = jax.jit(loaded.model.clone(dtype=jnp.float32).apply)
  # One tile at a time: one compiled program per model serves every batch size (in eval mode
  # no tile affects another).
  out = np.concatenate([_APPLY[loaded.model](loaded.variables, tile[None])
                        for tile in np.asarray(normalised)])
  return out, np.asarray(valid).any(axis=-1)


def synthetic_tiles(batch, size, seed):
  """Random dB tiles with NaN pixels and values beyond the clip range."""
  rng = np.random.default_rng(seed)
  tiles = (np.asarray(MEAN) + np.asarray(STD) * rng.standard_normal((batch, size, size, 12)))
  tiles = tiles.astype(np.float32)
  tiles[0, 3, 4] = np.nan  # No valid band: no-data.
  tiles[0, 5, 6, :5] = np.nan  # Some bands missing: still valid.
  tiles[-1, 10:14, 20:26] = np.nan
  tiles[-1, 0, 0, 5] = -80.0  # Below the -50 dB floor: clipped.
  tiles[0, 1, 1, 7] = 45.0  # Above +30 dB: clipped.
  return tiles


def real_tiles(batch, size):
  """Crops of the real Austrian patches, 12 bands (three seasons SYNTHETIC), with NaN pixels."""
  import rasterio  # pylint: disable=g-import-not-at-top
  tiles = []
  for i in range(batch):
    patch = AUSTRIA[i % len(AUSTRIA)]
    row, col = 7 + 23 * i, 50 - 17 * i
    read = {}
    for polarisation in ('VV', 'VH'):
      with rasterio.open(os.path.join(BEN, patch, f'{patch}_{polarisation}.tif')) as f:
        read[polarisation] = f.read(1)[row:row + size, col:col + size].astype(np.float32)
    bands = {}
    for season in schema.SEASONS:
      vv = read['VV'] + np.float32(SEASON_OFFSET_DB[season])
      vh = read['VH'] + np.float32(SEASON_OFFSET_DB[season])
      bands.update({f'vv_{season}': vv, f'vh_{season}': vh, f'vv_minus_vh_{season}': vv - vh})
    tiles.append(np.stack([bands[name] for name in schema.BAND_NAMES], axis=-1))
  tiles = np.stack(tiles)
  tiles[0, 2, 3] = np.nan
  tiles[0, 8, 9, 4:] = np.nan
  tiles[-1, 20:24, 4:12] = np.nan
  return tiles


def check_parity(loaded, folder, tiles):
  """Every output of the graph against mae_jax on ``tiles``; returns the max abs difference."""
  ours = run_onnx(folder, tiles)
  truth, pixel_valid = jax_output(loaded, tiles)
  if loaded.task == 'vcf':
    assert list(ours) == ['tree_cover_percent'] and ours['tree_cover_percent'].shape == (
        len(tiles),)
    np.testing.assert_allclose(ours['tree_cover_percent'], truth, rtol=0, atol=TOLERANCE)
    # Not the same for every tile, and the fine-tuning head's sigmoid not saturated: the
    # comparison means something.
    assert np.ptp(truth) > 0.5, truth
    if loaded.model.head_kind == 'finetune':
      assert 1.0 < truth.min() and truth.max() < 99.0, truth
    return float(np.abs(ours['tree_cover_percent'] - truth).max())
  assert list(ours) == ['class_logits', 'class_probabilities', 'worldcover_code']
  np.testing.assert_allclose(ours['class_logits'], truth, rtol=0, atol=TOLERANCE)
  probabilities = np.asarray(jax.nn.softmax(truth, axis=-1))
  np.testing.assert_allclose(ours['class_probabilities'][pixel_valid],
                             probabilities[pixel_valid], rtol=0, atol=TOLERANCE)
  assert np.isnan(ours['class_probabilities'][~pixel_valid]).all()
  codes = np.where(pixel_valid, np.asarray(schema.WORLDCOVER_CODES)[truth.argmax(-1)],
                   schema.WORLDCOVER_NODATA_CODE)
  # Where the two best logits are closer than the tolerance, either class is right.
  top2 = np.sort(truth, axis=-1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > TOLERANCE
  assert ours['worldcover_code'].dtype == np.uint8
  np.testing.assert_array_equal(ours['worldcover_code'][clear], codes[clear])
  assert len(np.unique(codes[pixel_valid])) >= 3  # A map, not one class everywhere.
  return float(np.abs(ours['class_logits'] - truth).max())


@pytest.mark.parametrize('name', list(MODELS))
@pytest.mark.parametrize('batch', [2, 3])
def test_onnx_matches_jax_on_synthetic_tiles(models, name, batch):
  loaded, folder = models[name]
  check_parity(loaded, folder, synthetic_tiles(batch, loaded.model.image_size, seed=batch))


@pytest.mark.skipif(not os.path.isdir(BEN), reason='BigEarthNet sample not present')
@pytest.mark.parametrize('name', ['worldcover', 'vcf'])
@pytest.mark.parametrize('batch', [2, 3])
def test_onnx_matches_jax_on_real_tiles(models, name, batch):
  loaded, folder = models[name]
  tiles = real_tiles(batch, loaded.model.image_size)
  finite = tiles[np.isfinite(tiles)]
  assert -40 < finite.min() and finite.max() < 30 and np.isnan(tiles).any()
  check_parity(loaded, folder, tiles)


def test_a_uint8_model_rounds_its_input_to_the_codes_of_its_tiles(models):
  loaded, folder = models['worldcover_uint8']
  assert loaded.contract.storage_dtype == 'uint8'
  tiles = synthetic_tiles(2, loaded.model.image_size, seed=11)
  tiles[0, :8, :8, schema.band_index('vv', 'summer')] = 22.0  # Above VV's code range (15 dB).
  ours = run_onnx(folder, tiles)['class_logits']
  truth, _ = jax_output(loaded, tiles)
  np.testing.assert_allclose(ours, truth, rtol=0, atol=TOLERANCE)
  # Not vacuous: without the uint8 round trip mae_jax gives other logits.
  unquantised, _ = jax_output(loaded, tiles, quantised=False)
  assert np.abs(unquantised - truth).max() > 10 * TOLERANCE
  description = onnx_export.input_spec(32, loaded.contract).description
  assert 'uint8 code range' in description and '(-45, 5)' in description


def test_no_data_gives_no_prediction(models):
  size = MODELS['worldcover'][2]
  tiles = synthetic_tiles(2, size, seed=7)
  tiles[1] = np.nan  # A tile without any valid pixel.
  tiles[0, 9, 9] = np.inf  # Non-finite is no-data, as in preprocess.normalise.
  worldcover = run_onnx(models['worldcover'][1], tiles)
  assert (worldcover['worldcover_code'][1] == schema.WORLDCOVER_NODATA_CODE).all()
  assert np.isnan(worldcover['class_probabilities'][1]).all()
  for pixel in ((3, 4), (9, 9)):
    assert worldcover['worldcover_code'][0][pixel] == schema.WORLDCOVER_NODATA_CODE
  assert worldcover['worldcover_code'][0][5, 6] in schema.WORLDCOVER_CODES  # Bands missing.
  assert (worldcover['worldcover_code'][0] != schema.WORLDCOVER_NODATA_CODE).sum() == size**2 - 2
  np.testing.assert_allclose(np.nansum(worldcover['class_probabilities'][0], -1)[
      worldcover['worldcover_code'][0] > 0], 1.0, atol=1e-5)
  vcf = run_onnx(models['vcf'][1], tiles)['tree_cover_percent']
  assert np.isnan(vcf[1]) and 0.0 <= vcf[0] <= 100.0


def test_graph_passes_the_checker_and_holds_the_weights_once(models):
  for name, (loaded, folder) in models.items():
    path = os.path.join(folder, 'model.onnx')
    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path)
    assert [o.version for o in model.opset_import] == [onnx_export.OPSET]
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == 'batch'
    assert [d.dim_value for d in dims[1:]] == [loaded.model.image_size] * 2 + [12]
    weights = sum(np.size(leaf) for leaf in jax.tree.leaves(loaded.variables['params'])) * 4
    # Weights once (q, k and v fused, BatchNorm folded), plus small constants (a sin-cos
    # position table, shapes) and the graph itself.
    assert weights <= os.path.getsize(path) <= 1.02 * weights + 64 * 1024, name
    # The export's own names for the files it writes are the graph builder's.
    assert (export.ONNX_FILE, export.ONNX_DATA_FILE) == (onnx_export.MODEL_FILE,
                                                         onnx_export.EXTERNAL_DATA_FILE)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata['mae_jax:task'] == loaded.task
    assert schema.InputContract.from_dict(
        json.loads(metadata['mae_jax:input_contract'])) == loaded.contract


def offline(monkeypatch):
  """Any connection attempt fails: schemas must come from the vendored copies."""
  def refuse(*_, **__):
    raise OSError('network access during a test')
  monkeypatch.setattr(socket.socket, 'connect', refuse)


def test_mlm_item_validates_offline_and_describes_the_model(models, monkeypatch):
  from pystac.extensions import mlm  # pylint: disable=g-import-not-at-top
  offline(monkeypatch)
  for name, (loaded, folder) in models.items():
    with open(os.path.join(folder, 'item.json')) as f:
      item = pystac.Item.from_dict(json.load(f))
    assert stac_mlm.validate(item) == [
        'https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/item.json',
        stac_mlm.MLM_SCHEMA, stac_mlm.RASTER_SCHEMA, stac_mlm.FILE_SCHEMA], name
    size = loaded.model.image_size
    ext = mlm.MLMExtension.ext(item)
    (model_input,) = ext.input
    assert model_input.bands == list(schema.BAND_NAMES) and model_input.name == 'backscatter_db'
    assert model_input.input.shape == [-1, size, size, 12]
    assert model_input.value_scaling is None  # Normalised inside the graph.
    graph_outputs = {o.name: o.shape for o in session(folder).get_outputs()}
    assert {o.name: [-1] + o.result.shape[1:] for o in ext.output} == {
        k: [-1] + v[1:] for k, v in graph_outputs.items()}
    asset = item.assets['model']
    assert asset.href == 'model.onnx' and 'mlm:model' in asset.roles
    with open(os.path.join(folder, 'model.onnx'), 'rb') as f:
      data = f.read()
    assert asset.extra_fields['file:checksum'] == '1220' + hashlib.sha256(data).hexdigest()
    assert asset.extra_fields['file:size'] == len(data)
    bands = asset.extra_fields['raster:bands']
    assert [(b['name'], b['unit'], b['statistics']['mean'], b['statistics']['stddev'])
            for b in bands] == list(zip(schema.BAND_NAMES, ['dB'] * 12, MEAN, STD))
    assert item.properties[export.ITEM_MARKER] == loaded.checkpoint
    assert item.properties['mae_jax:step'] == loaded.step == 0
    if loaded.task == 'worldcover':
      codes = {o.name: [c.value for c in o.classes] for o in ext.output}
      assert codes['worldcover_code'] == list(schema.WORLDCOVER_CODES) + [0]
      assert codes['class_logits'] == list(range(schema.NUM_CLASSES))
    else:
      assert [o.name for o in ext.output] == ['tree_cover_percent']
      assert item.properties['mlm:tasks'] == ['regression']


def _drop(key, from_asset=False):
  """A change to an item's dict that removes one field of its properties or model asset."""
  def drop(item):
    del (item['assets']['model'] if from_asset else item['properties'])[key]
  return drop


# Ways to break an item, each against a different rule of the MLM, raster or file schema.
BREAKS = {
    'no mlm:input': _drop('mlm:input'),
    'no mlm:name': _drop('mlm:name'),
    'model asset without mlm:artifact_type': _drop('mlm:artifact_type', from_asset=True),
    'output data type not a raster type': lambda item: item['properties']['mlm:output'][0][
        'result'].update(data_type='float'),
    'checksum not hex': lambda item: item['assets']['model'].update(
        {'file:checksum': 'not hex'}),
    'band not named': lambda item: item['properties']['mlm:input'][0].update(bands=[3]),
}


@pytest.mark.parametrize('breaks', list(BREAKS))
def test_a_broken_item_fails_validation(models, monkeypatch, breaks):
  offline(monkeypatch)
  with open(os.path.join(models['worldcover'][1], 'item.json')) as f:
    item = json.load(f)
  broken = copy.deepcopy(item)
  BREAKS[breaks](broken)
  with pytest.raises(pystac.errors.STACValidationError):
    stac_mlm.validate(pystac.Item.from_dict(broken))
  stac_mlm.validate(pystac.Item.from_dict(item))  # The intact item still passes.


def test_export_refuses_a_pretraining_checkpoint(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'pretrain' / 'checkpoints'),
                                       async_save=False)
  checkpointer.save(1, {'step': jnp.zeros((), jnp.int32)}, {'task': 'pretrain'}, force=True)
  checkpointer.close()
  with pytest.raises(ValueError, match=r"'pretrain' checkpoint, which has no head: "
                     r'--format=onnx exports a fine-tuned model'):
    export.export_onnx(str(tmp_path / 'pretrain'), str(tmp_path / 'out'))
  assert os.listdir(tmp_path) == ['pretrain']


def test_overwrite_replaces_only_an_export(models, tmp_path):
  loaded, _ = models['vcf']
  run = os.path.dirname(os.path.dirname(loaded.checkpoint))
  out = tmp_path / 'onnx'
  export.export_onnx(run, str(out))
  with pytest.raises(FileExistsError, match=r'exists; pass --overwrite'):
    export.export_onnx(run, str(out))
  assert export.export_onnx(run, str(out), overwrite=True) == str(out)
  assert sorted(os.listdir(out)) == ['item.json', 'model.onnx']
  (out / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError, match=r'not part of a mae_jax export \(notes\.txt\)'):
    export.export_onnx(run, str(out), overwrite=True)
  (out / 'notes.txt').unlink()
  (out / 'item.json').write_text(json.dumps({'type': 'Feature', 'properties': {}}))
  with pytest.raises(FileExistsError, match=r'item\.json without the "mae_jax:checkpoint"'):
    export.export_onnx(run, str(out), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['onnx']  # No temporary folder left.


def test_large_weights_go_to_an_external_data_file(models, tmp_path, monkeypatch):
  loaded, _ = models['worldcover']
  monkeypatch.setattr(onnx_export, 'EXTERNAL_DATA_BYTES', 0)
  out = str(tmp_path / 'onnx')
  export.export_onnx(os.path.dirname(os.path.dirname(loaded.checkpoint)), out)
  assert sorted(os.listdir(out)) == ['item.json', 'model.onnx', 'model.onnx.data']
  assert os.path.getsize(os.path.join(out, 'model.onnx')) < 64 * 1024
  check_parity(loaded, out, synthetic_tiles(2, loaded.model.image_size, seed=3))
  with open(os.path.join(out, 'item.json')) as f:
    item = pystac.Item.from_dict(json.load(f))
  stac_mlm.validate(item)
  assert item.assets['weights'].href == 'model.onnx.data'
  assert item.assets['weights'].extra_fields['file:size'] == os.path.getsize(
      os.path.join(out, 'model.onnx.data'))


def test_cli_prints_one_line(models, tmp_path):
  loaded, _ = models['worldcover']
  run = os.path.dirname(os.path.dirname(loaded.checkpoint))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'

  def cli(*args):
    done = subprocess.run([sys.executable, '-m', 'mae_jax.tools.export', '--checkpoint', run,
                           *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    return done.returncode, [l for l in (done.stdout + done.stderr).splitlines() if l.strip()]

  code, lines = cli('--output', str(tmp_path / 'onnx'), '--format', 'onnx')
  assert code == 0, lines
  assert lines == [f'Wrote {tmp_path}/onnx/model.onnx and item.json '
                   '(onnxruntime.InferenceSession; STAC MLM item)']
  code, lines = cli('--output', str(tmp_path / 'onnx'), '--format', 'onnx')
  assert code == 1
  assert lines == [f'mae_jax.tools.export: error: {tmp_path}/onnx exists; pass --overwrite '
                   '(overwrite=True) to replace it']
  code, lines = cli('--output', str(tmp_path / 'other'), '--format', 'onnx', '--part', 'encoder')
  assert code == 1
  assert lines == ['mae_jax.tools.export: error: --part applies to --format=safetensors; '
                   '--format=onnx exports the whole fine-tuned model (encoder + head)']
  assert sorted(os.listdir(tmp_path)) == ['onnx']
