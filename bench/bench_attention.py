r"""Self-attention forward + backward per implementation, at the shapes the MAE models meet.

  python bench/bench_attention.py            # on an accelerator: the table behind 'auto'
  python bench/bench_attention.py --quick    # CPU smoke run (small batch)

For each shape (cls + visible patches in the encoder, cls + all patches in the decoder and in
fine-tuning, at 448 px / 12 channels and at the 224 px ImageNet shape) and each implementation
that runs on this device (``einsum``; ``xla``: ``jax.nn.dot_product_attention``'s XLA form;
``cudnn``: cuDNN flash attention on inputs padded to a multiple of 64 with sequence lengths,
``mae_jax.models.vit.padded_attention``): milliseconds of one jitted forward + backward
(gradients of q, k and v), best of ``--repeats`` runs of ``--iters`` calls, and the largest
difference of the output from the einsum form computed in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.models import vit

# (name, batch, tokens, heads, head dim) for ViT-B/L/H encoders (12 / 16 / 16 heads) and the
# 8 x 512 decoder (16 heads of 32) of He et al.'s recipe.
SHAPES = (
    ('mae_b encoder 448', 64, 197, 12, 64),
    ('mae_l encoder 448', 64, 197, 16, 64),
    ('mae_h encoder 448', 64, 197, 16, 80),
    ('decoder 448', 64, 785, 16, 32),
    ('mae_b fine-tuning 448', 32, 785, 12, 64),
    ('mae_b encoder 224', 256, 50, 12, 64),
    ('decoder 224', 256, 197, 16, 32),
)
IMPLEMENTATIONS = {
    'einsum': vit.einsum_attention,
    'xla': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation='xla'),
    'cudnn': lambda q, k, v: vit.padded_attention(q, k, v, 'cudnn'),
}


def pallas_triton(q, k, v, block: int = 64):
  """jax's Pallas (Triton) flash attention, padding masked out by segment ids."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention
  batch, length = q.shape[:2]
  padded = -(-length // block) * block
  pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  segments = (jnp.arange(padded) >= length).astype(jnp.int32)[None].repeat(batch, 0)
  sizes = pallas_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block,
                                      block_kv_dkv=block, block_q_dq=block, block_kv_dq=block)
  out = pallas_attention.mha(q, k, v, segments, sm_scale=q.shape[-1]**-0.5, block_sizes=sizes)
  return out[:, :length]


# --explore: other paddings for cuDNN, and Pallas' Triton kernel, to choose defaults from.
EXPLORE = {
    **{f'cudnn_pad{m}': (lambda m: lambda q, k, v: vit.padded_attention(q, k, v, 'cudnn', m))(m)
       for m in (8, 16, 32, 128)},
    'cudnn_hd64': lambda q, k, v: vit.padded_attention(q, k, v, 'cudnn', min_head_dim=64),
    'pallas_triton': pallas_triton,
}


def suggest_flags(rows: list[dict], margin: float = 0.97) -> list[str]:
  """bench_step.py flags that the --explore timings say speed up the 448 px step.

  The decoder (785 tokens, heads of 32) takes the fastest cuDNN padding (length multiple, or
  heads widened to 64) when it beats the default by more than ``1 - margin``; the encoder
  (197 tokens) moves to XLA's form when that beats every cuDNN variant by as much.
  """
  by_shape = {row['shape']: row for row in rows}
  ms = lambda row, impl: (row.get(impl) or {}).get('ms', float('inf'))
  flags = []
  decoder = by_shape.get('decoder 448')
  if decoder:
    variants = {'': ms(decoder, 'cudnn'), '--flash_head_dim 64': ms(decoder, 'cudnn_hd64'),
                **{f'--flash_multiple {m}': ms(decoder, f'cudnn_pad{m}') for m in (8, 16, 32, 128)}}
    best = min(variants, key=variants.get)
    if best and variants[best] < margin * variants['']:
      flags.append(best)
  encoder = by_shape.get('mae_b encoder 448')
  if encoder:
    cudnn = min(ms(encoder, impl) for impl in encoder if impl.startswith('cudnn'))
    if ms(encoder, 'xla') < margin * cudnn:
      flags.append('--cudnn_min_length 256')
  return flags


def time_call(fn, args, iters: int, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / iters)
  return best * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dtype', default='', help='default: bfloat16 on accelerators, else float32')
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--quick', action='store_true', help='batch 2: a CPU smoke run')
  parser.add_argument('--shapes', default='',
                      help='comma-separated: only shapes whose name contains one of these')
  parser.add_argument('--explore', action='store_true',
                      help='also cuDNN with other paddings and the Pallas Triton kernel')
  parser.add_argument('--json', default='', help='append the records to this file')
  parser.add_argument('--suggest', action='store_true',
                      help='print, last, the bench_step.py flags the timings favour')
  args = parser.parse_args()
  device = jax.devices()[0]
  dtype = jnp.dtype(args.dtype or ('float32' if device.platform == 'cpu' else 'bfloat16'))
  print(f'{device.device_kind}, {dtype.name}, jax {jax.__version__}: ms per forward + backward '
        '(max |difference| from float32 einsum)')
  records = []
  for name, batch, tokens, heads, head_dim in SHAPES:
    if args.shapes and not any(part in name for part in args.shapes.split(',')):
      continue
    batch = 2 if args.quick else batch
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cotangent = (jax.random.normal(key, (batch, tokens, heads, head_dim), jnp.float32)
                          for key in keys)
    reference = vit.einsum_attention(q, k, v)
    row = {'shape': name, 'batch': batch, 'tokens': tokens, 'heads': heads,
           'head_dim': head_dim, 'dtype': dtype.name, 'device': device.device_kind,
           'auto': vit.resolve_attention('auto', dtype, head_dim, tokens)}
    cells = []
    inputs = tuple(x.astype(dtype) for x in (q, k, v))
    implementations = {**IMPLEMENTATIONS, **(EXPLORE if args.explore else {})}
    for impl, attend in implementations.items():
      if impl.startswith(('cudnn', 'pallas')) and vit.cudnn_unsupported(dtype, head_dim):
        cells.append(f'{impl} n/a')
        continue
      forward = jax.jit(attend)
      loss = lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v).astype(jnp.float32)
                                                    * cotangent)
      grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      try:
        error = float(jnp.max(jnp.abs(forward(*inputs).astype(jnp.float32) - reference)))
        ms = time_call(grad, inputs, args.iters, args.repeats)
      except Exception as e:  # pylint: disable=broad-except
        cells.append(f'{impl} failed: {str(e).splitlines()[0][:80]}')
        row[impl] = {'error': str(e)[:300]}
        continue
      row[impl] = {'ms': ms, 'max_abs_diff': error}
      cells.append(f'{impl} {ms:7.3f} ({error:.1e})')
    records.append(row)
    print(f'{name:22s} B{batch} T{tokens} {heads}x{head_dim}  auto={row["auto"]:6s}  '
          + '  '.join(cells), flush=True)
  if args.json:
    with open(args.json, 'a') as f:
      for row in records:
        f.write(json.dumps(row) + '\n')
  if args.suggest:
    print('suggested bench_step.py flags: ' + ' '.join(suggest_flags(records)))


if __name__ == '__main__':
  main()
