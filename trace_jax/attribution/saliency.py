"""Input-gradient saliency (Simonyan, Vedaldi, Zisserman 2014), as captum's ``Saliency``.

    S[h, w] = reduce_c | ∂s/∂x[h, w, c] |        s = cos(image embedding, text embedding)

captum ``Saliency.attribute(x, target, abs=True)`` returns |∂s/∂x| per channel (no reduction);
Simonyan et al. take the max over colour channels, which is our default ``channel_reduce='max'``
('sum' and 'mean' are offered). Pixel map: per-sample min-max (+1e-7). Patch grid: the mean of the
(raw, un-normalised) pixel saliency inside each patch, then min-max.
One image + P prompts = one image forward and P vmapped backwards to the pixels: ``image_state``
keeps the forward's pullback, ``prompt_maps`` runs the backwards (inference/explain.py runs prompt
chunks on one state).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from trace_jax.attribution import common

REDUCTIONS = ("max", "sum", "mean")


def pool_to_grid(x: jax.Array, patch: int) -> jax.Array:
  """[P, H, W] -> [P, H/patch, W/patch] mean over each patch."""
  P, H, W = x.shape
  return x.reshape(P, H // patch, patch, W // patch, patch).mean(axis=(2, 4))


def image_state(model, params, images, *, pos_interp=None) -> dict:
  """Saliency's prompt-independent part: ONE forward of images [n, H, W, 3] (or one [H, W, 3]).

  Returns {'emb' [n, E] (un-normalised), 'vjp'}: ``vjp(ct [n, E]) -> (dx [n, H, W, 3],)`` is the
  pullback to the pixels, a pytree of the forward's residuals (a jit can return the state; each
  prompt's backward then needs no forward)."""
  images = common.as_images(images)
  f = lambda x: model.apply({"params": params}, x, method="encode_image", pos_interp=pos_interp)[0]
  emb, vjp_fn = jax.vjp(f, images)
  return {"emb": emb, "vjp": vjp_fn}


def state_gradients(state: dict, targets):
  """(scores [P], ∂s/∂x [P, H, W, 3]) of an ``image_state`` and L2-normalised targets [T, E]."""
  pair = common.pairing(state["emb"].shape[0], targets.shape[0])
  scores, (g,) = common.pair_grads(state["emb"], state["vjp"], common.broadcast_texts(targets, pair), pair)
  return scores, g


def input_gradients(model, params, images, ids=None, *, query=None, pos_interp=None):
  """(scores [P], ∂s/∂x [P, H, W, 3]) for each pair."""
  images = common.as_images(images)
  targets = common.text_targets(model, params, ids, query)
  return state_gradients(image_state(model, params, images, pos_interp=pos_interp), targets)


def prompt_maps(model, params, state: dict, targets, image_hw: tuple[int, int], ids=None, *,
                channel_reduce: str = "max", abs: bool = True, normalize: bool = True) -> dict:
  """Saliency's per-prompt part: ``explain``'s dict for an ``image_state`` and L2-normalised targets
  [T, E] (one image + P targets: P vmapped backwards to the pixels, no forward). ``params``,
  ``image_hw`` and ``ids`` are unused (the signature every split method shares: the gradient has the
  image's shape)."""
  if channel_reduce not in REDUCTIONS:
    raise ValueError(f"unknown channel_reduce {channel_reduce!r}; expected one of {REDUCTIONS}")
  scores, g = state_gradients(state, targets)
  g = jnp.abs(g) if abs else g
  s = {"max": jnp.max, "sum": jnp.sum, "mean": jnp.mean}[channel_reduce](g, axis=-1)
  raw = pool_to_grid(s, model.cfg.vision.patch_size)
  return {"raw": raw, "grid": common.minmax(raw) if normalize else raw,
          "map": common.minmax(s) if normalize else s, "pixels": g, "score": scores}


def explain(model, params, images, ids=None, *, query=None, channel_reduce: str = "max", abs: bool = True,
            pos_interp=None, normalize: bool = True) -> dict:
  """{'grid' [P, gh, gw], 'raw' (grid before min-max), 'map' [P, H, W], 'pixels' [P, H, W, 3], 'score'}.

  ``pixels`` is captum's output layout (|grad| per channel, NHWC). ``abs=False`` keeps the sign
  (then 'max' picks the largest signed value, as captum's abs=False followed by a max).
  = ``prompt_maps(image_state(images), targets)``.
  """
  images = common.as_images(images)
  targets = common.text_targets(model, params, ids, query)
  state = image_state(model, params, images, pos_interp=pos_interp)
  return prompt_maps(model, params, state, targets, images.shape[1:3], channel_reduce=channel_reduce,
                     abs=abs, normalize=normalize)
