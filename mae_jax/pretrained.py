r"""Starting from MAE weights published in PyTorch: ``--config.init_from=PATH``.

``PATH`` is one of
  * an official MAE checkpoint (facebookresearch/mae): ``mae_pretrain_vit_base.pth`` (encoder
    only) or ``mae_visualize_vit_base.pth`` (encoder and decoder); read with ``torch.load``;
  * a transformers ``ViTMAEForPreTraining`` or ``ViTMAEModel`` folder (``config.json`` plus
    ``model.safetensors`` or ``pytorch_model.bin``), e.g. ``facebook/vit-mae-base`` downloaded,
    or what ``python -m mae_jax.tools.export`` writes;
  * a single ``.safetensors`` file in transformers' names.

The encoder (width, depth, MLP width, patch size; heads where the source says) must equal
``config.model``'s; what may differ is adapted by these rules:

* **Channels** (``config.init_from_channels``). The patch embedding's weight for each input
  channel is rebuilt from the source's ``C_src`` channels (3 for ImageNet):
  ``'mean'`` (default): every one of the ``C`` channels gets the mean of the source channels'
  filters times ``C_src / C``. SAR bands have no counterpart among red, green and blue, so no
  channel is singled out; and an image whose ``C`` channels all equal ``x`` gives exactly the
  response the source model gives to the grey image ``(x, x, x)``.
  ``'repeat'``: timm's ``adapt_input_conv``: the source filters repeated in order
  (R, G, B, R, G, B, ...) up to ``C``, times ``C_src / C``; same grey-image property.
  The decoder's prediction layer (``p * p * C`` outputs) is adapted the same way without the
  scaling: the mean (or the repeat) of the source channels' rows, so each channel is first
  predicted as the grey value.
* **Position embeddings**. Fixed sin-cos tables (official MAE and transformers) are recomputed
  for the target grid (28 x 28 for 448 px tiles, 14 x 14 in ImageNet's 224 px); a learned
  target table starts as that sin-cos table exactly. A learned source table is resized
  bicubically to the target grid (the cls entry kept), exactly as MAE's PyTorch
  ``interpolate_pos_embed`` does it.
* **Decoder**. Imported when the source has one of the target's size (``mae_visualize_*``,
  transformers' pretraining models); otherwise it starts from its initialisation.

Only parameters move: the optimiser starts fresh and the step at 0. The input normalisation is
the training data's own (ImageNet's RGB statistics mean nothing for SAR).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import flax
import jax
import numpy as np

from mae_jax.models import hf_convert
from mae_jax.models import mae
from mae_jax.models import official_mae
from mae_jax.models import vit

CHANNEL_RULES = ('mean', 'repeat')
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
# transformers' index of a model saved in several safetensors shards.
SHARDED_INDEX = 'model.safetensors.index.json'
TORCH_SUFFIXES = ('.pth', '.pt', '.bin')

_ENCODER_LAYER = re.compile(r'^vit\.(?:layers|encoder\.layer)\.(\d+)\.')
_DECODER_LAYER = re.compile(r'^decoder\.decoder_layers\.(\d+)\.')
PATCH_KEY = 'vit.embeddings.patch_embeddings.projection.weight'
DECODER_EMBED_KEY = 'decoder.decoder_embed.weight'


@dataclasses.dataclass
class ImportedWeights:
  """Params read from ``source`` in the target model's layout, and what was done to them."""
  params: dict[str, Any]  # Nested float32 numpy arrays; top-level names are a subset.
  source: str
  notes: list[str]

  @property
  def part(self) -> str:
    return 'mae' if 'decoder' in self.params else 'encoder'


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
  """(state dict under transformers' names as float32 numpy, the source's config.json or None).

  Raises:
    FileNotFoundError: for a missing path or a folder without weights.
    ValueError: for an unknown file type or keys that are not an MAE's.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'init_from: {path!r} does not exist')
  config = None
  weights = path
  if os.path.isdir(path):
    config_path = os.path.join(path, 'config.json')
    if os.path.exists(config_path):
      with open(config_path) as f:
        config = json.load(f)
    index = os.path.join(path, SHARDED_INDEX)
    found = [os.path.join(path, name) for name in WEIGHT_FILES
             if os.path.exists(os.path.join(path, name))]
    if not found and not os.path.exists(index):
      raise FileNotFoundError(f'init_from: no {" or ".join(WEIGHT_FILES)} (nor {SHARDED_INDEX}) '
                              f'in {path!r}')
    weights = found[0] if found else index
  if weights.endswith(('.safetensors', SHARDED_INDEX)):
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    if weights.endswith(SHARDED_INDEX):  # Large models: shards listed in the index.
      with open(weights) as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      state = {}
      for shard in shards:
        state.update(safetensors_numpy.load_file(os.path.join(os.path.dirname(weights), shard)))
    else:
      state = safetensors_numpy.load_file(weights)
  elif weights.endswith(TORCH_SUFFIXES):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'reading {weights} needs PyTorch (pip install -r '
                        'requirements-parity.txt), or convert it to .safetensors first') from e
    state = official_mae.unwrap(torch.load(weights, map_location='cpu', weights_only=True))
  else:
    raise ValueError(f'init_from: {weights!r} is neither a .safetensors nor a PyTorch '
                     f'({", ".join(TORCH_SUFFIXES)}) file nor a transformers folder')
  not_arrays = [k for k, v in state.items() if not hasattr(v, 'shape')]
  if not_arrays:
    raise ValueError(f'{weights}: entries that are not tensors: {not_arrays[:8]}')
  state = {k: hf_convert.as_float32_numpy(v) for k, v in state.items()}
  if official_mae.is_official(state):
    state = official_mae.to_hf_names(state)
  else:
    state = {hf_convert.canonical_key(k): v for k, v in state.items()}
  if PATCH_KEY not in state:
    raise ValueError(f'{weights}: no {PATCH_KEY} (nor patch_embed.proj.weight): not a ViT-MAE')
  return state, config


def _count_layers(state, pattern) -> int:
  indices = {int(m.group(1)) for m in map(pattern.match, state) if m}
  return max(indices) + 1 if indices else 0


def _layer_weight(state, prefixes, suffixes) -> np.ndarray | None:
  for prefix in prefixes:
    for suffix in suffixes:
      if prefix + suffix in state:
        return state[prefix + suffix]
  return None


def _is_sincos(table: np.ndarray) -> bool:
  grid = int(round((table.shape[1] - 1)**0.5))
  if grid * grid != table.shape[1] - 1 or table.shape[2] % 4:
    return False
  return np.allclose(table[0], vit.sincos_2d(table.shape[2], grid), rtol=0.0,
                     atol=hf_convert.SINCOS_ATOL)


def describe_source(state: Mapping[str, np.ndarray], config: Mapping[str, Any] | None,
                    target: mae.MaskedAutoencoder) -> tuple[dict[str, Any], bool]:
  """(MaskedAutoencoder fields of the source model, whether it has a decoder).

  Sizes come from the weights' shapes; the number of heads (not visible in shapes) from the
  source's config.json, else the target's. Fields that cannot differ are the target's.
  """
  config = dict(config or {})
  width, channels, patch, _ = state[PATCH_KEY].shape
  fc1 = _layer_weight(state, ('vit.layers.0.', 'vit.encoder.layer.0.'),
                      ('mlp.fc1.weight', 'intermediate.dense.weight'))
  pos = state.get(hf_convert.ENCODER_POS_KEY)
  if pos is not None:
    grid = int(round((pos.shape[1] - 1)**0.5))
  elif config.get('image_size'):
    grid = int(config['image_size']) // patch
  else:
    grid = target.grid_size
  fields = dict(
      image_size=grid * patch, patch_size=patch, num_channels=channels, width=width,
      depth=_count_layers(state, _ENCODER_LAYER),
      heads=int(config.get('num_attention_heads', target.heads)),
      mlp_dim=fc1.shape[0] if fc1 is not None else target.mlp_dim,
      pos_embedding='learned' if pos is not None and not _is_sincos(pos) else 'sincos',
      scan_layers=False, dtype=np.float32)
  has_decoder = DECODER_EMBED_KEY in state
  if has_decoder:
    decoder_fc1 = _layer_weight(state, ('decoder.decoder_layers.0.',),
                                ('mlp.fc1.weight', 'intermediate.dense.weight'))
    fields.update(
        decoder_width=state[DECODER_EMBED_KEY].shape[0],
        decoder_depth=_count_layers(state, _DECODER_LAYER),
        decoder_heads=int(config.get('decoder_num_attention_heads', target.decoder_heads)),
        decoder_mlp_dim=(decoder_fc1.shape[0] if decoder_fc1 is not None
                         else target.decoder_mlp_dim))
  return fields, has_decoder


def _differences(source: Mapping[str, Any], target: mae.MaskedAutoencoder, names) -> list[str]:
  return [f'{name}: source {source[name]} != config {getattr(target, name)}'
          for name in names if source[name] != getattr(target, name)]


def adapt_channels(weights: np.ndarray, channels: int, rule: str, scale: bool) -> np.ndarray:
  """(..., C_src) -> (..., channels) by ``rule`` (module docstring); ``scale`` multiplies by
  ``C_src / channels`` (the patch embedding's input side)."""
  if rule not in CHANNEL_RULES:
    raise ValueError(f'init_from_channels must be one of {CHANNEL_RULES}, got {rule!r}')
  source = weights.shape[-1]
  if source == channels:
    return weights
  if rule == 'mean':
    out = np.repeat(weights.mean(-1, keepdims=True), channels, axis=-1)
  else:
    out = np.tile(weights, -(-channels // source))[..., :channels]
  if scale:
    out = out * (source / channels)
  return out.astype(np.float32)


def _cubic_weights(size_in: int, size_out: int) -> np.ndarray:
  """The (size_out, size_in) matrix of PyTorch's bicubic resize along one axis.

  Matches ``torch.nn.functional.interpolate(mode='bicubic', align_corners=False)``, which MAE's
  ``interpolate_pos_embed`` uses: Keys' cubic with a = -0.75, source coordinate
  ``(i + 0.5) * size_in / size_out - 0.5``, out-of-range taps clamped to the edge, no
  antialiasing. ``jax.image.resize`` differs (a = -0.5, antialiased when shrinking), so a table
  moved by it would not be the one the PyTorch code would have trained with.
  """
  a = -0.75

  def kernel(d):
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))

  source = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
  floor = np.floor(source)
  weights = np.zeros((size_out, size_in))
  for tap in range(-1, 3):
    index = np.clip(floor + tap, 0, size_in - 1).astype(int)
    np.add.at(weights, (np.arange(size_out), index), kernel(source - (floor + tap)))
  return weights


def resize_position_table(table: np.ndarray, grid: int) -> np.ndarray:
  """A learned (1, 1 + g * g, D) table resized to (1, 1 + grid * grid, D), cls entry kept.

  Bicubic as MAE's ``interpolate_pos_embed`` does it in PyTorch (``_cubic_weights``).
  """
  old = int(round((table.shape[1] - 1)**0.5))
  if old * old != table.shape[1] - 1:
    raise ValueError(f'a position table of {table.shape[1]} entries is not 1 + a square grid')
  if old == grid:
    return table
  weights = _cubic_weights(old, grid)
  patches = np.asarray(table[0, 1:], np.float64).reshape(old, old, -1)
  resized = np.einsum('yi,xj,ijd->yxd', weights, weights, patches).reshape(grid * grid, -1)
  return np.concatenate([table[0, :1], resized.astype(table.dtype)])[None]


def _adapt(params: dict[str, Any], source: mae.MaskedAutoencoder, target: mae.MaskedAutoencoder,
           rule: str, notes: list[str]) -> dict[str, Any]:
  """Source-layout params -> target channels and position tables (module docstring)."""
  p = target.patch_size
  if source.num_channels != target.num_channels:
    kernel = params['patch_embed']['kernel'].reshape(p, p, source.num_channels, -1)
    kernel = adapt_channels(np.moveaxis(kernel, 2, -1), target.num_channels, rule, scale=True)
    params['patch_embed']['kernel'] = np.moveaxis(kernel, -1, 2).reshape(-1, target.width)
    if 'decoder_pred' in params:
      pred = params['decoder_pred']
      width = pred['kernel'].shape[0]
      pred['kernel'] = adapt_channels(pred['kernel'].reshape(width, p, p, -1),
                                      target.num_channels, rule, scale=False).reshape(width, -1)
      pred['bias'] = adapt_channels(pred['bias'].reshape(p, p, -1), target.num_channels, rule,
                                    scale=False).reshape(-1)
    notes.append(f'patch embedding adapted from {source.num_channels} to '
                 f'{target.num_channels} channels by the {rule!r} rule')
  tables = (('pos_embedding', target.width),) + (
      (('decoder_pos_embedding', target.decoder_width),) if 'decoder' in params else ())
  for name, width in tables:
    if target.pos_embedding == 'learned' and source.pos_embedding == 'sincos':
      params[name] = vit.sincos_2d(width, target.grid_size)[None]
    elif target.pos_embedding == 'learned':
      params[name] = resize_position_table(params[name], target.grid_size).astype(np.float32)
  if source.pos_embedding == 'learned' and target.pos_embedding == 'sincos':
    raise ValueError('the source has learned position embeddings; fixed sin-cos ones cannot hold '
                     "them: set config.model.pos_embedding='learned'")
  if source.grid_size != target.grid_size:
    notes.append(f'position embeddings moved from a {source.grid_size} x {source.grid_size} to '
                 f'a {target.grid_size} x {target.grid_size} grid '
                 f'({"resized bicubically" if source.pos_embedding == "learned" else "sin-cos"})')
  return params


def import_weights(path: str, target: mae.MaskedAutoencoder, channel_rule: str = 'mean',
                   part: str = 'mae') -> ImportedWeights:
  """Reads ``path`` and converts it into ``target``'s params (module docstring).

  Args:
    path: official ``.pth``, transformers folder or ``.safetensors`` file.
    target: the model to start (a ``MaskedAutoencoder`` or ``DownstreamModel``).
    channel_rule: one of ``CHANNEL_RULES``.
    part: 'mae' imports the decoder too where the source has a matching one; 'encoder' never.

  Returns:
    The params of the encoder (and decoder), in ``target``'s layout (scanned or not).

  Raises:
    ValueError: naming each size that differs between the source and ``target``.
  """
  if channel_rule not in CHANNEL_RULES:
    raise ValueError(f'init_from_channels must be one of {CHANNEL_RULES}, got {channel_rule!r}')
  state, config = read_state_dict(path)
  fields, has_decoder = describe_source(state, config, target)
  diffs = _differences(fields, target, ('patch_size', 'width', 'depth', 'heads', 'mlp_dim'))
  if diffs:
    raise ValueError(f'init_from {path}: the encoder differs from config.model: '
                     + '; '.join(diffs))
  notes = []
  if config and 'layer_norm_eps' in config and config['layer_norm_eps'] != target.layer_norm_eps:
    notes.append(f'the source used LayerNorm eps {config["layer_norm_eps"]}, this model uses '
                 f'{target.layer_norm_eps}')
  use_decoder = part == 'mae' and has_decoder
  if use_decoder:
    decoder_diffs = _differences(fields, target, ('decoder_width', 'decoder_depth',
                                                  'decoder_heads', 'decoder_mlp_dim'))
    if decoder_diffs:
      use_decoder = False
      notes.append('decoder not imported (' + '; '.join(decoder_diffs) + '): it starts from '
                   'its initialisation')
  elif part == 'mae':
    notes.append('the source has no decoder: it starts from its initialisation')
  source = mae.MaskedAutoencoder(**{**mae.module_fields(target), **fields})
  if not use_decoder:
    state = {k: v for k, v in state.items() if k.startswith(hf_convert.ENCODER_PREFIX)}
  params = hf_convert.from_hf_state_dict(source, state, part='mae' if use_decoder else 'encoder')
  params = _adapt(params, source, target, channel_rule, notes)
  unscanned_target = mae.MaskedAutoencoder(**{**mae.module_fields(target), 'scan_layers': False})
  expected = hf_convert.param_shapes(unscanned_target, 'mae' if use_decoder else 'encoder')
  flat = flax.traverse_util.flatten_dict(params)
  hf_convert.check_paths(set(expected), set(flat), f'params imported from {path}')
  for key, shape in expected.items():
    if flat[key].shape != shape:
      raise ValueError(f'imported {"/".join(key)} has shape {flat[key].shape}, the model '
                       f'expects {shape}')
  if target.scan_layers:
    params = hf_convert.scan_params(params)
  return ImportedWeights(params=params, source=path, notes=notes)


def place(params: Any, imported: ImportedWeights, shardings: Any) -> Any:
  """``params`` with the imported leaves put in, each onto its sharding; the rest kept."""
  flat = flax.traverse_util.flatten_dict(params)
  flat_shardings = flax.traverse_util.flatten_dict(shardings)
  for path, value in flax.traverse_util.flatten_dict(imported.params).items():
    if path not in flat:
      raise ValueError(f'imported param {"/".join(path)} is not a param of this model')
    if tuple(flat[path].shape) != value.shape:
      raise ValueError(f'imported {"/".join(path)} has shape {value.shape}, the model has '
                       f'{tuple(flat[path].shape)}')
    value = value.astype(flat[path].dtype)
    # Each device takes its own slice of the host copy (every process holds the whole array).
    flat[path] = jax.make_array_from_callback(value.shape, flat_shardings[path],
                                              lambda index, value=value: value[index])
  return flax.traverse_util.unflatten_dict(flat)
