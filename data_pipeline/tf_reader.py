"""The tf.data reader of ``data_pipeline.input.HostDataset`` (``reader='tf'``; URLs by default).

Files in an order drawn from (seed, epoch), interleaved, raw serialised records shuffled in a
window of ``shuffle_buffer`` records, batched, then one vectorised ``tf.io.parse_example`` per
batch with a spec of only the requested features. It reads any filesystem TensorFlow knows and
checks the CRC of every record it reads, but is slower than the local reader (bench/README.md
has the figures). TensorFlow's errors name no file: on one, the files are read again one by one
to find the record, and the error raised is a ``tfrecord_index.BadRecordError`` naming it.
"""

from __future__ import annotations

import dataclasses
import math

from absl import logging
import numpy as np

from data_pipeline import array_pool
from data_pipeline import example_codec
from data_pipeline import tfrecord_index

_EPOCH_SEED_STRIDE = 1_000_003
# The tf.data reader keeps a selection's raw records in memory after its first epoch when they
# are estimated to take at most this many bytes (see TfReader._cache_selection).
_TF_CACHE_BYTES = 4 << 30


@dataclasses.dataclass(frozen=True)
class TfReader:
  """Streams one process's share of a split (or of a selection of its records) with tf.data.

  The fields are ``HostDataset``'s description of the share: ``file_instructions`` (path, skip,
  take, records in the file) per file, ``ranges`` their [start, stop) global record indices,
  ``selected`` per file the selected record offsets within it (None: all), ``records`` the
  selection (None: the whole split) and ``num_examples`` the records read per epoch.
  """
  data_dir: str
  split_name: str
  file_instructions: list[tuple[str, int, int, int]]
  ranges: np.ndarray
  selected: list[np.ndarray | None]
  records: np.ndarray | None
  num_examples: int

  def _files(self) -> tuple[list[str], list[int], list[int], list[int]]:
    """(path, skip, take, first row) of each file read; rows number the share's records."""
    table, row = [], 0
    for (path, skip, take, _), chosen in zip(self.file_instructions, self.selected):
      if chosen is None or chosen.size:  # Files without a selected record are not opened.
        table.append((path, skip, take, row))
      row += take
    return tuple(list(column) for column in zip(*table))

  def _keep(self):
    """Per row of the share (see _files), whether it is read: a bool tensor, or None."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if self.records is None:
      return None
    keep = np.zeros(sum(take for _, _, take, _ in self.file_instructions), np.bool_)
    row = 0
    for (_, _, take, _), chosen in zip(self.file_instructions, self.selected):
      keep[row + chosen] = True
      row += take
    return tf.constant(keep)

  def _raw_records(self, files, cycle_length: int, keep):
    """Raw records of ``files`` (a dataset of _files rows), kept rows only, interleaved."""
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

  def _cache_selection(self) -> bool:
    """Whether the selected records are small enough to keep in memory after one read.

    Without a cache every epoch rereads the files holding a selected record: for a label
    fraction of 0.1 %, a thousand times the bytes used. Sizes are estimated from file sizes.
    A cached selection is read in another order than an uncached one (see _epochs): like a
    change of reader, resume a run on the same data it started on.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if self.records is None:
      return False
    paths, *_ = self._files()
    in_files = {path: shard for path, _, _, shard in self.file_instructions}
    file_bytes = sum(tf.io.gfile.stat(path).length for path in paths)
    per_record = file_bytes / max(1, sum(in_files[path] for path in paths))
    return self.num_examples * per_record <= _TF_CACHE_BYTES

  def _epochs(self, seed: int, first_epoch: int, end_epoch: int, shuffle_buffer: int):
    """Raw serialised records of epochs first_epoch..end_epoch-1, each in its own order.

    Epochs are made lazily (a long run over a tiny selection has millions of them). An epoch
    reads the files in an order drawn from (seed, epoch), 4 interleaved, and shuffles records
    in a window of ``shuffle_buffer``; a cached selection is shuffled from memory instead.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    paths, skips, takes, rows = self._files()
    table = (tf.constant(paths), tf.constant(skips, tf.int64), tf.constant(takes, tf.int64),
             tf.constant(rows, tf.int64))
    keep = self._keep()
    shuffle = shuffle_buffer > 1
    cached = None
    if self._cache_selection():
      cached = self._raw_records(tf.data.Dataset.from_tensor_slices(table), 1, keep).cache()

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
        records = self._raw_records(files, min(4, len(paths)), keep)
      if shuffle:
        epoch_seed = (seed_offset + epoch) % (2**31 - 1)
        records = records.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
      return records

    return tf.data.Dataset.range(first_epoch, end_epoch).flat_map(epoch_records)

  def _parse(self, codecs):
    """A function parsing a batch of serialised records into the requested features."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    spec = {}
    for c in codecs:
      if c.kind in (example_codec.RAW, example_codec.TEXT):
        spec[c.name] = tf.io.FixedLenFeature([], tf.string)
      else:
        spec[c.name] = tf.io.FixedLenFeature(
            c.shape, tf.float32 if c.kind == example_codec.FLOAT else tf.int64)

    def parse(serialised):  # One vectorised parse per batch, of the requested features only.
      parsed = tf.io.parse_example(serialised, spec)
      out = {}
      for c in codecs:
        value = parsed[c.name]
        if c.kind == example_codec.RAW:
          value = tf.io.decode_raw(value, tf.as_dtype(c.dtype))
          # The batch size from the input, not -1: same-sized records of a wrong size must
          # fail, not regroup into another number of tensors.
          value = tf.reshape(value, tf.concat([tf.shape(value)[:1],
                                               tf.constant(c.shape, tf.int32)], 0))
        elif c.kind != example_codec.TEXT and value.dtype != tf.as_dtype(c.dtype):
          value = tf.cast(value, c.dtype)
        out[c.name] = value
      return out

    return parse

  def batches(self, local_batch, seed, start_step, num_steps, shuffle_buffer, codecs):
    """The stream of ``HostDataset.batches`` (same arguments; ``codecs`` of the features)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    position = start_step * local_batch
    first_epoch, offset = divmod(position, self.num_examples)
    end_epoch = math.ceil((position + num_steps * local_batch) / self.num_examples)
    ds = self._epochs(seed, first_epoch, max(end_epoch, first_epoch + 1), shuffle_buffer)
    ds = ds.skip(offset)  # Raw: not decoded.
    ds = ds.batch(local_batch, drop_remainder=True).take(num_steps)
    ds = ds.map(self._parse(codecs), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return self._checked(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator(), codecs)

  def eval_batches(self, local_batch, num_batches, codecs, mask_key: str):
    """The pass of ``HostDataset.eval_batches``, each batch's mask under ``mask_key``."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    paths, skips, takes, rows = self._files()
    files = tf.data.Dataset.from_tensor_slices(
        (paths, tf.constant(skips, tf.int64), tf.constant(takes, tf.int64),
         tf.constant(rows, tf.int64)))
    records = self._raw_records(files, 1, self._keep())  # One file at a time: file order.
    total = num_batches * local_batch
    padded = records.concatenate(records.take(1).repeat(total - self.num_examples))
    mask = tf.data.Dataset.range(total).map(lambda i: i < self.num_examples)
    parse = self._parse(codecs)

    def parse_with_mask(serialised, real):
      out = parse(serialised)
      out[mask_key] = real
      return out

    ds = tf.data.Dataset.zip((padded, mask)).batch(local_batch, drop_remainder=True)
    ds = ds.map(parse_with_mask, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return self._checked(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator(), codecs)

  def _checked(self, batches, codecs):
    """``batches``, with a TensorFlow error about the data turned into one naming the record."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      yield from batches
    # UnicodeDecodeError: TensorFlow quoting a malformed record's bytes in its message.
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
            tf.errors.FailedPreconditionError, UnicodeDecodeError) as e:
      raise self._locate(codecs, e) from e

  def _locate(self, codecs, error) -> tfrecord_index.BadRecordError:
    """The first bad record of the files read, in file order, for a tf.data ``error``.

    TensorFlow's messages name neither file nor record: reread the files one by one, parsing
    the records read with the same function (in groups, then one by one in a failing group).
    Slow, but only ever on the way to an error.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    logging.warning('tf.data failed reading %s (%s); reading its files again one by one to find '
                    'the record', self.data_dir, tfrecord_index.tf_message(error))
    parse = self._parse(codecs)
    wanted = {c.name.encode(): c for c in codecs}
    out = array_pool.empty_batch(codecs, 1)
    raw_out = {c.name: out[c.name].reshape(1, -1).view(np.uint8) for c in codecs
               if c.kind == example_codec.RAW}

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
          said = tfrecord_index.tf_message(e)
          try:  # The local reader's parser says what is wrong in its own words, where it can.
            example_codec.read_record(None, 0, len(record), where(index, pos), wanted, out,
                                      raw_out, 0, record)
          except tfrecord_index.BadRecordError as bad:
            return tfrecord_index.BadRecordError(f'{bad} (TensorFlow: {said})')
          return tfrecord_index.BadRecordError(f'{where(index, pos)}: {said}')
      return None

    for file_index, ((path, skip, take, in_shard), chosen) in enumerate(
        zip(self.file_instructions, self.selected)):
      if chosen is not None and not chosen.size:
        continue
      first = int(self.ranges[file_index, 0]) - skip

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
          return tfrecord_index.BadRecordError(
              f'{path}: cannot be read: {tfrecord_index.tf_message(e)}')
        return tfrecord_index.BadRecordError(f'{where(index, pos)}: corrupt or truncated record '
                                             f'(TensorFlow: {tfrecord_index.tf_message(e)})')
      if (bad := first_bad(group, where)) is not None:
        return bad
      if index < skip + take:
        return tfrecord_index.BadRecordError(
            f'{where(index, pos)}: the file ends after {index} records (byte {pos} of '
            f'{tf.io.gfile.stat(path).length}), the dataset metadata says {in_shard}; it was '
            'truncated or changed since it was written')
    return tfrecord_index.BadRecordError(
        f'{self.data_dir} split {self.split_name!r}: tf.data failed '
        f'({tfrecord_index.tf_message(error)}), but reading the files again record by '
        'record found no bad record')
