"""The core every trainer shares: workdir, the step loop with its log / save / stop, throughput.

Pretraining and fine-tuning differ in their state, step and what they do between steps
(reconstruction previews; validation and best-step selection); all of that comes in as
arguments. The loop itself is one: batches are read and copied to the devices ahead of the step
(``DevicePrefetch``), each step's metrics are checked one step behind so the host never idles
the devices (``faults.StepChecks``), and a read error, a non-finite step or a stop signal ends
every process at the same step, after a save when a save is due.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import ml_collections
from etils import epath

from data_pipeline import data_shards as data_shards_lib
from data_pipeline import device_batches
from mae_jax import distributed
from mae_jax import faults
from mae_jax import validate
from mae_jax import writers

# Scalars every step returns and every log line carries.
STEP_SCALARS = ('loss', 'grad_norm', 'lr')


def report(message: str) -> None:
  """Prints a progress message on process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)


def resolve_workdir(workdir: str) -> str:
  """Absolute local path (Orbax requires one) or the unchanged remote URL (gs://...)."""
  if not workdir:
    raise ValueError('workdir is empty: pass --workdir DIR')
  return workdir if '://' in workdir else os.path.abspath(workdir)


def prepare_workdir(workdir: str):
  """Creates the workdir and opens the metric writer; returns (the workdir as an
  ``epath.Path``, the writer). ``config.json`` is written once the resume is accepted
  (``resume.record_config``)."""
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  return path, writers.create_writer(workdir)


def open_training_stream(config: ml_collections.ConfigDict, records=None):
  """The training split (or its selected ``records``) as fixed data shards, files scanned.

  ``config.dataset``'s data shards, checksum, bad-record, reader and host cache options apply;
  every process opens its parts before any waits in a collective, and a failure on one stops
  all. Reports whether the records are kept in memory (``config.dataset.host_cache``).
  """
  dataset = config.dataset
  num_shards = validate.check_data_shards(
      config, jax.process_count(), data_shards_lib.num_files(dataset.data_dir,
                                                             dataset.train_split))

  def open_stream():
    stream = data_shards_lib.ShardedStream(
        dataset.data_dir, dataset.train_split, data_shards=num_shards,
        process_index=jax.process_index(), process_count=jax.process_count(), records=records,
        verify_checksums=dataset.verify_checksums, max_bad_records=dataset.max_bad_records,
        reader=dataset.reader, host_cache=dataset.host_cache)
    stream.check_readable()  # A missing or damaged file fails here, at start-up.
    return stream

  stream = distributed.agree(open_stream, 'opening the training data')
  report(stream.host_cache_summary())
  return stream


class Throughput:
  """Steps/s, images/s, MFU (FLOPs and peak known) and ETA over the interval since the last."""

  def __init__(self, global_batch, flops_per_example, peak_flops, num_devices, total_steps):
    self.global_batch = global_batch
    self.flops_per_example = flops_per_example
    self.peak_total = peak_flops * num_devices if peak_flops else None
    self.total_steps = total_steps
    self.start_time = self.start_step = None

  def start(self, step: int) -> None:
    self.start_time, self.start_step = time.perf_counter(), step

  def report(self, step: int) -> dict[str, float]:
    elapsed = time.perf_counter() - self.start_time
    steps = step - self.start_step
    self.start(step)
    if steps <= 0 or elapsed <= 0:
      return {}
    steps_per_s = steps / elapsed
    out = {'steps_per_s': steps_per_s, 'img_per_s': steps_per_s * self.global_batch,
           'eta_min': (self.total_steps - step) / steps_per_s / 60.0}
    if self.peak_total and self.flops_per_example:
      out['mfu'] = steps_per_s * self.global_batch * self.flops_per_example / self.peak_total
    return out


@dataclasses.dataclass
class LoopEnd:
  """How the loop ended: the state, the last logged scalars, the last committed save."""
  state: Any
  metrics: dict[str, float]
  last_saved: int | None
  end_step: int
  stopped_by: str  # '' unless a stop signal (here or on another process) ended the loop.


def run_steps(*, state, compile_step: Callable[[Any, Any], Callable], feed: faults.Feed,
              batch_sharding, start_step: int, stop_step: int, prefetch_depth: int,
              save_every: int, log_every: int, checkpointer, metadata: dict[str, Any], writer,
              throughput: Throughput, stop_signal: faults.StopSignal,
              last_saved: int | None,
              between_steps: Callable[[Any, int, Any], tuple[Any, dict[str, float]]] | None = None
              ) -> LoopEnd:
  """Runs steps ``start_step .. stop_step - 1``; see the module docstring.

  Args:
    state: the train state (donated to each step).
    compile_step: (state, first global batch) -> the step, ``(state, batch) -> (state,
      metrics)``; called once, before the first step, so throughput excludes compilation.
    feed: this process's host batches by step.
    between_steps: (state, steps done, that step's batch) -> (state, scalars to write at that
      step), after each step and before its log and save (validation, previews).
    Others: as named; ``checkpointer.save`` is called with ``metadata`` at save steps.

  Returns:
    A :class:`LoopEnd`.
  """
  checks = faults.StepChecks(feed, start_step=start_step, stop_step=stop_step,
                             save_every=save_every, log_every=log_every)
  step_fn = None
  logged: dict[str, float] = {}
  stopped_by = ''
  end_step = stop_step
  with device_batches.DevicePrefetch(feed.next, batch_sharding, start_step=start_step,
                                     stop_step=stop_step, depth=prefetch_depth) as prefetch:
    for step in range(start_step, stop_step):
      batch = prefetch.next(step)
      if step_fn is None:
        step_fn = compile_step(state, batch)
        throughput.start(step)
      state, metrics = step_fn(state, batch)
      done = step + 1
      values, log_now, save_now, stop_requested = checks.after(done, metrics, last_saved)
      if between_steps is not None:
        state, scalars = between_steps(state, done, batch)
        if scalars:
          writer.write_scalars(done, scalars)
      if log_now:
        logged = {k: float(values[k]) for k in STEP_SCALARS}
        if 'skipped_records' in values:
          logged['skipped_records'] = float(checks.skipped_records)
        logged.update(throughput.report(done))
        writer.write_scalars(done, logged)
        writer.flush()
        checkpointer.check()  # An asynchronous save that failed stops the run now, not later.
      if save_now:
        checkpointer.save(done, state, metadata, force=True)
        last_saved = done
      if stop_requested:
        stopped_by = stop_signal.name or 'SIGTERM on another process'
        end_step = done
        break
  return LoopEnd(state=state, metrics=logged, last_saved=last_saved, end_step=end_step,
                 stopped_by=stopped_by)


def stopped_message(stopped_by: str, step: int, checkpoint_dir: str) -> str:
  return (f'Stopped by {stopped_by} at step {step}: checkpoint committed to '
          f'{checkpoint_dir}/{step}; run the same command again to resume.')
