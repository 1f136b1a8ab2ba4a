"""Reads Earth Engine TFRecord patch exports into georeferenced patches.

An image exported by Earth Engine as ``TF_RECORD_IMAGE`` (Earth Engine's TFRecord patch export)
is a set of shards ``<prefix>-00000.tfrecord.gz``, ``<prefix>-00001...`` holding
one ``tf.train.Example`` per patch, plus a sidecar ``<prefix>-mixer.json`` (the "mixer") that says
where the patches lie:

  * every band is a float feature named like the band, a row-major list of H * W values;
  * patches come in row-major order over the export region, across the shards in shard order:
    patch ``i`` sits at ``row, col = divmod(i, patchesPerRow)``;
  * the mixer holds the CRS, the affine transform of the region's top-left pixel, the patch size
    ``[w, h]``, ``patchesPerRow`` and ``totalPatches``;
  * with ``kernelSize`` k every patch carries ``k // 2`` extra pixels on each side. The mixer does
    not record k, so the reader must be told it.

:func:`read_patches` turns such an export into :class:`Patch` objects (band stack, row, column,
affine transform of the first pixel, CRS), with the export's fill value replaced by NaN, the
project's no-data marker (``schema.InputContract.nodata``). It reads through ``tf.data`` so
decompression and parsing run in TensorFlow's thread pool, and checks the export as it goes: a
damaged shard, a missing or misshapen band, or a patch count that disagrees with the mixer raises
an :class:`ExportError` naming the file and record, because a silently skipped record would shift
every later patch to the wrong place on the map.

Paths are local files: copy an export out of Cloud Storage or Drive first.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import zlib
from typing import Any, Iterator, Mapping, Sequence

import affine
import numpy as np

MIXER_SUFFIX = '-mixer.json'
COMPRESSIONS = ('auto', 'GZIP', '')


class ExportError(ValueError):
  """An Earth Engine export whose files do not hold what the mixer or the caller says."""


# --- Mixer -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mixer:
  """The georeferencing of an export: what ``<prefix>-mixer.json`` says.

  Attributes:
    crs: The export's CRS as Earth Engine wrote it (e.g. 'EPSG:32633'; a WKT string for
      projections without a code).
    transform: Affine transform of the region's top-left pixel (pixel -> CRS coordinates).
    patch_width: Patch width in pixels, without the kernel margin.
    patch_height: Patch height in pixels, without the kernel margin.
    patches_per_row: Number of patches in one row of the region.
    total_patches: Number of patches in the export.
  """
  crs: str
  transform: affine.Affine
  patch_width: int
  patch_height: int
  patches_per_row: int
  total_patches: int

  @property
  def num_rows(self) -> int:
    """Number of patch rows (the last one may be partial in principle)."""
    return -(-self.total_patches // self.patches_per_row)

  def position(self, index: int) -> tuple[int, int]:
    """(row, col) of patch ``index`` in the region's patch grid."""
    if not 0 <= index < self.total_patches:
      raise IndexError(f'patch index {index} outside 0..{self.total_patches - 1}')
    return divmod(index, self.patches_per_row)

  def patch_transform(self, index: int, margin: int = 0) -> affine.Affine:
    """Affine transform of the top-left pixel of patch ``index``.

    Args:
      index: Patch index (row-major over the region).
      margin: Pixels of kernel margin kept around the patch; the transform then starts that many
        pixels above and left of the patch proper.

    Returns:
      The region's transform moved to the patch's first pixel. Composing with a pixel
      translation (rather than adding to c and f) keeps rotated or sheared grids right.
    """
    row, col = self.position(index)
    return self.transform @ affine.Affine.translation(col * self.patch_width - margin,
                                                      row * self.patch_height - margin)


def mixer_path(prefix: str | os.PathLike) -> str:
  """The mixer file of an export: ``<prefix>-mixer.json``."""
  return os.fspath(prefix) + MIXER_SUFFIX


def read_mixer(path: str | os.PathLike) -> Mixer:
  """Reads and checks a ``<prefix>-mixer.json`` file.

  Args:
    path: The mixer file.

  Returns:
    The :class:`Mixer`.

  Raises:
    FileNotFoundError: If the file does not exist.
    ExportError: Naming the file, for bad JSON, a missing key or a value of the wrong kind.
  """
  path = os.fspath(path)
  with open(path, encoding='utf-8') as f:
    text = f.read()
  try:
    values = json.loads(text)
  except json.JSONDecodeError as err:
    raise ExportError(f'{path}: not valid JSON ({err})') from None
  if not isinstance(values, dict):
    raise ExportError(f'{path}: expected a JSON object, got {type(values).__name__}')

  projection = _mixer_value(values, ('projection',), path, dict)
  # Earth Engine writes "crs" for projections with a code and "wkt" for the others.
  if 'crs' in projection:
    crs = _mixer_value(values, ('projection', 'crs'), path, str)
  elif 'wkt' in projection:
    crs = _mixer_value(values, ('projection', 'wkt'), path, str)
  else:
    raise ExportError(f"{path}: missing key 'projection.crs' (nor is there a 'projection.wkt')")
  if not crs.strip():
    raise ExportError(f'{path}: empty CRS in projection')

  matrix = _mixer_value(values, ('projection', 'affine', 'doubleMatrix'), path, list)
  if len(matrix) != 6 or not all(_is_finite_number(v) for v in matrix):
    raise ExportError(f'{path}: projection.affine.doubleMatrix must be 6 finite numbers '
                      f'[a, b, c, d, e, f], got {matrix!r}')
  transform = affine.Affine(*(float(v) for v in matrix))
  if transform.determinant == 0:
    raise ExportError(f'{path}: projection.affine.doubleMatrix {matrix!r} is singular')

  dims = _mixer_value(values, ('patchDimensions',), path, list)
  if len(dims) != 2 or not all(_is_int(v) and v > 0 for v in dims):
    raise ExportError(f'{path}: patchDimensions must be two positive integers [width, height], '
                      f'got {dims!r}')
  per_row = _mixer_value(values, ('patchesPerRow',), path, int)
  total = _mixer_value(values, ('totalPatches',), path, int)
  if per_row < 1:
    raise ExportError(f'{path}: patchesPerRow must be >= 1, got {per_row}')
  if total < 0:
    raise ExportError(f'{path}: totalPatches must be >= 0, got {total}')
  return Mixer(crs=crs, transform=transform, patch_width=int(dims[0]), patch_height=int(dims[1]),
               patches_per_row=int(per_row), total_patches=int(total))


# --- Shards ----------------------------------------------------------------------------------


def find_export_files(prefix: str | os.PathLike) -> list[str]:
  """The shards of an export, in patch order.

  Shards are ``<prefix>-NNNNN.tfrecord.gz`` or ``<prefix>-NNNNN.tfrecord``. They are ordered by
  their number, not by name, and must be numbered 0, 1, ... without gaps: patches are counted
  across shards, so a missing shard would move every later patch.

  Args:
    prefix: Path prefix of the export (directory plus file-name prefix).

  Returns:
    Shard paths, sorted by shard number.

  Raises:
    FileNotFoundError: If the directory or any shard is missing.
    ExportError: If a shard number appears twice (compressed and not) or numbers have gaps.
  """
  prefix = os.fspath(prefix)
  directory, base = os.path.split(prefix)
  directory = directory or '.'
  if not base:
    raise ValueError(f'export prefix {prefix!r} has no file-name part')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory}: no such directory (export prefix {prefix})')
  # Matched against listdir() rather than globbed: a prefix may hold glob characters ('[').
  pattern = re.compile(re.escape(base) + r'-(\d+)\.tfrecord(\.gz)?')
  shards = {}
  for name in os.listdir(directory):
    match = pattern.fullmatch(name)
    if not match:
      continue
    number = int(match.group(1))
    if number in shards:
      raise ExportError(f'{prefix}: shard {number} exists twice ({os.path.basename(shards[number])}'
                        f' and {name}); keep one')
    shards[number] = os.path.join(directory, name)
  if not shards:
    raise FileNotFoundError(f'{prefix}: no export shards {base}-NNNNN.tfrecord[.gz] in '
                            f'{directory}')
  missing = sorted(set(range(max(shards) + 1)) - set(shards))
  if missing:
    raise ExportError(f'{prefix}: shard(s) {missing[:10]} missing of 0..{max(shards)}; patches '
                      'are counted across shards, so the later ones cannot be placed')
  return [shards[number] for number in sorted(shards)]


# --- Patches ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Patch:
  """One georeferenced patch of an export.

  Attributes:
    index: Patch index in the export (row-major over the region, counted across shards).
    row: Patch row in the region's patch grid.
    col: Patch column.
    data: (H, W, bands) float32, bands in the order asked for; NaN where the source held the
      no-data sentinel. H, W are the mixer's patch size, plus twice the kernel margin when it is
      kept.
    transform: Affine transform of ``data[0, 0]``.
    crs: The export's CRS.
    band_names: Output name of each channel of ``data``.
  """
  index: int
  row: int
  col: int
  data: np.ndarray
  transform: affine.Affine
  crs: str
  band_names: tuple[str, ...] = ()


def read_patches(prefix: str | os.PathLike,
                 band_names: Mapping[str, str] | Sequence[str],
                 kernel_size: int = 1,
                 nodata: float | None = 0.0,
                 compression: str = 'auto',
                 keep_margin: bool = False) -> Iterator[Patch]:
  """Reads every patch of an Earth Engine TFRecord export, in export order.

  The call itself reads the mixer, finds the shards and checks the arguments, so those errors
  come at once; the records are read lazily as the iterator is consumed. A damaged record raises
  when it is reached, after the patches before it have been yielded; a shortfall against the
  mixer's ``totalPatches`` raises after the last patch.

  Args:
    prefix: Path prefix of the export: shards are ``<prefix>-NNNNN.tfrecord[.gz]``, the mixer
      ``<prefix>-mixer.json``.
    band_names: Feature names to read and the output band names, in output channel order: a
      mapping {feature name in the export: output name}, or a sequence of feature names kept
      as they are. Features not named are ignored.
    kernel_size: The export's ``kernelSize``. Each record then holds ``kernel_size // 2`` extra
      pixels on every side.
    nodata: The fill value the export used for masked pixels (its ``defaultValue``; take it from
      config), replaced by NaN. It is compared in float32, as Earth Engine stores it. None: the
      export has no sentinel and no value is replaced.
    compression: 'GZIP', '' (uncompressed) or 'auto' (GZIP for files ending in '.gz').
    keep_margin: Keep the kernel margin: ``data`` is then (H + 2m, W + 2m, bands) and
      ``transform`` is that of the margin's first pixel. By default the margin is cut off, so
      patches tile the region without overlap.

  Returns:
    An iterator of :class:`Patch`, in patch-index order.

  Raises:
    FileNotFoundError: If the mixer (with the reason Earth Engine may not have written one) or
      the shards are missing.
    ExportError: For a bad mixer or shard set; while iterating, naming the file and record, for a
      truncated or corrupt record, a record that is not a tf.train.Example, a missing band, a
      band with the wrong number of values, and more or fewer records than ``totalPatches``.
    ValueError: For bad arguments.
  """
  prefix = os.fspath(prefix)
  sources, outputs = _band_mapping(band_names)
  if not _is_int(kernel_size) or kernel_size < 1:
    raise ValueError(f'kernel_size must be an integer >= 1, got {kernel_size!r}')
  if nodata is not None and not _is_number(nodata):
    raise ValueError(f'nodata must be a number or None, got {nodata!r}')
  if compression not in COMPRESSIONS:
    raise ValueError(f'compression must be one of {COMPRESSIONS}, got {compression!r}')

  path = mixer_path(prefix)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path}: no mixer file, so the patches of export {prefix} cannot be placed: their grid, '
        'CRS and transform are only in the mixer. Earth Engine writes none when maskedThreshold '
        'is not 1, because it then drops patches and their order no longer says where they lie. '
        'Re-export with maskedThreshold 1 (the default) and a no-data sentinel as defaultValue.')
  mixer = read_mixer(path)
  files = find_export_files(prefix)
  return _iter_patches(prefix, files, mixer, path, list(sources), outputs, int(kernel_size) // 2,
                       nodata, compression, bool(keep_margin))


def _iter_patches(prefix: str, files: list[str], mixer: Mixer, mixer_file: str,
                  sources: list[str], outputs: tuple[str, ...], margin: int,
                  nodata: float | None, compression: str, keep_margin: bool) -> Iterator[Patch]:
  """The generator behind :func:`read_patches`."""
  parse = _parse_fn(sources, mixer.patch_height + 2 * margin, mixer.patch_width + 2 * margin,
                    margin if not keep_margin else 0, nodata)
  index = 0
  for file in files:
    index = yield from _iter_file(file, mixer, mixer_file, parse, index, sources, outputs,
                                  margin, keep_margin, compression)
  if index < mixer.total_patches:
    raise ExportError(f'{prefix}: the {len(files)} shard(s) hold {index} patches but the mixer '
                      f'{mixer_file} says totalPatches = {mixer.total_patches}: a shard is '
                      'missing or incomplete')


def read_shard(file: str | os.PathLike, mixer: Mixer, first_index: int,
               band_names: Mapping[str, str] | Sequence[str], kernel_size: int = 1,
               nodata: float | None = 0.0, compression: str = 'auto',
               records: Sequence[int] | None = None) -> Iterator[Patch]:
  """The patches of ONE shard whose first record is patch ``first_index`` (see
  :func:`count_records` for the counts that give it), optionally only some records.

  For parallel ingestion: each shard is read by its own job. Arguments as :func:`read_patches`;
  ``records`` lists the record indices (within the shard) to decode, the others are read but not
  parsed. Without ``records`` a GZIP shard is also checked for completeness.
  """
  file = os.fspath(file)
  sources, outputs = _band_mapping(band_names)
  margin = int(kernel_size) // 2
  parse = _parse_fn(list(sources), mixer.patch_height + 2 * margin,
                    mixer.patch_width + 2 * margin, margin, nodata)
  return _iter_file(file, mixer, file, parse, int(first_index), list(sources), outputs, margin,
                    False, compression, records)


def count_records(file: str | os.PathLike, compression: str = 'auto') -> int:
  """Number of records in one shard, read (decompressed) but not parsed.

  Raises:
    ExportError: Naming the file and the record, for a truncated or corrupt shard (including a
      GZIP stream cut at a record boundary, see :func:`_check_gzip_complete`).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  file = os.fspath(file)
  file_compression = _file_compression(file, compression)
  lengths = tf.data.TFRecordDataset(file, compression_type=file_compression).map(
      lambda record: tf.strings.length(record, unit='BYTE')).batch(1024)
  count = stream_bytes = 0
  try:
    for batch in lengths:
      count += int(batch.shape[0])
      stream_bytes += int(tf.reduce_sum(batch)) + 16 * int(batch.shape[0])
  except tf.errors.DataLossError as err:
    kind = 'a GZIP' if file_compression == 'GZIP' else 'an uncompressed'
    raise ExportError(f'{file}: after record {count} the file could not be read as {kind} '
                      f'TFRecord file (truncated, corrupt, or compressed otherwise): '
                      f'{_tf_message(err)}') from err
  except tf.errors.OpError as err:
    raise ExportError(f'{file}: could not be read ({_tf_message(err)})') from err
  if file_compression == 'GZIP':
    _check_gzip_complete(file, count, stream_bytes)
  return count


def check_bands(file: str | os.PathLike, mixer: Mixer, first_index: int,
                band_names: Mapping[str, str] | Sequence[str], kernel_size: int = 1,
                compression: str = 'auto') -> None:
  """Checks the first record of one shard for every band, each with a patch's number of values.

  For planning: a band name or kernel size that does not match the export then stops a build
  before anything is written, rather than at the first record read while writing. Arguments
  as :func:`read_shard`. An empty shard passes.

  Raises:
    ExportError: Naming the file and the record: a missing band (with the bands the record
      has), a band of another type or size (with the kernel size its size fits, if one does),
      or a record that cannot be read or is not a tf.train.Example.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  file = os.fspath(file)
  sources, _ = _band_mapping(band_names)
  margin = int(kernel_size) // 2
  where = f'{file}: record 0 (patch {first_index})'
  try:
    raw = next(iter(tf.data.TFRecordDataset(
        file, compression_type=_file_compression(file, compression)).take(1)), None)
  except tf.errors.OpError as err:
    raise ExportError(f'{where} could not be read ({_tf_message(err)})') from err
  if raw is None:
    return
  try:
    example = tf.train.Example.FromString(raw.numpy())
  except Exception as err:  # pylint: disable=broad-except
    raise ExportError(f'{where}: not a valid tf.train.Example ({err})') from None
  problem = _band_problem(example, list(sources), mixer.patch_height + 2 * margin,
                          mixer.patch_width + 2 * margin, margin)
  if problem:
    raise ExportError(f'{where}: {problem}')


def _iter_file(file: str, mixer: Mixer, mixer_file: str, parse, first_index: int,
               sources: list[str], outputs: tuple[str, ...], margin: int, keep_margin: bool,
               compression: str, records: Sequence[int] | None = None):
  """Yields the patches of one shard; returns the patch index after its last record."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  file_compression = _file_compression(file, compression)
  dataset = tf.data.TFRecordDataset(file, compression_type=file_compression).enumerate()
  if records is not None:
    wanted = tf.constant(sorted(set(int(r) for r in records)), tf.int64)
    dataset = dataset.filter(lambda i, _: tf.reduce_any(tf.equal(i, wanted)))
  dataset = dataset.map(lambda i, serialized: (i, parse(serialized)),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  iterator = iter(dataset.prefetch(2))
  record = 0  # index of the next record (of the whole shard) expected
  # Bytes of the decompressed stream consumed so far: each record is its payload plus 16 bytes
  # of framing (length, length CRC, payload CRC). Checked against the gzip trailer below.
  stream_bytes = 0
  while True:
    where = f'{file}: record {record} (patch {first_index + record})'
    try:
      position, (data, num_bytes) = next(iterator)
    except StopIteration:
      break
    except tf.errors.DataLossError as err:
      kind = 'a GZIP' if file_compression == 'GZIP' else 'an uncompressed'
      raise ExportError(f'{where} could not be read as {kind} TFRecord file (truncated, '
                        f'corrupt, or compressed otherwise): {_tf_message(err)}') from err
    except (tf.errors.InvalidArgumentError, UnicodeDecodeError) as err:
      # UnicodeDecodeError: TensorFlow quotes the bad record in its message and then fails to
      # decode that message when the record is binary garbage. The failing record is the next
      # wanted one, which is `record` only when every record is read.
      at = record if records is None else None
      raise ExportError(_diagnose(where if at is not None else f'{file}: a selected record',
                                  file, file_compression, at if at is not None else record,
                                  sources, mixer.patch_height + 2 * margin,
                                  mixer.patch_width + 2 * margin, margin, err)) from err
    except tf.errors.OpError as err:
      raise ExportError(f'{where} could not be read ({_tf_message(err)})') from err
    record = int(position)
    index = first_index + record
    if index >= mixer.total_patches:
      raise ExportError(f'{file}: record {record} (patch {index}): more records than the '
                        f'{mixer.total_patches} patches (totalPatches) of the mixer {mixer_file}')
    row, col = divmod(index, mixer.patches_per_row)
    yield Patch(index=index, row=row, col=col, data=data.numpy(),
                transform=mixer.patch_transform(index, margin if keep_margin else 0),
                crs=mixer.crs, band_names=outputs)
    stream_bytes += int(num_bytes) + 16
    record += 1
  if records is None and file_compression == 'GZIP':
    _check_gzip_complete(file, record, stream_bytes)
  return first_index + record


def _parse_fn(sources: list[str], height: int, width: int, crop: int, nodata: float | None):
  """A tf.data map function: serialised Example -> ((h, w, bands) float32, record size)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  spec = {name: tf.io.FixedLenFeature([height * width], tf.float32) for name in sources}
  # Earth Engine stores float32, so the sentinel must be compared as float32 (-99.9 in float64
  # never equals the stored float32 -99.9).
  sentinel = None if nodata is None else np.float32(nodata)

  def parse(serialized):
    features = tf.io.parse_single_example(serialized, spec)
    data = tf.stack([tf.reshape(features[name], [height, width]) for name in sources], axis=-1)
    if crop:
      data = data[crop:height - crop, crop:width - crop]
    if sentinel is not None and not np.isnan(sentinel):
      data = tf.where(tf.equal(data, sentinel), tf.constant(np.nan, tf.float32), data)
    return data, tf.strings.length(serialized, unit='BYTE')

  return parse


def _check_gzip_complete(file: str, num_records: int, stream_bytes: int) -> None:
  """Raises if a GZIP shard was cut short, which TensorFlow may read as a shorter, valid file.

  TensorFlow reports a record cut in the middle, but a gzip stream cut before its first full
  block or at a record boundary just ends early: the shard then silently loses patches and every
  later patch is misplaced. The last 4 bytes of a gzip file (ISIZE) are the uncompressed size
  mod 2^32, so comparing them with the bytes read is a free check. A mismatch could also come from a
  multi-member gzip file, so it is confirmed by decompressing the file once (only on mismatch).
  """
  size = os.path.getsize(file)
  if size >= 18:  # a 10-byte gzip header and the 8-byte trailer at least
    with open(file, 'rb') as f:
      f.seek(-4, os.SEEK_END)
      trailer = int.from_bytes(f.read(4), 'little')
    if trailer == stream_bytes % 2**32:
      return
  try:
    total = 0
    with gzip.open(file, 'rb') as f:
      while chunk := f.read(1 << 24):
        total += len(chunk)
  except (EOFError, OSError, zlib.error) as err:
    raise ExportError(f'{file}: truncated or corrupt gzip file ({err}); {num_records} record(s) '
                      'could be read before it ends') from None
  if total != stream_bytes:
    raise ExportError(f'{file}: holds {total} bytes uncompressed but TensorFlow read '
                      f'{stream_bytes} as {num_records} record(s)')


def _diagnose(where: str, file: str, compression: str, record: int, sources: list[str],
              height: int, width: int, margin: int, err: Exception) -> str:
  """Says in words why record ``record`` of ``file`` did not parse."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    records = tf.data.TFRecordDataset(file, compression_type=compression)
    raw = next(iter(records.skip(record).take(1))).numpy()
    example = tf.train.Example.FromString(raw)
  except Exception:  # pylint: disable=broad-except
    # The raw bytes are not an Example (or cannot be reread): TensorFlow's message is the best.
    return f'{where}: not a valid tf.train.Example ({_tf_message(err)})'
  problem = _band_problem(example, sources, height, width, margin)
  if problem is None:
    problem = f'could not be parsed ({_tf_message(err)})'
  return f'{where}: {problem}'


def _band_problem(example, sources: list[str], height: int, width: int,
                  margin: int) -> str | None:
  """What is wrong with the bands of a parsed record, in words, or None."""
  features = example.features.feature
  expected = height * width
  for name in sources:
    if name not in features:
      return f'missing band feature {name!r}; the record has {sorted(features)}'
    kind = features[name].WhichOneof('kind')
    if kind != 'float_list':
      return f'band {name!r} is a {kind}, expected a float_list'
    count = len(features[name].float_list.value)
    if count != expected:
      return (f'band {name!r} has {count} values, expected {expected} = {height} x {width} '
              f'(patch size plus a margin of {margin} on each side)'
              f'{_kernel_hint(count, height - 2 * margin, width - 2 * margin)}')
  return None


def _kernel_hint(count: int, height: int, width: int) -> str:
  """Names the kernel size that would explain ``count`` values per band, if one does."""
  half = 0
  while (height + 2 * half) * (width + 2 * half) < count:
    half += 1
  if (height + 2 * half) * (width + 2 * half) == count:
    return f'; that is the size for kernel_size {2 * half + 1}'
  return ''


# --- Helpers ---------------------------------------------------------------------------------


def _band_mapping(band_names) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(feature names, output names) in output order, or a ValueError saying what is wrong."""
  if isinstance(band_names, Mapping):
    pairs = list(band_names.items())
  elif isinstance(band_names, (str, bytes)):
    # A bare string is a Sequence too, but of characters: surely a mistake for ['VV'].
    raise ValueError(f'band_names must be a sequence or mapping of names, not the string '
                     f'{band_names!r}')
  elif isinstance(band_names, Sequence):
    pairs = [(name, name) for name in band_names]
  else:
    raise ValueError(f'band_names must be a sequence or mapping of names, got {band_names!r}')
  if not pairs:
    raise ValueError('band_names is empty')
  for source, output in pairs:
    if not isinstance(source, str) or not source or not isinstance(output, str) or not output:
      raise ValueError(f'band names must be non-empty strings, got {source!r}: {output!r}')
  sources = tuple(source for source, _ in pairs)
  outputs = tuple(output for _, output in pairs)
  for label, names in (('feature', sources), ('output', outputs)):
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
      raise ValueError(f'band_names repeats {label} name(s) {repeated}')
  return sources, outputs


def _file_compression(file: str, compression: str) -> str:
  if compression == 'auto':
    return 'GZIP' if file.endswith('.gz') else ''
  return compression


def _tf_message(err: Exception) -> str:
  """The useful first line of a TensorFlow error, without the function-node and op noise."""
  message = getattr(err, 'message', None) or str(err)
  message = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', message)
  message = message.split(' [Op:')[0].split('\n')[0].strip()
  return message


def _mixer_value(values: dict[str, Any], keys: tuple[str, ...], path: str, kind: type):
  """``values[keys[0]][keys[1]]...`` checked to be of ``kind``, or an ExportError naming it."""
  value = values
  for depth, key in enumerate(keys):
    if not isinstance(value, dict) or key not in value:
      raise ExportError(f"{path}: missing key '{'.'.join(keys[:depth + 1])}'")
    value = value[key]
  ok = _is_int(value) if kind is int else isinstance(value, kind)
  if not ok:
    raise ExportError(f"{path}: '{'.'.join(keys)}' must be a JSON {_JSON_KINDS[kind]}, got "
                      f'{value!r}')
  return int(value) if kind is int else value


_JSON_KINDS = {dict: 'object', list: 'array', str: 'string', int: 'integer'}


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
  return _is_number(value) and math.isfinite(value)


def _is_int(value) -> bool:
  """True for integers, and for floats with an integral value (JSON writers may emit 256.0)."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return True
  return isinstance(value, (float, np.floating)) and math.isfinite(value) and value == int(value)
