r"""Train-step throughput (img/s, MFU) of mae_jax, and of transformers' PyTorch ViT-MAE.

  python bench/bench_step.py --preset tiny
  python bench/bench_step.py --preset poster --batch 2 --steps 3       # ViT-B/16 at 448 px
  python bench/bench_step.py --preset mae_b --dtype bfloat16           # on an accelerator

Runs on synthetic float16 arrays (no dataset, no TensorFlow) over all local devices, times
``--steps`` jitted train steps after compilation and warm-up, and prints img/s, ms/step and MFU
(model FLOPs from ``mae_jax.flops`` / time / peak). The peak comes from ``mae_jax.flops`` for
known accelerators; on a CPU it is *measured* (best of a few large float32 matmuls), so CPU MFU
means "fraction of what this CPU reaches on a plain matmul". Where torch and transformers are
installed, the same model (same config, weights, batch, AdamW) runs as
``ViTMAEForPreTraining`` in PyTorch on the same machine, and the ratio JAX / PyTorch is printed.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

import configs.pretrain as pretrain_configs
from mae_jax import flops as flops_lib
from mae_jax import optim
from mae_jax import sharding
from mae_jax import state as state_lib
from mae_jax import train
from mae_jax.models import mae


def synthetic_batch(batch: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.normal(-12.0, 5.0, (batch, size, size, channels)).astype(np.float16)


def bench_jax(config, batch_size: int, steps: int, warmup: int):
  """Builds the sharded state and compiled step; returns (model, params, timer, compile s)."""
  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.rules_from_config(config.logical_rules)
  model = mae.model_from_config(config.model)
  tx, schedule = optim.create_optimizer(config.optim, batch_size, 10_000)
  mean = np.full(model.num_channels, -12.0, np.float32)
  std = np.full(model.num_channels, 5.0, np.float32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = state_lib.state_shardings(model, tx, mesh, rules)
    state = state_lib.create_state(model, tx, jax.random.key(0), shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {'image': jax.device_put(
        synthetic_batch(batch_size, model.image_size, model.num_channels), batch_sharding)}
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                     mean=mean, std=std, seed=0,
                                     accum_steps=config.optim.grad_accum_steps),
                   in_shardings=(shardings, batch_sharding), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    params = jax.device_get(state['params'])  # Before donation invalidates it.
    holder = {'state': state}

    def run(num_steps: int) -> float:
      """Seconds for ``num_steps`` steps, synchronised at the end."""
      t0 = time.perf_counter()
      for _ in range(num_steps):
        holder['state'], metrics = compiled(holder['state'], batch)
      jax.block_until_ready(metrics)
      return time.perf_counter() - t0

    run(warmup)
  return model, params, run, compile_s


def torch_runner(model, params, optim_config, batch_size: int, warmup: int):
  """A timer of the same model in transformers' ViTMAEForPreTraining, or None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  from mae_jax.models import hf_convert  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hf_model = transformers.ViTMAEForPreTraining(
      transformers.ViTMAEConfig(**hf_convert.hf_config_dict(model)))
  state_dict = {k: torch.from_numpy(np.ascontiguousarray(v))
                for k, v in hf_convert.to_hf_state_dict(model, params).items()}
  hf_model.load_state_dict(state_dict, strict=False)
  hf_model.train()
  opt = torch.optim.AdamW(hf_model.parameters(), lr=optim_config.base_lr,
                          betas=(optim_config.b1, optim_config.b2),
                          weight_decay=optim_config.weight_decay)
  images = synthetic_batch(batch_size, model.image_size, model.num_channels).astype(np.float32)
  # Same on-host work as the JAX path: normalise, channels first for the Conv2d.
  pixels = torch.from_numpy(((images + 12.0) / 5.0).transpose(0, 3, 1, 2).copy())

  def one_step():
    opt.zero_grad(set_to_none=True)
    loss = hf_model(pixel_values=pixels).loss
    loss.backward()
    opt.step()
    return loss

  def run(num_steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(num_steps):
      one_step()
    return time.perf_counter() - t0

  run(warmup)
  return run, torch.get_num_threads()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='tiny', help='configs/pretrain.py preset')
  parser.add_argument('--batch', type=int, default=0, help='global batch (default: preset, or '
                      '2 per device for ViT-B and larger on CPU)')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=3,
                      help='timed runs of --steps steps; the best is reported (JAX and PyTorch '
                      'runs alternate so both see the same machine load)')
  parser.add_argument('--dtype', default='', help='compute dtype override (float32, bfloat16)')
  parser.add_argument('--no_torch', action='store_true', help='skip the PyTorch reference')
  args = parser.parse_args()

  config = pretrain_configs.get_config(args.preset)
  on_cpu = jax.devices()[0].platform == 'cpu'
  if args.dtype:
    config.model.dtype = args.dtype
  elif on_cpu:
    config.model.dtype = 'float32'  # CPUs have no fast bfloat16 matmul path in XLA.
  batch = args.batch or (config.batch_size if args.preset == 'tiny' else 2 * jax.device_count())
  peak, peak_source = flops_lib.device_peak_flops(override_tflops=config.peak_tflops_per_device)
  if peak is None:
    raise SystemExit(f'unknown peak FLOP/s for {jax.devices()[0].device_kind}: '
                     'set config.peak_tflops_per_device')
  peak_total = peak * jax.device_count()

  model, params, jax_run, compile_s = bench_jax(config, batch, args.steps, args.warmup)
  reference = None
  if not args.no_torch:
    reference = torch_runner(model, params, config.optim, batch, args.warmup)
  jax_times, torch_times = [], []
  for _ in range(args.repeats):
    jax_times.append(jax_run(args.steps))
    if reference is not None:
      torch_times.append(reference[0](args.steps))
  step_s = min(jax_times) / args.steps
  img_s = batch / step_s
  flops_per_example = flops_lib.mae_train_flops(model)
  mfu = img_s * flops_per_example / peak_total
  device = jax.devices()[0]
  print(f'preset={args.preset} batch={batch} dtype={config.model.dtype} '
        f'devices={jax.device_count()}x{device.device_kind} image={model.image_size} '
        f'patch={model.patch_size} encoder={model.width}x{model.depth} '
        f'decoder={model.decoder_width}x{model.decoder_depth}')
  print(f'model: {flops_per_example / 1e9:.2f} GFLOP per example per train step; peak '
        f'{peak / 1e12:.3f} TFLOP/s per device ({peak_source})')
  print(f'jax:   {img_s:8.2f} img/s  {step_s * 1e3:9.1f} ms/step  MFU {mfu:6.1%}  '
        f'(compile {compile_s:.1f} s; best of {args.repeats} x {args.steps} steps)')
  if not args.no_torch:
    if reference is None:
      print('torch: not installed (pip install -r requirements-parity.txt to compare)')
    else:
      threads = reference[1]
      t_step_s = min(torch_times) / args.steps
      t_img_s = batch / t_step_s
      t_mfu = t_img_s * flops_per_example / peak_total
      print(f'torch: {t_img_s:8.2f} img/s  {t_step_s * 1e3:9.1f} ms/step  MFU {t_mfu:6.1%}  '
            f'(transformers ViTMAEForPreTraining, float32, {threads} threads)')
      print(f'ratio jax/torch: {img_s / t_img_s:.2f}')


if __name__ == '__main__':
  main()
