"""Parity of mae_jax's MaskedAutoencoder with transformers' ViTMAEForPreTraining.

Random mae_jax params are exported with ``hf_convert.to_hf_state_dict`` and loaded strictly
into the transformers model; both then see the same images and noise (every pixel valid, where
mae_jax's no-data handling reduces to MAE's loss) and must agree on loss, predictions and mask.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import flax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp

from mae_jax.models import hf_convert
from mae_jax.models import vit
from mae_jax.models.mae import MaskedAutoencoder
from tests.hf_fixtures import assert_bitwise_equal  # pylint: disable=g-bad-import-order
from tests.hf_fixtures import hf_model
from tests.hf_fixtures import hf_sincos
from tests.hf_fixtures import load_into
from tests.hf_fixtures import random_params

SMALL = dict(image_size=64, patch_size=16, num_channels=12, width=64, depth=2, heads=4,
             mlp_dim=128, decoder_width=32, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=64,
             layer_norm_eps=1e-6, dtype=jnp.float32)
# The 448 x 448 tile of the project (a 28 x 28 grid of 16-pixel patches) at minimal width.
FULL_GRID = dict(image_size=448, patch_size=16, num_channels=12, width=32, depth=1, heads=2,
                 mlp_dim=64, decoder_width=32, decoder_depth=1, decoder_heads=2,
                 decoder_mlp_dim=64, layer_norm_eps=1e-6, dtype=jnp.float32)
CASES = {
    'sincos_normpix': dict(SMALL, pos_embedding='sincos', norm_pix_loss='patch'),
    'learned_raw_poster': dict(SMALL, pos_embedding='learned', norm_pix_loss='none'),
    'grid28_sincos_normpix': dict(FULL_GRID, pos_embedding='sincos', norm_pix_loss='patch'),
}
# Tolerance for loss and predicted patches, relative. Logits near zero carry the absolute
# float32 rounding of the O(1..5) activations they come from (up to ~7e-6 observed; ~20x less
# with both models in float64), so the element-wise atol is RTOL times the logit scale.
RTOL = 1e-5


def _inputs(model, seed, batch=2):
  rng = np.random.default_rng(seed + 1)
  images = rng.standard_normal((batch, model.image_size, model.image_size, model.num_channels))
  noise = rng.random((batch, model.num_patches))
  return images.astype(np.float32), noise.astype(np.float32)


def _max_rel(actual, desired):
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  return float(np.max(np.abs(actual - desired) / np.maximum(np.abs(desired), 1e-30)))


@pytest.mark.parametrize('case', sorted(CASES))
def test_forward_parity(case):
  model = MaskedAutoencoder(**CASES[case])
  params = random_params(model, seed=0)
  images, noise = _inputs(model, seed=0)
  hf = hf_model(model)

  if model.pos_embedding == 'sincos':
    encoder_pos, decoder_pos = hf_sincos(hf)
    np.testing.assert_allclose(vit.sincos_2d(model.width, model.grid_size), encoder_pos,
                               rtol=0, atol=1e-7)
    np.testing.assert_allclose(vit.sincos_2d(model.decoder_width, model.grid_size), decoder_pos,
                               rtol=0, atol=1e-7)

  state = hf_convert.to_hf_state_dict(model, params)
  hf = load_into(hf, state)
  with torch.no_grad():
    out = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
             noise=torch.from_numpy(noise))
  ours = jax.jit(model.apply)({'params': params}, jnp.asarray(images),
                              jnp.ones(images.shape, bool), jnp.asarray(noise))

  np.testing.assert_array_equal(np.asarray(ours['mask']), out.mask.numpy())
  assert int(out.mask.sum()) == images.shape[0] * (model.num_patches - model.num_kept)
  pred, logits = np.asarray(ours['pred']), out.logits.numpy()
  scale = float(np.abs(logits).max())
  np.testing.assert_allclose(pred, logits, rtol=RTOL, atol=RTOL * scale)
  norm_rel = float(np.linalg.norm(pred - logits) / np.linalg.norm(logits))
  assert norm_rel < RTOL
  np.testing.assert_allclose(float(ours['loss']), float(out.loss), rtol=RTOL, atol=0)
  large = np.abs(logits) > 1e-2
  print(f'\n{case}: loss rel diff {_max_rel(ours["loss"], out.loss.numpy()):.2e}; pred: max abs '
        f'diff {np.abs(pred - logits).max():.2e} (max |logit| {scale:.2f}), max rel diff where '
        f'|logit| > 1e-2 {_max_rel(pred[large], logits[large]):.2e}, relative norm diff '
        f'{norm_rel:.2e}')

  # Import from the live torch model is the exact inverse of the export.
  assert_bitwise_equal(hf_convert.from_hf_state_dict(model, hf.state_dict()), params)


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('legacy_keys', [False, True])
def test_round_trip_is_bitwise(case, legacy_keys):
  model = MaskedAutoencoder(**CASES[case])
  params = random_params(model, seed=1)
  state = hf_convert.to_hf_state_dict(model, params, legacy_keys=legacy_keys)
  assert_bitwise_equal(hf_convert.from_hf_state_dict(model, state), params)


def test_legacy_keys_load_through_transformers(tmp_path):
  """Hub-style (4.x) key names are what transformers renames to its own on from_pretrained."""
  safetensors_torch = pytest.importorskip('safetensors.torch')
  model = MaskedAutoencoder(**CASES['learned_raw_poster'])
  params = random_params(model, seed=2)
  legacy = hf_convert.to_hf_state_dict(model, params, legacy_keys=True)
  assert 'vit.encoder.layer.0.attention.attention.query.weight' in legacy
  assert 'decoder.decoder_layers.1.intermediate.dense.weight' in legacy
  transformers.ViTMAEConfig(**hf_convert.hf_config_dict(model)).save_pretrained(tmp_path)
  safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in legacy.items()},
                              str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  hf, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path,
                                                                output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  assert not info['mismatched_keys']
  modern = hf_convert.to_hf_state_dict(model, params)
  loaded = hf.state_dict()
  assert set(loaded) == set(modern)
  for key, value in modern.items():
    np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)


def test_errors():
  model = MaskedAutoencoder(**CASES['sincos_normpix'])
  params = random_params(model, seed=3)
  with pytest.raises(ValueError, match='patch_channel'):
    hf_convert.hf_config_dict(model.clone(norm_pix_loss='patch_channel'))
  state = hf_convert.to_hf_state_dict(model, params)
  # mae_jax keeps sin-cos position embeddings fixed; other values cannot be imported silently.
  bad = dict(state)
  bad[hf_convert.ENCODER_POS_KEY] = state[hf_convert.ENCODER_POS_KEY] + 0.1
  with pytest.raises(ValueError, match='sin-cos'):
    hf_convert.from_hf_state_dict(model, bad)
  # ...but they may be left out.
  without_pos = {k: v for k, v in state.items()
                 if k not in (hf_convert.ENCODER_POS_KEY, hf_convert.DECODER_POS_KEY)}
  assert_bitwise_equal(hf_convert.from_hf_state_dict(model, without_pos), params)
  missing = dict(state)
  del missing['decoder.decoder_pred.bias']
  with pytest.raises(ValueError, match='missing'):
    hf_convert.from_hf_state_dict(model, missing)
  wrong_shape = dict(state)
  wrong_shape['vit.layers.0.attention.q_proj.weight'] = np.zeros((64, 32), np.float32)
  with pytest.raises(ValueError, match='shape'):
    hf_convert.from_hf_state_dict(model, wrong_shape)
  with pytest.raises(ValueError, match='do not match'):
    hf_convert.to_hf_state_dict(model.clone(depth=3), params)


def test_scanned_models_convert_through_the_per_block_layout():
  model = MaskedAutoencoder(**CASES['learned_raw_poster'])
  params = random_params(model, seed=4)
  scanned_model = model.clone(scan_layers=True)
  scanned = hf_convert.scan_params(params)
  assert scanned['encoder']['blocks']['attn']['query']['kernel'].shape[0] == model.depth
  assert set(hf_convert.param_shapes(scanned_model)) == set(
      flax.traverse_util.flatten_dict(scanned))
  assert_bitwise_equal(hf_convert.unscan_params(scanned), params)
  state = hf_convert.to_hf_state_dict(scanned_model, scanned)
  reference = hf_convert.to_hf_state_dict(model, params)
  assert set(state) == set(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)
  assert_bitwise_equal(hf_convert.from_hf_state_dict(scanned_model, state), scanned)


def test_encoder_part_and_model_names():
  model = MaskedAutoencoder(**CASES['sincos_normpix'])
  params = random_params(model, seed=5)
  encoder = hf_convert.to_hf_state_dict(model, params, part='encoder')
  assert all(k.startswith('vit.') for k in encoder)
  bare = hf_convert.encoder_state_dict_for_model(encoder)
  assert 'embeddings.cls_token' in bare and 'layernorm.weight' in bare
  expected = {k: v for k, v in params.items() if k in ('patch_embed', 'cls_token', 'encoder',
                                                       'encoder_norm')}
  for state in (encoder, bare):
    assert_bitwise_equal(hf_convert.from_hf_state_dict(model, state, part='encoder'), expected)
  with pytest.raises(ValueError, match='unexpected'):
    hf_convert.from_hf_state_dict(model, hf_convert.to_hf_state_dict(model, params),
                                  part='encoder')
