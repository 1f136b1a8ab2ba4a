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
  """Appends one JSON line per ``write_scalars`` call."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._remote = '://' in path
    # A resumed run keeps the lines of the runs before it.
    self._lines = (self._path.read_text().splitlines()
                   if self._remote and self._path.exists() else [])
    self._pending: list[str] = []

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {'step': int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._pending.append(json.dumps(record))

  def flush(self) -> None:
    if not self._pending:
      return
    if self._remote:  # Object stores cannot append: rewrite the (small) file.
      self._lines.extend(self._pending)
      self._path.write_text('\n'.join(self._lines) + '\n')
    else:
      with open(self._path, 'a') as f:
        f.write('\n'.join(self._pending) + '\n')
    self._pending = []

  def close(self) -> None:
    self.flush()


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
