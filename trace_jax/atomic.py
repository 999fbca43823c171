"""Atomic file writes, the one helper every writer of outputs uses: a reader, or a run killed
mid-write, sees the old file or the new one, never half of one.

    write_with(path, lambda tmp: np.savez(tmp, **arrays))   # any writer that takes a path
    write_bytes(path, data); write_text(path, text); write_json(path, obj)

The data goes to a hidden temporary next to ``path`` (same folder, so the rename cannot cross file
systems; the process id in its name, so two writers never share one; the extension kept, since
``np.savez`` and PIL choose the format by it), is fsync'd, renamed onto ``path`` and the folder
fsync'd (the rename itself survives a power cut). A failed write removes its temporary and leaves
``path`` as it was.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable


def _fsync_dir(directory: str) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError:   # some file systems refuse fsync on a folder: the rename is still atomic
    pass
  finally:
    os.close(fd)


def write_with(path: str, write: Callable[[str], Any]) -> str:
  """``write(tmp)`` writes the whole file to ``tmp``; it then replaces ``path`` atomically. Returns ``path``."""
  directory = os.path.dirname(os.path.abspath(path))
  root, ext = os.path.splitext(os.path.basename(path))
  tmp = os.path.join(directory, f".{root}.tmp{os.getpid()}{ext}")
  try:
    write(tmp)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  _fsync_dir(directory)
  return path


def write_bytes(path: str, data: bytes) -> str:
  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(data)
  return write_with(path, write)


def write_text(path: str, text: str) -> str:
  return write_bytes(path, text.encode())


def write_json(path: str, obj, **dump_kwargs) -> str:
  """``obj`` as JSON (``dump_kwargs`` as ``json.dumps``'s, e.g. indent=2, sort_keys=True), newline-terminated."""
  return write_text(path, json.dumps(obj, **dump_kwargs) + "\n")
