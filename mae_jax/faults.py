"""Faults in a training loop, and how every process learns at the same step that it must stop.

Cloud TPU and SLURM announce a preemption with SIGTERM, possibly to one host before another,
and a data error may hit one host only. Processes must nonetheless stop at the same step, or
the ones still training wait forever in a collective. So each process adds a ``CONTROL`` column
to its rows of every batch; the jitted step reduces it over the global batch (a few bytes riding
on the step's own collectives, no extra synchronisation), and every process reads the same
verdict from the step's metrics:

* bit 0: this process received SIGTERM (or SIGINT) and asks all to save and stop;
* bits 1..: ``process_index + 1`` of a process that could not read its batch (0: none).

``BAD_RECORD`` (present when skipping bad records is allowed) marks rows the reader filled
with no-data; their sum is the step's count of skipped records.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import input as data_input


CONTROL = 'control'
BAD_RECORD = data_input.BAD_RECORD  # Added by the reader in skip mode.
_STOP_BIT = 1


def control_column(local_batch: int, *, stop: bool, data_error_process: int | None) -> np.ndarray:
  """This process's CONTROL value, repeated over its rows."""
  value = (_STOP_BIT if stop else 0) | (0 if data_error_process is None
                                        else (data_error_process + 1) << 1)
  return np.full((local_batch,), value, np.int32)


def step_signals(batch: dict[str, Any]) -> dict[str, Any]:
  """Inside the jitted step: the verdicts of the global batch, replicated on every process."""
  control = batch.get(CONTROL)
  if control is None:  # Benchmarks feed bare images.
    control = jnp.zeros((1,), jnp.int32)
  out = {'stop_requested': jnp.max(control & _STOP_BIT),
         'data_error_process': jnp.max(control >> 1) - 1}
  if BAD_RECORD in batch:
    out['skipped_records'] = jnp.sum(batch[BAD_RECORD].astype(jnp.int32))
  return out


class StopSignal:
  """Within ``with StopSignal():``, SIGTERM and SIGINT set :attr:`received` instead of killing.

  The trainer checks it at step boundaries. Repeated SIGTERMs are ignored (SLURM signals the
  tasks and srun forwards its own copy, milliseconds apart); a second Ctrl-C interrupts at once.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.received is not None:
      if signum == signal.SIGINT:
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        signal.raise_signal(signum)
      return
    self.received = signum
    print(f'Received {signal.Signals(signum).name}: saving a checkpoint at the next step '
          'boundary, then stopping.', file=sys.stderr, flush=True)

  def __enter__(self) -> 'StopSignal':
    for signum in self.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name if self.received is not None else ''


class Feed:
  """This process's batches with the CONTROL column, turning a read error into a signal.

  With several processes, a host whose reader fails must not simply raise: the others would
  wait for it in the step's collectives. It sends ``no_data()`` instead (a batch of the same
  keys and shapes that trains nothing), flagged in CONTROL, so every process stops at that
  step, before any later save; then the failing host raises its reader's error (which names
  the file and record) and the others say which process failed. One process does the same, so
  there is one path to test and the message always gives the step and the last checkpoint.
  """

  def __init__(self, batches: Iterator[dict[str, np.ndarray]],
               no_data: Callable[[], dict[str, np.ndarray]], stop_signal: StopSignal,
               skip_mode: bool = False):
    self._batches = batches
    self._no_data = no_data
    self._skip_mode = skip_mode
    self._stop_signal = stop_signal
    self.error: Exception | None = None

  def next(self, step: int) -> dict[str, np.ndarray]:
    """The batch of step ``step + 1`` (the step that ``step`` completes), with CONTROL."""
    if self.error is None:
      try:
        batch = dict(next(self._batches))
      except StopIteration:
        raise
      except Exception as e:  # pylint: disable=broad-except
        self.error = e
        print(f'process {jax.process_index()}: cannot read the batch of step {step + 1}: {e}',
              file=sys.stderr, flush=True)
    if self.error is not None:
      batch = self._no_data()
      if self._skip_mode:  # Every process must send the same keys.
        batch[BAD_RECORD] = np.zeros((len(next(iter(batch.values()))),), np.bool_)
    local_batch = len(next(iter(batch.values())))
    batch[CONTROL] = control_column(
        local_batch, stop=self._stop_signal.received is not None,
        data_error_process=jax.process_index() if self.error is not None else None)
    return batch


def check_step(done: int, metrics: dict[str, Any], feed: Feed, last_saved: int | None
               ) -> dict[str, Any]:
  """Fetches step ``done``'s metrics and raises, identically on every process, if it failed."""
  metrics = jax.device_get(metrics)
  error_process = int(metrics['data_error_process'])
  kept = (f'the latest checkpoint (step {last_saved}) is the last good state'
          if last_saved is not None else 'no checkpoint was written')
  if error_process >= 0:
    if feed.error is not None:
      raise RuntimeError(f'process {jax.process_index()} could not read its batch of step {done}: '
                         f'{feed.error}; stopped, {kept}') from feed.error
    raise RuntimeError(f'process {error_process} could not read its batch of step {done} (its log '
                       f'names the file); stopped, {kept}')
  if not metrics['finite']:
    raise FloatingPointError(f'non-finite loss {float(metrics["loss"])} or gradient norm '
                             f'{float(metrics["grad_norm"])} at step {done}: training stopped '
                             f'without saving; {kept}')
  return metrics


class StepChecks:
  """When a loop checks its steps' metrics, and whether it logs, saves and stops after each.

  Step t's metrics are checked after step t+1 is dispatched, so the host never idles the
  devices; at log and save steps they are checked at once, so nothing unchecked is saved or
  logged. A stop request (``check_step``'s verdict) turns the step into a save step.
  """

  def __init__(self, feed: Feed, *, start_step: int, stop_step: int, save_every: int,
               log_every: int):
    self._feed = feed
    self._start_step = start_step
    self._stop_step = stop_step
    self._save_every = save_every
    self._log_every = log_every
    self._pending = None  # (step, metrics) dispatched but not yet checked.
    self.skipped_records = 0  # Summed over every checked step.

  def _check(self, done, metrics, last_saved):
    values = check_step(done, metrics, self._feed, last_saved)
    self.skipped_records += int(values.get('skipped_records', 0))
    return values

  def after(self, done: int, metrics: dict[str, Any], last_saved: int | None
            ) -> tuple[dict[str, Any] | None, bool, bool, bool]:
    """Step ``done`` was dispatched: (its checked values or None, log, save, stop)."""
    stop = False
    if self._pending is not None:
      stop = bool(self._check(*self._pending, last_saved)['stop_requested'])
    self._pending = (done, metrics)
    save = done % self._save_every == 0 or done == self._stop_step or stop
    log = done % self._log_every == 0 or done in (self._start_step + 1, self._stop_step)
    values = None
    if save or log:
      values = self._check(done, metrics, last_saved)
      self._pending = None
      stop = stop or bool(values['stop_requested'])
    return values, log or stop, save or stop, stop
