"""Local (patch-wise) alignment with register tokens (local-alignment-register-tokens.md §2).

    L_local = (1/M) Σ_i InfoNCE_sym( I^(i) [B, E], T_compressed^(i) [B, E] )
    L_total = λ_global · L_global + λ_local · L_local

L_global is CLIP's symmetric InfoNCE (``global_loss='softmax'``) or, on a SigLIP model, SigLIP's
sigmoid loss with its learnable bias (``global_loss='sigmoid'``, trace_jax/losses/sigmoid.py, chunked
across the batch shards); L_local stays the paper's per-slot InfoNCE with its own temperature.

Reading of the paper's ``Σ_i CrossEntropy(sim(T_compressed^(i), I^(i)))``: for each slot i, the
similarity matrix between patch i of every image and slot i of every text in the batch
[B_img, B_txt], cross-entropy with the diagonal as target in both directions (symmetric CLIP
InfoNCE, negatives = the other samples' slot i), then the mean over the M slots. This is what the
prototype code computes (toilaluan/patch_wise_clip ``loss.py``, notes/amc-and-local-alignment.md §8;
mean, not sum, so λ_local does not scale with M). The prototype's extra "patch diversity" term is
not in the paper and is not used.

Patch features I^(i): the final visual tokens of the patches mapped by ln_post @ proj into the
joint embedding space (so they are comparable with the pooled text embedding; the prototype uses
raw hidden states); on SigLIP (no class token, a MAP head instead of a projection) by the MAP head
run on each token alone (``SigLIPVision.project``). T_compressed:
``trace_jax.models.text_compression.TextCompression`` over the text tower's final (ln_final) tokens,
padding after the end-of-text token masked (SigLIP's non-causal tower reads every position: none is).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from trace_jax.losses.contrastive import MAX_LOG_SCALE, clip_contrastive_loss
from trace_jax.losses.sigmoid import sigmoid_loss_chunked

GLOBAL_LOSSES = ("softmax", "sigmoid")  # config.loss.global_loss (trace_jax/objectives/clip.py)


def local_alignment_loss(patch_embeds: jax.Array, slot_embeds: jax.Array, log_scale: jax.Array, *,
                         max_log_scale: float = MAX_LOG_SCALE) -> jax.Array:
  """Mean over slots of the per-slot symmetric InfoNCE across the batch.

  Args:
    patch_embeds: [B, M, E] image patch features (L2-normalised inside).
    slot_embeds: [B, M, E] compressed text slots (L2-normalised inside).
    log_scale: scalar log inverse temperature of the local loss (clipped to [0, ln 100]).
  Returns:
    scalar float32.
  """
  if patch_embeds.ndim != 3 or patch_embeds.shape != slot_embeds.shape:
    raise ValueError(f"patch and slot embeddings must both be [B, M, E] of the same shape; got "
                     f"{tuple(patch_embeds.shape)} and {tuple(slot_embeds.shape)}")
  per_slot = jax.vmap(lambda i, t: clip_contrastive_loss(i, t, log_scale, max_log_scale=max_log_scale),
                      in_axes=(1, 1))(patch_embeds, slot_embeds)          # [M]
  return jnp.mean(per_slot)


def text_valid_mask(ids: jax.Array, eot: jax.Array) -> jax.Array:
  """[B, L] True at positions up to and including the end-of-text token (the causal text tower's
  tokens after it are padding)."""
  return jnp.arange(ids.shape[-1])[None, :] <= eot[:, None]


def patch_embeddings(model, clip_params, visual_tokens: jax.Array) -> jax.Array:
  """Final visual tokens [B, 1 + N, width] -> patch features [B, N, E] (ln_post @ proj, un-normalised);
  SigLIP: its ln_post'ed tokens [B, N, width] (no class token) through ``SigLIPVision.project``."""
  patches = visual_tokens if model.cfg.vision.kind == "siglip" else visual_tokens[:, 1:]
  return model.apply({"params": clip_params}, patches, method=lambda m, x: m.visual.project(x))


def local_alignment_forward(model, compressor, params, images: jax.Array, ids: jax.Array) -> dict:
  """One CLIP forward plus the compressor. ``params = {'clip': ..., 'text_compression': ...}``.

  Returns dict: image_embeds [B, E], text_embeds [B, E] (normalised), patch_embeds [B, N, E],
  slot_embeds [B, N, E] (un-normalised), log_scale_global, log_scale_local (scalars), and logit_bias
  (scalar; a SigLIP model's, else None).
  """
  out, aux = model.apply({"params": params["clip"]}, images, ids)
  patches = patch_embeddings(model, params["clip"], aux["image"]["tokens"])
  valid = text_valid_mask(ids, aux["text"]["eot"])
  slots = compressor.apply({"params": params["text_compression"]}, aux["text"]["tokens"], valid)
  if slots.shape != patches.shape:
    raise ValueError(f"the compressor gives {slots.shape[1]} slots but the image has "
                     f"{patches.shape[1]} patches; set num_registers to the number of patches")
  return {"image_embeds": out["image_embeds"], "text_embeds": out["text_embeds"], "patch_embeds": patches,
          "slot_embeds": slots, "log_scale_global": params["clip"]["logit_scale"],
          "log_scale_local": params["text_compression"]["logit_scale"],
          "logit_bias": params["clip"].get("logit_bias")}


def global_term(kind: str, image_embeds, text_embeds, log_scale, logit_bias=None) -> jax.Array:
  """L_global of (image b, text b) pairs: ``'softmax'`` CLIP InfoNCE, ``'sigmoid'`` SigLIP's loss
  (needs ``logit_bias``; chunked over the batch shards). ValueError naming an unknown ``kind``."""
  if kind not in GLOBAL_LOSSES:
    raise ValueError(f"loss.global_loss must be one of {GLOBAL_LOSSES}; got {kind!r}")
  if kind == "softmax":
    return clip_contrastive_loss(image_embeds, text_embeds, log_scale)
  if logit_bias is None:
    raise ValueError("loss.global_loss=sigmoid needs a SigLIP model (a learnable logit bias)")
  return sigmoid_loss_chunked(image_embeds, text_embeds, log_scale, logit_bias)


def local_alignment_total(fwd: dict, *, lambda_global: float = 1.0, lambda_local: float = 1.0,
                          global_loss: str = "softmax"):
  """L_total = λ_global·L_global + λ_local·L_local from ``local_alignment_forward``'s dict;
  ``global_loss``: 'softmax' (CLIP InfoNCE) or 'sigmoid' (SigLIP, :func:`global_term`).

  Returns (loss, {'global': L_global, 'local': L_local}).
  """
  l_global = global_term(global_loss, fwd["image_embeds"], fwd["text_embeds"], fwd["log_scale_global"],
                         fwd.get("logit_bias"))
  l_local = local_alignment_loss(fwd["patch_embeds"], fwd["slot_embeds"], fwd["log_scale_local"])
  return lambda_global * l_global + lambda_local * l_local, {"global": l_global, "local": l_local}


def patch_similarity_grid(model, clip_params, images: jax.Array, ids: jax.Array) -> jax.Array:
  """Dense readout: cos(patch_i, pooled text) for every patch, [B, gh, gw] (pairs image b, text b).

  Patches are mapped as in the local loss (ln_post @ proj); works for any CLIP (MaskCLIP-style
  dense similarity), so plain and locally aligned models are scored the same way.
  """
  from trace_jax.models import l2_normalize
  _, aux = model.apply({"params": clip_params}, images, method="encode_image")
  txt, _ = model.apply({"params": clip_params}, ids, method="encode_text")
  p = l2_normalize(patch_embeddings(model, clip_params, aux["tokens"]))
  sim = jnp.einsum("bne,be->bn", p, l2_normalize(txt))
  g = images.shape[1] // model.cfg.vision.patch_size
  return sim.reshape(sim.shape[0], g, images.shape[2] // model.cfg.vision.patch_size)


def slot_similarity_grid(model, compressor, params, images: jax.Array, ids: jax.Array) -> jax.Array:
  """Local-alignment readout: cos(patch_i of image b, slot i of text b), [B, gh, gw]."""
  from trace_jax.models import l2_normalize
  fwd = local_alignment_forward(model, compressor, params, images, ids)
  sim = jnp.sum(l2_normalize(fwd["patch_embeds"]) * l2_normalize(fwd["slot_embeds"]), -1)
  g = images.shape[1] // model.cfg.vision.patch_size
  return sim.reshape(sim.shape[0], g, images.shape[2] // model.cfg.vision.patch_size)
