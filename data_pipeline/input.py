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
  length headers are checked against their CRC; payload CRCs are not (TensorFlow checks them;
  CRC32C at GB/s is out of reach of Python without a new dependency).
* ``'tf'``: ``tf.data``. Files in an order drawn from (seed, epoch), interleaved, raw serialised
  records shuffled in a window of ``shuffle_buffer`` records, batched, then one vectorised
  ``tf.io.parse_example`` per batch with a spec of only the requested features. It works on any
  filesystem TensorFlow knows, with several copies per tile and CRC checks of every record: on
  448 px tiles on 2 cores, ~10x slower than ``'local'`` from the page cache and ~2.5x from disk
  (``bench/bench_input.py``). Copy data to a local disk to train fast.

Both readers parse only the features asked for, so records carrying features this module does
not know (added by a newer writer) read fine. The two readers give different orders: resume a
run with the same kind of path it started on.

Images stay float16 dB (NaN = no-data) on the host; ``mae_jax.preprocess`` casts and normalises
them on the device. ``global_batch`` turns per-host batches into one global ``jax.Array``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import struct
import sys
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from data_pipeline import schema
from data_pipeline import writer

_EPOCH_SEED_STRIDE = 1_000_003
# Reader threads of the local reader. Their work is mostly preads, which release the GIL: from
# the page cache a memory copy (more threads than cores cost nothing measurable), from disk a
# wait, where more reads in flight keep the disk busier (on 2 cores, 4 threads read cold files
# ~1.3x faster than 2; posix_fadvise(WILLNEED) hints did as well but cost a quarter of the CPU
# of a warm read, and more than 4 threads gave nothing more).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
_READ_THREADS = min(16, max(4, 2 * _CORES))
# Bytes read at once while walking a record's protobuf structure: every feature but the big
# tensors of a 448 px tile fits in the first read, the rest costs one more read per big tensor.
_CHUNK = 1 << 16
_READERS = ('auto', 'local', 'tf')


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


def scan_tfrecord(path: str) -> np.ndarray:
  """(offset, length) of every record's data in a local TFRecord file, as an (n, 2) int64 array.

  Reads only the 12-byte headers and checks each length against its CRC, so a file that is not
  a TFRecord file, or is truncated, fails here with its byte offset.
  """
  size = os.path.getsize(path)
  records = []
  fd = os.open(path, os.O_RDONLY)
  try:
    pos = 0
    while pos < size:
      header = os.pread(fd, 12, pos)
      if len(header) < 12:
        raise ValueError(f'{path}: truncated TFRecord header at byte {pos}')
      length, crc = struct.unpack('<QI', header)
      if masked_crc32c(header[:8]) != crc:
        raise ValueError(f'{path}: corrupt TFRecord header at byte {pos} (bad length CRC)')
      records.append((pos + 12, length))
      pos += 12 + length + 4
    if pos != size:
      raise ValueError(f'{path}: truncated TFRecord file: the last record ends at byte {pos}, '
                       f'the file has {size}')
  finally:
    os.close(fd)
  return np.asarray(records, np.int64).reshape(-1, 2)


class _Record:
  """One serialised tf.train.Example inside an open file, read on demand in small chunks."""

  __slots__ = ('fd', 'start', 'length', 'where', '_chunk', '_chunk_pos')

  def __init__(self, fd: int, start: int, length: int, where: str):
    self.fd, self.start, self.length, self.where = fd, start, length, where
    self._chunk, self._chunk_pos = b'', 0

  def corrupt(self, what: str) -> ValueError:
    return ValueError(f'{self.where}: {what}')

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
      out[:] = self._chunk[i:i + n]
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


def _read_record(fd: int, start: int, length: int, where: str, codecs: dict[bytes, _Codec],
                 out: dict[str, np.ndarray], raw_out: dict[str, np.ndarray], slot: int) -> None:
  """Parses the requested features of one record into row ``slot`` of the batch arrays."""
  record = _Record(fd, start, length, where)
  found = record.features(codecs)
  for key, codec in codecs.items():
    if key not in found:
      raise record.corrupt(f'no feature {codec.name!r}')
    values = record.values(codec, *found[key])
    if codec.kind == _RAW:
      at, size = values[0]
      if size != codec.nbytes:
        raise record.corrupt(f'feature {codec.name!r} has {size} bytes, expected '
                             f'{codec.nbytes} for {codec.shape} {codec.dtype}')
      record.readinto(at, memoryview(raw_out[codec.name][slot]))
    elif codec.kind == _TEXT:
      out[codec.name][slot] = record.read(*values[0])
    elif codec.shape:
      out[codec.name][slot] = np.asarray(values).reshape(codec.shape)
    else:
      out[codec.name][slot] = values[0]


# --- Dataset -----------------------------------------------------------------------------------


class HostDataset:
  """This process's share of one split, and how to stream it from any step."""

  def __init__(self, data_dir: str, split: str, process_index: int | None = None,
               process_count: int | None = None, *, reader: str = 'auto'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    configure_tensorflow()
    if reader not in _READERS:
      raise ValueError(f'reader must be one of {_READERS}, got {reader!r}')
    self.data_dir = data_dir
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
    self.split = tfds.even_splits(split, n=self.process_count,
                                  drop_remainder=True)[self.process_index]
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
    self._locations = None  # (file index, offset, length) per record of the share, lazily.

  @property
  def tile_size(self) -> int:
    return self.builder.info.features[schema.IMAGE].shape[0]

  @property
  def num_channels(self) -> int:
    return self.builder.info.features[schema.IMAGE].shape[-1]

  def _codecs(self, features: Sequence[str]) -> list[_Codec]:
    known = self.builder.info.features
    missing = [name for name in features if name not in known]
    if missing:
      raise ValueError(f'{self.data_dir}: no features {missing}; available: {list(known)}')
    return [_codec(name, known[name]) for name in dict.fromkeys(features)]

  def batches(self, local_batch: int, *, seed: int, start_step: int = 0,
              num_steps: int, shuffle_buffer: int = 256,
              features: tuple[str, ...] = (schema.IMAGE,)) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``num_steps`` host batches, the first being batch number ``start_step``.

    Args:
      local_batch: Examples per batch on this host.
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
    if local_batch < 1 or local_batch > self.num_examples:
      raise ValueError(f'per-host batch {local_batch} must lie in 1..{self.num_examples}, the '
                       f'examples process {self.process_index} has in {self.split}')
    codecs = self._codecs(features)
    if self.reader == 'tf':
      return self._tf_batches(local_batch, seed, start_step, num_steps, shuffle_buffer, codecs)
    return self._local_batches(local_batch, seed, start_step, num_steps, shuffle_buffer, codecs)

  # --- Local reader ---------------------------------------------------------------------------

  def _record_locations(self) -> np.ndarray:
    """(file index, offset, length) of each record of the share, in file order; scanned once."""
    if self._locations is None:
      parts = []
      for index, (path, skip, take, in_shard) in enumerate(self.file_instructions):
        records = scan_tfrecord(path)
        if len(records) != in_shard:
          raise ValueError(f'{path}: {len(records)} records, the dataset metadata says '
                           f'{in_shard}; the folder changed since it was written')
        part = np.empty((take, 3), np.int64)
        part[:, 0] = index
        part[:, 1:] = records[skip:skip + take]
        parts.append(part)
      self._locations = np.concatenate(parts)
    return self._locations

  def _epoch_order(self, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
      return np.arange(self.num_examples)
    # SeedSequence wants non-negative entropy; the mask maps any Python int seed to one.
    rng = np.random.default_rng([seed & (2**64 - 1), epoch])
    return rng.permutation(self.num_examples)

  def _local_batches(self, local_batch, seed, start_step, num_steps, shuffle_buffer, codecs):
    locations = self._record_locations()
    wanted = {c.name.encode(): c for c in codecs}
    paths = [path for path, *_ in self.file_instructions]
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

    def generate():
      fds = [os.open(path, os.O_RDONLY) for path in paths]
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
        futures = []
        for slot, row in enumerate(batch_records(step)):
          file_index, offset, length = (int(v) for v in locations[row])
          where = f'{paths[file_index]} (record at byte {offset - 12})'
          futures.append(pool.submit(_read_record, fds[file_index], offset, length, where,
                                     wanted, out, raw_out, slot))
        pending.append((out, futures))

      stop = start_step + num_steps
      try:
        next_step = start_step
        while next_step < stop and len(pending) < depth:
          submit(next_step)
          next_step += 1
        while pending:
          out, futures = pending.popleft()
          for future in futures:
            future.result()
          if next_step < stop:
            submit(next_step)
            next_step += 1
          if sys.byteorder != 'little':  # Raw tensors are stored little-endian.
            for c in codecs:
              if c.kind == _RAW and c.dtype.itemsize > 1:
                out[c.name].byteswap(inplace=True)
          # A new dict: what the consumer does to it cannot touch the arrays' reuse.
          yield dict(out)
          del out  # Drop the generator's own references before the next batch is allocated.
      finally:
        for _, futures in pending:
          for future in futures:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        for fd in fds:
          os.close(fd)

    return generate()

  # --- tf.data reader -------------------------------------------------------------------------

  def _tf_epoch(self, seed: int, epoch: int, shuffle_buffer: int):
    """The share's raw serialised records of one epoch, in the epoch's order."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    instructions = self.file_instructions
    if shuffle_buffer > 1:
      rng = np.random.default_rng([seed & (2**64 - 1), epoch])
      instructions = [instructions[i] for i in rng.permutation(len(instructions))]
    paths, skips, takes, _ = (list(column) for column in zip(*instructions))
    files = tf.data.Dataset.from_tensor_slices((paths, tf.constant(skips, tf.int64),
                                                tf.constant(takes, tf.int64)))
    ds = files.interleave(
        lambda path, skip, take: tf.data.TFRecordDataset(path).skip(skip).take(take),
        cycle_length=min(4, len(paths)), block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
    if shuffle_buffer > 1:
      epoch_seed = (seed * _EPOCH_SEED_STRIDE + epoch) % (2**31 - 1)
      ds = ds.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    return ds

  def _tf_batches(self, local_batch, seed, start_step, num_steps, shuffle_buffer, codecs):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    position = start_step * local_batch
    first_epoch, offset = divmod(position, self.num_examples)
    last_epoch = math.ceil((position + num_steps * local_batch) / self.num_examples)
    ds = self._tf_epoch(seed, first_epoch, shuffle_buffer).skip(offset)  # Raw: not decoded.
    for epoch in range(first_epoch + 1, max(last_epoch, first_epoch + 1)):
      ds = ds.concatenate(self._tf_epoch(seed, epoch, shuffle_buffer))
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
          value = tf.reshape(tf.io.decode_raw(value, tf.as_dtype(c.dtype)), (-1,) + c.shape)
        elif c.kind != _TEXT and value.dtype != tf.as_dtype(c.dtype):
          value = tf.cast(value, c.dtype)
        out[c.name] = value
      return out

    ds = ds.batch(local_batch, drop_remainder=True).take(num_steps)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """Assembles per-process batches into global arrays split along the batch axis."""
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local_batch.items()}
