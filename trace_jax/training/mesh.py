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


def _env_int(name: str) -> int | None:
  v = os.environ.get(name, "").strip()
  if not v:
    return None
  try:
    n = int(v)
  except ValueError:
    raise ValueError(f"env var {name}={v!r} is not an integer") from None
  if n < 0:
    raise ValueError(f"env var {name}={v!r} must be >= 0")
  return n


def distributed_args() -> dict:
  """The ``jax.distributed.initialize`` arguments the environment sets explicitly.

  jax 0.10 reads ``JAX_COORDINATOR_ADDRESS`` (and ``JAX_LOCAL_DEVICE_IDS``) itself but not the process
  count or id: off a managed cluster (Cloud TPU, SLURM, GKE, whose ids it detects) those come from
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, read here. Unset ones are left to jax's cluster
  detection."""
  args = {}
  if (n := _env_int("JAX_NUM_PROCESSES")) is not None:
    if n == 0:
      raise ValueError("env var JAX_NUM_PROCESSES='0': a run needs at least one process")
    args["num_processes"] = n
  if (i := _env_int("JAX_PROCESS_ID")) is not None:
    args["process_id"] = i
  if ("num_processes" in args) != ("process_id" in args):
    raise ValueError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, on a cluster jax detects); "
                     f"got {args}")
  if args and args["process_id"] >= args["num_processes"]:
    raise ValueError(f"JAX_PROCESS_ID={args['process_id']} must be < JAX_NUM_PROCESSES={args['num_processes']}")
  if (t := _env_int("TRACE_JAX_DISTRIBUTED_TIMEOUT")) is not None:
    args["initialization_timeout"] = t
  return args


def distributed_requested() -> bool:
  """Whether the environment asks for a multi-host run: ``TRACE_JAX_DISTRIBUTED`` set and not 0/false."""
  return os.environ.get("TRACE_JAX_DISTRIBUTED", "0") not in ("", "0", "false", "False")


def maybe_initialize_distributed(enabled: bool | None = None) -> bool:
  """Call ``jax.distributed.initialize`` for a multi-host run.

  Enabled by ``enabled=True`` (``train.py --distributed``) or the env var ``TRACE_JAX_DISTRIBUTED=1``;
  the coordinator / process ids come from the cluster environment (Cloud TPU, SLURM, GKE, ...) or from
  ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0; jax reads it), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` (read by ``distributed_args``); ``TRACE_JAX_DISTRIBUTED_TIMEOUT`` (seconds, jax's
  default 300) bounds the wait for the other processes. Must run before any other JAX call. Returns
  whether it initialised.
  """
  if enabled is None:
    enabled = distributed_requested()
  if not enabled:
    return False
  if not jax.distributed.is_initialized():   # idempotent: the CLI may run several commands in one process
    jax.distributed.initialize(**distributed_args())
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
  types = (jax.sharding.AxisType.Auto,) * 3
  try:
    return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
  except NotImplementedError:
    # a TPU slice whose physical axes no subset of which multiplies to each mesh axis (v5p 4x4x4 and a
    # mesh 4 x 8 x 2: 8 and 2 are not products of the 4s): split the physical axes, as jax would with
    # allow_split_physical_axes. The mesh is valid; some collectives then cross a split torus axis.
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, AXES, axis_types=types)


def single_device_mesh(device=None) -> jax.sharding.Mesh:
  """1 x 1 x 1 mesh (reference runs in tests)."""
  return make_mesh(1, 1, 1, devices=[device or jax.devices()[0]])
