"""Resampling of learned absolute position embeddings to other grids.

Two conventions exist in the reference code and they differ by up to ~1.5 in value,
so both are offered:

* ``'antialias'`` (default): timm ``resample_abs_pos_embed(..., interpolation='bicubic',
  antialias=True)``, which legrad-torch / maskinversion-torch use (notes/legrad-maskinversion.md,
  "Other resolutions"). ``jax.image.resize(method='cubic')`` (antialias on) equals it to
  <=1.7e-6 (measured in the note).
* ``'torch_bicubic'``: ``torch.nn.functional.interpolate(mode='bicubic', align_corners=False)``
  without antialias (Keys kernel a=-0.75), which Hugging Face ``CLIPVisionEmbeddings.
  interpolate_pos_encoding`` uses. Implemented as exact separable weight matrices.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("antialias", "torch_bicubic")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  return np.where(
      x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
      np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of torch bicubic (align_corners=False, a=-0.75, border clamp)."""
  scale = in_size / out_size
  w = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    src = (o + 0.5) * scale - 0.5
    i0 = int(np.floor(src))
    t = src - i0
    for k in range(-1, 3):
      idx = min(max(i0 + k, 0), in_size - 1)
      w[o, idx] += _cubic(np.array(k - t), -0.75)
  return w


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
