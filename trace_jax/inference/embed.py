"""Image / text embeddings and CLIP logits of a model, in fixed-size jitted batches.

``embed(cfg, params, pixels, ids)`` -> ``image_embeds`` [N, E] and ``text_embeds`` [T, E]
(L2-normalised) and ``logits_per_image`` [N, T] (cosine similarity times ``exp(logit_scale)``), named
as transformers' ``CLIPModel`` outputs. Each tower is jitted once for a fixed batch size (the last
batch is padded), so the number of inputs does not cause recompilation. Inputs are validated first
(``check_pixels`` / ``check_token_ids``): a ValueError names the problem.
"""
from __future__ import annotations

import numpy as np


def check_pixels(x: np.ndarray, cfg) -> np.ndarray:
  """Validate a preprocessed NHWC batch; ValueError names the problem."""
  if x.ndim != 4:
    raise ValueError(f"pixels must be a float NHWC batch [N, H, W, 3]; got rank {x.ndim}, shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"pixels must be float (already normalised); got dtype {x.dtype}")
  n, h, w, c = x.shape
  if c != 3:
    raise ValueError(f"pixels must have 3 channels last (NHWC); got shape {x.shape}"
                     + (" (this looks like NCHW: transpose to NHWC)" if h == 3 else ""))
  p = cfg.vision.patch_size
  if h % p or w % p or h < p or w < p:
    raise ValueError(f"pixel size {h}x{w} is not a positive multiple of the patch size {p} "
                     f"(the model's size is {cfg.vision.image_size})")
  if n == 0:
    raise ValueError("pixels batch is empty")
  return x.astype(np.float32)


def check_token_ids(t: np.ndarray, cfg) -> np.ndarray:
  """Validate int token ids [batch, length <= context] in the vocabulary; ValueError names the problem."""
  if t.ndim != 2:
    raise ValueError(f"token ids must be [batch, length]; got shape {t.shape}")
  if not np.issubdtype(t.dtype, np.integer):
    raise ValueError(f"token ids must be integers; got dtype {t.dtype}")
  if t.shape[1] > cfg.text.context_length:
    raise ValueError(f"token ids of length {t.shape[1]} are longer than the context length "
                     f"{cfg.text.context_length}")
  if t.shape[0] == 0 or t.shape[1] == 0:
    raise ValueError(f"token ids are empty (shape {t.shape})")
  if t.min() < 0 or t.max() >= cfg.text.vocab_size:
    raise ValueError(f"token ids must lie in [0, {cfg.text.vocab_size}); got range [{t.min()}, {t.max()}]")
  return t.astype(np.int32)


def batched(fn, params, x: np.ndarray, batch_size: int, devices=None) -> np.ndarray:
  """Apply a jitted ``fn(params, batch)`` in fixed-size batches (last one padded) -> stacked rows.

  ``devices`` (None: one device; 'all' / n / list): each batch is split over a 1-D 'data' mesh of
  those devices (``NamedSharding``; the batch size rounded up to a multiple of their count), params
  replicated: one jitted program runs on all of them."""
  from trace_jax.placement import put, resolve_devices
  devs = resolve_devices(devices)
  n = x.shape[0]
  bs = min(batch_size, n)
  bs = -(-bs // len(devs)) * len(devs)
  params = put(params, devs, False) if len(devs) > 1 else params
  outs = []
  for i in range(0, n, bs):
    chunk = x[i:i + bs]
    k = chunk.shape[0]
    if k < bs:  # pad with copies of the last row: same shapes, no recompilation
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - k, 0)], 0)
    if len(devs) > 1:
      chunk = put(chunk, devs, True)
    outs.append(np.asarray(fn(params, chunk))[:k])
  return np.concatenate(outs, 0)


def embed(cfg, params, pixels: np.ndarray | None = None, ids: np.ndarray | None = None,
          batch_size: int = 32, devices=None) -> dict[str, np.ndarray]:
  """{'image_embeds', 'text_embeds', 'logits_per_image'} (those the inputs allow), float32.
  ``devices``: see :func:`batched` (None: one device)."""
  from trace_jax.models import build
  if batch_size < 1:
    raise ValueError(f"batch size must be positive; got {batch_size}")
  model = build(cfg)
  out = {}
  if pixels is not None:
    f = _tower(model, "encode_image")
    out["image_embeds"] = batched(f, params, check_pixels(pixels, cfg), batch_size, devices)
  if ids is not None:
    f = _tower(model, "encode_text")
    out["text_embeds"] = batched(f, params, check_token_ids(ids, cfg), batch_size, devices)
  if pixels is not None and ids is not None:
    scale = np.exp(np.float32(params["logit_scale"]))
    out["logits_per_image"] = (scale * (out["image_embeds"] @ out["text_embeds"].T)).astype(np.float32)
  return out


_TOWERS: dict = {}


def _tower(model, method: str):
  """One jitted tower per (model, method), so repeated calls (a dataset's shards) never recompile."""
  key = (model, method)
  if key not in _TOWERS:
    import jax
    from trace_jax.models import l2_normalize
    _TOWERS[key] = jax.jit(lambda p, x: l2_normalize(model.apply({"params": p}, x, method=method)[0]))
  return _TOWERS[key]
