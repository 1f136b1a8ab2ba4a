"""Orbax checkpoints of the train state plus the metadata that says what was trained.

Layout: ``workdir/checkpoints/<step>/{state,metadata}``. ``state`` is the sharded pytree
(step, params, opt_state); ``metadata`` is JSON: the resolved config, the model's architecture
and the input contract (bands, units, clipping, quantisation, normalisation statistics, tile and
patch size). Saves are asynchronous, every ``config.checkpoint.every_steps`` steps and at the
end, keeping ``config.checkpoint.keep``. Orbax commits a step by an atomic rename, so an
interrupted save never becomes the latest step. Restore takes an abstract target carrying the
shardings of the *current* mesh, so a checkpoint saved on one mesh restores on another.

Every save records checksums of the state it wrote (``mae_jax.fingerprint``) in its metadata,
and every restore, whole or partial, checks them: flipped bytes, a truncated file or a missing
folder raise :class:`CheckpointDamaged` with a one-line reason instead of restoring wrong values
or a storage library's traceback. A failed save raises :class:`CheckpointSaveFailed` naming the
last good step. Trainers fall back to an older step (``mae_jax.trainers.resume``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from mae_jax import fingerprint

STATE = 'state'
METADATA = 'metadata'
# The metadata key of the state's checksums: {leaf path: [sum a, sum b]}.
FINGERPRINTS = 'fingerprints'


class CheckpointDamaged(ValueError):
  """A committed step that cannot be read, or whose arrays differ from their saved checksums."""


class CheckpointSaveFailed(RuntimeError):
  """A save (synchronous or asynchronous) that did not complete; names the last good step."""


def first_line(error: BaseException, limit: int = 300) -> str:
  """A storage library's error in one line: its type and the first line of its message."""
  text = str(error).strip().splitlines()
  text = text[0] if text else ''
  text = text if len(text) <= limit else text[:limit] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with the project's two items."""

  def __init__(self, directory: str, keep: int | None = None, async_save: bool = True):
    # The trainer decides when to save (and passes force=True), so no interval here.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.directory = directory
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=(STATE, METADATA))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def _last_good(self, failed_step: int | None = None) -> str:
    try:
      self.manager.reload()
      steps = [s for s in self.manager.all_steps() if s != failed_step]
    except Exception:  # pylint: disable=broad-except
      steps = []
    return (f'last good checkpoint: step {max(steps)} ({self.directory}/{max(steps)})' if steps
            else f'no good checkpoint in {self.directory}')

  def save(self, step: int, state: Any, metadata: dict[str, Any], force: bool = False) -> bool:
    """Saves ``state`` with ``metadata`` plus the state's checksums (asynchronously if so set).

    Raises:
      CheckpointSaveFailed: this save, or an earlier asynchronous one, failed (a full disk...).
    """
    self.check()
    metadata = {**metadata, FINGERPRINTS: fingerprint.fingerprints(state)}
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 METADATA: ocp.args.JsonSave(metadata)})
    try:
      return self.manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveFailed(f'saving checkpoint step {step} in {self.directory} failed '
                                 f'({first_line(e)}); {self._last_good(step)}') from e

  def check(self) -> None:
    """Raises :class:`CheckpointSaveFailed` if an asynchronous save has failed."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveFailed(f'an asynchronous checkpoint save in {self.directory} failed '
                                 f'({first_line(e)}); {self._last_good()}') from e

  def restore_metadata(self, step: int) -> dict[str, Any]:
    """The step's metadata; :class:`CheckpointDamaged` if it cannot be read."""
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))
      metadata = restored[METADATA]
      if not isinstance(metadata, dict):
        raise ValueError(f'metadata is {type(metadata).__name__}, not a JSON object')
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointDamaged(f'{self.directory}/{step}: its metadata cannot be read '
                              f'({first_line(e)})') from e
    return dict(metadata)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores ``step`` into the shapes, dtypes and shardings of ``abstract_state`` and
    checks it against the checksums saved with it.

    Raises:
      CheckpointDamaged: the step cannot be read, or its arrays differ from their checksums.
    """
    metadata = self.restore_metadata(step)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
    try:
      state = self.manager.restore(step, args=args)[STATE]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointDamaged(f'{self.directory}/{step}: its arrays cannot be read '
                              f'({first_line(e)})') from e
    verify(state, metadata, f'{self.directory}/{step}')
    return state, metadata

  def move_aside(self, step: int, destination: str) -> str:
    """Moves a damaged committed step out of the checkpoints folder (process 0), so it is
    neither restored again nor counted among the kept steps; returns where it went."""
    source = epath.Path(self.directory) / str(step)
    target = epath.Path(destination) / f'{step}'
    suffix = 0
    while jax.process_index() == 0 and target.exists():
      suffix += 1
      target = epath.Path(destination) / f'{step}.{suffix}'
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      source.rename(target)
    self.manager.reload()
    return os.fspath(target)

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self.check()

  def close(self) -> None:
    try:
      self.manager.wait_until_finished()
      self.check()
    finally:
      self.manager.close()


def verify(state: Any, metadata: dict[str, Any], where: str) -> None:
  """Checks restored arrays (the whole state or a sub-tree) against the saved checksums."""
  saved = metadata.get(FINGERPRINTS)
  if saved is None:  # Saved before checkpoints carried checksums: nothing to check against.
    return
  bad = fingerprint.mismatches(state, saved)
  if bad:
    raise CheckpointDamaged(f'{where}: {len(bad)} array(s) differ from the checksums recorded '
                            f'when it was saved (first: {bad[0]}); its files were changed or '
                            'damaged after the save')


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def as_json(value: Any) -> Any:
  """Tuples as lists, at any depth: checkpoint metadata went through JSON, configs did not."""
  if isinstance(value, (list, tuple)):
    return [as_json(v) for v in value]
  return value


def architecture_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = 'model') -> list[str]:
  """Differences between two nested model-config dicts, as 'model.field: saved != current'."""
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, '<absent>'), current.get(key, '<absent>')
    a, b = as_json(a), as_json(b)
    if isinstance(a, dict) and isinstance(b, dict):
      out.extend(architecture_differences(a, b, f'{prefix}.{key}'))
    elif a != b:
      out.append(f'{prefix}.{key}: checkpoint {a!r} != config {b!r}')
  return out


def locate(path: str) -> tuple[str, int]:
  """(checkpoints folder, step) for a workdir (its latest step), a checkpoints folder, or one
  step's folder (``.../checkpoints/<step>``). Only committed steps count."""
  if not path:
    raise ValueError('checkpoint path is empty')
  path = path if '://' in path else os.path.abspath(path)
  root = epath.Path(path)
  if not root.exists():
    raise FileNotFoundError(f'checkpoint path {path!r} does not exist')
  step = None
  if (root / STATE).exists() and root.name.isdigit():
    directory, step = os.fspath(root.parent), int(root.name)
  elif (root / 'checkpoints').exists():
    directory = checkpoint_dir(path)
  else:
    directory = path
  manager = ocp.CheckpointManager(directory, item_names=(STATE, METADATA))
  steps = list(manager.all_steps())
  manager.close()
  if step is None:
    if not steps:
      raise FileNotFoundError(f'no committed checkpoint under {path!r}: pass a mae_jax workdir, '
                              'its checkpoints/ folder or one checkpoints/<step> folder')
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f'{path!r} is not a committed checkpoint (an interrupted save?); '
                            f'committed steps there: {sorted(steps)}')
  return directory, step


def read_metadata(directory: str, step: int) -> dict[str, Any]:
  checkpointer = Checkpointer(directory, async_save=False)
  try:
    return checkpointer.restore_metadata(step)
  finally:
    checkpointer.close()


def restore_subtree(directory: str, step: int, target: Any) -> Any:
  """Restores only the leaves named by ``target`` (a sub-tree of the saved state, e.g.
  ``{'params': {'encoder': ...}}`` of ShapeDtypeStructs with shardings) from ``step``.

  Orbax reads just those arrays, each straight into its target sharding, so the mesh and device
  count may differ from the saving run's and nothing else of the checkpoint is loaded. They are
  checked against the checksums saved with the step (:class:`CheckpointDamaged` if they differ).
  """
  where = f'{directory}/{step}'
  metadata = read_metadata(directory, step)
  args = ocp.args.PyTreeRestore(item=target,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  try:
    restored = ocp.PyTreeCheckpointer().restore(epath.Path(directory) / str(step) / STATE,
                                                args=args)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointDamaged(f'{where}: its arrays cannot be read ({first_line(e)}); use an '
                            'older step (checkpoints/<step>)') from e
  verify(restored, metadata, where)
  return restored
