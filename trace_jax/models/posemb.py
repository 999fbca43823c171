"""Resampling of learned absolute position embeddings to other grids.

Two conventions exist in the reference code and they differ by up to ~1.5 in value,
so both are offered:

* ``'antialias'`` (default): timm ``resample_abs_pos_embed(..., interpolation='bicubic',
  antialias=True)``, which legrad-torch / maskinversion-torch use (notes/legrad-maskinversion.md,
  "Other resolutions"). ``jax.image.resize(method='cubic')`` (antialias on) equals it to
  <=1.7e-6 (measured in the note).
* ``'torch_bicubic'``: ``torch.nn.functional.interpolate(mode='bicubic', align_corners=False)``
  without antialias (Keys kernel a=-0.75), which Hugging Face ``CLIPVisionEmbeddings.
  interpolate_pos_encoding`` uses. Implemented as exact separable weight matrices
  (``trace_jax.resize.torch_bicubic_matrix``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from trace_jax.resize import torch_bicubic_matrix  # bottom layer: imports nothing of trace_jax

METHODS = ("antialias", "torch_bicubic")


def resize_grid(grid: jax.Array, out_hw: tuple[int, int], method: str = "antialias") -> jax.Array:
  """Resize a [h, w, D] grid of embeddings to [H, W, D] (computed in float32)."""
  if method not in METHODS:
    raise ValueError(f"unknown position-embedding interpolation {method!r}; expected one of {METHODS}")
  grid = grid.astype(jnp.float32)
  h, w, d = grid.shape
  if (h, w) == tuple(out_hw):
    return grid
  if method == "antialias":
    return jax.image.resize(grid, (out_hw[0], out_hw[1], d), method="cubic")
  wh = jnp.asarray(torch_bicubic_matrix(h, out_hw[0]), jnp.float32)
  ww = jnp.asarray(torch_bicubic_matrix(w, out_hw[1]), jnp.float32)
  return jnp.einsum("Hh,hwd,Ww->HWd", wh, grid, ww, precision=jax.lax.Precision.HIGHEST)


def resample_pos_embed(pos: jax.Array, grid_hw: tuple[int, int], num_prefix: int = 1,
                       method: str = "antialias") -> jax.Array:
  """[1 + g*g, D] position embedding (square old grid) -> [1 + gh*gw, D]."""
  n, d = pos.shape
  if n - num_prefix == grid_hw[0] * grid_hw[1]:
    return pos
  old = int(round((n - num_prefix) ** 0.5))
  if old * old != n - num_prefix:
    raise ValueError(f"position embedding with {n - num_prefix} patch rows is not a square grid")
  grid = resize_grid(pos[num_prefix:].reshape(old, old, d), grid_hw, method)
  return jnp.concatenate([pos[:num_prefix].astype(jnp.float32), grid.reshape(-1, d)], 0).astype(pos.dtype)
