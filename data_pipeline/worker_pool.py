"""Runs independent jobs in worker processes, and stops them all promptly at Ctrl-C or an error.

``concurrent.futures.ProcessPoolExecutor`` used as a context manager does not stop: Ctrl-C
interrupts the parent, and from a terminal every worker too, but a worker only reports the
interrupt as its current job's exception and takes the next one, and leaving the ``with`` block
waits for every job still queued. A build of many shards then goes on writing them all.

:func:`run` hands each worker one job at a time, so nothing waits in a queue. At Ctrl-C
(``KeyboardInterrupt``), or when a job fails, no further job starts; the jobs still running get
one ``KeyboardInterrupt`` in the worker (a job that writes under a temporary name, like
``writer._write_shard``, then removes it), and the error is raised in the parent once they have
stopped. A worker still running ``grace_s`` seconds later (stuck in native code), or when Ctrl-C
comes again, is killed. Workers are spawned, not forked: TensorFlow's threads do not survive a
fork.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable

GRACE_S = 10.0  # How long running jobs get to stop after an interrupt before they are killed.
# A second Ctrl-C this soon after the first one is the same keypress reaching the parent twice
# (directly and through a worker's exception), not the user insisting.
_ECHO_S = 0.5

# In a worker: whether a job is running, so that SIGINT interrupts jobs but not the idle loop.
_job_running = False


def _on_sigint(signum, frame):  # pylint: disable=unused-argument
  """A worker's SIGINT handler: one KeyboardInterrupt per job, nothing while idle.

  Ctrl-C at a terminal reaches the workers directly, and the parent passes it on as well (for a
  SIGINT sent to the parent alone): the second one must not interrupt the job's cleanup.
  """
  global _job_running
  if _job_running:
    _job_running = False
    raise KeyboardInterrupt


def _init_worker() -> None:
  signal.signal(signal.SIGINT, _on_sigint)


def _call(fn: Callable[[Any], Any], job: Any) -> Any:
  global _job_running
  _job_running = True
  try:
    return fn(job)
  finally:
    _job_running = False


def run(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int,
        on_result: Callable[[Any, Any], None] | None = None, *,
        grace_s: float = GRACE_S) -> None:
  """Runs ``fn(job)`` for every job in ``workers`` spawned processes, in any order.

  Args:
    fn: A picklable function (module-level, or a ``functools.partial`` of one).
    jobs: Picklable jobs.
    workers: Number of worker processes.
    on_result: Called in this process as ``on_result(job, fn(job))`` as each job finishes.
    grace_s: After an interrupt or error, seconds the running jobs get to stop.

  Raises:
    KeyboardInterrupt: At Ctrl-C, once the running jobs have stopped; queued jobs never start.
    Exception: The first job's error, likewise.
  """
  pending = iter(jobs)
  pool = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn'), initializer=_init_worker)
  running: dict[concurrent.futures.Future, Any] = {}

  def submit_next() -> None:
    for job in pending:
      running[pool.submit(_call, fn, job)] = job
      return

  try:
    for _ in range(workers):
      submit_next()
    while running:
      done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        job = running.pop(future)
        result = future.result()
        if on_result is not None:
          on_result(job, result)
        submit_next()
  except BaseException:
    _stop(pool, running, grace_s)
    raise
  pool.shutdown()


def _stop(pool: concurrent.futures.ProcessPoolExecutor,
          running: dict[concurrent.futures.Future, Any], grace_s: float) -> None:
  """Interrupts the running jobs, waits up to ``grace_s`` for them, kills what is left."""
  started = time.monotonic()
  insisted = []
  previous = None
  if threading.current_thread() is threading.main_thread():
    def on_sigint(signum, frame):  # pylint: disable=unused-argument
      if time.monotonic() - started > _ECHO_S:
        insisted.append(True)
    previous = signal.signal(signal.SIGINT, on_sigint)
  try:
    for future in running:
      future.cancel()
    # The executor has no public handle on its processes.
    processes = list((getattr(pool, '_processes', None) or {}).values())
    for process in processes:
      _signal(process, signal.SIGINT)
    deadline = started + grace_s
    while not insisted and time.monotonic() < deadline:
      if all(future.done() for future in running):
        break
      concurrent.futures.wait(running, timeout=0.1)
    # Every worker is now idle (its results are in) or stuck: end them at once rather than
    # wait for their interpreters (with TensorFlow loaded) to wind down, seconds each.
    for process in processes:
      _signal(process, signal.SIGKILL)
    pool.shutdown(wait=True, cancel_futures=True)
  finally:
    if previous is not None:
      signal.signal(signal.SIGINT, previous)


def _signal(process: multiprocessing.Process, signum: int) -> None:
  try:
    if process.pid is not None and process.is_alive():
      os.kill(process.pid, signum)
  except (ProcessLookupError, ValueError):
    pass
