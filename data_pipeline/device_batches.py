"""Host batches onto the devices: global arrays, and a prefetcher that keeps copies in flight.

A 448 x 448 x 12 float16 tile is 4.8 MB, so a batch of 64 is 308 MB to copy to the devices each
step: at accelerator step rates that copy, and reading the batch, take as long as the step
itself unless they overlap it. :class:`DevicePrefetch` reads and copies the batches of the next
steps on a background thread while the devices run the current one.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import jax
import numpy as np


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """Assembles per-process batches into global arrays split along the batch axis."""
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local_batch.items()}


class DevicePrefetch:
  """The global batches of steps ``start_step .. stop_step - 1``, ``depth`` steps ahead.

  ``host_batch(step)`` gives this process's batch of ``step`` (as ``faults.Feed.next``); a
  background thread calls it in step order and starts each copy to the devices, holding at most
  ``depth`` batches that the loop has not taken yet. ``depth`` 0 reads and copies in the
  caller's thread, step by step. Either way the batches, and so training, are the same; an
  error raised for a step is raised again by :meth:`next` for that step.
  """

  def __init__(self, host_batch: Callable[[int], dict[str, np.ndarray]],
               sharding: jax.sharding.Sharding, *, start_step: int, stop_step: int,
               depth: int = 2):
    if depth < 0:
      raise ValueError(f'prefetch depth must be >= 0, got {depth}')
    self._host_batch = host_batch
    self._sharding = sharding
    self._depth = depth
    self._closed = threading.Event()
    self._thread = None
    if depth:
      self._queue: queue.Queue = queue.Queue(maxsize=depth)
      self._thread = threading.Thread(target=self._fill, args=(start_step, stop_step),
                                      name='device_prefetch', daemon=True)
      self._thread.start()

  def _fill(self, start_step: int, stop_step: int) -> None:
    for step in range(start_step, stop_step):
      try:
        item = (step, global_batch(self._host_batch(step), self._sharding), None)
      except BaseException as e:  # pylint: disable=broad-except
        item = (step, None, e)
      while not self._closed.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[2] is not None or self._closed.is_set():
        return

  def next(self, step: int) -> dict[str, Any]:
    """The global batch of ``step`` (steps must be taken in order)."""
    if not self._depth:
      return global_batch(self._host_batch(step), self._sharding)
    got, batch, error = self._queue.get()
    if got != step:
      raise RuntimeError(f'prefetched the batch of step {got} but step {step} asked for one')
    if error is not None:
      raise error
    return batch

  def close(self) -> None:
    """Stops the thread; batches read ahead are dropped (the next run reads them by step)."""
    self._closed.set()
    if self._thread is not None:
      self._thread.join()

  def __enter__(self) -> 'DevicePrefetch':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
