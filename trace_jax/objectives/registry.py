"""The objective registry (names -> builders, config sections -> defaults); see trace_jax/objectives."""
from __future__ import annotations

from typing import Callable

import ml_collections

_REGISTRY: dict[str, Callable] = {}
_DEFAULTS: dict[str, Callable[[], ml_collections.ConfigDict]] = {}


def register(*names: str, defaults: dict[str, Callable] | None = None):
  """Decorator: ``builder(config, info) -> Task`` serves ``config.loss.name`` in ``names``;
  ``defaults[section]()`` returns the ConfigDict stored as ``config.loss.<section>``."""
  def wrap(builder):
    for n in names:
      if n in _REGISTRY:
        raise ValueError(f"objective {n!r} registered twice")
      _REGISTRY[n] = builder
    _DEFAULTS.update(defaults or {})
    return builder
  return wrap
