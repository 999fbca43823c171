"""Image preprocessing with PIL -> float32 NHWC, normalised with OpenAI CLIP's mean / std.

Two resize modes:

* ``'crop'`` (CLIP / open_clip default): resize the shortest side to ``size`` (bicubic), centre
  crop ``size x size``.
* ``'squash'``: ``Resize((size, size), BICUBIC)`` with no crop — LeGrad / MaskInversion's
  ``LePreprocess`` (notes/legrad-maskinversion.md, "Other resolutions").
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# OpenAI CLIP normalisation (open_clip OPENAI_DATASET_MEAN / STD, HF CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEAN = np.array(CLIP_MEAN, np.float32)
STD = np.array(CLIP_STD, np.float32)
MODES = ("crop", "squash")
# what each image tower kind was trained on: CLIP's mean / std, SigLIP's [-1, 1] (big_vision / open_clip
# ViT-*-SigLIP INCEPTION_MEAN / STD: mean = std = 0.5; HF SiglipImageProcessor)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def pixel_stats(tower_kind: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) float32 [3] the image tower of kind ``tower_kind`` ('vit', 'crate', 'siglip') expects."""
  if tower_kind == "siglip":
    return np.asarray(SIGLIP_MEAN, np.float32), np.asarray(SIGLIP_STD, np.float32)
  return MEAN, STD


def resize_image(img, size: int, mode: str = "crop"):
  """PIL image -> RGB PIL image of size x size."""
  from PIL import Image
  if mode not in MODES:
    raise ValueError(f"unknown resize mode {mode!r}; expected one of {MODES}")
  img = img.convert("RGB")
  if mode == "squash":
    return img.resize((size, size), Image.BICUBIC)
  w, h = img.size
  (nw, nh), box = crop_geometry(h, w, size)
  if (nw, nh) != (w, h):
    img = img.resize((nw, nh), Image.BICUBIC)
  return img.crop(box)


def crop_geometry(height: int, width: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
  """((new_w, new_h), (left, top, right, bottom)) of 'crop' mode (torchvision Resize(int) +
  CenterCrop): the shorter side -> ``size``, the long side rounded DOWN as torchvision does
  (int(size * long / short)), then the centre ``size`` x ``size`` square."""
  nw, nh = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
  left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
  return (nw, nh), (left, top, left + size, top + size)


def normalize(rgb_uint8: np.ndarray, tower_kind: str = "vit") -> np.ndarray:
  """[.., H, W, 3] uint8 -> float32 (x / 255 - mean) / std (the tower kind's mean / std)."""
  return normalize_unit(np.asarray(rgb_uint8, np.float32) / 255.0, tower_kind)


def normalize_unit(px: np.ndarray, tower_kind: str = "vit") -> np.ndarray:
  """[.., H, W, 3] pixels in [0, 1] -> float32 (x - mean) / std (``pixel_stats(tower_kind)``)."""
  mean, std = pixel_stats(tower_kind)
  return ((np.asarray(px, np.float32) - mean) / std).astype(np.float32)


def load_images(paths: Sequence[str], size: int, mode: str = "crop", tower_kind: str = "vit") -> np.ndarray:
  """Image files (paths or file objects) -> float32 [B, size, size, 3], normalised for ``tower_kind``."""
  from PIL import Image
  out = []
  for p in paths:
    try:
      with Image.open(p) as img:
        out.append(np.asarray(resize_image(img, size, mode)))
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read image {p}: {e}") from e
  return normalize(np.stack(out), tower_kind)


def as_str(x) -> str:
  """A tfds text feature (bytes, UTF-8) or any value -> str."""
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)
