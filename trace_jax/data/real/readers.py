"""File and annotation readers of the real-dataset builders (no TensorFlow, no tfds, no pycocotools).

- Errors: `AnnotationError` (a ValueError) always names the file and the field; a missing annotation
  file raises FileNotFoundError naming the file and what it should contain.
- Annotation fields: `load_json`, `get` / `get_list` / `get_box` check presence and type.
- Images: stored as the ORIGINAL encoded bytes (JPEG/PNG, never re-encoded); `read_image` reads a file
  (None when it is missing: the builder skips and counts), `decode_image` reads the bytes back with PIL.

Box convention of every real builder: float32 [N, 4] = [x0, y0, x1, y1] in ORIGINAL-image pixel
units, continuous coordinates (pixel column i covers [i, i + 1)), so x1 - x0 is the box width.
Each builder states how it converts its official box format.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Sequence

import numpy as np

from trace_jax.data.preprocess import as_str as decode_str  # noqa: F401 - the one bytes->str


# ----------------------------------------------------------------------------------------------------
# Errors and file access


class AnnotationError(ValueError):
  """A malformed annotation: the message names the file and the field."""

  def __init__(self, path: str, field: str, problem: str):
    self.path, self.field, self.problem = str(path), str(field), str(problem)
    super().__init__(f'{self.path}: field {self.field!r}: {self.problem}')


def require_file(path: str, what: str) -> str:
  """Returns `path` if it is a file, else raises FileNotFoundError naming it and its content."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'missing annotation file {path} ({what}); see docs/datasets.md for the '
                            'expected manual_dir layout')
  return path


def require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise FileNotFoundError(f'missing directory {path} ({what}); see docs/datasets.md for the '
                            'expected manual_dir layout')
  return path


def load_json(path: str, what: str) -> Any:
  """Parses a JSON annotation file; FileNotFoundError / AnnotationError name the file."""
  require_file(path, what)
  try:
    with open(path, 'rb') as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise AnnotationError(path, '<file>', f'not valid JSON ({e})') from None


def get(obj: Any, key: str, path: str, where: str = '', types=None) -> Any:
  """obj[key], or AnnotationError naming `path` and the field `where.key` when absent / mistyped."""
  name = f'{where}.{key}' if where else key
  if not isinstance(obj, dict):
    raise AnnotationError(path, where or '<root>', f'expected an object, got {type(obj).__name__}')
  if key not in obj:
    raise AnnotationError(path, name, 'missing')
  v = obj[key]
  if types is not None and not isinstance(v, types):
    raise AnnotationError(path, name, f'expected {_type_names(types)}, got {type(v).__name__}')
  return v


def get_list(obj: Any, key: str, path: str, where: str = '') -> list:
  return get(obj, key, path, where, list)


def get_box(obj: Any, key: str, path: str, where: str = '') -> list[float]:
  """A 4-number box field ([x, y, w, h] in COCO / REFER)."""
  v = get(obj, key, path, where, (list, tuple))
  if len(v) != 4 or not all(isinstance(t, (int, float)) for t in v):
    raise AnnotationError(path, f'{where}.{key}' if where else key, f'expected 4 numbers, got {v!r}')
  return [float(t) for t in v]


def _type_names(types) -> str:
  types = types if isinstance(types, tuple) else (types,)
  return ' or '.join(t.__name__ for t in types)


def xywh_to_xyxy(box) -> list[float]:
  """[x, y, w, h] (COCO, REFER, Visual Genome, MS-CXR) -> [x0, y0, x1, y1] = [x, y, x + w, y + h]."""
  x, y, w, h = (float(t) for t in box)
  return [x, y, x + w, y + h]


def boxes_array(boxes: Sequence[Sequence[float]]) -> np.ndarray:
  """float32 [N, 4] (also for N = 0)."""
  return np.asarray(boxes, np.float32).reshape(-1, 4)


# ----------------------------------------------------------------------------------------------------
# Images


def image_size(data: bytes) -> tuple[int, int]:
  """(height, width) of encoded image bytes (reads the header only)."""
  from PIL import Image
  with Image.open(io.BytesIO(data)) as im:
    return int(im.height), int(im.width)


def read_image(path: str) -> tuple[bytes, int, int] | None:
  """(encoded bytes, height, width), or None when the file does not exist (caller skips and counts).
  A file that exists but is not a readable image raises ValueError naming it."""
  if not os.path.isfile(path):
    return None
  with open(path, 'rb') as f:
    data = f.read()
  try:
    h, w = image_size(data)
  except Exception as e:  # PIL raises several types
    raise ValueError(f'{path}: not a readable image ({e})') from None
  return data, h, w


def decode_image(data: bytes) -> np.ndarray:
  """Encoded JPEG/PNG bytes -> uint8 [H, W, 3] RGB."""
  from PIL import Image
  with Image.open(io.BytesIO(bytes(data))) as im:
    return np.asarray(im.convert('RGB'))


