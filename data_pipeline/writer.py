"""Writes tiles as pre-sharded TFRecords with TFDS metadata, readable by stock TFDS.

One writer for every source (the embedded synthetic dataset now, real Sentinel-1 later). The
caller gives, per split, a list of *work units* (tile indices, chip ids, scene windows...) and a
picklable function turning one unit into zero or more examples (or :class:`Skip` records saying
why a unit gave no tile). Then:
  * shard ``k`` of a split of ``n`` shards holds units ``k, k + n, k + 2n, ...``, so a shard's
    content is fixed by the units alone: shards are independent jobs, run in parallel worker
    processes (``workers``) with a progress bar;
  * shard files are named by TFDS's default template (``<name>-<split>.tfrecord-00000-of-00008``)
    and the shard count must be a multiple of the number of reading hosts;
  * examples are serialised by ``schema.tfds_features``, the image as raw bytes in the storage
    form the contract names (``data_pipeline.quantise``: float16 dB clipped to
    ``schema.CLIP_RANGE_DB`` with NaN = no-data, or uint8 codes with 0 = no-data);
  * a shard is written under a temporary name, renamed when complete, and then gets a small JSON
    sidecar (its length, bytes, per-channel sums, skip counts, each record's length). A shard
    with its sidecar is done: running the build again skips it, so an interrupted build resumes
    where it stopped. At the end the record lengths of every shard go into the folder's
    ``tfrecord_index.INDEX_FILE``, which spares readers a scan of the files;
  * when every shard is done, the per-channel mean/std of the training split (over valid pixels
    of the stored values as decoded, i.e. what the model sees) go into the
    :class:`schema.InputContract` in the TFDS metadata, and ``dataset_info.json`` is written
    last: until then no TFDS reader opens the folder;
  * a channel without a single valid pixel in the whole training split (a season no acquisition
    covers: a single-date or partial-season archive) borrows the statistics of its product's
    seasons that have data (VV from the VV seasons, VH from the VH ones, VV-VH from VV-VH),
    pooled over their valid pixels (:meth:`ChannelStatistics.mean_std_borrowing`). Such a channel
    is all no-data, which the model masks (``mae_jax.preprocess.normalise`` sets non-finite values
    to 0 after z-scoring), so its statistics only matter when the model later sees data that has
    that season: the same product's spread over the year is the best guess there is. Which
    channels borrowed from which is recorded in the metadata (``statistics_borrowed``) and the
    report. A product without any valid pixel at all cannot be normalised: the build stops with
    an error naming the channels and deletes its shards (a rerun would fail the same way);
  * an existing folder is replaced only with ``overwrite`` (``--overwrite``) and only if the
    writer made it; the new dataset is built beside it and swapped in once complete
    (:mod:`data_pipeline.replace`), so a failed build leaves the old one as it was.

Read it back with ``tfds.builder_from_directory(path)``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from data_pipeline import atomic
from data_pipeline import dataset_info
from data_pipeline import quantise
from data_pipeline import replace
from data_pipeline import schema
from data_pipeline import tfrecord_index
from data_pipeline import worker_pool

DATASET_NAME = 's1_tiles'
VERSION = '1.0.0'
BUILD_FILE = 'build.json'  # Parameters of an unfinished build, to refuse resuming another one.
INFO_FILE = dataset_info.INFO_FILE  # Written last: the dataset is complete.
SPLIT_MAP = 'split_map.png'  # data_pipeline.ingest.build's map of the planned tiles.
INSPECT_DIR = 'inspect'  # data_pipeline.ingest.inspect's default output folder.
WHAT = 'a dataset made by data_pipeline.writer'  # For messages: what --overwrite replaces.
# Every file a build leaves in its folder: TFDS metadata, shards, their sidecars and temporary
# names (writer and data_pipeline.atomic), the build parameters, the split map and the index of
# the shards' records.
_OWN_FILE = re.compile(
    '|'.join(map(re.escape, (INFO_FILE, dataset_info.FEATURES_FILE, dataset_info.METADATA_FILE,
                             BUILD_FILE, SPLIT_MAP, tfrecord_index.INDEX_FILE)))
    + rf'|\w+\.labels\.txt|{DATASET_NAME}-\w+\.tfrecord-\d{{5}}-of-\d{{5}}'
    r'(\.json|\.incomplete-[0-9a-f]{8})?|\..+\.\d+\.[0-9a-f]{32}\.tmp')


@dataclasses.dataclass(frozen=True)
class Skip:
  """Returned by a unit's example function for a unit that gives no tile, with the reason."""
  reason: str


ExampleFn = Callable[[Any], Iterable[Mapping[str, Any] | Skip]]


class ChannelStatistics:
  """Running per-channel sums over valid (finite) values, in float64."""

  def __init__(self, num_channels: int):
    self.count = np.zeros(num_channels, np.float64)
    self.total = np.zeros(num_channels, np.float64)
    self.total_sq = np.zeros(num_channels, np.float64)

  def update(self, image: np.ndarray) -> None:
    values = image.reshape(-1, image.shape[-1]).astype(np.float64)
    valid = np.isfinite(values)
    values = np.where(valid, values, 0.0)
    self.count += valid.sum(0)
    self.total += values.sum(0)
    self.total_sq += np.square(values).sum(0)

  def merge(self, other: 'ChannelStatistics') -> None:
    self.count += other.count
    self.total += other.total
    self.total_sq += other.total_sq

  def to_dict(self) -> dict[str, list[float]]:
    return {'count': self.count.tolist(), 'total': self.total.tolist(),
            'total_sq': self.total_sq.tolist()}

  @classmethod
  def from_dict(cls, values: Mapping[str, Sequence[float]]) -> 'ChannelStatistics':
    stats = cls(len(values['count']))
    stats.count[:] = values['count']
    stats.total[:] = values['total']
    stats.total_sq[:] = values['total_sq']
    return stats

  def mean_std(self, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std; channels without a valid value raise, or are NaN if allowed."""
    if allow_empty:
      with np.errstate(invalid='ignore', divide='ignore'):
        mean = np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)
        var = np.maximum(self.total_sq / np.maximum(self.count, 1) - mean**2, 0.0)
      return mean, np.where(self.count > 0, np.sqrt(var), np.nan)
    if np.any(self.count == 0):
      empty = np.flatnonzero(self.count == 0).tolist()
      raise ValueError(f'no valid training pixel in channels {empty} (of the band order in '
                       'data_pipeline.schema.BAND_NAMES): cannot compute the normalisation '
                       'statistics (mean_std_borrowing fills such a channel from its product\'s '
                       'other seasons)')
    mean = self.total / self.count
    var = np.maximum(self.total_sq / self.count - mean**2, 0.0)
    return mean, np.sqrt(var)

  def mean_std_borrowing(self, band_names: Sequence[str]
                         ) -> tuple[np.ndarray, np.ndarray, dict[str, list[str]]]:
    """Per-channel mean and std; a channel without any valid value borrows its product's.

    Channels are grouped by product (``<product>_<season>`` names of ``schema.BAND_NAMES``). An
    empty channel gets the mean and std of the valid values of every season of its product that
    has some, pooled (their counts, sums and sums of squares added), so VV winter of a summer-only
    archive is normalised with the VV summer statistics. See the module docstring for why.

    Args:
      band_names: The name of each channel, in channel order.

    Returns:
      ``(mean, std, borrowed)``: float64 arrays, and for each empty channel its name -> the names
      of the channels its statistics were pooled from (empty when no channel was empty).

    Raises:
      ValueError: An empty channel whose product has no valid value in any season (naming them).
    """
    band_names = list(band_names)
    if len(band_names) != len(self.count):
      raise ValueError(f'{len(band_names)} band names for {len(self.count)} channels')
    empty = self.count == 0
    if not empty.any():
      mean, std = self.mean_std()
      return mean, std, {}
    filled = ChannelStatistics(len(self.count))
    filled.merge(self)
    borrowed, unfilled = {}, []
    for channels in _product_channels(band_names).values():
      sources = [c for c in channels if not empty[c]]
      for channel in channels:
        if not empty[channel]:
          continue
        if not sources:
          unfilled.append(channel)
          continue
        filled.count[channel] = self.count[sources].sum()
        filled.total[channel] = self.total[sources].sum()
        filled.total_sq[channel] = self.total_sq[sources].sum()
        borrowed[band_names[channel]] = [band_names[c] for c in sources]
    if unfilled:
      names = [band_names[c] for c in unfilled]
      raise ValueError(f'no valid training pixel in channels {unfilled} ({", ".join(names)}) '
                       'nor in any other season of their product, so they cannot be normalised '
                       '(an empty season borrows the statistics of its product\'s other '
                       'seasons); the training split needs data of that polarisation')
    mean, std = filled.mean_std()
    return mean, std, borrowed


def _product_channels(band_names: Sequence[str]) -> dict[str, list[int]]:
  """Product -> its channel indices, from ``<product>_<season>`` names; a name without a
  season suffix is a product of its own (it has nothing to borrow from)."""
  groups: dict[str, list[int]] = {}
  for index, name in enumerate(band_names):
    product, _, season = name.rpartition('_')
    key = product if product and season in schema.SEASONS else name
    groups.setdefault(key, []).append(index)
  return groups


def quantise_image(image_db: np.ndarray, where: str = 'tile',
                   form: quantise.StorageForm = quantise.FLOAT16) -> np.ndarray:
  """A dB image (H, W, C), NaN = no-data, in the storage ``form`` (clipped, then float16, or
  uint8 codes with 0 = no-data)."""
  if image_db.ndim != 3:
    raise ValueError(f'{where}: image must be (H, W, C), got shape {image_db.shape}')
  if np.isinf(image_db).any():
    raise ValueError(f'{where}: image has infinite values (use NaN for no-data)')
  return form.encode(image_db)


def _file_template(data_dir: str, split: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.core.ShardedFileTemplate(data_dir=data_dir, dataset_name=DATASET_NAME, split=split,
                                       filetype_suffix='tfrecord')


@dataclasses.dataclass(frozen=True)
class _ShardJob:
  output_dir: str
  split: str
  shard: int
  num_shards: int
  units: tuple[Any, ...]
  contract: schema.InputContract

  @property
  def path(self) -> str:
    return os.fspath(_file_template(self.output_dir, self.split).sharded_filepaths(
        self.num_shards)[self.shard])

  @property
  def sidecar(self) -> str:
    return self.path + '.json'


def _write_shard(job: _ShardJob, make_examples: ExampleFn) -> dict[str, Any]:
  """Writes one shard (temporary name, then rename) and its sidecar; returns the sidecar."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  features = schema.tfds_features(job.contract.tile_size, job.contract.num_channels,
                                  job.contract.storage_dtype)
  form = quantise.form_of(job.contract)
  expected = (job.contract.tile_size, job.contract.tile_size, job.contract.num_channels)
  stats = ChannelStatistics(job.contract.num_channels)
  region_stats: dict[str, ChannelStatistics] = {}
  skipped: dict[str, int] = {}
  record_lengths = []
  tmp_path = f'{job.path}.incomplete-{uuid.uuid4().hex[:8]}'
  try:
    with tf.io.TFRecordWriter(tmp_path) as records:
      for unit in job.units:
        for example in make_examples(unit):
          if isinstance(example, Skip):
            skipped[example.reason] = skipped.get(example.reason, 0) + 1
            continue
          where = f'{job.split} unit {unit!r} ({example.get(schema.TILE_ID, "?")})'
          example = dict(example)
          if np.shape(example[schema.IMAGE]) != expected:
            raise ValueError(f'{where}: image shape {np.shape(example[schema.IMAGE])} '
                             f'!= {expected} (tile size, tile size, bands)')
          example[schema.IMAGE] = quantise_image(np.asarray(example[schema.IMAGE]), where, form)
          tile_stats = ChannelStatistics(job.contract.num_channels)
          # Statistics of the values the model will see: the stored ones, decoded.
          tile_stats.update(form.decode(example[schema.IMAGE]))
          stats.merge(tile_stats)
          region = example[schema.REGION]
          region = schema.REGIONS[region] if isinstance(region, (int, np.integer)) else region
          region_stats.setdefault(str(region), ChannelStatistics(
              job.contract.num_channels)).merge(tile_stats)
          record = features.serialize_example(example)
          records.write(record)
          record_lengths.append(len(record))
    length, num_bytes = len(record_lengths), sum(record_lengths)
    if not length:
      raise ValueError(f'{job.split} shard {job.shard}: none of its {len(job.units)} units gave '
                       f'a tile (skipped: {skipped}); use fewer shards')
    os.replace(tmp_path, job.path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  sidecar = {'length': length, 'num_bytes': num_bytes, 'units': len(job.units),
             'skipped': skipped, 'statistics': stats.to_dict(),
             'statistics_by_region': {r: v.to_dict() for r, v in region_stats.items()},
             tfrecord_index.RECORD_LENGTHS: record_lengths}
  atomic.write_bytes(job.sidecar, json.dumps(sidecar).encode())
  return sidecar


def _read_sidecar(job: _ShardJob) -> dict[str, Any] | None:
  """The sidecar of a finished shard, or None if the shard still has to be written."""
  if not (os.path.exists(job.path) and os.path.exists(job.sidecar)):
    return None
  with open(job.sidecar) as f:
    return json.load(f)


def _build_fingerprint(units_by_split, num_shards, contract) -> dict[str, Any]:
  """What identifies a build, in its JSON form (tuples become lists) for comparison."""
  return json.loads(json.dumps({
      'num_shards': num_shards, 'contract': contract.to_dict(),
      'units': {split: [repr(u) for u in units] for split, units in units_by_split.items()}}))


def build_dataset(output_dir: str, units_by_split: Mapping[str, Sequence[Any]],
                  make_examples: ExampleFn, contract: schema.InputContract, *,
                  num_shards: int = 8, host_count: int = 1, workers: int = 1,
                  description: str = '', overwrite: bool = False, progress: bool = False,
                  statistics_by_region: bool = False,
                  extra_files: Callable[[str], None] | None = None,
                  ) -> tuple[schema.InputContract, dict[str, Any]]:
  """Builds (or resumes building) a dataset; returns (contract with statistics, report).

  ``make_examples(unit)`` must be picklable when ``workers > 1`` (a module-level function or a
  ``functools.partial`` of one). The report gives examples and skip counts per split. With
  ``statistics_by_region`` the training split's per-channel mean / std of each region also go
  into the metadata (``statistics_by_region``) and the report, for per-area normalisation.
  ``extra_files(folder)`` writes the caller's own files (e.g. :data:`SPLIT_MAP`) into the
  folder being built, after the shards and before the metadata that completes it.

  An existing ``output_dir`` (see :func:`check_output`): an unfinished build of the same
  units, shards and contract is resumed in place; with ``overwrite`` a dataset the writer made
  (finished or not) is replaced by a new one built beside it (``.<name>.tmp-<random>``) and
  swapped in once complete, so a failed build leaves the old one as it was.
  """
  if num_shards % host_count:
    raise ValueError(f'num_shards {num_shards} must be a multiple of host_count {host_count} '
                     'so that every host reads whole files')
  if 'train' not in units_by_split:
    raise ValueError(f"splits must include 'train' (for the statistics), got "
                     f'{sorted(units_by_split)}')
  for split, units in units_by_split.items():
    if len(units) < num_shards:
      raise ValueError(f'split {split!r} has {len(units)} units, fewer than its {num_shards} '
                       'shards')
  output_dir = os.path.abspath(output_dir)
  fingerprint = _build_fingerprint(units_by_split, num_shards, contract)
  check = functools.partial(check_output, output_dir, overwrite, fingerprint)
  build = functools.partial(
      _build, units_by_split=units_by_split, make_examples=make_examples, contract=contract,
      fingerprint=fingerprint, num_shards=num_shards, workers=workers, description=description,
      progress=progress, name=os.path.basename(output_dir),
      statistics_by_region=statistics_by_region, extra_files=extra_files)
  if not check():
    return build(output_dir)
  with replace.written_aside(output_dir, check=check) as tmp:
    return build(tmp)


def _is_own(folder: str, name: str) -> bool:
  """Whether ``name`` in ``folder`` is one the writer (or a build around it) writes."""
  path = os.path.join(folder, name)
  if name == INSPECT_DIR and os.path.isdir(path):
    # data_pipeline.ingest.inspect's default output: PNGs and a report of this dataset.
    return all(re.fullmatch(r'tiles_\w+\.png|report\.txt|\..+\.tmp', n) and
               os.path.isfile(os.path.join(path, n)) for n in os.listdir(path))
  return os.path.isfile(path) and bool(_OWN_FILE.fullmatch(name))


def _unrecognised(folder: str) -> list[str]:
  """Entries of ``folder`` the writer does not make; all of them unless it holds its marker
  (``dataset_info.json`` of a finished dataset or ``build.json`` of an unfinished one)."""
  if not {INFO_FILE, BUILD_FILE} & set(os.listdir(folder)):
    return replace.unrecognised_entries(folder, lambda *_: False)
  return replace.unrecognised_entries(folder, _is_own)


def check_output(output_dir: str, overwrite: bool = False,
                 fingerprint: dict[str, Any] | None = None) -> bool:
  """Checks ``output_dir`` before anything is written; returns whether to build aside and
  replace it (True) or to build (or resume) in place (False).

  A missing or empty folder is built in place. A folder holding anything but a dataset the
  writer made (finished, or an unfinished build) is refused, ``overwrite`` or not; so is a
  finished dataset without ``overwrite``, and an unfinished build with another
  ``fingerprint`` (None: not known yet, so any may be resumed). A read-only folder is refused.
  """
  output_dir = os.path.abspath(output_dir)
  if not os.path.lexists(output_dir) or (os.path.isdir(output_dir)
                                         and not os.listdir(output_dir)):
    replace.check_writable(output_dir)
    return False
  replace.check_replaceable(output_dir, WHAT, _unrecognised)
  if os.path.exists(os.path.join(output_dir, INFO_FILE)):
    if not overwrite:
      raise FileExistsError(f'{output_dir} exists; {replace.PASS_OVERWRITE} to replace it')
  else:  # An unfinished build: resumed if it is the same one.
    with open(os.path.join(output_dir, BUILD_FILE)) as f:
      same = fingerprint is None or json.load(f) == fingerprint
    if not overwrite:
      if not same:
        raise ValueError(f'{output_dir} holds an unfinished build with other units, shards or '
                         f'contract; {replace.PASS_OVERWRITE} to start again')
      replace.check_writable(output_dir)
      return False
  replace.check_writable(output_dir, replacing=True)
  return True


def _build(output_dir: str, *, units_by_split, make_examples, contract, fingerprint, num_shards,
           workers, description, progress, name, statistics_by_region, extra_files):
  """Builds (or resumes) the dataset in ``output_dir``; see :func:`build_dataset`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  build_file = os.path.join(output_dir, BUILD_FILE)
  created = not os.path.exists(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  atomic.write_bytes(build_file, json.dumps(fingerprint).encode())

  jobs = [_ShardJob(output_dir, split, shard, num_shards, tuple(units[shard::num_shards]),
                    contract)
          for split, units in units_by_split.items() for shard in range(num_shards)]
  sidecars = {job: _read_sidecar(job) for job in jobs}
  todo = [job for job in jobs if sidecars[job] is None]
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit='shard',
                    desc=name)
  if workers > 1 and len(todo) > 1:
    def finished(job, sidecar):
      sidecars[job] = sidecar
      if bar:
        bar.update()
    # Ctrl-C stops the workers as well, and no queued shard starts (see worker_pool).
    worker_pool.run(functools.partial(_write_shard, make_examples=make_examples), todo,
                    workers, finished)
  else:
    for job in todo:
      sidecars[job] = _write_shard(job, make_examples)
      if bar:
        bar.update()
  if bar:
    bar.close()

  stats = ChannelStatistics(contract.num_channels)
  region_stats: dict[str, ChannelStatistics] = {}
  split_infos, report = [], {}
  for split in units_by_split:
    split_sidecars = [sidecars[job] for job in jobs if job.split == split]
    skipped: dict[str, int] = {}
    for sidecar in split_sidecars:
      for reason, count in sidecar['skipped'].items():
        skipped[reason] = skipped.get(reason, 0) + count
      if split == 'train':
        stats.merge(ChannelStatistics.from_dict(sidecar['statistics']))
        for region, values in sidecar['statistics_by_region'].items():
          region_stats.setdefault(region, ChannelStatistics(contract.num_channels)).merge(
              ChannelStatistics.from_dict(values))
    lengths = [s['length'] for s in split_sidecars]
    report[split] = {'examples': sum(lengths), 'units': len(units_by_split[split]),
                     'skipped': skipped}
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=lengths, num_bytes=sum(s['num_bytes'] for s in split_sidecars),
        filename_template=_file_template(output_dir, split)))
  try:
    mean, std, borrowed = stats.mean_std_borrowing(contract.band_names)
  except ValueError as e:
    # Every shard is written and the statistics still fail: a resume would read the same
    # shards and fail the same way, so nothing is kept for one.
    _remove_build(output_dir, jobs, created)
    raise ValueError(f'{e}. The shards of this build were deleted: a rerun would fail the '
                     'same way') from None
  contract = dataclasses.replace(contract, mean=tuple(mean), std=tuple(std))
  metadata = {'input_contract': contract.to_dict(), 'build_report': report}
  if borrowed:
    metadata['statistics_borrowed'] = report['statistics_borrowed'] = borrowed
  if statistics_by_region:
    by_region = {}
    for region, values in sorted(region_stats.items()):
      mean, std = values.mean_std(allow_empty=True)
      # JSON has no NaN: a channel without valid values in a region is null.
      by_region[region] = {'mean': [v if np.isfinite(v) else None for v in mean.tolist()],
                           'std': [v if np.isfinite(v) else None for v in std.tolist()],
                           'valid_values': values.count.tolist()}
    metadata['statistics_by_region'] = report['statistics_by_region'] = by_region
  if extra_files:
    extra_files(output_dir)
  index = {os.path.basename(job.path): sidecars[job].get(tfrecord_index.RECORD_LENGTHS)
           for job in jobs}
  if None not in index.values():  # Else shards of a build resumed across this change: scanned.
    atomic.write_bytes(os.path.join(output_dir, tfrecord_index.INDEX_FILE),
                       json.dumps({tfrecord_index.RECORD_LENGTHS: index}).encode())
  features = schema.tfds_features(contract.tile_size, contract.num_channels,
                                  contract.storage_dtype)
  tfds.folder_dataset.write_metadata(
      data_dir=output_dir, features=features, split_infos=split_infos,
      filename_template=_file_template(output_dir, 'train'), version=VERSION, check_data=False,
      description=description or 'Sentinel-1 tiles for mae_jax',
      metadata=tfds.core.MetadataDict(**metadata))
  for job in jobs:
    os.remove(job.sidecar)
  os.remove(build_file)
  return contract, report


def _remove_build(output_dir: str, jobs: Sequence[_ShardJob], created: bool) -> None:
  """Deletes a build's shards, sidecars and build file; the folder too if this build made it
  and nothing else is in it."""
  for path in [p for job in jobs for p in (job.path, job.sidecar)] + [
      os.path.join(output_dir, name) for name in (BUILD_FILE, tfrecord_index.INDEX_FILE)]:
    if os.path.exists(path):
      os.remove(path)
  if created and not os.listdir(output_dir):
    os.rmdir(output_dir)


def read_contract(data_dir: str) -> schema.InputContract:
  """The input contract stored with a dataset written by :func:`build_dataset` (read without
  TensorFlow: ``data_pipeline.dataset_info``)."""
  return contract_from_metadata(dataset_info.read(data_dir).metadata, data_dir)


def contract_from_metadata(metadata: Mapping[str, Any] | None,
                           data_dir: str) -> schema.InputContract:
  """The input contract in a dataset's metadata dict (TFDS's ``metadata.json``)."""
  values = metadata and metadata.get('input_contract')
  if not values:
    raise ValueError(f'{data_dir}: the dataset metadata has no input_contract '
                     '(was it written by data_pipeline.writer?)')
  return schema.InputContract.from_dict(dict(values))
