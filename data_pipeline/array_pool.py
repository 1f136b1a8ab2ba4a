"""Batch arrays for the local reader of ``data_pipeline.input``, reused once released.

:func:`empty_batch` allocates the arrays of one batch; big raw tensors (the images) come from an
:class:`ArrayPool`, which hands an array out again once nothing outside the pool holds it.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

from data_pipeline import example_codec


def _refcount_in_list(arrays: list[np.ndarray], index: int) -> int:
  return sys.getrefcount(arrays[index])


# What _refcount_in_list gives for an array that only its list holds (interpreter-dependent).
_ONLY_THE_LIST = _refcount_in_list([np.empty(0)], 0)


class ArrayPool:
  """Big batch arrays, handed out again once nothing outside the pool holds them.

  Writing into fresh memory costs the kernel a page fault and a zeroed page per page touched;
  for 448 px batches that was a large share of the local reader's time. An array is reused only when
  the pool holds its sole reference: a numpy view, a memoryview or a jax array sharing its
  memory holds one, so a batch the consumer (or a device transfer) still uses is never
  overwritten, it just makes the pool allocate a new array. One pool per iterator, used from
  the iterator's thread only.
  """

  def __init__(self, capacity: int):
    self._capacity = capacity
    self._arrays: dict[tuple[Any, ...], list[np.ndarray]] = {}

  def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    arrays = self._arrays.setdefault((shape, dtype.str), [])
    for i in range(len(arrays)):
      if _refcount_in_list(arrays, i) == _ONLY_THE_LIST:
        return arrays[i]
    array = np.empty(shape, dtype)
    if len(arrays) >= self._capacity:
      arrays.pop(0)  # Held elsewhere for long (e.g. kept as a preview): let it go.
    arrays.append(array)
    return array


# Arrays smaller than this come from malloc's free lists anyway: no need to pool them.
_POOL_MIN_BYTES = 1 << 20


def empty_batch(codecs: Sequence[example_codec.Codec], batch: int,
                pool: ArrayPool | None = None) -> dict[str, np.ndarray]:
  out = {}
  for c in codecs:
    shape = (batch,) + c.shape
    if pool is not None and c.kind == example_codec.RAW and batch * c.nbytes >= _POOL_MIN_BYTES:
      out[c.name] = pool.empty(shape, c.dtype)
    else:
      out[c.name] = np.empty(shape, c.dtype)
  return out
