"""A host's records kept in memory after their first read (``config.dataset.host_cache``).

A ``HostDataset`` whose records fit keeps each record's bytes (the serialised example, all its
features) the first time it reads it, in one buffer per dataset, and parses every later read
from there: epochs after the first need no storage bandwidth. The order and the batches stay
exactly those of an uncached read (the same records, parsed the same way).

Settings (:func:`parse`):

* ``'off'``: never.
* ``'auto'``: for files read through a URL only (local files have the page cache, which does the
  same without a second copy), when the records fit in half of the memory that was available
  when this process first decided.
* ``'on'``: for any files, when they fit in 0.8 of that memory.
* a number of bytes (an int, or text such as ``'64G'``, ``'1.5T'``, ``'500M'``): for any files,
  within that many bytes for all of this process's datasets.

Budgets are per process and shared by its datasets (the data shards of a training stream, its
validation split), each reserving its size when it decides; a dataset's reservation ends with
it. Several training processes on one host each take their own budget: give them a number.
"""

from __future__ import annotations

import os
import re
import threading

import numpy as np

SETTINGS = ('off', 'auto', 'on')
_FRACTION = {'auto': 0.5, 'on': 0.8}  # Of the memory available at the first decision.
_UNITS = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}

_lock = threading.Lock()
_available: int | None = None  # Memory available when this process first decided.
_reserved = 0  # Bytes this process's live caches hold or will hold.


def parse(setting: str | int) -> str | int:
  """``setting`` as one of :data:`SETTINGS` or a number of bytes; a ValueError if neither."""
  if isinstance(setting, (int, np.integer)) and not isinstance(setting, bool):
    if setting < 0:
      raise ValueError(f'host_cache={setting!r}: a byte budget must be >= 0')
    return int(setting)
  if isinstance(setting, str):
    text = setting.strip()
    if text.lower() in SETTINGS:
      return text.lower()
    match = re.fullmatch(r'(\d+(?:\.\d*)?(?:[eE]\d+)?)\s*([KMGT]?)(?:i?B)?', text, re.I)
    if match:
      return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
  raise ValueError(f'host_cache={setting!r}: expected one of {SETTINGS} or a number of bytes '
                   "(e.g. 68719476736 or '64G')")


def _cgroup_room() -> int | None:
  """Bytes this process's cgroup (v2) may still take, if it has a limit."""
  try:
    with open('/sys/fs/cgroup/memory.max') as f:
      limit = f.read().strip()
    with open('/sys/fs/cgroup/memory.current') as f:
      current = int(f.read().strip())
  except (OSError, ValueError):
    return None
  return None if limit == 'max' else max(0, int(limit) - current)


def available_bytes() -> int:
  """Memory this process could still take: the kernel's MemAvailable (or free pages), within
  its cgroup's limit."""
  available = None
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          available = int(line.split()[1]) * 1024
          break
  except OSError:
    pass
  if available is None:
    available = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  room = _cgroup_room()
  return available if room is None else min(available, room)


def gb(nbytes: int) -> str:
  """A size for people: '820.5 MB', '1.23 GB', '412 GB'."""
  if nbytes < 1e9:
    return f'{nbytes / 1e6:.1f} MB'
  return f'{nbytes / 1e9:.2f} GB' if nbytes < 1e11 else f'{nbytes / 1e9:.0f} GB'


def reserve(setting: str | int, nbytes: int, tiles: int, remote: bool) -> tuple[bool, str]:
  """Whether a dataset of ``tiles`` records taking ``nbytes`` is cached, and a line saying so;
  if it is, its bytes are reserved until :func:`release`."""
  global _available, _reserved
  setting = parse(setting)
  if setting == 'off':
    return False, 'host cache: off'
  if setting == 'auto' and not remote:
    return False, ("host cache: not used for local files (host_cache='auto'; the page cache "
                   "keeps them; 'on' would cache them too)")
  with _lock:
    if _available is None:
      _available = available_bytes()
    limit = setting if isinstance(setting, int) else int(_FRACTION[setting] * _available)
    room = max(0, limit - _reserved)
    of = (f'{gb(room)} left of a {gb(limit)} budget' if isinstance(setting, int) else
          f'{gb(room)} available')
    if nbytes > room:
      return False, (f'host cache: does not fit: {tiles} tiles take {gb(nbytes)}, {of} '
                     f'(host_cache={setting!r}); every epoch reads them from storage')
    _reserved += nbytes
  return True, f'host cache: {gb(nbytes)} of {of} for {tiles} tiles'


def release(nbytes: int) -> None:
  """Ends a reservation of :func:`reserve`."""
  global _reserved
  with _lock:
    _reserved -= nbytes


class RecordCache:
  """The bytes of a dataset's records, by row, each kept once it has been read.

  One thread fills a record (:meth:`claim`, write into the returned array, :meth:`done`); others
  meanwhile read it from storage themselves. :meth:`get` gives only filled records.
  """

  def __init__(self, lengths: np.ndarray):
    """``lengths``: bytes of each row's record (0 for rows never read, e.g. lost records)."""
    self._starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    self.nbytes = int(self._starts[-1])
    # Untouched pages of np.empty take no memory: it grows as records are read.
    self._buffer = np.empty(self.nbytes, np.uint8)
    self._filled = np.zeros(len(lengths), np.bool_)
    self._claimed: set[int] = set()
    self._lock = threading.Lock()

  def _span(self, row: int) -> np.ndarray:
    return self._buffer[self._starts[row]:self._starts[row + 1]]

  def get(self, row: int) -> memoryview | None:
    """The record of ``row`` if it has been kept, else None."""
    return memoryview(self._span(row)) if self._filled[row] else None

  def claim(self, row: int) -> np.ndarray | None:
    """Where to write the record of ``row``, for the one caller that gets it (None: kept
    already, or another thread is writing it)."""
    with self._lock:
      if self._filled[row] or row in self._claimed:
        return None
      self._claimed.add(row)
    return self._span(row)

  def done(self, row: int, kept: bool) -> None:
    """Ends a :meth:`claim`: ``kept`` if the record was written whole (and checked)."""
    with self._lock:
      self._claimed.discard(row)
      if kept:
        self._filled[row] = True

  @property
  def filled_bytes(self) -> int:
    lengths = np.diff(self._starts)
    return int(lengths[self._filled].sum())
