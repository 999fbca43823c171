"""Loading and the helpers shared by the real-dataset evaluations (trace_jax/evaluation/real/).

Images: decoded from the stored original bytes, resized to ``eval.image_size`` (``resize`` 'squash' =
the authors' Resize((S, S)) of LeGrad / MaskInversion / AMC, bicubic; 'crop' = the CLIP processor:
shortest side then centre crop), CLIP-normalised (data/preprocess.py). Boxes are the builders'
[x0, y0, x1, y1] original-pixel convention (data/real/readers.py).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.data import preprocess


# ---------------------------------------------------------------------------------------------- loading

@dataclasses.dataclass
class Loaded:
  """A model ready to evaluate: cfg, the linen module, params, tokenizer and a description."""
  cfg: Any
  model: Any
  params: Any
  tokenizer: Any
  desc: str


def load_model_dir(path: str) -> Loaded:
  """A converted / trained model dir (config.json + params/ [+ tokenizer/]) -> Loaded."""
  from trace_jax import model_dir
  path = os.path.abspath(os.path.expanduser(path))
  if not (os.path.isfile(os.path.join(path, 'config.json')) and os.path.isdir(os.path.join(path, 'params'))):
    raise FileNotFoundError(f'{path} is not a trace_jax model dir (config.json + params/); create one with '
                            '`trace-jax convert ...` or `python train.py` (<workdir>/model)')
  md = model_dir.load(path)
  return Loaded(md.config, md.model, jax.tree.map(jnp.asarray, md.params), md.tokenizer, md.desc)


def load_source(d, verbose: bool = True):
  """(builder, data source of d.split) of ``config.eval.dataset`` d; builds from manual_dir if needed."""
  from trace_jax.data import real
  mod = real.module(d.name)  # ValueError for an unknown builder name
  data_dir = os.path.expanduser(d.data_dir) if d.get('data_dir') else None
  cls = next(v for v in vars(mod).values() if isinstance(v, type) and getattr(v, 'name', None) == d.name)
  builder = cls(config=d.config, data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    manual = os.path.expanduser(d.manual_dir) if d.get('manual_dir') else ''
    if not (d.get('build', True) and manual and os.path.isdir(manual)):
      raise FileNotFoundError(
          f'dataset {d.name}/{d.config} is not prepared in {builder.data_dir} and cannot be built here '
          f'(manual_dir {manual or "(unset)"}: {"exists, but dataset.build is False" if manual and os.path.isdir(manual) else "does not exist"}); build it with `python -m {mod.__name__} --config '
          f'{d.config} --manual_dir <official files> --data_dir {data_dir or "~/tensorflow_datasets"}` '
          '(docs/datasets.md) or set --config.eval.dataset.manual_dir / data_dir')
    if verbose:
      print(f'building {d.name}/{d.config} from {manual} into {data_dir or "~/tensorflow_datasets"}')
    builder = real.prepare(d.name, manual, data_dir, d.config)
  splits = sorted(builder.info.splits.keys())
  if d.split not in splits:
    raise ValueError(f'{d.name}/{d.config} has no split {d.split!r}; it has {splits}')
  return builder, builder.as_data_source(split=d.split)


_s = preprocess.as_str


def _texts(xs) -> list[str]:
  return [_s(x) for x in xs]


def _image_id(ex):
  v = ex.get('image_id', '')
  return _s(v) if isinstance(v, (bytes, str)) else int(v)


def _masks(pngs) -> np.ndarray:
  """PNG bytes list -> bool [K, H, W]."""
  from trace_jax.data.real.masks import decode_png
  return np.stack([decode_png(p) > 0 for p in pngs]) if len(pngs) else np.zeros((0, 1, 1), bool)


def _label_map(png) -> np.ndarray:
  from trace_jax.data.real.masks import decode_png
  return decode_png(png).astype(np.int64)


def image_pixels(data: bytes, size: int, resize: str = 'squash') -> tuple[np.ndarray, tuple[int, int]]:
  """Stored image bytes -> (float32 [size, size, 3] pixels in [0, 1], original (H, W))."""
  from PIL import Image
  from trace_jax.data.real.readers import decode_image
  rgb = decode_image(data)
  im = preprocess.resize_image(Image.fromarray(rgb), int(size), resize)
  return np.asarray(im, np.float32) / 255.0, rgb.shape[:2]


def frame_transform(hw: tuple[int, int], size: int, resize: str) -> tuple[float, float, float, float]:
  """(sx, sy, left, top): original pixel (x, y) -> model frame (x sx - left, y sy - top), the same
  scales and offsets as preprocess.resize_image applies to the image ('squash': S/W, S/H; 'crop': shortest side then centre crop)."""
  h, w = hw
  if resize == 'squash':
    return size / w, size / h, 0.0, 0.0
  nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
  return nw / w, nh / h, float(int(round((nw - size) / 2.0))), float(int(round((nh - size) / 2.0)))


def tokenize(loaded: Loaded, texts: Sequence[str]) -> np.ndarray:
  ids = np.asarray(loaded.tokenizer(list(texts)), np.int32)
  ctx = loaded.cfg.text.context_length
  if ids.shape[1] > ctx:
    raise ValueError(f"the tokenizer made rows of {ids.shape[1]} tokens; the model's context is {ctx}")
  return ids


def pad_rows(x: np.ndarray) -> np.ndarray:
  """Pad axis 0 to a power of two (copies of row 0): one compilation per bucket. The rows are texts
  whose padded copies cost only a one-block backward each, so few buckets (fewer compilations)
  beat the tight ones MaskInversion uses for masks, whose copies cost full optimisations."""
  n = x.shape[0]
  k = 1 << max(0, n - 1).bit_length()
  return x if k == n else np.concatenate([x, np.repeat(x[:1], k - n, axis=0)])


def _limit(e, source) -> int:
  n = len(source)
  return n if e.get('num_examples') is None else min(int(e.num_examples), n)


def _progress(it, total, desc, verbose):
  if not verbose:
    return it
  from tqdm.auto import tqdm
  return tqdm(it, total=total, desc=desc, dynamic_ncols=True)
