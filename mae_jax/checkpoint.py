"""Orbax checkpoints of the train state plus the metadata that says what was trained.

Layout: ``workdir/checkpoints/<step>/{state,metadata}``. ``state`` is the sharded pytree
(step, params, opt_state); ``metadata`` is JSON: the resolved config, the model's architecture
and the input contract (bands, units, clipping, quantisation, normalisation statistics, tile and
patch size). Saves are asynchronous, every ``config.checkpoint.every_steps`` steps and at the
end, keeping ``config.checkpoint.keep``. Orbax commits a step by an atomic rename, so an
interrupted save never becomes the latest step. Restore takes an abstract target carrying the
shardings of the *current* mesh, so a checkpoint saved on one mesh restores on another.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

STATE = 'state'
METADATA = 'metadata'


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

  def save(self, step: int, state: Any, metadata: dict[str, Any], force: bool = False) -> bool:
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 METADATA: ocp.args.JsonSave(metadata)})
    return self.manager.save(step, args=args, force=force)

  def restore_metadata(self, step: int) -> dict[str, Any]:
    restored = self.manager.restore(step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))
    return dict(restored[METADATA])

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores ``step`` into the shapes, dtypes and shardings of ``abstract_state``."""
    args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                 METADATA: ocp.args.JsonRestore()})
    restored = self.manager.restore(step, args=args)
    return restored[STATE], dict(restored[METADATA])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _as_json(value: Any) -> Any:
  """Tuples as lists, at any depth: checkpoint metadata went through JSON, configs did not."""
  if isinstance(value, (list, tuple)):
    return [_as_json(v) for v in value]
  return value


def architecture_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = 'model') -> list[str]:
  """Differences between two nested model-config dicts, as 'model.field: saved != current'."""
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, '<absent>'), current.get(key, '<absent>')
    a, b = _as_json(a), _as_json(b)
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
  count may differ from the saving run's and nothing else of the checkpoint is loaded.
  """
  args = ocp.args.PyTreeRestore(item=target,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  return ocp.PyTreeCheckpointer().restore(epath.Path(directory) / str(step) / STATE, args=args)
