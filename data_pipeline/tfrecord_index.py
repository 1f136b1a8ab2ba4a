"""TFRecord framing: where each record of a local TFRecord file lies, and its CRCs.

A TFRecord file is a run of records, each a 12-byte header (the data's length as a little-endian
uint64, then a masked CRC32C of those 8 bytes), the data, and a masked CRC32C of the data.
:func:`scan` reads only the headers (of a local file a 12-byte read per record; of any file
through a ``read`` function, in chunks of any size: ``data_pipeline.record_files`` reads remote
files in large sequential chunks) and checks each length against its CRC, in pure Python;
:class:`Verifier` reads whole records and checks the data's CRC too (through TensorFlow's C++
record reader, or without TensorFlow through ``google-crc32c``); :func:`check_crc` checks the
CRC of a record already in memory. :class:`BadRecordError` is the error of every
record that cannot be read as the dataset metadata describes it, here and in the readers of
``data_pipeline.input`` (which the user catches it from).
"""

from __future__ import annotations

import os
import re
import struct
from typing import Callable, Sequence

import numpy as np


class BadRecordError(ValueError):
  """A record that cannot be read as the dataset metadata describes it; names file and record."""


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC32C; pure Python, so only for the 8-byte length headers."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return _mask(crc ^ 0xFFFFFFFF)


def _mask(crc: int) -> int:
  """TFRecord's masking of a CRC32C."""
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def scan(path: str, read: Callable[[int, int], bytes] | None = None, size: int | None = None,
         chunk: int = 12) -> tuple[np.ndarray, tuple[int, int, str] | None]:
  """(offset, length) of each record's data up to the first damage, and that damage.

  The damage is None or (index of the first record that cannot be read, its byte offset,
  what is wrong): a length header that fails its CRC (nothing after it can be framed) or a
  file that ends inside a record.

  Args:
    path: The file; read with ``os.pread`` unless ``read`` is given.
    read: ``read(offset, n)``: up to ``n`` bytes of the file from ``offset`` (fewer only at its
      end).
    size: The file's size in bytes; default ``os.path.getsize(path)``.
    chunk: Bytes asked for per read, from the header that the bytes in hand do not hold: 12
      reads each header alone (cheap from a local disk); a few MiB read a remote file in few
      requests, headers of small records many to a read, those of big records one per read.
  """
  if read is None:
    fd = os.open(path, os.O_RDONLY)
    try:
      return scan(path, lambda offset, n: os.pread(fd, n, offset),
                  os.fstat(fd).st_size if size is None else size, chunk)
    finally:
      os.close(fd)
  if size is None:
    size = os.path.getsize(path)
  records = []
  damage = None
  buffer, buffer_pos = b'', 0  # Bytes of the file from buffer_pos on, as last read.
  pos = 0
  while pos < size:
    at = pos - buffer_pos
    if at + 12 > len(buffer):
      buffer, buffer_pos, at = read(pos, max(12, min(chunk, size - pos))), pos, 0
    header = buffer[at:at + 12]
    if len(header) < 12:
      damage = (len(records), pos, f'truncated TFRecord file: it ends {size - pos} bytes into '
                f'the 12-byte header at byte {pos}')
      break
    length, crc = struct.unpack('<QI', header)
    if masked_crc32c(header[:8]) != crc:
      damage = (len(records), pos, f'corrupt TFRecord header at byte {pos} (bad length CRC)')
      break
    end = pos + 12 + length + 4
    if end > size:
      damage = (len(records), pos, f'truncated TFRecord file: the record at byte {pos} ends at '
                f'byte {end}, the file has {size}')
      break
    records.append((pos + 12, length))
    pos = end
  return np.asarray(records, np.int64).reshape(-1, 2), damage


# A dataset folder's index of its TFRecord files (written by data_pipeline.writer): JSON,
# {RECORD_LENGTHS: {file name: [length of each record's data, in file order]}}. With it, the
# readers need not scan a file to find its records (:func:`from_lengths`).
INDEX_FILE = 'record_lengths.json'
RECORD_LENGTHS = 'record_lengths'


def from_lengths(lengths: Sequence[int], size: int) -> np.ndarray | None:
  """(offset, length) of each record of a file whose records have ``lengths``, as
  :func:`scan` gives them, or None if they do not add up to the file's ``size`` bytes."""
  lengths = np.asarray(lengths, np.int64).reshape(-1)
  ends = np.cumsum(lengths + 16)
  if (lengths < 0).any() or (int(ends[-1]) if len(ends) else 0) != size:
    return None
  return np.stack([ends - lengths - 4, lengths], axis=1)


def check_header(header: bytes, length: int, where: str) -> None:
  """Raises a BadRecordError (starting with ``where``) unless ``header``, the 12 bytes before a
  record's data, frames a record of ``length`` bytes with a good CRC."""
  if len(header) < 12:
    raise BadRecordError(f'{where}: the file ends inside the record\'s header; it changed since '
                         'it was indexed')
  stored, crc = struct.unpack('<QI', header)
  if masked_crc32c(header[:8]) != crc:
    raise BadRecordError(f'{where}: corrupt TFRecord header (bad length CRC)')
  if stored != length:
    raise BadRecordError(f'{where}: its TFRecord header says {stored} bytes, the index '
                         f'{length}; the file changed since it was indexed')


def lost_records(index: int, expected: int | None) -> str:
  if expected is None:
    return ''
  text = f'; the dataset metadata says the file holds {expected} records'
  return text + (f', so records {index}..{expected - 1} cannot be read' if index < expected else '')


def scan_tfrecord(path: str, expected: int | None = None) -> np.ndarray:
  """(offset, length) of every record's data in a local TFRecord file, as an (n, 2) int64 array.

  Reads only the 12-byte headers and checks each length against its CRC, so a file that is not
  a TFRecord file, or is truncated, fails here (BadRecordError, a ValueError) with the index
  and byte offset of the first record it cannot frame; ``expected``, the number of records the
  dataset metadata gives the file, adds which records are lost.
  """
  records, damage = scan(path)
  if damage is not None:
    index, pos, what = damage
    raise BadRecordError(f'{path}: record {index} (byte {pos}): {what}'
                         f'{lost_records(index, expected)}')
  return records


class Verifier:
  """Reads whole records and checks their payload CRC.

  CRC32C of MBs per record is out of reach of Python. With TensorFlow installed, its C++ reader
  reads and checks (and releases the GIL meanwhile). That reader reads 16 MiB ahead into a
  buffer it keeps while open: one per (thread, file) would hold threads x files x 16 MiB, and
  in a shuffled epoch the read-ahead is wasted anyway. So each read opens its own reader
  (~5 us) and closes it: thread-safe, and one buffer per reading thread at most. Without
  TensorFlow, the record is read with ``os.pread`` (which releases the GIL) and its CRC computed
  by ``google-crc32c`` (hardware CRC32C, ~0.3 ms for a 448 px tile).
  """

  def __init__(self, paths: Sequence[str]):
    self._paths = paths
    self._crc32c = None  # google_crc32c.value when TensorFlow is not installed.
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.python.lib.io import tf_record  # pylint: disable=g-import-not-at-top
    except ImportError:
      try:
        import google_crc32c  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError('checking record CRCs (config.dataset.verify_checksums) needs '
                          'google-crc32c (a dependency of mae_jax: pip install google-crc32c) '
                          'or TensorFlow') from e
      self._crc32c = google_crc32c.value
      return
    self._open = tf_record.tf_record_random_reader
    self._errors = (tf.errors.OpError, IndexError)
    self._data_loss = tf.errors.DataLossError

  def read(self, file_index: int, start: int, length: int, where: str) -> bytes:
    """The data of the record at byte ``start`` (after its header) of file ``file_index``,
    ``length`` bytes, once its CRC has been checked; ``where`` starts every error message."""
    if self._crc32c is not None:
      return self._read_checked(file_index, start, length, where)
    try:
      reader = self._open(self._paths[file_index])
      try:
        data, _ = reader.read(start - 12)  # The offset of the record's header.
      finally:
        reader.close()
    except self._errors as e:
      what = ('corrupt record: its bytes do not match their CRC'
              if isinstance(e, self._data_loss) else 'cannot be read')
      raise BadRecordError(f'{where}: {what} (TensorFlow: {tf_message(e)})') from e
    if len(data) != length:
      raise BadRecordError(f'{where}: {len(data)} bytes read, the header scan said {length}; '
                           'the file changed while being read')
    return data

  def _read_checked(self, file_index: int, start: int, length: int, where: str) -> bytes:
    """:meth:`read` without TensorFlow."""
    try:
      fd = os.open(self._paths[file_index], os.O_RDONLY)
      try:
        data = os.pread(fd, length, start)
        footer = os.pread(fd, 4, start + length)
      finally:
        os.close(fd)
    except OSError as e:
      raise BadRecordError(f'{where}: cannot be read ({e})') from e
    if len(data) != length or len(footer) != 4:
      raise BadRecordError(f'{where}: the file ends inside the record; it changed since its '
                           'headers were scanned')
    check_crc(data, footer, where)
    return data


def check_crc(data, footer: bytes, where: str) -> None:
  """Raises a BadRecordError (its message starting with ``where``) unless ``footer``, the 4
  bytes after a record's data, is the masked CRC32C of ``data`` (any bytes-like object)."""
  import google_crc32c  # pylint: disable=g-import-not-at-top
  # As a numpy array: google_crc32c takes that, but no memoryview (a slice of a larger read).
  computed = _mask(google_crc32c.value(np.frombuffer(data, np.uint8)))
  stored = struct.unpack('<I', footer)[0]
  if stored != computed:
    raise BadRecordError(f'{where}: corrupt record: its bytes do not match their CRC '
                         f'(masked CRC32C stored {stored:#010x}, computed {computed:#010x})')


def tf_message(error: BaseException) -> str:
  """A TensorFlow error's own words, without the op and node decorations."""
  if isinstance(error, UnicodeDecodeError):  # TensorFlow's message quoted undecodable bytes.
    return 'an error whose message (quoting the record) is not text'
  text = getattr(error, 'message', None) or str(error)
  text = re.sub(r'\{\{[^}]*\}\}\s*', '', text)
  text = re.sub(r'\s*\[Op:.*', '', text, flags=re.S).strip()
  text = text.splitlines()[0].strip() if text else ''
  return f'{type(error).__name__}: {text}'
