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


def architecture_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = 'model') -> list[str]:
  """Differences between two nested model-config dicts, as 'model.field: saved != current'."""
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, '<absent>'), current.get(key, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      out.extend(architecture_differences(a, b, f'{prefix}.{key}'))
    elif a != b:
      out.append(f'{prefix}.{key}: checkpoint {a!r} != config {b!r}')
  return out
