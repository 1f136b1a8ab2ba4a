"""Resuming a run, for every trainer: the newest checkpoint that proves itself, and only when the
run it continues is the same run.

* :func:`restore_newest` restores the newest committed step whose files read and whose arrays
  match the checksums saved with them. A damaged step is reported in one line, moved out of the
  checkpoints folder (to ``<workdir>/damaged_checkpoints/``, nothing is deleted) and the previous
  step is tried; ``config.checkpoint.strict=True`` refuses instead of falling back.
* :func:`check_config_changes` refuses a resume whose config changes what is being optimised or
  the optimiser's state (``GUARDED``) unless ``config.allow_changes`` names each changed field.
* :func:`record_config` then writes ``config.json``, keeping each config it replaces in
  ``config_history.jsonl``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from mae_jax import checkpoint as ckpt_lib
from mae_jax import distributed
from mae_jax import validate
from mae_jax import writers

# Config fields (and sections) whose change on resume changes the objective or the optimiser
# state. The data order (seed, batch size, data shards, reader) has its own check
# (loop.check_data_layout), the architecture too; where and how fast the run goes (mesh,
# attention implementation, remat, logging, checkpoints, paths) may change freely.
GUARDED = ('model', 'optim', 'total_steps', 'epochs', 'task_name', 'protocol', 'label_fraction',
           'head', 'freeze_encoder', 'init_checkpoint', 'init_from', 'init_from_channels',
           'select_best', 'dataset.regions', 'dataset.train_regions')
# Inside GUARDED sections, choices of the machine rather than of the run.
FREE = ('model.attention_implementation', 'model.remat_policy', 'model.scan_layers')
DAMAGED_DIR = 'damaged_checkpoints'


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: ckpt_lib.as_json(tree)}


def _guarded(field: str) -> bool:
  inside = lambda names: any(field == n or field.startswith(n + '.') for n in names)
  return inside(GUARDED) and not inside(FREE)


def allowed_changes(config: ml_collections.ConfigDict) -> set[str]:
  return {name.strip() for name in config.allow_changes.split(',') if name.strip()}


def config_changes(saved: dict[str, Any] | None, config: ml_collections.ConfigDict) -> list[str]:
  """Guarded fields whose value differs between a checkpoint's config and ``config``."""
  if not saved:
    return []
  before = _flatten(saved)
  now = _flatten(json.loads(config.to_json_best_effort()))
  return sorted(field for field in set(before) | set(now)
                if _guarded(field) and before.get(field, '<absent>') != now.get(field, '<absent>'))


def check_config_changes(saved: dict[str, Any] | None, config: ml_collections.ConfigDict,
                         where: str) -> list[str]:
  """Refuses guarded changes ``config.allow_changes`` does not name; returns the allowed ones
  as 'field: before -> now' lines (to log)."""
  before = _flatten(saved or {})
  now = _flatten(json.loads(config.to_json_best_effort()))
  changed = config_changes(saved, config)
  refused = [f for f in changed if f not in allowed_changes(config)]
  describe = lambda f: f'{f}: {before.get(f, "<absent>")!r} -> {now.get(f, "<absent>")!r}'
  if refused:
    raise validate.ConfigError(
        f'{where}: resuming would change what the run optimises or its optimiser state ('
        + '; '.join(describe(f) for f in refused) + '). Restore the value, use a new --workdir, '
        f'or name the field: --config.allow_changes={",".join(refused)}')
  return [describe(f) for f in changed]


def record_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``config.json`` (process 0); a different config it replaces goes to the history."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / 'config.json'
  text = config.to_json_best_effort(indent=2)
  if path.exists():
    old = path.read_text()
    if old != text:
      history = epath.Path(workdir) / 'config_history.jsonl'
      lines = history.read_text() if history.exists() else ''
      entry = json.dumps({'replaced_at': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                          'config': json.loads(old)})
      history.write_text(lines + entry + '\n')
  path.write_text(text)


def check_same_run(saved: dict[str, Any], where: str, *, architecture: dict[str, Any],
                   data_layout: dict[str, Any], config: ml_collections.ConfigDict,
                   report: Callable[[str], None]) -> None:
  """Refuses to resume a checkpoint of another model, data order or (guarded) config."""
  diffs = ckpt_lib.architecture_differences(saved.get('architecture', {}), architecture)
  if diffs:
    raise ValueError(f'checkpoint {where} was written by another model: ' + '; '.join(diffs))
  check_data_layout(saved.get('data_layout'), data_layout, config.dataset, where)
  for change in check_config_changes(saved.get('config'), config, where):
    report(f'Resuming with a changed config (config.allow_changes): {change}')


def check_data_layout(saved: dict[str, Any] | None, current: dict[str, Any],
                      dataset_config: ml_collections.ConfigDict, where: str) -> None:
  """Refuses a resume whose input stream would not continue the checkpoint's."""
  if saved is None:  # Written before layouts were recorded.
    return
  diffs = [f'{key}: checkpoint {saved.get(key)!r} != now {current.get(key)!r}'
           for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
  if diffs and not dataset_config.allow_new_data_order:
    raise ValueError(f'{where}: resuming here would change the order of the training data ('
                     + '; '.join(diffs) + '); restore the settings, or pass '
                     '--config.dataset.allow_new_data_order=True to continue in a new order')


def record_start(workdir: str, config: ml_collections.ConfigDict, start_step: int,
                 writer: writers.MetricWriter) -> None:
  """Once a run is accepted at ``start_step``: its config recorded, and metric rows a previous
  run logged after that step (work since lost) dropped from ``metrics.jsonl`` and marked for
  TensorBoard to drop (``writer.write_start``), so each step appears once, in order."""
  record_config(workdir, config)
  if jax.process_index() == 0:
    writers.drop_rows_after(workdir, start_step)
  writer.write_start(start_step + 1)


def _all_ok(ok: bool) -> bool:
  """True only if ``ok`` on every process (a damaged file may be read by one host only)."""
  if not distributed.is_multiprocess():
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())


def restore_newest(checkpointer: ckpt_lib.Checkpointer, abstract_state: Any,
                   check_metadata: Callable[[dict[str, Any], str], None], *, strict: bool,
                   workdir: str, report: Callable[[str], None]
                   ) -> tuple[Any, dict[str, Any], int] | None:
  """(state, metadata, step) of the newest step that restores and verifies; None if none is
  committed.

  ``check_metadata(metadata, where)`` raises when the step belongs to another run (model, data
  order, config): that refuses the resume, it is not damage to fall back from.

  Raises:
    CheckpointDamaged: a damaged step with ``strict``, or no committed step restores.
  """
  steps = sorted(checkpointer.all_steps(), reverse=True)
  damaged: list[tuple[int, str]] = []
  for step in steps:
    where = f'{checkpointer.directory}/{step}'
    reason = ''
    try:
      metadata = checkpointer.restore_metadata(step)
    except ckpt_lib.CheckpointDamaged as e:
      reason = str(e)
    if _all_ok(not reason):
      check_metadata(metadata, where)
      try:
        state, metadata = checkpointer.restore(step, abstract_state)
      except ckpt_lib.CheckpointDamaged as e:
        reason = str(e)
    if _all_ok(not reason):
      for bad_step, _ in damaged:
        aside = checkpointer.move_aside(bad_step, str(epath.Path(workdir) / DAMAGED_DIR))
        report(f'Moved damaged checkpoint step {bad_step} to {aside}.')
      return state, metadata, step
    reason = reason or 'it cannot be read on another process (see that process\'s log)'
    older = [s for s in steps if s < step]
    if strict:
      raise ckpt_lib.CheckpointDamaged(
          f'{reason}. config.checkpoint.strict=True: not falling back'
          + (f' to step {older[0]}' if older else '') + '.')
    report(f'Checkpoint step {step} cannot be restored: {reason}. '
           + (f'Falling back to step {older[0]}.' if older else 'No older step.'))
    damaged.append((step, reason))
  if damaged:
    raise ckpt_lib.CheckpointDamaged(
        f'no committed checkpoint in {checkpointer.directory} restores: '
        + '; '.join(f'step {s}: {r}' for s, r in damaged)
        + '. Nothing was moved or deleted; start again with a new --workdir.')
  return None
