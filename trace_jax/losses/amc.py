"""Attention Mask Consistency (AMC; Yang et al., CVPR 2023, eq. 4-9) as the authors' code computes it.

Facts of the code: notes/amc-and-local-alignment.md §2 (GradCAM), §3 (second order), §5 (margins).
With ``A`` the GradCAM map of the phrase-image score, min-max normalised per sample with +1e-7 and
bilinearly upsampled (align_corners=False) to the mask size, and ``M`` the binary region mask:

  (7, code)  L_mean = max(0, Σ_{b,i,j} A(1-M) / Σ_{b,i,j}(1-M) - Σ_{b,i,j} A·M / Σ_{b,i,j} M + Δ1)
             (pooled over the batch, one hinge; ``mean_pooling='sample'`` = paper eq. 7: per-sample
             hinge, averaged over samples)
  (8)        L_max  = mean_b max(0, max_ij A_b(1-M_b) - max_ij A_b·M_b + Δ2)
  (9)        L_amc  = λ1·L_mean + λ2·L_max,     Δ1 = 0.1, Δ2 = 0.5, λ1 = 0.2, λ2 = 0.8

Only samples whose ``indicator`` is > 0 (they carry a region mask) contribute (the code selects
``rows with gt_mask_indicator > 0`` before the margins). The map depends on a gradient of the model,
so ``jax.grad`` of this loss w.r.t. the params is a second-order derivative (the code's
``create_graph=True``, notes §3); JAX needs nothing special for that.

GradCAM for a CLIP dual encoder (no ITM head): ``trace_jax.attribution.gradcam.gradcam_grid`` —
the "itc" mode of the AMC code (notes §2): attention probabilities of the chosen ViT block, [CLS]
row over the patch columns, times the ReLU-ed gradient of the image-text cosine, mean over heads.
Default block: the last (``layer=-1``), where the authors read ALBEF's text-side cross-attention of
BERT layer 8 (``block_num = 8``, notes §1-2); why the last vision block stands in for it:
docs/training.md, "AMC: deviations".
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from trace_jax.ops import MINMAX_EPS, minmax
from trace_jax.resize import upsample_bilinear

# torch bilinear (align_corners=False) to the mask size, notes §2 (mask_size): trace_jax/resize.py


def minmax_normalize(cam: jax.Array, eps: float = MINMAX_EPS) -> jax.Array:
  """Per-sample (cam - min) / (max(cam - min) + eps) over the last two axes (notes §2); [B, h, w] ->
  [B, h, w]. trace_jax/ops.py ``minmax`` with AMC's eps."""
  return minmax(cam, axis=(-2, -1), eps=eps)


def amc_margin_losses(cam: jax.Array, masks: jax.Array, indicator: jax.Array, *,
                      delta1: float = 0.1, delta2: float = 0.5,
                      mean_pooling: str = "batch") -> tuple[jax.Array, jax.Array]:
  """L_mean (eq. 7) and L_max (eq. 8) from a raw GradCAM grid.

  Args:
    cam: [B, gh, gw] raw GradCAM map (un-normalised; normalised and upsampled here).
    masks: [B, H, W] binary region masks at image resolution.
    indicator: [B]; samples with indicator > 0 contribute, the others are ignored.
    mean_pooling: 'batch' (authors' code: sums over b, i, j before dividing, one hinge) or
      'sample' (paper eq. 7: a hinge per sample, averaged).
  Returns:
    (L_mean, L_max), scalars; both 0 when no sample carries a mask.
  """
  if cam.ndim != 3 or masks.ndim != 3 or cam.shape[0] != masks.shape[0]:
    raise ValueError(f"cam must be [B, gh, gw] and masks [B, H, W] with the same B; got "
                     f"{tuple(cam.shape)} and {tuple(masks.shape)}")
  if indicator.shape != (cam.shape[0],):
    raise ValueError(f"indicator must be [B] = [{cam.shape[0]}]; got {tuple(indicator.shape)}")
  if mean_pooling not in ("batch", "sample"):
    raise ValueError(f"mean_pooling must be 'batch' (authors' code) or 'sample' (paper eq. 7); "
                     f"got {mean_pooling!r}")
  dt = jnp.promote_types(cam.dtype, jnp.float32)
  a = upsample_bilinear(minmax_normalize(cam.astype(dt)), masks.shape[-2:])          # [B, H, W]
  m = masks.astype(dt)
  w = (indicator > 0).astype(dt)                                                      # [B]
  n = jnp.sum(w)
  inside = jnp.sum(a * m, axis=(1, 2))                                                # [B]
  outside = jnp.sum(a * (1 - m), axis=(1, 2))
  n_in = jnp.sum(m, axis=(1, 2))
  n_out = jnp.sum(1 - m, axis=(1, 2))
  safe = lambda num, den: num / jnp.where(den > 0, den, 1.0)
  if mean_pooling == "batch":
    l_mean = jax.nn.relu(safe(jnp.sum(w * outside), jnp.sum(w * n_out))
                         - safe(jnp.sum(w * inside), jnp.sum(w * n_in)) + delta1)
    l_mean = jnp.where(n > 0, l_mean, 0.0)
  else:
    per = jax.nn.relu(safe(outside, n_out) - safe(inside, n_in) + delta1)
    l_mean = safe(jnp.sum(w * per), n)
  # eq. 8: max of the masked products (zeros outside the region count, as in the code).
  per_max = jax.nn.relu(jnp.max(a * (1 - m), axis=(1, 2)) - jnp.max(a * m, axis=(1, 2)) + delta2)
  l_max = safe(jnp.sum(w * per_max), n)
  return l_mean, l_max


def amc_loss(model, params, images: jax.Array, phrase_ids: jax.Array, masks: jax.Array,
             indicator: jax.Array, *, layer: int = -1, lambda1: float = 0.2, lambda2: float = 0.8,
             delta1: float = 0.1, delta2: float = 0.5, mean_pooling: str = "batch",
             relu_grad: bool = True, cam_fn: Callable | None = None) -> tuple[jax.Array, dict]:
  """L_amc = λ1·L_mean + λ2·L_max (eq. 9) of the GradCAM of (image b, phrase b) at visual ``layer``.

  Args:
    model, params: the CLIP module (``trace_jax.models.build``) and its params.
    images: [B, H, W, 3]; phrase_ids: [B, L] int; masks: [B, H, W] in {0, 1}; indicator: [B].
    cam_fn: ``(model, params, images, ids, layer=, relu_grad=) -> [B, gh, gw]``; default
      ``trace_jax.attribution.gradcam.gradcam_grid``.
  Returns:
    (loss, {'amc_mean': L_mean, 'amc_max': L_max}). Differentiable (second order) w.r.t. params.
  """
  if cam_fn is None:
    from trace_jax.attribution.gradcam import gradcam_grid as cam_fn  # losses -> attribution (design.md)
  cam = cam_fn(model, params, images, phrase_ids, layer=layer, relu_grad=relu_grad)
  l_mean, l_max = amc_margin_losses(cam, masks, indicator, delta1=delta1, delta2=delta2,
                                    mean_pooling=mean_pooling)
  return lambda1 * l_mean + lambda2 * l_max, {"amc_mean": l_mean, "amc_max": l_max}
