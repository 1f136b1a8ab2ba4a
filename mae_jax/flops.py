"""Model FLOPs per training example, counted once, and device peaks for MFU.

Counting convention (as in PaLM / MaxText MFU): 2 FLOPs per multiply-add of every matmul the
model performs (patch embedding, attention projections, attention scores and values, MLPs,
decoder embed and prediction); element-wise work is ignored; training = 3 x forward (backward is
twice the forward). ``tests/test_flops.py`` checks the count against XLA's own cost analysis.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax

# Dense bf16 peak FLOP/s per device (per chip for TPUs, per GPU), from vendor specifications.
PEAK_FLOPS = {
    'TPU v2': 45e12 / 2, 'TPU v3': 123e12 / 2, 'TPU v4': 275e12, 'TPU v5 lite': 197e12,
    'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v5': 459e12, 'TPU v6 lite': 918e12,
    'TPU v6e': 918e12, 'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA A100': 312e12,
    'NVIDIA GH200': 989e12, 'NVIDIA B200': 2250e12,
}


def transformer_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Forward FLOPs of ``depth`` pre-LN blocks over ``tokens`` tokens."""
  projections = 2 * tokens * width * width * 4          # q, k, v, out
  attention = 2 * tokens * tokens * width * 2           # scores and weighted values
  mlp = 2 * tokens * width * mlp_dim * 2
  return depth * (projections + attention + mlp)


def mae_forward_flops(model: Any) -> float:
  """Forward FLOPs of one example through :class:`MaskedAutoencoder` (masked pretraining)."""
  patches, kept = model.num_patches, model.num_kept
  flops = 2 * patches * model.patch_dim * model.width                      # patch embedding
  flops += transformer_flops(kept + 1, model.width, model.depth, model.mlp_dim)
  flops += 2 * (kept + 1) * model.width * model.decoder_width               # decoder embed
  flops += transformer_flops(patches + 1, model.decoder_width, model.decoder_depth,
                             model.decoder_mlp_dim)
  flops += 2 * patches * model.decoder_width * model.patch_dim              # pixel prediction
  return float(flops)


def mae_train_flops(model: Any) -> float:
  return 3.0 * mae_forward_flops(model)


def encoder_train_flops(model: Any, frozen: bool = False) -> float:
  """FLOPs per example of a fine-tuning step's encoder, every patch visible; heads left out.

  A frozen encoder (linear probing) runs forward only; a trained one forward + backward.
  """
  patches = model.num_patches
  forward = 2 * patches * model.patch_dim * model.width
  forward += transformer_flops(patches + 1, model.width, model.depth, model.mlp_dim)
  return float(forward * (1.0 if frozen else 3.0))


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(size: int = 2048, repeats: int = 5, dtype: str = 'float32') -> float:
  """Best ``size``-cubed matmul FLOP/s on the default device, on random data.

  float32 at 2048 is the practical peak of a CPU; bfloat16 at 8192 that of an accelerator's
  matrix units (random data: zeros run faster than real values on some GPUs).
  """
  a, b = (jax.random.normal(jax.random.key(i), (size, size), dtype) for i in range(2))
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * size**3 / best


def device_peak_flops(device: jax.Device | None = None,
                      override_tflops: float = 0.0) -> tuple[float | None, str]:
  """(peak FLOP/s of one device, where it came from).

  The config override, else the spec-sheet table, else for CPUs a measured float32 matmul
  (so CPU MFU reads "fraction of what this CPU reaches on a plain matmul"), else None.
  """
  if override_tflops:
    return override_tflops * 1e12, 'config'
  device = device or jax.devices()[0]
  kind = getattr(device, 'device_kind', '')
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(name) or name in kind:
      return PEAK_FLOPS[name], 'spec sheet'
  if device.platform == 'cpu':
    return measured_matmul_peak(), 'measured f32 matmul'
  return None, 'unknown'
