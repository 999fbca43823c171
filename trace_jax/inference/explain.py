"""Many prompts on one image in bounded chunks, and image batches over every local device.

    out = explain_prompts("gradcam", model, params, image, ids_P, max_prompts=64, devices="all")

The P prompts of one image run in chunks of ``max_prompts`` (the last padded with copies of its
last prompt, whose rows are dropped): one compiled program whatever P is, and memory bounded by
the chunk. The pairs of a chunk are independent (docs/attribution.md), so the chunks equal the
all-at-once call.

* LeGrad (ViT tower), GradCAM, rollout, Chefer and saliency (ViT and SigLIP towers, where the
  method supports them): the image tower runs ONCE per image. ``programs`` gives two jitted
  programs: ``prepare(params, image [H, W, 3]) -> state`` runs the image forward and keeps what no
  prompt changes, and ``chunk(params, state, ids [C, L], (H, W))`` takes that state, not the
  pixels: it encodes the chunk's prompts and runs the method's per-prompt part, vmapped over them.

  - GradCAM / Chefer / saliency (``method_programs``): the state is the module's ``image_state``:
    the image embedding, the attention probabilities the method reads, and the forward's pullback
    (``jax.vjp``'s, a pytree of residuals, so one jit returns it and the next applies it; the
    chunk's backwards are linear maps of those residuals, no forward). ``chunk`` is the module's
    ``prompt_maps``. Rollout is class-agnostic: its state is the map itself (and the embedding for
    the scores).
  - LeGrad (``legrad_programs``): ``prepare`` keeps the un-normalised embedding z0 and each used
    block's input and attention probabilities (``maskinversion.prepare``, exact mode: the state
    MaskInversion's chunks share); ``chunk`` runs the vjp of each used block's tail
    (``maskinversion.grid_fn_of``), then ``legrad.grid_to_map``. A CRATE tower is refused by
    ``require_vit`` naming it, as ``explain('legrad')`` does.
* Every other case goes through ``attribution.api.explain`` per chunk, so each chunk runs that
  method's own image forward: LeGrad on SigLIP (the authors' SigLIP path), and M2IB and RISE,
  whose image forwards depend on more than the image: M2IB injects noise drawn per PAIR into the
  image tower (each chunk gets its rows of the keys of all P pairs, ``m2ib.pair_keys_of``, so its
  noise is the all-at-once call's); RISE's forwards are of the image times each of its masks (an
  array setting, traced), num_masks forwards that are repeated per chunk (a split keeping the
  masked embeddings would remove that; not done). Array settings (a key, masks) and settings a
  split method does not take also go this way (explain then decides).

``devices`` (None = one device; 'all' / n / list): the chunk's prompts are split over a 1-D 'data'
mesh (``NamedSharding``) and the image (or its prepared state) is replicated; for B image-text
pairs, the images and texts are split together. Results equal the one-device ones
(tests/test_dataset_inference.py, tests/test_prompt_chunks.py).
"""
from __future__ import annotations

import functools
import inspect

import numpy as np

from trace_jax.placement import put, resolve_devices

LEGRAD_SETTINGS = ("layers", "pos_interp")
# methods whose module splits explain into image_state + prompt_maps (the image forward once)
SPLIT_METHODS = ("gradcam", "rollout", "chefer", "saliency")


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


@functools.lru_cache(maxsize=64)
def method_programs(method: str, cfg, settings: tuple):
  """(prepare, chunk) of a split method (``SPLIT_METHODS``), jitted once per (method, model config,
  settings); ``settings``: explain's keyword settings as sorted (name, value) pairs, all static.

  ``prepare(params, image [H, W, 3]) -> state`` (the module's ``image_state`` of the one image);
  ``chunk(params, state, ids [C, L], (H, W)) -> dict`` of [C, ...] rows, the keys and values of
  ``explain(method, ...)`` for the one image and those C prompts (SigLIP: 'score' is the sigmoid
  logit and 'cosine' the cosine, as ``api.explain`` reports)."""
  import jax
  from trace_jax.attribution import common
  from trace_jax.attribution.api import method_module
  from trace_jax.models import build
  mod = method_module(method)
  model = build(cfg)
  image_kw, prompt_kw = _route_settings(mod, dict(settings))

  def prepare(params, image):
    return mod.image_state(model, params, image, **image_kw)

  def chunk(params, state, ids, hw):
    targets = common.text_targets(model, params, ids)  # [C, E], L2-normalised
    out = mod.prompt_maps(model, params, state, targets, hw, ids, **prompt_kw)
    return common.sigmoid_scores(model, params, out)

  return jax.jit(prepare), jax.jit(chunk, static_argnums=3)


def _keywords(fn) -> set:
  return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


def _route_settings(mod, settings: dict) -> tuple[dict, dict]:
  """explain's settings -> (image_state's, prompt_maps's) keywords; a setting may go to both (rollout's
  head_fusion fuses the image's and the text's heads). One neither takes is a TypeError, as
  explain's own would be."""
  img, per = _keywords(mod.image_state), _keywords(mod.prompt_maps)
  unknown = sorted(set(settings) - img - per)
  if unknown:
    raise TypeError(f"{mod.__name__}.explain got unexpected settings {unknown}")
  return ({k: v for k, v in settings.items() if k in img}, {k: v for k, v in settings.items() if k in per})


def programs(method: str, model, settings: dict):
  """The (prepare, chunk) pair that runs ``method``'s image forward once per image with these
  settings (module docstring), or None where ``method`` runs ``api.explain`` per chunk."""
  from trace_jax.attribution.api import freeze_setting, is_array_setting
  if method == "legrad":
    if model.cfg.vision.kind == "siglip" or not set(settings) <= set(LEGRAD_SETTINGS):
      return None
    from trace_jax.attribution import legrad as lg
    from trace_jax.models.blocks import require_vit
    require_vit(model.cfg, "LeGrad")
    kw = {k: v.default for k, v in inspect.signature(lg.explain).parameters.items() if k in LEGRAD_SETTINGS}
    kw.update(settings)
    return legrad_programs(model.cfg, lg.resolve_layers(kw["layers"], model.cfg.vision.layers),
                           kw["pos_interp"])
  if method in SPLIT_METHODS and not any(is_array_setting(v) for v in settings.values()):
    return method_programs(method, model.cfg, tuple(sorted((k, freeze_setting(v)) for k, v in settings.items())))
  return None


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


def _chunk_size(limit, n: int, num_devices: int) -> int:
  """Rows per call: at most ``limit`` (None: all n), rounded up to a multiple of the device count
  (a call's rows are split over the devices)."""
  size = n if limit is None else max(1, min(int(limit), n))
  return -(-size // num_devices) * num_devices


def _m2ib_keys(method: str, settings: dict, n: int):
  """M2IB draws each pair's noise from ``split(key, n)``: the keys of all n pairs [.., n] (pairs on
  axis 1; ``key`` is popped from ``settings``), so each chunk gets its pairs' keys and the noise of
  the all-at-once call. None for another method or given ``pair_keys``."""
  if method != "m2ib" or settings.get("pair_keys") is not None:
    return None
  from trace_jax.attribution.m2ib import pair_keys_of
  return np.asarray(pair_keys_of(settings.pop("key", None), n))


def _run_chunks(call, rows: dict, n: int, size: int, devs, pair_keys=None) -> dict:
  """``call(**chunk)`` over n rows in chunks of ``size``, merged into one numpy dict of [n, ...] rows.

  ``rows``: name -> array [n, ...]; a chunk's slice is padded to ``size`` with copies of its last
  row (fixed shapes: one program) and split over the devices' 'data' axis. ``pair_keys`` [.., n]
  (M2IB) are cut the same way along axis 1, stay on the host, and are passed as ``pair_keys``."""
  outs = []
  for s in range(0, n, size):
    part = {k: put(_pad_rows(a[s:s + size], size), devs, True) for k, a in rows.items()}
    if pair_keys is not None:
      part["pair_keys"] = _pad_rows(pair_keys[:, s:s + size], size, 1)
    outs.append(({k: np.asarray(v) for k, v in call(**part).items()}, min(size, n - s)))
  return _merge(outs, size)


def explain_prompts(method: str, model, params, image, ids, *, max_prompts: int | None = None,
                    devices=None, **settings) -> dict:
  """``explain(method, ...)`` of ONE image [H, W, 3] (or [1, H, W, 3]) with P prompts ids [P, L], in
  chunks of at most ``max_prompts``. Returns the numpy dict of the all-at-once call ([P, ...] rows).
  LeGrad (ViT), GradCAM, rollout, Chefer, saliency: one image forward for all chunks (``programs``)."""
  image, ids = _one_image(image, ids)
  p = ids.shape[0]
  devs = resolve_devices(devices)
  size = _chunk_size(max_prompts, p, len(devs))
  params_d = put(params, devs, False)
  progs = programs(method, model, settings)
  if progs is not None:
    prepare, chunk = progs
    state = prepare(params_d, put(image[0], devs, False))  # the image tower, once
    hw = image.shape[1:3]
    return _run_chunks(lambda ids: chunk(params_d, state, ids, hw), {"ids": ids}, p, size, devs)
  from trace_jax.attribution.api import explain
  keys = _m2ib_keys(method, settings, p)
  image_d = put(image, devs, False)
  return _run_chunks(lambda ids, **kw: explain(method, model, params_d, image_d, ids, **{**settings, **kw}),
                     {"ids": ids}, p, size, devs, keys)


def explain_pairs(method: str, model, params, images, ids, *, batch_size: int = 8, devices=None,
                  **settings) -> dict:
  """B image-text pairs (images [B, H, W, 3], ids [B, L]) in calls of ``batch_size`` pairs split over
  the devices (the last call padded with copies of its last pair). Numpy dict of [B, ...] rows.
  M2IB: pairs get the noise keys of the all-at-once call, as in :func:`explain_prompts`."""
  from trace_jax.attribution.api import explain
  images, ids = np.asarray(images, np.float32), np.asarray(ids)
  b = images.shape[0]
  if ids.shape[0] != b:
    raise ValueError(f"explain_pairs takes B images and B texts; got {b} and {ids.shape[0]}")
  devs = resolve_devices(devices)
  size = _chunk_size(batch_size, b, len(devs))
  keys = _m2ib_keys(method, settings, b)
  params_d = put(params, devs, False)
  return _run_chunks(lambda images, ids, **kw: explain(method, model, params_d, images, ids, **{**settings, **kw}),
                     {"images": images, "ids": ids}, b, size, devs, keys)
