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

``image_state`` runs the image forward once (keeping its pullback), ``prompt_maps`` the per-prompt
backwards and relevance: inference/explain.py runs prompt chunks on one state.
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


def image_state(model, params, images, *, start_layer: int = 0, pos_interp=None) -> dict:
  """Chefer's prompt-independent part: ONE forward of images [n, H, W, 3] (or one [H, W, 3]).

  Returns {'emb' [n, E] (un-normalised), 'attns': per used block (start_layer .. L-1) its
  probabilities [n, heads, N, N], 'vjp'} (+ SigLIP: 'pool' [n, heads, 1, N], the MAP head's). ``vjp(ct
  [n, E])`` is the pullback to those probabilities (the MAP head's last), a pytree of the forward's
  residuals: a jit can return the state, and each prompt's backward then needs no forward."""
  images = common.as_images(images)
  L = model.cfg.vision.layers
  blocks = list(range(common.resolve_layer(start_layer, L), L))
  paths = [common.attn_path("visual", i) for i in blocks]
  siglip = model.cfg.vision.kind == "siglip"
  if siglip:  # + the MAP head's probabilities (models/siglip.py POOL_PATH)
    from trace_jax.models.siglip import POOL_PATH
    paths = paths + [POOL_PATH]
  emb, aux, vjp_fn = common.encode_image_vjp(model, params, images, paths, pos_interp)
  state = {"emb": emb, "attns": [aux["blocks"][i]["attn"] for i in blocks], "vjp": vjp_fn}
  if siglip:
    state["pool"] = aux["pool"]["attn"]
  return state


def prompt_maps(model, params, state: dict, targets, image_hw: tuple[int, int], ids=None, *,
                target: str = "cosine", text: bool = False, start_layer_text: int = 0,
                normalize: bool = True, upsample: str = "bilinear") -> dict:
  """Chefer's per-prompt part: ``explain``'s dict for an ``image_state`` of images [n, H, W, 3]
  (``image_hw`` = (H, W)) and L2-normalised targets [T, E] (one image + P targets: P vmapped
  backwards, no image forward); ``text=True`` needs the targets' token ids [T, L]."""
  scale = _scale(model, params, target)
  pair = common.pairing(state["emb"].shape[0], targets.shape[0])
  scores, grads = common.pair_grads(state["emb"], state["vjp"], common.broadcast_texts(targets, pair), pair)
  attns = [common.take_pairs(a, pair) for a in state["attns"]]
  probe = None
  if "pool" in state:
    # No class token: the pooled query's relevance row is the MAP head's gradient-weighted attention
    # mean_h(relu(dS/dA_pool * A_pool))[0] [P, N], propagated through the blocks' R (its CLS-row analogue).
    g_pool, grads = grads[-1], grads[:-1]
    a_pool = common.take_pairs(state["pool"], pair)
    probe = jnp.mean(jnp.maximum(scale * g_pool * a_pool, 0.0), axis=-3)[:, 0]
  r = relevance(attns, [scale * g for g in grads])
  grid = common.to_grid(common.query_row(model, r, probe), common.patch_grid(model, image_hw))
  out = common.finish(grid, image_hw, normalize=normalize, upsample_method=upsample)
  out["score"] = scores
  if text:
    out["text"] = _text_relevance(model, params, state["emb"], ids, pair, scale, start_layer_text)
  return out


def _text_relevance(model, params, emb, ids, pair: common.Pairing, scale, start_layer: int) -> jax.Array:
  """The text tower's relevance row of each pair's end-of-text token, [P, L]: the same rule with the
  pair's image embedding (``emb`` [n_img, E], un-normalised) as the target."""
  if ids is None:
    raise ValueError("text=True needs token ids (a query vector has no tokens)")
  ids = common.as_ids(ids)
  Lt = model.cfg.text.layers
  tblocks = list(range(common.resolve_layer(start_layer, Lt), Lt))
  temb, taux, tvjp = common.encode_text_vjp(model, params, ids, [common.attn_path("text", i) for i in tblocks])
  img_n = l2_normalize(common.take_pairs(emb, pair))  # [P, E], the other modality per pair
  tpair = common.Pairing(pair.num_pairs, ids.shape[0] == 1 and pair.num_pairs > 1)
  _, tgrads = common.pair_grads(temb, tvjp, img_n, tpair)
  tattns = [common.take_pairs(taux["blocks"][i]["attn"], tpair) for i in tblocks]
  rt = relevance(tattns, [scale * g for g in tgrads])
  eot = common.take_pairs(taux["eot"], tpair)
  return jnp.take_along_axis(rt, eot[:, None, None], axis=1)[:, 0]


def explain(model, params, images, ids=None, *, query=None, start_layer: int = 0,
            target: str = "cosine", text: bool = False, start_layer_text: int = 0, pos_interp=None,
            normalize: bool = True, upsample: str = "bilinear") -> dict:
  """{'grid' [P, gh, gw], 'raw', 'map' [P, H, W], 'score' [P]} (+ 'text' [P, L] with ``text=True``).

  One image forward for one image and P prompts (the P backwards are vmapped). Normalisation as
  the notebook: min-max of the (bilinearly upsampled) relevance; here min-max (+1e-7) on the grid
  and then upsampling, which agree since bilinear weights are convex.
  = ``prompt_maps(image_state(images), targets)``.
  """
  images = common.as_images(images)
  targets = common.text_targets(model, params, ids, query)
  state = image_state(model, params, images, start_layer=start_layer, pos_interp=pos_interp)
  return prompt_maps(model, params, state, targets, images.shape[1:3], ids, target=target, text=text,
                     start_layer_text=start_layer_text, normalize=normalize, upsample=upsample)
