"""The command line a user types: config file, preset and --config.* overrides."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_entrypoint_with_overrides(tiny_dataset, tmp_path):
  workdir = tmp_path / 'wd'
  # Run from another folder with a relative workdir, as users do.
  command = [
      sys.executable, '-m', 'mae_jax.main', '--config', f'{ROOT}/configs/pretrain.py:tiny',
      '--workdir', 'wd', f'--config.dataset.data_dir={tiny_dataset}',
      '--config.model.image_size=32', '--config.model.encoder.width=32',
      '--config.model.encoder.depth=1', '--config.model.encoder.heads=2',
      '--config.model.decoder.width=32', '--config.model.decoder.depth=1',
      '--config.model.decoder.heads=2', '--config.total_steps=4', '--config.batch_size=8',
      '--config.seed=7', '--config.mesh.data=4', '--config.mesh.fsdp=2',
      '--config.log_every_steps=2', '--config.image_every_steps=4']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', PYTHONPATH=ROOT)
  result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'step 4: ' in result.stdout and 'loss=' in result.stdout
  assert "mesh {'data': 4, 'fsdp': 2, 'tensor': 1}" in result.stdout
  config = json.loads((workdir / 'config.json').read_text())
  assert (config['seed'], config['total_steps'], config['batch_size']) == (7, 4, 8)
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'metrics.jsonl', 'plots',
                                         'tensorboard']
  assert os.listdir(workdir / 'checkpoints') == ['4']


def test_entrypoint_rejects_a_bad_field(tiny_dataset, tmp_path):
  command = [sys.executable, '-m', 'mae_jax.main', '--config', 'configs/pretrain.py:tiny',
             '--workdir', str(tmp_path), f'--config.dataset.data_dir={tiny_dataset}',
             '--config.model.patch_size=15']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'config.model.patch_size=15 does not divide config.model.image_size=128' in result.stderr
