"""Torch-exact resizing of grids and maps: the one copy every layer uses.

Imports nothing of trace_jax, so models (position embeddings), attribution, inversion, losses and
evaluation all share it (../shared/design.md).

* bilinear: torch ``F.interpolate(mode='bilinear', align_corners=False)`` (no antialias) as separable
  [out, in] weight matrices. The authors' code resizes maps with it (LeGrad / MaskInversion map ->
  mask size, AMC's cam -> mask, M2IB's grid -> 224); the matrices reproduce it to float32 rounding
  (<= 1e-5 against torch, which computes in float32: tests/test_maskinversion.py
  ``test_resize_matrix_matches_torch_and_jax``; the bicubic one: tests/test_metrics.py), are
  differentiable, and cost one small einsum. For upsampling it also equals
  ``jax.image.resize(method='linear')`` (notes/legrad-maskinversion.md, "Resize equivalences").
* bicubic: torch ``F.interpolate(mode='bicubic', align_corners=False)`` (Keys a = -0.75, border clamp,
  no antialias) as matrices: HF ``interpolate_pos_encoding`` (trace_jax/models/posemb.py) and the AMC
  pointing game's upsampling (trace_jax/evaluation/metrics.py).
* :func:`upsample` picks one by name for the attribution maps; its 'bicubic' and 'nearest' are
  ``jax.image.resize``'s (Keys a = -0.5; half-pixel nearest), NOT torch's, as attribution.common has
  always offered them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

UPSAMPLE_METHODS = ("bilinear", "bicubic", "nearest")


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


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  return np.where(
      x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
      np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights (float64) of torch bicubic (align_corners=False, a=-0.75, border clamp)."""
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


def upsample_bilinear(grid: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """[..., h, w] -> [..., H, W], torch bilinear (align_corners=False, no antialias).

  Computed in float32 (float64 under ``jax.enable_x64`` for float64 inputs).
  """
  dt = jnp.promote_types(grid.dtype, jnp.float32)
  wh = jnp.asarray(torch_bilinear_matrix(grid.shape[-2], out_hw[0]), dt)
  ww = jnp.asarray(torch_bilinear_matrix(grid.shape[-1], out_hw[1]), dt)
  return jnp.einsum("Hh,...hw,Ww->...HW", wh, grid.astype(dt), ww, precision=jax.lax.Precision.HIGHEST)


def upsample(grid: jax.Array, out_hw: tuple[int, int], method: str = "bilinear") -> jax.Array:
  """[..., h, w] -> [..., H, W] (float32, float64 stays float64).

  'bilinear' = :func:`upsample_bilinear` (torch-exact); 'bicubic' / 'nearest' = ``jax.image.resize``
  'cubic' / 'nearest' (module docstring).
  """
  if method not in UPSAMPLE_METHODS:
    raise ValueError(f"unknown upsampling method {method!r}; expected one of {UPSAMPLE_METHODS}")
  if method == "bilinear":
    return upsample_bilinear(grid, out_hw)
  g = grid.astype(jnp.promote_types(grid.dtype, jnp.float32))
  return jax.image.resize(g, g.shape[:-2] + tuple(out_hw), method={"bicubic": "cubic"}.get(method, method))
