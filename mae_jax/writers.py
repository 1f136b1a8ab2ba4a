"""Where training metrics go: stdout, TensorBoard and ``metrics.jsonl``.

Only process 0 writes; other processes get a writer that drops everything. ``metrics.jsonl``
holds one JSON object per logged step, the easiest thing to plot or grep afterwards. TensorBoard
event files are written with TensorBoard's own event writer, which needs no TensorFlow.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from etils import epath


class MetricWriter:
  """What the trainers write to: scalars and images of a step, then flush and close."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    raise NotImplementedError

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """``images``: name -> (N, H, W, C) uint8 array (C 1, 3 or 4)."""
    raise NotImplementedError

  def write_start(self, step: int) -> None:
    """Marks that a run (new, or resumed from a checkpoint) logs from ``step`` on: what an
    earlier run logged at ``step`` or later was lost with it."""

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self.flush()


class ScalarWriter(MetricWriter):
  """A writer of scalars only: images are ignored."""

  def write_images(self, step, images): pass


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


class TensorBoardWriter(MetricWriter):
  """Scalars and images as a TensorBoard event file in ``logdir``, without TensorFlow.

  TensorBoard's own ``EventFileWriter`` (the one PyTorch's SummaryWriter uses) writes the file,
  on a thread, through TensorFlow's file system if TensorFlow is installed and TensorBoard's
  own otherwise (local paths; URLs through fsspec). Scalars are ``simple_value`` summaries,
  images PNG-encoded ``Summary.Image``s: both what TensorBoard has always read.
  """

  def __init__(self, logdir: str):
    # Imported here: a writer that is never opened (other processes, tests) costs nothing.
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    # flush_secs: the loop flushes after each log; this bounds the delay of anything else.
    self._writer = event_file_writer.EventFileWriter(logdir, flush_secs=30)
    self._closed = False

  def _write(self, step: int, values: Sequence[Any]) -> None:
    self._writer.add_event(self._event(wall_time=time.time(), step=int(step),
                                       summary=self._summary(value=list(values))))

  def write_start(self, step: int) -> None:
    # TensorBoard's SessionLog.START: after the first of a log directory, each one makes
    # TensorBoard drop the events of earlier files at this step or later (purge_orphaned_data,
    # on by default): a resumed run's curves show each step once, as metrics.jsonl does.
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._writer.add_event(self._event(
        wall_time=time.time(), step=int(step),
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._write(step, [self._summary.Value(tag=key, simple_value=float(np.asarray(value)))
                       for key, value in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    values = []
    for key, batch in images.items():
      batch = np.asarray(batch)
      if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
        raise ValueError(f'image {key!r}: expected (N, H, W, 1|3|4) uint8, got {batch.shape} '
                         f'{batch.dtype}')
      for i, image in enumerate(batch):
        png = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image.squeeze(-1) if image.shape[-1] == 1
                                             else image)).save(png, format='PNG')
        values.append(self._summary.Value(
            tag=key if len(batch) == 1 else f'{key}/{i}',
            image=self._summary.Image(height=image.shape[0], width=image.shape[1],
                                      colorspace=image.shape[2],
                                      encoded_image_string=png.getvalue())))
    self._write(step, values)

  def flush(self) -> None:
    if not self._closed:
      self._writer.flush()

  def close(self) -> None:
    if not self._closed:
      self._writer.close()
      self._closed = True


class MultiWriter(MetricWriter):
  """Writes everything to each of ``writers``."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = tuple(writers)

  def write_scalars(self, step, scalars):
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def write_images(self, step, images):
    for writer in self.writers:
      writer.write_images(step, images)

  def write_start(self, step):
    for writer in self.writers:
      writer.write_start(step)

  def flush(self):
    for writer in self.writers:
      writer.flush()

  def close(self):
    for writer in self.writers:
      writer.close()


def create_writer(workdir: str) -> MetricWriter:
  """Stdout + TensorBoard + metrics.jsonl on process 0; a no-op writer elsewhere."""
  if jax.process_index() != 0:
    return MultiWriter([])
  return MultiWriter([
      StdoutWriter(),
      TensorBoardWriter(os.path.join(workdir, 'tensorboard')),
      JsonlWriter(os.path.join(workdir, 'metrics.jsonl')),
  ])
