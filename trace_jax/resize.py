"""Exact torch ``F.interpolate(mode='bilinear', align_corners=False)`` (no antialias) as matrices.

The authors' code resizes maps with torch bilinear (LeGrad/MaskInversion map -> mask size, AMC's
cam -> mask, M2IB's grid -> 224). Separable [out, in] weight matrices reproduce it exactly, are
differentiable, and cost one small einsum. Shared by attribution, inversion and losses.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=256)
def torch_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights along one axis (float64; rows sum to 1).

  torch's rule (``area_pixel_compute_source_index``): src = max((o + 0.5) * n_in / n_out - 0.5, 0),
  i0 = floor(src), i1 = min(i0 + 1, n_in - 1), weights (1 - t, t). Equals
  ``jax.image.resize(method='linear', antialias=False)`` (notes/legrad-maskinversion.md, "Resize
  equivalences").
  """
  o = np.arange(n_out, dtype=np.float64)
  src = np.maximum((o + 0.5) * (n_in / n_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  t = src - i0
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), i0), 1.0 - t)
  np.add.at(m, (np.arange(n_out), i1), t)
  return m


def upsample_bilinear(grid: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """[..., h, w] -> [..., H, W], torch bilinear (align_corners=False, no antialias).

  Computed in float32 (float64 under ``jax.enable_x64`` for float64 inputs).
  """
  dt = jnp.promote_types(grid.dtype, jnp.float32)
  wh = jnp.asarray(torch_bilinear_matrix(grid.shape[-2], out_hw[0]), dt)
  ww = jnp.asarray(torch_bilinear_matrix(grid.shape[-1], out_hw[1]), dt)
  return jnp.einsum("Hh,...hw,Ww->...HW", wh, grid.astype(dt), ww, precision=jax.lax.Precision.HIGHEST)
