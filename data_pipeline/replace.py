"""``--overwrite`` that replaces only a program's own output, and only with a complete new one.

One place for what the dataset writer (:mod:`data_pipeline.writer`) and the export
(:mod:`mae_jax.tools.export`) do with an existing output folder:

* :func:`check_replaceable` refuses a folder unless every entry in it is one the program
  writes (its ``unrecognised`` function says which are not). A mae_jax workdir or checkpoint
  (``checkpoints/``, ``metrics.jsonl``, a run's ``config.json``, an Orbax step folder) is named
  as such. The error says what was found and that nothing was changed;
* :func:`check_writable` turns a read-only output folder into one error naming that folder,
  before any work, instead of a PermissionError on some temporary file later;
* :func:`written_aside` yields a new temporary sibling folder (``.<name>.tmp-<random>``, same
  parent, so renames stay on one filesystem); once the caller has filled it without error, the
  old output is renamed aside, the new one renamed into place and the old one deleted. On an
  error the temporary folder is deleted and the old output is untouched.

This module is under ``data_pipeline`` because ``data_pipeline`` must not import ``mae_jax``;
it knows a workdir's file names only as strings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from typing import Callable, Iterator

# How messages name the flag; the Python keyword is in brackets for callers of the functions.
PASS_OVERWRITE = 'pass --overwrite (overwrite=True)'
NOTHING_CHANGED = 'nothing was changed'
# Entries that mark a mae_jax workdir (mae_jax.checkpoint, mae_jax.writers, trainers/study.py)
# or an Orbax checkpoint folder (a step's, or an item's inside it).
_WORKDIR_ENTRIES = ('checkpoints', 'metrics.jsonl', 'study_config.json',
                    '_CHECKPOINT_METADATA', '_METADATA', 'manifest.ocdbt')


def _listing(names: list[str], limit: int = 5) -> str:
  names = sorted(names)
  more = f', ... ({len(names) - limit} more)' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def _entry(path: str, name: str) -> str:
  """``name`` as messages show it: folders with a trailing slash."""
  return name + '/' if os.path.isdir(os.path.join(path, name)) else name


def _is_run_config(path: str) -> bool:
  """Whether ``path`` is the resolved config a mae_jax run writes into its workdir."""
  try:
    with open(path) as f:
      values = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(values, dict) and 'checkpoint' in values and 'dataset' in values


def workdir_entries(path: str) -> list[str]:
  """The entries of folder ``path`` that mark a mae_jax workdir or an Orbax checkpoint."""
  found = []
  for name in os.listdir(path):
    full = os.path.join(path, name)
    if (name in _WORKDIR_ENTRIES or 'orbax-checkpoint-tmp' in name
        or name.startswith('events.out.tfevents')
        or (name == 'config.json' and _is_run_config(full))
        or (os.path.isdir(full) and any(  # checkpoints/<step>/{state,metadata}
            os.path.exists(os.path.join(full, marker))
            for marker in ('_CHECKPOINT_METADATA', '_METADATA', 'state')))):
      found.append(_entry(path, name))
  return found


def check_replaceable(path: str, what: str, unrecognised: Callable[[str], list[str]]) -> None:
  """Raises FileExistsError unless the existing ``path`` is ``what`` (e.g. 'a dataset the
  writer made'): a folder holding no workdir or checkpoint and nothing ``unrecognised(path)``
  lists (descriptions of the entries that ``what`` does not have)."""
  if not os.path.isdir(path):
    raise FileExistsError(f'{path} is a file, not {what}; --overwrite replaces only {what}, '
                          f'so {NOTHING_CHANGED}')
  workdir = workdir_entries(path)
  if workdir:
    raise FileExistsError(f'{path} holds a mae_jax workdir or checkpoint ({_listing(workdir)}); '
                          f'--overwrite replaces only {what}, so {NOTHING_CHANGED}')
  other = unrecognised(path)
  if other:
    raise FileExistsError(f'{path} holds files that are not part of {what} ({_listing(other)}); '
                          f'--overwrite replaces only {what}, so {NOTHING_CHANGED}')


def unrecognised_entries(path: str, is_own: Callable[[str, str], bool]) -> list[str]:
  """Entries ``name`` of folder ``path`` for which ``is_own(path, name)`` is false."""
  return [_entry(path, name) for name in os.listdir(path) if not is_own(path, name)]


def check_writable(output: str, replacing: bool = False) -> None:
  """Raises PermissionError naming the folder unless ``output`` can be written: created (its
  nearest existing ancestor is writable), written into, or (``replacing``) renamed aside and
  replaced by a sibling (its parent and itself are writable)."""
  if replacing:
    folders = [os.path.dirname(output), output]
  elif os.path.isdir(output):
    folders = [output]
  else:
    folder = os.path.dirname(output)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
      folder = os.path.dirname(folder)
    folders = [folder]
  for folder in folders:
    if not os.access(folder, os.W_OK | os.X_OK):
      raise PermissionError(f'cannot write the output {output}: the folder {folder} is read-only '
                            f'(or not yours); {NOTHING_CHANGED}')


def check_output(output: str, overwrite: bool, what: str,
                 unrecognised: Callable[[str], list[str]]) -> bool:
  """The checks before writing ``output`` with :func:`written_aside`; returns whether an
  existing ``output`` will be replaced. Without ``overwrite`` any existing ``output`` is refused;
  with it, only ``what`` (see :func:`check_replaceable`)."""
  exists = os.path.lexists(output)
  if exists:
    check_replaceable(output, what, unrecognised)
    if not overwrite:
      raise FileExistsError(f'{output} exists; {PASS_OVERWRITE} to replace it')
  check_writable(output, replacing=exists)
  return exists


def _swap(new: str, output: str) -> None:
  """Renames ``new`` to ``output``, replacing the folder there: old aside, new in, old deleted."""
  parent, name = os.path.split(output)
  old = None
  if os.path.lexists(output):
    old = os.path.join(parent, f'.{name}.old-{uuid.uuid4().hex[:8]}')
    os.replace(output, old)
  try:
    os.replace(new, output)
  except BaseException:
    if old:
      os.replace(old, output)
    raise
  if old:
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(old):
      warnings.warn(f'{output} was replaced, but its old version {old} could not be deleted')


@contextlib.contextmanager
def written_aside(output: str, check: Callable[[], None] | None = None) -> Iterator[str]:
  """Yields an empty temporary folder beside ``output``; after the block, it becomes ``output``.

  ``check()`` runs again just before the swap (the old output may have changed during a long
  build). On any error in the block or the check, the temporary folder is deleted and ``output``
  is left as it was.
  """
  output = os.path.abspath(output)
  parent, name = os.path.split(output)
  tmp = os.path.join(parent, f'.{name}.tmp-{uuid.uuid4().hex[:8]}')
  os.mkdir(tmp)  # Not tempfile.mkdtemp: that makes it 0700; this keeps the umask's mode.
  try:
    yield tmp
    if check:
      check()
    _swap(tmp, output)
  finally:
    if os.path.lexists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
