"""``trace-jax embed``: image / text embeddings and logits of a model dir, written to an ``.npz``.

    trace-jax embed --checkpoint DIR (--images FILE... | --pixels X.npy) \
                    (--texts "..."... | --token-ids T.npy) --out OUT.npz [--batch-size 32]

``X.npy``: an already preprocessed float32 NHWC batch (sizes other than the model's are allowed if
they are multiples of the patch size: the position embedding is resampled with the config's
``pos_interp``). ``T.npy``: int [batch, length <= context] token ids with the checkpoint's own
end-of-text convention. ``OUT.npz`` keys, named as transformers' ``CLIPModel`` outputs:
``image_embeds`` [N, E] and ``text_embeds`` [T, E] (L2-normalised) and ``logits_per_image`` [N, T]
(cosine similarity times ``exp(logit_scale)``). Either side may be omitted (then no logits).

Each tower is jitted once for a fixed batch size (the last batch is padded), so the number of
inputs does not cause recompilation.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True, help="trace_jax model dir (from `trace-jax convert`)")
  img = parser.add_mutually_exclusive_group()
  img.add_argument("--images", nargs="+", default=None, help="image files (preprocessed as CLIP)")
  img.add_argument("--pixels", default=None, help="float32 NHWC .npy batch, already preprocessed")
  txt = parser.add_mutually_exclusive_group()
  txt.add_argument("--texts", nargs="+", default=None, help="texts (tokenized with the model dir's tokenizer)")
  txt.add_argument("--token-ids", default=None, help="int [batch, length] .npy token ids")
  parser.add_argument("--out", required=True, help="output .npz")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--resize", choices=("crop", "squash"), default="crop",
                      help="--images: shortest-side resize + centre crop (CLIP) or squash (LePreprocess)")
  parser.add_argument("--image-size", type=int, default=None, help="--images: size (default: the model's)")


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
    raise ValueError(f"--batch-size must be positive; got {batch_size}")
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


def _load_npy(path: str, what: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {what} {path}: {e}") from e


def _inputs(args, cfg):
  pixels = ids = None
  if args.pixels is not None:
    pixels = _load_npy(args.pixels, "--pixels")
  elif args.images:
    from trace_jax.data.preprocess import load_images
    pixels = load_images(args.images, args.image_size or cfg.vision.image_size, args.resize)
  if args.token_ids is not None:
    ids = _load_npy(args.token_ids, "--token-ids")
  elif args.texts:
    from trace_jax.tokenizers import load_tokenizer
    try:
      tok = load_tokenizer(args.checkpoint, context_length=cfg.text.context_length)
    except FileNotFoundError as e:
      raise ValueError(f"--texts needs a tokenizer in the model dir ({e}); convert with --bpe, "
                       f"or pass --token-ids") from None
    ids = np.asarray(tok(list(args.texts)))
  if pixels is None and ids is None:
    raise ValueError("nothing to embed: give --images/--pixels and/or --texts/--token-ids")
  return pixels, ids


def run(args: argparse.Namespace) -> int:
  from trace_jax.model_dir import load_model
  try:
    cfg, params = load_model(args.checkpoint)
    pixels, ids = _inputs(args, cfg)
    out = embed(cfg, params, pixels, ids, args.batch_size)
  except (ValueError, FileNotFoundError) as e:
    print(f"trace-jax embed: error: {e}", file=sys.stderr)
    return 2
  np.savez(args.out, **out)
  print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()))
  return 0
