"""Device mesh with axes ('data', 'fsdp'[, 'tensor']) and multi-host start-up.

Batch is split over data x fsdp (every device sees different examples); parameters and optimiser
state are split over fsdp (and tensor, when > 1) by the logical-axis rules in ``sharding.py``.
The mesh uses ``AxisType.Auto`` (GSPMD propagation inside ``jax.jit``): the model code carries no
explicit-sharding annotations, and jit's in/out shardings pin what matters.
"""
from __future__ import annotations

import os

import jax
import numpy as np

AXES = ("data", "fsdp", "tensor")


def maybe_initialize_distributed(enabled: bool | None = None) -> bool:
  """Call ``jax.distributed.initialize()`` for a multi-host run.

  Enabled by ``enabled=True`` (``train.py --distributed``) or the env var ``TRACE_JAX_DISTRIBUTED=1``;
  the coordinator / process ids come from the cluster environment (SLURM, TPU pods, Kubernetes
  GKE, ...) or from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, which
  ``jax.distributed.initialize`` reads itself. Must run before any other JAX call. Returns whether
  it initialised.
  """
  if enabled is None:
    enabled = os.environ.get("TRACE_JAX_DISTRIBUTED", "0") not in ("", "0", "false", "False")
  if not enabled:
    return False
  jax.distributed.initialize()
  return True


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, num_devices: int | None = None) -> tuple[int, int, int]:
  """Resolve one -1 entry so that data * fsdp * tensor == number of devices."""
  n = jax.device_count() if num_devices is None else num_devices
  dims = [data, fsdp, tensor]
  if sum(d == -1 for d in dims) > 1:
    raise ValueError(f"at most one mesh axis may be -1 (fill); got data={data} fsdp={fsdp} tensor={tensor}")
  known = int(np.prod([d for d in dims if d != -1]))
  if any(d == 0 or d < -1 for d in dims):
    raise ValueError(f"mesh axis sizes must be positive or -1; got data={data} fsdp={fsdp} tensor={tensor}")
  if -1 in dims:
    if n % known:
      raise ValueError(f"{n} devices cannot be split into a mesh with fixed axes of product {known}")
    dims[dims.index(-1)] = n // known
  if int(np.prod(dims)) != n:
    raise ValueError(f"mesh data={dims[0]} x fsdp={dims[1]} x tensor={dims[2]} needs {int(np.prod(dims))} "
                     f"devices; {n} are available")
  return tuple(dims)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ``Mesh`` over ``devices`` (default: all) with axes ('data', 'fsdp', 'tensor').

  The 'tensor' axis is always present (size 1 when unused) so that the sharding rules do not depend
  on the mesh; a size-1 axis costs nothing.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def single_device_mesh(device=None) -> jax.sharding.Mesh:
  """1 x 1 x 1 mesh (reference runs in tests)."""
  return make_mesh(1, 1, 1, devices=[device or jax.devices()[0]])
