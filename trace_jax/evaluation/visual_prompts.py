"""Visual-prompt baselines of MaskInversion's tables 1-2 as pure, jit/vmap-able image functions.

Conventions:
* one image ``[H, W, 3]`` float32 in **pixel space [0, 1]** (RGB; uint8 / 255). Every prompt is drawn
  there, as the originals draw on uint8 RGB, and the caller normalises afterwards
  (``(x - mean) / std``). Crop, resize and blur are linear per channel, so they commute with that
  normalisation; only the painted colours (red ring, mask fill) need pixel space.
* boxes are ``(x0, y0, x1, y1)`` in pixels, end-exclusive (as ``inversion.maskinversion
  .rasterize_boxes``; trace_shapes stores ``[y0, x0, y1, x1]``, see :func:`yxyx_to_xyxy`); a pixel
  (row r, column c) has its centre at (c + 0.5, r + 0.5);
* masks ``[H, W]`` in [0, 1] (binary or soft), at the image's resolution.
Each function handles one (image, region) pair; ``jax.vmap`` over the regions gives the K prompted
images of one image (what ``retrieval.region_embeddings`` does, in one jit).

The baselines (maskinversion.md §4.2 and App. G, table 7):
* **CLIP [CLS]** -- the image's own [CLS] embedding for every region: :func:`cls_embedding`.
* **Crop** -- "the CLS token of the cropped region by forwarding only this region through CLIP":
  :func:`crop` (the box, squashed to the model input size with one bilinear resample).
* **Masked Crop** -- "Crop the input image and mask the background" (table 7); §4.2 words it as
  "replacing all other pixels with the average pixel value of the dataset": :func:`masked_crop`
  (fill = the CLIP mean pixel, i.e. 0 after CLIP normalisation; ``box=None`` keeps the full frame,
  the other reading of §4.2's "forwarding the full image").
* **RedCircle** (Shtedritski et al. 2023) -- "draw a red circle around the area of interest": as the
  FGVP authors reproduce it (ylingfeng/FGVP ``fine_grained_visual_prompt.py`` 'circle',
  ``transforms.boxes_to_circles``): an ellipse outline of colour (255, 0, 0), centred on the box,
  semi-axes half the box's width and height, line thickness 2 px: :func:`red_circle`.
* **FGVP blur reverse mask** (Yang et al. 2024) -- "heavily blur the background": FGVP's
  'blur_mask' = PIL ``ImageFilter.GaussianBlur(blur_std_dev=100)`` of the whole image with the
  original pasted back inside the mask: :func:`fgvp_blur_reverse_mask`, with PIL's Gaussian (three
  passes of an extended box blur, edge pixels repeated) reproduced as a linear operator; Pillow rounds
  to uint8 after each pass and the operator does not, so they differ by <= 2 grey levels
  (tests/test_retrieval.py ``test_pil_gaussian_blur_matches_pillow``).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.data.preprocess import CLIP_MEAN, CLIP_STD  # noqa: E402 - pixel space, the one copy
RED = (1.0, 0.0, 0.0)                # FGVP str2rgb('red') = (255, 0, 0)
FGVP_THICKNESS = 2.0                 # FGVP main.py --thickness 2
FGVP_BLUR_STD = 100.0                # FGVP main.py --blur_std_dev 100


def _check_image(image):
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'image must be one [H, W, 3] image (vmap for more); got shape {tuple(image.shape)}')


def _check_mask(mask, image):
  if mask.shape != image.shape[:2]:
    raise ValueError(f'mask must be [H, W] = {tuple(image.shape[:2])} (the image size); got shape '
                     f'{tuple(mask.shape)}')


def _check_box(box):
  if box.shape != (4,):
    raise ValueError(f'box must be [4] = (x0, y0, x1, y1); got shape {tuple(box.shape)}')


def yxyx_to_xyxy(boxes):
  """trace_shapes ``objects/box`` [.., 4] = (y0, x0, y1, x1) -> (x0, y0, x1, y1)."""
  b = np.asarray(boxes) if not isinstance(boxes, jax.Array) else boxes
  return b[..., [1, 0, 3, 2]]


def mask_box(mask, threshold: float = 0.5):
  """Tight box (x0, y0, x1, y1) float32 [4], end-exclusive, of the pixels with mask > threshold.

  An empty mask gives the full frame (0, 0, W, H).
  """
  h, w = mask.shape[-2:]
  on = mask > threshold
  rows, cols = jnp.any(on, axis=1), jnp.any(on, axis=0)
  any_on = jnp.any(rows)
  y0 = jnp.argmax(rows)
  y1 = h - jnp.argmax(rows[::-1])
  x0 = jnp.argmax(cols)
  x1 = w - jnp.argmax(cols[::-1])
  box = jnp.stack([x0, y0, x1, y1]).astype(jnp.float32)
  return jnp.where(any_on, box, jnp.asarray([0, 0, w, h], jnp.float32))


# ----------------------------------------------------------------------------- crop + resize

def _int_span(lo, hi, n: int):
  """Integer pixel span [a, b) covering [lo, hi), clipped to [0, n), at least one pixel."""
  a = jnp.clip(jnp.floor(lo), 0, n - 1).astype(jnp.int32)
  b = jnp.clip(jnp.ceil(hi), 0, n).astype(jnp.int32)
  return a, jnp.maximum(b, a + 1)


def span_resize_matrix(a, b, n_in: int, n_out: int):
  """[n_out, n_in] bilinear weights resampling pixels [a, b) of an axis to n_out samples.

  torch ``F.interpolate(x[a:b], n_out, mode='bilinear', align_corners=False)`` (no antialias) along
  one axis: src = max((o + 0.5) (b - a) / n_out - 0.5, 0), i0 = floor(src), i1 = min(i0 + 1,
  b - a - 1), weights (1 - t, t), indices offset by a. ``a``, ``b`` may be traced.
  """
  length = (b - a).astype(jnp.float32)
  o = jnp.arange(n_out, dtype=jnp.float32)
  src = jnp.maximum((o + 0.5) * (length / n_out) - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src), length - 1)
  t = src - i0
  i1 = jnp.minimum(i0 + 1, length - 1)
  i0 = i0.astype(jnp.int32) + a
  i1 = i1.astype(jnp.int32) + a
  return ((1.0 - t)[:, None] * jax.nn.one_hot(i0, n_in, dtype=jnp.float32)
          + t[:, None] * jax.nn.one_hot(i1, n_in, dtype=jnp.float32))


def _hw(out_size, image):
  if out_size is None:
    return tuple(image.shape[:2])
  if isinstance(out_size, int):
    return (out_size, out_size)
  return tuple(int(s) for s in out_size)


def crop(image, box, out_size: int | Sequence[int] | None = None):
  """Crop baseline: the box's pixels squashed to ``out_size`` by one bilinear resample.

  Args:
    image [H, W, 3] (pixel space or normalised: the operation is linear); box [4] (x0, y0, x1, y1)
      pixels, end-exclusive, may be traced; it is widened to whole pixels (floor x0, ceil x1),
      clipped to the image, at least 1 px (FGVP ``box.int()`` then +1 on an empty side).
    out_size: (h, w) or an int; default the image's own size (the resolution the model runs at).
  Returns:
    [h, w, 3] float32 = torch ``F.interpolate(image[y0:y1, x0:x1], (h, w), 'bilinear',
    align_corners=False)``, the FGVP 'crop' prompt's final resize (no aspect-ratio padding).
  """
  _check_image(image)
  box = jnp.asarray(box, jnp.float32)
  _check_box(box)
  (h_in, w_in), (h, w) = image.shape[:2], _hw(out_size, image)
  y0, y1 = _int_span(box[1], box[3], h_in)
  x0, x1 = _int_span(box[0], box[2], w_in)
  rh = span_resize_matrix(y0, y1, h_in, h)
  rw = span_resize_matrix(x0, x1, w_in, w)
  return jnp.einsum('ay,yxc,bx->abc', rh, image.astype(jnp.float32), rw,
                    precision=jax.lax.Precision.HIGHEST)


def masked_crop(image, mask, box=None, out_size: int | Sequence[int] | None = None,
                fill: Sequence[float] = CLIP_MEAN, crop_to_box: bool = True):
  """Masked Crop baseline: pixels outside the mask -> ``fill``, then :func:`crop` to the box.

  Args:
    image [H, W, 3] pixel space; mask [H, W] in [0, 1] (soft masks blend: m x + (1 - m) fill);
    box [4] (x0, y0, x1, y1) or None = the mask's tight box (:func:`mask_box`);
    fill: RGB in the image's space; default the CLIP mean pixel ("the average pixel value of the
      dataset", maskinversion.md §4.2), which CLIP normalisation maps to 0;
    crop_to_box: False keeps the full frame (masking only, resized to ``out_size``).
  Returns:
    [h, w, 3] float32.
  """
  _check_image(image)
  _check_mask(mask, image)
  m = mask.astype(jnp.float32)[..., None]
  filled = m * image.astype(jnp.float32) + (1.0 - m) * jnp.asarray(fill, jnp.float32)
  if not crop_to_box:
    box = jnp.asarray([0, 0, image.shape[1], image.shape[0]], jnp.float32)
  elif box is None:
    box = mask_box(mask)
  return crop(filled, box, out_size)


# ----------------------------------------------------------------------------- red circle

def ellipse_distance(px, py, a, b, iters: int = 8):
  """Euclidean distance of points (px, py) (relative to the centre) to the ellipse x²/a² + y²/b² = 1.

  The closest point is found by the evolute iteration of Chatfield ("a simple method for distance
  to ellipse"; converges to < 1e-4 px in 3-4 steps); broadcasts over the points.
  """
  px, py = jnp.broadcast_arrays(jnp.abs(px), jnp.abs(py))
  a = jnp.maximum(a, 1e-3)
  b = jnp.maximum(b, 1e-3)
  tx = jnp.full_like(px, 0.70710678)
  ty = jnp.full_like(py, 0.70710678)

  def body(_, t):
    tx, ty = t
    x, y = a * tx, b * ty
    ex = (a * a - b * b) * tx ** 3 / a
    ey = (b * b - a * a) * ty ** 3 / b
    rx, ry = x - ex, y - ey
    qx, qy = px - ex, py - ey
    r = jnp.hypot(rx, ry)
    q = jnp.maximum(jnp.hypot(qx, qy), 1e-9)
    tx = jnp.clip((qx * r / q + ex) / a, 0.0, 1.0)
    ty = jnp.clip((qy * r / q + ey) / b, 0.0, 1.0)
    n = jnp.maximum(jnp.hypot(tx, ty), 1e-12)
    return tx / n, ty / n

  tx, ty = jax.lax.fori_loop(0, iters, body, (tx, ty))
  return jnp.hypot(px - a * tx, py - b * ty)


def ring_mask(hw: tuple[int, int], box, thickness: float = FGVP_THICKNESS, scale: float = 1.0):
  """bool [H, W]: pixels whose centre lies within thickness / 2 of the box's inscribed ellipse.

  Centre ((x0 + x1) / 2, (y0 + y1) / 2), semi-axes scale * (x1 - x0) / 2, scale * (y1 - y0) / 2
  (FGVP ``boxes_to_circles``); the line of width ``thickness`` is centred on the curve.
  """
  box = jnp.asarray(box, jnp.float32)
  _check_box(box)
  h, w = hw
  cx, cy = 0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3])
  a = 0.5 * scale * (box[2] - box[0])
  b = 0.5 * scale * (box[3] - box[1])
  xs = jnp.arange(w, dtype=jnp.float32) + 0.5 - cx
  ys = jnp.arange(h, dtype=jnp.float32) + 0.5 - cy
  d = ellipse_distance(xs[None, :], ys[:, None], a, b)
  return d <= 0.5 * thickness


def red_circle(image, box=None, mask=None, thickness: float = FGVP_THICKNESS,
               color: Sequence[float] = RED, scale: float = 1.0):
  """RedCircle baseline: a red ellipse outline around the region, drawn in pixel space.

  Args:
    image [H, W, 3] pixel space [0, 1]; box [4] (x0, y0, x1, y1), or None to use ``mask``'s tight
    box; thickness: line width in pixels of this image (FGVP: 2); color: RGB in [0, 1]; scale:
    semi-axes factor (1 = the ellipse inscribed in the box, as FGVP).
  Returns:
    [H, W, 3] float32, ``color`` on :func:`ring_mask`, the image elsewhere (hard pixels, like
    cv2.ellipse with its default 8-connected line).
  """
  _check_image(image)
  if box is None:
    if mask is None:
      raise ValueError('red_circle needs a box or a mask')
    _check_mask(mask, image)
    box = mask_box(mask)
  ring = ring_mask(image.shape[:2], box, thickness, scale)
  return jnp.where(ring[..., None], jnp.asarray(color, jnp.float32), image.astype(jnp.float32))


# ----------------------------------------------------------------------------- FGVP blur

def pil_blur_radius(sigma: float, passes: int = 3) -> float:
  """Pillow ``_gaussian_blur_radius`` (libImaging/BoxBlur.c): the extended-box radius whose
  ``passes``-fold repetition has variance sigma² (Gwosdek et al. 2011, eqs. 7, 11, 14)."""
  sigma2 = sigma * sigma / passes
  big_l = math.sqrt(12.0 * sigma2 + 1.0)
  l = math.floor((big_l - 1.0) / 2.0)
  a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2)
  a /= 6 * (sigma2 - (l + 1) * (l + 1))
  return l + a


@functools.lru_cache(maxsize=64)
def pil_box_blur_matrix(n: int, radius: float) -> np.ndarray:
  """[n, n] Pillow ``ImagingLineBoxBlur`` along one axis of length n (float, no uint8 rounding).

  out[x] = ww * sum_{|i - x| <= r} in[clamp(i)] + fw * (in[clamp(x - r - 1)] + in[clamp(x + r + 1)]),
  r = int(radius), ww = floor(2^24 / (2 radius + 1)) / 2^24, fw = floor((2^24 - (2r + 1) ww 2^24) / 2)
  / 2^24; indices are clamped (edge pixels repeated), as Pillow's accumulator does.
  """
  r = int(radius)
  ww_i = int((1 << 24) / (radius * 2 + 1))
  fw_i = ((1 << 24) - (r * 2 + 1) * ww_i) // 2
  ww, fw = ww_i / float(1 << 24), fw_i / float(1 << 24)
  m = np.zeros((n, n), np.float64)
  rows = np.arange(n)
  for off in range(-r, r + 1):
    np.add.at(m, (rows, np.clip(rows + off, 0, n - 1)), ww)
  np.add.at(m, (rows, np.clip(rows - r - 1, 0, n - 1)), fw)
  np.add.at(m, (rows, np.clip(rows + r + 1, 0, n - 1)), fw)
  return m


@functools.lru_cache(maxsize=64)
def pil_gaussian_matrix(n: int, sigma: float, passes: int = 3) -> np.ndarray:
  """[n, n] float32 operator of Pillow ``GaussianBlur(sigma)`` along one axis: ``passes`` box blurs."""
  if sigma <= 0:
    return np.eye(n, dtype=np.float32)
  b = pil_box_blur_matrix(n, pil_blur_radius(float(sigma), passes))
  return np.linalg.matrix_power(b, passes).astype(np.float32)


def pil_gaussian_blur(image, sigma: float = FGVP_BLUR_STD):
  """Pillow ``image.filter(ImageFilter.GaussianBlur(sigma))`` of [H, W, C] float (static sigma).

  Equal to Pillow up to its uint8 rounding after each of the six passes (tests: <= 2/255).
  """
  h, w = image.shape[:2]
  bh = jnp.asarray(pil_gaussian_matrix(h, float(sigma)))
  bw = jnp.asarray(pil_gaussian_matrix(w, float(sigma)))
  return jnp.einsum('ay,yxc,bx->abc', bh, image.astype(jnp.float32), bw,
                    precision=jax.lax.Precision.HIGHEST)


def fgvp_blur_reverse_mask(image, mask, sigma: float = FGVP_BLUR_STD, blurred=None):
  """FGVP "Blur Reverse Mask": the image with everything outside the mask Gaussian-blurred.

  FGVP 'blur_mask': ``overlay = img.filter(GaussianBlur(sigma)); overlay.paste(img, mask)``, i.e.
  out = m img + (1 - m) blur(img) (PIL pastes a binary mask; a soft mask blends).

  Args:
    image [H, W, 3] (blur is linear: pixel space or normalised alike); mask [H, W] in [0, 1];
    sigma: PIL's radius = the Gaussian's standard deviation in pixels (FGVP: 100, static);
    blurred: the precomputed blur of ``image`` (it does not depend on the mask: pass it when
      prompting many masks of one image).
  """
  _check_image(image)
  _check_mask(mask, image)
  if blurred is None:
    blurred = pil_gaussian_blur(image, sigma)
  m = mask.astype(jnp.float32)[..., None]
  return m * image.astype(jnp.float32) + (1.0 - m) * blurred


# ----------------------------------------------------------------------------- [CLS]

def normalize(image, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
  """Pixel space [0, 1] -> the model's input space: (x - mean) / std per channel."""
  return (image - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def cls_embedding(model, params, images, pos_interp: str | None = None):
  """CLIP [CLS] baseline: the un-normalised projected [CLS] embedding of the full (normalised)
  image(s), [.., H, W, 3] -> [.., E]; every region of an image gets this same vector."""
  return model.apply({'params': params}, images, pos_interp, method='encode_image')[0]
