r"""Train-step throughput (img/s, MFU, peak memory) of mae_jax and of transformers' PyTorch ViT-MAE.

  python bench/bench_step.py --preset tiny                               # CPU, both frameworks
  python bench/bench_step.py --preset mae_b --batch 64 --host_fed        # an accelerator
  python bench/bench_step.py --preset mae_b --batch 256 --image_size 224 --channels 3
  bench/accelerator_check.sh                                              # the README's table

Runs on synthetic float16 dB arrays (no dataset, no TensorFlow). mae_jax: the trainer's own
jitted ``pretrain_step.train_step`` over all local devices, its metrics checked one step behind
as the training loop does (``faults.StepChecks``), timed after compilation and warm-up; best of
``--repeats`` runs of ``--steps`` steps. ``--host_fed`` also times the flagship the way training
feeds it: every step's batch starts as float16 numpy on the host and goes through the loop's
``faults.Feed`` and ``device_batches.DevicePrefetch`` (read and copied ahead on a thread).

PyTorch (where torch and transformers are installed): the same model, weights, batch and AdamW
as ``ViTMAEForPreTraining`` on the same accelerator as JAX (the CPU when JAX runs on one), with
sdpa attention, bf16 autocast when mae_jax computes in bfloat16, fused AdamW on GPUs; eager, and
with ``--torch compile`` or ``both`` also ``torch.compile``. Runs of the two alternate so both
see the same machine.

MFU = model FLOPs (``mae_jax.flops``, matmuls only, train = 3 x forward) x img/s / peak, against
the spec sheet where the device is known and against a measured matmul peak (bfloat16 8192^3 on
accelerators, float32 2048^3 on CPUs). Peak memory: JAX's allocator peak and XLA's own estimate
for the compiled step; ``torch.cuda.max_memory_allocated`` for PyTorch. ``--json FILE`` appends
one record per run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time

# PyTorch shares the accelerator in this process: JAX allocates as it needs rather than
# taking 75 % of the memory up front (this also makes its peak-memory figure the real peak).
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position

import flax.linen as nn
import jax
import numpy as np

import configs.pretrain as pretrain_configs
from data_pipeline import device_batches
from data_pipeline import schema
from mae_jax import faults
from mae_jax import flops as flops_lib
from mae_jax import memory
from mae_jax import optim
from mae_jax.trainers import pretrain_step
from mae_jax import sharding
from mae_jax import state as state_lib
from mae_jax.models import mae
from mae_jax.models import vit

GB = 1e9
MEAN_DB, STD_DB = -12.0, 5.0  # The synthetic tiles' distribution, also used to normalise them.


def synthetic_batch(batch: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, size, size, channels), dtype=np.float32)
  return (images * STD_DB + MEAN_DB).astype(np.float16)


def build_config(args):
  """The preset with this run's overrides."""
  config = pretrain_configs.preset_config(args.preset)
  on_cpu = jax.devices()[0].platform == 'cpu'
  if args.dtype:
    config.model.dtype = args.dtype
  elif on_cpu:
    config.model.dtype = 'float32'  # CPUs have no fast bfloat16 matmul path in XLA.
  for field in ('image_size', 'remat_policy', 'attention_implementation'):
    if getattr(args, field):
      config.model[field] = getattr(args, field)
  if args.channels:
    config.model.num_channels = args.channels
  if args.scan:
    config.model.scan_layers = args.scan == 'true'
  config.batch_size = args.batch or (config.batch_size if args.preset == 'tiny'
                                     else 2 * jax.device_count())
  # Presets sized for pods (mae_h: fsdp 8) run on the devices there are.
  config.mesh.fsdp = math.gcd(config.mesh.fsdp, jax.device_count())
  config.mesh.data = -1
  if args.cudnn_min_length:
    vit.CUDNN_AUTO_MIN_LENGTH = args.cudnn_min_length
  if args.flash_multiple:
    vit.FLASH_LENGTH_MULTIPLE = args.flash_multiple
  if args.flash_head_dim:
    vit.FLASH_MIN_HEAD_DIM = args.flash_head_dim
  return config


def device_peak_memory() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return peak / GB if peak else None


class JaxBench:
  """The sharded state, the compiled train step and its two feeds (device-resident, host-fed)."""

  def __init__(self, config, host_fed: bool):
    self.config = config
    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.rules_from_config(config.logical_rules)
    self.model = model = mae.model_from_config(config.model)
    batch_size = config.batch_size
    tx, schedule = optim.create_optimizer(config.optim, batch_size, 10_000)
    mean = np.full(model.num_channels, MEAN_DB, np.float32)
    std = np.full(model.num_channels, STD_DB, np.float32)
    self.batch_sharding = sharding.batch_sharding(mesh)
    # Host-fed steps alternate between two batches, so no step reuses the one before it.
    self.host_images = [synthetic_batch(batch_size, model.image_size, model.num_channels, seed=i)
                        for i in range(2 if host_fed else 1)]
    # The training loop's Feed adds the CONTROL column, so both feeds run the same program.
    self.stop_signal = faults.StopSignal()
    feed = self._feed()
    self._context = contextlib.ExitStack()
    self._context.enter_context(jax.set_mesh(mesh))
    self._context.enter_context(nn.logical_axis_rules(rules))
    _, shardings = state_lib.state_shardings(model, tx, mesh, rules)
    self.state = state_lib.create_state(model, tx, jax.random.key(0), shardings)
    self.resident_batch = device_batches.global_batch(feed.next(0), self.batch_sharding)

    def compile_with(remat_policy):
      step = jax.jit(functools.partial(pretrain_step.train_step,
                                       model=model.clone(remat_policy=remat_policy), tx=tx,
                                       schedule=schedule, mean=mean, std=std, seed=0,
                                       accum_steps=config.optim.grad_accum_steps),
                     in_shardings=(shardings, self.batch_sharding), donate_argnums=(0,))
      return step.lower(self.state, self.resident_batch).compile()

    t0 = time.perf_counter()
    # As the trainer does: remat 'auto' takes the fastest policy whose XLA plan fits.
    self.compiled, self.remat_policy, planned = memory.compile_fitting(
        compile_with, model.remat_policy, memory.device_memory_bytes())
    self.compile_s = time.perf_counter() - t0
    self.xla_estimate_gb = planned / GB if planned else None
    self.params = jax.device_get(self.state['params'])  # Before donation invalidates it.
    self.step = 0

  def _feed(self):
    def host_batches():
      for i in range(1 << 62):
        yield {schema.IMAGE: self.host_images[i % len(self.host_images)]}
    return faults.Feed(host_batches(), lambda: None, self.stop_signal)

  def run(self, num_steps: int, host_fed: bool = False) -> float:
    """Seconds for ``num_steps`` steps, from the first dispatch to the last step's result.

    Device-resident: the same batch every step, steps dispatched back to back. Host-fed: the
    training loop's feeding and checking (Feed, DevicePrefetch, StepChecks), so the figure
    carries all the host work that training adds to a step.
    """
    start, stop = self.step, self.step + num_steps
    t0 = time.perf_counter()
    if host_fed:
      feed = self._feed()
      checks = faults.StepChecks(feed, start_step=start, stop_step=stop, save_every=1 << 30,
                                 log_every=1 << 30)
      with device_batches.DevicePrefetch(feed.next, self.batch_sharding, start_step=start,
                                         stop_step=stop,
                                         depth=self.config.dataset.device_prefetch) as prefetch:
        for step in range(start, stop):
          self.state, metrics = self.compiled(self.state, prefetch.next(step))
          checks.after(step + 1, metrics, None)
    else:
      for _ in range(start, stop):
        self.state, metrics = self.compiled(self.state, self.resident_batch)
    jax.block_until_ready(metrics)
    self.step = stop
    return time.perf_counter() - t0

  def close(self):
    self._context.close()


class TorchBench:
  """The same model in transformers' ViTMAEForPreTraining, on JAX's kind of device."""

  def __init__(self, model, params, optim_config, batch_size: int, bf16: bool, compile_: bool):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    from mae_jax.models import hf_convert  # pylint: disable=g-import-not-at-top
    self.torch = torch
    on_gpu = jax.devices()[0].platform == 'gpu' and torch.cuda.is_available()
    self.device = torch.device('cuda' if on_gpu else 'cpu')
    torch.manual_seed(0)
    hf_model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
        **hf_convert.hf_config_dict(model), attn_implementation='sdpa'))
    if hf_model.config._attn_implementation != 'sdpa':  # pylint: disable=protected-access
      raise RuntimeError('transformers did not take sdpa attention for ViTMAE')
    state_dict = {k: torch.from_numpy(np.ascontiguousarray(v))
                  for k, v in hf_convert.to_hf_state_dict(model, params).items()}
    hf_model.load_state_dict(state_dict, strict=False)
    hf_model.to(self.device).train()
    self.opt = torch.optim.AdamW(hf_model.parameters(), lr=optim_config.base_lr,
                                 betas=(optim_config.b1, optim_config.b2),
                                 weight_decay=optim_config.weight_decay, fused=on_gpu)
    self.model = torch.compile(hf_model) if compile_ else hf_model
    self.autocast = bf16 and on_gpu
    images = synthetic_batch(batch_size, model.image_size, model.num_channels)
    # Normalised as mae_jax does on its device; channels first for the Conv2d.
    pixels = ((images.astype(np.float32) - MEAN_DB) / STD_DB).transpose(0, 3, 1, 2)
    self.pixels = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
    self.label = ('torch.compile' if compile_ else 'eager') + (
        ', bf16 autocast' if self.autocast else ', float32') + ', sdpa' + (
            ', fused AdamW' if on_gpu else f', {torch.get_num_threads()} threads')
    if on_gpu:
      torch.cuda.reset_peak_memory_stats()

  def _step(self):
    self.opt.zero_grad(set_to_none=True)
    with self.torch.autocast('cuda', dtype=self.torch.bfloat16, enabled=self.autocast):
      loss = self.model(pixel_values=self.pixels).loss
    loss.backward()
    self.opt.step()

  def run(self, num_steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(num_steps):
      self._step()
    if self.device.type == 'cuda':
      self.torch.cuda.synchronize()
    return time.perf_counter() - t0

  def peak_memory(self) -> float | None:
    if self.device.type != 'cuda':
      return None
    return self.torch.cuda.max_memory_allocated() / GB


def profile_top_ops(bench: JaxBench, num_steps: int, top: int = 25) -> list[dict[str, float]]:
  """Device time per step of the step's most expensive ops, from a jax.profiler trace."""
  import glob  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  trace_dir = tempfile.mkdtemp(prefix='bench_profile_')
  jax.profiler.start_trace(trace_dir)
  bench.run(num_steps)
  jax.profiler.stop_trace()
  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  if not files:
    return []
  totals: dict[str, float] = {}
  for plane in ProfileData.from_file(files[0]).planes:
    if not plane.name.startswith(('/device:GPU', '/device:TPU')):
      continue
    lines = list(plane.lines)
    ops = [line for line in lines if line.name == 'XLA Ops'] or [
        line for line in lines if line.name not in ('XLA Modules', 'Steps', 'XLA TraceMe')]
    for line in ops:
      for event in line.events:
        totals[event.name] = totals.get(event.name, 0.0) + event.duration_ns / 1e6 / num_steps
  whole = sum(totals.values()) or 1.0
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  return [{'op': name, 'ms_per_step': ms, 'share': ms / whole} for name, ms in ranked]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='tiny', help='configs/pretrain.py preset')
  parser.add_argument('--batch', type=int, default=0, help='global batch (default: preset, or '
                      '2 per device for ViT-B and larger)')
  parser.add_argument('--image_size', type=int, default=0, help='override the preset (224 ...)')
  parser.add_argument('--channels', type=int, default=0, help='override the preset (3 ...)')
  parser.add_argument('--dtype', default='', help='compute dtype override (float32, bfloat16)')
  parser.add_argument('--remat_policy', default='', help='override: none, dots, full, ...')
  parser.add_argument('--scan', default='', choices=('', 'true', 'false'),
                      help='override scan_layers')
  parser.add_argument('--attention_implementation', default='',
                      help=f'override: one of {vit.ATTENTION_IMPLEMENTATIONS}')
  parser.add_argument('--cudnn_min_length', type=int, default=0,
                      help="'auto' attention uses XLA's form below this sequence length")
  parser.add_argument('--flash_multiple', type=int, default=0,
                      help='pad cuDNN attention to a multiple of this (default: the model\'s)')
  parser.add_argument('--flash_head_dim', type=int, default=0,
                      help='zero-pad narrower cuDNN attention heads to this (default: none)')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=3,
                      help='timed runs of --steps steps; the best is reported')
  parser.add_argument('--host_fed', action='store_true',
                      help='also time host-fed steps (numpy -> Feed -> DevicePrefetch)')
  parser.add_argument('--torch', default='eager', choices=('none', 'eager', 'compile', 'both'),
                      help='the PyTorch reference(s) to run beside mae_jax')
  parser.add_argument('--skip_jax', action='store_true',
                      help='PyTorch only (e.g. a torch.compile run beside an earlier JAX one)')
  parser.add_argument('--profile_steps', type=int, default=0,
                      help='trace this many steps and print the most expensive device ops')
  parser.add_argument('--label', default='', help='a name for this run in --json')
  parser.add_argument('--json', default='', help='append one JSON record to this file')
  args = parser.parse_args()

  config = build_config(args)
  device = jax.devices()[0]
  on_cpu = device.platform == 'cpu'
  spec_peak, peak_source = flops_lib.device_peak_flops(
      override_tflops=config.peak_tflops_per_device)
  if peak_source not in ('spec sheet', 'config'):  # A CPU's is measured, printed below.
    spec_peak = None
  measured_peak = (flops_lib.measured_matmul_peak(2048, 5, 'float32') if on_cpu else
                   flops_lib.measured_matmul_peak(8192, 10, 'bfloat16'))
  num_devices = jax.device_count()
  bench = None
  if args.skip_jax:  # A PyTorch-only run (torch.compile beside an earlier JAX run).
    model = mae.model_from_config(config.model)
    params = jax.device_get(nn.meta.unbox(jax.jit(state_lib.init_params_fn(model))(
        jax.random.key(0))))
  else:
    bench = JaxBench(config, args.host_fed)
    model, params = bench.model, bench.params
    bench.run(args.warmup)
    if args.host_fed:
      bench.run(args.warmup, host_fed=True)
  batch = config.batch_size
  attention = [vit.resolve_attention(model.attention_implementation, model.dtype, head_dim, length)
               for head_dim, length in ((model.width // model.heads, model.num_kept + 1),
                                        (model.decoder_width // model.decoder_heads,
                                         model.num_patches + 1))]
  flops_per_example = flops_lib.mae_train_flops(model)
  record = {
      'label': args.label or args.preset, 'preset': args.preset, 'batch': batch,
      'image_size': model.image_size, 'channels': model.num_channels,
      'dtype': str(np.dtype(model.dtype)), 'scan_layers': model.scan_layers,
      'attention': attention, 'device': f'{num_devices}x{device.device_kind}',
      'jax_version': jax.__version__, 'gflop_per_example': flops_per_example / 1e9,
      'spec_peak_tflops': spec_peak / 1e12 if spec_peak else None,
      'measured_peak_tflops': measured_peak / 1e12,
  }
  if bench:
    record.update(remat_policy=bench.remat_policy, compile_s=bench.compile_s,
                  xla_memory_estimate_gb=bench.xla_estimate_gb)

  references = []
  if args.torch != 'none':
    try:
      import torch  # pylint: disable=unused-import
      import transformers  # pylint: disable=unused-import
    except ImportError:
      print('torch: not installed (pip install -r requirements-parity.txt to compare)')
    else:
      for compile_ in {'eager': [False], 'compile': [True], 'both': [False, True]}[args.torch]:
        t0 = time.perf_counter()
        try:
          reference = TorchBench(model, params, config.optim, batch,
                                 bf16=model.dtype == jax.numpy.bfloat16, compile_=compile_)
          reference.run(args.warmup)
        except Exception as e:  # pylint: disable=broad-except  # Recorded; JAX's figures stand.
          print(f'torch ({"torch.compile" if compile_ else "eager"}) failed: {e!r}'[:400])
          record.setdefault('torch_errors', []).append(repr(e)[:400])
          continue
        reference.setup_s = time.perf_counter() - t0
        references.append(reference)

  times = {'jax': [], 'jax_host_fed': [], **{r.label: [] for r in references}}
  for _ in range(args.repeats):
    if bench:
      times['jax'].append(bench.run(args.steps))
      if args.host_fed:
        times['jax_host_fed'].append(bench.run(args.steps, host_fed=True))
    for reference in references:
      times[reference.label].append(reference.run(args.steps))

  def rates(seconds: list[float]) -> dict[str, float]:
    img_s = batch * args.steps / min(seconds)
    out = {'img_s': img_s, 'ms_per_step': 1e3 * min(seconds) / args.steps,
           'mfu_measured_peak': img_s * flops_per_example / (measured_peak * num_devices)}
    if spec_peak:
      out['mfu_spec'] = img_s * flops_per_example / (spec_peak * num_devices)
    return out

  if bench:
    record['jax'] = rates(times['jax'])
    record['jax']['peak_memory_gb'] = device_peak_memory()
    if args.host_fed:
      record['jax_host_fed'] = rates(times['jax_host_fed'])
      record['host_fed_over_resident'] = (record['jax_host_fed']['img_s']
                                          / record['jax']['img_s'])
  for reference in references:
    entry = rates(times[reference.label])
    entry['peak_memory_gb'] = reference.peak_memory()
    entry['setup_s'] = reference.setup_s
    if bench:
      entry['jax_over_torch'] = record['jax']['img_s'] / entry['img_s']
    record.setdefault('torch', {})[reference.label] = entry
  if bench and args.profile_steps:
    try:
      record['profile'] = profile_top_ops(bench, args.profile_steps)
    except Exception as e:  # pylint: disable=broad-except  # A profiler missing (no CUPTI).
      record['profile_error'] = repr(e)[:400]
  if bench:
    bench.close()
  print_record(record, args)
  if args.json:
    with open(args.json, 'a') as f:
      f.write(json.dumps(record) + '\n')


def print_record(record, args) -> None:
  """The human-readable lines of one run."""
  def mfu_text(entry):
    spec = f'MFU {entry["mfu_spec"]:6.1%} of spec' if 'mfu_spec' in entry else 'MFU n/a of spec'
    return f'{spec}, {entry["mfu_measured_peak"]:6.1%} of measured'

  def memory_text(gb):
    return f'peak {gb:.1f} GB' if gb else 'peak memory n/a'

  print(f'preset={record["preset"]} batch={record["batch"]} '
        f'image={record["image_size"]}x{record["channels"]} dtype={record["dtype"]} '
        f'remat={record.get("remat_policy", "-")} scan={record["scan_layers"]} '
        f'attention={"/".join(record["attention"])} (encoder/decoder) '
        f'devices={record["device"]} jax {record["jax_version"]}')
  print(f'model: {record["gflop_per_example"]:.2f} GFLOP per example per train step; peak '
        + (f'{record["spec_peak_tflops"]:.0f} TFLOP/s spec, ' if record['spec_peak_tflops']
           else '') + f'{record["measured_peak_tflops"]:.1f} TFLOP/s measured matmul')
  if 'jax' in record:
    jx = record['jax']
    estimate = record['xla_memory_estimate_gb']
    print(f'jax:   {jx["img_s"]:9.1f} img/s {jx["ms_per_step"]:8.1f} ms/step  {mfu_text(jx)}  '
          f'{memory_text(jx["peak_memory_gb"])} (XLA plan '
          + (f'{estimate:.1f} GB' if estimate else 'n/a')
          + f'); compile {record["compile_s"]:.1f} s; best of {args.repeats} x {args.steps} steps')
  if 'jax_host_fed' in record:
    hf = record['jax_host_fed']
    print(f'jax host-fed: {hf["img_s"]:9.1f} img/s {hf["ms_per_step"]:8.1f} ms/step  '
          f'{record["host_fed_over_resident"]:.3f} of device-resident')
  for label, entry in record.get('torch', {}).items():
    ratio = f'  jax/torch {entry["jax_over_torch"]:.2f}' if 'jax_over_torch' in entry else ''
    print(f'torch: {entry["img_s"]:9.1f} img/s {entry["ms_per_step"]:8.1f} ms/step  '
          f'{mfu_text(entry)}  {memory_text(entry["peak_memory_gb"])} ({label}; set-up '
          f'{entry["setup_s"]:.0f} s){ratio}')
  for row in record.get('profile', []):
    print(f'  {row["ms_per_step"]:8.3f} ms/step {row["share"]:6.1%}  {row["op"][:110]}')


if __name__ == '__main__':
  main()
