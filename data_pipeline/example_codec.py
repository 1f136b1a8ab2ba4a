"""The ``tf.train.Example`` wire format, parsed from a file straight into batch arrays.

:func:`read_record` walks one serialised record's protobuf structure with small reads, parses
only the requested features (the others, known or not, are skipped unread) and copies the bytes
of raw tensors (the image, float16 or uint8) from the file into their row of the batch array
(locally one copy, the one a plain ``read`` of the file does too). Files are read through a
``data_pipeline.record_files`` source, or the record is given in memory. A :class:`Codec` (from
:func:`codec_for`) says what a requested feature is stored as and what array it becomes; a
record that does not match is a ``tfrecord_index.BadRecordError`` naming it.
:func:`fill_missing` fills a bad record's row with missing values (0, the no-data code, in a
uint8 image).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Iterator, Sequence

import numpy as np

from data_pipeline import dataset_info
from data_pipeline import schema
from data_pipeline import tfrecord_index

# Bytes read at once while walking a record's protobuf structure: every feature but the big
# tensors of a 448 px tile fits in the first read, the rest costs one more read per big tensor.
_CHUNK = 1 << 16

# How a feature is stored in a tf.train.Example and returned, from its TFDS feature spec.
RAW = 'raw'  # One bytes value holding a tensor's raw little-endian bytes (Encoding.BYTES).
TEXT = 'text'  # One bytes value, returned as a bytes object (tfds.features.Text).
FLOAT = 'float'  # A float_list of the tensor's values.
INT = 'int'  # An int64_list of the tensor's values.
_LIST_FIELD = {RAW: 1, TEXT: 1, FLOAT: 2, INT: 3}  # tf.train.Feature's oneof field numbers.


@dataclasses.dataclass(frozen=True)
class Codec:
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


def codec_for(name: str, feature) -> Codec:
  """The codec of a feature (a ``dataset_info.Feature``, or a TFDS FeatureConnector); only flat,
  statically shaped features are supported."""
  if not isinstance(feature, dataset_info.Feature):
    feature = _from_tfds(feature)
  shape = feature.shape
  if feature.kind == dataset_info.CLASS_LABEL:
    return Codec(name, INT, (), np.dtype(np.int64))
  if feature.kind == dataset_info.TEXT:
    return Codec(name, TEXT, (), np.dtype(object))
  if feature.kind == dataset_info.TENSOR and all(isinstance(d, int) for d in shape):
    dtype = np.dtype(feature.dtype)
    if feature.encoding == 'bytes' and dtype != object:
      return Codec(name, RAW, shape, dtype)
    if feature.encoding == 'none':
      if dtype == object and shape == ():
        return Codec(name, TEXT, (), dtype)
      if np.issubdtype(dtype, np.floating):
        return Codec(name, FLOAT, shape, dtype)
      if (np.issubdtype(dtype, np.integer) or dtype == np.bool_) and dtype != np.uint64:
        return Codec(name, INT, shape, dtype)
  raise NotImplementedError(f'feature {name!r} ({feature.connector or feature}) cannot be read '
                            'by data_pipeline.input: only flat, statically shaped Tensor '
                            '(no or bytes encoding), ClassLabel and Text features are')


def _from_tfds(feature) -> dataset_info.Feature:
  """A TFDS FeatureConnector as the ``dataset_info.Feature`` its features.json entry gives."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  connector = type(feature).__name__
  if isinstance(feature, tfds.features.ClassLabel):
    return dataset_info.Feature(dataset_info.CLASS_LABEL, connector=connector)
  if isinstance(feature, tfds.features.Text):
    return dataset_info.Feature(dataset_info.TEXT, connector=connector)
  if isinstance(feature, tfds.features.Tensor):
    encoding = getattr(feature, '_encoding', tfds.features.Encoding.NONE)
    return dataset_info.Feature(dataset_info.TENSOR, tuple(feature.shape),
                                np.dtype(feature.np_dtype).name, encoding.value,
                                connector=connector)
  return dataset_info.Feature(dataset_info.OTHER, connector=repr(feature))


class _Record:
  """One serialised tf.train.Example inside an open file, read on demand in small chunks."""

  __slots__ = ('source', 'start', 'length', 'where', '_chunk', '_chunk_pos')

  def __init__(self, source, start: int, length: int, where: str, data: bytes | None = None):
    """``source`` reads the file (``pread(n, offset)``, ``readinto(out, offset)``, as
    ``data_pipeline.record_files`` sources do); ``where`` starts every error message; ``data``,
    if given, is the whole record in memory, any bytes-like object (e.g. a memoryview into a
    larger read; then ``source`` is not read)."""
    self.source, self.start, self.length, self.where = source, start, length, where
    self._chunk, self._chunk_pos = (b'', 0) if data is None else (data, 0)

  def corrupt(self, what: str) -> tfrecord_index.BadRecordError:
    return tfrecord_index.BadRecordError(f'{self.where}: {what}')

  def _span(self, pos: int, n: int) -> int:
    """Makes bytes [pos, pos + n) of the record available in the chunk; returns their index."""
    if pos < 0 or n < 0 or pos + n > self.length:
      raise self.corrupt(f'malformed tf.train.Example: bytes {pos}..{pos + n} past its end '
                         f'({self.length} bytes)')
    i = pos - self._chunk_pos
    if i < 0 or i + n > len(self._chunk):
      self._chunk = self.source.pread(min(max(n, _CHUNK), self.length - pos), self.start + pos)
      self._chunk_pos, i = pos, 0
      if len(self._chunk) < n:
        raise self.corrupt('the file ends inside the record')
    return i

  def read(self, pos: int, n: int) -> bytes:
    i = self._span(pos, n)
    # bytes() copies only a memoryview's slice (small: keys, numbers, texts); a bytes slice is
    # returned as it is.
    return bytes(self._chunk[i:i + n])

  def readinto(self, pos: int, out: memoryview) -> None:
    """Copies bytes at ``pos`` into ``out``: what the chunk holds from it, the rest from the
    file in one ``readinto`` (so reads go forward: a stream never seeks back)."""
    if pos < 0 or pos + len(out) > self.length:
      raise self.corrupt(f'malformed tf.train.Example: bytes {pos}..{pos + len(out)} past its '
                         'end')
    i = pos - self._chunk_pos
    if 0 <= i < len(self._chunk):
      n = min(len(out), len(self._chunk) - i)
      # numpy copies without the GIL (a memoryview assignment holds it): records parsed from
      # memory (the host cache) copy their tensors on all reader threads at once.
      np.copyto(np.asarray(out[:n]), np.frombuffer(self._chunk, np.uint8, n, i))
      out, pos = out[n:], pos + n
    if len(out) and self.source.readinto(out, self.start + pos) < len(out):
      raise self.corrupt('the file ends inside the record')

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

  def features(self, wanted: dict[bytes, Codec]) -> dict[bytes, tuple[int, int]]:
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

  def values(self, codec: Codec, pos: int, size: int) -> list:
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
      if codec.kind in (RAW, TEXT) and wire == 2:
        values.append((at, n))
      elif codec.kind == FLOAT and wire == 2:  # Packed (what every writer emits).
        values.extend(np.frombuffer(self.read(at, n), '<f4').tolist())
      elif codec.kind == FLOAT and wire == 5:
        values.append(struct.unpack('<f', self.read(at, 4))[0])
      elif codec.kind == INT and wire == 2:  # Packed.
        end = at + n
        while at < end:
          value, at = self.varint(at, end)
          values.append(value)
      elif codec.kind == INT and wire == 0:
        values.append(at)
      else:
        raise self.corrupt(f'malformed tf.train.Example: feature {codec.name!r}')
    count = 1 if codec.kind in (RAW, TEXT) else codec.size
    if len(values) != count:
      raise self.corrupt(f'feature {codec.name!r} has {len(values)} values, expected {count}')
    if codec.kind == INT:  # int64 travels as a 64-bit two's complement varint.
      values = [v - (1 << 64) if v >= 1 << 63 else v for v in values]
    return values


def _size_problem(codec: Codec, size: int) -> str:
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


def read_record(source, start: int, length: int, where: str,
                codecs: dict[bytes, Codec], out: dict[str, np.ndarray],
                raw_out: dict[str, np.ndarray], slot: int, data: bytes | None = None) -> None:
  """Parses the requested features of one record into row ``slot`` of the batch arrays.

  The record is read from ``source`` (a ``data_pipeline.record_files`` source: ``pread`` and
  ``readinto``) at byte ``start``, or from ``data`` (the whole record) if given.
  Anything wrong with it is a BadRecordError whose message starts with ``where``.
  """
  record = _Record(source, start, length, where, data)
  try:
    found = record.features(codecs)
    for key, codec in codecs.items():
      if key not in found:
        raise record.corrupt(f'no feature {codec.name!r}')
      values = record.values(codec, *found[key])
      if codec.kind == RAW:
        at, size = values[0]
        if size != codec.nbytes:
          raise record.corrupt(_size_problem(codec, size))
        record.readinto(at, memoryview(raw_out[codec.name][slot]))
      elif codec.kind == TEXT:
        out[codec.name][slot] = record.read(*values[0])
      elif codec.shape:
        out[codec.name][slot] = np.asarray(values).reshape(codec.shape)
      else:
        out[codec.name][slot] = values[0]
  except tfrecord_index.BadRecordError:
    raise
  except (ValueError, OverflowError, struct.error) as e:  # E.g. a packed float list of 7 bytes.
    raise record.corrupt(f'malformed tf.train.Example: {e}') from e


def fill_missing(codecs: Sequence[Codec], out: dict[str, np.ndarray], slot: int) -> None:
  """Row ``slot`` of the batch arrays set to "missing": NaN floats (NaN is the images' no-data
  value), the no-data class for WorldCover labels, 0 for other integer raw tensors, -1 for
  integer values (0 if unsigned, False if boolean), b'' for texts."""
  for c in codecs:
    if c.name == schema.WORLDCOVER:  # 0 is a class (tree cover); losses ignore IGNORE_INDEX.
      value = schema.IGNORE_INDEX
    elif c.kind == TEXT:
      value = b''
    elif np.issubdtype(c.dtype, np.floating):
      value = np.nan
    elif c.kind == RAW or c.dtype == np.bool_ or np.issubdtype(c.dtype, np.unsignedinteger):
      value = 0
    else:
      value = -1
    out[c.name][slot] = value
