"""Attention rollout (Abnar & Zuidema 2020, "Quantifying attention flow in transformers").

Per block l the head-fused attention ``Ā_l = fuse_h(A_l)`` (mean over heads, as in the paper; 'max' /
'min' as in jacobgil/vit-explain) gets the residual connection added and rows renormalised:
``Â_l = (Ā_l + I) / rowsum`` (= 0.5 Ā + 0.5 I for mean fusion, the paper's formula). Then

    rollout = Â_{L-1} · ... · Â_{start}         (left-multiplied, later blocks on the left)

Image map: [CLS] row, patch columns ``rollout[0, 1:]`` -> [gh, gw]. Text (optional): the
end-of-text row ``rollout[eot, :]`` -> [L] (the causal mask makes columns after eot zero).
Rollout is class-agnostic: the map depends on the image only (one forward per distinct image);
``score`` is still the pair's cosine so every method returns the same keys.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from trace_jax.attribution import common
from trace_jax.models import l2_normalize

FUSIONS = ("mean", "max", "min")


def rollout_matrix(attns, start_layer: int = 0, head_fusion: str = "mean") -> jax.Array:
  """attns: list of [..., heads, N, N] (block order) -> rollout [..., N, N] (float32)."""
  if head_fusion not in FUSIONS:
    raise ValueError(f"unknown head_fusion {head_fusion!r}; expected one of {FUSIONS}")
  fuse = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[head_fusion]
  n = attns[0].shape[-1]
  eye = jnp.eye(n, dtype=jnp.float32)
  r = jnp.broadcast_to(eye, attns[0].shape[:-3] + (n, n))
  for a in attns[start_layer:]:
    a = fuse(a.astype(jnp.float32), axis=-3) + eye
    a = a / jnp.sum(a, axis=-1, keepdims=True)
    r = jnp.einsum("...ij,...jk->...ik", a, r, precision=jax.lax.Precision.HIGHEST)
  return r


def explain(model, params, images, ids=None, *, query=None, start_layer: int = 0,
            head_fusion: str = "mean", text: bool = False, start_layer_text: int = 0, pos_interp=None, normalize: bool = True,
            upsample: str = "bilinear") -> dict:
  """{'grid' [P, gh, gw], 'raw', 'map' [P, H, W], 'score' [P]} (+ 'text' [P, L] with ``text=True``).

  Normalisation: per-sample min-max (+1e-7) on the grid, then bilinear upsampling.
  """
  images = common.as_images(images)
  targets = common.text_targets(model, params, ids, query)
  pair = common.pairing(images.shape[0], targets.shape[0])
  targets = common.broadcast_texts(targets, pair)
  emb, aux = model.apply({"params": params}, images, method="encode_image", pos_interp=pos_interp)
  start = common.resolve_layer(start_layer, model.cfg.vision.layers)
  r = rollout_matrix([b["attn"] for b in aux["blocks"]], start, head_fusion)
  if model.cfg.vision.kind == "siglip":
    # SigLIP has no class token: the MAP head's probe (the pooled query) attends over the final tokens,
    # so its head-fused attention row [1, N] takes the CLS row's place: row = fuse_h(A_pool)[0] @ rollout.
    fuse = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[head_fusion]
    pool = fuse(aux["pool"]["attn"].astype(jnp.float32), axis=-3)[:, 0]           # [n_img, N]
    row = jnp.einsum("bj,bjk->bk", pool, r, precision=jax.lax.Precision.HIGHEST)
  else:
    row = r[:, 0, 1:]
  grid = common.to_grid(common.take_pairs(row, pair), common.grid_shape(model, images))
  out = common.finish(grid, images.shape[1:3], normalize=normalize, upsample_method=upsample)
  out["score"] = jnp.sum(l2_normalize(common.take_pairs(emb, pair)) * targets, -1)
  if text:
    if ids is None:
      raise ValueError("text=True needs token ids (a query vector has no tokens)")
    ids = common.as_ids(ids)
    _, taux = model.apply({"params": params}, ids, method="encode_text")
    rt = rollout_matrix([b["attn"] for b in taux["blocks"]],
                        common.resolve_layer(start_layer_text, model.cfg.text.layers), head_fusion)
    t = jnp.take_along_axis(rt, taux["eot"][:, None, None], axis=1)[:, 0]  # [T, L]
    out["text"] = common.broadcast_texts(t, pair)
  return out
