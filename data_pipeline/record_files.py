"""Byte ranges of a dataset's TFRecord files, on a local disk or at a URL: the readers' only I/O.

``data_pipeline.input.HostDataset`` reads records in one order on any filesystem (one index of
record locations, one shuffle of them); only where their bytes come from differs:

* :class:`LocalFiles` (reader ``'local'``): ``os.pread`` on file descriptors. Records are parsed
  in place: ``example_codec`` reads only the requested features' bytes, the tensors straight
  into the batch arrays.
* :class:`UrlFiles` (reader ``'url'``, the default for URLs): ``tf.io.gfile``, so any filesystem
  TensorFlow knows (``gs://``, and local paths, which is how the tests and bench/bench_input.py
  run this path on local files). Records are parsed the same way, through one open file per
  run of records a batch reads together (see ``HostDataset``), and their tensors stream into
  the batch in :data:`URL_STREAM_CHUNK` pieces. On cloud storage a record costs one request of
  TensorFlow's read buffer. ``tf.io.gfile`` releases the GIL while it waits, so many requests
  are in flight at once (:data:`URL_READ_THREADS`). It copies more than ``os.pread`` (into its
  buffer, a string, a Python bytes object, then the batch; the bytes object is made while
  holding the GIL): on page-cached local files it costs about 1.8 times the CPU of the local
  reader per tile, and reads them on one thread per core (:func:`read_threads`; bench/README.md).

:func:`scan` lists the records of a file. A folder written by ``data_pipeline.writer`` lists
them in its index (``tfrecord_index.INDEX_FILE``, :func:`indexed`): one small read, which
matters on cloud storage; the readers then check each record's header as they read it. Other
files are scanned (``tfrecord_index.scan``): locally a 12-byte read per header, as cheap as it
gets from a local disk; remotely in :data:`URL_SCAN_CHUNK` sequential chunks, which reads files
of big records whole. Results are kept per process, keyed by (path, size, modification time):
datasets opened again over the same files (data shards, a study's label fractions, evaluation
passes) do not read them again.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from typing import Iterator, Sequence

from absl import logging
import numpy as np

from data_pipeline import tfrecord_index

_CORES = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
# Reader threads for URLs: a remote read mostly waits for the network (without the GIL), so
# more requests in flight than cores keep a host's bandwidth busy. Local paths read through
# tf.io.gfile (the URL code path, as the tests and bench/bench_input.py run it) hardly wait:
# each piece's bytes object is made while holding the GIL, so threads beyond one per core only
# queue for it and evict each other's pieces from the CPU's cache (page-cached, 2 cores: 2
# threads read ~1.2x the tiles/s of 4 and ~1.2x the tiles per CPU-second, cold ~0.85x;
# bench/README.md).
URL_READ_THREADS = min(64, max(16, 4 * _CORES))
# Bytes per read of a remote header scan: large enough that a request's latency weighs little
# against its transfer, small enough that a file of big records is not read whole just for its
# headers (a record larger than this costs one read of this size).
URL_SCAN_CHUNK = 16 << 20
# Bytes per read when a record's tensor streams from a URL into the batch: small enough that
# the copies TensorFlow makes on the way stay in the CPU's cache, large enough that the Python
# call per piece weighs little; 512 KiB is what tf.io.gfile buffers, so each read refills its
# buffer once.
URL_STREAM_CHUNK = 512 << 10
# TensorFlow's GCS filesystem buffers each open file: a read that misses the buffer refills it
# with GCS_READ_CACHE_BLOCK_SIZE_MB (default 64 MiB) from there, so every record read at a random
# place would download 64 MiB. 8 MiB: a 448 px tile (4.8 MB) costs one request of 8 MiB, a
# scan chunk two. TensorFlow reads the variable when it is imported: set before that (this
# module is imported before TensorFlow in the trainers); a value already set wins.
_GCS_BLOCK_SIZE_MB = '8'
_TF_BEFORE_US = 'tensorflow' in sys.modules and 'GCS_READ_CACHE_BLOCK_SIZE_MB' not in os.environ
os.environ.setdefault('GCS_READ_CACHE_BLOCK_SIZE_MB', _GCS_BLOCK_SIZE_MB)
_warned = []

_scans: dict[tuple[str, int, int], tuple[np.ndarray, tuple[int, int, str] | None]] = {}
_indexes: dict[str, dict[str, list[int]]] = {}  # _folder_index's, by folder.
_scans_lock = threading.Lock()


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def _tf_error(error: Exception) -> bool:
  """Whether ``error`` is a tf.errors.OpError, without importing TensorFlow where it is not."""
  return any(c.__name__ == 'OpError' for c in type(error).__mro__)


def _check_gcs_block_size(paths: Sequence[str]) -> None:
  """Warns once if TensorFlow started before this module could set its GCS block size."""
  if _TF_BEFORE_US and not _warned and any(p.startswith('gs://') for p in paths):
    _warned.append(True)
    logging.warning(
        'TensorFlow was imported before data_pipeline.record_files, so its GCS reads use '
        '64 MiB blocks: each record read may download 64 MiB. Set '
        'GCS_READ_CACHE_BLOCK_SIZE_MB=%s in the environment (or import data_pipeline.input '
        'first)', _GCS_BLOCK_SIZE_MB)


def read_threads(paths: Sequence[str], remote: bool, local_threads: int) -> int:
  """Threads to read ``paths`` with: ``local_threads`` for the local reader; for the URL reader
  (``remote``) URL_READ_THREADS on a remote filesystem (a URL), on local paths one per core, at
  most ``local_threads``."""
  if not remote:
    return local_threads
  if any('://' in p for p in paths):
    return URL_READ_THREADS
  return min(local_threads, _CORES)


def stat(path: str, remote: bool) -> tuple[int, int]:
  """(size in bytes, modification time in ns) of a file."""
  if remote:
    try:
      info = _tf().io.gfile.stat(path)
    except Exception as e:  # pylint: disable=broad-except
      if _tf_error(e):
        raise OSError(f'{path}: cannot stat the file '
                      f'({tfrecord_index.tf_message(e)})') from e
      raise
    return int(info.length), int(info.mtime_nsec)
  info = os.stat(path)
  return info.st_size, info.st_mtime_ns


def _read_whole(path: str, remote: bool) -> bytes | None:
  """The bytes of a small file, or None if there is no such file."""
  if not remote:
    try:
      with open(path, 'rb') as f:
        return f.read()
    except FileNotFoundError:
      return None
  tf = _tf()
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      return f.read()
  except tf.errors.NotFoundError:
    return None


def _folder_index(folder: str, remote: bool) -> dict[str, list[int]]:
  """{file name: record lengths} of a folder's ``tfrecord_index.INDEX_FILE`` ({} if it has
  none), read once per process."""
  with _scans_lock:
    if folder in _indexes:
      return _indexes[folder]
  path = os.path.join(folder, tfrecord_index.INDEX_FILE)
  data = _read_whole(path, remote)
  index = {}
  if data is not None:
    try:
      index = json.loads(data)[tfrecord_index.RECORD_LENGTHS]
      if not isinstance(index, dict):
        raise TypeError(type(index).__name__)
    except (ValueError, KeyError, TypeError) as e:
      logging.warning('%s is not an index of record lengths (%s); scanning the files instead',
                      path, e)
      index = {}
  with _scans_lock:
    _indexes[folder] = index
  return index


def indexed(path: str, size: int, remote: bool) -> np.ndarray | None:
  """(offset, length) of the file's records from its folder's index
  (``tfrecord_index.INDEX_FILE``), or None where the index does not list it or does not fit
  the file's ``size`` (then the file is scanned; a misfit is logged)."""
  folder, name = os.path.split(path)
  lengths = _folder_index(folder, remote).get(name)
  if lengths is None:
    return None
  records = tfrecord_index.from_lengths(lengths, size)
  if records is None:
    logging.warning('%s: the %d records %s lists do not add up to its %d bytes (truncated or '
                    'changed since it was written); scanning the file instead', path,
                    len(lengths), tfrecord_index.INDEX_FILE, size)
  return records


def scan_headers(path: str, size: int, remote: bool
                 ) -> tuple[np.ndarray, tuple[int, int, str] | None]:
  """``tfrecord_index.scan`` of a file of ``size`` bytes: locally a 12-byte read per header,
  through ``tf.io.gfile`` in :data:`URL_SCAN_CHUNK` sequential chunks."""
  if not remote:
    return tfrecord_index.scan(path, size=size)
  files = UrlFiles([path])
  try:
    return tfrecord_index.scan(path, lambda offset, n: files.read(0, offset, n), size,
                               URL_SCAN_CHUNK)
  finally:
    files.close()


def scan(path: str, remote: bool) -> tuple[np.ndarray, tuple[int, int, str] | None]:
  """Where the records of a local file (``remote=False``) or of any file through
  ``tf.io.gfile`` lie: from its folder's index (:func:`indexed`), else
  ``tfrecord_index.scan``; from this process's memory when the file has not changed since."""
  size, mtime = stat(path, remote)
  key = (path, size, mtime)
  with _scans_lock:
    if key in _scans:
      return _scans[key]
  records = indexed(path, size, remote)
  result = (records, None) if records is not None else scan_headers(path, size, remote)
  with _scans_lock:
    _scans[key] = result
  return result


def forget_scans() -> None:
  """Empties this process's scan and index caches (tests, or files rewritten in place within a
  timestamp's resolution)."""
  with _scans_lock:
    _scans.clear()
    _indexes.clear()


class _FdSource:
  """Reads one file of a :class:`LocalFiles` with ``os.pread`` (thread-safe, releases the GIL),
  opening it at the first read."""

  __slots__ = ('files', 'index')

  def __init__(self, files: LocalFiles, index: int):
    self.files, self.index = files, index

  def pread(self, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes from ``offset`` (fewer only at the file's end)."""
    return os.pread(self.files.fd(self.index), n, offset)

  def readinto(self, out: memoryview, offset: int) -> int:
    """Fills ``out`` from ``offset``; returns the bytes read (fewer only at the file's end)."""
    fd = self.files.fd(self.index)
    done = 0
    while done < len(out):
      n = os.preadv(fd, [out[done:]], offset + done)
      if n <= 0:
        break
      done += n
    return done


class LocalFiles:
  """Files of a local filesystem, read with ``os.pread`` (thread-safe); records parsed in place.

  Each file is opened at its first read (a stream served by the host cache opens none) and
  stays open until :meth:`close`.
  """
  remote = False

  def __init__(self, paths: Sequence[str]):
    self.paths = paths
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()

  def fd(self, index: int) -> int:
    fd = self._fds.get(index)
    if fd is None:
      with self._lock:
        fd = self._fds.get(index)
        if fd is None:
          fd = self._fds[index] = os.open(self.paths[index], os.O_RDONLY)
    return fd

  @contextlib.contextmanager
  def open(self, index: int) -> Iterator[_FdSource]:
    """A source reading file ``index`` (any thread may read the same file)."""
    yield _FdSource(self, index)

  def read(self, index: int, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes of file ``index`` from ``offset`` (fewer only at its end)."""
    return os.pread(self.fd(index), n, offset)

  def close(self) -> None:
    with self._lock:
      fds, self._fds = self._fds, {}
    for fd in fds.values():
      os.close(fd)


class _GFileSource:
  """Reads one file through an open ``tf.io.gfile.GFile``, on one thread.

  Big spans are read in :data:`URL_STREAM_CHUNK` pieces, each copied into its place as it
  arrives: every copy TensorFlow makes on the way (its read buffer, a string, a Python bytes
  object) is of a piece that stays in the CPU's cache, and only the last one, into the batch,
  goes to memory. Reads on cloud storage go through TensorFlow's buffer of the open file
  (``GCS_READ_CACHE_BLOCK_SIZE_MB``): a record costs one request, and records of one run read
  through one handle share requests. Errors of TensorFlow's filesystem (which already retries
  transient failures of cloud storage) become OSErrors naming the file and the range.
  """

  __slots__ = ('path', 'file')

  def __init__(self, path: str):
    self.path = path
    self.file = _tf().io.gfile.GFile(path, 'rb')

  def _error(self, error: Exception, offset: int, n: int) -> Exception:
    if _tf_error(error):
      return OSError(f'{self.path}: cannot read bytes {offset}..{offset + n} '
                     f'({tfrecord_index.tf_message(error)})')
    return error

  def pread(self, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes from ``offset`` (fewer only at the file's end)."""
    try:
      self.file.seek(offset)
      return self.file.read(n)
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(e, offset, n) from e

  def readinto(self, out: memoryview, offset: int) -> int:
    """Fills ``out`` from ``offset``; returns the bytes read (fewer only at the file's end)."""
    target = np.asarray(out)
    done = 0
    try:
      self.file.seek(offset)
      while done < len(target):
        piece = self.file.read(min(URL_STREAM_CHUNK, len(target) - done))
        if not piece:
          break
        # numpy copies without the GIL, so other threads parse and copy meanwhile.
        np.copyto(target[done:done + len(piece)], np.frombuffer(piece, np.uint8))
        done += len(piece)
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(e, offset + done, len(target) - done) from e
    return done

  def close(self) -> None:
    self.file.close()


class UrlFiles:
  """Files of any filesystem TensorFlow knows, read through ``tf.io.gfile``.

  Each :meth:`open` opens its own ``GFile`` (opening costs no request on cloud storage; a
  ``GFile`` has one position, so threads cannot share one): a stream opens one per run of
  records it reads together, and closes it after.
  """
  remote = True

  def __init__(self, paths: Sequence[str]):
    self.paths = paths
    _check_gcs_block_size(paths)

  @contextlib.contextmanager
  def open(self, index: int) -> Iterator[_GFileSource]:
    """A source reading file ``index``, for one thread, closed on leaving the block."""
    try:
      source = _GFileSource(self.paths[index])
    except Exception as e:  # pylint: disable=broad-except
      if _tf_error(e):
        raise OSError(f'{self.paths[index]}: cannot open the file '
                      f'({tfrecord_index.tf_message(e)})') from e
      raise
    try:
      yield source
    finally:
      source.close()

  def read(self, index: int, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes of file ``index`` from ``offset`` (fewer only at its end)."""
    with self.open(index) as source:
      return source.pread(n, offset)

  def close(self) -> None:
    pass


def open_files(paths: Sequence[str], remote: bool) -> LocalFiles | UrlFiles:
  """The files ``paths`` for reading (each opened when first read); close() when done."""
  return UrlFiles(paths) if remote else LocalFiles(paths)
