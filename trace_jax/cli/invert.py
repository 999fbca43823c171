"""``trace-jax invert``: MaskInversion LETs for masks, top classes per mask, maps beside the masks.

    trace-jax invert --checkpoint DIR (--image PATH | --pixels X.npy) --masks M1.png [M2.png ...]
                     [--classes FILE] [--out-npz F] [--mode auto|exact|decomposed] [--lr 0.1]

Masks: image files (grey values / 255, no resize or threshold: their ``MaskInversionMaskPreprocess``)
or ``.npy`` arrays [H, W] / [K, H, W] in [0, 1]; any resolution. Each final map is written as an
8-bit PNG beside its mask (``<mask>_map.png``, ``<mask>_map{k}.png`` for a K-mask .npy).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from trace_jax.cli import common


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True, help="trace_jax model directory")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--image", help="image file (squashed to --image-size, as LePreprocess)")
  src.add_argument("--pixels", help=".npy float32 [H, W, 3] or [1, H, W, 3], already normalised")
  p.add_argument("--masks", nargs="+", help="mask files (.png/.jpg or .npy)")
  p.add_argument("--classes", help="text file, one class name per line: print the top classes per mask")
  p.add_argument("--templates", help="text file of prompt templates with one {} (default: CLIP's 7)")
  p.add_argument("--top", type=int, default=5, help="classes printed per mask")
  p.add_argument("--out-npz", help="write lets [K, E], maps, losses and mask names here")
  p.add_argument("--out", help="dataset mode: folder for the result shards and the index")
  p.add_argument("--no-map-png", action="store_true", help="do not write the map PNGs")
  p.add_argument("--image-size", type=int, default=None, help="input size (default: the model's; "
                 "the paper uses 448 on 224 models)")
  p.add_argument("--resize", choices=("squash", "crop"), default="squash")
  p.add_argument("--mode", choices=("auto", "exact", "decomposed"), default="auto")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--lr", type=float, default=0.1, help="their default 0.1; their examples use 0.5")
  p.add_argument("--alpha", type=float, default=0.0, help="weight of 1 - cos(LET, z0)")
  p.add_argument("--wd", type=float, default=0.0)
  p.add_argument("--layer-index", type=int, default=-1)
  p.add_argument("--no-correction", action="store_true",
                 help="SigLIP models: skip the authors' empty-prompt correction of LeGrad-SigLIP (by default "
                      "'a photo of a' is tokenized with the model dir's tokenizer)")
  from trace_jax.cli import datasets
  datasets.add_arguments(p, "invert", src)


def check_mask_array(m: np.ndarray, name: str) -> np.ndarray:
  """One mask file's array [H, W] / [K, H, W] -> [K, H, W] float32, or ValueError naming ``name``:
  an all-zero mask has no region to invert; values must be finite and in [0, 1] (``check_masks``)."""
  from trace_jax.inversion.maskinversion import check_masks
  m = m[None] if m.ndim == 2 else m
  empty = np.flatnonzero(m.reshape(m.shape[0], -1).sum(-1, dtype=np.float64) <= 0)  # no float64 copy
  if empty.size:
    which = "" if m.shape[0] == 1 else f" (masks {empty.tolist()} of {m.shape[0]})"
    raise ValueError(f"mask {name}{which} is empty (all zero): there is no region to invert")
  try:
    return check_masks(m)  # the library's own checks (finite, in [0, 1]), named by file here
  except ValueError as e:
    raise ValueError(f"mask {name}: {e}") from None


def load_masks(paths) -> tuple[list[np.ndarray], list[str]]:
  """-> per file [K, H, W] float32 and the PNG base names (one per mask); ValueError naming the file."""
  from trace_jax.data.specs import read_mask_file
  if not paths:
    raise ValueError("no mask files given (--masks M1.png [M2.npy ...])")
  arrays, names = [], []
  for path in paths:
    stem = os.path.splitext(path)[0]
    m = read_mask_file(path)
    # one name per mask: <mask>_map.png for an [H, W] mask, <mask>_map{k}.png for the K of [K, H, W]
    names += [f"{stem}_map.png"] if m.ndim == 2 else [f"{stem}_map{k}.png" for k in range(m.shape[0])]
    arrays.append(check_mask_array(m, path))
  return arrays, names


def _siglip_settings(m, args) -> dict:
  """SigLIP: the empty-prompt correction's token ids (the model dir's tokenizer), or correction off."""
  if getattr(m.cfg.vision, "kind", "vit") != "siglip":
    return {}
  if args.no_correction:
    return {"correction": False}
  from trace_jax import model_dir
  from trace_jax.attribution.legrad_siglip import EMPTY_PROMPT
  from trace_jax.tokenizers import load_tokenizer
  tok = m.tokenizer
  if tok is None:
    if model_dir.tokenizer_dir(m.path) is None:
      raise ValueError(f"MaskInversion on SigLIP applies the authors' empty-prompt correction: it needs the "
                       f"model dir's tokenizer ({m.path}/tokenizer/ is missing; convert with --tokenizer) "
                       f"to encode {EMPTY_PROMPT!r}, or pass --no-correction")
    tok = load_tokenizer(m.path)
  from trace_jax.attribution.legrad_siglip import empty_prompt_ids
  return {"empty_ids": empty_prompt_ids(tok, m.cfg.text.context_length)}


def run(args) -> int:
  import jax.numpy as jnp
  from trace_jax.models import l2_normalize
  from trace_jax.cli import datasets
  if datasets.is_dataset(args):
    return datasets.run_invert(args, check_mask_array, _siglip_settings)
  if not args.masks:
    raise ValueError("the following arguments are required: --masks (or a dataset: --dataset CSV, "
                     "--coco-json, --sam-dir, --tfds)")

  arrays, names = load_masks(args.masks)  # before the model: bad masks fail fast
  classes = common.read_lines(args.classes) if args.classes else None
  m = common.load(args.checkpoint, tokenizer_for="--classes" if classes else None)
  model, params = m.model, m.params
  if args.image:
    image = m.images([args.image], args.image_size, args.resize)[0]
  else:
    image = common.load_pixels(args.pixels)
    if image.shape[0] != 1:
      raise ValueError(f"--pixels must hold one image [H, W, 3] or [1, H, W, 3]; got {image.shape}")
    image = image[0]
  res = common.invert_by_size(model, params, image, arrays, mode=args.mode, layers=args.layer_index,
                              steps=args.steps, lr=args.lr, alpha=args.alpha, wd=args.wd,
                              **_siglip_settings(m, args))
  lets, maps = res["lets"], res["map"]
  losses = [c["losses"] for c in res["calls"]]
  for c in res["calls"]:
    print(f"mode {c['mode']}: loss {float(c['losses'][0]):.4f} -> {float(c['losses'][-1]):.4f}")

  if classes:
    from trace_jax.evaluation.zeroshot import SIMPLE_IMAGENET_TEMPLATES, class_text_embeddings
    templates = common.read_lines(args.templates) if args.templates else SIMPLE_IMAGENET_TEMPLATES
    cls = class_text_embeddings(model, params, m.tokenizer, classes, templates)
    sims = np.asarray(l2_normalize(jnp.asarray(lets)) @ cls.T)
    for k, name in enumerate(names):
      top = np.argsort(-sims[k])[:args.top]
      print(f"{name.replace('_map', '')}: " + ", ".join(f"{classes[c]} ({sims[k, c]:.3f})" for c in top))
  if not args.no_map_png:
    from PIL import Image
    for name, mp in zip(names, maps):
      Image.fromarray(np.clip(np.round(mp * 255), 0, 255).astype(np.uint8)).save(name)
  if args.out_npz:
    np.savez(args.out_npz, lets=lets, mask_names=np.array(names),
             losses=np.stack(losses) if len({l.shape for l in losses}) == 1 else np.concatenate(losses),
             **{f"map_{k}": mp for k, mp in enumerate(maps)})
  return 0
