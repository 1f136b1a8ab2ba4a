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

SMALL = dict(image_size=64, patch_size=16, num_channels=12, width=64, depth=2, num_heads=4,
             mlp_dim=128, decoder_width=32, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=64,
             layer_norm_eps=1e-6, dtype=jnp.float32)
# The 448 x 448 tile of the project (a 28 x 28 grid of 16-pixel patches) at minimal width.
FULL_GRID = dict(image_size=448, patch_size=16, num_channels=12, width=32, depth=1, num_heads=2,
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


def _random_params(model, seed):
  """Random params of the model's shapes; biases, LayerNorms and tokens are all non-trivial.

  Drawn with numpy from ``jax.eval_shape`` shapes: compiling ``model.init`` takes seconds.
  Kernels are scaled by 1/sqrt(fan-in) so activations stay O(1) through the blocks.
  """
  size, channels = model.image_size, model.num_channels
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32),
                          jax.ShapeDtypeStruct((1, size, size, channels), jnp.bool_),
                          jax.ShapeDtypeStruct((1, model.num_patches), jnp.float32))
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(shapes['params']))
  rng = np.random.default_rng(seed)
  params = {}
  for path, leaf in sorted(flat.items()):
    shape = leaf.shape
    x = rng.standard_normal(shape)
    if path[-1] == 'kernel':  # (in, out), (embed, heads, head_dim) or (heads, head_dim, embed).
      x /= np.sqrt(shape[0] * (shape[1] if path[-2] == 'out' else 1))
    elif path[-1] == 'scale':
      x = 1.0 + 0.1 * x
    else:  # Biases, cls_token, mask_token, learned position embeddings.
      x *= 0.1
    params[path] = x.astype(np.float32)
  return flax.traverse_util.unflatten_dict(params)


def _inputs(model, seed, batch=2):
  rng = np.random.default_rng(seed + 1)
  images = rng.standard_normal((batch, model.image_size, model.image_size, model.num_channels))
  noise = rng.random((batch, model.num_patches))
  return images.astype(np.float32), noise.astype(np.float32)


def _hf_model(model):
  torch.manual_seed(0)
  config = transformers.ViTMAEConfig(**hf_convert.hf_config_dict(model))
  return transformers.ViTMAEForPreTraining(config)


def _hf_sincos(hf):
  """The (encoder, decoder) sin-cos position embeddings transformers initialises.

  transformers 5.24 leaves both at zero after construction: post_init initialises the patch
  Conv2d before ViTMAEEmbeddings, whose initialize_weights then returns early on the conv's
  ``_is_hf_initialized`` flag, and ViTMAEPreTrainedModel._init_weights zeroes decoder_pos_embed
  after ViTMAEDecoder.__init__ filled it. Where that happened, rerun transformers' own
  initialisers (harmless here: the state dict is loaded afterwards).
  """
  embeddings, decoder = hf.vit.embeddings, hf.decoder
  with torch.no_grad():
    if not embeddings.position_embeddings.any():
      embeddings.patch_embeddings.projection._is_hf_initialized = False
      embeddings.initialize_weights()
    if not decoder.decoder_pos_embed.any():
      decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
  return (embeddings.position_embeddings.detach().numpy()[0].copy(),
          decoder.decoder_pos_embed.detach().numpy()[0].copy())


def _load(hf, state):
  result = hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  return hf.eval()


def _assert_bitwise_equal(a, b):
  flat_a, flat_b = (flax.traverse_util.flatten_dict(t) for t in (a, b))
  assert set(flat_a) == set(flat_b)
  for path, x in flat_a.items():
    y = np.asarray(flat_b[path])
    x = np.asarray(x)
    assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, path
    np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32), err_msg=str(path))


def _max_rel(actual, desired):
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  return float(np.max(np.abs(actual - desired) / np.maximum(np.abs(desired), 1e-30)))


@pytest.mark.parametrize('case', sorted(CASES))
def test_forward_parity(case):
  model = MaskedAutoencoder(**CASES[case])
  params = _random_params(model, seed=0)
  images, noise = _inputs(model, seed=0)
  hf = _hf_model(model)

  if model.pos_embedding == 'sincos':
    encoder_pos, decoder_pos = _hf_sincos(hf)
    np.testing.assert_allclose(vit.sincos_2d(model.width, model.grid_size), encoder_pos,
                               rtol=0, atol=1e-7)
    np.testing.assert_allclose(vit.sincos_2d(model.decoder_width, model.grid_size), decoder_pos,
                               rtol=0, atol=1e-7)

  state = hf_convert.to_hf_state_dict(model, params)
  hf = _load(hf, state)
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
  _assert_bitwise_equal(hf_convert.from_hf_state_dict(model, hf.state_dict()), params)


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('legacy_keys', [False, True])
def test_round_trip_is_bitwise(case, legacy_keys):
  model = MaskedAutoencoder(**CASES[case])
  params = _random_params(model, seed=1)
  state = hf_convert.to_hf_state_dict(model, params, legacy_keys=legacy_keys)
  _assert_bitwise_equal(hf_convert.from_hf_state_dict(model, state), params)


def test_legacy_keys_load_through_transformers(tmp_path):
  """Hub-style (4.x) key names are what transformers renames to its own on from_pretrained."""
  safetensors_torch = pytest.importorskip('safetensors.torch')
  model = MaskedAutoencoder(**CASES['learned_raw_poster'])
  params = _random_params(model, seed=2)
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
  params = _random_params(model, seed=3)
  with pytest.raises(ValueError, match='patch_channel'):
    hf_convert.hf_config_dict(model.clone(norm_pix_loss='patch_channel'))
  with pytest.raises(ValueError, match='scan_layers'):
    hf_convert.to_hf_state_dict(model.clone(scan_layers=True), params)
  state = hf_convert.to_hf_state_dict(model, params)
  # mae_jax keeps sin-cos position embeddings fixed; other values cannot be imported silently.
  bad = dict(state)
  bad[hf_convert.ENCODER_POS_KEY] = state[hf_convert.ENCODER_POS_KEY] + 0.1
  with pytest.raises(ValueError, match='sin-cos'):
    hf_convert.from_hf_state_dict(model, bad)
  # ...but they may be left out.
  without_pos = {k: v for k, v in state.items()
                 if k not in (hf_convert.ENCODER_POS_KEY, hf_convert.DECODER_POS_KEY)}
  _assert_bitwise_equal(hf_convert.from_hf_state_dict(model, without_pos), params)
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
