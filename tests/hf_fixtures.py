"""Helpers shared by the tests that compare mae_jax with transformers' ViT-MAE (torch needed)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from mae_jax.models import hf_convert


def random_params(model, seed):
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


def hf_model(model):
  torch.manual_seed(0)
  config = transformers.ViTMAEConfig(**hf_convert.hf_config_dict(model))
  return transformers.ViTMAEForPreTraining(config)


def hf_sincos(hf):
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


def load_into(hf, state):
  result = hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  return hf.eval()


def assert_bitwise_equal(a, b):
  flat_a, flat_b = (flax.traverse_util.flatten_dict(t) for t in (a, b))
  assert set(flat_a) == set(flat_b)
  for path, x in flat_a.items():
    y = np.asarray(flat_b[path])
    x = np.asarray(x)
    assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, path
    np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32), err_msg=str(path))
