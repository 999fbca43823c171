"""Mask codecs of the real-dataset builders (no TensorFlow, no tfds, no pycocotools).

- Masks and label maps: single-channel PNG bytes (`encode_png` / `decode_png`; uint8, or uint16 for
  label ids > 255); `read_label_png` reads a class-index PNG file.
- COCO masks: a NumPy port of the official COCO API mask code (cocodataset/cocoapi
  `common/maskApi.c`: rleFrPoly, rleFrString / rleToString, rleDecode), checked bit-for-bit against
  pycocotools in tests/test_real_datasets.py where pycocotools is installed.
"""
from __future__ import annotations

import io
from typing import Any, Iterable, Sequence

import numpy as np

from trace_jax.data.real.readers import AnnotationError


# ----------------------------------------------------------------------------------------------------
# PNG masks


def encode_png(mask: np.ndarray) -> bytes:
  """[H, W] bool / uint8 / uint16 (or int with values < 65536) -> single-channel PNG bytes."""
  from PIL import Image
  m = np.asarray(mask)
  if m.ndim != 2:
    raise ValueError(f'mask must be 2-D, got shape {m.shape}')
  if m.dtype == np.bool_:
    m = m.astype(np.uint8)
  if m.dtype not in (np.uint8, np.uint16):
    if m.size and (m.min() < 0 or m.max() > 65535):
      raise ValueError('mask values must lie in [0, 65535]')
    m = m.astype(np.uint8 if (not m.size or m.max() < 256) else np.uint16)
  buf = io.BytesIO()
  Image.fromarray(m).save(buf, format='PNG')
  return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
  """Single-channel PNG bytes -> [H, W] uint8 (or uint16 / int32 for 16-bit PNGs). Palette ('P')
  PNGs give their palette INDICES (the class ids of VOC / COCO-Stuff maps), not colours."""
  from PIL import Image
  with Image.open(io.BytesIO(bytes(data))) as im:
    if im.mode in ('RGB', 'RGBA'):
      raise ValueError(f'expected a single-channel PNG, got mode {im.mode}')
    a = np.asarray(im)
  return a if a.dtype in (np.uint8, np.uint16) else a.astype(np.int32)


def read_label_png(path: str) -> np.ndarray:
  """A class-index PNG (palette or grey) -> [H, W] integer array of indices."""
  with open(path, 'rb') as f:
    return decode_png(f.read())


# ----------------------------------------------------------------------------------------------------
# COCO run-length encoding and polygons (port of cocoapi common/maskApi.c)
#
# An RLE is (h, w, counts): counts alternate runs of 0s and 1s (starting with 0s) over the mask
# flattened in COLUMN-MAJOR (Fortran) order.


def rle_from_string(s: str | bytes) -> list[int]:
  """Compressed COCO RLE string -> counts (maskApi.c rleFrString). Each count is a signed LEB-like
  sequence of 5-bit groups offset by 48; counts[i] for i > 2 are stored as a delta to counts[i-2]."""
  if isinstance(s, bytes):
    s = s.decode('ascii')
  counts: list[int] = []
  p = 0
  n = len(s)
  while p < n:
    x = 0
    k = 0
    more = True
    while more:
      if p >= n:
        raise ValueError('truncated compressed RLE string')
      c = ord(s[p]) - 48
      x |= (c & 0x1f) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and (c & 0x10):
        x |= -1 << (5 * k)
    if len(counts) > 2:  # maskApi.c: `if(m>2) x+=cnts[m-2]`
      x += counts[-2]
    counts.append(int(x))
  return counts


def rle_to_string(counts: Sequence[int]) -> str:
  """counts -> compressed COCO RLE string (maskApi.c rleToString)."""
  out = []
  for i, c in enumerate(counts):
    x = int(c)
    if i > 2:
      x -= int(counts[i - 2])
    more = True
    while more:
      ch = x & 0x1f
      x >>= 5  # arithmetic shift, as for C `long`
      more = (x != -1) if (ch & 0x10) else (x != 0)
      if more:
        ch |= 0x20
      out.append(chr(ch + 48))
  return ''.join(out)


def rle_decode(counts: Sequence[int], h: int, w: int) -> np.ndarray:
  """counts -> bool [h, w] mask (maskApi.c rleDecode; column-major runs)."""
  counts = np.asarray(counts, np.int64)
  if counts.size and counts.min() < 0:
    raise ValueError('negative RLE count')
  if int(counts.sum()) != h * w:
    raise ValueError(f'RLE counts sum to {int(counts.sum())}, expected h*w = {h * w}')
  vals = np.zeros(counts.size, np.bool_)
  vals[1::2] = True
  flat = np.repeat(vals, counts)
  return flat.reshape(w, h).T


def rle_encode(mask: np.ndarray) -> list[int]:
  """bool [h, w] -> uncompressed counts (maskApi.c rleEncode)."""
  flat = np.asarray(mask, np.bool_).T.reshape(-1)
  if flat.size == 0:
    return [0]
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds).tolist()
  if flat[0]:
    runs = [0] + runs
  return [int(r) for r in runs]


def _c_int(x: float) -> int:
  return int(x)  # C cast: truncation toward zero


def polygon_to_rle(xy: Sequence[float], h: int, w: int) -> list[int]:
  """One COCO polygon [x0, y0, x1, y1, ...] -> counts (maskApi.c rleFrPoly; equal to pycocotools on 200
  random polygons, tests/test_real_datasets.py ``test_polygon_and_rle_match_pycocotools``: boundary
  points on a 5x upsampled grid, then the y-boundary crossings turned into column-major runs)."""
  xy = [float(t) for t in xy]
  k = len(xy) // 2
  scale = 5.0
  x = [_c_int(scale * xy[2 * j] + .5) for j in range(k)] + [0]
  y = [_c_int(scale * xy[2 * j + 1] + .5) for j in range(k)] + [0]
  x[k], y[k] = x[0], y[0]
  u: list[int] = []
  v: list[int] = []
  for j in range(k):
    xs, xe, ys, ye = x[j], x[j + 1], y[j], y[j + 1]
    dx, dy = abs(xe - xs), abs(ys - ye)
    flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
    if flip:
      xs, xe, ys, ye = xe, xs, ye, ys
    if dx >= dy:
      s = (ye - ys) / dx if dx else 0.0
      for d in range(dx + 1):
        t = dx - d if flip else d
        u.append(t + xs)
        v.append(_c_int(ys + s * t + .5))
    else:
      s = (xe - xs) / dy
      for d in range(dy + 1):
        t = dy - d if flip else d
        v.append(t + ys)
        u.append(_c_int(xs + s * t + .5))
  # y-boundary points, downsampled
  a = []
  for j in range(1, len(u)):
    if u[j] == u[j - 1]:
      continue
    xd = float(u[j] if u[j] < u[j - 1] else u[j] - 1)
    xd = (xd + .5) / scale - .5
    if np.floor(xd) != xd or xd < 0 or xd > w - 1:
      continue
    yd = float(v[j] if v[j] < v[j - 1] else v[j - 1])
    yd = (yd + .5) / scale - .5
    yd = 0.0 if yd < 0 else (float(h) if yd > h else yd)
    yd = np.ceil(yd)
    a.append(int(xd) * h + int(yd))
  a.append(h * w)
  a.sort()
  prev = 0
  for j in range(len(a)):
    t = a[j]
    a[j] -= prev
    prev = t
  b = [a[0]]
  j = 1
  while j < len(a):
    if a[j] > 0:
      b.append(a[j])
      j += 1
    else:
      j += 1
      if j < len(a):
        b[-1] += a[j]
        j += 1
  return b


def polygons_to_mask(polygons: Iterable[Sequence[float]], h: int, w: int) -> np.ndarray:
  """Union of COCO polygons -> bool [h, w] (the COCO API's annToMask for polygon segmentations)."""
  m = np.zeros((h, w), np.bool_)
  for poly in polygons:
    if len(poly) >= 6:  # the COCO API ignores degenerate polygons (< 3 points) the same way
      m |= rle_decode(polygon_to_rle(poly, h, w), h, w)
  return m


def coco_segmentation_to_mask(segm: Any, h: int, w: int, path: str = '<annotations>',
                              where: str = 'segmentation') -> np.ndarray:
  """A COCO `segmentation` field (polygon list, uncompressed RLE {'counts': [...], 'size': [h, w]},
  or compressed RLE {'counts': str, 'size': [h, w]}) -> bool [h, w]."""
  try:
    if isinstance(segm, list):
      if not all(isinstance(p, list) for p in segm):
        raise ValueError('expected a list of polygons (lists of numbers)')
      return polygons_to_mask(segm, h, w)
    if isinstance(segm, dict):
      size = segm.get('size')
      if size is None or 'counts' not in segm:
        raise ValueError("an RLE needs 'counts' and 'size'")
      rh, rw = int(size[0]), int(size[1])
      if (rh, rw) != (h, w):
        raise ValueError(f'RLE size {[rh, rw]} differs from the image size {[h, w]}')
      counts = segm['counts']
      counts = rle_from_string(counts) if isinstance(counts, (str, bytes)) else counts
      return rle_decode(counts, h, w)
    raise ValueError(f'unsupported type {type(segm).__name__}')
  except (ValueError, TypeError) as e:
    raise AnnotationError(path, where, str(e)) from None
