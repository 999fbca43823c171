"""The loaders every command shares: a model dir (+ its tokenizer) and the inputs given on the command line.

    m = load(args.checkpoint, tokenizer_for="--text" if args.text else None)
    ids = m.tokenize(["a photo of a cat"])                 # int32 [T, L], checked against the context
    x = m.images(["cat.jpg"], size=None, resize="crop")    # float32 [B, S, S, 3], normalised for the model
    px = load_npy("x.npy", "--pixels")                     # no pickles; ValueError naming the flag

Everything here raises ValueError / FileNotFoundError with a message naming the file or flag; the
dispatcher (``trace_jax.cli.main``) turns those into one ``trace-jax <command>: error: ...`` line.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass
class Loaded:
  """A model dir ready to run: config, float32 params, the linen module and the tokenizer (or None)."""
  path: str
  cfg: Any
  params: Any
  model: Any
  tokenizer: Any = None

  def tokenize(self, texts: Sequence[str], flag: str = "--text") -> np.ndarray:
    """int32 [T, L] token ids with the model dir's tokenizer; refuses rows longer than the context."""
    if self.tokenizer is None:
      raise ValueError(f"{flag} needs a tokenizer in the model dir ({self.path}/tokenizer/); "
                       f"convert with --bpe, or pass --token-ids")
    from trace_jax.tokenizers import text_warnings
    ctx = self.cfg.text.context_length
    for w in text_warnings(self.tokenizer, list(texts), ctx):
      warn(w)
    ids = np.asarray(self.tokenizer(list(texts), ctx), np.int32)
    if ids.ndim != 2 or ids.shape[1] > ctx:
      raise ValueError(f"the tokenizer made rows of shape {ids.shape[1:]}; the model's context is {ctx}")
    return ids

  def images(self, paths: Sequence[str], size: int | None = None, resize: str = "crop") -> np.ndarray:
    """Image files -> float32 [B, S, S, 3] (S: ``size`` or the model's), normalised as the model
    expects: CLIP's mean / std, or [-1, 1] for a SigLIP model (data/preprocess.py pixel_stats)."""
    return load_images(paths, size or self.cfg.vision.image_size, resize, getattr(self.cfg.vision, "kind", "vit"))


# An image whose shorter side is below this fraction of the model input is upscaled enough to blur
# what the model sees: said, not refused.
UPSCALE_WARN = 0.5


def warn(msg: str) -> None:
  """One line on stderr: input the command changed (and did not refuse)."""
  print(f"trace-jax: warning: {msg}", file=sys.stderr)


def load(checkpoint: str, *, tokenizer_for: str | None = None) -> Loaded:
  """The model dir at ``checkpoint``; with ``tokenizer_for`` (the flag that needs it, e.g. '--texts')
  also its tokenizer, whose absence is then an error naming that flag."""
  from trace_jax import model_dir
  md = model_dir.load(checkpoint, dtype=None)      # the stored compute dtype
  m = Loaded(checkpoint, md.config, md.params, md.model)
  if tokenizer_for:
    if md.tokenizer is None:
      raise ValueError(f"{tokenizer_for} needs a tokenizer in the model dir ({checkpoint}/tokenizer/ is "
                       "missing); convert with --bpe, or pass --token-ids")
    m.tokenizer = md.tokenizer
  return m


def load_images(paths: Sequence, size: int, resize: str = "crop", tower_kind: str = "vit") -> np.ndarray:
  """Image files (paths or file objects) -> float32 [B, size, size, 3] normalised for ``tower_kind``;
  ValueError naming an unreadable file."""
  from PIL import Image
  from trace_jax.data.preprocess import load_images as _load
  if not paths:
    raise ValueError("no image files given")
  for p in paths:
    try:
      with Image.open(p) as im:
        short = min(im.size)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read image {p}: {e}") from e
    if hasattr(p, "seek"):
      p.seek(0)                                   # read again below
    if short < UPSCALE_WARN * size:
      warn(f"image {p} is {im.size[0]}x{im.size[1]}, far smaller than the model input {size}x{size}: "
           f"upscaled {size / short:.1f}x")
  return _load(list(paths), size, resize, tower_kind)


def load_npy(path: str, what: str) -> np.ndarray:
  """An ``.npy`` array (never a pickle); ValueError naming ``what`` (the flag) and the file."""
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"cannot read {what} {path}: {e}") from e


def load_pixels(path: str, what: str = "--pixels") -> np.ndarray:
  """A preprocessed float NHWC batch ``[B, H, W, 3]`` (an ``[H, W, 3]`` image becomes ``[1, H, W, 3]``)."""
  x = load_npy(path, what)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
    raise ValueError(f"{what} {path} must hold float pixels [H, W, 3] or [B, H, W, 3]; got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{what} {path} must hold float pixels (already normalised); got dtype {x.dtype}")
  return x.astype(np.float32)


def load_token_ids(path: str, what: str = "--token-ids") -> np.ndarray:
  """Integer token ids ``[T, L]`` (a row ``[L]`` becomes ``[1, L]``)."""
  t = load_npy(path, what)
  if t.ndim == 1:
    t = t[None]
  if t.ndim != 2 or 0 in t.shape:
    raise ValueError(f"{what} {path} must hold token ids [L] or [T, L]; got shape {t.shape}")
  if not np.issubdtype(t.dtype, np.integer):
    raise ValueError(f"{what} {path}: token ids must be integers; got dtype {t.dtype}")
  return t.astype(np.int32)


def read_lines(path: str) -> list[str]:
  """Non-empty stripped lines of a text file (class names, templates)."""
  with open(path, encoding="utf-8") as f:
    return [ln.strip() for ln in f if ln.strip()]


def invert_by_size(model, params, image, arrays: Sequence[np.ndarray], **settings) -> dict:
  """MaskInversion of one image's masks given as several arrays [K_i, H_i, W_i] (files of any sizes):
  the masks of one size form one ``invert`` call (one image forward; chunked to its budget), and the
  results come back in the order of ``arrays``: {'lets' [M, E], 'map' (M arrays [H_i, W_i]),
  'dice0' [M], 'dice_final' [M], 'calls' (per call: 'mode', 'losses' [steps])}."""
  from trace_jax.inversion.maskinversion import invert
  starts = np.cumsum([0] + [a.shape[0] for a in arrays])
  by_size: dict = {}
  for i, a in enumerate(arrays):
    by_size.setdefault(a.shape[1:], []).append(i)
  m = int(starts[-1])
  lets, dice0, dice1, maps, calls = None, np.zeros(m, np.float32), np.zeros(m, np.float32), [None] * m, []
  for idx in by_size.values():
    out = invert(model, params, image, np.concatenate([arrays[i] for i in idx]), **settings)
    rows = [r for i in idx for r in range(starts[i], starts[i + 1])]
    got = np.asarray(out["lets"])
    if lets is None:
      lets = np.zeros((m, got.shape[-1]), np.float32)
    lets[rows], dice0[rows], dice1[rows] = got, np.asarray(out["dice0"]), np.asarray(out["dice_final"])
    for r, mp in zip(rows, np.asarray(out["map"])):
      maps[r] = mp
    calls.append({"mode": out["mode"], "losses": np.asarray(out["losses"])})
  return {"lets": lets, "map": maps, "dice0": dice0, "dice_final": dice1, "calls": calls}
