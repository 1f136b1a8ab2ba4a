r"""Whole-scene prediction throughput (windows/s, input pixels/s) and peak memory.

  python bench/bench_predict.py --preset tiny --size 2048x2048                 # 128 px, CPU
  python bench/bench_predict.py --preset mae_b --size 1000x1200 --batch_size 32  # ViT-B/16, 448 px
  python bench/bench_predict.py --preset mae_b --size 1000x1200 --dtype float32 --runs 1  # on a CPU
  python bench/bench_predict.py --checkpoint WORKDIR --size 4096x4096          # a trained model

Without ``--checkpoint`` the model is the fine-tuning config of ``--preset``/``--task``
(``configs/downstream.py``) with freshly initialised weights, saved in the fine-tuning checkpoint
format (``inference.save_initialised``) so the timed path is exactly the command's: load,
read, predict, blend, write the COG. Random weights cost the same FLOPs as trained ones. The
scene is a synthetic 12-band float32 GeoTIFF (speckled dB values in the band order, tiled,
DEFLATE) written block by block, so any size fits in memory. The prediction runs ``--runs``
times in this process (the setup runs in a child process); the first includes compilation.
Printed per run: windows, seconds, windows/s and input pixels/s; at the end the process's peak
resident memory (VmHWM): model, compilation and prediction.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
import rasterio
import rasterio.windows
from rasterio.transform import from_origin

from data_pipeline import schema
from mae_jax.tools import inference
from mae_jax.tools import predict

# Plausible per-channel statistics (dB) for the random model's normalisation: VV-VH, VV, VH.
BENCH_MEAN = (6.0,) * 4 + (-11.0,) * 4 + (-17.0,) * 4
BENCH_STD = (3.0,) * 4 + (4.0,) * 4 + (4.0,) * 4


def write_scene(path: str, height: int, width: int, seed: int = 0, block: int = 512) -> None:
  """A synthetic 12-band dB scene in schema.BAND_NAMES order (UTM, 10 m), block by block."""
  rng = np.random.default_rng(seed)
  profile = dict(driver='GTiff', width=width, height=height, count=schema.NUM_CHANNELS,
                 dtype='float32', crs='EPSG:32633', transform=from_origin(500000, 5000000, 10, 10),
                 nodata=np.nan, tiled=True, blockxsize=block, blockysize=block,
                 compress='deflate', interleave='pixel', BIGTIFF='IF_SAFER')
  with rasterio.open(path, 'w', **profile) as out:
    for row in range(0, height, block):
      for col in range(0, width, block):
        rows, cols = min(block, height - row), min(block, width - col)
        # Speckle in linear power around a few land-cover levels, then dB.
        level = rng.choice([-14.0, -10.0, -7.0], size=(1, rows, cols))
        vv = level + 10 * np.log10(rng.gamma(4.0, 0.25, (4, rows, cols)))
        vh = vv - 6.0 + 10 * np.log10(rng.gamma(4.0, 0.25, (4, rows, cols)))
        image = np.concatenate([vv - vh, vv, vh]).astype(np.float32)
        out.write(image, window=rasterio.windows.Window(col, row, cols, rows))


def random_checkpoint(preset: str, task: str, workdir: str, dtype: str = '') -> str:
  """Saves a randomly initialised fine-tuning model of ``preset``; returns its step folder."""
  from configs import downstream as downstream_configs  # pylint: disable=g-import-not-at-top
  config = downstream_configs.build(task, 'finetune', preset)
  if dtype:
    config.model.dtype = dtype
  contract = schema.InputContract(tile_size=config.model.image_size, mean=BENCH_MEAN,
                                  std=BENCH_STD)
  return inference.save_initialised(config, workdir, contract)


def setup(args, checkpoint: str, scene: str, height: int, width: int) -> None:
  """Writes the random checkpoint (unless ``checkpoint`` is '') and the scene."""
  if checkpoint:
    random_checkpoint(args.preset, args.task, checkpoint, args.dtype)
  with rasterio.Env(GDAL_CACHEMAX=64 << 20):
    write_scene(scene, height, width)


def peak_rss_mb() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='tiny', help='configs/pretrain.py preset of the '
                      'random model (tiny: 128 px; poster, mae_b: ViT-B/16 at 448 px).')
  parser.add_argument('--task', default='worldcover', choices=('vcf', 'worldcover'))
  parser.add_argument('--checkpoint', default='', help='A fine-tuned workdir instead.')
  parser.add_argument('--dtype', default='', help='Compute dtype of the random model (default: '
                      "the preset's; float32 on CPUs, where bfloat16 matmuls are slow).")
  parser.add_argument('--size', default='2048x2048', help='Scene WIDTHxHEIGHT in pixels.')
  parser.add_argument('--overlap', type=int, default=None)
  parser.add_argument('--batch_size', type=int, default=0)
  parser.add_argument('--runs', type=int, default=2)
  parser.add_argument('--workdir', default='', help='Where the checkpoint, scene and map go '
                      '(default: a temporary folder, removed).')
  args = parser.parse_args()
  width, height = (int(v) for v in args.size.lower().split('x'))
  with tempfile.TemporaryDirectory(dir=args.workdir or None) as tmp:
    checkpoint = args.checkpoint or os.path.join(tmp, 'model')
    scene = os.path.join(tmp, 'scene.tif')
    t0 = time.perf_counter()
    # In a child process, so that the peak memory printed below is the prediction's alone.
    child = multiprocessing.get_context('spawn').Process(
        target=setup, args=(args, '' if args.checkpoint else checkpoint, scene, height, width))
    child.start()
    child.join()
    if child.exitcode:
      raise SystemExit(f'setup failed (exit code {child.exitcode})')
    print(f'setup ({"" if args.checkpoint else "random checkpoint, "}{width} x {height} px '
          f'scene) {time.perf_counter() - t0:.1f} s')
    t0 = time.perf_counter()
    loaded = inference.load_downstream(checkpoint)
    model = loaded.model
    print(f'loaded {loaded.checkpoint} in {time.perf_counter() - t0:.1f} s: {loaded.task}, '
          f'{model.image_size} px, width {model.width} x {model.depth}, dtype {model.dtype}, '
          f'mesh {dict(loaded.mesh.shape)}')
    for run in range(args.runs):
      stats = predict.predict_scene(loaded, [scene], os.path.join(tmp, 'map.tif'),
                                    overlap=args.overlap, batch_size=args.batch_size,
                                    progress=False, log=lambda _: None)
      print(f'run {run + 1}{" (with compilation)" if run == 0 else ""}: {stats["windows"]} '
            f'windows of {stats["window_size"]} px (overlap {stats["overlap"]}, batch '
            f'{stats["batch_size"]}) in {stats["seconds"]:.2f} s (write '
            f'{stats["write_seconds"]:.2f} s): {stats["windows_per_s"]:.1f} windows/s, '
            f'{stats["pixels_per_s"] / 1e6:.2f} Mpx/s input', flush=True)
    print(f'peak RSS {peak_rss_mb():.0f} MB')


if __name__ == '__main__':
  main()
