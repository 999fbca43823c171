"""The float64 NumPy reference for overlays at the image's own resolution (issue 23), shared by
tests/test_overlay_resolution.py (``trace-jax explain``) and tests/test_serve.py (the serve page).

Written from the definitions, not from ``trace_jax.utils.overlay``: bilinear resample of the map onto
the image with half-pixel centres (cv2.resize / grad-cam's scale_cam_image), then the 'jet' blend.
"""
from __future__ import annotations

import matplotlib
import numpy as np


def bilinear64(a: np.ndarray, H: int, W: int) -> np.ndarray:
  """Float64 bilinear resize [h, w] -> [H, W], half-pixel centres, edges clamped (cv2.INTER_LINEAR
  when upsampling)."""
  a = np.asarray(a, np.float64)
  h, w = a.shape

  def axis(n_out, n_in):
    c = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(c).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, c - i0

  y0, y1, wy = axis(H, h)
  x0, x1, wx = axis(W, w)
  rows = a[y0] * (1 - wy)[:, None] + a[y1] * wy[:, None]
  return rows[:, x0] * (1 - wx) + rows[:, x1] * wx


def reference_overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """uint8 [H, W, 3] image, [h, w] map -> float64 [H, W, 3]: (1 - alpha) image + alpha jet(map
  resampled onto the image)."""
  up = bilinear64(heat, *rgb.shape[:2])
  jet = matplotlib.colormaps["jet"](np.clip(up, 0, 1))[..., :3] * 255.0
  return (1 - alpha) * rgb.astype(np.float64) + alpha * jet


def assert_overlay_close(pic: np.ndarray, ref: np.ndarray):
  """uint8 rounding: within 1 level; the colormap is a 256-entry table, so a map value that float32
  and float64 put on two sides of a bin edge moves one colour by up to one bin (~4 levels x alpha):
  allowed for at most 1e-4 of the values."""
  err = np.abs(pic.astype(np.float64) - ref)
  assert err.max() <= 3.0, err.max()
  assert (err > 1.01).mean() <= 1e-4, (err > 1.01).mean()
