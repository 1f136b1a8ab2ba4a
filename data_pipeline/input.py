"""Per-host input pipeline: a split of a dataset folder -> shuffled, batched numpy arrays.

:class:`HostDataset` is this process's share of a split: an even, disjoint share
(as ``tfds.even_splits`` over processes, remainder dropped, so every host has the same number of
batches per epoch). :meth:`HostDataset.batches` streams it as a deterministic function of
(seed, epoch): a run resumed at step ``s`` gets exactly the batches an uninterrupted run would
have had from step ``s`` on, without decoding the records before it. Only the requested features
are parsed, so records carrying features this module does not know (from a newer writer) read
fine.

Three readers give such a stream; ``HostDataset(reader=...)`` picks one, by default
``'local'`` for local folders and ``'url'`` for URLs (``gs://...``). These two give the same
batches for the same (seed, step): a run moves between a local disk and cloud storage, and
resumes exactly, in either direction. Their speeds are in bench/README.md.

* ``'local'`` and ``'url'``: one algorithm, two byte sources (``data_pipeline.record_files``).
  It scans the record headers once (``data_pipeline.tfrecord_index``; kept per process) and
  shuffles record *locations*: whole epochs (not a window) for no memory, and a resume costs
  no I/O. Reader threads parse each record into the batch arrays
  (``data_pipeline.example_codec``, ``array_pool``). ``'local'`` reads files of a local
  filesystem with ``os.pread``, parsing in place (only the requested features' bytes are
  read); ``'url'`` reads any filesystem TensorFlow knows through ``tf.io.gfile`` (it works on
  local paths too: that is how tests and benchmarks check it), parsing the same way, adjacent
  records of a batch through one open file, with more threads for URLs (remote reads mostly
  wait).
  Both check header CRCs; payload CRCs only with ``verify_checksums=True``, the first time the
  dataset reads each record (that first epoch reads slower, later ones do not).
  ``host_cache`` (``data_pipeline.host_cache``) keeps the records in memory after their first
  read when they fit, so later epochs read no storage; the batches stay the same.
* ``'tf'``: ``tf.data`` (``data_pipeline.tf_reader``), the URL reader before ``'url'``, kept
  only to resume runs started on a URL before, in their order (records shuffled in a window of
  ``shuffle_buffer``, another order than the others'); it checks the CRC of every record, is
  slower, and cannot skip bad records.

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
its global record index and its byte offset: a header failing its CRC or a truncated file, a
record whose features are malformed or have another size than the metadata's (e.g. another band
count), and with ``verify_checksums`` (tf.data: always) a payload failing its CRC. Without
``verify_checksums`` the local and URL readers do NOT see damage inside a raw tensor's bytes that
leaves the protobuf structure intact. ``max_bad_records=N > 0`` (not with tf.data) reads up to N bad
records, each counted once, as missing values (NaN floats and float16 images, 0 raw integers:
code 0, no-data, of uint8 images; -1 integers, b'' texts) flagged in ``batch[BAD_RECORD]``: records of a missing file, or after
damage in a truncated one, included, so the epoch layout and every good record's place and
content stay those of a clean read.

Images stay in their dataset's storage form on the host (float16 dB with NaN = no-data, or uint8
codes with 0 = no-data: ``data_pipeline.quantise``); ``mae_jax.preprocess`` decodes and
normalises them on the device. ``data_pipeline.device_batches`` turns per-host batches into global arrays.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
import os
import sys
import threading
from typing import Iterator, Sequence
import weakref

from absl import logging
import jax
import numpy as np

from data_pipeline import array_pool
from data_pipeline import dataset_info
from data_pipeline import example_codec
from data_pipeline import host_cache as host_cache_lib
from data_pipeline import record_files
from data_pipeline import schema
from data_pipeline import tf_reader
from data_pipeline import tfrecord_index
from data_pipeline import writer

# Reader threads of the local reader. Their work is mostly preads, which release the GIL: from
# the page cache a memory copy, from disk a wait, where more reads in flight keep the disk
# busier; bench/README.md has the measurements behind the count. The URL reader has its own
# (record_files.read_threads).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
_READ_THREADS = min(16, max(4, 2 * _CORES))
_READERS = ('auto', 'local', 'url', 'tf')
# The data order each reader gives, as checkpoints record it (data_shards.ShardedStream.layout):
# 'local' names the record-index order of both the local and the URL reader (the name it had
# when only local files had it, so older checkpoints resume).
_ORDER = {'local': 'local', 'url': 'local', 'tf': 'tf'}
# The URL reader reads the records of a batch that lie in one file at most _RUN_GAP bytes apart,
# spanning at most _RUN_BYTES (file order in evaluation passes, small selections), through one
# open file, in order: on cloud storage they share the requests of its buffer, and a remote
# request costs about as much time as transferring an MiB more.
_RUN_GAP = 1 << 20
_RUN_BYTES = 32 << 20

# Key of the boolean array eval_batches adds to every batch: True for real examples, False for
# the padding that fills the last batches.
EXAMPLE_MASK = 'example_mask'
# Key of the boolean array every batch gets when HostDataset(max_bad_records=N > 0): True where
# a bad record's slot was filled with missing values (see example_codec.fill_missing).
BAD_RECORD = 'bad_record'

# A record that cannot be read as the dataset metadata describes it (defined with the TFRecord
# framing, which raises it too); catch it from here.
BadRecordError = tfrecord_index.BadRecordError


def configure_tensorflow() -> None:
  """Keeps TensorFlow off the GPUs (it only reads files here) so JAX has all their memory; with
  TensorFlow not installed, there is nothing to do (local folders are read without it)."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  tf.config.set_visible_devices([], 'GPU')


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


def _runs(ranged: list[tuple[int, int, int, int]], locations: np.ndarray
          ) -> list[list[tuple[int, int, int, int]]]:
  """(file index, offset, slot, row) of records grouped into runs, each read in order through
  one open file.

  Records of one file at most _RUN_GAP apart share a run spanning at most _RUN_BYTES (a record
  and its 4-byte CRC, the next one's 12-byte header, ...).
  """
  runs, end = [], 0
  for item in sorted(ranged):
    file_index, offset, _, row = item
    item_end = offset + int(locations[row, 2]) + 4
    if (runs and runs[-1][0][0] == file_index and offset - end <= _RUN_GAP and
        item_end - runs[-1][0][1] <= _RUN_BYTES):
      runs[-1].append(item)
      end = max(end, item_end)
    else:
      runs.append([item])
      end = item_end
  return runs


class _RecordReads:
  """How one stream reads the record of a row into a batch slot.

  From the host cache if it has it; otherwise from its file, parsed in place (only the requested
  features' bytes, tensors straight into the batch arrays): locally with ``os.pread``, through
  a URL streamed from one open handle per run of records (see _runs). With
  ``verify_checksums``, a row's payload CRC is checked the first time it is read (``verified``);
  the cache keeps only records read whole (and checked). Each read returns
  ``{slot: BadRecordError}`` for the slots whose record is bad; other errors (an unreadable
  file) raise.
  """

  def __init__(self, files: record_files.LocalFiles | record_files.UrlFiles,
               locations: np.ndarray, paths: Sequence[str],
               wanted: dict[bytes, example_codec.Codec], verify: bool, verified: np.ndarray,
               cache: host_cache_lib.RecordCache | None):
    self.files, self.locations, self.paths, self.wanted = files, locations, paths, wanted
    self.verified = verified if verify else None
    # Local files are checked by TensorFlow's record reader when it is installed (it reads and
    # checks without the GIL); a remote record is read whole and google-crc32c checks it.
    self.verifier = tfrecord_index.Verifier(paths) if verify and not files.remote else None
    self.cache = cache

  def where(self, row: int) -> str:
    file_index, offset, _, in_file, index = (int(v) for v in self.locations[row])
    return f'{self.paths[file_index]}: record {in_file} (split record {index}, byte {offset - 12})'

  def cached(self, row: int) -> bool:
    return self.cache is not None and self.cache.get(row) is not None

  def _unverified(self, row: int) -> bool:
    return self.verified is not None and not self.verified[row]

  def _checked(self, source, row: int, where: str) -> memoryview:
    """The data of ``row``'s record, read whole with its CRC and checked."""
    file_index, offset, length = (int(v) for v in self.locations[row, :3])
    if self.verifier is not None:
      return memoryview(self.verifier.read(file_index, offset, length, where))
    data = memoryview(bytearray(length + 4))
    if source.readinto(data, offset) < length + 4:
      raise BadRecordError(f'{where}: the file ends inside the record; it changed since its '
                           'headers were scanned')
    tfrecord_index.check_crc(data[:length], bytes(data[length:]), where)
    return data[:length]

  def _record(self, source, slot: int, row: int, out, raw_out) -> None:
    """The record of ``row`` into ``slot``, from the cache or through ``source``."""
    offset, length = (int(v) for v in self.locations[row, 1:3])
    where = self.where(row)
    data = self.cache.get(row) if self.cache is not None else None
    if data is None:
      # Locations may come from an index (record_files.indexed), not a scan of the headers:
      # each record's header is checked as it is read (12 bytes before its data).
      tfrecord_index.check_header(source.pread(12, offset - 12), length, where)
      target = self.cache.claim(row) if self.cache is not None else None
      kept = False
      try:
        if self._unverified(row):
          data = self._checked(source, row, where)
          self.verified[row] = True
          if target is not None:
            np.copyto(target, np.frombuffer(data, np.uint8))
            kept = True
        elif target is not None:
          if source.readinto(memoryview(target), offset) < length:
            raise BadRecordError(f'{where}: the file ends inside the record; it changed since '
                                 'its headers were scanned')
          data, kept = memoryview(target), True
      finally:
        if target is not None:
          self.cache.done(row, kept)
    # Parsed from memory (data) or from the file (source).
    example_codec.read_record(source if data is None else None, offset, length, where,
                              self.wanted, out, raw_out, slot, data)

  def run(self, items: list[tuple[int, int, int, int]], out, raw_out
          ) -> dict[int, BadRecordError]:
    """The records of ``items`` (see _runs: one file, by offset) through one open source."""
    errors = {}
    with self.files.open(items[0][0]) as source:
      for _, _, slot, row in items:
        try:
          self._record(source, slot, row, out, raw_out)
        except BadRecordError as e:
          errors[slot] = e
    return errors


class HostDataset:
  """This process's share of one split, or of a selection of its records, and how to stream it.

  Records are numbered 0..n-1 over the whole split in file order (the split's files in shard
  order, records in file order): the *global record index* that ``records`` and
  :func:`read_split_index` use. With ``records``, each process reads the selected records that
  fall in its own share; :attr:`num_examples` is how many, epochs shuffle over just those, and a
  batch may be larger than the selection (it then holds several epochs). Records in the
  remainder that the even split drops (fewer than ``process_count``, only when the split's
  size is not a multiple of it) are read by no process, selected or not.

  Attributes:
    info: The folder's metadata (``data_pipeline.dataset_info``, read without TensorFlow).
    num_examples: Records this process reads per epoch.
    share_sizes: ``num_examples`` of every process, by process index (each process computes
      all of them from the dataset's metadata, without reading records).
    records: The selection as sorted global record indices, or None for the whole split.
    split_size: Records in the whole split (global record indices are 0..split_size-1).
    reader: ``'local'``, ``'url'`` or ``'tf'``, resolved from the constructor's ``'auto'``.
    order: The data order the reader gives, as checkpoints record it: ``'local'`` (the local
      and the URL reader: one order) or ``'tf'``.
    max_bad_records, verify_checksums: As given to the constructor.
    host_cache_message: A line saying whether the records are kept in memory (``host_cache``)
      and how much that takes; known once the files are scanned (the first read, or
      ``data_shards.ShardedStream.check_readable``).
    host_cache_bytes: Bytes reserved for that (0: not cached).
    bad_records: The message of each bad record met so far (each record once, however often
      it is read), in the order the batches met them; always empty with max_bad_records=0.
  """

  def __init__(self, data_dir: str, split: str, process_index: int | None = None,
               process_count: int | None = None, *, reader: str = 'auto',
               records: np.ndarray | Sequence[int] | None = None,
               max_bad_records: int = 0, verify_checksums: bool = False,
               host_cache: str | int = 'off'):
    """Opens the share.

    Args:
      data_dir: A dataset folder (local path or URL) written by ``data_pipeline``.
      split: Split name, e.g. ``'train'``.
      process_index: This process; default ``jax.process_index()``.
      process_count: Number of processes sharing the split; default ``jax.process_count()``.
      reader: ``'local'``, ``'url'``, ``'tf'`` or ``'auto'``: ``'url'`` for a URL, else
        ``'local'`` (see the module docstring).
      records: None for the whole split, or the global record indices to read (any order). An
        index out of range, or given twice, is a ValueError: a repeat is more likely a bug in
        how the selection was made than a wish to weight a record, and silently dropping it
        would change the epoch size the caller expects.
      max_bad_records: 0: a bad record (corrupt, truncated, malformed, of the wrong size, in a
        missing file) raises a BadRecordError (a ValueError) naming its file and record. N > 0
        (not with the tf.data reader): up to N bad records are read as missing values,
        flagged in ``batch[BAD_RECORD]``, logged and listed in :attr:`bad_records`; one more
        raises.
      verify_checksums: Local and URL readers: check each record's payload CRC the first time
        this dataset reads it (local files through TensorFlow's record reader, URLs with
        ``google-crc32c``; that read is slower: see bench/README.md). The tf.data reader always
        checks every read.
      host_cache: Keep the records in memory after their first read, when they fit: ``'off'``,
        ``'auto'`` (URLs only), ``'on'`` or a number of bytes (see ``data_pipeline.host_cache``;
        not with the tf.data reader). Off by default: worth it only for data read more than
        once (training, a validation split read at every evaluation).

    Raises:
      FileNotFoundError: No dataset there, or files of this process's share missing (with
        max_bad_records > 0, a warning instead: their records read as bad records).
      ValueError: No such split, files not divisible among processes, an empty share, bad
        ``records``, none of the selected records in this process's share, a bad
        ``host_cache``, or max_bad_records > 0 with the tf.data reader.
    """
    configure_tensorflow()
    if reader not in _READERS:
      raise ValueError(f'reader must be one of {_READERS}, got {reader!r}')
    if reader == 'local' and '://' in os.fspath(data_dir):
      raise ValueError(f"{data_dir}: reader='local' reads local paths only; read a URL with "
                       "reader='url' (or 'auto'), which gives the same batches")
    if (isinstance(max_bad_records, bool) or not isinstance(max_bad_records, (int, np.integer))
        or max_bad_records < 0):
      raise ValueError(f'max_bad_records must be an integer >= 0, got {max_bad_records!r}')
    self._host_cache = host_cache_lib.parse(host_cache)
    self.data_dir = data_dir
    self._split_name = split
    self.info = dataset_info.read(data_dir)
    if split not in self.info.splits:
      raise ValueError(f'{data_dir}: no split {split!r}; available: {list(self.info.splits)}')
    self.contract = writer.contract_from_metadata(self.info.metadata, data_dir)
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    whole = self.info.splits[split]
    if whole.num_shards % self.process_count:
      raise ValueError(f'{data_dir}: split {split!r} has {whole.num_shards} files, not a '
                       f'multiple of the {self.process_count} processes; rewrite it with '
                       'num_shards a multiple of the host count')
    shares = [whole.share(i, self.process_count) for i in range(self.process_count)]
    start, stop = shares[self.process_index]
    self.split = f'{split}[{start}:{stop}]'  # This process's records of the split.
    self.num_examples = stop - start
    if self.num_examples == 0:
      raise ValueError(f'{data_dir}: split {split!r} gives process {self.process_index} no examples')
    # Which records of which files make this share (whole files, or parts at share borders).
    self.file_instructions = whole.file_instructions(start, stop)
    if reader == 'auto':
      reader = 'url' if '://' in os.fspath(data_dir) else 'local'
    self.reader = reader
    self.order = _ORDER[reader]
    self._remote = reader == 'url'  # Bytes through tf.io.gfile (record_files.UrlFiles).
    if max_bad_records and reader == 'tf':
      raise ValueError(
          f'{data_dir}: max_bad_records={max_bad_records} needs the local reader (or the URL '
          "reader, its twin), which can skip a bad record; the tf.data reader cannot: read with "
          "reader='auto' (or set max_bad_records=0)")
    self.max_bad_records = int(max_bad_records)
    self.verify_checksums = bool(verify_checksums)
    self.bad_records: list[str] = []
    self._bad: dict[int, str] = {}  # Row of _record_locations -> message, of bad records met.
    self._bad_lock = threading.Lock()
    self._lost: dict[int, str] = {}  # File index -> why (some of) its records cannot be read.
    self._missing_files: frozenset[str] = frozenset()
    self._locations = None  # See _record_locations; lazily.
    self._verified = None  # Per row of _record_locations: CRC checked (verify_checksums).
    self._cache: host_cache_lib.RecordCache | None = None  # Decided with _record_locations.
    self.host_cache_bytes = 0
    self.host_cache_message = ('host cache: not used by the tf.data reader' if reader == 'tf'
                               else 'host cache: not decided yet (the files are not scanned)')

    # Global index of each file's first record, to number the records of any share.
    self.split_size = whole.num_examples
    first_record, position = {}, 0
    for path, skip, take, _ in whole.file_instructions():
      first_record[path] = position - skip
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
      self.share_sizes = tuple(stop - start for start, stop in shares)
      self._check_files(split)
      return
    where = f'{data_dir} split {split!r}'
    self.records = _selection(records, self.split_size, where)
    self._selected = [self.records[np.searchsorted(self.records, start):
                                   np.searchsorted(self.records, stop)] - start
                      for start, stop in self._ranges]
    sizes = []
    for share_range in shares:
      share = ranges(whole.file_instructions(*share_range))
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
    """Every file this process reads exists: one folder listing (tf.io.gfile unless local)."""
    paths = [path for (path, *_), chosen in zip(self.file_instructions, self._selected)
             if chosen is None or chosen.size]
    missing = _missing_files(paths, use_tf=self.reader != 'local')
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
    return self.info.features[schema.IMAGE].shape[0]

  @property
  def num_channels(self) -> int:
    return self.info.features[schema.IMAGE].shape[-1]

  @functools.cached_property
  def builder(self):
    """The folder's TFDS builder (``tfds.builder_from_directory``; needs TensorFlow Datasets).
    The reader itself uses :attr:`info`."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.builder_from_directory(self.data_dir)

  @property
  def record_indices(self) -> np.ndarray:
    """Global record index of each record this process reads, in file order."""
    return np.concatenate([
        start + (np.arange(take) if chosen is None else chosen)
        for (start, _), (_, _, take, _), chosen in zip(self._ranges, self.file_instructions,
                                                       self._selected)]).astype(np.int64)

  def _codecs(self, features: Sequence[str]) -> list[example_codec.Codec]:
    known = self.info.features
    missing = [name for name in features if name not in known]
    if missing:
      raise ValueError(f'{self.data_dir}: no features {missing}; available: {list(known)}')
    if EXAMPLE_MASK in features:
      raise ValueError(f'{EXAMPLE_MASK!r} is added by eval_batches, it is not a feature')
    if BAD_RECORD in features:
      raise ValueError(f'{BAD_RECORD!r} is added with max_bad_records > 0, it is not a feature')
    return [example_codec.codec_for(name, known[name]) for name in dict.fromkeys(features)]

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
        whole epochs (it shuffles record locations, which cost no memory), the URL reader too;
        the tf.data reader shuffles in a window of this many raw records.
      features: Names of the features to return (others are not parsed).

    Returns:
      An iterator of dicts of numpy arrays with a leading batch axis: raw tensors in their stored
      dtype (image float16 or uint8 as stored, worldcover uint8), floats float32, class labels
      int64, texts bytes.
    """
    if self.records is None and (local_batch < 1 or local_batch > self.num_examples):
      raise ValueError(f'per-host batch {local_batch} must lie in 1..{self.num_examples}, the '
                       f'examples process {self.process_index} has in {self.split}')
    if local_batch < 1:
      raise ValueError(f'per-host batch {local_batch} must be at least 1')
    codecs = self._codecs(features)
    if self.reader == 'tf':
      return self._tf_reader().batches(local_batch, seed, start_step, num_steps, shuffle_buffer,
                                       codecs)
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
      return self._tf_reader().eval_batches(local_batch, num_batches, codecs, EXAMPLE_MASK)
    return self._local_eval_batches(local_batch, num_batches, codecs)

  # --- Local and URL reader ---------------------------------------------------------------------

  def _record_locations(self) -> np.ndarray:
    """(file index, offset, length, record in file, global record index) of each record read.

    Rows in file order; scanned once (files in parallel), then the host cache is decided. With
    max_bad_records > 0, the records of a missing file, or after the damage in a damaged one,
    keep their rows (so the epoch layout, which follows the metadata's counts, does not change)
    with offset -1; ``_lost`` says why.
    """
    if self._locations is None:
      to_scan = [path for (path, *_), chosen in zip(self.file_instructions, self._selected)
                 if (chosen is None or chosen.size) and path not in self._missing_files]
      scans = self._scan_files(to_scan)
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
          located, lost = self._scan_file(path, scans[path], in_shard, first)
          rows[:len(located), 1:3] = located
          if lost:
            self._lost[index] = lost
        rows = rows[skip:skip + take]
        if chosen is not None:
          rows = rows[chosen]
        parts.append(rows)
      locations = np.concatenate(parts)
      self._verified = np.zeros(len(locations), np.bool_)  # See verify_checksums.
      self._open_cache(locations)
      self._locations = locations
    return self._locations

  def _scan_files(self, paths: list[str]) -> dict[str, tuple[np.ndarray, tuple | None]]:
    """record_files.scan of each path, several at once (remote scans mostly wait)."""
    threads = min(len(paths), record_files.read_threads(paths, self._remote, _READ_THREADS))
    scan = functools.partial(record_files.scan, remote=self._remote)
    if threads <= 1:
      return {path: scan(path) for path in paths}
    with concurrent.futures.ThreadPoolExecutor(threads, 'host_dataset_scan') as pool:
      return dict(zip(paths, pool.map(scan, paths)))

  def _scan_file(self, path: str, scanned: tuple[np.ndarray, tuple | None], in_shard: int,
                 first: int) -> tuple[np.ndarray, str | None]:
    """(offset, length) of the file's records that can be located, and why the others cannot.

    ``scanned`` is the file's ``tfrecord_index.scan``. Damage, or fewer records than the
    metadata's ``in_shard``, raises; with max_bad_records > 0 it is logged, and the records from
    the damage on are lost (the reason is returned).
    """
    records, damage = scanned
    if len(records) > in_shard:
      raise BadRecordError(f'{path}: {len(records)} records, the dataset metadata says '
                           f'{in_shard}; the folder changed since it was written')
    if damage is not None:
      at, pos, what = damage
      message = (f'{path}: record {at} (split record {first + at}, byte {pos}): {what}'
                 f'{tfrecord_index.lost_records(at, in_shard)}')
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

  def _open_cache(self, locations: np.ndarray) -> None:
    """Decides whether this dataset keeps its records in memory (``host_cache``)."""
    lengths = np.where(locations[:, 1] >= 0, locations[:, 2], 0)
    cached, message = host_cache_lib.reserve(self._host_cache, int(lengths.sum()),
                                             len(locations), self._remote)
    self.host_cache_message = message
    logging.info('%s split %r, process %d: %s', self.data_dir, self._split_name,
                 self.process_index, message)
    if cached:
      self._cache = host_cache_lib.RecordCache(lengths)
      self.host_cache_bytes = self._cache.nbytes
      weakref.finalize(self, host_cache_lib.release, self._cache.nbytes)

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

    ``mask``, if given, maps a step to its ``EXAMPLE_MASK`` array. Which records fill which
    slots is decided here, the same for every byte source; _RecordReads reads them.
    """
    locations = self._record_locations()
    wanted = {c.name.encode(): c for c in codecs}
    paths = [path for path, *_ in self.file_instructions]
    skip_bad = self.max_bad_records > 0
    bad_rows = self._bad  # Rows known bad (only ever filled with skip_bad): not read again.
    remote = self._remote
    threads = record_files.read_threads(paths, remote, _READ_THREADS)

    def generate():
      files = record_files.open_files(paths, remote)
      reads = _RecordReads(files, locations, paths, wanted, self.verify_checksums,
                           self._verified, self._cache)
      # Enough batches in flight to keep every thread busy while the consumer works on one.
      depth = max(2, math.ceil(2 * threads / local_batch))
      pool = concurrent.futures.ThreadPoolExecutor(threads, 'host_dataset_read')
      pending = collections.deque()
      # The consumer holds one batch while asking for the next: depth + 2 arrays of each kind
      # cycle in steady state.
      arrays = array_pool.ArrayPool(capacity=depth + 2)

      def submit(step):
        out = array_pool.empty_batch(codecs, local_batch, arrays)
        # Raw tensors are filled through flat byte views of their rows.
        raw_out = {c.name: out[c.name].reshape(local_batch, -1).view(np.uint8)
                   for c in codecs if c.kind == example_codec.RAW}
        rows = batch_records(step)
        # Per slot, the future reading it (several slots may share one), or None for a record
        # known to be bad.
        jobs: list[concurrent.futures.Future | None] = [None] * local_batch
        ranged = []  # (file index, offset, slot, row) of the records read in runs (_runs).
        for slot, row in enumerate(rows):
          row = int(row)
          if locations[row, 1] < 0 or row in bad_rows:
            continue
          item = (int(locations[row, 0]), int(locations[row, 1]), slot, row)
          if remote and not reads.cached(row):
            ranged.append(item)
          else:
            jobs[slot] = pool.submit(reads.run, [item], out, raw_out)
        for run in _runs(ranged, locations):
          job = pool.submit(reads.run, run, out, raw_out)
          for _, _, slot, _ in run:
            jobs[slot] = job
        pending.append((step, rows, out, jobs))

      todo = iter(steps)
      try:
        for step in todo:
          submit(step)
          if len(pending) >= depth:
            break
        while pending:
          step, rows, out, jobs = pending.popleft()
          bad = []
          for slot, job in enumerate(jobs):  # In slot order: deterministic counts and errors.
            row = int(rows[slot])
            if job is None:
              message = bad_rows.get(row) or self._lost_message(row)
            else:
              error = job.result().get(slot)
              if error is None:
                continue
              if not skip_bad:
                raise error
              message = str(error)
            self._bad_record(row, message)
            bad.append(slot)
          for next_step in todo:
            submit(next_step)
            break
          if sys.byteorder != 'little':  # Raw tensors are stored little-endian.
            for c in codecs:
              if c.kind == example_codec.RAW and c.dtype.itemsize > 1:
                out[c.name].byteswap(inplace=True)
          for slot in bad:
            example_codec.fill_missing(codecs, out, slot)
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
        for _, _, _, jobs in pending:
          for job in jobs:
            if job is not None:
              job.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        files.close()

    return generate()

  # --- tf.data reader ---------------------------------------------------------------------------

  def _tf_reader(self) -> tf_reader.TfReader:
    """The tf.data reader of this share (see data_pipeline.tf_reader)."""
    return tf_reader.TfReader(self.data_dir, self._split_name, self.file_instructions,
                              self._ranges, self._selected, self.records, self.num_examples)


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
