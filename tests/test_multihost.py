"""Two processes x 4 CPU devices (``launch.sh local 2``) against one process x 8 devices.

The processes form one JAX job through ``jax.distributed`` (gloo collectives on CPU), each
reading only its own data shards. With a fixed ``config.dataset.data_shards`` they see the same
global batches as one process, so the losses agree and the job's checkpoint restores in a
single process; faults on one process stop both, at the same step, without a hang.
"""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import damage
from mae_jax import checkpoint as ckpt_lib
from mae_jax.trainers import pretrain
from tiny_config import losses, run

pytestmark = pytest.mark.multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch.sh')


def local_command(data_dir, workdir, *flags, processes=2):
  return ['bash', LAUNCH, 'local', str(processes), '--devices-per-process',
          str(8 // processes), '--', '--config', f'tests/tiny_config.py:{data_dir}',
          '--workdir', str(workdir), '--heartbeat_timeout_seconds=20', *flags]


def launch(data_dir, workdir, *flags, timeout=300):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  return subprocess.run(local_command(data_dir, workdir, *flags), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_two_processes_equal_one_stop_together_and_restore_in_one(tiny_dataset, tiny_config,
                                                                  tmp_path):
  """2 x 4 devices: the same losses as 1 x 8; SIGTERM to the launcher stops both processes at
  one step with one committed checkpoint; that checkpoint resumes in ONE process on 8 devices,
  in the same data order (fixed data shards), and ends where a single-process run ends."""
  workdir = tmp_path / 'two_processes'
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  proc = subprocess.Popen(local_command(tiny_dataset, workdir, '--config.total_steps=2000'),
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.startswith('step 8:'):
        proc.send_signal(signal.SIGTERM)
        break
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  output = ''.join(lines) + out
  assert proc.returncode == 0, output
  assert '8 devices in 2 process(es)' in output
  stopped = [l for l in output.splitlines() if l.startswith('Stopped by SIGTERM at step')]
  assert len(stopped) == 1, output  # Process 0 alone reports.
  step = int(stopped[0].split('at step ')[1].split(':')[0])
  steps = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(workdir)), async_save=False).all_steps()
  assert steps == [step]
  two_losses = losses(workdir)
  assert sorted(two_losses) == list(range(1, step + 1))  # Each step logged once.

  reference = run(tiny_config, tmp_path / 'one_process', total_steps=2000,
                             stop_at_step=step + 4)
  one_losses = losses(tmp_path / 'one_process')
  for done in range(1, step + 1):
    np.testing.assert_allclose(two_losses[done], one_losses[done], rtol=1e-6, err_msg=f'step {done}')
  saved, metadata = pretrain.restore_state(reference, str(workdir))
  assert int(saved['step']) == step and metadata['data_layout']['data_shards'] == 8

  config = run(tiny_config, workdir, total_steps=2000, stop_at_step=step + 4)
  resumed_losses = losses(workdir)
  for done in range(step + 1, step + 5):
    np.testing.assert_allclose(resumed_losses[done], one_losses[done], rtol=1e-5,
                               err_msg=f'step {done}')
  # Not bitwise: 2 processes sum gradients in another order than 1, and Adam turns last-bit
  # differences of near-zero gradients into differences of order lr x 1e-2.
  resumed, _ = pretrain.restore_state(config, str(workdir))
  straight, _ = pretrain.restore_state(reference, str(tmp_path / 'one_process'))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.device_get(resumed['params']), jax.device_get(straight['params']))


def test_a_bad_record_on_process_1_stops_both_without_a_hang(tiny_dataset, tmp_path):
  data_dir = damage.copy_dataset(tiny_dataset, str(tmp_path / 'data'))
  bad_file = damage.shrink_first_image(data_dir, file_index=6)  # Data shard 6: process 1's.
  start = time.monotonic()
  result = launch(data_dir, tmp_path / 'wd', '--config.total_steps=20',
                  '--config.checkpoint.every_steps=100', timeout=240)
  output = result.stdout + result.stderr
  assert result.returncode != 0
  assert time.monotonic() - start < 200
  assert os.path.basename(bad_file) in output, output
  assert 'could not read its batch of step' in output, output
  assert 'no checkpoint was written' in output, output
