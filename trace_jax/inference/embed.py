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


def batched(fn, params, x: np.ndarray, batch_size: int) -> np.ndarray:
  """Apply a jitted ``fn(params, batch)`` in fixed-size batches (last one padded) -> stacked rows."""
  n = x.shape[0]
  bs = min(batch_size, n)
  outs = []
  for i in range(0, n, bs):
    chunk = x[i:i + bs]
    k = chunk.shape[0]
    if k < bs:  # pad with copies of the last row: same shapes, no recompilation
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - k, 0)], 0)
    outs.append(np.asarray(fn(params, chunk))[:k])
  return np.concatenate(outs, 0)


def embed(cfg, params, pixels: np.ndarray | None = None, ids: np.ndarray | None = None,
          batch_size: int = 32) -> dict[str, np.ndarray]:
  """{'image_embeds', 'text_embeds', 'logits_per_image'} (those the inputs allow), float32."""
  import jax
  from trace_jax.models import build, l2_normalize
  if batch_size < 1:
    raise ValueError(f"batch size must be positive; got {batch_size}")
  model = build(cfg)
  out = {}
  if pixels is not None:
    f = jax.jit(lambda p, x: l2_normalize(model.apply({"params": p}, x, method="encode_image")[0]))
    out["image_embeds"] = batched(f, params, check_pixels(pixels, cfg), batch_size)
  if ids is not None:
    f = jax.jit(lambda p, t: l2_normalize(model.apply({"params": p}, t, method="encode_text")[0]))
    out["text_embeds"] = batched(f, params, check_token_ids(ids, cfg), batch_size)
  if pixels is not None and ids is not None:
    scale = np.exp(np.float32(params["logit_scale"]))
    out["logits_per_image"] = (scale * (out["image_embeds"] @ out["text_embeds"].T)).astype(np.float32)
  return out
