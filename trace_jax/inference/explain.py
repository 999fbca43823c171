"""Many prompts on one image in bounded chunks, and image batches over every local device.

    out = explain_prompts("legrad", model, params, image, ids_P, max_prompts=64, devices="all")

The P prompts of one image run in chunks of ``max_prompts`` (the last padded with copies of its
last prompt, whose rows are dropped): one compiled program whatever P is, and memory bounded by
the chunk. The pairs of a chunk are independent (docs/attribution.md), so the chunks equal the
all-at-once call.

* LeGrad on a ViT tower: the image tower runs ONCE per image. One jitted program (``prepare``)
  computes the image forward and keeps what no prompt changes: the un-normalised embedding z0 and
  each used block's input and attention probabilities (``maskinversion.prepare``, exact mode: the
  state MaskInversion's chunks share). Each chunk's program takes that state, not the pixels: it
  encodes the chunk's prompts and runs LeGrad's per-prompt part (the vjp of each used block's tail,
  ``maskinversion.grid_fn_of``, vmapped over the prompts), then ``legrad.grid_to_map``. A CRATE
  tower is refused by ``require_vit`` naming it, as ``explain('legrad')`` does.
* Every other method (and LeGrad's SigLIP path) goes through ``attribution.api.explain`` per
  chunk, so each chunk runs that method's own image forward. M2IB draws its noise per pair from
  ``split(key, P)``, so each chunk gets its rows of the keys of all P pairs
  (``m2ib.pair_keys_of``) and its noise is the all-at-once call's.

``devices`` (None = one device; 'all' / n / list): the chunk's prompts are split over a 1-D 'data'
mesh (``NamedSharding``) and the image (or its prepared state) is replicated; for B image-text
pairs, the images and texts are split together. Results equal the one-device ones
(tests/test_dataset_inference.py).
"""
from __future__ import annotations

import functools

import numpy as np

from trace_jax.inversion.maskinversion import _put as _mesh_put  # one copy of the mesh placement

LEGRAD_SETTINGS = ("layers", "pos_interp")


@functools.lru_cache(maxsize=32)
def legrad_programs(cfg, layer_ids: tuple, pos_interp: str):
  """(prepare, chunk), jitted once per (model config, layers, pos_interp):

  ``prepare(params, image [H, W, 3]) -> state`` (z0 [E], per layer (x_prev [N, W], attn [h, N, N]),
  and the score's image embedding); ``chunk(params, state, ids [C, L], (H, W)) -> {'grid' [C, gh, gw] raw,
  'map' [C, H, W] in [0, 1], 'score' [C]}`` (shapes and values of ``explain('legrad')``)."""
  import jax
  import jax.numpy as jnp
  from trace_jax.attribution import common
  from trace_jax.attribution import legrad as lg
  from trace_jax.inversion import maskinversion as mi
  from trace_jax.models import build, l2_normalize
  model = build(cfg)
  ps = cfg.vision.patch_size

  def prepare(params, image):
    state = mi.prepare(model, params, image, layer_ids=layer_ids, mode="exact", pos_interp=pos_interp)
    # explain()'s score is the cosine with the model-default forward (api.pair_scores): the same
    # forward unless LeGrad's pos_interp differs from the model's (and the size is not native)
    if pos_interp != cfg.vision.pos_interp and image.shape[:2] != (cfg.vision.image_size,) * 2:
      state["emb"] = model.apply({"params": params}, image, method="encode_image")[0]
    else:
      state["emb"] = state["z0"]
    return state

  def chunk(params, state, ids, hw):
    q = common.text_targets(model, params, ids)                      # [C, E], L2-normalised
    grid_fn = mi.grid_fn_of(model, params, state, layer_ids, (hw[0] // ps, hw[1] // ps), "exact")
    grid = jax.vmap(grid_fn)(q)
    return {"grid": grid, "map": lg.grid_to_map(grid, ps),
            "score": jnp.sum(l2_normalize(state["emb"])[None] * q, -1)}

  return jax.jit(prepare), jax.jit(chunk, static_argnums=3)


def _one_image(image, ids):
  image = np.asarray(image, np.float32)
  if image.ndim == 3:
    image = image[None]
  if image.ndim != 4 or image.shape[0] != 1:
    raise ValueError(f"explain_prompts takes ONE image [H, W, 3]; got shape {image.shape}")
  ids = np.asarray(ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.shape[0] == 0:
    raise ValueError("no prompts given")
  return image, ids


def _pad_rows(a, size: int, axis: int = 0):
  """Pad axis ``axis`` to ``size`` with copies of its last entry (fixed shapes: one program)."""
  n = a.shape[axis]
  return a if n == size else np.concatenate([a, np.repeat(np.take(a, [-1], axis), size - n, axis)], axis)


def _merge(outs, size: int) -> dict:
  """Chunk outputs [(numpy dict, real rows)] -> one dict: per-row keys concatenated (padding dropped)."""
  return {key: np.concatenate([o[key][:n] for o, n in outs]) if v.ndim >= 1 and v.shape[0] == size
          else v for key, v in outs[0][0].items()}


def explain_prompts(method: str, model, params, image, ids, *, max_prompts: int | None = None,
                    devices=None, **settings) -> dict:
  """``explain(method, ...)`` of ONE image [H, W, 3] (or [1, H, W, 3]) with P prompts ids [P, L], in
  chunks of at most ``max_prompts``. Returns the numpy dict of the all-at-once call ([P, ...] rows)."""
  from trace_jax.inversion.maskinversion import resolve_devices
  image, ids = _one_image(image, ids)
  p = ids.shape[0]
  devs = resolve_devices(devices)
  size = p if max_prompts is None else max(1, min(int(max_prompts), p))
  size = -(-size // len(devs)) * len(devs)  # prompts on the data axis: a multiple of the device count
  params_d = _mesh_put(params, devs, False)
  starts = range(0, p, size)
  if method == "legrad" and model.cfg.vision.kind != "siglip" and set(settings) <= set(LEGRAD_SETTINGS):
    import inspect
    from trace_jax.attribution import legrad as lg
    from trace_jax.models.blocks import require_vit
    require_vit(model.cfg, "LeGrad")
    kw = {k: v.default for k, v in inspect.signature(lg.explain).parameters.items() if k in LEGRAD_SETTINGS}
    kw.update(settings)
    prepare, chunk = legrad_programs(model.cfg, lg.resolve_layers(kw["layers"], model.cfg.vision.layers),
                                     kw["pos_interp"])
    state = prepare(params_d, _mesh_put(image[0], devs, False))  # the image tower, once
    outs = [({k: np.asarray(v) for k, v in chunk(params_d, state, _mesh_put(
        _pad_rows(ids[s:s + size], size), devs, True), image.shape[1:3]).items()}, min(size, p - s))
            for s in starts]
    return _merge(outs, size)
  from trace_jax.attribution.api import explain
  keys = None
  if method == "m2ib" and settings.get("pair_keys") is None:
    from trace_jax.attribution.m2ib import pair_keys_of
    keys = np.asarray(pair_keys_of(settings.pop("key", None), p))
  image_d = _mesh_put(image, devs, False)
  outs = []
  for s in starts:
    kw = dict(settings)
    if keys is not None:
      kw["pair_keys"] = _pad_rows(keys[:, s:s + size], size, 1)
    out = explain(method, model, params_d, image_d, _mesh_put(_pad_rows(ids[s:s + size], size), devs, True), **kw)
    outs.append(({key: np.asarray(v) for key, v in out.items()}, min(size, p - s)))
  return _merge(outs, size)


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
  size = -(-max(1, min(int(batch_size), b)) // len(devs)) * len(devs)
  keys = None
  if method == "m2ib" and settings.get("pair_keys") is None:
    from trace_jax.attribution.m2ib import pair_keys_of
    keys = np.asarray(pair_keys_of(settings.pop("key", None), b))
  params_d = _mesh_put(params, devs, False)
  outs = []
  for s in range(0, b, size):
    kw = dict(settings)
    if keys is not None:
      kw["pair_keys"] = _pad_rows(keys[:, s:s + size], size, 1)
    out = explain(method, model, params_d, _mesh_put(_pad_rows(images[s:s + size], size), devs, True),
                  _mesh_put(_pad_rows(ids[s:s + size], size), devs, True), **kw)
    outs.append(({key: np.asarray(v) for key, v in out.items()}, min(size, b - s)))
  return _merge(outs, size)
