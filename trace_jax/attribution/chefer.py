"""Chefer et al. 2021 relevance for bi-modal transformers, as their CLIP notebook computes it.

Chefer, Gur, Wolf, "Generic attention-model explainability for interpreting bi-modal and
encoder-decoder transformers", ICCV 2021; CLIP variant = ``interpret()`` of
hila-chefer/Transformer-MM-Explainability ``CLIP_explainability.ipynb`` (M2IB's and MaskInversion's
"Chefer et al." / "CheferCAM" baseline). For each tower, with s the pair's target:

    R = I                                          [N, N]
    for block l = start_layer .. L-1:
      Ā_l = mean_h( relu( ∂s/∂A_l ⊙ A_l ) )        (gradient x attention, ReLU, mean over heads)
      R   = R + Ā_l · R
    image relevance = R[0, 1:]    -> [gh, gw]   ([CLS] row, patch columns)
    text relevance  = R[eot, :]   -> [L]        (the notebook then shows tokens 1..eot-1)

Target s: ``target='cosine'`` (default) = cos(image, text) as every trace_jax method;
``target='logit'`` = exp(logit_scale) * cos = the notebook's ``logits_per_image`` diagonal. Since
R = I + ..., products of several blocks' Ā are not scale-invariant, so the two differ when more
than one block is used. ``start_layer``: 0 = all blocks (the paper); -1 = the last block only (the
notebook's current default ``start_layer=-1``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from trace_jax.attribution import common
from trace_jax.models import l2_normalize

TARGETS = ("cosine", "logit")


def relevance(attns, grads) -> jax.Array:
  """Lists of [P, heads, N, N] probabilities and gradients (blocks start..L-1) -> R [P, N, N]."""
  n = attns[0].shape[-1]
  r = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), attns[0].shape[:-3] + (n, n))
  for a, g in zip(attns, grads):
    cam = jnp.mean(jnp.maximum(g * a, 0.0), axis=-3)  # notebook: (grad * cam).clamp(min=0).mean(dim=1)
    r = r + jnp.einsum("...ij,...jk->...ik", cam, r, precision=jax.lax.Precision.HIGHEST)
  return r


def _scale(model, params, target):
  if target not in TARGETS:
    raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
  return jnp.exp(params["logit_scale"]) if target == "logit" else 1.0


def explain(model, params, images, ids=None, *, query=None, start_layer: int = 0,
            target: str = "cosine", text: bool = False, start_layer_text: int = 0, pos_interp=None,
            normalize: bool = True, upsample: str = "bilinear") -> dict:
  """{'grid' [P, gh, gw], 'raw', 'map' [P, H, W], 'score' [P]} (+ 'text' [P, L] with ``text=True``).

  One image forward for one image and P prompts (the P backwards are vmapped). Normalisation as
  the notebook: min-max of the (bilinearly upsampled) relevance; here min-max (+1e-7) on the grid
  and then upsampling, which agree since bilinear weights are convex.
  """
  images = common.as_images(images)
  scale = _scale(model, params, target)
  targets = common.text_targets(model, params, ids, query)
  pair = common.pairing(images.shape[0], targets.shape[0])
  targets_p = common.broadcast_texts(targets, pair)
  L = model.cfg.vision.layers
  blocks = list(range(common.resolve_layer(start_layer, L), L))
  paths = [common.attn_path("visual", i) for i in blocks]
  siglip = model.cfg.vision.kind == "siglip"
  if siglip:  # + the MAP head's probabilities (models/siglip.py POOL_PATH)
    from trace_jax.models.siglip import POOL_PATH
    paths = paths + [POOL_PATH]
  emb, aux, vjp_fn = common.encode_image_vjp(model, params, images, paths, pos_interp)
  scores, grads = common.pair_grads(emb, vjp_fn, targets_p, pair)
  attns = [common.take_pairs(aux["blocks"][i]["attn"], pair) for i in blocks]
  if siglip:
    # No class token: the pooled query's relevance row is the MAP head's gradient-weighted attention
    # mean_h(relu(dS/dA_pool * A_pool))[0] [P, N], propagated through the blocks' R (its CLS-row analogue).
    g_pool, grads = grads[-1], grads[:-1]
    a_pool = common.take_pairs(aux["pool"]["attn"], pair)
    cam_pool = jnp.mean(jnp.maximum(scale * g_pool * a_pool, 0.0), axis=-3)[:, 0]
    r = relevance(attns, [scale * g for g in grads])
    row = jnp.einsum("pj,pjk->pk", cam_pool, r, precision=jax.lax.Precision.HIGHEST)
  else:
    r = relevance(attns, [scale * g for g in grads])
    row = r[:, 0, 1:]
  grid = common.to_grid(row, common.grid_shape(model, images))
  out = common.finish(grid, images.shape[1:3], normalize=normalize, upsample_method=upsample)
  out["score"] = scores
  if text:
    if ids is None:
      raise ValueError("text=True needs token ids (a query vector has no tokens)")
    ids = common.as_ids(ids)
    Lt = model.cfg.text.layers
    tblocks = list(range(common.resolve_layer(start_layer_text, Lt), Lt))
    temb, taux, tvjp = common.encode_text_vjp(model, params, ids, [common.attn_path("text", i) for i in tblocks])
    img_n = l2_normalize(common.take_pairs(emb, pair))  # [P, E], the other modality per pair
    tpair = common.Pairing(pair.num_pairs, ids.shape[0] == 1 and pair.num_pairs > 1)
    _, tgrads = common.pair_grads(temb, tvjp, img_n, tpair)
    tattns = [common.take_pairs(taux["blocks"][i]["attn"], tpair) for i in tblocks]
    rt = relevance(tattns, [scale * g for g in tgrads])
    eot = common.take_pairs(taux["eot"], tpair)
    out["text"] = jnp.take_along_axis(rt, eot[:, None, None], axis=1)[:, 0]
  return out
