"""Where training metrics go: stdout, TensorBoard (via CLU) and ``metrics.jsonl``.

Only process 0 writes; other processes get a writer that drops everything. ``metrics.jsonl``
holds one JSON object per logged step, the easiest thing to plot or grep afterwards.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from etils import epath


class ScalarWriter(metric_writers.MetricWriter):
  """A writer of scalars only: every other kind of summary is ignored."""

  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None): pass
  def write_hparams(self, hparams): pass


class JsonlWriter(ScalarWriter):
  """One JSON line per logged step, steps in increasing order, each step once.

  Scalars written for the step of the previous line (validation, then the training log of the
  same step) join that line. A resumed run first drops the rows its lost steps left
  (:func:`drop_rows_after`), so after any number of resumes the file reads as one run.
  """

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._remote = '://' in path
    self._records: list[dict[str, float]] | None = None  # The file's rows, read on first use.
    self._written = 0  # Leading rows of _records the file holds unchanged.
    self._file_rows = 0  # Rows the file holds.

  def _load(self) -> list[dict[str, float]]:
    if self._records is None:
      self._records = read_rows(os.fspath(self._path))
      self._written = self._file_rows = len(self._records)
    return self._records

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    records = self._load()
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    if records and records[-1]['step'] == int(step):
      records[-1].update(values)
      self._written = min(self._written, len(records) - 1)  # That row changed.
    else:
      records.append({'step': int(step), **values})

  def flush(self) -> None:
    records = self._load()
    if self._written == len(records):
      return
    if self._remote or self._written < self._file_rows:
      # Object stores cannot append, and a changed row is rewritten: the file is small.
      _rewrite(self._path, records)
    else:
      with open(self._path, 'a') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in records[self._written:]))
    self._written = self._file_rows = len(records)

  def close(self) -> None:
    self.flush()


def _rewrite(path: epath.Path, records: list[dict[str, float]]) -> None:
  text = ''.join(json.dumps(r) + '\n' for r in records)
  if '://' in os.fspath(path):
    path.write_text(text)
    return
  temporary = f'{path}.tmp-{os.getpid()}'
  with open(temporary, 'w') as f:
    f.write(text)
  os.replace(temporary, path)  # Never a half-written metrics file.


def read_rows(path: str) -> list[dict[str, float]]:
  """The rows of a ``metrics.jsonl`` (none if it does not exist)."""
  file = epath.Path(path)
  if not file.exists():
    return []
  return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def drop_rows_after(workdir: str, step: int) -> int:
  """Drops the rows of ``workdir/metrics.jsonl`` past ``step`` (a resume's start); returns how
  many went. Call before the run's writer writes."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  rows = read_rows(os.fspath(path))
  kept = [row for row in rows if row['step'] <= step]
  if len(kept) < len(rows):
    _rewrite(path, kept)
  return len(rows) - len(kept)


class StdoutWriter(ScalarWriter):
  """One readable line per logged step."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    parts = []
    for key, value in scalars.items():
      value = float(np.asarray(value))
      parts.append(f'{key}={value:.4g}' if abs(value) < 1e5 else f'{key}={value:.3e}')
    print(f'step {step}: ' + ' '.join(parts), file=sys.stdout, flush=True)

  def flush(self): sys.stdout.flush()
  def close(self): self.flush()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """Stdout + TensorBoard + metrics.jsonl on process 0; a no-op writer elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      StdoutWriter(),
      metric_writers.SummaryWriter(os.path.join(workdir, 'tensorboard')),
      JsonlWriter(os.path.join(workdir, 'metrics.jsonl')),
  ])
