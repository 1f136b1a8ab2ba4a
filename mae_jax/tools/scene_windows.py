"""The window grid and blending weights of whole-scene prediction (pure NumPy, no I/O).

A scene of ``height x width`` pixels is covered by square windows of the model's tile size
``size``, ``stride = size - overlap`` apart: origins 0, stride, 2 * stride, ... along each axis,
the last one moved back to end exactly at the scene edge (so it may overlap its neighbour by
more than ``overlap``). A scene smaller than one window in a dimension gets one window there,
which hangs over the edge (the reader pads it with no-data).

Each window's output is weighted by a separable taper (:func:`taper`): 1 everywhere except a
linear ramp from :data:`FLOOR` up to 1 across the ``overlap`` pixels of each edge that borders a
neighbouring window. With regular spacing two neighbours overlap by exactly ``overlap`` pixels,
so the core of a window (further than ``overlap`` from every edge it shares) is covered by that
window alone and the blended map equals the window's own prediction there; inside the ramps the
two weights sum to a constant, so the blend moves linearly from one window to the other. Next to
the moved-back last window the overlap is wider than the ramps: in its middle both windows weigh
1 and their outputs are averaged.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

# Weight of the outermost pixel of a ramp: positive, so that the sum of weights cannot be 0 where
# a window covers a valid pixel, and small, so the pixel is nearly all its neighbour's.
FLOOR = 0.01


@dataclasses.dataclass(frozen=True)
class Window:
  """One window: its origin (may hang over the scene's bottom/right edge) and grid position."""
  row: int
  col: int
  index_row: int  # Position in the grid (0-based), for the taper.
  index_col: int


def check_overlap(size: int, overlap: int) -> None:
  """Raises ValueError unless 0 <= overlap < size / 2 (ramps of both edges must not meet)."""
  if overlap < 0 or 2 * overlap >= size:
    raise ValueError(f'overlap {overlap} px must be >= 0 and < half the window size '
                     f'({size} px), i.e. at most {(size - 1) // 2} px')


def default_overlap(size: int) -> int:
  return size // 8


def origins(length: int, size: int, stride: int) -> list[int]:
  """Window origins along one axis: 0, stride, ... and the last clamped to end at ``length``."""
  if length <= 0 or size <= 0 or stride <= 0:
    raise ValueError(f'length {length}, size {size} and stride {stride} must be positive')
  if length <= size:
    return [0]
  out = list(range(0, length - size, stride))
  out.append(length - size)
  return out


def grid(height: int, width: int, size: int, overlap: int) -> Iterator[Window]:
  """Every window of a scene, row-major (window rows top to bottom), generated as needed."""
  check_overlap(size, overlap)
  stride = size - overlap
  rows, cols = origins(height, size, stride), origins(width, size, stride)
  for i, r in enumerate(rows):
    for j, c in enumerate(cols):
      yield Window(r, c, i, j)


def grid_shape(height: int, width: int, size: int, overlap: int) -> tuple[int, int]:
  """(window rows, window columns) of :func:`grid`."""
  stride = size - overlap
  return len(origins(height, size, stride)), len(origins(width, size, stride))


def ramp(overlap: int) -> np.ndarray:
  """Weights of the ``overlap`` pixels of a ramp, outermost first: FLOOR ... < 1 (float32)."""
  return (FLOOR + (1.0 - FLOOR) * np.arange(overlap) / max(overlap, 1)).astype(np.float32)


def taper_1d(size: int, overlap: int, before: bool, after: bool) -> np.ndarray:
  """One axis of the taper: ramps at the start (``before``) / end (``after``) when a
  neighbouring window lies on that side."""
  weights = np.ones(size, np.float32)
  if overlap:
    if before:
      weights[:overlap] = ramp(overlap)
    if after:
      weights[size - overlap:] = ramp(overlap)[::-1]
  return weights


def taper(size: int, overlap: int, window: Window, shape: tuple[int, int]) -> np.ndarray:
  """The (size, size) float32 weight of ``window`` in a grid of ``shape`` = (rows, cols)."""
  rows, cols = shape
  along_rows = taper_1d(size, overlap, window.index_row > 0, window.index_row < rows - 1)
  along_cols = taper_1d(size, overlap, window.index_col > 0, window.index_col < cols - 1)
  return along_rows[:, None] * along_cols[None, :]


def core(size: int, overlap: int, window: Window, shape: tuple[int, int]) -> tuple[slice, slice]:
  """Rows and columns (within the window) where its taper is 1: more than ``overlap`` pixels
  from every edge that borders a neighbour."""
  rows, cols = shape
  top = overlap if window.index_row > 0 else 0
  bottom = size - overlap if window.index_row < rows - 1 else size
  left = overlap if window.index_col > 0 else 0
  right = size - overlap if window.index_col < cols - 1 else size
  return slice(top, bottom), slice(left, right)


def blocks(height: int, width: int, block: int):
  """(row, col, rows, cols) of the ``block``-sized pieces of a raster, row-major."""
  for row in range(0, height, block):
    for col in range(0, width, block):
      yield row, col, min(block, height - row), min(block, width - col)
