"""The training stream cut into a fixed number of data shards, so its order ignores the host count.

``HostDataset`` gives each process an even share of the split, so the examples in a global
batch depend on how many processes read it. Here the split is cut into ``data_shards`` parts
(as ``tfds.even_splits``, remainder dropped) that do not depend on the process count. Each part is
its own stream, shuffled per (seed, part, epoch), and global batch ``t`` is

    [part 0's batch t | part 1's batch t | ... | part S-1's batch t],   batch_size / S from each.

Process ``p`` of ``P`` reads parts ``p*S/P .. (p+1)*S/P - 1`` only, which are exactly the rows
of the global batch its devices hold (``mae_jax.validate.check_process_rows`` makes sure). So 1
process x 8 devices, 2 x 4 and 8 x 1 see the same global batches; a job restarted on another
number of hosts (any divisor of S) continues the same data order; and each part's stream is a
function of the step alone, so resuming at step ``s`` needs nothing but ``s``.

``layout()`` describes the order; checkpoints store it and a resume with another layout is an
error (``mae_jax.trainers.pretrain``), since the data order would silently change.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from data_pipeline import dataset_info
from data_pipeline import host_cache
from data_pipeline import input as data_input
from data_pipeline import schema


def part_seed(seed: int, part: int) -> int:
  """Shuffle seed of one part: distinct parts get unrelated permutations."""
  return int(np.random.SeedSequence([seed & (2**63 - 1), part]).generate_state(1, np.uint64)[0]
             >> 1)


def num_files(data_dir: str, split: str) -> int:
  """TFRecord files of ``split`` according to the dataset's metadata."""
  info = dataset_info.read(data_dir)
  if split not in info.splits:
    raise ValueError(f'{data_dir}: no split {split!r}; available: {list(info.splits)}')
  return info.splits[split].num_shards


class ShardedStream:
  """This process's parts of a split and the batches it contributes to every global batch."""

  def __init__(self, data_dir: str, split: str, *, data_shards: int, process_index: int,
               process_count: int, records: Sequence[int] | np.ndarray | None = None,
               **reader_options: Any):
    """Opens parts ``process_index * data_shards / process_count ...`` of ``split``.

    Args:
      data_dir: A dataset folder written by ``data_pipeline``.
      split: Split name.
      data_shards: Parts the split is cut into; a multiple of ``process_count``.
      process_index: This process.
      process_count: Processes in the job.
      records: Optional selection of global record indices (see ``HostDataset``).
      **reader_options: Passed to every part's ``HostDataset`` (reader, verify_checksums,
        host_cache, ...).
    """
    if data_shards < 1 or data_shards % process_count:
      raise ValueError(f'config.dataset.data_shards={data_shards} must be a positive multiple of '
                       f'the {process_count} processes')
    per_process = data_shards // process_count
    self.data_shards = data_shards
    self.part_ids = list(range(process_index * per_process, (process_index + 1) * per_process))
    self.parts = [data_input.HostDataset(data_dir, split, process_index=part,
                                         process_count=data_shards, records=records,
                                         **reader_options)
                  for part in self.part_ids]
    first = self.parts[0]
    self.contract = first.contract
    self.tile_size, self.num_channels = first.tile_size, first.num_channels
    self.reader = first.reader
    self.order = first.order
    self.part_sizes = first.share_sizes  # Every part's size, computed from the metadata.
    self.num_examples = sum(part.num_examples for part in self.parts)

  def check_readable(self) -> None:
    """Scans the parts' files now (local and URL readers), so a missing or damaged file fails at
    start; the host cache is decided then too (see :meth:`host_cache_summary`)."""
    for part in self.parts:
      if part.reader != 'tf':
        part._record_locations()  # pylint: disable=protected-access

  def host_cache_summary(self) -> str:
    """One line on which of this process's parts keep their records in memory, and how much
    that takes (after :meth:`check_readable`)."""
    if len(self.parts) == 1:
      return self.parts[0].host_cache_message
    cached = [part for part in self.parts if part.host_cache_bytes]
    if not cached:
      return self.parts[0].host_cache_message
    line = (f'host cache: {host_cache.gb(sum(part.host_cache_bytes for part in cached))} for '
            f'{sum(part.num_examples for part in cached)} tiles, {len(cached)} of the '
            f'{len(self.parts)} data shards this process reads')
    if len(cached) < len(self.parts):
      line += '; ' + next(part.host_cache_message for part in self.parts
                          if not part.host_cache_bytes)
    return line

  @property
  def bad_records(self) -> list[str]:
    return [message for part in self.parts for message in getattr(part, 'bad_records', [])]

  def layout(self, seed: int, global_batch: int) -> dict[str, Any]:
    """What decides the order of the global stream; equal layouts give equal streams.

    ``'reader'`` holds the reader's order (``HostDataset.order``), not the reader: the local and
    the URL reader give one order, so a run moves between a local disk and a URL. The key keeps
    its name so that checkpoints written before resume.
    """
    return {'data_shards': self.data_shards, 'part_sizes': list(self.part_sizes),
            'reader': self.order, 'seed': seed, 'global_batch': global_batch}

  def batches(self, local_batch: int, *, seed: int, start_step: int, num_steps: int,
              shuffle_buffer: int, features: tuple[str, ...] = (schema.IMAGE,)
              ) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of global batches ``start_step .. start_step + num_steps - 1``."""
    per_part, remainder = divmod(local_batch, len(self.parts))
    if remainder:
      raise ValueError(f'per-process batch {local_batch} is not divisible by the '
                       f'{len(self.parts)} data shards this process reads '
                       '(config.batch_size must be a multiple of config.dataset.data_shards)')
    streams = [part.batches(per_part, seed=part_seed(seed, part_id), start_step=start_step,
                            num_steps=num_steps, shuffle_buffer=shuffle_buffer,
                            features=features)
               for part, part_id in zip(self.parts, self.part_ids)]
    if len(streams) == 1:
      return streams[0]
    return (
        {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
        for batches in zip(*streams))
