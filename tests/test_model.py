"""The MAE's pieces against numpy re-implementations and hand-computed values."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain as pretrain_configs
from mae_jax.models import mae
from mae_jax.models import vit


def np_patchify(images, p):
  b, h, w, c = images.shape
  out = np.zeros((b, (h // p) * (w // p), p * p * c), images.dtype)
  for i in range(h // p):
    for j in range(w // p):
      # (row in patch, column in patch, channel) order.
      out[:, i * (w // p) + j] = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(b, -1)
  return out


def test_patchify_matches_numpy_and_inverts():
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  patches = mae.patchify(jnp.asarray(images), 8)
  np.testing.assert_array_equal(patches, np_patchify(images, 8))
  np.testing.assert_array_equal(mae.unpatchify(patches, 8, 3), images)


def test_patchify_rejects_a_patch_that_does_not_divide():
  with pytest.raises(ValueError, match='not divisible by patch size 7'):
    mae.patchify(jnp.zeros((1, 32, 32, 3)), 7)


def test_random_masking_keeps_the_lowest_noise():
  noise = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6, 0.4]], np.float32)
  tokens = np.arange(2 * 4 * 1, dtype=np.float32).reshape(2, 4, 1)
  kept, mask, ids_restore = mae.random_masking(jnp.asarray(tokens), jnp.asarray(noise), keep=2)
  np.testing.assert_array_equal(kept[..., 0], [[1, 3], [4, 7]])  # argsort order
  np.testing.assert_array_equal(mask, [[1, 0, 1, 0], [0, 1, 1, 0]])
  np.testing.assert_array_equal(ids_restore, np.argsort(np.argsort(noise, 1), 1))


def np_loss(target, valid, pred, mask, norm_pix, channels, eps=1e-6):
  """Element loops: the mean squared error over valid values of masked patches."""
  b, l, p = target.shape
  total = count = 0.0
  for i in range(b):
    for j in range(l):
      if not mask[i, j]:
        continue
      t, v = target[i, j].astype(np.float64), valid[i, j].astype(bool)
      if norm_pix == 'patch':
        groups = [np.arange(p)]
      elif norm_pix == 'patch_channel':
        groups = [np.arange(c, p, channels) for c in range(channels)]
      else:
        groups = []
      t = t.copy()
      for g in groups:
        values = t[g][v[g]]
        if values.size:
          mean = values.mean()
          var = values.var(ddof=1) if values.size > 1 else 0.0
          t[g] = (t[g] - mean) / np.sqrt(var + eps)
      err = (pred[i, j] - t)**2
      total += err[v].sum()
      count += v.sum()
  return total / count


@pytest.mark.parametrize('norm_pix', ['none', 'patch', 'patch_channel'])
def test_loss_matches_numpy_with_no_data(norm_pix):
  rng = np.random.default_rng(1)
  target = rng.normal(size=(2, 5, 12)).astype(np.float32)
  pred = rng.normal(size=(2, 5, 12)).astype(np.float32)
  valid = rng.random((2, 5, 12)) > 0.2
  valid[0, 1] = False  # A patch that is all no-data.
  mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 0]], np.float32)
  got = mae.reconstruction_loss(jnp.asarray(target), jnp.asarray(valid), jnp.asarray(pred),
                                jnp.asarray(mask), norm_pix, channels=3)
  np.testing.assert_allclose(got, np_loss(target, valid, pred, mask, norm_pix, 3), rtol=1e-5)


def test_loss_by_hand():
  # One masked patch of two values: target (1, 3), prediction (0, 0). Raw: (1 + 9) / 2 = 5.
  # Norm-pix: mean 2, unbiased var 2 -> target (-1, 1) / sqrt(2 + eps): loss = 1 / (2 + eps).
  target = jnp.array([[[1.0, 3.0]]])
  args = (jnp.ones((1, 1, 2)), jnp.zeros((1, 1, 2)), jnp.ones((1, 1)))
  assert float(mae.reconstruction_loss(target, *args, 'none', 1)) == pytest.approx(5.0)
  assert float(mae.reconstruction_loss(target, *args, 'patch', 1)) == pytest.approx(
      1 / (2 + 1e-6), rel=1e-6)


def test_sincos_2d_by_hand():
  emb = vit.sincos_2d(8, 2)
  assert emb.shape == (5, 8)
  np.testing.assert_array_equal(emb[0], 0)  # cls
  # Patch (row 1, col 0) -> index 3; MAE's meshgrid(w, h) puts the column first.
  omega = 1.0 / 10000**(np.arange(2) / 2.0)
  col, row = 0.0, 1.0
  expected = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                             np.sin(row * omega), np.cos(row * omega)])
  np.testing.assert_allclose(emb[1 + 2], expected, rtol=1e-6)


def small_model(**kwargs):
  defaults = dict(image_size=32, patch_size=8, num_channels=12, width=32, depth=2, heads=2,
                  mlp_dim=64, decoder_width=16, decoder_depth=1, decoder_heads=2,
                  decoder_mlp_dim=32)
  defaults.update(kwargs)
  return mae.MaskedAutoencoder(**defaults)


def test_forward_shapes_and_visible_token_count():
  model = small_model()
  images = jax.random.normal(jax.random.key(0), (3, 32, 32, 12))
  valid = jnp.ones_like(images, bool)
  noise = jax.random.uniform(jax.random.key(1), (3, 16))
  params = model.init(jax.random.key(2), images, valid, noise)
  out = model.apply(params, images, valid, noise)
  assert out['pred'].shape == (3, 16, 8 * 8 * 12)
  np.testing.assert_array_equal(out['mask'].sum(1), [12, 12, 12])  # 16 - int(16 * 0.25)
  latent, _, _ = model.apply(params, images, None, method=model.encode)
  assert latent.shape == (3, 17, 32)  # Without noise every patch is encoded (fine-tuning).


def test_scan_and_remat_give_the_same_loss_as_a_loop():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 12))
  valid = jnp.ones_like(images, bool)
  noise = jax.random.uniform(jax.random.key(1), (2, 16))
  scanned = small_model(scan_layers=True, remat_policy='full')
  scan_params = nn.meta.unbox(scanned.init(jax.random.key(2), images, valid, noise)['params'])
  def unstack(blocks, depth):
    return {f'block_{i}': jax.tree.map(lambda x: x[i], blocks) for i in range(depth)}
  params = dict(scan_params, encoder=unstack(scan_params['encoder']['blocks'], 2),
                decoder=unstack(scan_params['decoder']['blocks'], 1))
  a = small_model().apply({'params': params}, images, valid, noise)['loss']
  b = scanned.apply({'params': scan_params}, images, valid, noise)['loss']
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_close_loss():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 12))
  valid = jnp.ones_like(images, bool)
  noise = jax.random.uniform(jax.random.key(1), (2, 16))
  model = small_model()
  params = model.init(jax.random.key(2), images, valid, noise)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  a = model.apply(params, images, valid, noise)['loss']
  b = small_model(dtype=jnp.bfloat16).apply(params, images, valid, noise)['loss']
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(a, b, rtol=2e-2)


def test_attention_implementations_agree():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 9, 3, 8)) for i in range(3))
  reference = np.asarray(jax.nn.dot_product_attention(q, k, v))
  # numpy by hand for one head.
  logits = np.einsum('qh,kh->qk', q[0, :, 1], k[0, :, 1]) / np.sqrt(8)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(reference[0, :, 1], weights @ np.asarray(v[0, :, 1]), rtol=1e-5,
                             atol=1e-6)
  for implementation in ('auto', 'einsum', 'xla'):
    np.testing.assert_allclose(vit.attention(q, k, v, implementation), reference, rtol=1e-5,
                               atol=1e-6)
  with pytest.raises(ValueError, match='must be one of'):
    vit.attention(q, k, v, 'flash')


@pytest.mark.parametrize('length, min_head_dim', [
    (197, 0), (785, 0), (128, 0),  # encoder, decoder, already a multiple of 64
    (197, 64)])                     # and heads zero-padded from 16 to 64
def test_padded_length_masked_attention_equals_unpadded(length, min_head_dim):
  # The path cuDNN runs (inputs padded to a multiple of 64, padding masked by per-example
  # lengths), here with XLA's kernel, against the plain einsum form: outputs and gradients.
  q, k, v = (jax.random.normal(jax.random.key(i), (2, length, 2, 16)) for i in range(3))
  cotangent = jax.random.normal(jax.random.key(3), q.shape)
  def loss(attend):
    return lambda q, k, v: jnp.sum(attend(q, k, v) * cotangent)
  padded = lambda q, k, v: vit.padded_attention(q, k, v, 'xla', min_head_dim=min_head_dim)
  with jax.default_matmul_precision('highest'):
    got, got_grads = jax.jit(jax.value_and_grad(loss(padded), argnums=(0, 1, 2)))(q, k, v)
    want, want_grads = jax.jit(jax.value_and_grad(loss(vit.einsum_attention),
                                                  argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(jax.jit(padded)(q, k, v), vit.einsum_attention(q, k, v),
                               rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for name, a, b in zip('qkv', got_grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f'gradient of {name}')


class FakeDevice:
  """What resolve_attention reads of a device."""

  def __init__(self, platform, kind, capability=None):
    self.platform, self.device_kind = platform, kind
    if capability:
      self.compute_capability = capability


def test_auto_attention_per_backend_and_named_ones_fail_at_start_up(monkeypatch):
  h200, a100 = FakeDevice('gpu', 'NVIDIA H200', '9.0'), FakeDevice('gpu', 'NVIDIA A100', '8.0')
  v100, tpu = FakeDevice('gpu', 'Tesla V100', '7.0'), FakeDevice('tpu', 'TPU v4')
  cpu = FakeDevice('cpu', 'cpu')
  resolve = vit.resolve_attention
  assert resolve('auto', jnp.bfloat16, 64, device=h200) == 'cudnn'
  assert resolve('auto', jnp.bfloat16, 32, device=a100) == 'cudnn'
  assert resolve('auto', jnp.float32, 64, device=h200) == 'xla'   # cuDNN has no float32 kernel
  assert resolve('auto', jnp.bfloat16, 160, device=a100) == 'xla'  # head dim over Ampere's 128
  assert resolve('auto', jnp.bfloat16, 160, device=h200) == 'cudnn'
  assert resolve('auto', jnp.bfloat16, 64, device=v100) == 'xla'
  assert resolve('auto', jnp.bfloat16, 64, device=tpu) == 'xla'
  assert resolve('auto', jnp.float32, 64, device=cpu) == 'einsum'
  for name in ('xla', 'einsum'):
    assert resolve(name, jnp.float32, 64, device=cpu) == name
  for device, dtype, head_dim, reason in [
      (cpu, jnp.bfloat16, 64, "compute capability 8.0 or newer, found 'cpu'"),
      (v100, jnp.bfloat16, 64, 'compute capability 8.0'),
      (h200, jnp.float32, 64, 'bfloat16 or float16 compute, got float32'),
      (h200, jnp.bfloat16, 36, 'multiple of 8 up to 256, got 36')]:
    with pytest.raises(ValueError, match=f"attention_implementation='cudnn' cannot run here: "
                       f".*{reason}.*use 'auto'"):
      resolve('cudnn', dtype, head_dim, device=device)
  assert resolve('cudnn', jnp.bfloat16, 64, device=h200) == 'cudnn'
  # Sequences shorter than CUDNN_AUTO_MIN_LENGTH stay with XLA under 'auto'.
  monkeypatch.setattr(vit, 'CUDNN_AUTO_MIN_LENGTH', 256)
  assert resolve('auto', jnp.bfloat16, 64, 197, device=h200) == 'xla'
  assert resolve('auto', jnp.bfloat16, 32, 785, device=h200) == 'cudnn'
  assert resolve('cudnn', jnp.bfloat16, 64, 197, device=h200) == 'cudnn'


@pytest.mark.parametrize('keep', [3, 10])  # the encoder's kept tokens; the decoder's unshuffle
def test_take_rows_gradient_is_the_gather_gradient(keep):
  x = jax.random.normal(jax.random.key(0), (3, 10, 4))
  noise = jax.random.uniform(jax.random.key(1), (3, 10))
  ids = jnp.argsort(noise, axis=1)[:, :keep]
  inverse = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  weights = jax.random.normal(jax.random.key(2), (3, keep, 4))
  ours = jax.grad(lambda x: jnp.sum(mae.take_rows(x, ids, inverse) * weights))(x)
  plain = jax.grad(lambda x: jnp.sum(jnp.take_along_axis(x, ids[..., None], 1) * weights))(x)
  np.testing.assert_array_equal(mae.take_rows(x, ids, inverse),
                                jnp.take_along_axis(x, ids[..., None], 1))
  np.testing.assert_array_equal(ours, plain)
  assert int(jnp.sum(jnp.any(ours != 0, axis=-1))) == 3 * keep  # rows not taken get zero


def test_normalising_in_patch_layout_equals_normalising_images():
  from mae_jax import preprocess
  rng = np.random.default_rng(0)
  images = rng.normal(-12, 5, (2, 32, 32, 12)).astype(np.float16)
  images[0, :5, :7, 3] = np.nan
  mean, std = rng.normal(-10, 3, 12).astype(np.float32), rng.uniform(1, 4, 12).astype(np.float32)
  patches, valid = preprocess.normalise_patches(jnp.asarray(images), 8, mean, std)
  expected = np.where(np.isnan(images), 0, (images.astype(np.float32) - mean) / std)
  np.testing.assert_allclose(patches, np_patchify(expected, 8), rtol=1e-6)
  np.testing.assert_array_equal(valid, np_patchify(~np.isnan(images), 8))


@pytest.mark.parametrize('preset', pretrain_configs.PRESETS)
def test_the_config_sets_every_model_field_by_the_fields_own_name(preset):
  config = pretrain_configs.preset_config(preset).model
  every_field = {f.name for f in dataclasses.fields(mae.MaskedAutoencoder)} - {'parent', 'name'}
  assert set(mae.config_fields(config)) == every_field  # No field left to a code default.
  model = mae.model_from_config(config)
  assert (model.width, model.heads, model.decoder_depth, model.decoder_mlp_dim) == (
      config.encoder.width, config.encoder.heads, config.decoder.depth, config.decoder.mlp_dim)
  assert model.dtype == jnp.dtype(config.dtype)
