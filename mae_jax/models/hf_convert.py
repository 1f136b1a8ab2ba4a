"""Conversion between mae_jax ``MaskedAutoencoder`` params and transformers' ViT-MAE.

``to_hf_state_dict`` turns unboxed float32 flax params into the ``state_dict`` of
``transformers.ViTMAEForPreTraining`` built from ``ViTMAEConfig(**hf_config_dict(model))``, and
``from_hf_state_dict`` is its exact inverse (every step is a transpose or a reshape, so a
round trip is bitwise). Layout differences handled here:

* patch embedding: mae_jax uses a Dense on patch vectors ordered (row, col, channel), kernel
  (p * p * C, D); transformers uses a Conv2d with weight (D, C, p, p).
* attention: mae_jax q/k/v kernels are (embed, heads, head_dim) and the output kernel is
  (heads, head_dim, embed); transformers uses Linear layers with weight (out, in), heads major.
* dense layers: flax kernels are (in, out), torch weights (out, in).
* sin-cos position embeddings are constants in mae_jax but tensors in the transformers
  state_dict; they are filled with :func:`mae_jax.models.vit.sincos_2d` (which matches the
  layout transformers initialises) on export and checked against it on import.

Parts: ``part='mae'`` converts the whole model (``ViTMAEForPreTraining``); ``part='encoder'`` only
the encoder (``mae.ENCODER_PARAMS``), under ``ViTMAEForPreTraining``'s ``vit.`` names;
:func:`encoder_state_dict_for_model` strips that prefix for ``ViTMAEModel``, and
:func:`from_hf_state_dict` accepts keys with or without it. Models with ``scan_layers=True``
are converted through the per-block layout (:func:`unscan_params` / :func:`scan_params`), which
only splits or stacks the leading ``layers`` axis.

Key names follow the installed transformers (5.x: ``vit.layers.{i}.attention.q_proj.weight``,
``...mlp.fc1.weight``). ``to_hf_state_dict(..., legacy_keys=True)`` writes the names used by
checkpoints on the Hub and by transformers 4.x (``vit.encoder.layer.{i}.attention.attention.
query.weight``, ``...intermediate.dense.weight``), which transformers 5.x renames on
``from_pretrained``; ``from_hf_state_dict`` accepts either naming.

torch and transformers are optional dependencies: nothing here imports them, and torch tensors
given to :func:`from_hf_state_dict` are read through their own ``.numpy()``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.models import mae
from mae_jax.models import vit
from mae_jax.models.mae import MaskedAutoencoder

PARTS = ('mae', 'encoder')
# The prefix of the encoder in ViTMAEForPreTraining's state dict, absent in ViTMAEModel's.
ENCODER_PREFIX = 'vit.'
# Scanned transformers keep their blocks under this name with a leading layers axis.
SCANNED_BLOCKS = 'blocks'

# Position-embedding keys, which are params only for pos_embedding='learned'.
ENCODER_POS_KEY = 'vit.embeddings.position_embeddings'
DECODER_POS_KEY = 'decoder.decoder_pos_embed'
# The sin-cos embedding in a state dict must match sincos_2d to this absolute tolerance.
SINCOS_ATOL = 1e-5

# Per transformer block: (mae_jax path within the block, transformers suffix, legacy suffix, kind).
_BLOCK_RULES = (
    (('attn', 'query', 'kernel'), 'attention.q_proj.weight', 'attention.attention.query.weight',
     'qkv'),
    (('attn', 'query', 'bias'), 'attention.q_proj.bias', 'attention.attention.query.bias', 'flat'),
    (('attn', 'key', 'kernel'), 'attention.k_proj.weight', 'attention.attention.key.weight', 'qkv'),
    (('attn', 'key', 'bias'), 'attention.k_proj.bias', 'attention.attention.key.bias', 'flat'),
    (('attn', 'value', 'kernel'), 'attention.v_proj.weight', 'attention.attention.value.weight',
     'qkv'),
    (('attn', 'value', 'bias'), 'attention.v_proj.bias', 'attention.attention.value.bias', 'flat'),
    (('attn', 'out', 'kernel'), 'attention.o_proj.weight', 'attention.output.dense.weight', 'out'),
    (('attn', 'out', 'bias'), 'attention.o_proj.bias', 'attention.output.dense.bias', 'same'),
    (('norm1', 'scale'), 'layernorm_before.weight', 'layernorm_before.weight', 'same'),
    (('norm1', 'bias'), 'layernorm_before.bias', 'layernorm_before.bias', 'same'),
    (('norm2', 'scale'), 'layernorm_after.weight', 'layernorm_after.weight', 'same'),
    (('norm2', 'bias'), 'layernorm_after.bias', 'layernorm_after.bias', 'same'),
    (('mlp', 'fc1', 'kernel'), 'mlp.fc1.weight', 'intermediate.dense.weight', 'linear'),
    (('mlp', 'fc1', 'bias'), 'mlp.fc1.bias', 'intermediate.dense.bias', 'same'),
    (('mlp', 'fc2', 'kernel'), 'mlp.fc2.weight', 'output.dense.weight', 'linear'),
    (('mlp', 'fc2', 'bias'), 'mlp.fc2.bias', 'output.dense.bias', 'same'),
)


class _Rule(NamedTuple):
  """One parameter: its mae_jax path, transformers key, legacy transformers key and layout kind."""
  path: tuple[str, ...]
  key: str
  legacy_key: str
  kind: str


def _check_part(part: str) -> None:
  if part not in PARTS:
    raise ValueError(f'part must be one of {PARTS}, got {part!r}')


def _rules(model: MaskedAutoencoder, part: str = 'mae') -> list[_Rule]:
  """The parameter correspondence for ``model`` (unscanned layout) or its encoder."""
  _check_part(part)
  if model.pos_embedding not in ('sincos', 'learned'):
    raise ValueError(f'unknown pos_embedding {model.pos_embedding!r}')

  def top(path, key, kind):
    return _Rule(path, key, key, kind)

  rules = [
      top(('patch_embed', 'kernel'), 'vit.embeddings.patch_embeddings.projection.weight', 'patch'),
      top(('patch_embed', 'bias'), 'vit.embeddings.patch_embeddings.projection.bias', 'same'),
      top(('cls_token',), 'vit.embeddings.cls_token', 'same'),
  ]
  if model.pos_embedding == 'learned':
    rules.append(top(('pos_embedding',), ENCODER_POS_KEY, 'same'))
  for i in range(model.depth):
    for path, key, legacy, kind in _BLOCK_RULES:
      rules.append(_Rule(('encoder', f'block_{i}') + path, f'vit.layers.{i}.{key}',
                         f'vit.encoder.layer.{i}.{legacy}', kind))
  rules += [
      top(('encoder_norm', 'scale'), 'vit.layernorm.weight', 'same'),
      top(('encoder_norm', 'bias'), 'vit.layernorm.bias', 'same'),
  ]
  if part == 'encoder':
    return rules
  rules += [
      top(('decoder_embed', 'kernel'), 'decoder.decoder_embed.weight', 'linear'),
      top(('decoder_embed', 'bias'), 'decoder.decoder_embed.bias', 'same'),
      top(('mask_token',), 'decoder.mask_token', 'same'),
  ]
  if model.pos_embedding == 'learned':
    rules.append(top(('decoder_pos_embedding',), DECODER_POS_KEY, 'same'))
  for i in range(model.decoder_depth):
    for path, key, legacy, kind in _BLOCK_RULES:
      rules.append(_Rule(('decoder', f'block_{i}') + path, f'decoder.decoder_layers.{i}.{key}',
                         f'decoder.decoder_layers.{i}.{legacy}', kind))
  rules += [
      top(('decoder_norm', 'scale'), 'decoder.decoder_norm.weight', 'same'),
      top(('decoder_norm', 'bias'), 'decoder.decoder_norm.bias', 'same'),
      top(('decoder_pred', 'kernel'), 'decoder.decoder_pred.weight', 'linear'),
      top(('decoder_pred', 'bias'), 'decoder.decoder_pred.bias', 'same'),
  ]
  return rules


def _fixed_position_embeddings(model: MaskedAutoencoder,
                               part: str = 'mae') -> dict[str, np.ndarray]:
  """The sin-cos position embeddings transformers keeps as tensors; empty when learned."""
  if model.pos_embedding != 'sincos':
    return {}
  fixed = {ENCODER_POS_KEY: vit.sincos_2d(model.width, model.grid_size)[None]}
  if part == 'mae':
    fixed[DECODER_POS_KEY] = vit.sincos_2d(model.decoder_width, model.grid_size)[None]
  return fixed


def _hf_shape(kind: str, shape: tuple[int, ...], model: MaskedAutoencoder) -> tuple[int, ...]:
  """The transformers tensor shape for a mae_jax param of ``shape``."""
  if kind == 'same':
    return tuple(shape)
  if kind == 'flat':
    return (math.prod(shape),)
  if kind == 'linear':
    return (shape[1], shape[0])
  if kind == 'qkv':  # (embed, heads, head_dim) -> (heads * head_dim, embed)
    return (shape[1] * shape[2], shape[0])
  if kind == 'out':  # (heads, head_dim, embed) -> (embed, heads * head_dim)
    return (shape[2], shape[0] * shape[1])
  if kind == 'patch':  # (p * p * C, D) -> (D, C, p, p)
    return (shape[1], model.num_channels, model.patch_size, model.patch_size)
  raise AssertionError(kind)


def _to_hf(kind: str, x: np.ndarray, model: MaskedAutoencoder) -> np.ndarray:
  if kind == 'same':
    return x
  if kind == 'flat':
    return x.reshape(-1)
  if kind == 'linear':
    return x.T
  if kind == 'qkv':
    return x.reshape(x.shape[0], -1).T
  if kind == 'out':
    return x.reshape(-1, x.shape[-1]).T
  if kind == 'patch':
    # Row (i * p + j) * C + c of the kernel multiplies pixel (i, j, c) of the patch, which the
    # Conv2d weight holds at [:, c, i, j].
    p, c = model.patch_size, model.num_channels
    return x.reshape(p, p, c, x.shape[-1]).transpose(3, 2, 0, 1)
  raise AssertionError(kind)


def _from_hf(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if kind in ('same', 'flat'):
    return w.reshape(shape)
  if kind in ('linear', 'qkv', 'out'):
    return w.T.reshape(shape)
  if kind == 'patch':  # (D, C, p, p) -> (p, p, C, D) -> (p * p * C, D)
    return w.transpose(2, 3, 1, 0).reshape(shape)
  raise AssertionError(kind)


def param_shapes(model: MaskedAutoencoder,
                 part: str = 'mae') -> dict[tuple[str, ...], tuple[int, ...]]:
  """The shape of every param of ``model`` (or its encoder), by path, without allocating."""
  _check_part(part)
  size, channels = model.image_size, model.num_channels
  # Unboxing applies sharding constraints (under a mesh), so it happens inside the trace.
  params = jax.eval_shape(
      lambda *args: flax.core.meta.unbox(model.init(*args)['params']), jax.random.key(0),
      jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32),
      jax.ShapeDtypeStruct((1, size, size, channels), jnp.bool_),
      jax.ShapeDtypeStruct((1, model.num_patches), jnp.float32))
  return {path: tuple(leaf.shape)
          for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()
          if part == 'mae' or path[0] in mae.ENCODER_PARAMS}


def unscan_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """Params of a ``scan_layers=True`` model in the per-block layout (``encoder/block_{i}``).

  Only the ``encoder`` and ``decoder`` transformers change: their ``blocks`` sub-tree, whose
  leaves carry a leading layers axis, becomes one ``block_{i}`` sub-tree per layer.
  """
  out = dict(params)
  for name in ('encoder', 'decoder'):
    if name in out and SCANNED_BLOCKS in out[name]:
      blocks = out[name][SCANNED_BLOCKS]
      depth = jax.tree.leaves(blocks)[0].shape[0]
      out[name] = {f'block_{i}': jax.tree.map(lambda x, i=i: np.asarray(x)[i], blocks)
                   for i in range(depth)}
  return out


def scan_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of :func:`unscan_params`: ``block_{i}`` sub-trees stacked into ``blocks``."""
  out = dict(params)
  for name in ('encoder', 'decoder'):
    if name in out and 'block_0' in out[name]:
      blocks = [out[name][f'block_{i}'] for i in range(len(out[name]))]
      out[name] = {SCANNED_BLOCKS: jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
  return out


def check_paths(expected: set, actual: set, what: str) -> None:
  missing, unexpected = sorted(expected - actual), sorted(actual - expected)
  if missing or unexpected:
    raise ValueError(f'{what} do not match the model: missing {missing[:8]}'
                     f'{" ..." if len(missing) > 8 else ""}, unexpected {unexpected[:8]}'
                     f'{" ..." if len(unexpected) > 8 else ""}')


def as_float32_numpy(value: Any) -> np.ndarray:
  """A C-contiguous float32 numpy copy of a numpy, jax or torch array."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch.
    value = value.detach().cpu()
    if not value.dtype.is_floating_point:
      raise ValueError(f'expected a floating-point tensor, got {value.dtype}')
    if value.dtype.itemsize < 4:  # numpy has no bfloat16; widening is exact.
      value = value.float()
    value = value.numpy()
  return np.array(value, dtype=np.float32, order='C')


def hf_config_dict(model: MaskedAutoencoder, part: str = 'mae') -> dict[str, Any]:
  """The keyword arguments of ``transformers.ViTMAEConfig`` describing ``model``.

  Args:
    model: the mae_jax module.
    part: 'mae', or 'encoder' for an encoder alone (the loss settings then do not matter).

  Returns:
    A dict for ``ViTMAEConfig(**hf_config_dict(model))``.

  Raises:
    ValueError: for ``norm_pix_loss='patch_channel'`` of a whole MAE, which transformers cannot
      express.
  """
  _check_part(part)
  if part == 'mae' and model.norm_pix_loss not in ('none', 'patch'):
    raise ValueError(f'transformers ViT-MAE normalises targets per patch or not at all; '
                     f'norm_pix_loss={model.norm_pix_loss!r} has no equivalent')
  return dict(
      image_size=int(model.image_size),
      patch_size=int(model.patch_size),
      num_channels=int(model.num_channels),
      hidden_size=int(model.width),
      num_hidden_layers=int(model.depth),
      num_attention_heads=int(model.heads),
      intermediate_size=int(model.mlp_dim),
      decoder_hidden_size=int(model.decoder_width),
      decoder_num_hidden_layers=int(model.decoder_depth),
      decoder_num_attention_heads=int(model.decoder_heads),
      decoder_intermediate_size=int(model.decoder_mlp_dim),
      mask_ratio=float(model.mask_ratio),
      norm_pix_loss=model.norm_pix_loss == 'patch',
      layer_norm_eps=float(model.layer_norm_eps),
      hidden_act='gelu',  # Exact (erf) GELU in transformers, as nn.gelu(approximate=False) here.
      qkv_bias=True,
      hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0,
  )


def to_hf_state_dict(model: MaskedAutoencoder, params: Mapping[str, Any],
                     legacy_keys: bool = False, part: str = 'mae') -> dict[str, np.ndarray]:
  """Converts mae_jax params to a ``ViTMAEForPreTraining`` state dict of float32 numpy arrays.

  Args:
    model: the module the params belong to (scanned or not).
    params: its params, unboxed or boxed, with or without the outer ``{'params': ...}``. With
      ``part='encoder'`` only the encoder's are read (others, such as a head, are ignored).
    legacy_keys: write the transformers 4.x / Hub key names instead of the installed ones.
    part: 'mae' (the whole model) or 'encoder'.

  Returns:
    ``{key: array}`` in transformers' layouts; wrap the values with ``torch.from_numpy`` for
    ``load_state_dict``. Sin-cos position embeddings are filled with ``vit.sincos_2d``.

  Raises:
    ValueError: for params that do not match the model.
  """
  params = flax.core.unfreeze(flax.core.meta.unbox(params))
  if set(params) == {'params'}:
    params = params['params']
  if part == 'encoder':
    params = {k: v for k, v in params.items() if k in mae.ENCODER_PARAMS}
  if model.scan_layers:
    params, model = unscan_params(params), model.clone(scan_layers=False)
  rules = _rules(model, part)
  flat = flax.traverse_util.flatten_dict(params)
  shapes = param_shapes(model, part)
  check_paths(set(shapes), set(flat), 'params')
  check_paths(set(shapes), {rule.path for rule in rules}, 'conversion rules')
  state = {}
  for rule in rules:
    x = as_float32_numpy(jax.device_get(flat[rule.path]))
    if x.shape != shapes[rule.path]:
      raise ValueError(f'param {"/".join(rule.path)} has shape {x.shape}, '
                       f'the model expects {shapes[rule.path]}')
    state[rule.legacy_key if legacy_keys else rule.key] = np.ascontiguousarray(
        _to_hf(rule.kind, x, model))
  state.update(_fixed_position_embeddings(model, part))
  return state


def encoder_state_dict_for_model(state: Mapping[str, Any]) -> dict[str, Any]:
  """An encoder state dict under ``ViTMAEModel``'s names (without the ``vit.`` prefix)."""
  out = {}
  for key, value in state.items():
    if not key.startswith(ENCODER_PREFIX):
      raise ValueError(f'{key} is not an encoder key (expected the {ENCODER_PREFIX!r} prefix)')
    out[key[len(ENCODER_PREFIX):]] = value
  return out


def canonical_key(key: str) -> str:
  """A transformers ViT-MAE key under ``ViTMAEForPreTraining``'s names (installed or legacy).

  Adds the ``vit.`` prefix to ``ViTMAEModel`` keys (``embeddings.*``, ``layers.*``,
  ``encoder.layer.*``, ``layernorm.*``), and renames ``decoder.decoder_encoder.layer.{i}``,
  which transformers 5.x's ``save_pretrained`` writes for the legacy
  ``decoder.decoder_layers.{i}``; other keys are unchanged.
  """
  if key.startswith(('embeddings.', 'layers.', 'encoder.layer.', 'layernorm.')):
    return ENCODER_PREFIX + key
  saved_decoder = 'decoder.decoder_encoder.layer.'
  if key.startswith(saved_decoder):
    return 'decoder.decoder_layers.' + key[len(saved_decoder):]
  return key


def from_hf_state_dict(model: MaskedAutoencoder, state_dict: Mapping[str, Any],
                       part: str = 'mae') -> dict[str, Any]:
  """Converts a ``ViTMAEForPreTraining`` state dict to mae_jax params; inverse of the above.

  Args:
    model: the module to load into (scanned or not); its config must match the state dict's
      (compare ``hf_config_dict(model)`` with the transformers config).
    state_dict: ``{key: tensor}`` with torch tensors or numpy/jax arrays, under the installed
      transformers' key names or the legacy (Hub / 4.x) ones, with or without the ``vit.``
      prefix of the encoder (``ViTMAEForPreTraining`` or ``ViTMAEModel``). For a sin-cos model
      the position embeddings may be left out; if present they must equal ``vit.sincos_2d`` (to
      ``SINCOS_ATOL``), since mae_jax does not store them.
    part: 'mae' (every key must be there) or 'encoder' (only the encoder's; any other key is
      an error).

  Returns:
    Unboxed params (of the encoder alone for ``part='encoder'``): a nested dict of float32
    numpy arrays in ``model``'s layout, for ``model.apply({'params': p}, ...)``.

  Raises:
    ValueError: on missing, unexpected, duplicated or misshapen keys, or sin-cos position
      embeddings that are not sin-cos.
  """
  scanned = model.scan_layers
  model = model.clone(scan_layers=False)
  rules = _rules(model, part)
  shapes = param_shapes(model, part)
  check_paths(set(shapes), {rule.path for rule in rules}, 'conversion rules')
  by_key = {}
  for rule in rules:
    by_key[rule.key] = by_key[rule.legacy_key] = rule
  fixed = _fixed_position_embeddings(model, part)

  found, unexpected = {}, []
  for key, value in state_dict.items():
    key = canonical_key(key)
    if key in fixed:
      array = as_float32_numpy(value)
      if array.shape != fixed[key].shape or not np.allclose(array, fixed[key], rtol=0.0,
                                                             atol=SINCOS_ATOL):
        raise ValueError(f'{key} (shape {array.shape}) is not the {fixed[key].shape} sin-cos '
                         f'embedding this model uses; drop it, or convert into a model with '
                         f"pos_embedding='learned'")
      continue
    rule = by_key.get(key)
    if rule is None:
      unexpected.append(key)
      continue
    if rule.path in found:
      raise ValueError(f'{rule.key} is given twice (under both key namings)')
    found[rule.path] = (key, value)
  missing = [rule.key for rule in rules if rule.path not in found]
  if missing or unexpected:
    raise ValueError(f'state dict does not match the model: missing {missing[:8]}'
                     f'{" ..." if len(missing) > 8 else ""}, unexpected {sorted(unexpected)[:8]}'
                     f'{" ..." if len(unexpected) > 8 else ""}')

  flat = {}
  for rule in rules:
    key, value = found[rule.path]
    w = as_float32_numpy(value)
    expected = _hf_shape(rule.kind, shapes[rule.path], model)
    if w.shape != expected:
      raise ValueError(f'{key} has shape {w.shape}, the model expects {expected}')
    flat[rule.path] = np.ascontiguousarray(_from_hf(rule.kind, w, shapes[rule.path]))
  params = flax.traverse_util.unflatten_dict(flat)
  return scan_params(params) if scanned else params
