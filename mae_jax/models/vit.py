"""Vision Transformer building blocks with logical axis names on every parameter.

Pre-LayerNorm blocks as in ViT / MAE: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` with exact
(erf) GELU. Parameters are float32 (``param_dtype``) and the computation runs in ``dtype``
(bfloat16 on accelerators). Every parameter and the main activations carry logical axis names
(params: ``embed``, ``mlp``, ``heads``, ``kv``, ``patch``, ``layers``; activations:
``batch``, ``seq``, ``act_embed``, ``act_mlp``, ``act_heads``); the config's rules map those to mesh
axes, so this file never mentions a mesh.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
# Activations use their own logical names so parameter rules (embed -> fsdp) never collide
# with the batch axis, which already uses fsdp.
ACTIVATION_AXES = ('batch', 'seq', 'act_embed')

# He et al. initialise linear layers with xavier_uniform and LayerNorms with (1, 0).
dense_init = nn.initializers.xavier_uniform()


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
  return nn.with_logical_partitioning(init, names)


def layer_norm(eps: float, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
                      scale_init=partitioned(nn.initializers.ones, ('embed',)),
                      bias_init=partitioned(nn.initializers.zeros, ('embed',)))


class MlpBlock(nn.Module):
  """Two dense layers with exact GELU between them."""
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name='fc1',
                 kernel_init=partitioned(dense_init, ('embed', 'mlp')),
                 bias_init=partitioned(nn.initializers.zeros, ('mlp',)))(x)
    x = nn.with_logical_constraint(x, ('batch', 'seq', 'act_mlp'))
    x = nn.gelu(x, approximate=False)
    x = nn.Dense(width, dtype=self.dtype, name='fc2',
                 kernel_init=partitioned(dense_init, ('mlp', 'embed')),
                 bias_init=partitioned(nn.initializers.zeros, ('embed',)))(x)
    return x


class HeadsProjectionParams(nn.Module):
  """The (D, heads, head_dim) kernel and (heads, head_dim) bias of one of q, k, v.

  Declared here rather than through ``nn.DenseGeneral``, which flattens its kernel to 2-D
  before initialising it and so cannot carry 3-D logical axis names. Only the params: the
  attention applies q, k and v together as one matmul (:class:`SelfAttention`).
  """
  num_heads: int
  head_dim: int

  @nn.compact
  def __call__(self, width: int) -> tuple[jax.Array, jax.Array]:
    # Fans are embed and heads * head_dim, as for MAE's (embed, embed) projections.
    init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
    kernel = self.param('kernel', partitioned(init, ('embed', 'heads', 'kv')),
                        (width, self.num_heads, self.head_dim), jnp.float32)
    bias = self.param('bias', partitioned(nn.initializers.zeros, ('heads', 'kv')),
                      (self.num_heads, self.head_dim), jnp.float32)
    return kernel, bias


class HeadsOutput(nn.Module):
  """(B, T, heads, head_dim) -> (B, T, D) with a (heads, head_dim, D) kernel."""
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
    kernel = self.param('kernel', partitioned(init, ('heads', 'kv', 'embed')),
                        (x.shape[-2], x.shape[-1], self.width), jnp.float32)
    bias = self.param('bias', partitioned(nn.initializers.zeros, ('embed',)),
                      (self.width,), jnp.float32)
    x = x.astype(self.dtype)
    return jnp.einsum('btnh,nhd->btd', x, kernel.astype(self.dtype)) + bias.astype(self.dtype)


ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'einsum')
# cuDNN's flash attention refuses sequence lengths it does not tile (the MAE's 1 + 196 and
# 1 + 784 among them), so its inputs are padded up to a multiple of this and the padding is
# masked out with per-example lengths; padding never changes the result (tests/test_model.py).
FLASH_LENGTH_MULTIPLE = 64
# Head dims below this are zero-padded up to it for cuDNN (0 = never; padded_attention).
FLASH_MIN_HEAD_DIM = 0
# cuDNN flash attention: Ampere or newer, 16-bit inputs, head dims a multiple of 8 up to 128
# (256 on Hopper and newer).
CUDNN_MIN_COMPUTE_CAPABILITY = (8, 0)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# 'auto' picks cuDNN on sequences at least this long (before padding), XLA's form on shorter
# ones, by the per-shape timings of bench/bench_attention.py.
CUDNN_AUTO_MIN_LENGTH = 0


def cuda_compute_capability(device: jax.Device | None = None) -> tuple[int, int] | None:
  """(major, minor) of an NVIDIA GPU, or None for any other device."""
  device = device or jax.local_devices()[0]
  capability = getattr(device, 'compute_capability', None)
  if device.platform != 'gpu' or not capability:
    return None
  return tuple(int(part) for part in str(capability).split('.')[:2])


def cudnn_unsupported(dtype: Dtype, head_dim: int, device: jax.Device | None = None) -> str:
  """Why cuDNN flash attention cannot run this attention here ('' when it can)."""
  capability = cuda_compute_capability(device)
  if capability is None or capability < CUDNN_MIN_COMPUTE_CAPABILITY:
    found = (device or jax.local_devices()[0]).device_kind
    return f'it needs an NVIDIA GPU of compute capability 8.0 or newer, found {found!r}'
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
    return (f'it needs bfloat16 or float16 compute, got {jnp.dtype(dtype).name} '
            '(config.model.dtype)')
  max_head_dim = 256 if capability >= (9, 0) else 128
  if head_dim % 8 or head_dim > max_head_dim:
    return f'it needs a head dim that is a multiple of 8 up to {max_head_dim}, got {head_dim}'
  return ''


def resolve_attention(implementation: str, dtype: Dtype, head_dim: int, length: int = 0,
                      device: jax.Device | None = None) -> str:
  """The implementation ``implementation`` stands for on ``device`` ('auto' resolved).

  'auto': cuDNN flash attention on NVIDIA GPUs wherever it supports the shape and dtype (XLA's
  form materialises the (T, T) weights of every head: forward + backward of one 785-token
  decoder attention, batch 64, took 8.6 ms with XLA and 2.15 ms with cuDNN on an H200); XLA's
  form on TPUs (a Pallas splash kernel is not measured here yet); the einsum form on CPUs
  (1.3-1.7x faster than XLA's there). ``bench/bench_attention.py`` times each per shape.
  A named implementation that cannot run raises here, naming the option, before any compile.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'attention_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, '
                     f'got {implementation!r}')
  device = device or jax.local_devices()[0]
  if implementation == 'auto':
    if device.platform == 'cpu':
      return 'einsum'
    if (device.platform == 'gpu' and length >= CUDNN_AUTO_MIN_LENGTH
        and not cudnn_unsupported(dtype, head_dim, device)):
      return 'cudnn'
    return 'xla'
  if implementation == 'cudnn':
    reason = cudnn_unsupported(dtype, head_dim, device)
    if reason:
      raise ValueError(f"attention_implementation='cudnn' cannot run here: {reason}; "
                       "use 'auto' (picks what runs) or 'xla'")
  return implementation


def einsum_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """Softmax attention written as two einsums; (B, T, N, H) in and out."""
  scale = jnp.asarray(query.shape[-1]**-0.5, query.dtype)
  logits = jnp.einsum('bqnh,bknh->bnqk', query * scale, key)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  return jnp.einsum('bnqk,bknh->bqnh', weights, value)


def padded_attention(query: jax.Array, key: jax.Array, value: jax.Array, implementation: str,
                     multiple: int | None = None, min_head_dim: int | None = None) -> jax.Array:
  """``jax.nn.dot_product_attention`` on padded inputs, equal to unpadded attention.

  Lengths are padded up to ``multiple`` (default :data:`FLASH_LENGTH_MULTIPLE`): padded keys get
  zero weight through ``key_value_seq_lengths``, padded query rows are computed and dropped,
  so they receive no gradient. Head dims under ``min_head_dim`` (default
  :data:`FLASH_MIN_HEAD_DIM`; 0 = never) are padded with zeros, which add nothing to q . k or
  to the output, with the scale of the true head dim: flash kernels can run faster on the
  wider heads they are tuned for.
  """
  batch, length, _, head_dim = query.shape
  multiple = multiple or FLASH_LENGTH_MULTIPLE
  min_head_dim = FLASH_MIN_HEAD_DIM if min_head_dim is None else min_head_dim
  padded = -(-length // multiple) * multiple
  wide = max(head_dim, min_head_dim)
  lengths = None
  if padded != length:
    lengths = jnp.full((batch,), length, jnp.int32)
  if padded != length or wide != head_dim:
    pad = ((0, 0), (0, padded - length), (0, 0), (0, wide - head_dim))
    query, key, value = (jnp.pad(x, pad) for x in (query, key, value))
  out = jax.nn.dot_product_attention(query, key, value, scale=head_dim**-0.5,
                                     query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :length, :, :head_dim]


def attention(query, key, value, implementation: str = 'auto') -> jax.Array:
  """Softmax self-attention over (B, T, N, H) inputs by ``resolve_attention``'s choice."""
  implementation = resolve_attention(implementation, query.dtype, query.shape[-1],
                                     query.shape[1])
  if implementation == 'einsum':
    return einsum_attention(query, key, value)
  if implementation == 'cudnn':
    return padded_attention(query, key, value, 'cudnn')
  return jax.nn.dot_product_attention(query, key, value, implementation='xla')


class SelfAttention(nn.Module):
  """Multi-head self-attention; see :func:`attention` for the implementations.

  q, k and v keep their own params (``query``, ``key``, ``value``: the layout of MAE and
  transformers checkpoints) but are computed as one matmul with the three kernels side by
  side: one wider matmul forward and one for the input gradient instead of three each.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads
    kernels, biases = zip(*(HeadsProjectionParams(self.num_heads, head_dim, name=name)(width)
                            for name in ('query', 'key', 'value')))
    kernel = jnp.stack(kernels, axis=1).astype(self.dtype)   # (D, 3, heads, head_dim)
    bias = jnp.stack(biases, axis=0).astype(self.dtype)      # (3, heads, head_dim)
    qkv = jnp.einsum('btd,dsnh->btsnh', x.astype(self.dtype), kernel) + bias
    heads_axes = ('batch', 'seq', 'act_heads', None)
    query, key, value = (nn.with_logical_constraint(qkv[:, :, i], heads_axes) for i in range(3))
    out = attention(query, key, value, self.implementation)
    out = nn.with_logical_constraint(out, heads_axes)
    return HeadsOutput(width, self.dtype, name='out')(out)


def drop_path(module: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
  """Stochastic depth: drops a residual branch per example with probability ``rate``.

  Kept branches are scaled by 1 / (1 - rate) so the expectation is unchanged, as in timm's
  ``DropPath`` used by MAE fine-tuning. Draws from the module's 'dropout' rng stream.
  """
  if deterministic or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class EncoderBlock(nn.Module):
  """One pre-LN transformer block. Called as ``(x, _) -> (x, None)`` so it can be scanned.

  ``drop_path_rate`` (fine-tuning) drops each residual branch per example unless
  ``deterministic``; it is a field, not a call argument, so scanned and rematerialised blocks
  need no static arguments: a training and an evaluation model are two clones of one module.
  """
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  attention_implementation: str = 'auto'
  drop_path_rate: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, _=None):
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    y = layer_norm(self.layer_norm_eps, self.dtype, 'norm1')(x)
    y = SelfAttention(self.num_heads, self.dtype, self.attention_implementation, name='attn')(y)
    x = x + drop_path(self, y, self.drop_path_rate, self.deterministic)
    y = layer_norm(self.layer_norm_eps, self.dtype, 'norm2')(x)
    y = MlpBlock(self.mlp_dim, self.dtype, name='mlp')(y)
    x = x + drop_path(self, y, self.drop_path_rate, self.deterministic)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    return x, None


REMAT_POLICIES = {
    'none': None,
    # The pretraining trainer resolves 'auto' to the fastest policy whose compiled step fits
    # the device (mae_jax.memory); anywhere else it means no remat.
    'auto': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'save_dots': jax.checkpoint_policies.checkpoint_dots,
}


class Transformer(nn.Module):
  """A stack of ``depth`` encoder blocks, optionally rematerialised and scanned over layers.

  With ``scan_layers`` the block parameters get a leading ``layers`` axis (one compiled block
  instead of ``depth`` copies: faster compiles for deep models); checkpoints of scanned and
  unscanned models are therefore not interchangeable.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  remat_policy: str = 'none'
  scan_layers: bool = False
  attention_implementation: str = 'auto'
  # Stochastic depth, rising linearly from 0 at the first block to this rate at the last (as in
  # MAE fine-tuning); scanned layers share one block, so they all use the mean rate.
  drop_path_rate: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy must be one of {sorted(REMAT_POLICIES)}, '
                       f'got {self.remat_policy!r}')
    block = EncoderBlock
    if REMAT_POLICIES[self.remat_policy] is not None:
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy],
                       prevent_cse=not self.scan_layers)
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                  layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                  attention_implementation=self.attention_implementation,
                  deterministic=self.deterministic)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth else []
    if self.scan_layers:
      scanned = nn.scan(block, variable_axes={'params': 0},
                        split_rngs={'params': True, 'dropout': True},
                        length=self.depth, metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = scanned(**kwargs, drop_path_rate=float(np.mean(rates)) if self.depth else 0.0,
                     name='blocks')(x, None)
    else:
      for i in range(self.depth):
        x, _ = block(**kwargs, drop_path_rate=float(rates[i]), name=f'block_{i}')(x, None)
    return x


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  """1-D sine-cosine embedding as in MAE: first half sin, second half cos."""
  if embed_dim % 2:
    raise ValueError(f'sin-cos embedding needs an even width, got {embed_dim}')
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  angles = np.einsum('m,d->md', positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, with_cls: bool = True) -> np.ndarray:
  """2-D sine-cosine position embedding (grid_size**2 [+1], embed_dim), float32.

  Follows MAE's ``get_2d_sincos_pos_embed`` exactly (including its meshgrid(w, h) order), so
  weights move between implementations unchanged; the cls position is all zeros.
  """
  if embed_dim % 4:
    raise ValueError(f'2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}')
  grid_h = np.arange(grid_size, dtype=np.float64)
  grid_w = np.arange(grid_size, dtype=np.float64)
  grid = np.meshgrid(grid_w, grid_h)
  emb = np.concatenate([sincos_1d(embed_dim // 2, grid[0]), sincos_1d(embed_dim // 2, grid[1])],
                       axis=1)
  if with_cls:
    emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
  return emb.astype(np.float32)
