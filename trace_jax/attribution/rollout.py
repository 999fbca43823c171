"""Attention rollout (Abnar & Zuidema 2020, "Quantifying attention flow in transformers").

Per block l the head-fused attention ``Ā_l = fuse_h(A_l)`` (mean over heads, as in the paper; 'max' /
'min' as in jacobgil/vit-explain) gets the residual connection added and rows renormalised:
``Â_l = (Ā_l + I) / rowsum`` (= 0.5 Ā + 0.5 I for mean fusion, the paper's formula). Then

    rollout = Â_{L-1} · ... · Â_{start}         (left-multiplied, later blocks on the left)

Image map: [CLS] row, patch columns ``rollout[0, 1:]`` -> [gh, gw] (SigLIP, no class token: the MAP
head's head-fused probe row times the rollout; ``common.query_row``). Text (optional): the
end-of-text row ``rollout[eot, :]`` -> [L] (the causal mask makes columns after eot zero).
Rollout is class-agnostic: the map depends on the image only (one forward per distinct image);
``score`` is still the pair's cosine so every method returns the same keys. ``image_state`` computes
the map (and the image embedding), ``prompt_maps`` the per-pair part (inference/explain.py runs
prompt chunks on one state).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from trace_jax.attribution import common
from trace_jax.models import l2_normalize

FUSIONS = ("mean", "max", "min")


def _fuse(head_fusion: str):
  """The head fusion [..., heads, ...] -> [...] (reduce over ``axis``) named ``head_fusion``."""
  if head_fusion not in FUSIONS:
    raise ValueError(f"unknown head_fusion {head_fusion!r}; expected one of {FUSIONS}")
  return {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[head_fusion]


def rollout_matrix(attns, start_layer: int = 0, head_fusion: str = "mean") -> jax.Array:
  """attns: list of [..., heads, N, N] (block order) -> rollout [..., N, N] (float32)."""
  fuse = _fuse(head_fusion)
  n = attns[0].shape[-1]
  eye = jnp.eye(n, dtype=jnp.float32)
  r = jnp.broadcast_to(eye, attns[0].shape[:-3] + (n, n))
  for a in attns[start_layer:]:
    a = fuse(a.astype(jnp.float32), axis=-3) + eye
    a = a / jnp.sum(a, axis=-1, keepdims=True)
    r = jnp.einsum("...ij,...jk->...ik", a, r, precision=jax.lax.Precision.HIGHEST)
  return r


def image_state(model, params, images, *, start_layer: int = 0, head_fusion: str = "mean",
                pos_interp=None) -> dict:
  """Rollout's image part, the class-agnostic map itself: ONE forward of images [n, H, W, 3] (or one
  [H, W, 3]) -> {'emb' [n, E] (un-normalised, for the pairs' scores), 'grid' [n, gh, gw] raw rollout
  row}."""
  images = common.as_images(images)
  model = common.explicit_attention(model)   # the probabilities come from this plain forward
  emb, aux = model.apply({"params": params}, images, method="encode_image", pos_interp=pos_interp)
  start = common.resolve_layer(start_layer, model.cfg.vision.layers)
  r = rollout_matrix([b["attn"] for b in aux["blocks"]], start, head_fusion)
  probe = None
  if "pool" in aux:  # SigLIP has no class token: the MAP head's probe (the pooled query) attends over
    # the final tokens, so its head-fused attention row [n, N] is carried through the rollout
    probe = _fuse(head_fusion)(aux["pool"]["attn"].astype(jnp.float32), axis=-3)[:, 0]
  row = common.query_row(model, r, probe)  # [n, n_patches]
  return {"emb": emb, "grid": common.to_grid(row, common.grid_shape(model, images))}


def prompt_maps(model, params, state: dict, targets, image_hw: tuple[int, int], ids=None, *,
                head_fusion: str = "mean", text: bool = False, start_layer_text: int = 0,
                normalize: bool = True, upsample: str = "bilinear") -> dict:
  """Rollout's per-prompt part: ``explain``'s dict for an ``image_state`` of images [n, H, W, 3]
  (``image_hw`` = (H, W)) and L2-normalised targets [T, E]: the image map repeated per pair, the
  pair's cosine, and with ``text=True`` the text rollout of token ids [T, L] (no image forward)."""
  pair = common.pairing(state["emb"].shape[0], targets.shape[0])
  targets = common.broadcast_texts(targets, pair)
  grid = common.take_pairs(state["grid"], pair)
  out = common.finish(grid, image_hw, normalize=normalize, upsample_method=upsample)
  out["score"] = jnp.sum(l2_normalize(common.take_pairs(state["emb"], pair)) * targets, -1)
  if text:
    if ids is None:
      raise ValueError("text=True needs token ids (a query vector has no tokens)")
    ids = common.as_ids(ids)
    _, taux = common.explicit_attention(model).apply({"params": params}, ids, method="encode_text")
    rt = rollout_matrix([b["attn"] for b in taux["blocks"]],
                        common.resolve_layer(start_layer_text, model.cfg.text.layers), head_fusion)
    t = jnp.take_along_axis(rt, taux["eot"][:, None, None], axis=1)[:, 0]  # [T, L]
    out["text"] = common.broadcast_texts(t, pair)
  return out


def explain(model, params, images, ids=None, *, query=None, start_layer: int = 0,
            head_fusion: str = "mean", text: bool = False, start_layer_text: int = 0, pos_interp=None,
            normalize: bool = True, upsample: str = "bilinear") -> dict:
  """{'grid' [P, gh, gw], 'raw', 'map' [P, H, W], 'score' [P]} (+ 'text' [P, L] with ``text=True``).

  Normalisation: per-sample min-max (+1e-7) on the grid, then bilinear upsampling.
  = ``prompt_maps(image_state(images), targets)``.
  """
  images = common.as_images(images)
  targets = common.text_targets(model, params, ids, query)
  state = image_state(model, params, images, start_layer=start_layer, head_fusion=head_fusion,
                      pos_interp=pos_interp)
  return prompt_maps(model, params, state, targets, images.shape[1:3], ids, head_fusion=head_fusion,
                     text=text, start_layer_text=start_layer_text, normalize=normalize, upsample=upsample)
