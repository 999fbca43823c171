"""Key / shape checks of parameter trees and state dicts, with one error message format.

Used by model directories (trace_jax/model_dir.py), the CLIP converters' source checks
(trace_jax/convert/common.py) and the CRATE converter (trace_jax/convert/crate.py), so a bad
checkpoint is always reported the same way:

    <header>
      missing keys (2): a/b, a/c
      unexpected keys (1): a/d
      mis-shaped keys (1): a/e: (3,) != expected (4,)

Pure Python + NumPy shapes: imports nothing of trace_jax, so any layer may use it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

Shape = tuple[int, ...]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}; keys joined with '/' (the orbax / Flax path spelling)."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, key))
    else:
      out[key] = v
  return out


def shapes_of(flat: Mapping[str, Any]) -> dict[str, Shape]:
  """{key: array-like} -> {key: shape tuple} (works for arrays, ShapeDtypeStructs and scalars)."""
  return {k: tuple(np.shape(v)) for k, v in flat.items()}


def _some(items: Sequence[str], sep: str, limit: int | None) -> str:
  if limit is None or len(items) <= limit:
    return sep.join(items)
  return sep.join(items[:limit]) + f"{sep}... and {len(items) - limit} more"


def mismatch(want: Mapping[str, Shape], have: Mapping[str, Shape],
             same: Callable[[Shape, Shape], bool] | None = None) -> tuple[list[str], list[str], list[str]]:
  """(missing, unexpected, mis-shaped) key lists of ``have`` against ``want``, each sorted.

  ``same(have_shape, want_shape)`` decides shape equality (default ``==``); mis-shaped entries
  read ``'key: (have) != expected (want)'``.
  """
  same = same or (lambda a, b: a == b)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  wrong = sorted(f"{k}: {tuple(have[k])} != expected {tuple(want[k])}"
                 for k in set(want) & set(have) if not same(tuple(have[k]), tuple(want[k])))
  return missing, unexpected, wrong


def mismatch_message(want: Mapping[str, Shape], have: Mapping[str, Shape], header: str, *,
                     same: Callable[[Shape, Shape], bool] | None = None, limit: int | None = 40,
                     hint: str | None = None) -> str | None:
  """The multi-line message listing missing / unexpected / mis-shaped keys, or None if all match.

  ``limit`` caps how many keys of each kind are named (None: all). ``hint`` (if given) is appended
  as a last line when more than half of the expected keys are missing (wrong layout / model name).
  """
  missing, unexpected, wrong = mismatch(want, have, same)
  if not (missing or unexpected or wrong):
    return None
  lines = [header]
  if missing:
    lines.append(f"  missing keys ({len(missing)}): " + _some(missing, ", ", limit))
  if unexpected:
    lines.append(f"  unexpected keys ({len(unexpected)}): " + _some(unexpected, ", ", limit))
  if wrong:
    lines.append(f"  mis-shaped keys ({len(wrong)}): " + _some(wrong, "; ", limit))
  if hint and len(missing) > len(want) // 2:
    lines.append(f"  ({hint})")
  return "\n".join(lines)


def check_shapes(want: Mapping[str, Shape], have: Mapping[str, Shape], header: str, **kw) -> None:
  """Raise ValueError(``mismatch_message(...)``) unless ``have`` matches ``want`` key by key."""
  msg = mismatch_message(want, have, header, **kw)
  if msg is not None:
    raise ValueError(msg)
