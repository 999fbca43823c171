"""Dataset mode of ``trace-jax invert | explain | embed``: a whole dataset, streamed to shards.

    trace-jax invert  --checkpoint M --dataset pairs.csv --shards-dir OUT [--memory-gb 24]
    trace-jax explain --checkpoint M --dataset pairs.csv --shards-dir OUT [--max-prompts 64]
    trace-jax explain --checkpoint M --dataset images/ --text "a cat" --text "a dog" --shards-dir OUT
    trace-jax embed   --checkpoint M --dataset images/ --shards-dir OUT

``--dataset``: a CSV (``image,mask`` rows for invert, one row per mask, an image's masks gathered in
order; ``image,text`` for explain; ``image`` for embed; a header row is optional; paths relative
to the CSV) or, for explain / embed, a folder of images. Results go to ``OUT/{lets,maps,embeds}-
NNNNN.npz`` shards, written as they are produced (atomically) with a per-process index
(trace_jax/inference/dataset.py, docs/inference.md); a rerun of the same command skips the
finished shards. An unreadable image or an empty / bad mask is skipped and listed in its shard's
``failed_ids`` / ``failed_reasons`` and the index, never a crash of the run. ``--process-index`` /
``--process-count`` (default: jax's, i.e. ``jax.distributed``) pick this process's shards.
Every call runs on all local devices (``--devices``) with ``NamedSharding``.
"""
from __future__ import annotations

import argparse
import csv
import os

import numpy as np

from trace_jax.cli import common

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def add_arguments(p: argparse.ArgumentParser, kind: str) -> None:
  """The dataset-mode flags (``--dataset`` itself goes into the command's input group)."""
  g = p.add_argument_group("dataset mode (--dataset)")
  g.add_argument("--shards-dir", help="dataset mode: folder for the result shards and the index")
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


def devices_of(args):
  d = args.devices
  if d == "all":
    return "all"
  try:
    n = int(d)
  except ValueError:
    raise ValueError(f"--devices must be 'all' or a count; got {d!r}") from None
  return n


def read_csv(path: str, columns: int, second_is_path: bool = False) -> list[tuple[str, ...]]:
  """Rows of 1 (image) or 2 (image, mask|text) columns; image (and mask: ``second_is_path``) paths
  made absolute from the CSV's folder; an optional header row (first cell 'image') is skipped; ValueError naming file:line."""
  base = os.path.dirname(os.path.abspath(path))
  rows = []
  try:
    f = open(path, newline="", encoding="utf-8")
  except OSError as e:
    raise ValueError(f"cannot read --dataset {path}: {e}") from e
  with f:
    for i, row in enumerate(csv.reader(f)):
      if not row or all(not c.strip() for c in row):
        continue
      if i == 0 and row[0].strip().lower() == "image":
        continue
      if len(row) < columns:
        raise ValueError(f"{path}:{i + 1}: expected {columns} column(s), got {row!r}")
      img = row[0].strip()
      img = img if os.path.isabs(img) else os.path.join(base, img)
      if columns == 1:
        rows.append((img,))
      else:
        rest = ",".join(row[1:]).strip()
        if second_is_path and not os.path.isabs(rest):
          rest = os.path.join(base, rest)
        rows.append((img, rest))
  if not rows:
    raise ValueError(f"{path}: no rows")
  return rows


def list_images(folder: str) -> list[str]:
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
  if not files:
    raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTS)})")
  return [os.path.join(folder, f) for f in files]


def grouped(rows) -> list[tuple[str, list[str]]]:
  """(image, x) rows -> [(image, [x, ...])] in first-appearance order."""
  out: dict[str, list[str]] = {}
  for img, x in rows:
    out.setdefault(img, []).append(x)
  return list(out.items())


def _rel(path: str, root: str) -> str:
  return os.path.relpath(path, root)


def _summary(kind: str, s: dict, out_dir: str) -> None:
  print(f"{kind}: {s['written']} shard(s) written, {s['done_before']} already done, "
        f"{s['items']} images ({s['units']} results) in {s['seconds']:.1f} s, {s['failed_total']} "
        f"skipped (listed in {s['index']}); shards in {out_dir}")


def _load_image(m, path, size, resize):
  """One image [S, S, 3] or the reason it cannot be read."""
  try:
    return m.images([path], size, resize)[0], None
  except (ValueError, OSError) as e:
    return None, str(e).splitlines()[0]


def run_invert(args, load_masks) -> int:
  """``load_masks``: trace_jax/cli/invert.py's (passed in: that module imports this one)."""
  from trace_jax.inference.dataset import run_shards
  from trace_jax.inversion.maskinversion import invert
  if not args.shards_dir:
    raise ValueError("--dataset needs --shards-dir DIR")
  items = grouped(read_csv(args.dataset, 2, second_is_path=True))
  root = os.path.dirname(os.path.abspath(args.dataset))
  m = common.load(args.checkpoint)
  budget = None if args.memory_gb is None else args.memory_gb * 2 ** 30
  devices = devices_of(args)

  def compute(part):
    lets, mask_ids, mask_image, dice0, dice1, maps, failed = [], [], [], [], [], [], []
    for j, (img_path, mask_paths) in enumerate(part):
      iid = _rel(img_path, root)
      image, err = _load_image(m, img_path, args.image_size, args.resize)
      if err:
        failed.append((iid, err))
        continue
      arrays, names = [], []
      for mp in mask_paths:
        try:
          a, _ = load_masks([mp])
        except ValueError as e:
          failed.append((f"{iid}::{_rel(mp, root)}", str(e)))
          continue
        arrays.append(a[0])
        names += [_rel(mp, root)] if a[0].shape[0] == 1 else [f"{_rel(mp, root)}#{k}" for k in range(a[0].shape[0])]
      if not arrays:
        continue
      by_size: dict = {}
      for a, start in zip(arrays, np.cumsum([0] + [a.shape[0] for a in arrays])):
        by_size.setdefault(a.shape[1:], []).append((start, a))
      rows = np.zeros((sum(a.shape[0] for a in arrays), m.cfg.embed_dim), np.float32)
      d0, d1 = np.zeros(len(rows), np.float32), np.zeros(len(rows), np.float32)
      mp_ = [None] * len(rows)
      for group in by_size.values():
        out = invert(m.model, m.params, image, np.concatenate([a for _, a in group]), mode=args.mode,
                     layers=args.layer_index, steps=args.steps, lr=args.lr, alpha=args.alpha,
                     wd=args.wd, budget=budget, devices=devices)
        at = [s + k for s, a in group for k in range(a.shape[0])]
        rows[at] = np.asarray(out["lets"])
        d0[at], d1[at] = np.asarray(out["dice0"]), np.asarray(out["dice_final"])
        for r, mm in zip(at, np.asarray(out["map"])):
          mp_[r] = mm
      lets.append(rows)
      dice0.append(d0)
      dice1.append(d1)
      maps += mp_
      mask_ids += names
      mask_image += [j] * len(rows)
    e = m.cfg.embed_dim
    arrays = {"lets": np.concatenate(lets) if lets else np.zeros((0, e), np.float32),
              "mask_ids": np.asarray(mask_ids, dtype=str),
              "mask_image": np.asarray(mask_image, np.int32),
              "dice0": np.concatenate(dice0) if dice0 else np.zeros(0, np.float32),
              "dice_final": np.concatenate(dice1) if dice1 else np.zeros(0, np.float32)}
    if args.save_maps:
      arrays.update({f"map_{k}": mp.astype(np.float32) for k, mp in enumerate(maps)})
    return arrays, failed

  s = run_shards(items, compute, args.shards_dir, shard_size=args.shard_size, prefix="lets",
                 item_id=lambda it: _rel(it[0], root), process_index=args.process_index,
                 process_count=args.process_count, progress=not args.no_progress,
                 count=lambda a: a["lets"].shape[0], unit="masks")
  _summary("invert", s, args.shards_dir)
  return 0


def run_explain(args, runner) -> int:
  from trace_jax.inference.dataset import run_shards
  from trace_jax.inference.explain import explain_prompts
  if not args.shards_dir:
    raise ValueError("--dataset needs --shards-dir DIR")
  if args.token_ids:
    raise ValueError("--dataset takes prompts from the CSV / --text, not --token-ids")
  if os.path.isdir(args.dataset):
    if not args.text:
      raise ValueError("--dataset FOLDER needs at least one --text")
    root = args.dataset
    items = [(p, list(args.text)) for p in list_images(args.dataset)]
  else:
    root = os.path.dirname(os.path.abspath(args.dataset))
    items = grouped(read_csv(args.dataset, 2))
  devices = devices_of(args)

  def compute(part):
    res, failed, texts, pair_image = [], [], [], []
    for j, (img_path, prompts) in enumerate(part):
      image, err = _load_image(runner.m, img_path, runner.size, runner.resize)
      if err:
        failed.append((_rel(img_path, root), err))
        continue
      ids = runner.tokenize(prompts)
      out = explain_prompts(runner.method, runner.model, runner.params, image, ids,
                            max_prompts=args.max_prompts, devices=devices, **runner.settings)
      res.append(out)
      texts += prompts
      pair_image += [j] * len(prompts)
    arrays = {"texts": np.asarray(texts, dtype=str), "pair_image": np.asarray(pair_image, np.int32)}
    if res:
      for k in sorted(set.intersection(*(set(r) for r in res))):
        vals = [r[k] for r in res]
        if all(v.ndim >= 1 for v in vals) and len({v.shape[1:] for v in vals}) == 1 and \
            all(v.shape[0] == r["map"].shape[0] for v, r in zip(vals, res)):
          arrays[k] = np.concatenate(vals)
    return arrays, failed

  s = run_shards(items, compute, args.shards_dir, shard_size=args.shard_size, prefix="maps",
                 item_id=lambda it: _rel(it[0], root), process_index=args.process_index,
                 process_count=args.process_count, progress=not args.no_progress,
                 count=lambda a: a["texts"].shape[0], unit="maps")
  _summary("explain", s, args.shards_dir)
  return 0


def run_embed(args) -> int:
  from trace_jax.inference.dataset import run_shards
  from trace_jax.inference.embed import embed
  if not args.shards_dir:
    raise ValueError("--dataset needs --shards-dir DIR")
  if os.path.isdir(args.dataset):
    root, paths = args.dataset, list_images(args.dataset)
  else:
    root = os.path.dirname(os.path.abspath(args.dataset))
    paths = [r[0] for r in read_csv(args.dataset, 1)]
  m = common.load(args.checkpoint)
  devices = devices_of(args)

  def compute(part):
    ok, pix, failed = [], [], []
    for j, p in enumerate(part):
      x, err = _load_image(m, p, args.image_size, args.resize)
      if err:
        failed.append((_rel(p, root), err))
        continue
      ok.append(j)
      pix.append(x)
    e = m.cfg.embed_dim
    emb = np.zeros((0, e), np.float32)
    if pix:
      # padded to the shard size: every shard runs the same program (resumed runs equal fresh ones)
      x = np.stack(pix + [pix[-1]] * (args.shard_size - len(pix)))
      emb = embed(m.cfg, m.params, x, None, args.batch_size, devices=devices)["image_embeds"][:len(pix)]
    return {"image_embeds": emb, "image_index": np.asarray(ok, np.int32)}, failed

  s = run_shards(paths, compute, args.shards_dir, shard_size=args.shard_size, prefix="embeds",
                 item_id=lambda p: _rel(p, root), process_index=args.process_index,
                 process_count=args.process_count, progress=not args.no_progress)
  _summary("embed", s, args.shards_dir)
  return 0
