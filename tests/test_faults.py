"""Faults during pretraining: SIGTERM, non-finite loss, a changed data order, bad start-up values.

Each asserts the message and that the latest checkpoint is still a good, complete one.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import damage
from mae_jax import checkpoint as ckpt_lib
from mae_jax import faults
from mae_jax import sharding
from mae_jax.trainers import pretrain
from tiny_config import run
from mae_jax import validate

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def committed_steps(workdir):
  return ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(workdir)), async_save=False).all_steps()


def main_command(data_dir, workdir, *flags):
  return [sys.executable, '-m', 'mae_jax.main', '--config',
          f'tests/tiny_config.py:{data_dir}', '--workdir', str(workdir), *flags]


def test_sigterm_saves_at_the_next_step_then_resume_is_exact(tiny_dataset, tiny_config, tmp_path,
                                                             capsys):
  total = 100
  flags = [f'--config.total_steps={total}', '--config.checkpoint.every_steps=1000',
           '--config.checkpoint.async_save=True']
  workdir = tmp_path / 'preempted'
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  proc = subprocess.Popen(main_command(tiny_dataset, workdir, *flags), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.startswith('step 20:'):
        proc.send_signal(signal.SIGTERM)
        break
    out, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  output = ''.join(lines) + out
  assert proc.returncode == 0, output
  stopped = [l for l in output.splitlines() if l.startswith('Stopped by SIGTERM at step')]
  assert stopped, output
  step = int(stopped[0].split('at step ')[1].split(':')[0])
  assert 20 <= step < total
  # The checkpoint is the step it stopped at, committed, and nothing later.
  assert committed_steps(workdir) == [step]
  # Started again (here in this process, same config), it resumes there and finishes; the
  # params equal an uninterrupted run's, bitwise.
  overrides = {'total_steps': total, 'checkpoint.every_steps': 1000,
               'checkpoint.async_save': True}
  config = run(tiny_config, workdir, **overrides)
  assert f'Resumed from {workdir}/checkpoints/{step}.' in capsys.readouterr().out
  run(tiny_config, tmp_path / 'straight', **overrides)
  straight, _ = pretrain.restore_state(config, str(tmp_path / 'straight'))
  after, _ = pretrain.restore_state(config, str(workdir))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight['params']),
               jax.device_get(after['params']))


def test_non_finite_loss_stops_without_saving_a_bad_checkpoint(tiny_config, tmp_path):
  # An absurd learning rate makes the params overflow within a few steps.
  workdir = tmp_path / 'diverged'
  with pytest.raises(FloatingPointError, match=r'non-finite loss .* at step (\d+)') as e:
    run(tiny_config, workdir, total_steps=50, **{'optim.base_lr': 1e32,
                                                 'optim.warmup_steps': 0,
                                                 'checkpoint.every_steps': 1})
  bad_step = int(e.value.args[0].split('at step ')[1].split(':')[0])
  steps = committed_steps(workdir)
  assert steps and max(steps) < bad_step
  assert f'the latest checkpoint (step {max(steps)}) is the last good state' in str(e.value)
  config = tiny_config.copy_and_resolve_references()
  config.total_steps = 50
  state, _ = pretrain.restore_state(config, str(workdir))
  assert int(state['step']) == max(steps)
  for leaf in jax.tree.leaves(jax.device_get(state)):
    assert np.isfinite(leaf).all()


def test_a_bad_record_stops_training_and_the_latest_checkpoint_stays_good(tiny_dataset,
                                                                         tiny_config, tmp_path):
  data_dir = damage.copy_dataset(tiny_dataset, str(tmp_path / 'data'))
  bad_file = damage.shrink_first_image(data_dir, file_index=3)
  workdir = tmp_path / 'wd'
  # 8 records per data shard, one per step: the bad one is read within the first 8 steps.
  with pytest.raises(RuntimeError, match=r'could not read its batch of step (\d+)') as e:
    run(tiny_config, workdir, total_steps=8, **{'dataset.data_dir': data_dir,
                                                'checkpoint.every_steps': 1})
  message = str(e.value)
  assert os.path.basename(bad_file) in message and 'record 0' in message, message
  bad_step = int(message.split('batch of step ')[1].split(':')[0])
  steps = committed_steps(workdir)
  assert max(steps, default=0) < bad_step
  if steps:
    assert f'the latest checkpoint (step {max(steps)}) is the last good state' in message
    config = tiny_config.copy_and_resolve_references()
    config.dataset.data_dir = data_dir
    state, _ = pretrain.restore_state(config, str(workdir))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(state)))
  # With skipping allowed, the run finishes and counts the record, once per epoch.
  run(tiny_config, tmp_path / 'skipping', total_steps=16,
      **{'dataset.data_dir': data_dir, 'dataset.max_bad_records': 5})
  with open(tmp_path / 'skipping' / 'metrics.jsonl') as f:
    logged = [json.loads(line) for line in f]
  assert logged[-1]['step'] == 16 and logged[-1]['skipped_records'] == 2
  assert all(np.isfinite(r['loss']) for r in logged)


def test_resume_with_another_data_order_is_refused(tiny_config, tmp_path):
  run(tiny_config, tmp_path / 'wd', total_steps=4, stop_at_step=2)
  with pytest.raises(ValueError, match=r"change the order of the training data \(data_shards: "
                     r"checkpoint 8 != now 4"):
    run(tiny_config, tmp_path / 'wd', total_steps=4, **{'dataset.data_shards': 4})
  run(tiny_config, tmp_path / 'wd', total_steps=4,
      **{'dataset.data_shards': 4, 'dataset.allow_new_data_order': True})
  assert committed_steps(tmp_path / 'wd')[-1] == 4


def test_start_up_checks_name_the_field(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.dataset.data_shards = 4
  with pytest.raises(validate.ConfigError, match='data_shards=4 must be a multiple of the 3 '
                     'processes'):
    validate.check_data_shards(config, process_count=3, num_files=12)
  config.dataset.data_shards = 3
  with pytest.raises(validate.ConfigError, match='has 8 TFRecord files, not a multiple of the 3 '
                     'processes'):
    validate.check_data_shards(config, process_count=3, num_files=8)
  config.dataset.data_shards = 0
  assert validate.check_data_shards(config, process_count=2, num_files=8) == 2
  config.dataset.data_shards = 16
  with pytest.raises(validate.ConfigError, match='data_shards=16 does not divide the 8'):
    validate.check_data_shards(config, process_count=2, num_files=8)
  config.dataset.data_shards = 4
  config.batch_size = 6
  with pytest.raises(validate.ConfigError, match='batch_size=6 is not divisible by'):
    validate.check_data_shards(config, process_count=2, num_files=8)
  # A mesh that replicates the batch over all devices: each process would need all rows.
  mesh = Mesh(np.array(jax.devices()).reshape(1, 1, 8), sharding.MESH_AXES)
  validate.check_process_rows(sharding.batch_sharding(mesh), 8, 1)
  with pytest.raises(validate.ConfigError, match='hold 8 rows of the global batch of 8, but each '
                     'of the 2 processes feeds 4'):
    validate.check_process_rows(sharding.batch_sharding(mesh), 8, 2)


def test_distributed_settings_from_environment(monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mae_jax import distributed  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'localhost:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.delenv('JAX_PROCESS_ID', raising=False)
  assert distributed.settings() == {'coordinator_address': 'localhost:1234', 'num_processes': 2,
                                    'process_id': None}
  with pytest.raises(ValueError, match='a coordinator address is set but not process_id'):
    distributed.initialize()
  monkeypatch.setenv('JAX_PROCESS_ID', 'one')
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
    distributed.settings()
  # One process: agree() is the check itself.
  assert distributed.agree(lambda: 7, 'x') == 7
  with pytest.raises(KeyError):
    distributed.agree(lambda: {}['missing'], 'x')


def test_step_checks_defer_one_step_except_at_log_and_save_steps():
  """Hand-worked schedule: saves at 4, 8, 10; logs at 1, 3, 6, 9, 10; a stop saves at once."""

  class NoFeedError:
    error = None

  def metrics(finite=True, stop=False, skipped=0):
    return {'data_error_process': -1, 'finite': finite, 'stop_requested': stop, 'loss': 1.0,
            'grad_norm': 1.0, 'skipped_records': skipped}

  def walk(checks, steps, overrides):
    verdicts = {}
    for done in steps:
      values, log, save, stop = checks.after(done, metrics(**overrides.get(done, {})), None)
      verdicts[done] = (values is not None, log, save, stop)
      if stop:
        break
    return verdicts

  checks = faults.StepChecks(NoFeedError(), start_step=0, stop_step=10, save_every=4,
                             log_every=3)
  verdicts = walk(checks, range(1, 11), {2: {'skipped': 2}, 5: {'skipped': 1}})
  assert {d for d, v in verdicts.items() if v[1]} == {1, 3, 6, 9, 10}
  assert {d for d, v in verdicts.items() if v[2]} == {4, 8, 10}
  # Values come back exactly at log or save steps; every step is checked once, at the latest
  # when the next one is dispatched, so the skipped-record count sees steps 2 and 5 once each.
  assert all(v[0] == (v[1] or v[2]) for v in verdicts.values())
  assert checks.skipped_records == 3

  # A stop requested at step 5 (neither log nor save) is seen after step 6 and saves it.
  checks = faults.StepChecks(NoFeedError(), start_step=0, stop_step=10, save_every=4,
                             log_every=100)
  verdicts = walk(checks, range(1, 11), {5: {'stop': True}})
  assert max(verdicts) == 6 and verdicts[6] == (True, True, True, True)
  # A non-finite step that is neither logged nor saved raises when the next one is dispatched.
  checks = faults.StepChecks(NoFeedError(), start_step=0, stop_step=10, save_every=4,
                             log_every=100)
  with pytest.raises(FloatingPointError, match='at step 2'):
    walk(checks, range(1, 11), {2: {'finite': False}})
