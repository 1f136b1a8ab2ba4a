"""Per-host input pipeline: TFDS split -> shuffled, batched numpy in a compact dtype.

Each process reads an even, disjoint share of the split (``tfds.even_splits`` over processes,
remainder dropped so every host has the same number of batches per epoch). The stream is a
deterministic function of (seed, epoch), and a run resumed at step ``s`` yields exactly the
batches an uninterrupted run would have seen from step ``s`` on, without decoding the records
before it.

Two readers give such a stream; ``HostDataset(reader=...)`` picks one, by default the first for
local folders and the second for URLs (``gs://...``):

* ``'local'``: the fast path, for files on a local filesystem. It scans the record headers of
  the share's TFRecord files once (a 12-byte read per record) and keeps each record's (file,
  offset, length). An epoch is then a permutation of record *locations* drawn from (seed,
  epoch): the whole epoch is shuffled (not a window) for no memory, and resuming costs no I/O.
  Reader threads walk each record's ``tf.train.Example`` wire format with small reads, parse
  only the requested features and ``pread`` raw tensor bytes (the float16 image) straight from
  the file, i.e. from the page cache, into the batch array: one copy, the one a plain ``read``
  of the file does too. Batch arrays the consumer has released are reused (see
  :class:`_ArrayPool`), which spares the kernel faulting in and zeroing fresh pages. TFRecord
  length headers are checked against their CRC; payload CRCs only with
  ``verify_checksums=True``, the first time the dataset reads each record, through
  TensorFlow's C++ record reader (CRC32C at GB/s is out of reach of Python): that first epoch
  reads slower, later ones as fast as without (costs in bench/README.md).
* ``'tf'``: ``tf.data``. Files in an order drawn from (seed, epoch), interleaved, raw serialised
  records shuffled in a window of ``shuffle_buffer`` records, batched, then one vectorised
  ``tf.io.parse_example`` per batch with a spec of only the requested features. It works on any
  filesystem TensorFlow knows, with several copies per tile and CRC checks of every record, and
  is several times slower than ``'local'`` (bench/README.md). Copy data to a local disk to
  train fast.

Both readers parse only the features asked for, so records carrying features this module does
not know (added by a newer writer) read fine. The two readers give different orders: resume a
run with the same kind of path it started on.

``HostDataset(records=...)`` restricts reading to a selection of the split's records (a label
fraction, some regions: see ``data_pipeline.subsets``), named by *global record index*: the
record's position in the whole split read in file order, as :func:`read_split_index` lists
them. Each process reads the selected records of its share; epochs are then per-host and may
differ in length across hosts, which is harmless since every host yields the batches it is
asked for. A selection smaller than a batch repeats within the batch (one epoch after another).
``HostDataset.eval_batches`` reads the share (or selection) once, in file order, padded to the
same number of fixed-shape batches on every host, with ``EXAMPLE_MASK`` marking the padding.

Bad data. Checked at construction: every file of the share exists (one folder listing). On
reading, each error (BadRecordError, a ValueError) names the file, the record's index in it,
its global record index and its byte offset: a header failing its CRC or a truncated file
(local reader: found by the header scan, with the records lost), a record whose features are
malformed or have another size than the metadata's (e.g. another band count), and with
``verify_checksums`` (tf.data: always) a payload failing its CRC. The tf.data reader's
TensorFlow errors name no file: the files are then read again one by one to find the record.
Without ``verify_checksums`` the local reader does NOT see damage inside a raw tensor's bytes
that leaves the protobuf structure intact. ``max_bad_records=N > 0`` (local reader) reads up
to N bad records, each counted once, as missing values (NaN floats and images, 0 raw integers,
-1 integers, b'' texts) flagged in ``batch[BAD_RECORD]``: records of a missing file, or after
damage in a truncated one, included, so the epoch layout and every good record's place and
content stay those of a clean read.

Images stay float16 dB (NaN = no-data) on the host; ``mae_jax.preprocess`` casts and normalises
them on the device. ``data_pipeline.device_batches`` turns per-host batches into global arrays.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import re
import struct
import sys
import threading
from typing import Any, Iterator, Sequence

from absl import logging
import jax
import numpy as np

from data_pipeline import schema
from data_pipeline import writer

_EPOCH_SEED_STRIDE = 1_000_003
# Reader threads of the local reader. Their work is mostly preads, which release the GIL: from
# the page cache a memory copy, from disk a wait, where more reads in flight keep the disk
# busier; bench/README.md has the measurements behind the count.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
_READ_THREADS = min(16, max(4, 2 * _CORES))
# Bytes read at once while walking a record's protobuf structure: every feature but the big
# tensors of a 448 px tile fits in the first read, the rest costs one more read per big tensor.
_CHUNK = 1 << 16
_READERS = ('auto', 'local', 'tf')
# The tf.data reader keeps a selection's raw records in memory after its first epoch when they
# are estimated to take at most this many bytes (see HostDataset._tf_cache_selection).
_TF_CACHE_BYTES = 4 << 30

# Key of the boolean array eval_batches adds to every batch: True for real examples, False for
# the padding that fills the last batches.
EXAMPLE_MASK = 'example_mask'
# Key of the boolean array every batch gets when HostDataset(max_bad_records=N > 0): True where
# a bad record's slot was filled with missing values (see _fill_missing).
BAD_RECORD = 'bad_record'


class BadRecordError(ValueError):
  """A record that cannot be read as the dataset metadata describes it; names file and record."""


def configure_tensorflow() -> None:
  """Keeps TensorFlow off the GPUs (it only reads files here) so JAX has all their memory."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')


# --- Features ----------------------------------------------------------------------------------

# How a feature is stored in a tf.train.Example and returned, from its TFDS FeatureConnector.
_RAW = 'raw'  # One bytes value holding a tensor's raw little-endian bytes (Encoding.BYTES).
_TEXT = 'text'  # One bytes value, returned as a bytes object (tfds.features.Text).
_FLOAT = 'float'  # A float_list of the tensor's values.
_INT = 'int'  # An int64_list of the tensor's values.
_LIST_FIELD = {_RAW: 1, _TEXT: 1, _FLOAT: 2, _INT: 3}  # tf.train.Feature's oneof field numbers.


@dataclasses.dataclass(frozen=True)
class _Codec:
  """Where one requested feature lives in a record and what array it becomes."""
  name: str
  kind: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize


def _codec(name: str, feature) -> _Codec:
  """The codec of a TFDS feature; only flat, statically shaped features are supported."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if isinstance(feature, tfds.features.ClassLabel):
    return _Codec(name, _INT, (), np.dtype(np.int64))
  if isinstance(feature, tfds.features.Text):
    return _Codec(name, _TEXT, (), np.dtype(object))
  if isinstance(feature, tfds.features.Tensor):
    shape, dtype = tuple(feature.shape), np.dtype(feature.np_dtype)
    encoding = getattr(feature, '_encoding', tfds.features.Encoding.NONE)
    if all(isinstance(d, int) for d in shape):
      if encoding == tfds.features.Encoding.BYTES and dtype != object:
        return _Codec(name, _RAW, shape, dtype)
      if encoding == tfds.features.Encoding.NONE:
        if dtype == object and shape == ():
          return _Codec(name, _TEXT, (), dtype)
        if np.issubdtype(dtype, np.floating):
          return _Codec(name, _FLOAT, shape, dtype)
        if (np.issubdtype(dtype, np.integer) or dtype == np.bool_) and dtype != np.uint64:
          return _Codec(name, _INT, shape, dtype)
  raise NotImplementedError(f'feature {name!r} ({feature!r}) cannot be read by '
                            'data_pipeline.input: only flat, statically shaped Tensor '
                            '(no or bytes encoding), ClassLabel and Text features are')


def _refcount_in_list(arrays: list[np.ndarray], index: int) -> int:
  return sys.getrefcount(arrays[index])


# What _refcount_in_list gives for an array that only its list holds (interpreter-dependent).
_ONLY_THE_LIST = _refcount_in_list([np.empty(0)], 0)


class _ArrayPool:
  """Big batch arrays, handed out again once nothing outside the pool holds them.

  Writing into fresh memory costs the kernel a page fault and a zeroed page per page touched;
  for 448 px batches that was a third of the local reader's time. An array is reused only when
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


def _empty_batch(codecs: Sequence[_Codec], batch: int,
                 pool: _ArrayPool | None = None) -> dict[str, np.ndarray]:
  out = {}
  for c in codecs:
    shape = (batch,) + c.shape
    if pool is not None and c.kind == _RAW and batch * c.nbytes >= _POOL_MIN_BYTES:
      out[c.name] = pool.empty(shape, c.dtype)
    else:
      out[c.name] = np.empty(shape, c.dtype)
  return out


# --- Local reader: TFRecord framing and tf.train.Example wire format ---------------------------


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
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _scan(path: str) -> tuple[np.ndarray, tuple[int, int, str] | None]:
  """(offset, length) of each record's data up to the first damage, and that damage.

  The damage is None or (index of the first record that cannot be read, its byte offset,
  what is wrong): a length header that fails its CRC (nothing after it can be framed) or a
  file that ends inside a record.
  """
  size = os.path.getsize(path)
  records = []
  damage = None
  fd = os.open(path, os.O_RDONLY)
  try:
    pos = 0
    while pos < size:
      header = os.pread(fd, 12, pos)
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
  finally:
    os.close(fd)
  return np.asarray(records, np.int64).reshape(-1, 2), damage


def _lost_records(index: int, expected: int | None) -> str:
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
  records, damage = _scan(path)
  if damage is not None:
    index, pos, what = damage
    raise BadRecordError(f'{path}: record {index} (byte {pos}): {what}'
                         f'{_lost_records(index, expected)}')
  return records


class _Record:
  """One serialised tf.train.Example inside an open file, read on demand in small chunks."""

  __slots__ = ('fd', 'start', 'length', 'where', '_chunk', '_chunk_pos')

  def __init__(self, fd: int | None, start: int, length: int, where: str,
               data: bytes | None = None):
    """``where`` starts every error message; ``data``, if given, is the whole record in memory
    (then ``fd`` is not read)."""
    self.fd, self.start, self.length, self.where = fd, start, length, where
    self._chunk, self._chunk_pos = (b'', 0) if data is None else (data, 0)

  def corrupt(self, what: str) -> BadRecordError:
    return BadRecordError(f'{self.where}: {what}')

  def _span(self, pos: int, n: int) -> int:
    """Makes bytes [pos, pos + n) of the record available in the chunk; returns their index."""
    if pos < 0 or n < 0 or pos + n > self.length:
      raise self.corrupt(f'malformed tf.train.Example: bytes {pos}..{pos + n} past its end '
                         f'({self.length} bytes)')
    i = pos - self._chunk_pos
    if i < 0 or i + n > len(self._chunk):
      self._chunk = os.pread(self.fd, min(max(n, _CHUNK), self.length - pos), self.start + pos)
      self._chunk_pos, i = pos, 0
      if len(self._chunk) < n:
        raise self.corrupt('the file ends inside the record')
    return i

  def read(self, pos: int, n: int) -> bytes:
    i = self._span(pos, n)
    return self._chunk[i:i + n]

  def readinto(self, pos: int, out: memoryview) -> None:
    """Copies bytes at ``pos`` into ``out``; big spans go file -> ``out`` in one pread."""
    n = len(out)
    i = pos - self._chunk_pos
    if 0 <= i and i + n <= len(self._chunk):
      out[:] = memoryview(self._chunk)[i:i + n]
      return
    if pos < 0 or pos + n > self.length:
      raise self.corrupt(f'malformed tf.train.Example: bytes {pos}..{pos + n} past its end')
    offset = self.start + pos
    while len(out):
      done = os.preadv(self.fd, [out], offset)
      if done <= 0:
        raise self.corrupt('the file ends inside the record')
      out, offset = out[done:], offset + done

  def varint(self, pos: int, end: int) -> tuple[int, int]:
    data = self.read(pos, min(10, end - pos))
    value = shift = 0
    for i, byte in enumerate(data):
      value |= (byte & 0x7F) << shift
      if byte < 0x80:
        return value, pos + i + 1
      shift += 7
    raise self.corrupt('malformed tf.train.Example: bad varint')

  def fields(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, position or varint value, size) of a message's fields."""
    pos = start
    while pos < end:
      key, pos = self.varint(pos, end)
      number, wire = key >> 3, key & 7
      if wire == 0:
        value, pos = self.varint(pos, end)
        yield number, wire, value, 0
        continue
      if wire == 2:
        size, pos = self.varint(pos, end)
      elif wire in (1, 5):
        size = 8 if wire == 1 else 4
      else:
        raise self.corrupt(f'malformed tf.train.Example: wire type {wire}')
      yield number, wire, pos, size
      pos += size
    if pos != end:
      raise self.corrupt('malformed tf.train.Example: a field overruns its message')

  def features(self, wanted: dict[bytes, _Codec]) -> dict[bytes, tuple[int, int]]:
    """Position and size of the ``tf.train.Feature`` of each wanted key found in the record.

    Example = {1: Features}; Features = {1: repeated map entry}; entry = {1: key, 2: Feature}.
    Unknown fields and unwanted features are skipped without reading their payloads.
    """
    found = {}
    for number, wire, pos, size in self.fields(0, self.length):
      if number != 1 or wire != 2:
        continue
      for number, wire, entry, entry_size in self.fields(pos, pos + size):
        if number != 1 or wire != 2:
          continue
        key, value = None, (entry + entry_size, 0)  # A missing value is an empty Feature.
        for number, wire, at, n in self.fields(entry, entry + entry_size):
          if wire == 2 and number == 1:
            key = self.read(at, n)
          elif wire == 2 and number == 2:
            value = (at, n)
        if key in wanted:
          found[key] = value  # Like protobuf maps: the last entry of a key wins.
    return found

  def values(self, codec: _Codec, pos: int, size: int) -> list:
    """The values of one tf.train.Feature, checked against what the codec expects.

    Raw and text features give [(position, size)] of their single bytes value (not read yet).
    """
    kind_field, list_pos, list_size = 0, 0, 0
    for number, wire, at, n in self.fields(pos, pos + size):
      if wire == 2 and number in (1, 2, 3):
        kind_field, list_pos, list_size = number, at, n
    expected = _LIST_FIELD[codec.kind]
    if kind_field not in (0, expected):
      names = {1: 'bytes_list', 2: 'float_list', 3: 'int64_list'}
      raise self.corrupt(f'feature {codec.name!r} is a {names[kind_field]}, expected a '
                         f'{names[expected]}')
    values: list = []
    for number, wire, at, n in self.fields(list_pos, list_pos + list_size):
      if number != 1:
        continue
      if codec.kind in (_RAW, _TEXT) and wire == 2:
        values.append((at, n))
      elif codec.kind == _FLOAT and wire == 2:  # Packed (what every writer emits).
        values.extend(np.frombuffer(self.read(at, n), '<f4').tolist())
      elif codec.kind == _FLOAT and wire == 5:
        values.append(struct.unpack('<f', self.read(at, 4))[0])
      elif codec.kind == _INT and wire == 2:  # Packed.
        end = at + n
        while at < end:
          value, at = self.varint(at, end)
          values.append(value)
      elif codec.kind == _INT and wire == 0:
        values.append(at)
      else:
        raise self.corrupt(f'malformed tf.train.Example: feature {codec.name!r}')
    count = 1 if codec.kind in (_RAW, _TEXT) else codec.size
    if len(values) != count:
      raise self.corrupt(f'feature {codec.name!r} has {len(values)} values, expected {count}')
    if codec.kind == _INT:  # int64 travels as a 64-bit two's complement varint.
      values = [v - (1 << 64) if v >= 1 << 63 else v for v in values]
    return values


def _size_problem(codec: _Codec, size: int) -> str:
  """What is wrong with a raw tensor of ``size`` bytes, and what it looks like instead."""
  dims = ' x '.join(str(d) for d in codec.shape)
  text = f'feature {codec.name!r} has {size} bytes, expected {codec.nbytes} ({dims} {codec.dtype})'
  itemsize = codec.dtype.itemsize
  if len(codec.shape) == 3 and size > 0 and size % itemsize == 0:
    height, width, bands = codec.shape
    values = size // itemsize
    if values % (height * width) == 0:
      text += f': looks like {values // (height * width)} bands instead of {bands}'
    elif values % bands == 0 and math.isqrt(values // bands) ** 2 == values // bands:
      side = math.isqrt(values // bands)
      text += f': looks like {side} x {side} px tiles instead of {height} x {width}'
  return text


def _read_record(fd: int | None, start: int, length: int, where: str,
                 codecs: dict[bytes, _Codec], out: dict[str, np.ndarray],
                 raw_out: dict[str, np.ndarray], slot: int, data: bytes | None = None) -> None:
  """Parses the requested features of one record into row ``slot`` of the batch arrays.

  The record is read from ``fd`` at ``start``, or from ``data`` (the whole record) if given.
  Anything wrong with it is a BadRecordError whose message starts with ``where``.
  """
  record = _Record(fd, start, length, where, data)
  try:
    found = record.features(codecs)
    for key, codec in codecs.items():
      if key not in found:
        raise record.corrupt(f'no feature {codec.name!r}')
      values = record.values(codec, *found[key])
      if codec.kind == _RAW:
        at, size = values[0]
        if size != codec.nbytes:
          raise record.corrupt(_size_problem(codec, size))
        record.readinto(at, memoryview(raw_out[codec.name][slot]))
      elif codec.kind == _TEXT:
        out[codec.name][slot] = record.read(*values[0])
      elif codec.shape:
        out[codec.name][slot] = np.asarray(values).reshape(codec.shape)
      else:
        out[codec.name][slot] = values[0]
  except BadRecordError:
    raise
  except (ValueError, OverflowError, struct.error) as e:  # E.g. a packed float list of 7 bytes.
    raise record.corrupt(f'malformed tf.train.Example: {e}') from e


class _Verifier:
  """Reads whole records through TensorFlow's reader, which checks their payload CRC.

  CRC32C of MBs per record is out of reach of Python; TensorFlow's C++ reader computes it (and
  releases the GIL meanwhile). That reader reads 16 MiB ahead into a buffer it keeps while
  open: one per (thread, file) would hold threads x files x 16 MiB, and in a shuffled epoch
  the read-ahead is wasted anyway. So each read opens its own reader (~5 us) and closes it:
  thread-safe, and one buffer per reading thread at most.
  """

  def __init__(self, paths: Sequence[str]):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tensorflow.python.lib.io import tf_record  # pylint: disable=g-import-not-at-top
    self._open = tf_record.tf_record_random_reader
    self._errors = (tf.errors.OpError, IndexError)
    self._data_loss = tf.errors.DataLossError
    self._paths = paths

  def read(self, file_index: int, start: int, length: int, where: str) -> bytes:
    try:
      reader = self._open(self._paths[file_index])
      try:
        data, _ = reader.read(start - 12)  # The offset of the record's header.
      finally:
        reader.close()
    except self._errors as e:
      what = ('corrupt record: its bytes do not match their CRC'
              if isinstance(e, self._data_loss) else 'cannot be read')
      raise BadRecordError(f'{where}: {what} (TensorFlow: {_tf_message(e)})') from e
    if len(data) != length:
      raise BadRecordError(f'{where}: {len(data)} bytes read, the header scan said {length}; '
                           'the file changed while being read')
    return data


def _read_verified(verifier: _Verifier, verified: np.ndarray, row: int, file_index: int,
                   fd: int, start: int, length: int, where: str, codecs: dict[bytes, _Codec],
                   out: dict[str, np.ndarray], raw_out: dict[str, np.ndarray],
                   slot: int) -> None:
  """_read_record from the record's bytes once TensorFlow has checked their CRC; marks
  ``verified[row]``."""
  data = verifier.read(file_index, start, length, where)
  _read_record(fd, start, length, where, codecs, out, raw_out, slot, data)
  verified[row] = True


def _fill_missing(codecs: Sequence[_Codec], out: dict[str, np.ndarray], slot: int) -> None:
  """Row ``slot`` of the batch arrays set to "missing": NaN floats (NaN is the images' no-data
  value), the no-data class for WorldCover labels, 0 for other integer raw tensors, -1 for
  integer values (0 if unsigned, False if boolean), b'' for texts."""
  for c in codecs:
    if c.name == schema.WORLDCOVER:  # 0 is a class (tree cover); losses ignore IGNORE_INDEX.
      value = schema.IGNORE_INDEX
    elif c.kind == _TEXT:
      value = b''
    elif np.issubdtype(c.dtype, np.floating):
      value = np.nan
    elif c.kind == _RAW or c.dtype == np.bool_ or np.issubdtype(c.dtype, np.unsignedinteger):
      value = 0
    else:
      value = -1
    out[c.name][slot] = value


def _tf_message(error: BaseException) -> str:
  """A TensorFlow error's own words, without the op and node decorations."""
  if isinstance(error, UnicodeDecodeError):  # TensorFlow's message quoted undecodable bytes.
    return 'an error whose message (quoting the record) is not text'
  text = getattr(error, 'message', None) or str(error)
  text = re.sub(r'\{\{[^}]*\}\}\s*', '', text)
  text = re.sub(r'\s*\[Op:.*', '', text, flags=re.S).strip()
  text = text.splitlines()[0].strip() if text else ''
  return f'{type(error).__name__}: {text}'


def _missing_files(paths: Sequence[str], use_tf: bool) -> list[str]:
  """The paths that do not exist, from one listing per folder (tf.io.gfile for URLs)."""
  listings: dict[str, set[str]] = {}
  missing = []
  for path in paths:
    folder, name = os.path.split(path)
    if folder not in listings:
      try:
        if use_tf:
          import tensorflow as tf  # pylint: disable=g-import-not-at-top
          names = tf.io.gfile.listdir(folder)
        else:
          names = os.listdir(folder)
      except (FileNotFoundError, NotADirectoryError):
        names = []  # No folder: all its files are missing.
      except Exception as e:  # pylint: disable=broad-except
        if type(e).__name__ != 'NotFoundError':  # tf.errors.NotFoundError, without importing tf.
          raise
        names = []
      listings[folder] = {n.rstrip('/') for n in names}
    if name not in listings[folder]:
      missing.append(path)
  return missing


# --- Dataset -----------------------------------------------------------------------------------


def _selection(records, split_size: int, where: str) -> np.ndarray:
  """``records`` as sorted int64 global record indices, checked against the split's size."""
  selected = np.asarray(records)
  if selected.dtype == np.bool_ or not (selected.size == 0 or
                                        np.issubdtype(selected.dtype, np.integer)):
    # A boolean mask would silently read as the indices 0 and 1.
    raise ValueError(f'{where}: records must be integer record indices, got dtype '
                     f'{selected.dtype}')
  if selected.ndim != 1:
    raise ValueError(f'{where}: records must be a 1-D array of record indices, got shape '
                     f'{selected.shape}')
  selected = np.sort(selected.astype(np.int64))
  if selected.size and (selected[0] < 0 or selected[-1] >= split_size):
    bad = selected[0] if selected[0] < 0 else selected[-1]
    raise ValueError(f'{where}: record index {bad} out of range: the split has {split_size} '
                     'records (indices 0..n-1 in file order)')
  repeated = selected[1:][selected[1:] == selected[:-1]]
  if repeated.size:
    raise ValueError(f'{where}: record index {repeated[0]} is selected more than once; a '
                     'selection is a set (each record is read once per epoch)')
  return selected


class HostDataset:
  """This process's share of one split, or of a selection of its records, and how to stream it.

  Records are numbered 0..n-1 over the whole split in file order (the split's files in shard
  order, records in file order): the *global record index* that ``records`` and
  :func:`read_split_index` use. With ``records``, each process reads the selected records that
  fall in its own share; :attr:`num_examples` is how many, epochs shuffle over just those, and a
  batch may be larger than the selection (it then holds several epochs). Records in the
  remainder that ``tfds.even_splits`` drops (fewer than ``process_count``, only when the split's
  size is not a multiple of it) are read by no process, selected or not.

  Attributes:
    num_examples: Records this process reads per epoch.
    share_sizes: ``num_examples`` of every process, by process index (each process computes
      all of them from the dataset's metadata, without reading records).
    records: The selection as sorted global record indices, or None for the whole split.
    split_size: Records in the whole split (global record indices are 0..split_size-1).
    max_bad_records, verify_checksums: As given to the constructor.
    bad_records: The message of each bad record met so far (each record once, however often
      it is read), in the order the batches met them; always empty with max_bad_records=0.
  """

  def __init__(self, data_dir: str, split: str, process_index: int | None = None,
               process_count: int | None = None, *, reader: str = 'auto',
               records: np.ndarray | Sequence[int] | None = None,
               max_bad_records: int = 0, verify_checksums: bool = False):
    """Opens the share.

    Args:
      data_dir: A dataset folder (local path or URL) written by ``data_pipeline``.
      split: Split name, e.g. ``'train'``.
      process_index: This process; default ``jax.process_index()``.
      process_count: Number of processes sharing the split; default ``jax.process_count()``.
      reader: ``'local'``, ``'tf'`` or ``'auto'`` (see the module docstring).
      records: None for the whole split, or the global record indices to read (any order). An
        index out of range, or given twice, is a ValueError: a repeat is more likely a bug in
        how the selection was made than a wish to weight a record, and silently dropping it
        would change the epoch size the caller expects.
      max_bad_records: 0: a bad record (corrupt, truncated, malformed, of the wrong size, in a
        missing file) raises a BadRecordError (a ValueError) naming its file and record. N > 0
        (local reader only): up to N bad records are read as missing values, flagged in
        ``batch[BAD_RECORD]``, logged and listed in :attr:`bad_records`; one more raises.
      verify_checksums: Local reader: check each record's payload CRC the first time this
        dataset reads it (through TensorFlow's record reader; that read is several times
        slower, see the module docstring). The tf.data reader always checks every read.

    Raises:
      FileNotFoundError: No dataset there, or files of this process's share missing (with
        max_bad_records > 0, a warning instead: their records read as bad records).
      ValueError: No such split, files not divisible among processes, an empty share, bad
        ``records``, none of the selected records in this process's share, or
        max_bad_records > 0 with the tf.data reader.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    configure_tensorflow()
    if reader not in _READERS:
      raise ValueError(f'reader must be one of {_READERS}, got {reader!r}')
    if (isinstance(max_bad_records, bool) or not isinstance(max_bad_records, (int, np.integer))
        or max_bad_records < 0):
      raise ValueError(f'max_bad_records must be an integer >= 0, got {max_bad_records!r}')
    self.data_dir = data_dir
    self._split_name = split
    try:
      self.builder = tfds.builder_from_directory(data_dir)
    except Exception as e:  # TFDS raises several types for a missing or broken folder.
      raise FileNotFoundError(f'cannot open a TFDS dataset at {data_dir!r}: {e}') from e
    if split not in self.builder.info.splits:
      raise ValueError(f'{data_dir}: no split {split!r}; available: {list(self.builder.info.splits)}')
    self.contract = writer.contract_from_builder(self.builder, data_dir)
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    num_files = self.builder.info.splits[split].num_shards
    if num_files % self.process_count:
      raise ValueError(f'{data_dir}: split {split!r} has {num_files} files, not a multiple of '
                       f'the {self.process_count} processes; rewrite it with num_shards a '
                       'multiple of the host count')
    shares = tfds.even_splits(split, n=self.process_count, drop_remainder=True)
    self.split = shares[self.process_index]
    split_info = self.builder.info.splits[self.split]
    self.num_examples = split_info.num_examples
    if self.num_examples == 0:
      raise ValueError(f'{data_dir}: split {split!r} gives process {self.process_index} no examples')
    # Which records of which files make this share (whole files, or parts at share borders).
    self.file_instructions = [
        (os.fspath(f.filename), f.skip, f.take if f.take >= 0 else f.examples_in_shard - f.skip,
         f.examples_in_shard) for f in split_info.file_instructions]
    if reader == 'auto':
      reader = 'tf' if '://' in os.fspath(data_dir) else 'local'
    self.reader = reader
    if max_bad_records and reader == 'tf':
      raise ValueError(
          f'{data_dir}: max_bad_records={max_bad_records} needs the local reader, which can '
          'skip a bad record; the tf.data reader (used for URLs) cannot: copy the data to a '
          "local disk and read it with reader='local' (or set max_bad_records=0)")
    self.max_bad_records = int(max_bad_records)
    self.verify_checksums = bool(verify_checksums)
    self.bad_records: list[str] = []
    self._bad: dict[int, str] = {}  # Row of _record_locations -> message, of bad records met.
    self._bad_lock = threading.Lock()
    self._lost: dict[int, str] = {}  # File index -> why (some of) its records cannot be read.
    self._missing_files: frozenset[str] = frozenset()
    self._locations = None  # See _record_locations; lazily.
    self._verified = None  # Per row of _record_locations: CRC checked (verify_checksums).

    # Global index of each file's first record, to number the records of any share.
    whole = self.builder.info.splits[split]
    self.split_size = whole.num_examples
    first_record, position = {}, 0
    for f in whole.file_instructions:
      take = f.take if f.take >= 0 else f.examples_in_shard - f.skip
      first_record[os.fspath(f.filename)] = position - f.skip
      position += take

    def ranges(instructions) -> np.ndarray:
      """[start, stop) global record indices of each (path, skip, take, ...) instruction."""
      starts = [first_record[path] + skip for path, skip, *_ in instructions]
      return np.asarray([(s, s + take) for s, (_, _, take, _) in zip(starts, instructions)],
                        np.int64).reshape(-1, 2)

    self._ranges = ranges(self.file_instructions)
    # Per instruction, the selected record offsets within it (0..take-1); None: all of them.
    self._selected: list[np.ndarray | None] = [None] * len(self.file_instructions)
    self.records = None
    if records is None:
      self.share_sizes = tuple(self.builder.info.splits[s].num_examples for s in shares)
      self._check_files(split)
      return
    where = f'{data_dir} split {split!r}'
    self.records = _selection(records, self.split_size, where)
    self._selected = [self.records[np.searchsorted(self.records, start):
                                   np.searchsorted(self.records, stop)] - start
                      for start, stop in self._ranges]
    sizes = []
    for s in shares:
      share = ranges([(os.fspath(f.filename), f.skip,
                       f.take if f.take >= 0 else f.examples_in_shard - f.skip, None)
                      for f in self.builder.info.splits[s].file_instructions])
      sizes.append(int((np.searchsorted(self.records, share[:, 1]) -
                        np.searchsorted(self.records, share[:, 0])).sum()))
    self.share_sizes = tuple(sizes)
    self.num_examples = sizes[self.process_index]
    if self.num_examples == 0:
      raise ValueError(
          f'{where}: process {self.process_index} of {self.process_count} has none of the '
          f'{self.records.size} selected records in its share (records '
          f'{self._ranges[:, 0].min()}..{self._ranges[:, 1].max() - 1} of the split); select '
          'more records (e.g. a larger label fraction) or read with fewer processes')
    self._check_files(split)

  def _check_files(self, split: str) -> None:
    """Every file this process reads exists: one folder listing (tf.io.gfile for tf reads)."""
    paths = [path for (path, *_), chosen in zip(self.file_instructions, self._selected)
             if chosen is None or chosen.size]
    missing = _missing_files(paths, use_tf=self.reader == 'tf')
    if not missing:
      return
    names = ', '.join(os.path.basename(p) for p in missing[:8])
    if len(missing) > 8:
      names += f' and {len(missing) - 8} more'
    message = (f'{self.data_dir}: {len(missing)} of the {len(paths)} files of split {split!r} '
               f'that process {self.process_index} reads are missing, though dataset_info.json '
               f'lists them: {names}')
    if not self.max_bad_records:
      raise FileNotFoundError(f'{message}; the folder is incomplete (copied in part?): copy '
                              'it again or rebuild it')
    logging.warning('%s; their records will read as bad records (max_bad_records=%d)', message,
                    self.max_bad_records)
    self._missing_files = frozenset(missing)

  @property
  def tile_size(self) -> int:
    return self.builder.info.features[schema.IMAGE].shape[0]

  @property
  def num_channels(self) -> int:
    return self.builder.info.features[schema.IMAGE].shape[-1]

  @property
  def record_indices(self) -> np.ndarray:
    """Global record index of each record this process reads, in file order."""
    return np.concatenate([
        start + (np.arange(take) if chosen is None else chosen)
        for (start, _), (_, _, take, _), chosen in zip(self._ranges, self.file_instructions,
                                                       self._selected)]).astype(np.int64)

  def _codecs(self, features: Sequence[str]) -> list[_Codec]:
    known = self.builder.info.features
    missing = [name for name in features if name not in known]
    if missing:
      raise ValueError(f'{self.data_dir}: no features {missing}; available: {list(known)}')
    if EXAMPLE_MASK in features:
      raise ValueError(f'{EXAMPLE_MASK!r} is added by eval_batches, it is not a feature')
    if BAD_RECORD in features:
      raise ValueError(f'{BAD_RECORD!r} is added with max_bad_records > 0, it is not a feature')
    return [_codec(name, known[name]) for name in dict.fromkeys(features)]

  def batches(self, local_batch: int, *, seed: int, start_step: int = 0,
              num_steps: int, shuffle_buffer: int = 256,
              features: tuple[str, ...] = (schema.IMAGE,)) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``num_steps`` host batches, the first being batch number ``start_step``.

    Args:
      local_batch: Examples per batch on this host. At most :attr:`num_examples` for a whole
        share (more would repeat examples within a batch, most likely a mistake); any size with
        ``records``, where a small selection (a few labelled tiles) is the point: a batch then
        spans several epochs, each in its own order.
      seed: With the epoch number, fixes the order of every epoch.
      start_step: Batch number of the first batch; earlier records are skipped, not decoded.
      num_steps: Number of batches; epochs follow each other as needed.
      shuffle_buffer: 0 or 1 reads the share in file order. Larger: the local reader shuffles
        whole epochs (it shuffles record locations, which cost no memory); the tf.data reader
        shuffles in a window of this many raw records.
      features: Names of the features to return (others are not parsed).

    Returns:
      An iterator of dicts of numpy arrays with a leading batch axis: raw tensors in their stored
      dtype (image float16, worldcover uint8), floats float32, class labels int64, texts bytes.
    """
    if self.records is None and (local_batch < 1 or local_batch > self.num_examples):
      raise ValueError(f'per-host batch {local_batch} must lie in 1..{self.num_examples}, the '
                       f'examples process {self.process_index} has in {self.split}')
    if local_batch < 1:
      raise ValueError(f'per-host batch {local_batch} must be at least 1')
    codecs = self._codecs(features)
    if self.reader == 'tf':
      return self._tf_batches(local_batch, seed, start_step, num_steps, shuffle_buffer, codecs)
    return self._local_batches(local_batch, seed, start_step, num_steps, shuffle_buffer, codecs)

  def num_eval_batches(self, local_batch: int) -> int:
    """Batches :meth:`eval_batches` yields: the same on every process."""
    if local_batch < 1:
      raise ValueError(f'per-host batch {local_batch} must be at least 1')
    return math.ceil(max(self.share_sizes) / local_batch)

  def eval_batches(self, local_batch: int, *, features: tuple[str, ...] = (schema.IMAGE,)
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Yields one pass over the records this process reads, in file order, for evaluation.

    Every batch has ``local_batch`` rows and, besides the features, a boolean
    ``batch[EXAMPLE_MASK]``: True for the share's records, each exactly once over the pass,
    False for padding (copies of the share's first record) that fills the last batch. Every
    process yields :meth:`num_eval_batches` batches, the count the largest share needs, so that
    collective steps line up across hosts: a process with a smaller share (possible with
    ``records``) ends with fully masked batches.

    Args:
      local_batch: Rows per batch on this host; any size (the pass is padded).
      features: Names of the features to return.

    Returns:
      An iterator of dicts of numpy arrays, as :meth:`batches` gives, plus ``EXAMPLE_MASK``.
    """
    num_batches = self.num_eval_batches(local_batch)
    codecs = self._codecs(features)
    if self.reader == 'tf':
      return self._tf_eval_batches(local_batch, num_batches, codecs)
    return self._local_eval_batches(local_batch, num_batches, codecs)

  # --- Local reader ---------------------------------------------------------------------------

  def _record_locations(self) -> np.ndarray:
    """(file index, offset, length, record in file, global record index) of each record read.

    Rows in file order; scanned once. With max_bad_records > 0, the records of a missing file,
    or after the damage in a damaged one, keep their rows (so the epoch layout, which follows
    the metadata's counts, does not change) with offset -1; ``_lost`` says why.
    """
    if self._locations is None:
      parts = []
      for index, ((path, skip, take, in_shard), chosen) in enumerate(
          zip(self.file_instructions, self._selected)):
        if chosen is not None and not chosen.size:
          continue  # No selected record there: not even its headers are read.
        first = int(self._ranges[index, 0]) - skip  # Global index of the file's record 0.
        rows = np.full((in_shard, 5), -1, np.int64)
        rows[:, 0] = index
        rows[:, 3] = np.arange(in_shard)
        rows[:, 4] = first + rows[:, 3]
        if path in self._missing_files:
          self._lost[index] = 'the file is missing'
        else:
          located, lost = self._scan_file(path, in_shard, first)
          rows[:len(located), 1:3] = located
          if lost:
            self._lost[index] = lost
        rows = rows[skip:skip + take]
        if chosen is not None:
          rows = rows[chosen]
        parts.append(rows)
      self._locations = np.concatenate(parts)
      self._verified = np.zeros(len(self._locations), np.bool_)  # See verify_checksums.
    return self._locations

  def _scan_file(self, path: str, in_shard: int, first: int) -> tuple[np.ndarray, str | None]:
    """(offset, length) of the file's records that can be located, and why the others cannot.

    Damage, or fewer records than the metadata's ``in_shard``, raises; with max_bad_records > 0
    it is logged, and the records from the damage on are lost (the reason is returned).
    """
    records, damage = _scan(path)
    if len(records) > in_shard:
      raise BadRecordError(f'{path}: {len(records)} records, the dataset metadata says '
                           f'{in_shard}; the folder changed since it was written')
    if damage is not None:
      at, pos, what = damage
      message = (f'{path}: record {at} (split record {first + at}, byte {pos}): {what}'
                 f'{_lost_records(at, in_shard)}')
    elif len(records) < in_shard:
      at = len(records)
      pos = int(records[-1].sum()) + 4 if at else 0
      what = (f'the file ends after {at} records, the dataset metadata says {in_shard}; it was '
              'truncated or changed since it was written')
      message = f'{path}: record {at} (split record {first + at}, byte {pos}): {what}'
    else:
      return records, None
    if not self.max_bad_records:
      raise BadRecordError(message)
    if at >= in_shard:  # Damage after the records the metadata knows: they all read.
      logging.warning('%s', message)
      return records[:in_shard], None
    logging.warning('%s; they will read as bad records (max_bad_records=%d)', message,
                    self.max_bad_records)
    return records, f'lost to the damage at record {at} (byte {pos}) of the file: {what}'

  def _lost_message(self, row: int) -> str:
    """Why a record of _record_locations without a location (offset -1) cannot be read."""
    file_index, _, _, in_file, index = (int(v) for v in self._locations[row])
    return (f'{self.file_instructions[file_index][0]}: record {in_file} (split record {index}): '
            f'not read: {self._lost[file_index]}')

  def _bad_record(self, row: int, message: str) -> None:
    """Counts and logs a bad record (once per record); more than max_bad_records raises."""
    with self._bad_lock:
      if row in self._bad:
        return
      self._bad[row] = message
      self.bad_records.append(message)
      count = len(self.bad_records)
    if count > self.max_bad_records:
      raise ValueError(f'more than {self.max_bad_records} bad records in {self.data_dir} split '
                       f'{self._split_name!r} (max_bad_records={self.max_bad_records}); the '
                       f'last: {message}')
    logging.warning('bad record %d (max_bad_records=%d), read as missing values: %s', count,
                    self.max_bad_records, message)

  def _epoch_order(self, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
      return np.arange(self.num_examples)
    # SeedSequence wants non-negative entropy; the mask maps any Python int seed to one.
    rng = np.random.default_rng([seed & (2**64 - 1), epoch])
    return rng.permutation(self.num_examples)

  def _local_batches(self, local_batch, seed, start_step, num_steps, shuffle_buffer, codecs):
    cached_epoch = [-1, None]

    def batch_records(step: int) -> np.ndarray:
      """Rows of ``locations`` that batch ``step`` of the stream reads."""
      rows = np.empty(local_batch, np.int64)
      position = step * local_batch
      for i in range(local_batch):
        epoch, offset = divmod(position + i, self.num_examples)
        if cached_epoch[0] != epoch:
          cached_epoch[:] = epoch, self._epoch_order(seed, epoch, shuffle_buffer > 1)
        rows[i] = cached_epoch[1][offset]
      return rows

    return self._local_stream(batch_records, range(start_step, start_step + num_steps),
                              local_batch, codecs)

  def _local_eval_batches(self, local_batch, num_batches, codecs):
    def positions(step: int) -> np.ndarray:
      return np.arange(step * local_batch, (step + 1) * local_batch)

    def batch_records(step: int) -> np.ndarray:
      rows = positions(step)
      return np.where(rows < self.num_examples, rows, 0)  # Padding: the first record again.

    def mask(step: int) -> np.ndarray:
      return positions(step) < self.num_examples

    return self._local_stream(batch_records, range(num_batches), local_batch, codecs, mask)

  def _local_stream(self, batch_records, steps: range, local_batch, codecs, mask=None):
    """Reads batch ``step`` = the records ``batch_records(step)`` for each step in ``steps``.

    ``mask``, if given, maps a step to its ``EXAMPLE_MASK`` array.
    """
    locations = self._record_locations()
    wanted = {c.name.encode(): c for c in codecs}
    paths = [path for path, *_ in self.file_instructions]
    skip_bad = self.max_bad_records > 0
    bad_rows = self._bad  # Rows known bad (only ever filled with skip_bad): not read again.
    verified = self._verified  # Rows whose CRC was checked once: read on the fast path since.

    def generate():
      readable = np.unique(locations[locations[:, 1] >= 0, 0])
      fds = {int(i): os.open(paths[i], os.O_RDONLY) for i in readable}
      verifier = _Verifier(paths) if self.verify_checksums else None
      # Enough batches in flight to keep every thread busy while the consumer works on one.
      depth = max(2, math.ceil(2 * _READ_THREADS / local_batch))
      pool = concurrent.futures.ThreadPoolExecutor(_READ_THREADS, 'host_dataset_read')
      pending = collections.deque()
      # The consumer holds one batch while asking for the next: depth + 2 arrays of each kind
      # cycle in steady state.
      arrays = _ArrayPool(capacity=depth + 2)

      def submit(step):
        out = _empty_batch(codecs, local_batch, arrays)
        # Raw tensors are filled through flat byte views of their rows.
        raw_out = {c.name: out[c.name].reshape(local_batch, -1).view(np.uint8)
                   for c in codecs if c.kind == _RAW}
        rows = batch_records(step)
        reads = []  # Per slot, the read's future, or None for a record known to be bad.
        for slot, row in enumerate(rows):
          file_index, offset, length, in_file, index = (int(v) for v in locations[row])
          if offset < 0 or row in bad_rows:
            reads.append(None)
            continue
          where = (f'{paths[file_index]}: record {in_file} (split record {index}, '
                   f'byte {offset - 12})')
          if verifier is None or verified[row]:
            reads.append(pool.submit(_read_record, fds[file_index], offset, length, where, wanted,
                                     out, raw_out, slot))
          else:
            reads.append(pool.submit(_read_verified, verifier, verified, row, file_index,
                                     fds[file_index], offset, length, where, wanted, out,
                                     raw_out, slot))
        pending.append((step, rows, out, reads))

      todo = iter(steps)
      try:
        for step in todo:
          submit(step)
          if len(pending) >= depth:
            break
        while pending:
          step, rows, out, reads = pending.popleft()
          bad = []
          for slot, read in enumerate(reads):  # In slot order: deterministic counts and errors.
            if read is None:
              row = int(rows[slot])
              message = bad_rows.get(row) or self._lost_message(row)
            else:
              try:
                read.result()
                continue
              except BadRecordError as e:
                if not skip_bad:
                  raise
                message = str(e)
            self._bad_record(int(rows[slot]), message)
            bad.append(slot)
          for next_step in todo:
            submit(next_step)
            break
          if sys.byteorder != 'little':  # Raw tensors are stored little-endian.
            for c in codecs:
              if c.kind == _RAW and c.dtype.itemsize > 1:
                out[c.name].byteswap(inplace=True)
          for slot in bad:
            _fill_missing(codecs, out, slot)
          # A new dict: what the consumer does to it cannot touch the arrays' reuse.
          batch = dict(out)
          if mask is not None:
            batch[EXAMPLE_MASK] = mask(step)
          if skip_bad:
            flags = np.zeros(local_batch, np.bool_)
            flags[bad] = True
            batch[BAD_RECORD] = flags
          del out  # Drop the generator's own references before the next batch is allocated.
          yield batch
          del batch
      finally:
        for _, _, _, reads in pending:
          for read in reads:
            if read is not None:
              read.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        for fd in fds.values():
          os.close(fd)

    return generate()

  # --- tf.data reader -------------------------------------------------------------------------

  def _tf_files(self) -> tuple[list[str], list[int], list[int], list[int]]:
    """(path, skip, take, first row) of each file read; rows number the share's records."""
    table, row = [], 0
    for (path, skip, take, _), chosen in zip(self.file_instructions, self._selected):
      if chosen is None or chosen.size:  # Files without a selected record are not opened.
        table.append((path, skip, take, row))
      row += take
    return tuple(list(column) for column in zip(*table))

  def _tf_keep(self):
    """Per row of the share (see _tf_files), whether it is read: a bool tensor, or None."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if self.records is None:
      return None
    keep = np.zeros(sum(take for _, _, take, _ in self.file_instructions), np.bool_)
    row = 0
    for (_, _, take, _), chosen in zip(self.file_instructions, self._selected):
      keep[row + chosen] = True
      row += take
    return tf.constant(keep)

  def _tf_records(self, files, cycle_length: int, keep):
    """Raw records of ``files`` (a dataset of _tf_files rows), kept rows only, interleaved."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    def read(path, skip, take, row):
      # TFRecordDataset ends quietly at a file cut at a record border (or inside a header):
      # fewer records than the metadata says fail here instead of shifting the stream.
      records = (tf.data.TFRecordDataset(path).skip(skip).take(take)
                 .apply(tf.data.experimental.assert_cardinality(take)))
      if keep is None:
        return records
      # Selected by row number before any shuffle, so the set read does not depend on order.
      return (tf.data.Dataset.zip((tf.data.Dataset.range(row, row + take), records))
              .filter(lambda r, _: tf.gather(keep, r)).map(lambda _, record: record))

    return files.interleave(read, cycle_length=cycle_length, block_length=1,
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def _tf_cache_selection(self) -> bool:
    """Whether the selected records are small enough to keep in memory after one read.

    Without a cache every epoch rereads the files holding a selected record: for a label
    fraction of 0.1 %, a thousand times the bytes used. Sizes are estimated from file sizes.
    A cached selection is read in another order than an uncached one (see _tf_epochs): like a
    change of reader, resume a run on the same data it started on.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if self.records is None:
      return False
    paths, *_ = self._tf_files()
    in_files = {path: shard for path, _, _, shard in self.file_instructions}
    file_bytes = sum(tf.io.gfile.stat(path).length for path in paths)
    per_record = file_bytes / max(1, sum(in_files[path] for path in paths))
    return self.num_examples * per_record <= _TF_CACHE_BYTES

  def _tf_epochs(self, seed: int, first_epoch: int, end_epoch: int, shuffle_buffer: int):
    """Raw serialised records of epochs first_epoch..end_epoch-1, each in its own order.

    Epochs are made lazily (a long run over a tiny selection has millions of them). An epoch
    reads the files in an order drawn from (seed, epoch), 4 interleaved, and shuffles records
    in a window of ``shuffle_buffer``; a cached selection is shuffled from memory instead.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    paths, skips, takes, rows = self._tf_files()
    table = (tf.constant(paths), tf.constant(skips, tf.int64), tf.constant(takes, tf.int64),
             tf.constant(rows, tf.int64))
    keep = self._tf_keep()
    shuffle = shuffle_buffer > 1
    cached = None
    if self._tf_cache_selection():
      cached = self._tf_records(tf.data.Dataset.from_tensor_slices(table), 1, keep).cache()

    def file_order(epoch):
      rng = np.random.default_rng([seed & (2**64 - 1), int(epoch)])
      return rng.permutation(len(paths)).astype(np.int64)

    seed_offset = (seed * _EPOCH_SEED_STRIDE) % (2**31 - 1)

    def epoch_records(epoch):
      if cached is not None:
        records = cached
      else:
        order = tf.range(len(paths), dtype=tf.int64)
        if shuffle:
          order = tf.numpy_function(file_order, [epoch], tf.int64, stateful=False)
          order.set_shape([len(paths)])
        files = tf.data.Dataset.from_tensor_slices(tuple(tf.gather(t, order) for t in table))
        records = self._tf_records(files, min(4, len(paths)), keep)
      if shuffle:
        epoch_seed = (seed_offset + epoch) % (2**31 - 1)
        records = records.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
      return records

    return tf.data.Dataset.range(first_epoch, end_epoch).flat_map(epoch_records)

  def _tf_parse(self, codecs):
    """A function parsing a batch of serialised records into the requested features."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    spec = {}
    for c in codecs:
      if c.kind in (_RAW, _TEXT):
        spec[c.name] = tf.io.FixedLenFeature([], tf.string)
      else:
        spec[c.name] = tf.io.FixedLenFeature(c.shape, tf.float32 if c.kind == _FLOAT else tf.int64)

    def parse(serialised):  # One vectorised parse per batch, of the requested features only.
      parsed = tf.io.parse_example(serialised, spec)
      out = {}
      for c in codecs:
        value = parsed[c.name]
        if c.kind == _RAW:
          value = tf.io.decode_raw(value, tf.as_dtype(c.dtype))
          # The batch size from the input, not -1: same-sized records of a wrong size must
          # fail, not regroup into another number of tensors.
          value = tf.reshape(value, tf.concat([tf.shape(value)[:1],
                                               tf.constant(c.shape, tf.int32)], 0))
        elif c.kind != _TEXT and value.dtype != tf.as_dtype(c.dtype):
          value = tf.cast(value, c.dtype)
        out[c.name] = value
      return out

    return parse

  def _tf_batches(self, local_batch, seed, start_step, num_steps, shuffle_buffer, codecs):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    position = start_step * local_batch
    first_epoch, offset = divmod(position, self.num_examples)
    end_epoch = math.ceil((position + num_steps * local_batch) / self.num_examples)
    ds = self._tf_epochs(seed, first_epoch, max(end_epoch, first_epoch + 1), shuffle_buffer)
    ds = ds.skip(offset)  # Raw: not decoded.
    ds = ds.batch(local_batch, drop_remainder=True).take(num_steps)
    ds = ds.map(self._tf_parse(codecs), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return self._tf_checked(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator(), codecs)

  def _tf_eval_batches(self, local_batch, num_batches, codecs):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    paths, skips, takes, rows = self._tf_files()
    files = tf.data.Dataset.from_tensor_slices(
        (paths, tf.constant(skips, tf.int64), tf.constant(takes, tf.int64),
         tf.constant(rows, tf.int64)))
    records = self._tf_records(files, 1, self._tf_keep())  # One file at a time: file order.
    total = num_batches * local_batch
    padded = records.concatenate(records.take(1).repeat(total - self.num_examples))
    mask = tf.data.Dataset.range(total).map(lambda i: i < self.num_examples)
    parse = self._tf_parse(codecs)

    def parse_with_mask(serialised, real):
      out = parse(serialised)
      out[EXAMPLE_MASK] = real
      return out

    ds = tf.data.Dataset.zip((padded, mask)).batch(local_batch, drop_remainder=True)
    ds = ds.map(parse_with_mask, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return self._tf_checked(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator(), codecs)

  def _tf_checked(self, batches, codecs):
    """``batches``, with a TensorFlow error about the data turned into one naming the record."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      yield from batches
    # UnicodeDecodeError: TensorFlow quoting a malformed record's bytes in its message.
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
            tf.errors.FailedPreconditionError, UnicodeDecodeError) as e:
      raise self._tf_locate(codecs, e) from e

  def _tf_locate(self, codecs, error) -> BadRecordError:
    """The first bad record of the files read, in file order, for a tf.data ``error``.

    TensorFlow's messages name neither file nor record: reread the files one by one, parsing
    the records read with the same function (in groups, then one by one in a failing group).
    Slow, but only ever on the way to an error.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    logging.warning('tf.data failed reading %s (%s); reading its files again one by one to find '
                    'the record', self.data_dir, _tf_message(error))
    parse = self._tf_parse(codecs)
    wanted = {c.name.encode(): c for c in codecs}
    out = _empty_batch(codecs, 1)
    raw_out = {c.name: out[c.name].reshape(1, -1).view(np.uint8) for c in codecs
               if c.kind == _RAW}

    def first_bad(group, where):
      """The error of the first record of ``group`` [(index, byte, record)] that fails parsing."""
      if not group:
        return None
      try:
        parse(tf.constant([record for _, _, record in group]))
        return None
      except (tf.errors.OpError, UnicodeDecodeError):
        pass
      for index, pos, record in group:
        try:
          parse(tf.constant([record]))
        except (tf.errors.OpError, UnicodeDecodeError) as e:
          said = _tf_message(e)
          try:  # This module's parser says what is wrong in its own words, where it can.
            _read_record(None, 0, len(record), where(index, pos), wanted, out, raw_out, 0, record)
          except BadRecordError as bad:
            return BadRecordError(f'{bad} (TensorFlow: {said})')
          return BadRecordError(f'{where(index, pos)}: {said}')
      return None

    for file_index, ((path, skip, take, in_shard), chosen) in enumerate(
        zip(self.file_instructions, self._selected)):
      if chosen is not None and not chosen.size:
        continue
      first = int(self._ranges[file_index, 0]) - skip

      def where(index, pos, path=path, first=first):
        return f'{path}: record {index} (split record {first + index}, byte {pos})'

      parsed = set(range(skip, skip + take)) if chosen is None else set((skip + chosen).tolist())
      index = pos = size = 0
      group = []
      try:
        for record in tf.data.TFRecordDataset(path).take(skip + take).as_numpy_iterator():
          if index in parsed:
            group.append((index, pos, record))
            size += len(record)
            if len(group) >= 64 or size >= 64 << 20:
              if (bad := first_bad(group, where)) is not None:
                return bad
              group, size = [], 0
          pos += 12 + len(record) + 4
          index += 1
      except tf.errors.OpError as e:
        if (bad := first_bad(group, where)) is not None:
          return bad
        if isinstance(e, tf.errors.NotFoundError) and index == 0:
          return BadRecordError(f'{path}: cannot be read: {_tf_message(e)}')
        return BadRecordError(f'{where(index, pos)}: corrupt or truncated record '
                              f'(TensorFlow: {_tf_message(e)})')
      if (bad := first_bad(group, where)) is not None:
        return bad
      if index < skip + take:
        return BadRecordError(
            f'{where(index, pos)}: the file ends after {index} records (byte {pos} of '
            f'{tf.io.gfile.stat(path).length}), the dataset metadata says {in_shard}; it was '
            'truncated or changed since it was written')
    return BadRecordError(f'{self.data_dir} split {self._split_name!r}: tf.data failed '
                          f'({_tf_message(error)}), but reading the files again record by '
                          'record found no bad record')


def read_split_index(data_dir: str, split: str,
                     features: Sequence[str] = (schema.TILE_ID, schema.REGION, schema.VCF)
                     ) -> dict[str, np.ndarray]:
  """Small per-record features of a whole split, in global record index order (file order).

  Entry ``i`` of every array describes the record that ``HostDataset(..., records=[i])`` reads,
  so selections made on this index (e.g. :func:`data_pipeline.subsets.select_records`) can be
  passed to :class:`HostDataset`. Only the named features are read; ask for small ones.

  Args:
    data_dir: A dataset folder written by ``data_pipeline``.
    split: Split name.
    features: Feature names; texts (tile ids) come back as ``str``.

  Returns:
    A dict of numpy arrays, one row per record of the split: texts as object arrays of str, the
    rest as :meth:`HostDataset.batches` gives them.
  """
  dataset = HostDataset(data_dir, split, process_index=0, process_count=1)
  batch = min(1024, dataset.num_examples)
  parts = collections.defaultdict(list)
  for b in dataset.eval_batches(batch, features=tuple(features)):
    real = b.pop(EXAMPLE_MASK)
    for name, values in b.items():
      parts[name].append(values[real])
  index = {name: np.concatenate(parts[name]) for name in dict.fromkeys(features)}
  for name, values in index.items():
    if values.dtype == object:
      index[name] = np.asarray([v.decode() if isinstance(v, bytes) else v for v in values],
                               dtype=object)
  return index
