"""Storage forms of the images (data_pipeline.quantise): float16 dB and uint8 codes.

Truths: codes computed by hand from the schema's ranges; the float16 twin of a uint8 dataset
(the same synthetic tiles, written both ways) read through the normal reader; numpy's own
z-scores; a direct model pass on inputs prepared here. The uint8 twin of the session dataset is
built once per module.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from configs import downstream as downstream_configs
from data_pipeline import build_synthetic
from data_pipeline import example_codec
from data_pipeline import input as data_input
from data_pipeline import quantise
from data_pipeline import schema
from mae_jax import preprocess
from mae_jax.models import mae
from tests.conftest import TILE_SIZE
from tests.conftest import make_tiny_config

UINT8 = schema.InputContract().with_storage(schema.UINT8)
FORM = quantise.form_of(UINT8)
VV, VH, RATIO = (schema.band_index(p, 'summer') for p in ('vv', 'vh', 'vv_minus_vh'))
# float16 rounds a value below 64 dB in magnitude by at most half its spacing there (2^-5 / 2).
FLOAT16_ERROR = 2.0 ** -6


# --- Encoding and decoding, by hand ---------------------------------------------------------


def test_uint8_ranges_are_the_schema_products_and_steps_are_range_over_254():
  assert UINT8.code_min[VV] == -35.0 and UINT8.code_max[VV] == 15.0
  assert UINT8.code_min[VH] == -45.0 and UINT8.code_max[VH] == 5.0
  assert UINT8.code_min[RATIO] == -10.0 and UINT8.code_max[RATIO] == 25.0
  np.testing.assert_allclose(FORM.step[[VV, VH, RATIO]], [50 / 254, 50 / 254, 35 / 254])
  np.testing.assert_allclose(FORM.max_error(12)[[VV, RATIO]], [25 / 254, 17.5 / 254])


def test_encode_by_hand_range_ends_clipping_nodata_and_rounding():
  step = 50.0 / 254.0
  # VV: range ends, beyond them, mid-range, the two sides of a rounding boundary, NaN.
  values = np.array([-35.0, 15.0, -80.0, 40.0, -10.0, -35.0 + 0.49 * step,
                     -35.0 + 0.51 * step, np.nan])
  image = np.full((len(values), 12), -20.0)
  image[:, VV] = values
  codes = FORM.encode(image)
  assert codes.dtype == np.uint8
  # -10 dB is 25 dB above -35: 127 steps above code 1.
  np.testing.assert_array_equal(codes[:, VV], [1, 255, 1, 255, 128, 1, 2, 0])
  decoded = FORM.decode(codes)
  assert decoded.dtype == np.float32
  np.testing.assert_allclose(decoded[:7, VV], [-35.0, 15.0, -35.0, 15.0, -10.0, -35.0,
                                               -35.0 + step], atol=1e-5)
  assert np.isnan(decoded[7, VV]) and not np.isnan(decoded[7, VH])  # No-data per channel.
  # VH at -20 dB: 25 dB above -45, code 128 as well; VV-VH at -20 dB is clipped to -10.
  assert codes[0, VH] == 128 and codes[0, RATIO] == 1


def test_round_trip_error_is_at_most_half_a_step_and_codes_are_monotone():
  rng = np.random.default_rng(0)
  low, high = np.asarray(UINT8.code_min), np.asarray(UINT8.code_max)
  image = rng.uniform(low, high, (20000, 12))
  error = np.abs(FORM.round_trip(image) - image)
  assert (error <= FORM.step / 2 + 1e-5).all()
  assert (error.max(0) > 0.9 * FORM.step / 2).all()  # Not vacuous: the bound is reached.
  ordered = np.sort(rng.uniform(-60.0, 40.0, (5000, 12)), axis=0)
  codes = FORM.encode(ordered).astype(int)
  assert (np.diff(codes, axis=0) >= 0).all()
  assert codes.min() == 1 and codes.max() == 255


def test_float16_form_clips_and_casts():
  image = np.array([[-70.0, 35.0, -12.3456, np.nan]]).repeat(3, 0).T
  stored = quantise.FLOAT16.encode(image)
  assert stored.dtype == np.float16
  np.testing.assert_array_equal(stored[:3, 0], np.float16([-50.0, 30.0, -12.3456]))
  assert np.isnan(stored[3]).all()
  decoded = quantise.FLOAT16.decode(stored)
  assert decoded.dtype == np.float32 and np.isnan(decoded[3]).all()
  assert abs(decoded[2, 0] + 12.3456) <= quantise.FLOAT16.max_error(3)[0]


def test_decoding_with_the_wrong_form_is_a_clear_error():
  with pytest.raises(ValueError, match='stored as uint8 codes'):
    FORM.decode(np.zeros((2, 12), np.float16))
  with pytest.raises(ValueError, match='stored as float16'):
    quantise.FLOAT16.decode(np.zeros((2, 12), np.uint8))
  with pytest.raises(ValueError, match='11 channels'):
    FORM.encode(np.zeros((2, 11)))


def test_contract_storage_fields_validate_and_survive_json():
  assert UINT8.storage_dtype == 'uint8' and UINT8.nodata == 'code 0'
  again = schema.InputContract.from_dict(json.loads(json.dumps(UINT8.to_dict())))
  assert again == UINT8 and quantise.form_of(again) == FORM
  assert UINT8.with_storage('float16') == schema.InputContract()
  with pytest.raises(ValueError, match='code_min and code_max'):
    dataclasses.replace(UINT8, code_min=(), code_max=())
  with pytest.raises(ValueError, match='for uint8 storage'):
    dataclasses.replace(schema.InputContract(), code_min=UINT8.code_min,
                        code_max=UINT8.code_max)
  with pytest.raises(ValueError, match='within clip_range'):
    dataclasses.replace(UINT8, clip_range=(-40.0, 30.0))
  with pytest.raises(ValueError, match="'int16' is not one of"):
    schema.InputContract(storage_dtype='int16')
  with pytest.raises(ValueError, match='no 8-bit storage'):
    schema.InputContract(band_names=('hh_summer',)).with_storage('uint8')


def test_a_storage_difference_is_accepted_and_named_others_are_refused():
  float16 = schema.InputContract()
  assert float16.differences(UINT8) == []
  note = float16.storage_differences(UINT8)
  assert 'float16' in note and 'uint8 codes over' in note and '(-45, 5)' in note
  assert float16.storage_differences(float16.with_storage('float16')) == ''
  clipped = dataclasses.replace(UINT8, clip_range=(-45.0, 25.0))
  assert [d.split(':')[0] for d in float16.differences(clipped)] == ['clip_range']
  # The fine-tuned model records its data's storage form, with the pretrained statistics.
  pretrained = dataclasses.replace(float16, mean=(1.0,) * 12, std=(2.0,) * 12)
  mixed = pretrained.storage_of(UINT8)
  assert mixed.storage_dtype == 'uint8' and mixed.mean == pretrained.mean


def test_the_readers_bad_record_fill_is_the_nodata_code():
  # data_pipeline.example_codec fills a bad record's raw unsigned tensors with 0: for a uint8
  # image that is code 0, no-data, as NaN is for float16.
  codecs = [example_codec.Codec(schema.IMAGE, example_codec.RAW, (4, 4, 12), np.dtype(np.uint8))]
  out = {schema.IMAGE: np.full((2, 4, 4, 12), 77, np.uint8)}
  example_codec.fill_missing(codecs, out, 1)
  assert np.isnan(FORM.decode(out[schema.IMAGE][1])).all()
  assert not np.isnan(FORM.decode(out[schema.IMAGE][0])).any()


# --- A dataset written both ways --------------------------------------------------------------


@pytest.fixture(scope='module')
def uint8_dataset(tiny_dataset, tmp_path_factory):
  """The session dataset's tiles (same seed, sizes and shards) stored as uint8 codes."""
  path = str(tmp_path_factory.mktemp('data') / 'synthetic32_uint8')
  build_synthetic.build(path, tile_size=TILE_SIZE, train=64, validation=16, test=16,
                        num_shards=8, seed=0, storage='uint8')
  return path


def read_all(data_dir, split='train'):
  dataset = data_input.HostDataset(data_dir, split)
  batch = next(dataset.eval_batches(dataset.num_examples))
  return dataset.contract, batch[schema.IMAGE]


def test_uint8_dataset_decodes_to_the_float16_twin_within_half_a_step(tiny_dataset,
                                                                      uint8_dataset):
  contract16, images16 = read_all(tiny_dataset)
  contract8, images8 = read_all(uint8_dataset)
  assert images8.dtype == np.uint8 and images16.dtype == np.float16
  assert images8.nbytes * 2 == images16.nbytes
  assert contract8.storage_dtype == 'uint8' and contract8.code_min == UINT8.code_min
  form = quantise.form_of(contract8)
  decoded = form.decode(images8)
  reference = np.clip(images16.astype(np.float32), UINT8.code_min, UINT8.code_max)
  np.testing.assert_array_equal(np.isnan(decoded), np.isnan(reference))
  error = np.abs(decoded - reference)[~np.isnan(reference)].reshape(-1)
  assert error.max() <= form.step.max() / 2 + FLOAT16_ERROR
  # Statistics are those of the decoded values, in float64 here.
  values = decoded.reshape(-1, 12).astype(np.float64)
  np.testing.assert_allclose(contract8.mean, np.nanmean(values, 0), rtol=1e-6)
  np.testing.assert_allclose(contract8.std, np.nanstd(values, 0), rtol=1e-5)
  assert np.abs(np.subtract(contract8.mean, contract16.mean)).max() < 0.05


def test_normalised_device_batches_agree_within_the_quantisation_step(tiny_dataset,
                                                                      uint8_dataset):
  contract16, images16 = read_all(tiny_dataset, 'validation')
  _, images8 = read_all(uint8_dataset, 'validation')
  mean, std = np.asarray(contract16.mean, np.float32), np.asarray(contract16.std, np.float32)
  normalise = jax.jit(preprocess.normalise, static_argnums=(3,))
  z8, valid8 = jax.device_get(normalise(images8, mean, std, FORM))
  z16, valid16 = jax.device_get(normalise(images16, mean, std, quantise.FLOAT16))
  np.testing.assert_array_equal(valid8, valid16)
  # numpy's z-score of the float16 values, clipped to the code ranges: the uint8 batch differs
  # from it by rounding only.
  clipped = np.clip(images16.astype(np.float64), UINT8.code_min, UINT8.code_max)
  expected = np.where(valid16, (clipped - mean) / std, 0.0)
  bound = (FORM.step / 2 + FLOAT16_ERROR) / std + 1e-5
  assert (np.abs(z8 - expected) <= bound).all()
  inside = valid16 & (clipped == images16.astype(np.float64))
  assert (np.abs(z8 - z16)[inside] <= np.broadcast_to(bound, z8.shape)[inside]).all()
  # The patch layout of the pretraining step decodes the same values.
  patches, patch_valid = jax.device_get(jax.jit(
      preprocess.normalise_patches, static_argnums=(1, 4))(images8, 8, mean, std, FORM))
  np.testing.assert_array_equal(patches, np.asarray(mae.patchify(z8, 8)))
  np.testing.assert_array_equal(patch_valid, np.asarray(mae.patchify(valid8, 8)))


# --- Models across storage forms ----------------------------------------------------------------


@pytest.mark.integration
def test_pretrain_on_uint8_finetune_on_uint8_and_evaluate_on_float16(pretrained, uint8_dataset,
                                                                     tiny_dataset, tmp_path,
                                                                     capsys):
  from configs import evaluate as evaluate_configs  # pylint: disable=g-import-not-at-top
  from mae_jax.trainers import evaluate  # pylint: disable=g-import-not-at-top
  from mae_jax.trainers import finetune  # pylint: disable=g-import-not-at-top
  from mae_jax.trainers import pretrain  # pylint: disable=g-import-not-at-top
  # Pretraining reads uint8 batches and records their contract.
  config = make_tiny_config(uint8_dataset)
  config.total_steps = 2
  metrics = pretrain.train_and_evaluate(config, str(tmp_path / 'pretrain'))
  assert np.isfinite(metrics['loss'])
  # The float16-pretrained encoder fine-tunes on uint8 data: accepted, with a note.
  workdir, pre = pretrained
  config = downstream_configs.build('vcf', 'finetune', 'tiny')
  config.model = ml_collections.ConfigDict(pre.model.to_dict())
  config.model.drop_path_rate = 0.0
  config.dataset.data_dir = uint8_dataset
  config.dataset.shuffle_buffer = 16
  config.head.options = {'hidden': (16, 8)}
  config.init_checkpoint = workdir
  config.batch_size = 8
  config.total_steps = 2
  config.eval_every_steps = 2
  config.checkpoint.async_save = False
  run = str(tmp_path / 'finetune')
  results = finetune.finetune(config, run)
  out = capsys.readouterr().out
  assert 'pretrained on data stored as float16 dB' in out and 'uint8 codes over' in out
  assert np.isfinite(results['splits']['test'][evaluate.ALL]['rmse'])
  from mae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  saved = schema.InputContract.from_dict(ckpt_lib.read_metadata(
      *ckpt_lib.locate(run))['input_contract'])
  pretrained_contract = data_input.HostDataset(tiny_dataset, 'train').contract
  assert saved.storage_dtype == 'uint8' and saved.mean == pretrained_contract.mean
  # Evaluated offline on the float16 twin: accepted, decoded as float16, nearly the same loss.
  eval_config = evaluate_configs.get_config()
  eval_config.checkpoint = run
  eval_config.data_dir = tiny_dataset
  eval_config.splits = ('test',)
  offline = evaluate.evaluate_checkpoint(eval_config, str(tmp_path / 'eval'))
  assert f'{tiny_dataset} is stored as float16 dB' in capsys.readouterr().out
  assert offline['splits']['test'][evaluate.ALL]['loss'] == pytest.approx(
      results['splits']['test'][evaluate.ALL]['loss'], rel=0.05)


@pytest.mark.integration
def test_api_predict_of_a_uint8_model_quantises_windows_through_uint8(uint8_dataset, tmp_path):
  import mae_jax  # pylint: disable=g-import-not-at-top
  from mae_jax.tools import inference  # pylint: disable=g-import-not-at-top
  contract = data_input.HostDataset(uint8_dataset, 'train').contract
  config = downstream_configs.build('worldcover', 'finetune', 'tiny')
  config.model = ml_collections.ConfigDict(make_tiny_config(uint8_dataset).model.to_dict())
  config.model.drop_path_rate = 0.0
  config.head.options = {'channels': 8}
  inference.save_initialised(config, str(tmp_path / 'model'), contract)
  model = mae_jax.load(str(tmp_path / 'model'))
  rng = np.random.default_rng(3)
  tiles = np.concatenate([rng.normal(6.0, 6.0, (4, 32, 32, 4)),
                          rng.normal(-11.0, 6.0, (4, 32, 32, 4)),
                          rng.normal(-20.0, 6.0, (4, 32, 32, 4))], axis=-1).astype(np.float32)
  tiles[0, :5] = np.nan
  tiles[1, :, :, VV] = 25.0  # Above the VV code range: code 255 = 15 dB.
  prepared = model._prepare(tiles, 'dB')  # pylint: disable=protected-access
  assert prepared.dtype == np.uint8
  np.testing.assert_array_equal(prepared, FORM.encode(tiles))
  result = model.predict(tiles)
  # A direct pass on the uint8 round trip of the tiles, normalised here with numpy.
  loaded = inference.load_downstream(str(tmp_path / 'model'))
  decoded = FORM.round_trip(tiles).astype(np.float64)
  mean, std = np.asarray(contract.mean), np.asarray(contract.std)
  def apply(normalised):
    with jax.set_mesh(loaded.mesh), nn.logical_axis_rules(loaded.rules):
      logits = jax.jit(loaded.model.apply)(loaded.variables, normalised.astype(np.float32))
    return np.asarray(jax.nn.softmax(logits, -1))

  direct = apply(np.where(np.isnan(decoded), 0.0, (decoded - mean) / std))
  valid = np.isfinite(tiles).any(-1)
  np.testing.assert_allclose(result.probabilities[valid], direct[valid], rtol=1e-5, atol=1e-5)
  # A GeoTIFF of the same pixels is read and quantised alike (scene_reader, uint8 windows).
  import rasterio  # pylint: disable=g-import-not-at-top
  from rasterio.transform import from_origin  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'tile.tif')
  with rasterio.open(path, 'w', driver='GTiff', width=32, height=32, count=12, dtype='float32',
                     crs='EPSG:32633', transform=from_origin(500_000.0, 5_300_000.0, 10.0, 10.0),
                     nodata=-9999.0) as out:
    out.write(np.where(np.isnan(tiles[0]), -9999.0, tiles[0]).transpose(2, 0, 1))
  from_file = model.predict(path, units='dB')
  np.testing.assert_allclose(from_file.probabilities, result.probabilities[0], rtol=1e-5,
                             atol=1e-5)
  # Already-quantised values give the same result: the uint8 round trip is idempotent.
  again = model.predict(FORM.round_trip(tiles))
  np.testing.assert_array_equal(again.probabilities, result.probabilities)
  # Not vacuous: the float16 path (clipping at 30 dB only) gives other probabilities.
  clipped16 = np.clip(tiles.astype(np.float64), -50.0, 30.0)
  other = apply(np.where(np.isnan(clipped16), 0.0, (clipped16 - mean) / std))
  assert np.abs(other - direct)[valid].max() > 1e-4


def test_the_no_data_batch_of_a_failed_read_has_the_datas_dtype():
  # faults.Feed sends it in place of a batch the reader failed on: the compiled step takes only
  # the dtype of the data's own batches.
  import types  # pylint: disable=g-import-not-at-top
  from mae_jax.trainers import finetune  # pylint: disable=g-import-not-at-top
  for contract, dtype in ((UINT8, np.uint8), (schema.InputContract(), np.float16)):
    dataset = types.SimpleNamespace(tile_size=8, num_channels=12, contract=contract)
    images = finetune.no_data_batch('vcf', 2, dataset)[schema.IMAGE]
    assert images.dtype == dtype and images.shape == (2, 8, 8, 12)
    assert np.isnan(quantise.form_of(contract).decode(images)).all()
