"""ONNX graph of a fine-tuned model (MAE encoder + head), written op by op from its weights.

The graph mirrors the Flax modules (``mae_jax.models.mae``, ``vit``, ``heads``) one function per
module kind, so it runs anywhere onnxruntime (or another ONNX runtime) does, with no JAX:

* input ``backscatter_db`` (N, S, S, C) float32: raw dB tiles in the input contract's band order,
  NaN (or +-inf) for no-data; N is dynamic;
* preprocessing inside the graph, as every tile the model saw was made: values clipped to the
  contract's ``clip_range`` (``data_pipeline.writer.quantise_image``, ``scene_reader``) and, for
  a model of uint8 data, to each band's code range and rounded to its code step
  (``data_pipeline.quantise``: the values its tiles decoded to), then
  ``mae_jax.preprocess.normalise``: ``(x - mean) / std`` per band, non-finite values -> 0;
* encoder: patchify, patch embedding, position embeddings and the cls token, every patch kept
  (fine-tuning never masks), pre-LN blocks (q, k and v as one matmul, exact erf GELU; drop path is
  the identity at inference; no layer scale in this ViT), final LayerNorm;
* head: VCF (token conv, width conv, fully connected layers, ``100 * sigmoid``), SETR-PUP
  (3x3 convs with their eval-mode BatchNorm folded in, ReLU, bilinear x2 with half-pixel
  centres, 1x1 classifier, final resize) or the linear probe (BatchNorm folded into the linear
  layer);
* outputs, named for what they hold (:func:`output_specs`). No-data follows
  ``mae_jax.tools.predict``: a pixel without any valid band has no prediction (probabilities
  NaN, WorldCover code 0), and a VCF tile without any valid pixel has NaN tree cover.

Weights and arithmetic are float32 whatever dtype the run computed in (a bfloat16 run's own JAX
outputs differ from the graph's by bfloat16 rounding). Sizes (tile, patch, width, depth, heads,
head options) are read from the model object and the parameter shapes, never restated here.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper
from onnx import TensorProto

from data_pipeline import quantise
from data_pipeline import schema
from mae_jax.models import heads

# Opset 20: LayerNormalization (17) and exact GELU (20) are single ops; onnxruntime runs it from
# 1.17 on.
OPSET = 20
INPUT_NAME = 'backscatter_db'
MODEL_FILE = 'model.onnx'
# Weights above this many bytes go to a side file: a protobuf file cannot exceed 2 GiB (mae_h in
# float32 is 2.5 GB); 1 GiB leaves room for the graph (mae_l, 1.2 GB, goes there too).
EXTERNAL_DATA_BYTES = 1 << 30
EXTERNAL_DATA_FILE = MODEL_FILE + '.data'
# Prefix of the ONNX metadata_props keys this module writes.
METADATA_PREFIX = 'mae_jax:'


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One graph input or output: what the STAC MLM item and the ONNX value info both say."""
  name: str
  shape: tuple[int, ...]  # -1 for the dynamic batch.
  dim_order: tuple[str, ...]
  dtype: str  # A numpy dtype name.
  description: str
  # 'index': the last axis is the class, in schema.WORLDCOVER_CODES order; 'code': the values
  # are WorldCover codes (0 = no-data); '': no classes.
  classes: str = ''


def quantisation_note(contract: schema.InputContract) -> str:
  """What the graph does to values before normalising them, in words."""
  low, high = contract.clip_range
  note = f'clipped to [{low:g}, {high:g}] {contract.units}'
  if contract.storage_dtype == schema.UINT8:
    note += (', then to each band\'s uint8 code range and rounded to its step, as the training '
             f'tiles were stored ({contract.storage_summary()}, 254 steps)')
  return note


def input_spec(size: int, contract: schema.InputContract) -> TensorSpec:
  return TensorSpec(
      INPUT_NAME, (-1, size, size, contract.num_channels), ('batch', 'height', 'width', 'channel'),
      'float32',
      f'Sentinel-1 backscatter tiles in {contract.units}, bands in the order '
      f'{", ".join(contract.band_names)}; NaN marks no-data. Normalised inside the graph: '
      f'{quantisation_note(contract)}, (x - mean) / std per band (the band statistics), '
      'no-data -> 0.')


def output_specs(task: str, size: int) -> tuple[TensorSpec, ...]:
  """The graph's outputs for ``task`` on ``size`` px tiles, in graph order."""
  if task == 'vcf':
    return (TensorSpec(
        'tree_cover_percent', (-1,), ('batch',), 'float32',
        'Percent tree cover of each tile (MODIS VCF), 0..100; NaN for a tile without any valid '
        'pixel.'),)
  if task == 'worldcover':
    classes = schema.NUM_CLASSES
    return (
        TensorSpec('class_logits', (-1, size, size, classes),
                   ('batch', 'height', 'width', 'class'), 'float32',
                   'Per-pixel ESA WorldCover class logits (the model output, also at no-data '
                   'pixels).', classes='index'),
        TensorSpec('class_probabilities', (-1, size, size, classes),
                   ('batch', 'height', 'width', 'class'), 'float32',
                   'Per-pixel softmax of the logits; NaN at pixels without any valid band.',
                   classes='index'),
        TensorSpec('worldcover_code', (-1, size, size), ('batch', 'height', 'width'), 'uint8',
                   'Per-pixel ESA WorldCover code of the most probable class; 0 (no-data) at '
                   'pixels without any valid band.', classes='code'))
  raise ValueError(f'unknown task {task!r}: expected one of {heads.TASKS}')


@dataclasses.dataclass(frozen=True)
class Exported:
  """A built graph and what describes it."""
  model: onnx.ModelProto
  input: TensorSpec
  outputs: tuple[TensorSpec, ...]
  task: str
  head_kind: str
  hyperparameters: dict[str, Any]
  total_parameters: int
  weight_bytes: int


# --- Graph construction ----------------------------------------------------------------------


class _Graph:
  """Nodes and initialisers of the graph being built, with unique names."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._counts: collections.Counter = collections.Counter()

  def name(self, hint: str) -> str:
    self._counts[hint] += 1
    count = self._counts[hint]
    return hint if count == 1 else f'{hint}_{count - 1}'

  def const(self, hint: str, value: Any, dtype: Any = np.float32) -> str:
    """An initialiser holding ``value``; returns its name."""
    name = self.name(hint)
    self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name

  def shape(self, hint: str, dims) -> str:
    """An int64 shape or axes initialiser."""
    return self.const(hint, list(dims), np.int64)

  def op(self, op_type: str, inputs: list[str], hint: str, outputs: int = 1, **attrs):
    """Adds one node; returns its output name (a list of ``outputs`` names if more than one)."""
    names = [self.name(hint) for _ in range(outputs)]
    self.nodes.append(helper.make_node(op_type, inputs, names, name=names[0], **attrs))
    return names[0] if outputs == 1 else names


def _f32(array) -> np.ndarray:
  return np.asarray(array, np.float32)


def _preprocess(g: _Graph, images: str, contract: schema.InputContract) -> tuple[str, str]:
  """Clip, then ``preprocess.normalise``: (normalised (N, S, S, C), whether each pixel has a
  valid band (N, S, S))."""
  invalid = g.op('Or', [g.op('IsNaN', [images], 'is_nan'), g.op('IsInf', [images], 'is_inf')],
                 'invalid')
  valid = g.op('Not', [invalid], 'valid')
  low, high = contract.clip_range
  clipped = g.op('Clip', [images, g.const('clip_low', low), g.const('clip_high', high)], 'clipped')
  form = quantise.form_of(contract)
  if form.is_codes:
    # quantise.StorageForm.encode then decode, per band, with the same arithmetic: the code in
    # float64 (clip to the code range, round half to even as numpy's rint; float32 would round
    # values within its error of a half step the other way), the dB back in float32. No-data
    # is masked by `valid`.
    low64 = g.const('code_low_f64', form.low, np.float64)
    step64 = g.const('code_step_f64', form.step, np.float64)
    wide = g.op('Cast', [clipped], 'clipped_f64', to=TensorProto.DOUBLE)
    in_range = g.op('Min', [g.op('Max', [wide, low64], 'above_code_min'),
                            g.const('code_high_f64', form.high, np.float64)], 'in_code_range')
    steps = g.op('Round', [g.op('Div', [g.op('Sub', [in_range, low64], 'code_offset'), step64],
                                'code_steps')], 'codes_minus_one')
    steps = g.op('Cast', [steps], 'codes_minus_one_f32', to=TensorProto.FLOAT)
    clipped = g.op('Add', [g.op('Mul', [steps, g.const('code_step', form.step)], 'code_db'),
                           g.const('code_low', form.low)], 'decoded')
  z = g.op('Div', [g.op('Sub', [clipped, g.const('band_mean', contract.mean)], 'centred'),
                   g.const('band_std', contract.std)], 'z_score')
  normalised = g.op('Where', [valid, z, g.const('zero', 0.0)], 'normalised')
  any_valid = g.op('ReduceMax', [g.op('Cast', [valid], 'valid_float', to=TensorProto.FLOAT),
                                 g.shape('channel_axis', [-1])], 'valid_bands', keepdims=0)
  pixel_valid = g.op('Greater', [any_valid, g.const('half', 0.5)], 'pixel_valid')
  return normalised, pixel_valid


def _dense(g: _Graph, x: str, kernel, bias, hint: str) -> str:
  """``nn.Dense``: x @ kernel + bias over the last axis."""
  y = g.op('MatMul', [x, g.const(f'{hint}.kernel', kernel)], f'{hint}.matmul')
  return g.op('Add', [y, g.const(f'{hint}.bias', bias)], hint)


def _layer_norm(g: _Graph, x: str, p: dict, eps: float, hint: str) -> str:
  return g.op('LayerNormalization', [x, g.const(f'{hint}.scale', p['scale']),
                                     g.const(f'{hint}.bias', p['bias'])], hint, axis=-1,
              epsilon=float(eps))


def _patch_embedding(g: _Graph, images: str, p: dict, model) -> str:
  """``mae.patchify`` (row in patch, column in patch, channel) then the patch Dense: (N, L, D)."""
  grid, size, channels = model.grid_size, model.patch_size, model.num_channels
  x = g.op('Reshape', [images, g.shape('patch_grid', [-1, grid, size, grid, size, channels])],
           'patch_grid')
  x = g.op('Transpose', [x], 'patches_by_cell', perm=[0, 1, 3, 2, 4, 5])
  x = g.op('Reshape', [x, g.shape('patch_rows', [-1, grid * grid, size * size * channels])],
           'patches')
  return _dense(g, x, p['kernel'], p['bias'], 'patch_embed')


def _tokens(g: _Graph, patches: str, params: dict, position: np.ndarray) -> str:
  """Position embeddings and the cls token (``encode_patches`` without noise): (N, 1 + L, D)."""
  x = g.op('Add', [patches, g.const('pos_embedding.patches', position[:, 1:])], 'patch_tokens')
  cls = _f32(params['cls_token']) + position[:, :1]
  width = cls.shape[-1]
  batch = g.op('Shape', [x], 'batch_size', start=0, end=1)
  cls_shape = g.op('Concat', [batch, g.shape('cls_dims', [1, width])], 'cls_shape', axis=0)
  cls = g.op('Expand', [g.const('cls_token', cls), cls_shape], 'cls_tokens')
  return g.op('Concat', [cls, x], 'tokens', axis=1)


def _attention(g: _Graph, x: str, p: dict, tokens: int, hint: str) -> str:
  """``vit.SelfAttention``: q, k and v from one matmul, softmax(q k^T / sqrt(h)) v, out proj."""
  width, num_heads, head_dim = _f32(p['query']['kernel']).shape
  inner = num_heads * head_dim
  kernel = np.concatenate([_f32(p[n]['kernel']).reshape(width, inner)
                           for n in ('query', 'key', 'value')], axis=1)
  bias = np.concatenate([_f32(p[n]['bias']).reshape(inner) for n in ('query', 'key', 'value')])
  qkv = _dense(g, x, kernel, bias, f'{hint}.qkv')
  query, key, value = g.op('Split', [qkv], f'{hint}.split', outputs=3, num_outputs=3,
                               axis=-1)
  heads_shape = g.shape(f'{hint}.heads_shape', [-1, tokens, num_heads, head_dim])

  def split_heads(t, name, perm):
    return g.op('Transpose', [g.op('Reshape', [t, heads_shape], f'{hint}.{name}_heads')],
                f'{hint}.{name}_t', perm=perm)

  query = split_heads(query, 'query', [0, 2, 1, 3])  # (N, H, T, h)
  key = split_heads(key, 'key', [0, 2, 3, 1])  # (N, H, h, T)
  value = split_heads(value, 'value', [0, 2, 1, 3])
  # The query is scaled before the product, as vit.einsum_attention does.
  query = g.op('Mul', [query, g.const(f'{hint}.scale', head_dim**-0.5)], f'{hint}.scaled_query')
  logits = g.op('MatMul', [query, key], f'{hint}.logits')
  weights = g.op('Softmax', [logits], f'{hint}.weights', axis=-1)
  out = g.op('MatMul', [weights, value], f'{hint}.mixed')
  out = g.op('Transpose', [out], f'{hint}.mixed_t', perm=[0, 2, 1, 3])
  out = g.op('Reshape', [out, g.shape(f'{hint}.merge_shape', [-1, tokens, inner])],
             f'{hint}.merged')
  return _dense(g, out, _f32(p['out']['kernel']).reshape(inner, width), p['out']['bias'],
                f'{hint}.out')


def _mlp(g: _Graph, x: str, p: dict, hint: str) -> str:
  """``vit.MlpBlock``: Dense, exact GELU, Dense."""
  x = _dense(g, x, p['fc1']['kernel'], p['fc1']['bias'], f'{hint}.fc1')
  x = g.op('Gelu', [x], f'{hint}.gelu', approximate='none')
  return _dense(g, x, p['fc2']['kernel'], p['fc2']['bias'], f'{hint}.fc2')


def _encoder_block(g: _Graph, x: str, p: dict, model, tokens: int, hint: str) -> str:
  """``vit.EncoderBlock`` at inference (drop path is the identity)."""
  y = _layer_norm(g, x, p['norm1'], model.layer_norm_eps, f'{hint}.norm1')
  x = g.op('Add', [x, _attention(g, y, p['attn'], tokens, f'{hint}.attn')], f'{hint}.residual1')
  y = _layer_norm(g, x, p['norm2'], model.layer_norm_eps, f'{hint}.norm2')
  return g.op('Add', [x, _mlp(g, y, p['mlp'], f'{hint}.mlp')], f'{hint}.residual2')


def _encoder(g: _Graph, images: str, params: dict, model, position: np.ndarray) -> str:
  """``DownstreamModel.features``: tokens (N, 1 + L, D) after the final LayerNorm."""
  from mae_jax.models import hf_convert  # pylint: disable=g-import-not-at-top
  x = _tokens(g, _patch_embedding(g, images, params['patch_embed'], model), params, position)
  blocks = hf_convert.unscan_params(params)['encoder']  # Scanned layers: one block each.
  tokens = model.num_patches + 1
  for i in range(len(blocks)):
    x = _encoder_block(g, x, blocks[f'block_{i}'], model, tokens, f'encoder.block_{i}')
  return _layer_norm(g, x, params['encoder_norm'], model.layer_norm_eps, 'encoder_norm')


def _batch_norm_factors(stats: dict, params: dict | None) -> tuple[np.ndarray, np.ndarray]:
  """Eval-mode BatchNorm as y = x * scale + shift (float64, from the running statistics)."""
  mean = np.asarray(stats['mean'], np.float64)
  scale = 1.0 / np.sqrt(np.asarray(stats['var'], np.float64) + heads.BN_EPSILON)
  shift = -mean * scale
  if params is not None:
    gamma = np.asarray(params['scale'], np.float64)
    scale, shift = scale * gamma, shift * gamma + np.asarray(params['bias'], np.float64)
  return scale, shift


def _resize(g: _Graph, x: str, size: int, hint: str) -> str:
  """``heads._resize`` of NCHW ``x`` to size x size: bilinear with half-pixel centres (the heads
  only upsample, so no antialias is involved)."""
  # Full 4-D sizes (batch and channels from the input), not the 'axes' attribute: onnxruntime's
  # layout optimiser (1.32) drops the sizes of a Resize with axes when it moves a Transpose.
  leading = g.op('Shape', [x], f'{hint}.leading', start=0, end=2)
  sizes = g.op('Concat', [leading, g.shape(f'{hint}.size', [size, size])], f'{hint}.sizes',
               axis=0)
  return g.op('Resize', [x, '', '', sizes], hint, mode='linear',
              coordinate_transformation_mode='half_pixel')


def _conv(g: _Graph, x: str, kernel, bias, hint: str, scale=None, shift=None) -> str:
  """``nn.Conv`` ('SAME', odd kernel) on NCHW, with a following BatchNorm folded in if given."""
  kernel = np.asarray(kernel, np.float64).transpose(3, 2, 0, 1)  # HWIO -> OIHW
  bias = np.asarray(bias, np.float64)
  if scale is not None:
    kernel, bias = kernel * scale[:, None, None, None], bias * scale + shift
  pad = kernel.shape[-1] // 2
  return g.op('Conv', [x, g.const(f'{hint}.kernel', kernel), g.const(f'{hint}.bias', bias)],
              hint, pads=[pad] * 4)


def _patch_tokens(g: _Graph, tokens: str) -> str:
  """``tokens[:, 1:]``: the patch tokens without cls, (N, L, D)."""
  return g.op('Slice', [tokens, g.shape('drop_cls.start', [1]), g.shape('drop_cls.end', [1 << 62]),
                        g.shape('drop_cls.axes', [1])], 'patch_features')


def _setr_pup_head(g: _Graph, tokens: str, p: dict, stats: dict, head, grid: int,
                   width: int) -> str:
  """``heads.SetrPupHead``: logits (N, S, S, classes)."""
  x = g.op('Reshape', [_patch_tokens(g, tokens), g.shape('feature_grid', [-1, grid, grid, width])],
           'feature_grid')
  x = g.op('Transpose', [x], 'feature_map', perm=[0, 3, 1, 2])  # NCHW for Conv.
  side = grid
  for i in range(head.stages_for(grid)):
    scale, shift = _batch_norm_factors(stats[f'bn_{i}'], p[f'bn_{i}'])
    x = _conv(g, x, p[f'conv_{i}']['kernel'], p[f'conv_{i}']['bias'], f'head.conv_{i}', scale,
              shift)
    x = g.op('Relu', [x], f'head.relu_{i}')
    side *= 2
    x = _resize(g, x, side, f'head.upsample_{i}')
  x = _conv(g, x, p['classifier']['kernel'], p['classifier']['bias'], 'head.classifier')
  if side != head.image_size:
    x = _resize(g, x, head.image_size, 'head.resize')
  return g.op('Transpose', [x], 'head.logits_nhwc', perm=[0, 2, 3, 1])


def _vcf_head(g: _Graph, tokens: str, p: dict) -> str:
  """``heads.VcfHead``: percent tree cover (N,)."""
  kernel = _f32(p['token_conv']['kernel'])  # (T, T_out): each output token mixes all tokens.
  x = g.op('MatMul', [g.const('head.token_conv.kernel', kernel.T), tokens],
           'head.token_conv.matmul')
  x = g.op('Add', [x, g.const('head.token_conv.bias', _f32(p['token_conv']['bias'])[:, None])],
           'head.token_conv')
  x = _dense(g, x, p['width_conv']['kernel'], p['width_conv']['bias'], 'head.width_conv')
  flat = kernel.shape[1] * _f32(p['width_conv']['kernel']).shape[1]
  x = g.op('Reshape', [x, g.shape('head.flatten', [-1, flat])], 'head.flat')
  for i in range(sum(name.startswith('fc_') for name in p)):
    x = g.op('Relu', [_dense(g, x, p[f'fc_{i}']['kernel'], p[f'fc_{i}']['bias'], f'head.fc_{i}')],
             f'head.relu_{i}')
  z = _dense(g, x, p['out']['kernel'], p['out']['bias'], 'head.out')
  z = g.op('Reshape', [z, g.shape('head.per_tile', [-1])], 'head.z')
  return g.op('Mul', [g.op('Sigmoid', [z], 'head.sigmoid'), g.const('percent', 100.0)],
              'head.percent')


def _linear_probe_head(g: _Graph, tokens: str, p: dict, stats: dict, head, grid: int) -> str:
  """``heads.LinearProbeHead``, its affine-free BatchNorm folded into the linear layer."""
  scale, shift = _batch_norm_factors(stats['bn'], None)
  kernel = np.asarray(p['head']['kernel'], np.float64)
  folded_kernel = kernel * scale[:, None]
  folded_bias = np.asarray(p['head']['bias'], np.float64) + shift @ kernel
  if head.task == 'vcf':
    if head.pool == 'cls':
      feature = g.op('Gather', [tokens, g.const('cls_index', 0, np.int64)], 'head.feature', axis=1)
    else:
      feature = g.op('ReduceMean', [_patch_tokens(g, tokens), g.shape('token_axis', [1])],
                     'head.feature', keepdims=0)
    fraction = _dense(g, feature, folded_kernel, folded_bias, 'head.linear')
    fraction = g.op('Reshape', [fraction, g.shape('head.per_tile', [-1])], 'head.fraction')
    return g.op('Mul', [fraction, g.const('percent', 100.0)], 'head.percent')
  logits = _dense(g, _patch_tokens(g, tokens), folded_kernel, folded_bias, 'head.linear')
  classes = kernel.shape[1]
  x = g.op('Reshape', [logits, g.shape('head.grid', [-1, grid, grid, classes])], 'head.grid')
  if grid != head.image_size:
    # NCHW for the resize: the layout every runtime's bilinear Resize supports.
    x = g.op('Transpose', [x], 'head.nchw', perm=[0, 3, 1, 2])
    x = _resize(g, x, head.image_size, 'head.resize')
    x = g.op('Transpose', [x], 'head.logits_nhwc', perm=[0, 2, 3, 1])
  return x


def _outputs(g: _Graph, task: str, out: str, pixel_valid: str, specs) -> None:
  """The named outputs from the head's output, with predict's no-data rules."""
  names = [spec.name for spec in specs]
  nan = g.const('nan', np.nan)
  if task == 'vcf':
    tile_valid = g.op('ReduceMax', [g.op('Cast', [pixel_valid], 'pixel_valid_float',
                                         to=TensorProto.FLOAT),
                                    g.shape('pixel_axes', [1, 2])], 'valid_pixels', keepdims=0)
    tile_valid = g.op('Greater', [tile_valid, g.const('half', 0.5)], 'tile_valid')
    g.nodes.append(helper.make_node('Where', [tile_valid, out, nan], [names[0]], name=names[0]))
    return
  logits_name, probabilities_name, code_name = names
  g.nodes.append(helper.make_node('Identity', [out], [logits_name], name=logits_name))
  probabilities = g.op('Softmax', [out], 'softmax', axis=-1)
  per_class = g.op('Unsqueeze', [pixel_valid, g.shape('class_axis', [-1])], 'pixel_valid_class')
  g.nodes.append(helper.make_node('Where', [per_class, probabilities, nan], [probabilities_name],
                                  name=probabilities_name))
  index = g.op('ArgMax', [out], 'class_index', axis=-1, keepdims=0)
  codes = g.const('worldcover_codes', schema.WORLDCOVER_CODES, np.uint8)
  code = g.op('Gather', [codes, index], 'class_code', axis=0)
  g.nodes.append(helper.make_node(
      'Where', [pixel_valid, code, g.const('nodata_code', schema.WORLDCOVER_NODATA_CODE, np.uint8)],
      [code_name], name=code_name))


def _value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
  dims = ['batch' if d == -1 else d for d in spec.shape]
  info = helper.make_tensor_value_info(
      spec.name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)), dims)
  info.doc_string = spec.description
  return info


def hyperparameters(model, head, grid: int) -> dict[str, Any]:
  """The sizes the graph was built from, for the MLM item and the ONNX metadata."""
  values = {name: getattr(model, name) for name in (
      'image_size', 'patch_size', 'num_channels', 'width', 'depth', 'heads', 'mlp_dim',
      'pos_embedding', 'layer_norm_eps')}
  values.update(task=model.task, head_kind=model.head_kind,
                head_options=dict(model.head_options), opset=OPSET)
  if isinstance(head, heads.SetrPupHead):
    values['upsampling_stages'] = head.stages_for(grid)
  return json.loads(json.dumps(values, default=list))


def build(loaded, producer: str = 'mae_jax') -> Exported:
  """The ONNX graph of a restored downstream model (``inference.load_downstream``)."""
  model, contract = loaded.model, loaded.contract
  if not contract.mean or not contract.std:
    raise ValueError(f'{loaded.checkpoint}: the input contract has no band mean/std, so the '
                     'graph cannot normalise its input')
  if len(contract.band_names) != model.num_channels:
    raise ValueError(f'{loaded.checkpoint}: the input contract has {len(contract.band_names)} '
                     f'bands but the model takes {model.num_channels} channels')
  # Host copies, once: every op below reads numpy arrays.
  params = jax.tree.map(np.asarray, loaded.variables['params'])
  stats = jax.tree.map(np.asarray, loaded.variables.get('batch_stats', {}))
  # Bound, the model gives its own position embedding and head module (sizes and options as
  # the fine-tuning config set them), so nothing is recomputed here.
  bound = model.bind({'params': params, 'batch_stats': stats})
  position = _f32(bound.encoder_pos).reshape(1, model.num_patches + 1, model.width)
  head = bound.head
  grid = model.grid_size

  g = _Graph()
  spec_in = input_spec(model.image_size, contract)
  specs_out = output_specs(model.task, model.image_size)
  normalised, pixel_valid = _preprocess(g, spec_in.name, contract)
  tokens = _encoder(g, normalised, params, model, position)
  head_params, head_stats = params['head'], stats.get('head', {})
  if isinstance(head, heads.VcfHead):
    out = _vcf_head(g, tokens, head_params)
  elif isinstance(head, heads.SetrPupHead):
    out = _setr_pup_head(g, tokens, head_params, head_stats, head, grid, model.width)
  elif isinstance(head, heads.LinearProbeHead):
    out = _linear_probe_head(g, tokens, head_params, head_stats, head, grid)
  else:
    raise ValueError(f'no ONNX form for the head {type(head).__name__}')
  _outputs(g, model.task, out, pixel_valid, specs_out)

  graph = helper.make_graph(g.nodes, f'mae_jax_{model.task}_{model.head_kind}',
                            [_value_info(spec_in)], [_value_info(s) for s in specs_out],
                            initializer=g.initializers)
  opsets = [helper.make_opsetid('', OPSET)]
  # The oldest IR version that carries this opset, so older runtimes load the file too.
  onnx_model = helper.make_model(graph, opset_imports=opsets, producer_name=producer,
                                 ir_version=helper.find_min_ir_version_for(opsets))
  hyper = hyperparameters(model, head, grid)
  helper.set_model_props(onnx_model, {
      f'{METADATA_PREFIX}task': model.task,
      f'{METADATA_PREFIX}checkpoint': loaded.checkpoint,
      f'{METADATA_PREFIX}step': str(loaded.step),
      f'{METADATA_PREFIX}weights': loaded.weights,
      f'{METADATA_PREFIX}input_contract': contract.to_json(),
      f'{METADATA_PREFIX}hyperparameters': json.dumps(hyper, sort_keys=True)})
  total = int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))
  weight_bytes = int(sum(t.ByteSize() for t in g.initializers))
  return Exported(onnx_model, spec_in, specs_out, model.task, model.head_kind, hyper, total,
                  weight_bytes)


def save(exported: Exported, folder: str) -> list[str]:
  """Writes ``folder``/model.onnx (and model.onnx.data for weights over
  EXTERNAL_DATA_BYTES), checks it with ``onnx.checker``; returns the file names written."""
  path = os.path.join(folder, MODEL_FILE)
  external = exported.weight_bytes > EXTERNAL_DATA_BYTES
  onnx.save_model(exported.model, path, save_as_external_data=external,
                  all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE, size_threshold=1024)
  # By path, so a model with external data (or over 2 GiB) is checked too; full_check also
  # infers every shape.
  onnx.checker.check_model(path, full_check=True)
  return [MODEL_FILE, EXTERNAL_DATA_FILE] if external else [MODEL_FILE]
