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


class HeadsProjection(nn.Module):
  """(B, T, D) -> (B, T, heads, head_dim) with a (D, heads, head_dim) kernel.

  Written out rather than taken from ``nn.DenseGeneral``, which flattens its kernel to 2-D
  before initialising it and so cannot carry 3-D logical axis names.
  """
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # Fans are embed and heads * head_dim, as for MAE's (embed, embed) projections.
    init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
    kernel = self.param('kernel', partitioned(init, ('embed', 'heads', 'kv')),
                        (x.shape[-1], self.num_heads, self.head_dim), jnp.float32)
    bias = self.param('bias', partitioned(nn.initializers.zeros, ('heads', 'kv')),
                      (self.num_heads, self.head_dim), jnp.float32)
    x = x.astype(self.dtype)
    return jnp.einsum('btd,dnh->btnh', x, kernel.astype(self.dtype)) + bias.astype(self.dtype)


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


def einsum_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """Softmax attention written as two einsums; (B, T, N, H) in and out."""
  scale = jnp.asarray(query.shape[-1]**-0.5, query.dtype)
  logits = jnp.einsum('bqnh,bknh->bnqk', query * scale, key)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  return jnp.einsum('bnqk,bknh->bqnh', weights, value)


def attention(query, key, value, implementation: str = 'auto') -> jax.Array:
  """Dispatches to an attention implementation.

  'auto' uses ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPUs, XLA's fused
  form on TPUs) except on CPUs, where the plain einsum form measured 1.3-1.7x faster for the
  785-token decoder (bench/bench_step.py); 'xla' and 'cudnn' force the library call.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, '
                     f'got {implementation!r}')
  if implementation == 'auto':
    implementation = 'einsum' if jax.default_backend() == 'cpu' else 'xla'
  if implementation == 'einsum':
    return einsum_attention(query, key, value)
  return jax.nn.dot_product_attention(query, key, value, implementation=implementation)


class SelfAttention(nn.Module):
  """Multi-head self-attention; see :func:`attention` for the implementations."""
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads
    heads_axes = ('batch', 'seq', 'act_heads', None)
    query, key, value = (
        nn.with_logical_constraint(HeadsProjection(self.num_heads, head_dim, self.dtype,
                                                   name=name)(x), heads_axes)
        for name in ('query', 'key', 'value'))
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
    if self.remat_policy != 'none':
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
