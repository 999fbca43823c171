"""What changes when a run spans several processes (``jax.distributed``; docs/scaling.md).

* Pre-emption: a SIGTERM reaches ONE host. In a multi-process run jax's preemption service (started
  by ``jax.distributed.initialize``) owns SIGTERM: the notified process tells the coordination
  service, every process learns the same safe step, and ``multihost_utils.
  reached_preemption_sync_point(step)`` (orbax ``CheckpointManager.reached_preemption``) is True on
  all of them at that step, so all save the same step and stop. The single-process Python handler
  of ``loop._Preemption`` must then stay out of the way (installing it would replace jax's handler,
  and the host that got the signal would start a collective save alone while the others step on:
  a hang).
* Export: the params are sharded over every process' devices; ``host_params`` gathers them (a
  collective every process joins) so process 0 can write the model dir once.
"""
from __future__ import annotations

from typing import Any

import jax


def sigterm_handled_by_jax() -> bool:
  """True in a multi-process run whose SIGTERM goes to jax's preemption sync service."""
  if jax.process_count() == 1:
    return False
  from jax._src import distributed  # the service object has no public accessor
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


def host_params(params: Any) -> Any:
  """The full params as host numpy arrays on every process (all processes must call it)."""
  if jax.process_count() == 1:
    return jax.device_get(params)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(params, tiled=True)
