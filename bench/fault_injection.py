r"""Kills pretraining at random moments, resumes it every time, and checks that nothing is lost.

Not a unit test (it takes minutes): run it after changing the trainer, the checkpointing or the
input pipeline.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      .venv/bin/python bench/fault_injection.py --kills 20 --terms 5 --out /tmp/faults

It trains the 32 px test config (``tests/tiny_config.py``) with asynchronous checkpoints every
``--every`` steps and interrupts it ``--kills`` times with SIGKILL and ``--terms`` times with
SIGTERM, in a random order, each at a random moment: some from the process start (landing in
start-up, restore or compilation), most after training has begun (in a step, in an
asynchronous save, at a log line). ``--damages`` more restarts first damage the newest committed
checkpoint (flipped bytes, a truncated file, a missing folder or manifest, truncated metadata:
``tests/damage.py``) and are then killed like the others. After each interruption it starts the
same command again and asserts:

* the restart resumes from the latest *committed* checkpoint (Orbax's view before the restart),
  which restores completely; a save cut short by SIGKILL is never picked;
* after SIGKILL, no more than the steps since the last committed save are lost (at most one
  save interval, or two if a save was still in flight);
* after SIGTERM, the run exited 0 with a checkpoint of the very step it stopped at, and the
  restart resumes from that step: nothing is lost;
* after damage, the restart says the newest step cannot be restored, falls back to the one
  before it (or resumes the newest if the damage left it exactly restorable and verified) and
  moves the damaged step to ``damaged_checkpoints/``;

and at the end that the params equal, bitwise, those of an uninterrupted run of the same config.
It writes ``tally.json`` and ``tally.md`` into ``--out`` and exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'tests'))

from damage import CHECKPOINT_DAMAGE  # pylint: disable=g-import-not-at-top,wrong-import-position

STEP_LINE = re.compile(r'^step (\d+):')
RESUMED = re.compile(r'^Resumed from .*/(\d+)\.$')
FELL_BACK = re.compile(r'^Checkpoint step (\d+) cannot be restored: ')
STOPPED = re.compile(r'^Stopped by SIGTERM at step (\d+):')


def committed_steps(workdir: str) -> list[int]:
  from mae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  directory = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  for _ in range(50):  # The training process may rotate a step out while Orbax lists it.
    try:
      checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
      try:
        return sorted(checkpointer.all_steps())
      finally:
        checkpointer.close()
    except FileNotFoundError:
      time.sleep(0.1)
  raise RuntimeError(f'could not list the committed steps of {directory}')


def leftover_partial_saves(workdir: str) -> list[str]:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(name for name in os.listdir(directory) if 'tmp' in name)


class Run:
  """One training process whose output is read line by line as it comes."""

  def __init__(self, command: list[str], env: dict[str, str]):
    self.start = time.monotonic()
    self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line.rstrip('\n'))

  def finish(self, timeout: float) -> int:
    code = self.proc.wait(timeout=timeout)
    self.reader.join(timeout=10)
    return code

  def matches(self, pattern) -> list[int]:
    return [int(m.group(1)) for m in map(pattern.match, self.lines) if m]

  def tail(self, n: int = 30) -> str:
    return '\n'.join(self.lines[-n:])


def build_dataset(path: str) -> None:
  from data_pipeline import build_synthetic  # pylint: disable=g-import-not-at-top
  build_synthetic.build(path, tile_size=32, train=64, validation=16, test=16, num_shards=8, seed=0)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--terms', type=int, default=5)
  parser.add_argument('--damages', type=int, default=5,
                      help='restarts that first damage the newest committed checkpoint')
  parser.add_argument('--total_steps', type=int, default=2000)
  parser.add_argument('--every', type=int, default=25, help='checkpoint interval (steps)')
  parser.add_argument('--start_fraction', type=float, default=0.3,
                      help='share of interruptions at U(0.5, max_delay) s after the process '
                      'starts (often in start-up); the others come U(0, max_train_delay) s after '
                      'its first training step')
  parser.add_argument('--max_delay', type=float, default=12.0)
  parser.add_argument('--max_train_delay', type=float, default=4.0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--data_dir', default='', help='default: a fresh 32 px synthetic set')
  parser.add_argument('--out', default='', help='workdirs and the tally (default: a temp dir)')
  args = parser.parse_args()

  out = args.out or tempfile.mkdtemp(prefix='mae_jax_faults_')
  os.makedirs(out, exist_ok=True)
  data_dir = args.data_dir or os.path.join(out, 'data')
  if not os.path.exists(os.path.join(data_dir, 'dataset_info.json')):
    build_dataset(data_dir)
  workdir = os.path.join(out, 'interrupted')
  flags = [f'--config.total_steps={args.total_steps}', f'--config.checkpoint.every_steps={args.every}',
           '--config.checkpoint.async_save=True', '--config.checkpoint.keep=3',
           '--config.log_every_steps=2']
  command = [sys.executable, '-m', 'mae_jax.main', '--config', f'tests/tiny_config.py:{data_dir}',
             '--workdir', workdir, *flags]
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  rng = random.Random(args.seed)
  plan = ['SIGKILL'] * args.kills + ['SIGTERM'] * args.terms + ['DAMAGE'] * args.damages
  rng.shuffle(plan)
  damage_kinds = sorted(CHECKPOINT_DAMAGE)  # In turn, so a run with 6 damages meets each.
  rng.shuffle(damage_kinds)

  records, failures = [], []
  started = time.monotonic()
  previous = None  # What the last interrupted run left: (kind, committed, last step seen).
  for kind in plan + ['finish']:
    before = committed_steps(workdir)
    record = {'kind': kind, 'committed_before': before[-1] if before else None}
    damaged = None
    if kind == 'DAMAGE' and len(before) >= 2:
      damaged = damage_kinds[len([r for r in records if r.get('damage')]) % len(damage_kinds)]
      CHECKPOINT_DAMAGE[damaged](os.path.join(workdir, 'checkpoints', str(before[-1])))
      record['damage'] = damaged
    run = Run(command, env)
    if kind != 'finish':
      if kind != 'DAMAGE' and rng.random() < args.start_fraction:  # From the process start.
        record['moment'] = 'from start'
        delay = rng.uniform(0.5, args.max_delay)
      elif kind == 'DAMAGE':  # After this run's first own save: damage runs make progress.
        record['moment'] = 'after a save'
        start_steps = set(committed_steps(workdir))
        while run.proc.poll() is None and not set(committed_steps(workdir)) - start_steps:
          time.sleep(0.2)
        delay = time.monotonic() - run.start + rng.uniform(0.0, args.max_train_delay)
      else:  # A moment of training: after the first step, when saves are in flight too.
        record['moment'] = 'in training'
        while run.proc.poll() is None and not run.matches(STEP_LINE):
          time.sleep(0.05)
        delay = time.monotonic() - run.start + rng.uniform(0.0, args.max_train_delay)
      record['delay_s'] = round(delay, 2)
      try:
        run.finish(timeout=max(0.0, delay - (time.monotonic() - run.start)))
      except subprocess.TimeoutExpired:
        run.proc.send_signal(signal.SIGTERM if kind == 'SIGTERM' else signal.SIGKILL)
    code = run.finish(timeout=600)
    record['exit_code'] = code
    resumed = run.matches(RESUMED)
    record['resumed_from'] = resumed[0] if resumed else None
    steps = run.matches(STEP_LINE)
    record['last_step_seen'] = max(steps) if steps else None
    record['compiled'] = any(l.startswith('Compiled the train step') for l in run.lines)
    record['partial_saves_left'] = leftover_partial_saves(workdir)

    def fail(message):
      failures.append(f'run {len(records)} ({kind}): {message}')
      print('FAIL', failures[-1], '\n', run.tail(), flush=True)

    # Every restart resumes from the newest committed checkpoint that restores, complete.
    expected = before[-1] if before else None
    record['fell_back_from'] = (run.matches(FELL_BACK) or [None])[0]
    if damaged:
      # Orbax may not need a removed state/_METADATA: then the verified newest step is fine.
      benign = damaged == 'missing state/_METADATA' and record['fell_back_from'] is None
      expected = before[-1] if benign else before[-2]
      moved = os.path.join(workdir, 'damaged_checkpoints', str(before[-1]))
      if not benign and (record['compiled'] or kind == 'finish'):
        if record['fell_back_from'] != before[-1]:
          fail(f'damage ({damaged}) of step {before[-1]} was not reported')
        if not os.path.isdir(moved):
          fail(f'the damaged step {before[-1]} was not moved to {moved}')
    if record['resumed_from'] != expected and (expected is not None or resumed):
      if record['compiled'] or kind == 'finish':
        fail(f'resumed from {record["resumed_from"]}, the latest committed step was {expected}')
    if previous is not None and expected is not None:
      lost = (previous['last_step_seen'] or 0) - expected
      record['steps_lost_by_previous'] = max(lost, 0)
      if previous['kind'] == 'SIGTERM' and previous['exit_code'] == 0 and lost > 0 and not damaged:
        fail(f'SIGTERM lost {lost} steps')
      if previous['kind'] in ('SIGKILL', 'DAMAGE') and lost > 2 * args.every and not damaged:
        fail(f'SIGKILL lost {lost} steps, more than two save intervals')
      if damaged and lost > 3 * args.every:  # Plus the damaged step's interval.
        fail(f'damage lost {lost} steps, more than three save intervals')
    if kind == 'SIGTERM' and code not in (0, None):
      # SIGTERM before the handler is installed (imports) kills like SIGKILL: allowed, counted.
      record['terminated_before_handler'] = code == -signal.SIGTERM
      if code != -signal.SIGTERM:
        fail(f'SIGTERM exit code {code}')
    if kind == 'SIGTERM' and code == 0:
      stopped = run.matches(STOPPED)
      after = committed_steps(workdir)
      if not stopped and steps and steps[-1] < args.total_steps:
        fail('exit 0 after SIGTERM without the stop message')
      if stopped and (not after or after[-1] != stopped[0]):
        fail(f'stopped at step {stopped[0]} but the latest checkpoint is {after[-1:]}')
      record['stopped_at'] = stopped[0] if stopped else None
    if kind in ('SIGKILL', 'DAMAGE') and code not in (-signal.SIGKILL, 0):
      fail(f'exit code {code}')
    if kind == 'finish' and code != 0:
      fail(f'the final run failed with {code}')
    records.append(record)
    previous = record
    print(json.dumps(record), flush=True)

  # The same config without interruptions, then a bitwise comparison of the params.
  straight = os.path.join(out, 'straight')
  run = Run([c if c != workdir else straight for c in command], env)
  if run.finish(timeout=1800) != 0:
    failures.append('the uninterrupted run failed:\n' + run.tail())
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mae_jax.trainers import pretrain  # pylint: disable=g-import-not-at-top
  from tiny_config import make_tiny_config  # pylint: disable=g-import-not-at-top
  config = make_tiny_config(data_dir)
  config.total_steps = args.total_steps
  a, _ = pretrain.restore_state(config, straight)
  b, _ = pretrain.restore_state(config, workdir)
  leaves_a = jax.tree.leaves(jax.device_get(a['params']))
  leaves_b = jax.tree.leaves(jax.device_get(b['params']))
  identical = all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))
  max_diff = max(float(np.max(np.abs(x - y))) for x, y in zip(leaves_a, leaves_b))
  if not identical:
    failures.append(f'final params differ from the uninterrupted run (max |diff| {max_diff:g})')

  kills = [r for r in records if r['kind'] == 'SIGKILL']
  damages = [r for r in records if r.get('damage')]
  terms = [r for r in records if r['kind'] == 'SIGTERM']
  # Steps a restart lost to the interruption before it; a restart that found damage loses the
  # damaged step's interval too, counted apart.
  lost_after_kill = [r.get('steps_lost_by_previous', 0) for r, p in zip(records[1:], records)
                     if p['kind'] in ('SIGKILL', 'DAMAGE') and not r.get('damage')
                     and r.get('steps_lost_by_previous') is not None]
  lost_after_term = [r.get('steps_lost_by_previous', 0) for r, p in zip(records[1:], records)
                     if p['kind'] == 'SIGTERM' and p['exit_code'] == 0 and not r.get('damage')
                     and r.get('steps_lost_by_previous') is not None]
  tally = {
      'sigkill': len(kills),
      'sigkill_before_training': sum(not r['compiled'] for r in kills),
      'sigterm': len(terms),
      'sigterm_clean_stops': sum(r['exit_code'] == 0 for r in terms),
      'sigterm_before_handler': sum(bool(r.get('terminated_before_handler')) for r in terms),
      'restarts': len(records) - 1,
      'restarts_from_latest_committed': len(records) - 1 - sum('resumed from' in f for f in failures),
      'max_steps_lost_after_sigkill': max(lost_after_kill, default=0),
      'save_interval': args.every,
      'max_steps_lost_after_sigterm': max(lost_after_term, default=0),
      'partial_saves_seen': sum(bool(r['partial_saves_left']) for r in records),
      'checkpoint_damages': len(damages),
      'damage_kinds': sorted({r['damage'] for r in damages}),
      'fallbacks_to_the_previous_step': sum(r['fell_back_from'] is not None for r in damages),
      'final_step': committed_steps(workdir)[-1:],
      'final_params_bitwise_equal': identical,
      'wall_min': round((time.monotonic() - started) / 60, 1),
      'failures': failures,
  }
  with open(os.path.join(out, 'tally.json'), 'w') as f:
    json.dump({'tally': tally, 'runs': records}, f, indent=2)
  rows = '\n'.join(f'| {k} | {v} |' for k, v in tally.items() if k != 'failures')
  with open(os.path.join(out, 'tally.md'), 'w') as f:
    f.write(f'| quantity | value |\n| --- | --- |\n{rows}\n')
  print(json.dumps(tally, indent=2))
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
