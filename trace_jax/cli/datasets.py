"""Dataset mode of ``trace-jax invert | explain | embed``: a whole dataset, streamed to shards.

    trace-jax invert  --checkpoint M --coco-json instances.json --images DIR --out OUT [--memory-gb 24]
    trace-jax invert  --checkpoint M --sam-dir SAM_JSONS --images DIR --out OUT
    trace-jax invert  --checkpoint M --tfds voc2012:val [--tfds-data-dir D] --out OUT
    trace-jax invert  --checkpoint M --dataset masks.csv --out OUT
    trace-jax explain --checkpoint M --dataset pairs.csv --out OUT [--max-prompts 64]
    trace-jax explain --checkpoint M --dataset images/ --text "a cat" --text "a dog" --out OUT
    trace-jax embed   --checkpoint M --dataset images/ --out OUT

SPEC (one of): ``--dataset`` a CSV (``image,mask`` rows for invert, ``image,text`` for explain,
``image`` for embed) or, for explain / embed, a folder of images; ``--coco-json F --images DIR``
(instance masks as polygons or RLE; prompts: the category names); ``--sam-dir D --images DIR``
(segment-anything amg.py RLE JSONs); ``--tfds NAME:SPLIT`` (a built tfds dataset). The readers are
trace_jax/data/specs/ (docs/inference.md). ``--text`` gives every image these prompts instead of
the spec's.

Results go to ``OUT/{lets,maps,embeds}-NNNNN.npz`` shards, written as they are produced
(atomically) with a per-process index (trace_jax/inference/dataset.py); a rerun of the same command
skips the finished shards. An unreadable image or an empty / bad mask is skipped and listed in its
shard's ``failed_ids`` / ``failed_reasons`` and the index, never a crash of the run; a method that
cannot run on the model's image tower (e.g. MaskInversion or LeGrad on a CRATE tower) is refused
before anything is read or written, with an error naming the tower. ``--process-index`` /
``--process-count`` (default: jax's, i.e. ``jax.distributed``) pick this process's shards. Every
call runs on all local devices (``--devices``) with ``NamedSharding``.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from trace_jax.cli import common

SPEC_FLAGS = ("dataset", "coco_json", "sam_dir", "tfds")
# kind -> (shard prefix, progress unit, results of a shard)
KINDS = {"invert": ("lets", "masks", lambda a: a["lets"].shape[0]),
         "explain": ("maps", "maps", lambda a: a["texts"].shape[0]),
         "embed": ("embeds", "images", lambda a: a["image_embeds"].shape[0])}


def add_arguments(p: argparse.ArgumentParser, kind: str, src) -> None:
  """The dataset-mode flags; the SPEC flags go into ``src``, the command's exclusive input group."""
  what = {"invert": "CSV of image,mask rows", "explain": "CSV of image,text rows or a folder of images",
          "embed": "CSV of image paths or a folder of images"}[kind]
  src.add_argument("--dataset", help=f"dataset mode: a {what} (trace_jax/cli/datasets.py)")
  src.add_argument("--coco-json", help="dataset mode: COCO-format instances JSON (with --images DIR)")
  src.add_argument("--sam-dir", help="dataset mode: folder of segment-anything amg.py RLE JSONs (with --images DIR)")
  src.add_argument("--tfds", metavar="NAME:SPLIT", help="dataset mode: a built tfds dataset, e.g. voc2012:val")
  g = p.add_argument_group("dataset mode (--dataset, --coco-json, --sam-dir, --tfds)")
  if kind != "embed":  # embed has its own --images (files; here one folder)
    g.add_argument("--images", help="the image folder of --coco-json / --sam-dir")
  g.add_argument("--tfds-data-dir", default=None, help="tfds data_dir of --tfds (default tfds')")
  g.add_argument("--shard-size", type=int, default={"invert": 1, "explain": 4, "embed": 64}[kind],
                 help="images per shard file (the unit of resumption)")
  g.add_argument("--devices", default="all", help="'all' local devices (default) or a count")
  g.add_argument("--process-index", type=int, default=None, help="this process (default: jax's)")
  g.add_argument("--process-count", type=int, default=None, help="number of processes (default: jax's)")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")
  if kind == "invert":
    g.add_argument("--memory-gb", type=float, default=None,
                   help="memory budget per device for one call (default: half the free memory)")
    g.add_argument("--save-maps", action="store_true", help="also store each mask's final map")
  if kind == "explain":
    g.add_argument("--max-prompts", type=int, default=64, help="prompts of one image per call")


def is_dataset(args) -> bool:
  return any(getattr(args, f, None) for f in SPEC_FLAGS)


def devices_of(args):
  d = args.devices
  if d == "all":
    return "all"
  try:
    return int(d)
  except ValueError:
    raise ValueError(f"--devices must be 'all' or a count; got {d!r}") from None


def placed(args, params):
  """(this process' devices of ``--devices``, ``params`` replicated on them): placed ONCE per run, so
  the per-image calls (``invert`` / ``explain_prompts`` / ``embed``, whose own placement of an
  already placed tree is a no-op) copy no weights to the devices again."""
  from trace_jax.placement import put, resolve_devices
  devs = resolve_devices(devices_of(args))
  return devs, put(params, devs, False)


def _images_dir(args) -> str:
  d = args.images
  if isinstance(d, list):  # embed's --images takes files; here it names one folder
    d = d[0] if len(d) == 1 else None
  if not d:
    flag = "--coco-json" if args.coco_json else "--sam-dir"
    raise ValueError(f"{flag} needs --images DIR (one folder holding the images)")
  return d


def items_of(args, kind: str) -> list:
  """The SPEC's items (trace_jax/data/specs/), the same list on every process."""
  from trace_jax.data import specs
  texts = tuple(getattr(args, "text", None) or ())
  if args.dataset:
    if os.path.isdir(args.dataset):
      if kind == "invert":
        raise ValueError("--dataset FOLDER has no masks: invert takes a CSV of image,mask rows, "
                         "--coco-json, --sam-dir or --tfds")
      if kind == "explain" and not texts:
        raise ValueError("--dataset FOLDER needs at least one --text")
      return specs.from_folder(args.dataset, texts)
    return specs.from_csv(args.dataset, {"invert": "mask", "explain": "text", "embed": None}[kind])
  if args.coco_json:
    return specs.from_coco(args.coco_json, _images_dir(args))
  if args.sam_dir:
    if kind == "explain" and not texts:
      raise ValueError("--sam-dir holds masks, no prompts: give at least one --text")
    return specs.from_sam(args.sam_dir, _images_dir(args))
  return specs.from_tfds(args.tfds, args.tfds_data_dir)


def _out_dir(args) -> str:
  if not args.out:
    raise ValueError("dataset mode needs --out DIR (the folder for the shards and the index)")
  return args.out


def _load_image(m, item, size, resize):
  """One image [S, S, 3] of ``item``, or the reason it cannot be read."""
  try:
    return m.images([item.image_file()], size, resize)[0], None   # a path or a file object
  except (ValueError, OSError, KeyError) as e:
    return None, str(e).splitlines()[0]


def _run_dataset(args, kind: str, items, compute) -> int:
  """``compute`` over this process's shards of ``items`` into ``--out``; prints the summary."""
  from trace_jax.inference.dataset import run_shards
  prefix, unit, count = KINDS[kind]
  out = _out_dir(args)
  s = run_shards(items, compute, out, shard_size=args.shard_size, prefix=prefix,
                 item_id=lambda it: it.id, process_index=args.process_index,
                 process_count=args.process_count, progress=not args.no_progress, count=count, unit=unit)
  print(f"{kind}: {s['written']} shard(s) written, {s['done_before']} already done, "
        f"{s['items']} images ({s['units']} {unit}) in {s['seconds']:.1f} s, {s['failed_total']} "
        f"skipped (listed in {s['index']}); shards in {out}")
  return 0


def run_invert(args, check_mask, settings_of=lambda m, args: {}) -> int:
  """``check_mask(array, name) -> [K, H, W]`` and ``settings_of(m, args) -> dict`` (invert's extra
  keywords, e.g. SigLIP's empty-prompt correction): trace_jax/cli/invert.py's (passed in: that module
  imports this one). Masks of one size form one ``invert`` call (chunked to ``--memory-gb``)."""
  from trace_jax.models.blocks import require_vit
  _out_dir(args)
  m = common.load(args.checkpoint)
  require_vit(m.cfg, "MaskInversion", allow=("siglip",))  # invert's own check, before any shard
  kw = settings_of(m, args)
  items = items_of(args, "invert")
  if args.memory_gb is not None and not args.memory_gb > 0:
    raise ValueError(f"--memory-gb must be positive; got {args.memory_gb}")
  # --memory-gb bounds what the calls add to the peak (maskinversion.plan: the backend's runtime
  # overhead over its estimate included; tests/test_dataset_processes.py measures the RSS)
  budget = None if args.memory_gb is None else args.memory_gb * 2 ** 30
  devices, params = placed(args, m.params)

  def compute(part):
    lets, mask_ids, mask_image, dice0, dice1, maps, failed = [], [], [], [], [], [], []
    for j, item in enumerate(part):
      image, err = _load_image(m, item, args.image_size, args.resize)
      if err:
        failed.append((item.id, err))
        continue
      try:
        refs = item.mask_refs()
      except (ValueError, OSError) as e:
        failed.append((item.id, f"cannot read its masks: {str(e).splitlines()[0]}"))
        continue
      arrays, names = [], []
      for r in refs:
        try:
          a = check_mask(r.load(), r.id)
        except (ValueError, OSError) as e:
          failed.append((f"{item.id}::{r.id}", str(e).splitlines()[0]))
          continue
        arrays.append(a)
        names += [r.id] if a.shape[0] == 1 else [f"{r.id}#{k}" for k in range(a.shape[0])]
      if not refs:
        failed.append((item.id, "no masks"))
      if not arrays:
        continue
      res = common.invert_by_size(m.model, params, image, arrays, mode=args.mode,
                                  layers=args.layer_index, steps=args.steps, lr=args.lr,
                                  alpha=args.alpha, wd=args.wd, budget=budget, devices=devices, **kw)
      lets.append(res["lets"])
      dice0.append(res["dice0"])
      dice1.append(res["dice_final"])
      maps += res["map"]
      mask_ids += names
      mask_image += [j] * len(res["lets"])
    e = m.cfg.embed_dim
    arrays = {"lets": np.concatenate(lets) if lets else np.zeros((0, e), np.float32),
              "mask_ids": np.asarray(mask_ids, dtype=str),
              "mask_image": np.asarray(mask_image, np.int32),
              "dice0": np.concatenate(dice0) if dice0 else np.zeros(0, np.float32),
              "dice_final": np.concatenate(dice1) if dice1 else np.zeros(0, np.float32)}
    if args.save_maps:
      arrays.update({f"map_{k}": mp.astype(np.float32) for k, mp in enumerate(maps)})
    return arrays, failed

  return _run_dataset(args, "invert", items, compute)


def check_explain(runner) -> None:
  """Refuse a method the model's towers cannot run (e.g. LeGrad on a CRATE tower) before any shard:
  the method's own check, reached by tracing it once on shapes only (``jax.eval_shape``)."""
  import jax
  from trace_jax.attribution.api import explain
  s = runner.size
  img = jax.ShapeDtypeStruct((1, s, s, 3), np.float32)
  ids = jax.ShapeDtypeStruct((1, runner.cfg.text.context_length), np.int32)
  jax.eval_shape(lambda p, x, t: explain(runner.method, runner.model, p, x, t, **runner.settings),
                 runner.params, img, ids)


def run_explain(args, runner) -> int:
  from trace_jax.inference.explain import explain_prompts
  if args.token_ids:
    raise ValueError("dataset mode takes prompts from the spec / --text, not --token-ids")
  _out_dir(args)
  check_explain(runner)
  items = items_of(args, "explain")
  texts = tuple(args.text or ())
  devices, params = placed(args, runner.params)

  def compute(part):
    res, failed, all_texts, pair_image = [], [], [], []
    for j, item in enumerate(part):
      image, err = _load_image(runner.m, item, runner.size, runner.resize)
      if err:
        failed.append((item.id, err))
        continue
      try:
        prompts = list(texts or item.prompts())
      except (ValueError, OSError) as e:
        failed.append((item.id, f"cannot read its prompts: {str(e).splitlines()[0]}"))
        continue
      if not prompts:
        failed.append((item.id, "no prompts"))
        continue
      ids = runner.tokenize(prompts)
      out = explain_prompts(runner.method, runner.model, params, image, ids,
                            max_prompts=args.max_prompts, devices=devices, **runner.settings)
      res.append(out)
      all_texts += prompts
      pair_image += [j] * len(prompts)
    arrays = {"texts": np.asarray(all_texts, dtype=str), "pair_image": np.asarray(pair_image, np.int32)}
    if res:
      for k in sorted(set.intersection(*(set(r) for r in res))):
        vals = [r[k] for r in res]
        if all(v.ndim >= 1 for v in vals) and len({v.shape[1:] for v in vals}) == 1 and \
            all(v.shape[0] == r["map"].shape[0] for v, r in zip(vals, res)):
          arrays[k] = np.concatenate(vals)
    return arrays, failed

  return _run_dataset(args, "explain", items, compute)


def run_embed(args) -> int:
  from trace_jax.inference.embed import embed
  _out_dir(args)
  m = common.load(args.checkpoint)
  items = items_of(args, "embed")
  devices, params = placed(args, m.params)

  def compute(part):
    ok, pix, failed = [], [], []
    for j, item in enumerate(part):
      x, err = _load_image(m, item, args.image_size, args.resize)
      if err:
        failed.append((item.id, err))
        continue
      ok.append(j)
      pix.append(x)
    e = m.cfg.embed_dim
    emb = np.zeros((0, e), np.float32)
    if pix:
      # padded to the shard size: every shard runs the same program (resumed runs equal fresh ones)
      x = np.stack(pix + [pix[-1]] * (args.shard_size - len(pix)))
      emb = embed(m.cfg, params, x, None, args.batch_size, devices=devices)["image_embeds"][:len(pix)]
    return {"image_embeds": emb, "image_index": np.asarray(ok, np.int32)}, failed

  return _run_dataset(args, "embed", items, compute)
