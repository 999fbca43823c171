"""One entry point for every attribution method.

    out = explain('legrad', model, params, images, ids)            # B images + B texts -> B maps
    out = explain('gradcam', model, params, image[None], ids_P)     # 1 image + P texts -> P maps
    out = explain('legrad', model, params, images, query=vecs)      # arbitrary query vectors [P, E]

Returns a dict with at least ``grid`` [P, gh, gw] (min-max normalised), ``map`` [P, H, W] in [0, 1]
and ``score`` [P] (the pair's image-text cosine; for a SigLIP model its sigmoid logit
``exp(t) cos + b``, the cosine then under ``cosine``); methods add their own keys (``raw`` grids, ``text``
token attributions, ...). Pairing rules: ``trace_jax.attribution.common`` / docs/attribution.md.

Every method module exposes ``explain(model, params, images, ids=None, *, query=None, **settings)``;
this module imports them lazily and ``jax.jit``s them once per (method, model, settings): settings
that are arrays (a PRNG ``key``, RISE ``masks``) are traced arguments, all others are static.
A module may set ``JIT = False`` to run un-jitted (it then jits its own pieces).
"""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.attribution import common

METHODS = ("legrad", "gradcam", "rollout", "chefer", "saliency", "rise", "m2ib")

# Methods whose per-prompt part is vmapped over ONE image forward (for docs / the CLI).
ONE_FORWARD = ("legrad", "gradcam", "rollout", "chefer", "saliency")


def method_module(method: str):
  if method not in METHODS:
    raise ValueError(f"unknown attribution method {method!r}; expected one of {METHODS}")
  try:
    return importlib.import_module(f"trace_jax.attribution.{method}")
  except ModuleNotFoundError as e:
    if e.name == f"trace_jax.attribution.{method}":
      raise ValueError(f"attribution method {method!r} is not available in this build "
                       f"(trace_jax/attribution/{method}.py is missing)") from e
    raise


def is_array_setting(v) -> bool:
  """A method setting that is an array (traced, not part of the compiled program's cache key)."""
  return isinstance(v, (jax.Array, np.ndarray))


def freeze_setting(v):
  """A hashable form of a non-array setting (lists -> tuples, dicts -> sorted item tuples): a jit static key."""
  if isinstance(v, list):
    return tuple(freeze_setting(x) for x in v)
  if isinstance(v, dict):
    return tuple(sorted((k, freeze_setting(x)) for k, x in v.items()))
  return v


@functools.partial(jax.jit, static_argnames=("model",))
def pair_scores(model, params, images, ids=None, query=None) -> jax.Array:
  """cos(image, text) [P] for the pairs of ``images`` and ``ids`` / ``query`` (common pairing)."""
  from trace_jax.models import l2_normalize
  images = common.as_images(images)
  targets = common.text_targets(model, params, ids, query)
  pair = common.pairing(images.shape[0], targets.shape[0])
  emb, _ = model.apply({"params": params}, images, method="encode_image")
  return jnp.sum(l2_normalize(common.take_pairs(emb, pair)) * common.broadcast_texts(targets, pair), -1)


@functools.lru_cache(maxsize=128)
def _jitted(method: str, model, static: tuple, dynamic_names: tuple):
  mod = method_module(method)
  if method == "legrad" and model.cfg.vision.kind == "siglip":  # the authors' SigLIP path
    mod = importlib.import_module("trace_jax.attribution.legrad_siglip")
  static_kw = dict(static)  # lists / dicts arrive as (sorted) tuples: hashable jit cache keys

  def fn(params, images, ids, query, dynamic):
    out = dict(mod.explain(model, params, images, ids, query=query, **static_kw,
                           **dict(zip(dynamic_names, dynamic))))
    if "score" not in out:  # every method reports the pair's cosine (LeGrad / M2IB do not compute it)
      out["score"] = pair_scores(model, params, images, ids, query)
    return common.sigmoid_scores(model, params, out)  # SigLIP: the sigmoid logit exp(t) cos + b

  if getattr(mod, "JIT", True):
    return jax.jit(fn)
  return fn


def explain_fn(method: str, model, **settings):
  """A reusable ``f(params, images, ids=None, query=None) -> dict`` for fixed static settings."""
  static = tuple(sorted((k, freeze_setting(v)) for k, v in settings.items() if not is_array_setting(v)))
  names = tuple(sorted(k for k, v in settings.items() if is_array_setting(v)))
  dyn = tuple(settings[k] for k in names)
  f = _jitted(method, model, static, names)
  return lambda params, images, ids=None, query=None: f(params, images, ids, query, dyn)


def explain(method: str, model, params, images, ids=None, *, query=None, **settings) -> dict:
  """Attribution maps of ``method`` for the pairs of ``images`` and texts ``ids`` (or ``query``).

  images: [B, H, W, 3] NHWC normalised pixels (or one HWC image); ids: int [T, L] token ids;
  query: [T, E] embedding vectors instead of ids (not every method: M2IB needs text tokens for its
  text map). Shapes of the result: see the module docstring.
  """
  if (ids is None) == (query is None):
    raise ValueError("give exactly one of `ids` (token ids) or `query` (embedding vectors)")
  return explain_fn(method, model, **settings)(params, images, ids, query)
