"""Downstream heads on the MAE encoder's tokens: vegetation regression and land-cover segmentation.

Every head takes the encoder output of :meth:`MaskedAutoencoder.encode` without noise: tokens
(B, 1 + L, D) after the final LayerNorm, cls token first, then the L = g * g patch tokens in
row-major order. Two protocols (``HEAD_KINDS``) for two tasks (``TASKS``):

* ``finetune``: the poster authors' heads (their released PyTorch code):
  :class:`VcfHead` ("1D conv then 3 FC") for MODIS VCF percent tree cover and
  :class:`SetrPupHead` (SETR-PUP, Zheng et al. 2021) for ESA WorldCover.
* ``linear_probe``: MAE's linear-probe protocol (He et al., ``main_linprobe.py``):
  :class:`LinearProbeHead`, a BatchNorm without affine parameters followed by one linear layer.
  Freezing the encoder (stop_gradient / no optimiser state for it) is the trainer's job.

Conventions follow ``vit.py``: parameters are float32 and carry logical axis names (``embed`` for
the encoder width, ``mlp`` for hidden widths, None elsewhere; an axis name appears at most once
per parameter so no mesh axis is used twice), and the computation runs in ``dtype``. Outputs are
float32. All heads are called as ``head.apply(variables, tokens, train, mutable=...)``; BatchNorm
statistics live in the ``batch_stats`` collection (mutable when ``train`` is True).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from data_pipeline import schema
from mae_jax.models import vit

Dtype = Any

TASKS = ('vcf', 'worldcover')
HEAD_KINDS = ('finetune', 'linear_probe')

# PyTorch's BatchNorm defaults (momentum 0.1 there = 0.9 here, flax weights the old running
# value) and MAE's linear-probe epsilon 1e-6. Flax keeps the biased running variance where
# PyTorch keeps the unbiased one; the difference is negligible at these batch sizes.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-6


def _batch_norm(train: bool, dtype: Dtype, name: str, affine: bool = True) -> nn.BatchNorm:
  """BatchNorm over every axis but the last, statistics in float32.

  No ``axis_name`` is needed: under ``jax.jit`` with the batch sharded by a NamedSharding the
  reductions run over the global (logical) batch, and XLA inserts the cross-device sums. The
  two-pass variance (``use_fast_variance=False``) avoids E[x^2] - E[x]^2 cancellation.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      dtype=dtype, param_dtype=jnp.float32, use_scale=affine, use_bias=affine,
                      use_fast_variance=False,
                      scale_init=vit.partitioned(nn.initializers.ones, ('mlp',)),
                      bias_init=vit.partitioned(nn.initializers.zeros, ('mlp',)), name=name)


def _dense(features: int, names: tuple[str | None, str | None], dtype: Dtype, name: str,
           kernel_init=vit.dense_init) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=vit.partitioned(kernel_init, names),
                  bias_init=vit.partitioned(nn.initializers.zeros, (names[1],)))


def _grid_size(num_patches: int) -> int:
  side = int(round(num_patches**0.5))
  if side * side != num_patches:
    raise ValueError(f'{num_patches} patch tokens do not form a square grid')
  return side


def _check_tokens(tokens: jax.Array) -> None:
  if tokens.ndim != 3 or tokens.shape[1] < 2:
    raise ValueError(f'expected encoder tokens (B, 1 + L, D) with the cls token first, '
                     f'got shape {tokens.shape}')


def _resize(x: jax.Array, size: int) -> jax.Array:
  """Bilinear resize of (B, h, w, C) to (B, size, size, C) with half-pixel centres.

  ``jax.image.resize`` matches PyTorch's ``F.interpolate(mode='bilinear', align_corners=False)``
  when upsampling, which is all the heads do.
  """
  if x.shape[1:3] == (size, size):
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method='bilinear')


class TokenConv(nn.Module):
  """A kernel-1 Conv1d whose channels are the tokens: (B, T, D) -> (B, T_out, D).

  Each output token is a learned mix of all input tokens (the same mix for every width
  channel): an einsum with a (T, T_out) kernel plus a (T_out,) bias, as PyTorch's
  ``Conv1d(T, T_out, 1)`` applied to (B, T, D).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', vit.partitioned(vit.dense_init, (None, None)),
                        (x.shape[1], self.features), jnp.float32)
    bias = self.param('bias', vit.partitioned(nn.initializers.zeros, (None,)),
                      (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    return (jnp.einsum('btd,to->bod', x, kernel.astype(self.dtype))
            + bias.astype(self.dtype)[None, :, None])


class VcfHead(nn.Module):
  """The poster authors' percent-tree-cover regression head ("1D conv then 3 FC").

  tokens (B, 1 + L, D) -> TokenConv over all 1 + L tokens to ``num_tokens_out`` tokens
  (default L // 4: 785 -> 196 at 448 px / patch 16) -> Dense over the width to ``width_out``
  (default D // 4: a kernel-1 Conv1d across width) -> flatten in (token, width) order ->
  Dense + ReLU for each of ``hidden`` -> Dense to 1 -> ``100 * sigmoid``.

  Output: (B,) float32 percent tree cover in [0, 100]. The authors end with ELU, whose range
  (-1, inf) does not match the target; ``100 * sigmoid(z)`` spans exactly the target's range
  [0, 100] % (and starts at 50 % for z = 0). No activation sits between the two kernel-1
  convolutions and the first fully connected layer: the authors' description names none.
  ``train`` is accepted for a uniform head signature and ignored (no BatchNorm or dropout).
  """
  num_tokens_out: int | None = None
  width_out: int | None = None
  hidden: Sequence[int] = (512, 256, 128)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool) -> jax.Array:
    del train  # Nothing behaves differently in training.
    _check_tokens(tokens)
    num_tokens, width = tokens.shape[1], tokens.shape[2]
    num_out = self.num_tokens_out or (num_tokens - 1) // 4
    width_out = self.width_out or width // 4
    if num_out < 1 or width_out < 1:
      raise ValueError(f'VcfHead needs num_tokens_out and width_out >= 1, got {num_out} and '
                       f'{width_out} for tokens {tokens.shape}')
    x = TokenConv(num_out, self.dtype, name='token_conv')(tokens)
    x = _dense(width_out, ('embed', 'mlp'), self.dtype, 'width_conv')(x)
    x = x.reshape(x.shape[0], num_out * width_out)
    # Alternate which side of each kernel carries 'mlp' so no kernel names it twice; the
    # flattened (token, width) axis carries none.
    in_mlp = False
    for i, features in enumerate(self.hidden):
      names = ('mlp', None) if in_mlp else (None, 'mlp')
      x = nn.relu(_dense(features, names, self.dtype, f'fc_{i}')(x))
      in_mlp = not in_mlp
    names = ('mlp', None) if in_mlp else (None, None)
    z = _dense(1, names, self.dtype, 'out')(x)[:, 0].astype(jnp.float32)
    return 100.0 * jax.nn.sigmoid(z)


class SetrPupHead(nn.Module):
  """SETR-PUP progressive-upsampling segmentation head (Zheng et al. 2021).

  tokens (B, 1 + L, D) -> drop cls -> (B, g, g, D) with g = sqrt(L) -> ``num_stages`` x
  [3x3 conv to ``channels`` ('SAME') -> BatchNorm -> ReLU -> bilinear x2] -> 1x1 conv to
  ``num_classes`` -> bilinear resize to (``image_size``, ``image_size``) if
  g * 2**num_stages differs from it.

  ``num_stages`` defaults to floor(log2(image_size / g)), i.e. log2(patch_size): 4 for patch 16
  (28 -> 448 with no final resize). Stages that would overshoot ``image_size`` are an error.

  Output: (B, image_size, image_size, num_classes) float32 logits, no activation.

  Differences from the poster authors' variant (their released code): they use three
  upsampling stages (28 -> 224), a 3x3 classifier conv followed by BatchNorm + ReLU on the logits,
  then a bilinear resize to 448. Here the classifier is SETR-PUP's 1x1 conv giving raw logits, as
  softmax cross-entropy expects (a ReLU would pin every logit at >= 0), and the default reaches
  full resolution with four stages as in the original SETR-PUP, so no final resize is needed.
  """
  num_classes: int = schema.NUM_CLASSES
  channels: int = 256
  num_stages: int | None = None
  image_size: int = 448
  dtype: Dtype = jnp.float32

  def stages_for(self, grid: int) -> int:
    """Number of x2 upsampling stages used for a g x g token grid."""
    if self.num_stages is not None:
      stages = self.num_stages
    else:
      if grid > self.image_size:
        raise ValueError(f'a {grid}x{grid} token grid is larger than image_size {self.image_size}')
      stages = (self.image_size // grid).bit_length() - 1
    if stages < 0:
      raise ValueError(f'num_stages must be >= 0, got {stages}')
    if grid * 2**stages > self.image_size:
      raise ValueError(f'{stages} upsampling stages take a {grid}x{grid} grid to '
                       f'{grid * 2**stages} px, beyond image_size {self.image_size}')
    return stages

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool) -> jax.Array:
    _check_tokens(tokens)
    batch, width = tokens.shape[0], tokens.shape[2]
    grid = _grid_size(tokens.shape[1] - 1)
    x = tokens[:, 1:].astype(self.dtype).reshape(batch, grid, grid, width)
    stages = self.stages_for(grid)
    for i in range(stages):
      names = (None, None, 'embed' if i == 0 else None, 'mlp')
      x = nn.Conv(self.channels, (3, 3), padding='SAME', dtype=self.dtype,
                  param_dtype=jnp.float32, name=f'conv_{i}',
                  kernel_init=vit.partitioned(vit.dense_init, names),
                  bias_init=vit.partitioned(nn.initializers.zeros, ('mlp',)))(x)
      x = nn.relu(_batch_norm(train, self.dtype, f'bn_{i}')(x))
      x = _resize(x, 2 * x.shape[1])
    # Without stages the classifier reads the encoder width directly.
    in_name = 'mlp' if stages else 'embed'
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                     name='classifier',
                     kernel_init=vit.partitioned(vit.dense_init, (None, None, in_name, None)),
                     bias_init=vit.partitioned(nn.initializers.zeros, (None,)))(x)
    # The classifier and the resize are both linear (bilinear weights sum to 1), so resizing
    # the few logit channels instead of the wide features gives the same result more cheaply.
    return _resize(logits.astype(jnp.float32), self.image_size)


class LinearProbeHead(nn.Module):
  """MAE's linear probe: BatchNorm without affine parameters, then one linear layer.

  As in He et al.'s ``main_linprobe.py`` (``BatchNorm1d(affine=False, eps=1e-6)`` before the
  head, head weights ~ N(0, 0.01), bias 0), the only parameters are the linear layer's; the
  BatchNorm only standardises the frozen features with batch (train) or running (eval)
  statistics. Both task outputs stay linear in the features:

  * ``task='vcf'``: the cls token (B, D) -> Dense(1) -> x 100 -> (B,) float32 percent tree
    cover. The layer predicts a tree-cover *fraction*: with weights ~N(0, 0.01) and Adam steps
    of about lr each, an output in percent would need thousands of steps just to reach the
    targets' scale (tens of percent), and a short probe would measure that, not the features.
    There is deliberately no sigmoid (a linear probe stays linear), so the output is unbounded
    and can leave [0, 100]; clip it at evaluation time if a bounded prediction is needed.
  * ``task='worldcover'``: the patch tokens (B, L, D) (cls dropped), BatchNorm over (B, L),
    Dense(num_classes) per token -> (B, g, g, C) -> bilinear upsampling (a fixed linear map per
    pixel) to (B, image_size, image_size, num_classes) float32 logits.
  """
  task: str = 'vcf'
  num_classes: int = schema.NUM_CLASSES
  image_size: int = 448
  # VCF feature: 'cls' (the cls token, He et al.'s default) or 'mean' (the mean of the patch
  # tokens, their --global_pool option).
  pool: str = 'cls'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool) -> jax.Array:
    if self.pool not in ('cls', 'mean'):
      raise ValueError(f"LinearProbeHead pool must be 'cls' or 'mean', got {self.pool!r}")
    if self.task not in TASKS:
      raise ValueError(f'LinearProbeHead task must be one of {TASKS}, got {self.task!r}')
    _check_tokens(tokens)
    init = nn.initializers.truncated_normal(0.01)
    if self.task == 'vcf':
      feature = tokens[:, 0] if self.pool == 'cls' else tokens[:, 1:].mean(axis=1)
      x = _batch_norm(train, self.dtype, 'bn', affine=False)(feature.astype(self.dtype))
      fraction = _dense(1, ('embed', None), self.dtype, 'head', init)(x)[:, 0]
      return 100.0 * fraction.astype(jnp.float32)
    batch = tokens.shape[0]
    grid = _grid_size(tokens.shape[1] - 1)
    x = _batch_norm(train, self.dtype, 'bn', affine=False)(tokens[:, 1:].astype(self.dtype))
    logits = _dense(self.num_classes, ('embed', None), self.dtype, 'head', init)(x)
    logits = logits.astype(jnp.float32).reshape(batch, grid, grid, self.num_classes)
    return _resize(logits, self.image_size)


def create_head(kind: str, task: str, **kwargs) -> nn.Module:
  """The head module for a protocol and task; ``kwargs`` are the chosen class's fields.

  ('finetune', 'vcf') -> :class:`VcfHead`; ('finetune', 'worldcover') -> :class:`SetrPupHead`;
  ('linear_probe', task) -> ``LinearProbeHead(task=task)``.
  """
  if kind not in HEAD_KINDS:
    raise ValueError(f'head kind must be one of {HEAD_KINDS}, got {kind!r}')
  if task not in TASKS:
    raise ValueError(f'head task must be one of {TASKS}, got {task!r}')
  if kind == 'linear_probe':
    return LinearProbeHead(task=task, **kwargs)
  if task == 'vcf':
    return VcfHead(**kwargs)
  return SetrPupHead(**kwargs)
