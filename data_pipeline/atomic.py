"""Writes files so that a reader (or a crash) never sees a half-written one.

Local paths: the bytes go to a uniquely named temporary file in the same folder, are synced,
and then replace the target in one rename. Object-store URLs (gs://...): an object becomes
visible only once fully uploaded, so it is written directly.
"""

from __future__ import annotations

import os
import uuid

from etils import epath


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically; the folder must exist."""
  path = os.fspath(path)
  if '://' in path:
    epath.Path(path).write_bytes(data)
    return
  # Same folder so os.replace is a rename on one filesystem; a unique name so concurrent
  # writers do not clobber each other's temporary files. Plain open() keeps the umask's mode.
  tmp_path = os.path.join(os.path.dirname(path) or '.',
                          f'.{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp')
  try:
    with open(tmp_path, 'xb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
