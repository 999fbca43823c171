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

import os

import numpy as np

from trace_jax import atomic
from trace_jax.evaluation import metrics as M

EXTRA_METHODS = ("patch_similarity", "local_slots")


def map_fn(method: str, model, params, config, heads: dict | None = None, *, params_argument: bool = False):
  """A ``f(images, ids) -> (grid [B, gh, gw] raw, map [B, H, W] in [0, 1])`` running one jitted program;
  ``params`` is the model dir's tree ({'clip': ..., <head>: ...}), ``heads`` its heads
  (``model_dir.Head``). ``params_argument``: the params of ``patch_similarity`` / ``local_slots`` are an
  argument of the program instead of constants closed over (global arrays sharded over several
  processes' devices cannot be constants: ``evaluate(mesh=...)``; the constants, as before, keep the
  one-device numbers bit-identical: XLA folds them, which moves ``local_slots`` by ~1e-7)."""
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
      f = lambda p, im, ids: la.slot_similarity_grid(model, comp, p, im, ids)
    else:
      f = lambda p, im, ids: la.patch_similarity_grid(model, p["clip"], im, ids)

    def g(p, im, ids):
      grid = f(p, im, ids)
      return grid, upsample_bilinear(minmax_normalize(grid), im.shape[1:3])
    if not params_argument:
      return jax.jit(lambda im, ids: g(params, im, ids))
    g = jax.jit(g)
    return lambda im, ids: g(params, im, ids)
  from trace_jax.attribution.api import explain_fn
  settings = {"layer": config.eval.layer} if method == "gradcam" else {}
  ex = explain_fn(method, model, **settings)

  def h(im, ids):
    out = ex(params["clip"], im, ids)
    return out.get("raw", out["grid"]), out["map"]
  return h


class _Batches:
  """The eval batches and the maps of every method, as full-batch host arrays.

  One process (``mesh=None``): the batch's numpy arrays go to the jitted maps as they are (one
  device). A mesh: every process reads its rows of each global batch (``pipeline.batches``'
  ``process_index`` / ``process_count``, the train loop's rule), the images and ids become global
  arrays split over ``batch_axes`` (``jax.make_array_from_process_local_data``), the maps run once on
  the whole mesh and are gathered (``process_allgather``) with the rows' ground truth, so that every
  process holds the full batch. The ground truth takes the same way as the images (placed, then
  gathered), so its rows are in the order of the gathered maps whatever the mesh's device order."""

  GT = ("valid", "index", "phrase_box", "phrase_mask", "phrase_heldout", "phrase_ids", "caption_ids")

  def __init__(self, mesh, batch_axes):
    self.mesh = mesh
    if mesh is None:
      self.sharding = None
      return
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    axes = tuple(mesh.axis_names if batch_axes is None else batch_axes)
    self.sharding = NamedSharding(mesh, PartitionSpec(axes))
    self.split = int(np.prod([mesh.shape[a] for a in axes]))
    self.pi, self.pc = jax.process_index(), jax.process_count()

  def batch_size(self, b: int) -> int:
    """``eval.batch_size`` rounded up to a multiple of the batch's devices and of the processes
    (the padding rows are dropped like those of the last partial batch)."""
    if self.mesh is None:
      return int(b)
    import math
    q = math.lcm(self.split, self.pc)
    return -(-int(b) // q) * q

  def rows(self):
    return (0, 1) if self.mesh is None else (self.pi, self.pc)

  def gather(self, tree):
    """Global arrays (or one process' arrays) -> full numpy arrays on every process."""
    import jax
    if self.mesh is None:
      return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)

  def place(self, x):
    if self.mesh is None:
      return x
    import jax
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(self.sharding, x, (x.shape[0] * self.pc,) + x.shape[1:])

  def params(self, tree):
    """The model's params on the mesh: arrays already placed (the train state's shardings) stay as
    they are; host arrays (a model dir read from disk) are replicated."""
    if self.mesh is None:
      return tree
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    rep = NamedSharding(self.mesh, PartitionSpec())

    def put(a):
      if isinstance(a, jax.Array):
        return a
      a = np.asarray(a)
      return jax.make_array_from_callback(a.shape, rep, lambda idx: a[idx])
    return jax.tree.map(put, tree)


def evaluate(config, md, out_dir: str, verbose: bool = True, *, mesh=None, batch_axes=None) -> dict:
  """Grounding of the model dir ``md`` (``trace_jax.model_dir.load``) on the embedded set's
  ``config.eval.split`` (module docstring); writes ``eval.json`` and the galleries to ``out_dir``.

  ``mesh``: None evaluates in this process on one device. A ``jax.sharding.Mesh`` (which may span
  every process of a ``jax.distributed`` run; all of them must call this) evaluates on the whole
  mesh: each batch split over ``batch_axes`` (default: every mesh axis; train.py passes the train
  loop's ('data', 'fsdp')), ``eval.batch_size`` rounded up to a multiple of that split and of the
  process count, the params used where they are (a train state's shardings) or replicated when on
  the host, the maps gathered to every process; every process returns the full set's metrics and
  process 0 alone writes the files (each written to a temporary name, then renamed)."""
  import jax
  from trace_jax.data import pipeline
  from trace_jax.data.sources import load_shapes_split
  from trace_jax.utils import overlay as ov
  run = _Batches(mesh, batch_axes)
  cfg, model, params, desc = md.config, md.model, run.params(md.tree()), md.desc
  d, e = config.data, config.eval
  source = load_shapes_split(d, e.split, cfg.vision.image_size)
  tok = pipeline.make_tokenizer()
  methods = [m.strip() for m in str(e.methods).split(",") if m.strip()]
  fns = {m: map_fn(m, model, params, config, md.heads, params_argument=mesh is not None) for m in methods}
  p = cfg.vision.patch_size
  n_max = len(source) if e.num_examples is None else min(int(e.num_examples), len(source))
  acc = {m: {"grid": [], "map": []} for m in methods}
  gt = {"box": [], "mask": [], "patch": [], "dets": [], "size": [], "heldout": []}
  gallery = None
  seen = 0
  pi, pc = run.rows()
  text_key = "phrase_ids" if e.text == "phrase" else "caption_ids"
  for local in pipeline.batches(source, batch_size=run.batch_size(e.batch_size), num_epochs=1, shuffle=False,
                                drop_remainder=False, prefetch=0, tokenizer=tok, patch_size=p,
                                phrase_source=d.phrase_source, process_index=pi, process_count=pc):
    placed = {k: run.place(local[k]) for k in _Batches.GT + ("image",)}
    b = run.gather({k: placed[k] for k in _Batches.GT})   # every process: the whole batch, in row order
    keep = np.flatnonzero(b["valid"])[: n_max - seen]     # padding rows (valid False) dropped
    if len(keep) == 0:
      break
    ids = b[text_key]
    outs = {m: run.gather(fns[m](placed["image"], placed[text_key])) for m in methods}
    for m in methods:
      acc[m]["grid"].append(np.asarray(outs[m][0])[keep])
      acc[m]["map"].append(np.asarray(outs[m][1])[keep])
    s = local["image"].shape[1]
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
      gallery = {"images": ov.denormalize(run.gather(placed["image"])[keep[:n]]),
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
  if jax.process_index() != 0:     # a mesh spanning several processes: process 0 writes
    return results
  os.makedirs(out_dir, exist_ok=True)

  atomic.write_json(os.path.join(out_dir, "eval.json"), results, indent=2)
  if gallery is not None and gallery["texts"]:  # eval.gallery = 0: no gallery
    for m in methods:
      tiles = [ov.overlay(im, hm) for im, hm in zip(gallery["images"], gallery["maps"][m])]
      sheet = ov.contact_sheet(tiles, gallery["texts"], cols=4, tile_size=128)
      atomic.write_with(os.path.join(out_dir, f"gallery_{m}.png"), lambda path, sheet=sheet: ov.save_png(sheet, path))
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
