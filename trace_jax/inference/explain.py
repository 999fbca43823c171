"""Many prompts on one image in bounded chunks, and image batches over every local device.

    out = explain_prompts("legrad", model, params, image, ids_P, max_prompts=64, devices="all")

Every call goes through ``attribution.api.explain`` (any method, any model kind it supports). The P
prompts of one image run in calls of ``max_prompts`` (the last padded with copies of its last
prompt, whose rows are dropped): one compiled program whatever P is, and memory bounded by the chunk.
The pairs of one call are independent (docs/attribution.md), so the chunks equal the all-at-once
call; M2IB draws its noise per pair from ``split(key, P)``, so each chunk gets its rows of the keys
of all P pairs (``m2ib.pair_keys_of``) and its noise is the all-at-once call's.

Cost: each chunk repeats the image forward (one forward per ``max_prompts`` prompts; the methods'
per-prompt backward passes dominate once the chunk holds more than a few prompts).

``devices`` (None = one device; 'all' / n / list): the chunk's prompts are split over a 1-D 'data'
mesh (``NamedSharding``) and the image is replicated; for B image-text pairs, the images and texts
are split together. Results equal the one-device ones (tests/test_dataset_inference.py).
"""
from __future__ import annotations

import numpy as np


def _mesh_put(x, devs, shard: bool):
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  if len(devs) == 1:
    return jax.device_put(x, devs[0])
  mesh = Mesh(np.asarray(devs), ("data",))
  return jax.device_put(x, NamedSharding(mesh, PartitionSpec("data") if shard else PartitionSpec()))


def explain_prompts(method: str, model, params, image, ids, *, max_prompts: int | None = None,
                    devices=None, **settings) -> dict:
  """``explain(method, ...)`` of ONE image [H, W, 3] (or [1, H, W, 3]) with P prompts ids [P, L], in
  chunks of at most ``max_prompts``. Returns the numpy dict of the all-at-once call ([P, ...] rows)."""
  import jax
  from trace_jax.attribution.api import explain
  from trace_jax.inversion.maskinversion import resolve_devices
  image = np.asarray(image, np.float32)
  if image.ndim == 3:
    image = image[None]
  if image.ndim != 4 or image.shape[0] != 1:
    raise ValueError(f"explain_prompts takes ONE image [H, W, 3]; got shape {image.shape}")
  ids = np.asarray(ids)
  if ids.ndim == 1:
    ids = ids[None]
  p = ids.shape[0]
  if p == 0:
    raise ValueError("no prompts given")
  devs = resolve_devices(devices)
  nd = len(devs)
  size = p if max_prompts is None else max(1, min(int(max_prompts), p))
  size = -(-size // nd) * nd  # prompts on the data axis: a multiple of the device count
  keys = None
  if method == "m2ib" and settings.get("pair_keys") is None:
    from trace_jax.attribution.m2ib import pair_keys_of
    keys = np.asarray(pair_keys_of(settings.pop("key", None), p))
  params_d = _mesh_put(params, devs, False)
  image_d = _mesh_put(image, devs, False)
  outs = []
  for start in range(0, p, size):
    part = ids[start:start + size]
    n = part.shape[0]
    if n < size:  # fixed shape: one program
      part = np.concatenate([part, np.repeat(part[-1:], size - n, 0)])
    kw = dict(settings)
    if keys is not None:
      k = keys[:, start:start + size]
      if n < size:
        k = np.concatenate([k, np.repeat(k[:, -1:], size - n, 1)], 1)
      kw["pair_keys"] = k
    out = explain(method, model, params_d, image_d, _mesh_put(part, devs, True), **kw)
    outs.append(({key: np.asarray(v) for key, v in out.items()}, n))
  first = outs[0][0]
  res = {}
  for key, v in first.items():
    if v.ndim >= 1 and v.shape[0] == size:
      res[key] = np.concatenate([o[key][:n] for o, n in outs])
    else:
      res[key] = v
  return res


def explain_pairs(method: str, model, params, images, ids, *, batch_size: int = 8, devices=None,
                  **settings) -> dict:
  """B image-text pairs (images [B, H, W, 3], ids [B, L]) in calls of ``batch_size`` pairs split over
  the devices (the last call padded with copies of its last pair). Numpy dict of [B, ...] rows.
  M2IB: pairs get the noise keys of the all-at-once call, as in :func:`explain_prompts`."""
  from trace_jax.attribution.api import explain
  from trace_jax.inversion.maskinversion import resolve_devices
  images, ids = np.asarray(images, np.float32), np.asarray(ids)
  b = images.shape[0]
  if ids.shape[0] != b:
    raise ValueError(f"explain_pairs takes B images and B texts; got {b} and {ids.shape[0]}")
  devs = resolve_devices(devices)
  nd = len(devs)
  size = -(-max(1, min(int(batch_size), b)) // nd) * nd
  keys = None
  if method == "m2ib" and settings.get("pair_keys") is None:
    from trace_jax.attribution.m2ib import pair_keys_of
    keys = np.asarray(pair_keys_of(settings.pop("key", None), b))
  params_d = _mesh_put(params, devs, False)
  pad = lambda a, n, ax=0: a if n == size else np.concatenate(
      [a, np.repeat(np.take(a, [-1], ax), size - n, ax)], ax)
  outs = []
  for start in range(0, b, size):
    n = min(size, b - start)
    kw = dict(settings)
    if keys is not None:
      kw["pair_keys"] = pad(keys[:, start:start + size], n, 1)
    out = explain(method, model, params_d, _mesh_put(pad(images[start:start + size], n), devs, True),
                  _mesh_put(pad(ids[start:start + size], n), devs, True), **kw)
    outs.append(({key: np.asarray(v) for key, v in out.items()}, n))
  return {key: np.concatenate([o[key][:n] for o, n in outs]) if v.ndim >= 1 and v.shape[0] == size
          else v for key, v in outs[0][0].items()}
