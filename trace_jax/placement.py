"""Where inference arrays live: the devices a call runs on, and arrays placed on a 1-D 'data' mesh
over them (the rows of a call split over the devices, or replicated there).

Shared by MaskInversion (inversion/maskinversion.py) and the dataset-scale inference paths
(inference/explain.py, inference/embed.py), so that every one of them places arrays by one rule;
training's meshes are training/mesh.py's (data, fsdp, tensor).
"""
from __future__ import annotations

import jax
import numpy as np


def resolve_devices(devices) -> list:
  """None -> [the first local device] (one-device behaviour); 'all' -> every local device; an int n
  -> the first n local devices; a sequence of devices as given."""
  if devices is None:
    return [jax.local_devices()[0]]
  if isinstance(devices, str):
    if devices != "all":
      raise ValueError(f"devices must be None, 'all', a count or a list of devices; got {devices!r}")
    return list(jax.local_devices())
  if isinstance(devices, (int, np.integer)):
    local = jax.local_devices()
    if not 1 <= devices <= len(local):
      raise ValueError(f"devices={devices}: this process has {len(local)} local devices")
    return list(local[:devices])
  return list(devices)


def data_sharding(devs, shard: bool):
  """The NamedSharding of a 1-D 'data' mesh over ``devs``, axis 0 split (``shard``) or replicated;
  None for one device (the single-device program)."""
  if len(devs) == 1:
    return None
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  return NamedSharding(Mesh(np.asarray(devs), ("data",)), PartitionSpec("data") if shard else PartitionSpec())


def put(x, devs, shard: bool):
  """``x`` (an array or a pytree) onto ``devs``: axis 0 split over a 1-D 'data' mesh (``shard``) or
  replicated there. One device: a plain device_put (the single-device program)."""
  s = data_sharding(devs, shard)
  return jax.device_put(x, devs[0] if s is None else s)
