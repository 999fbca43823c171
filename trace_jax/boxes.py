"""Boxes -> binary masks, by one of two rules. NumPy only; imports nothing of trace_jax or jax, so the
data pipeline (which stays jax-free), evaluation and inversion can all use it. It sits at the bottom
layer with ``ops.py`` and ``resize.py``.

The two rules differ only for fractional coordinates (integer boxes give the same mask either way):

* ``'truncate'``: ``mask[int(y0):int(y1), int(x0):int(x1)] = 1`` (end-exclusive integer slices). This
  is AMC's box mask: ``dataset/caption_dataset.py`` casts the clipped box with ``int()`` and then sets
  ``gt_mask[y1:y2, x1:x2] = 1`` (notes/amc-and-local-alignment.md §4). Used for the AMC training mask
  (data/pipeline.py) and for the M2IB localisation ground truth (evaluation/metrics.py
  ``boxes_to_mask``). The M2IB repository has no localisation script (notes/m2ib.md), so the M2IB case
  borrows AMC's rule. Coordinates below 0 count as 0; the far side is clipped to the image, as a numpy
  slice clips it.
* ``'centre'``: a pixel (row r, column c) is inside when its centre (c + 0.5, r + 0.5) lies in
  [x0, x1) × [y0, y1). This is our own rule, used for ``inversion.invert(boxes=...)`` and for the
  visual-prompt geometry (evaluation/visual_prompts.py). maskinversion-torch takes masks only
  (``MaskInversionMaskPreprocess`` = ``np.array(PIL) / 255``; notes/legrad-maskinversion.md,
  MaskInversion step 6), so it has no box rule to follow.
"""
from __future__ import annotations

import numpy as np

BOX_RULES = ("truncate", "centre")
BOX_FORMATS = ("xyxy", "xywh", "yxyx")


def as_xyxy(boxes, box_format: str = "xyxy") -> np.ndarray:
  """[K, 4] or one [4] box in ``box_format`` -> float64 [K, 4] (x0, y0, x1, y1)."""
  if box_format not in BOX_FORMATS:
    raise ValueError(f"box_format must be one of {BOX_FORMATS}; got {box_format!r}")
  b = np.asarray(boxes, np.float64)
  if b.ndim == 1:
    b = b[None]
  if b.ndim != 2 or b.shape[-1] != 4:
    raise ValueError(f"boxes must be [K, 4] ({box_format}); got shape {b.shape}")
  if box_format == "xywh":
    return np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=-1)
  if box_format == "yxyx":
    return b[:, [1, 0, 3, 2]]
  return b


def boxes_to_masks(boxes, hw: tuple[int, int], *, rule: str, box_format: str = "xyxy") -> np.ndarray:
  """One bool mask per box: [K, 4] (or one [4]) boxes -> [K, H, W], by ``rule`` (module docstring).

  Args:
    boxes: coordinates in pixels of the [H, W] frame, in ``box_format`` ('xyxy' = (x0, y0, x1, y1),
      'xywh', or 'yxyx' = trace_shapes' ``objects/box``).
    hw: (H, W) of the masks.
    rule: 'truncate' (AMC's ``int()`` slices) or 'centre' (pixel centres in the half-open box).
  """
  if rule not in BOX_RULES:
    raise ValueError(f"rule must be one of {BOX_RULES}; got {rule!r}")
  b = as_xyxy(boxes, box_format)
  h, w = int(hw[0]), int(hw[1])
  if rule == "centre":
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
  else:
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    b = np.maximum(np.trunc(b), 0.0)  # int() truncates toward 0; slice bounds below 0 read as 0
  inx = (xs[None] >= b[:, 0:1]) & (xs[None] < b[:, 2:3])  # [K, W]
  iny = (ys[None] >= b[:, 1:2]) & (ys[None] < b[:, 3:4])  # [K, H]
  return iny[:, :, None] & inx[:, None, :]
