"""The benchmarks run where accelerator images run them: without TensorFlow, CLU or TFDS."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Makes TensorFlow, TFDS and CLU look uninstalled, as on an image that has none of them.
HIDE_TENSORFLOW = '''
import importlib.machinery
_find_spec = importlib.machinery.PathFinder.find_spec
def _hidden(name, path=None, target=None):
  if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'clu'):
    return None
  return _find_spec(name, path, target)
importlib.machinery.PathFinder.find_spec = _hidden
'''


@pytest.fixture(name='no_tensorflow_env')
def fixture_no_tensorflow_env(tmp_path):
  (tmp_path / 'sitecustomize.py').write_text(HIDE_TENSORFLOW)
  env = dict(os.environ, PYTHONPATH=str(tmp_path), XLA_FLAGS='')
  check = subprocess.run([sys.executable, '-c', 'import tensorflow'], env=env,
                         capture_output=True, text=True, check=False)
  assert "No module named 'tensorflow'" in check.stderr
  return env


def test_step_benchmark_without_tensorflow(no_tensorflow_env, tmp_path):
  results = tmp_path / 'results.jsonl'
  run = subprocess.run(
      [sys.executable, 'bench/bench_step.py', '--preset', 'tiny', '--batch', '8', '--steps', '2',
       '--repeats', '1', '--warmup', '1', '--host_fed', '--torch', 'eager', '--json',
       str(results)], cwd=ROOT, env=no_tensorflow_env, capture_output=True, text=True,
      check=False, timeout=600)
  assert run.returncode == 0, run.stdout + run.stderr
  record = json.loads(results.read_text())
  assert record['attention'] == ['einsum', 'einsum'] and record['remat_policy'] == 'none'
  for entry in (record['jax'], record['jax_host_fed'], *record['torch'].values()):
    assert entry['img_s'] > 0 and 0 < entry['mfu_measured_peak'] < 1
    assert entry['ms_per_step'] == pytest.approx(8 * 1e3 / entry['img_s'])
  assert record['host_fed_over_resident'] == pytest.approx(
      record['jax_host_fed']['img_s'] / record['jax']['img_s'])
  table = subprocess.run([sys.executable, 'bench/accelerator_table.py', str(results)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
  assert f'| `tiny`, 128 x 128 x 12 | 8 | none | einsum / einsum | {record["jax"]["img_s"]:.0f} |' in table


def test_attention_benchmark_without_tensorflow(no_tensorflow_env, tmp_path):
  results = tmp_path / 'attention.jsonl'
  run = subprocess.run(
      [sys.executable, 'bench/bench_attention.py', '--quick', '--shapes', 'encoder 224',
       '--iters', '1', '--repeats', '1', '--json', str(results)], cwd=ROOT,
      env=no_tensorflow_env, capture_output=True, text=True, check=False, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  row = json.loads(results.read_text())
  assert (row['shape'], row['auto']) == ('mae_b encoder 224', 'einsum')
  # float32 on the CPU: every implementation computes the same attention.
  assert row['xla']['max_abs_diff'] < 1e-5 and row['einsum']['max_abs_diff'] < 1e-5
  assert 'cudnn' not in row


def test_suggested_flags_follow_the_timings():
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  import bench_attention  # pylint: disable=g-import-not-at-top
  def cells(times):  # None: the variant failed to run.
    return {k: {'error': 'unsupported'} if v is None else {'ms': v} for k, v in times.items()}
  def rows(decoder, encoder):
    return [dict(shape='decoder 448', **cells(decoder)),
            dict(shape='mae_b encoder 448', **cells(encoder))]
  suggest = bench_attention.suggest_flags
  # Wider heads win the decoder clearly; the encoder's XLA form is within the 3 % margin.
  assert suggest(rows({'cudnn': 2.0, 'cudnn_hd64': 1.5, 'cudnn_pad16': 1.8, 'xla': 8.0},
                      {'cudnn': 0.50, 'cudnn_pad8': 0.60, 'xla': 0.49})) == ['--flash_head_dim 64']
  # A shorter padding wins; XLA beats every cuDNN variant of the encoder.
  assert suggest(rows({'cudnn': 2.0, 'cudnn_hd64': 2.1, 'cudnn_pad16': 1.8},
                      {'cudnn': 0.50, 'cudnn_pad8': 0.45, 'xla': 0.40})) == [
                          '--flash_multiple 16', '--cudnn_min_length 256']
  # Nothing beats the defaults by the margin; failed variants (no 'ms') never win.
  assert suggest(rows({'cudnn': 2.0, 'cudnn_hd64': 1.98, 'cudnn_pad8': None},
                      {'cudnn': 0.50, 'xla': 0.50})) == []
  assert suggest([]) == []
