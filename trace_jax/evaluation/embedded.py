"""Grounding of a trained CLIP-style model with attribution maps on the embedded set's test split.

For each phrase (a unique referring expression of one object) and each method of
``config.eval.methods`` (any of ``trace_jax.attribution.api.METHODS`` plus ``patch_similarity`` and,
for local-alignment models, ``local_slots``), with metrics of ``trace_jax.evaluation.metrics``:

* pointing game (AMC §4.2, the authors' code: bicubic upsampling, first argmax, strictly inside the box);
* box accuracy: the scene's object boxes ranked by the min-max normalised map (AMC box ranking, IoU >= 0.5
  with the phrase's box);
* precision / recall / mIoU of the [0, 1] map binarised at ``eval.threshold`` against the object's pixels;
* patch mIoU: the min-max normalised patch grid at the threshold against the patches the object covers
  at least half of.

Prints a table, writes ``eval.json`` and a gallery ``gallery_<method>.png`` of overlays in the output dir.
"""
from __future__ import annotations

import json
import os

import numpy as np

from trace_jax.evaluation import metrics as M

EXTRA_METHODS = ("patch_similarity", "local_slots")


def map_fn(method: str, model, params, config, heads: dict | None = None):
  """A jitted ``f(images, ids) -> (grid [B, gh, gw] raw, map [B, H, W] in [0, 1])``; ``params`` is the
  model dir's tree ({'clip': ..., <head>: ...}), ``heads`` its heads (``model_dir.Head``)."""
  import jax
  from trace_jax.losses import local_alignment as la
  from trace_jax.losses.amc import minmax_normalize  # AMC's min-max (+1e-7), trace_jax/ops.py
  from trace_jax.resize import upsample_bilinear
  if method in EXTRA_METHODS:
    if method == "local_slots":
      if "text_compression" not in params:
        raise ValueError("method 'local_slots' needs a local-alignment model (its model dir has no "
                         "text_compression head)")
      from trace_jax.models.text_compression import from_meta
      comp = from_meta(heads["text_compression"].meta)
      f = lambda im, ids: la.slot_similarity_grid(model, comp, params, im, ids)
    else:
      f = lambda im, ids: la.patch_similarity_grid(model, params["clip"], im, ids)

    def g(im, ids):
      grid = f(im, ids)
      return grid, upsample_bilinear(minmax_normalize(grid), im.shape[1:3])
    return jax.jit(g)
  from trace_jax.attribution.api import explain_fn
  settings = {"layer": config.eval.layer} if method == "gradcam" else {}
  ex = explain_fn(method, model, **settings)

  def h(im, ids):
    out = ex(params["clip"], im, ids)
    return out.get("raw", out["grid"]), out["map"]
  return h


def evaluate(config, md, out_dir: str, verbose: bool = True) -> dict:
  """Grounding of the model dir ``md`` (``trace_jax.model_dir.load``) on the embedded set's
  ``config.eval.split`` (module docstring); writes ``eval.json`` and the galleries to ``out_dir``."""
  from trace_jax.data import pipeline
  from trace_jax.data.sources import load_shapes_split
  from trace_jax.utils import overlay as ov
  cfg, model, params, desc = md.config, md.model, md.tree(), md.desc
  d, e = config.data, config.eval
  source = load_shapes_split(d, e.split, cfg.vision.image_size)
  tok = pipeline.make_tokenizer()
  methods = [m.strip() for m in str(e.methods).split(",") if m.strip()]
  fns = {m: map_fn(m, model, params, config, md.heads) for m in methods}
  p = cfg.vision.patch_size
  n_max = len(source) if e.num_examples is None else min(int(e.num_examples), len(source))
  acc = {m: {"grid": [], "map": []} for m in methods}
  gt = {"box": [], "mask": [], "patch": [], "dets": [], "size": [], "heldout": []}
  gallery = None
  seen = 0
  for b in pipeline.batches(source, batch_size=e.batch_size, num_epochs=1, shuffle=False, drop_remainder=False,
                            prefetch=0, tokenizer=tok, patch_size=p, phrase_source=d.phrase_source,
                            process_index=0, process_count=1):
    keep = np.flatnonzero(b["valid"])[: n_max - seen]
    if len(keep) == 0:
      break
    ids = b["phrase_ids"] if e.text == "phrase" else b["caption_ids"]
    outs = {m: fns[m](b["image"], ids) for m in methods}
    for m in methods:
      acc[m]["grid"].append(np.asarray(outs[m][0])[keep])
      acc[m]["map"].append(np.asarray(outs[m][1])[keep])
    s = b["image"].shape[1]
    boxes = b["phrase_box"][keep]                                   # [y0, x0, y1, x1] end-exclusive
    gt["box"] += [np.array([bx[1], bx[0], bx[3], bx[2]], np.float64) for bx in boxes]   # -> xyxy
    gt["mask"].append(b["phrase_mask"][keep] > 0.5)
    pm = b["phrase_mask"][keep].reshape(len(keep), s // p, p, s // p, p).mean((2, 4))
    gt["patch"].append(pm >= 0.5)
    gt["heldout"].append(b["phrase_heldout"][keep])
    for ex in pipeline._read(source, b["index"][keep]):
      ob = np.asarray(ex["objects"]["box"], np.float64).reshape(-1, 4)
      gt["dets"].append(np.stack([ob[:, 1], ob[:, 0], ob[:, 3] - ob[:, 1], ob[:, 2] - ob[:, 0]], 1))  # xywh
    gt["size"] += [(s, s)] * len(keep)
    if gallery is None:
      n = min(int(e.gallery), len(keep))
      gallery = {"images": ov.denormalize(b["image"][keep[:n]]),
                 "texts": [tok.decode(t) for t in ids[keep[:n]]],
                 "maps": {m: np.asarray(outs[m][1])[keep[:n]] for m in methods}}
    seen += len(keep)
    if seen >= n_max:
      break
  mask, patch = np.concatenate(gt["mask"]), np.concatenate(gt["patch"])
  heldout = np.concatenate(gt["heldout"])
  results = {"checkpoint": desc, "split": e.split, "num_phrases": seen, "threshold": e.threshold, "methods": {}}
  for m in methods:
    grid, mp = np.concatenate(acc[m]["grid"]), np.concatenate(acc[m]["map"])
    pg = M.pointing_game(list(grid), gt["box"], gt["size"], box_format="xyxy")
    lo, hi = grid.min((1, 2), keepdims=True), grid.max((1, 2), keepdims=True)
    gn = (grid - lo) / (hi - lo + 1e-7)
    gt_xywh = [np.array([x0, y0, x1 - x0, y1 - y0]) for x0, y0, x1, y1 in gt["box"]]
    # Box ranking on the min-max normalised grid: the AMC code's raw GradCAM is >= 0, but other
    # readouts (cosines) can be negative, and the ranking only counts scores > 0.
    br = M.box_ranking(list(gn), gt["dets"], gt_xywh, gt["size"])
    th = M.threshold_scores(mp, mask, e.threshold)
    pt = M.threshold_scores(gn, patch, e.threshold)
    r = {"pointing_game": pg["accuracy"], "box_accuracy": br["accuracy"],
         "precision": th["macro_precision"], "recall": th["macro_recall"], "miou": th["miou"],
         "patch_miou": pt["miou"]}
    if heldout.any():
      r["pointing_game_heldout"] = float(pg["hits"][heldout].mean())
    results["methods"][m] = r
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "eval.json"), "w") as f:
    json.dump(results, f, indent=2)
  if gallery is not None and gallery["texts"]:  # eval.gallery = 0: no gallery
    for m in methods:
      tiles = [ov.overlay(im, hm) for im, hm in zip(gallery["images"], gallery["maps"][m])]
      ov.save_png(ov.contact_sheet(tiles, gallery["texts"], cols=4, tile_size=128),
                  os.path.join(out_dir, f"gallery_{m}.png"))
  if verbose:
    print(format_table(results))
    print(f"wrote {os.path.join(out_dir, 'eval.json')}" + (" and gallery_<method>.png" if int(e.gallery) > 0 else ""))
  return results


def format_table(results: dict) -> str:
  cols = ["pointing_game", "box_accuracy", "precision", "recall", "miou", "patch_miou"]
  head = f"{'method':<18}" + "".join(f"{c:>15}" for c in cols)
  lines = [f"{results['checkpoint']} — {results['split']} split, {results['num_phrases']} phrases, "
           f"threshold {results['threshold']}", head, "-" * len(head)]
  for m, r in results["methods"].items():
    lines.append(f"{m:<18}" + "".join(f"{100 * r[c]:>14.1f}%" for c in cols))
  return "\n".join(lines)
