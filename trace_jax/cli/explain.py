"""``trace-jax explain``: attribution heatmaps of a model directory.

Single image (one or several prompts on it -> one image forward for the methods that allow it):

    trace-jax explain --checkpoint DIR --image cat.jpg --text "a cat" [--text "a dog"] \\
        --method legrad --out heat.png [--out-npz maps.npz]
    trace-jax explain --checkpoint DIR --pixels x.npy --token-ids t.npy --method gradcam --out heat.png

Batch: ``--csv FILE`` (rows ``image,text``; a header row ``image,text`` is optional) or
``--folder DIR`` with ``--text`` (every image x every text) writes one overlay per pair into
``--out-dir`` plus ``contact_sheet.png`` and ``maps.npz``.

Dataset: ``--dataset CSV|FOLDER``, ``--coco-json F --images DIR``, ``--sam-dir D --images DIR`` or
``--tfds NAME:SPLIT`` with ``--out DIR``: sharded, resumable, every device (trace_jax/cli/datasets.py).

The npz holds ``grid`` [P, gh, gw], ``map`` [P, H, W] (both in [0, 1]), ``score`` [P], the raw grid
when the method has one, ``text`` [P, L] token attributions when the method has them (M2IB; rollout /
Chefer with ``--set text=true``), ``texts``, ``images`` and ``method``.
Method settings: ``--set KEY=VALUE`` (VALUE parsed as JSON when it parses: ``--set layer=-2``,
``--set relu_grad=false``, ``--set layers=[8,9,10,11]``).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from trace_jax.cli import common
from trace_jax.tokenizers import text_scores, token_strings

def add_arguments(parser: argparse.ArgumentParser) -> None:
  from trace_jax.attribution.api import METHODS
  parser.add_argument("--checkpoint", required=True, help="trace_jax model directory (trace-jax convert)")
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--image", help="image file (resized to the model's input size; the overlay is drawn "
                   "on the file at its own resolution)")
  src.add_argument("--pixels", help=".npy of normalised pixels [H, W, 3] or [B, H, W, 3] (used as given)")
  src.add_argument("--csv", help="batch mode: CSV with image,text rows (image paths relative to the CSV)")
  src.add_argument("--folder", help="batch mode: a folder of images, each paired with every --text")
  parser.add_argument("--text", action="append", default=None, help="prompt (repeat for several)")
  parser.add_argument("--token-ids", help=".npy of int token ids [L] or [T, L] instead of --text")
  parser.add_argument("--method", default="legrad", choices=METHODS)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="method setting (repeatable), e.g. layer=-2, relu_grad=false, num_masks=1024")
  parser.add_argument("--out", help="PNG overlay (single mode; in batch mode: the contact sheet path; "
                      "in dataset mode: the folder for the result shards and the index)")
  parser.add_argument("--out-npz", help="npz with the raw maps and scores")
  parser.add_argument("--out-dir", help="batch mode: folder for the per-pair overlays (default: beside --out)")
  parser.add_argument("--image-size", type=int, default=None, help="input size (default: the model's)")
  parser.add_argument("--resize", default="squash", choices=("crop", "squash"),
                      help="squash = Resize((s, s)) as LeGrad / MaskInversion (default); crop = CLIP's")
  parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in the overlay")
  parser.add_argument("--batch-size", type=int, default=8, help="batch mode: pairs per forward")
  from trace_jax.cli import datasets
  datasets.add_arguments(parser, "explain", src)


def parse_settings(items) -> dict:
  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    k, v = item.split("=", 1)
    k = k.strip().replace("-", "_")
    try:
      val = json.loads(v)
    except json.JSONDecodeError:
      val = v
    out[k] = tuple(val) if isinstance(val, list) else val
  return out


class Runner:
  """The model dir (``common.load``) plus the method and its settings: ``run(images, ids) -> numpy dict``."""

  def __init__(self, args):
    from trace_jax.cli.datasets import is_dataset
    wants_text = args.text or args.csv or is_dataset(args)
    self.m = common.load(args.checkpoint, tokenizer_for="--text" if wants_text else None)
    self.cfg, self.params, self.model, self.tok = self.m.cfg, self.m.params, self.m.model, self.m.tokenizer
    self.method = args.method
    self.settings = parse_settings(args.set)
    if self.method == "m2ib":  # M2IB's official map is 224 px; here: the input image size
      self.settings.setdefault("out_size", None)
    if (self.method == "legrad" and self.cfg.vision.kind == "siglip" and self.tok is not None
        and not {"empty_ids", "empty_query", "correction"} & set(self.settings)):
      # the authors' SigLIP LeGrad corrects with the map of 'a photo of a' (attribution/legrad_siglip.py)
      from trace_jax.attribution.legrad_siglip import empty_prompt_ids
      self.settings["empty_ids"] = empty_prompt_ids(self.tok, self.cfg.text.context_length)
    self.size = args.image_size or self.cfg.vision.image_size
    self.resize = args.resize

  def load_images(self, paths):
    return self.m.images(paths, self.size, self.resize)

  def tokenize(self, texts):
    return self.m.tokenize(texts, "--text")

  def run(self, images, ids) -> dict:
    from trace_jax.attribution.api import explain
    out = explain(self.method, self.model, self.params, images, ids, **self.settings)
    return {k: np.asarray(v) for k, v in out.items()}


def read_rgb(path: str) -> np.ndarray:
  """An image file as it is: uint8 RGB [H, W, 3] at its own resolution (the overlays are drawn on it)."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from e


def _overlays(runner, images, ids, texts, out, alpha, originals=None):
  """One RGB picture per pair: overlay (+ coloured tokens when the method gives text attributions).

  ``originals``: the image files' own pixels (one per row of ``images``): each map is resampled onto
  its original image (``overlay.map_to_image``, as grad-cam's show_cam_on_image), so the overlay has
  the file's resolution and aspect; without them (``--pixels``) the input pixels are drawn on.
  """
  from trace_jax.utils import overlay as ov
  P = out["map"].shape[0]
  rgb = list(originals) if originals is not None else list(ov.denormalize(images))
  pics = []
  for p in range(P):
    img = rgb[0] if len(rgb) == 1 else rgb[p]
    heat = out["map"][p]
    if originals is not None:
      heat = ov.map_to_image(heat, img.shape[:2], runner.resize)
    pic = ov.overlay(img, heat, alpha=alpha)
    if "text" in out and out["text"].ndim == 2:
      row = ids[0] if ids.shape[0] == 1 else ids[p]
      toks = token_strings(runner.tok, texts[p] if texts else None, row)
      if toks:
        strip = ov.text_tokens_image(toks, text_scores(out["text"][p], row, runner.tok),
                                     width=max(img.shape[1], 240))
        pic = ov.stack_vertical([pic, strip])
    pics.append(pic)
  return pics


def _save_npz(path, out, texts, image_names, method):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {k: v for k, v in out.items() if isinstance(v, np.ndarray) and k != "pixels"}
  arrays["texts"] = np.asarray(texts if texts else [], dtype=str)
  arrays["images"] = np.asarray(image_names, dtype=str)
  arrays["method"] = np.asarray(method)
  np.savez(path, **arrays)
  return path


def _single(args, runner) -> int:
  from trace_jax.utils import overlay as ov
  if args.image:
    images = runner.load_images([args.image])
    names = [args.image]
    originals = [read_rgb(args.image)]
  else:
    originals = None
    images = common.load_pixels(args.pixels)
    names = [args.pixels] * images.shape[0]
  if args.token_ids:
    ids = common.load_token_ids(args.token_ids)
    texts = None
  else:
    texts = args.text
    ids = runner.tokenize(texts)
  out = runner.run(images, ids)
  P = out["map"].shape[0]
  labels = [f"{t} ({s:.3f})" for t, s in zip(texts or [f"text {i}" for i in range(P)], out["score"])]
  pics = _overlays(runner, images, ids, texts, out, args.alpha, originals)
  if args.out:
    pic = pics[0] if P == 1 else ov.contact_sheet(pics, labels, cols=min(P, 4))
    ov.save_png(pic, args.out)
    print(f"wrote {args.out}")
  if args.out_npz:
    _save_npz(args.out_npz, out, texts, names, args.method)
    print(f"wrote {args.out_npz}")
  for lab in labels:
    print(f"{args.method}: {lab}")
  return 0


def _batch(args, runner) -> int:
  from trace_jax.utils import overlay as ov
  if args.token_ids:
    raise ValueError("batch mode takes prompts from the CSV / --text, not --token-ids")
  from trace_jax.data.specs import list_images, read_csv
  if args.csv:
    pairs = read_csv(args.csv, 2)
    chunks = [pairs[i:i + args.batch_size] for i in range(0, len(pairs), args.batch_size)]
  else:
    if not args.text:
      raise ValueError("--folder needs at least one --text")
    # one image with all its prompts per call: one image forward for many prompts
    chunks = [[(f, t) for t in args.text] for f in list_images(args.folder)]
  out_dir = args.out_dir or (os.path.splitext(args.out)[0] + "_pairs" if args.out else None)
  if out_dir is None:
    raise ValueError("batch mode needs --out-dir (or --out for the contact sheet)")
  os.makedirs(out_dir, exist_ok=True)
  results, pics, labels, names, texts_all = [], [], [], [], []
  for chunk in chunks:
    paths = [p for p, _ in chunk]
    texts = [t for _, t in chunk]
    same = len(set(paths)) == 1
    images = runner.load_images(paths[:1] if same else paths)
    ids = runner.tokenize(texts)
    out = runner.run(images, ids)
    results.append(out)
    originals = [read_rgb(p) for p in (paths[:1] if same else paths)]
    for k, pic in enumerate(_overlays(runner, images, ids, texts, out, args.alpha, originals)):
      i = len(pics)
      stem = os.path.splitext(os.path.basename(paths[k]))[0]
      ov.save_png(pic, os.path.join(out_dir, f"{i:04d}_{stem}.png"))
      pics.append(pic)
      labels.append(f"{texts[k]} ({float(out['score'][k]):.2f})")
    names += paths
    texts_all += texts
  keys = set.intersection(*(set(r) for r in results))
  merged = {}
  for k in keys:
    vals = [r[k] for r in results]
    if all(isinstance(v, np.ndarray) and v.ndim >= 1 for v in vals) and \
        len({v.shape[1:] for v in vals}) == 1 and k != "pixels":
      merged[k] = np.concatenate(vals)
  sheet = args.out or os.path.join(out_dir, "contact_sheet.png")
  ov.save_png(ov.contact_sheet(pics, labels, cols=4, tile_size=160), sheet)
  npz = args.out_npz or os.path.join(out_dir, "maps.npz")
  _save_npz(npz, merged, texts_all, names, args.method)
  print(f"wrote {len(pics)} overlays to {out_dir}, {sheet}, {npz}")
  return 0


def run(args) -> int:
  if (args.image or args.pixels) and not (args.text or args.token_ids):
    raise ValueError("give --text or --token-ids")
  if args.text and args.token_ids:
    raise ValueError("give --text or --token-ids, not both")
  if (args.image or args.pixels) and not (args.out or args.out_npz):
    raise ValueError("give --out PNG and/or --out-npz FILE")
  from trace_jax.cli import datasets
  if datasets.is_dataset(args):
    return datasets.run_explain(args, Runner(args))
  runner = Runner(args)
  return _batch(args, runner) if (args.csv or args.folder) else _single(args, runner)
