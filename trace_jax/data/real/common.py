"""Shared parsing helpers for the real-dataset tfds builders (no TensorFlow, no pycocotools needed).

- Errors: `AnnotationError` (a ValueError) always names the file and the field; a missing annotation
  file raises FileNotFoundError naming the file and what it should contain.
- Images: stored as the ORIGINAL encoded bytes (JPEG/PNG, never re-encoded) in a
  `tfds.features.Tensor(shape=(), dtype=object)`; `decode_image` reads them back with PIL.
  (`tfds.features.Image` would need TensorFlow.)
- Masks: single-channel PNG bytes (`encode_png` / `decode_png`; uint8, or uint16 for label ids > 255).
- COCO masks: a NumPy port of the official COCO API mask code (cocodataset/cocoapi
  `common/maskApi.c`: rleFrPoly, rleFrString / rleToString, rleDecode), checked bit-for-bit against
  pycocotools in tests/test_real_datasets.py where pycocotools is installed.
- Missing images: `SkipCounter` logs, skips and counts annotations whose image file is absent; the
  builders store the counts in `builder.info.metadata['skipped']` (see `RealBuilder.stats`).

Box convention of every real builder: float32 [N, 4] = [x0, y0, x1, y1] in ORIGINAL-image pixel
units, continuous coordinates (pixel column i covers [i, i + 1)), so x1 - x0 is the box width.
Each builder states how it converts its official box format.
"""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds

log = logging.getLogger('trace_jax.data.real')


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
# Images and masks


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
  """One COCO polygon [x0, y0, x1, y1, ...] -> counts (maskApi.c rleFrPoly, exactly: boundary
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


# ----------------------------------------------------------------------------------------------------
# Missing images


class SkipCounter:
  """Counts (and logs the first few of) annotations skipped because a file they point to is missing
  (kind 'image': the photo; other kinds, e.g. 'label_map', name other per-image files)."""

  def __init__(self, dataset: str, max_logged: int = 10, max_listed: int = 50):
    self.dataset = dataset
    self.counts: dict[str, dict[str, int]] = {'image': {}}
    self.files: dict[str, dict[str, list[str]]] = {'image': {}}
    self.max_logged, self.max_listed = max_logged, max_listed
    self._logged = 0

  def missing(self, split: str, path: str, n_annotations: int = 1, kind: str = 'image'):
    """Record that `n_annotations` annotations of `split` point to the missing file `path`."""
    c = self.counts.setdefault(kind, {})
    c[split] = c.get(split, 0) + int(n_annotations)
    lst = self.files.setdefault(kind, {}).setdefault(split, [])
    if len(lst) < self.max_listed:
      lst.append(os.path.basename(path))
    if self._logged < self.max_logged:
      self._logged += 1
      log.warning('%s/%s: %s %s is missing; skipping its %d annotation(s)', self.dataset, split, kind,
                  path, n_annotations)

  def as_dict(self) -> dict:
    """{'missing_image_annotations': {split: n}, 'missing_image_files': {split: [names]}, and the
    same two keys per other kind (e.g. 'missing_label_map_annotations')}."""
    out = {}
    for kind in self.counts:
      out[f'missing_{kind}_annotations'] = dict(self.counts[kind])
      out[f'missing_{kind}_files'] = dict(self.files.get(kind, {}))
    return out


# ----------------------------------------------------------------------------------------------------
# Builder base


IMAGE_BYTES = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)  # noqa: E731
PNG_BYTES = IMAGE_BYTES


def ints(*shape, dtype=np.int32):
  return tfds.features.Tensor(shape=shape, dtype=dtype)


def floats(*shape):
  return tfds.features.Tensor(shape=shape, dtype=np.float32)


def texts():
  return tfds.features.Sequence(tfds.features.Text())


def bytes_list():
  return tfds.features.Tensor(shape=(None,), dtype=np.object_)


class RealBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common base: reads from `dl_manager.manual_dir`, counts skipped annotations per split into
  `info.metadata['skipped']` (persisted with the dataset; read back with `.stats`)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _metadata(self):
    return tfds.core.MetadataDict(skipped={'missing_image_annotations': {}, 'missing_image_files': {}})

  def _manual_dir(self, dl_manager) -> str:
    d = str(dl_manager.manual_dir)
    if not os.path.isdir(d):
      raise FileNotFoundError(f'{self.name}: manual_dir {d} does not exist; pass '
                              "download_config=tfds.download.DownloadConfig(manual_dir=...) "
                              '(see docs/datasets.md)')
    return d

  def _skips(self) -> SkipCounter:
    if not hasattr(self, '_skip_counter'):
      self._skip_counter = SkipCounter(self.name)
    return self._skip_counter

  def _publish_skips(self):
    """Writes the counts into the metadata (saved with dataset_info after generation)."""
    self.info.metadata['skipped'] = self._skips().as_dict()

  def _missing(self, split: str, path: str, n: int = 1, kind: str = 'image'):
    self._skips().missing(split, path, n, kind)
    self._publish_skips()

  def _generate_examples(self, *args, **kwargs):  # each builder defines its generator(s)
    raise NotImplementedError

  @property
  def stats(self) -> dict:
    """{'missing_image_annotations': {split: count}, 'missing_image_files': {split: [names]}}."""
    md = self.info.metadata or {}
    return dict(md.get('skipped', {}))


def prepare(builder_cls, manual_dir: str, data_dir: str | None = None, config: str | None = None,
            **config_kwargs):
  """Builds (array_record) from `manual_dir` and returns the builder. `config` is a BUILDER_CONFIGS
  name; `config_kwargs` override fields of that config (a new config named `config + '_custom'`
  unless `name=` is given)."""
  cfg = config
  if config_kwargs:
    base = next(c for c in builder_cls.BUILDER_CONFIGS
                if c.name == (config or builder_cls.DEFAULT_CONFIG_NAME or builder_cls.BUILDER_CONFIGS[0].name))
    import dataclasses
    name = config_kwargs.pop('name', base.name + '_custom')
    cfg = dataclasses.replace(base, name=name, **config_kwargs)
  b = builder_cls(config=cfg, data_dir=data_dir, file_format='array_record')
  b.download_and_prepare(file_format='array_record',
                         download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return b


def decode_str(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def main(prepare_fn, default_config: str, builder_cls=None, argv=None) -> int:
  """`python -m trace_jax.data.real.<module> --manual_dir DIR [--data_dir DIR] [--config NAME]
  [--splits a,b]`: builds (array_record) and prints the splits and the skipped-annotation counts."""
  import argparse
  import time
  p = argparse.ArgumentParser(description='Build a trace_jax real-dataset tfds builder from manual_dir '
                              '(see docs/datasets.md).')
  p.add_argument('--manual_dir', required=True, help='folder with the official files')
  p.add_argument('--data_dir', default=None, help='tfds data_dir (default ~/tensorflow_datasets)')
  p.add_argument('--config', default=default_config)
  p.add_argument('--splits', default=None, help='comma-separated subset of the official splits '
                 '(builders with a `splits` option: coco, flickr30k_entities, voc)')
  a = p.parse_args(argv)
  kw = {}
  if a.splits:
    splits = tuple(s for s in a.splits.split(',') if s)
    name = f'{a.config}_{"_".join(splits)}'
    # a predefined config with exactly these splits (e.g. trace_coco/instances_val2017) is used as is
    kw = ({} if name in {c.name for c in getattr(builder_cls, 'BUILDER_CONFIGS', ())} else
          dict(splits=splits, name=name))
    a.config = name if not kw else a.config
  t = time.time()
  try:
    b = prepare_fn(os.path.expanduser(a.manual_dir), a.data_dir and os.path.expanduser(a.data_dir),
                   a.config, **kw)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}')
    return 2
  print(f'built {b.name}/{b.builder_config.name} in {time.time() - t:.1f}s at {b.data_dir}')
  for split, info in b.info.splits.items():
    print(f'  {split}: {info.num_examples} examples')
  print(f'  skipped: {json.dumps(b.stats)}')
  return 0
