"""What every dataset spec reader yields: ``Item`` (one image) with ``MaskRef``s (its masks), and the
file helpers the readers share (image folders, mask files)."""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Callable

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class MaskRef:
  """One mask of an image: ``id`` (unique within the image) and ``load() -> float32 [H, W]`` (or
  [K, H, W] for a ``.npy`` stack) in [0, 1]; ``load`` raises ValueError naming what is unreadable."""
  id: str
  load: Callable[[], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Item:
  """One image of a spec. ``id``: unique and stable (the shards' ``ids``). ``image``: a file path, or
  a zero-argument callable returning the encoded bytes (tfds). ``masks`` / ``texts``: tuples, or
  zero-argument callables returning them (read when the item's shard runs, not when it is listed)."""
  id: str
  image: Any
  masks: Any = ()
  texts: Any = ()

  def mask_refs(self) -> tuple:
    return tuple(self.masks() if callable(self.masks) else self.masks)

  def prompts(self) -> tuple:
    return tuple(self.texts() if callable(self.texts) else self.texts)

  def image_file(self):
    """What PIL opens: the path, or a BytesIO of the loaded bytes."""
    return self.image if isinstance(self.image, str) else io.BytesIO(bytes(self.image()))


def list_images(folder: str) -> list[str]:
  """Image files of ``folder`` (sorted names, extensions ``IMAGE_EXTS``); ValueError when none."""
  if not os.path.isdir(folder):
    raise ValueError(f"{folder} is not a folder")
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
  if not files:
    raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTS)})")
  return [os.path.join(folder, f) for f in files]


def find_image(folder: str, stem: str) -> str | None:
  """The image ``folder/stem.<ext>`` (any of ``IMAGE_EXTS``, either case), or None."""
  for ext in IMAGE_EXTS:
    for e in (ext, ext.upper()):
      p = os.path.join(folder, stem + e)
      if os.path.isfile(p):
        return p
  return None


def read_mask_file(path: str) -> np.ndarray:
  """A mask file -> float32 [H, W] (or [K, H, W]): an image file's grey values / 255 (no resize, no
  threshold: MaskInversion's ``MaskInversionMaskPreprocess``), or a ``.npy`` array (no pickles).
  ValueError naming the file when it cannot be read or holds no 2-D / 3-D array."""
  if path.endswith(".npy"):
    try:
      m = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
      raise ValueError(f"cannot read mask {path}: {e}") from e
    if not (np.issubdtype(m.dtype, np.number) or m.dtype == np.bool_):
      raise ValueError(f"mask {path} must hold numbers; got dtype {m.dtype}")
  else:
    from PIL import Image
    try:
      with Image.open(path) as im:
        m = np.asarray(im.convert("L"), np.float32) / 255.0
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read mask {path}: {e}") from e
  if m.ndim not in (2, 3):
    raise ValueError(f"mask {path} must be [H, W] or [K, H, W]; got shape {m.shape}")
  if m.size == 0:
    raise ValueError(f"mask {path} holds no mask (shape {m.shape})")
  return m.astype(np.float32)
