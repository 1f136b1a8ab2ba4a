"""Weights in from PyTorch (official MAE .pth, transformers) and out to transformers, end to end.

Independent truths: transformers' own ViTMAEForPreTraining / ViTMAEModel (loss, logits and
features with the same noise), an official-layout state dict built here by fusing q, k, v
with torch (not with mae_jax's code), and the grey-image property of the channel rule.
"""

import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

pytestmark = pytest.mark.integration

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from mae_jax.tools import export  # pylint: disable=g-import-not-at-top,wrong-import-position
from mae_jax import pretrained
from mae_jax.models import hf_convert
from mae_jax.models import vit
from mae_jax.models.mae import MaskedAutoencoder
from tests.hf_fixtures import assert_bitwise_equal  # pylint: disable=g-bad-import-order
from tests.hf_fixtures import hf_model
from tests.hf_fixtures import hf_sincos
from tests.hf_fixtures import load_into
from tests.hf_fixtures import random_params
from tests.tiny_config import losses
from tests.tiny_config import make_tiny_config
from tests.tiny_config import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 3-channel ImageNet-style MAE at 64 px with the tiny test model's sizes (width 32, 2 blocks,
# one 32-wide decoder block), so it can start the 12-channel, 32 px test config.
RGB = dict(image_size=64, patch_size=16, num_channels=3, width=32, depth=2, heads=2,
           mlp_dim=64, decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64,
           norm_pix_loss='none', layer_norm_eps=1e-6)
RTOL = 1e-5


def _torch_images(images):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@pytest.fixture(scope='module')
def rgb_mae(tmp_path_factory):
  """(mae_jax params, 3-channel model, folder written by transformers' save_pretrained)."""
  model = MaskedAutoencoder(**RGB)
  params = random_params(model, seed=7)
  hf = hf_model(model)
  hf_sincos(hf)
  load_into(hf, hf_convert.to_hf_state_dict(model, params))
  folder = str(tmp_path_factory.mktemp('rgb_mae') / 'hf')
  hf.save_pretrained(folder)
  return params, model, folder


def test_transformers_rgb_model_imports_bitwise_and_reproduces_its_loss(rgb_mae):
  params, model, folder = rgb_mae
  imported = pretrained.import_weights(folder, model)
  assert imported.part == 'mae' and not imported.notes
  assert_bitwise_equal(imported.params, params)

  hf = transformers.ViTMAEForPreTraining.from_pretrained(folder).eval()
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
  noise = rng.random((2, model.num_patches)).astype(np.float32)
  with torch.no_grad():
    out = hf(pixel_values=_torch_images(images), noise=torch.from_numpy(noise))
  ours = jax.jit(model.apply)({'params': imported.params}, images, np.ones(images.shape, bool),
                              noise)
  np.testing.assert_allclose(float(ours['loss']), float(out.loss), rtol=RTOL)
  np.testing.assert_array_equal(np.asarray(ours['mask']), out.mask.numpy())


def test_sharded_transformers_folder_imports_the_same(rgb_mae, tmp_path):
  params, model, folder = rgb_mae
  transformers.ViTMAEForPreTraining.from_pretrained(folder).save_pretrained(
      tmp_path, max_shard_size='20KB')
  assert (tmp_path / 'model.safetensors.index.json').exists()
  assert len(list(tmp_path.glob('model-*.safetensors'))) > 1
  assert_bitwise_equal(pretrained.import_weights(str(tmp_path), model).params, params)


@pytest.mark.parametrize('rule', pretrained.CHANNEL_RULES)
def test_channel_rule_keeps_the_grey_image_response(rgb_mae, rule):
  """12 equal channels x give the RGB model's features for the grey image (x, x, x); each
  predicted channel is the mean ('mean') or the matching ('repeat') RGB prediction."""
  params, model, folder = rgb_mae
  sar = model.clone(num_channels=12)
  imported = pretrained.import_weights(folder, sar, channel_rule=rule)
  assert any('3 to 12 channels' in note for note in imported.notes)
  rng = np.random.default_rng(1)
  grey = rng.standard_normal((2, 64, 64, 1)).astype(np.float32)
  noise = rng.random((2, model.num_patches)).astype(np.float32)

  def run_model(m, p, channels):
    images = np.repeat(grey, channels, axis=-1)
    latent, _, ids = m.apply({'params': p}, images, noise, method=m.encode)
    pred = m.apply({'params': p}, latent, ids, method=m.decode)
    return np.asarray(latent), np.asarray(pred).reshape(2, model.num_patches, 16, 16, channels)

  rgb_latent, rgb_pred = run_model(model, params, 3)
  sar_latent, sar_pred = run_model(sar, imported.params, 12)
  np.testing.assert_allclose(sar_latent, rgb_latent, rtol=1e-4, atol=1e-5)
  expected = (np.repeat(rgb_pred.mean(-1, keepdims=True), 12, -1) if rule == 'mean'
              else rgb_pred[..., np.arange(12) % 3])
  np.testing.assert_allclose(sar_pred, expected, rtol=1e-4, atol=1e-5)


def _official_state_dict(hf_state, with_decoder=True):
  """The official MAE (timm) names, built independently: q, k, v fused with torch.cat."""
  out = {'cls_token': hf_state['vit.embeddings.cls_token'],
         'pos_embed': hf_state['vit.embeddings.position_embeddings'],
         'patch_embed.proj.weight': hf_state['vit.embeddings.patch_embeddings.projection.weight'],
         'patch_embed.proj.bias': hf_state['vit.embeddings.patch_embeddings.projection.bias'],
         'norm.weight': hf_state['vit.layernorm.weight'],
         'norm.bias': hf_state['vit.layernorm.bias']}
  stacks = [('blocks', 'vit.layers')]
  if with_decoder:
    stacks.append(('decoder_blocks', 'decoder.decoder_layers'))
    for name in ('decoder_embed.weight', 'decoder_embed.bias', 'mask_token', 'decoder_pos_embed',
                 'decoder_norm.weight', 'decoder_norm.bias', 'decoder_pred.weight',
                 'decoder_pred.bias'):
      out[name] = hf_state['decoder.' + name]
  for official, ours in stacks:
    depth = len({k.split('.')[2] for k in hf_state if k.startswith(ours + '.')})
    for i in range(depth):
      src, dst = f'{ours}.{i}.', f'{official}.{i}.'
      for kind in ('weight', 'bias'):
        out[dst + f'attn.qkv.{kind}'] = torch.cat(
            [hf_state[src + f'attention.{p}_proj.{kind}'] for p in 'qkv'])
        out[dst + f'attn.proj.{kind}'] = hf_state[src + f'attention.o_proj.{kind}']
        out[dst + f'norm1.{kind}'] = hf_state[src + f'layernorm_before.{kind}']
        out[dst + f'norm2.{kind}'] = hf_state[src + f'layernorm_after.{kind}']
        out[dst + f'mlp.fc1.{kind}'] = hf_state[src + f'mlp.fc1.{kind}']
        out[dst + f'mlp.fc2.{kind}'] = hf_state[src + f'mlp.fc2.{kind}']
  return out


@pytest.mark.parametrize('old,new', [(14, 28), (28, 14), (14, 20), (2, 3)])
def test_learned_position_table_resizes_as_mae_pytorch_does(old, new):
  """Equals facebookresearch/mae's interpolate_pos_embed: torch bicubic, align_corners=False."""
  table = np.random.default_rng(old * new).normal(size=(1, 1 + old * old, 8)).astype(np.float32)
  grid = torch.from_numpy(table[0, 1:]).reshape(1, old, old, 8).permute(0, 3, 1, 2)
  expected = torch.nn.functional.interpolate(grid.double(), size=(new, new), mode='bicubic',
                                             align_corners=False)
  expected = expected.permute(0, 2, 3, 1).reshape(new * new, 8).numpy()
  resized = pretrained.resize_position_table(table, new)
  assert resized.shape == (1, 1 + new * new, 8) and resized.dtype == np.float32
  np.testing.assert_array_equal(resized[0, 0], table[0, 0])
  np.testing.assert_allclose(resized[0, 1:], expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='not 1 \\+ a square grid'):
    pretrained.resize_position_table(table[:, :-1], new)


def test_official_mae_pth_imports_like_transformers(rgb_mae, tmp_path):
  params, model, folder = rgb_mae
  hf_state = transformers.ViTMAEForPreTraining.from_pretrained(folder).state_dict()
  full = tmp_path / 'mae_visualize_vit_tiny.pth'
  torch.save({'model': _official_state_dict(hf_state)}, full)
  assert_bitwise_equal(pretrained.import_weights(str(full), model).params, params)

  encoder_only = tmp_path / 'mae_pretrain_vit_tiny.pth'
  torch.save({'model': _official_state_dict(hf_state, with_decoder=False)}, encoder_only)
  imported = pretrained.import_weights(str(encoder_only), model)
  assert imported.part == 'encoder' and 'no decoder' in imported.notes[0]
  assert_bitwise_equal(imported.params, {k: v for k, v in params.items()
                                         if k in ('patch_embed', 'cls_token', 'encoder',
                                                  'encoder_norm')})

  classifier = tmp_path / 'mae_finetuned_vit_tiny.pth'
  state = _official_state_dict(hf_state, with_decoder=False)
  state.update({'head.weight': torch.zeros(10, 32), 'head.bias': torch.zeros(10)})
  torch.save({'model': state}, classifier)
  with pytest.raises(ValueError, match='classification fine-tuning checkpoint'):
    pretrained.import_weights(str(classifier), model)


def test_import_errors_name_what_is_wrong(rgb_mae, tmp_path):
  _, model, folder = rgb_mae
  with pytest.raises(ValueError, match=r'width: source 32 != config 64.*mlp_dim'):
    pretrained.import_weights(folder, model.clone(width=64, mlp_dim=128))
  with pytest.raises(ValueError, match='patch_size: source 16 != config 8'):
    pretrained.import_weights(folder, model.clone(patch_size=8))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    pretrained.import_weights(str(tmp_path / 'nope.pth'), model)
  (tmp_path / 'weights.txt').write_text('x')
  with pytest.raises(ValueError, match='neither'):
    pretrained.import_weights(str(tmp_path / 'weights.txt'), model)
  with pytest.raises(ValueError, match='init_from_channels'):
    pretrained.import_weights(folder, model, channel_rule='rgb')
  # A learned target table starts as the sin-cos table of its grid, exactly.
  learned = pretrained.import_weights(folder, model.clone(pos_embedding='learned',
                                                          image_size=32, num_channels=12))
  np.testing.assert_array_equal(learned.params['pos_embedding'][0],
                                vit.sincos_2d(32, 2))


@pytest.fixture(scope='module')
def imagenet_start(tmp_path_factory, tiny_dataset, rgb_mae):
  """12 steps of 32 px, 12-channel pretraining started from the 3-channel 64 px MAE."""
  workdir = str(tmp_path_factory.mktemp('imagenet_start'))
  config = run(make_tiny_config(tiny_dataset), workdir, init_from=rgb_mae[2], total_steps=12,
               log_every_steps=1, **{'checkpoint.every_steps': 12})
  return workdir, config


def test_pretraining_starts_from_the_imported_mae_and_trains(imagenet_start, rgb_mae):
  workdir, config = imagenet_start
  model, params, metadata, _ = export.load_params(workdir)
  assert metadata['config']['init_from'] == rgb_mae[2]
  imported = pretrained.import_weights(rgb_mae[2], model)
  # Adam moves a weight by at most about lr per step (plus decay), so after 12 steps every
  # imported weight is still within 12 x peak lr of its imported value; a fresh init is not.
  peak_lr = config.optim.base_lr * config.batch_size / 256
  flat_imported = flax.traverse_util.flatten_dict(imported.params)
  flat = flax.traverse_util.flatten_dict(params)
  moved = max(float(np.abs(flat[k] - v).max()) for k, v in flat_imported.items())
  assert 0 < moved <= 12 * peak_lr * 1.1, (moved, peak_lr)
  curve = losses(workdir)
  assert len(curve) == 12 and all(np.isfinite(list(curve.values())))
  assert np.mean([curve[s] for s in (10, 11, 12)]) < np.mean([curve[s] for s in (1, 2, 3)])


def _export_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run([sys.executable, '-m', 'mae_jax.tools.export', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  return result


def test_export_round_trip_and_pytorch_parity(imagenet_start, tmp_path):
  workdir, _ = imagenet_start
  model, params, _, _ = export.load_params(workdir)
  whole = export.export(workdir, str(tmp_path / 'mae'))
  result = _export_cli('--checkpoint', workdir, '--output', str(tmp_path / 'encoder'),
                       '--part', 'encoder')
  assert result.returncode == 0, result.stderr[-2000:]
  encoder_dir = str(tmp_path / 'encoder')
  assert sorted(os.listdir(encoder_dir)) == ['config.json', 'model.safetensors']
  with open(os.path.join(encoder_dir, 'config.json')) as f:
    meta = json.load(f)
  assert meta['architectures'] == ['ViTMAEModel'] and meta['mask_ratio'] == 0.0
  assert meta['num_channels'] == 12 and len(meta['mae_jax']['input_contract']['mean']) == 12

  # Round trip: bitwise.
  assert_bitwise_equal(pretrained.import_weights(whole, model).params, params)
  encoder_params = {k: v for k, v in params.items()
                    if k in ('patch_embed', 'cls_token', 'encoder', 'encoder_norm')}
  assert_bitwise_equal(pretrained.import_weights(encoder_dir, model).params, encoder_params)

  rng = np.random.default_rng(2)
  images = rng.standard_normal((3, 32, 32, 12)).astype(np.float32)
  noise = rng.random((3, model.num_patches)).astype(np.float32)
  # The whole MAE: same loss and predictions with the same noise.
  hf, info = transformers.ViTMAEForPreTraining.from_pretrained(whole, output_loading_info=True)
  assert not any(info.values()), info
  with torch.no_grad():
    out = hf.eval()(pixel_values=_torch_images(images), noise=torch.from_numpy(noise))
  ours = model.apply({'params': params}, images, np.ones(images.shape, bool), noise)
  np.testing.assert_allclose(float(ours['loss']), float(out.loss), rtol=RTOL)
  np.testing.assert_allclose(np.asarray(ours['pred']), out.logits.numpy(), rtol=1e-4,
                             atol=1e-4 * float(out.logits.abs().max()))
  # The encoder: every token, in grid order, equal to 1e-4 relative.
  encoder, info = transformers.ViTMAEModel.from_pretrained(encoder_dir, output_loading_info=True)
  assert not any(info.values()), info
  in_order = torch.arange(model.num_patches, dtype=torch.float32).expand(3, -1)
  with torch.no_grad():
    features = encoder.eval()(pixel_values=_torch_images(images),
                              noise=in_order).last_hidden_state.numpy()
  latent, _, _ = model.apply({'params': params}, images, method=model.encode)
  latent = np.asarray(latent)
  assert features.shape == latent.shape == (3, 1 + model.num_patches, 32)
  assert np.linalg.norm(features - latent) / np.linalg.norm(latent) < 1e-4
  np.testing.assert_allclose(features, latent, rtol=1e-4, atol=1e-4)


def test_export_errors_leave_nothing(imagenet_start, tmp_path):
  workdir, _ = imagenet_start
  out = tmp_path / 'out'
  out.mkdir()
  with pytest.raises(FileExistsError, match='--overwrite'):
    export.export(workdir, str(out))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    export.export(workdir, str(tmp_path / 'missing' / 'out'))
  with pytest.raises(FileNotFoundError):
    export.export(str(tmp_path / 'no_workdir'), str(tmp_path / 'x'))
  assert export.export(workdir, str(out), part='encoder', overwrite=True) == str(out)
  assert sorted(os.listdir(tmp_path)) == ['out']
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']


def test_finetuning_starts_from_an_exported_encoder(imagenet_start, tmp_path):
  from tests import test_finetune  # pylint: disable=g-import-not-at-top
  workdir, config = imagenet_start
  encoder_dir = export.export(workdir, str(tmp_path / 'encoder'), part='encoder')
  ft = test_finetune.finetune_config((workdir, config))
  ft.init_checkpoint = ''
  ft.init_from = encoder_dir
  state, _ = test_finetune.initial_state(ft)
  _, params, _, _ = export.load_params(workdir, part='encoder')
  restored = {k: jax.device_get(v) for k, v in state['params'].items() if k in params}
  assert_bitwise_equal(restored, params)
  ft.init_checkpoint = workdir
  with pytest.raises(ValueError, match='not both'):
    test_finetune.initial_state(ft)
