"""``trace-jax embed``: image / text embeddings and logits of a model dir, written to an ``.npz``.

    trace-jax embed --checkpoint DIR (--images FILE... | --pixels X.npy) \
                    (--texts "..."... | --token-ids T.npy) --out OUT.npz [--batch-size 32]

``X.npy``: an already preprocessed float32 NHWC batch (sizes other than the model's are allowed if
they are multiples of the patch size: the position embedding is resampled with the config's
``pos_interp``). ``T.npy``: int [batch, length <= context] token ids with the checkpoint's own
end-of-text convention. ``OUT.npz`` keys, named as transformers' ``CLIPModel`` outputs:
``image_embeds`` [N, E] and ``text_embeds`` [T, E] (L2-normalised) and ``logits_per_image`` [N, T]
(cosine similarity times ``exp(logit_scale)``). Either side may be omitted (then no logits).

The computation is ``trace_jax.inference.embed.embed`` (each tower jitted once for a fixed batch
size, the last batch padded, so the number of inputs does not cause recompilation); this module only
reads the command line.
"""
from __future__ import annotations

import argparse

import numpy as np

from trace_jax.cli import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True, help="trace_jax model dir (from `trace-jax convert`)")
  parser.add_argument("--images", nargs="+", default=None, help="image files (preprocessed as CLIP); "
                      "with --coco-json / --sam-dir: their image folder")
  img = parser.add_mutually_exclusive_group()
  img.add_argument("--pixels", default=None, help="float32 NHWC .npy batch, already preprocessed")
  txt = parser.add_mutually_exclusive_group()
  txt.add_argument("--texts", nargs="+", default=None, help="texts (tokenized with the model dir's tokenizer)")
  txt.add_argument("--token-ids", default=None, help="int [batch, length] .npy token ids")
  parser.add_argument("--out", help="output .npz (dataset mode: the folder for the shards and the index)")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--resize", choices=("crop", "squash"), default="crop",
                      help="--images: shortest-side resize + centre crop (CLIP) or squash (LePreprocess)")
  parser.add_argument("--image-size", type=int, default=None, help="--images: size (default: the model's)")
  from trace_jax.cli import datasets
  datasets.add_arguments(parser, "embed", img)


def _inputs(args, m):
  pixels = ids = None
  if args.pixels is not None:
    pixels = common.load_npy(args.pixels, "--pixels")  # validated (rank, layout, size) by embed()
  elif args.images:
    pixels = m.images(args.images, args.image_size, args.resize)
  if args.token_ids is not None:
    ids = common.load_npy(args.token_ids, "--token-ids")
  elif args.texts:
    ids = m.tokenize(args.texts, "--texts")
  if pixels is None and ids is None:
    raise ValueError("nothing to embed: give --images/--pixels and/or --texts/--token-ids")
  return pixels, ids


def run(args: argparse.Namespace) -> int:
  from trace_jax.inference.embed import embed
  from trace_jax.cli import datasets
  if datasets.is_dataset(args):
    if args.images and not (args.coco_json or args.sam_dir):
      raise ValueError("--images (files) cannot be combined with --dataset / --tfds")
    if args.texts or args.token_ids:
      raise ValueError("dataset mode embeds images only: drop --texts / --token-ids")
    return datasets.run_embed(args)
  if args.images and args.pixels:
    raise ValueError("give --images or --pixels, not both")
  if not args.out:
    raise ValueError("give --out OUT.npz")
  m = common.load(args.checkpoint, tokenizer_for="--texts" if args.texts else None)
  pixels, ids = _inputs(args, m)
  out = embed(m.cfg, m.params, pixels, ids, args.batch_size)
  np.savez(args.out, **out)
  print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()))
  return 0
