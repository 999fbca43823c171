"""Real training sources (registered by data/sources.py from ``FACTORIES``): image–caption files and the grounding
datasets' tfds builders, through the Grain pipeline (data/grain_pipeline.py).

  image_text          open_clip's image–caption conventions: a CSV / TSV (``data.path=FILE``; columns
                      ``data.image_key`` = 'filepath', ``data.caption_key`` = 'title';
                      ``data.csv_separator``, default tab for .tsv else comma; image paths relative to
                      the file) or WebDataset tar shards (``data.path='DIR/shard-{000000..000127}.tar'``;
                      members KEY.jpg|jpeg|png|webp + KEY.txt)
  visual_genome       trace_visual_genome (AMC triplets): one row per (image, prompt, box)
  flickr30k_entities  one row per phrase with a box: caption = its sentence, box = one of its
                      entity's boxes drawn at random (AMC ``random.choice(ann['bbox'])``)
  refcoco, refcocoplus, refcocog
                      one row per referring sentence: caption = phrase = the sentence, box = its ref's
  coco_captions       trace_coco: one row per (image, caption); no box

The tfds sources read ``data.data_dir`` and, when the builder is not prepared yet, prepare it from
``data.manual_dir`` (docs/datasets.md); one process prepares it while the others wait on a file lock
beside the dataset. ``data.builder_config`` picks a builder config (default per source above).

Bad records: an empty caption / phrase, a box outside the image (empty after clipping and AMC's
int() truncation), an incomplete WebDataset sample are skipped when the source is made and counted
(``source.extras['skipped']``, logged); an unreadable image is replaced in the pipeline and counted
(batch key ``skipped``). A source with no usable record is an error naming the path.

Tokeniser: ``sources.make(config, tokenizer=tok)``, else the model dir of ``config.init_from``, else
``data.tokenizer_dir`` (trace_jax.tokenizers.load_tokenizer).
"""
from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import re
import tarfile
from contextlib import contextmanager
from typing import Callable

import numpy as np

from trace_jax import atomic
from trace_jax.data import grain_pipeline as gp
from trace_jax.data.preprocess import CLIP_MEAN, CLIP_STD, as_str

log = logging.getLogger("trace_jax.data")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _get(d, key, default=None):
  v = d.get(key, default) if hasattr(d, "get") else getattr(d, key, default)
  return default if v is None else v


def _log_skips(name: str, path: str, skipped: dict):
  if any(skipped.values()):
    log.warning("%s (%s): skipped %s", name, path, json.dumps(skipped))


# ---------------------------------------------------------------------------------------------- tokenizer

def resolve_tokenizer(config, tokenizer=None):
  """The tokenizer of a real source (module docstring): ``tok(texts) -> int32 [n, L]``."""
  if tokenizer is not None:
    return tokenizer
  from trace_jax.tokenizers import load_tokenizer
  for where, d in (("init_from", _get(config, "init_from")), ("data.tokenizer_dir", _get(config.data, "tokenizer_dir"))):
    if d:
      return load_tokenizer(str(d))
  raise ValueError(f"data.name={config.data.name} needs the model's tokenizer: set init_from (a model dir "
                   "with tokenizer/) or data.tokenizer_dir")


# ---------------------------------------------------------------------------------------------- records

class FileRecords:
  """Image files + captions (CSV rows). ``load`` reads the file (RecordError when missing)."""

  def __init__(self, paths, captions, path: str):
    self.paths, self.captions, self.path = list(paths), list(captions), path

  def __len__(self):
    return len(self.paths)

  def load(self, i, rng):
    p = self.paths[i]
    try:
      with open(p, "rb") as f:
        data = f.read()
    except OSError as e:
      raise gp.RecordError(f"{p}: cannot read ({e.strerror})") from None
    return gp.Raw(data, self.captions[i], where=p)


class TarRecords:
  """WebDataset samples: image bytes at (shard, offset, size) read by seeking (no tar parsing)."""

  def __init__(self, shards, shard, offset, size, captions, keys, path: str):
    self.shards, self.path = list(shards), path
    self.shard, self.offset, self.size = (np.asarray(shard, np.int32), np.asarray(offset, np.int64),
                                          np.asarray(size, np.int64))
    self.captions, self.keys = list(captions), list(keys)

  def __len__(self):
    return len(self.captions)

  def load(self, i, rng):
    where = f"{self.shards[self.shard[i]]}:{self.keys[i]}"
    try:
      with open(self.shards[self.shard[i]], "rb") as f:
        f.seek(int(self.offset[i]))
        data = f.read(int(self.size[i]))
    except OSError as e:
      raise gp.RecordError(f"{where}: cannot read ({e.strerror})") from None
    return gp.Raw(data, self.captions[i], where=where)


def read_csv(path: str, image_key: str = "filepath", caption_key: str = "title", sep: str | None = None):
  """(FileRecords, skipped counts) of an open_clip CSV / TSV (open_clip training/data.py CsvDataset:
  ``pd.read_csv(input_filename, sep=sep)``, ``df[img_key]``, ``df[caption_key]``)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.path {path}: no such file (an open_clip CSV / TSV of image paths and captions)")
  sep = sep or ("\t" if path.lower().endswith(".tsv") else ",")
  root = os.path.dirname(os.path.abspath(path))
  paths, caps, skipped = [], [], {"empty_caption": 0}
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter=sep)
    cols = reader.fieldnames or []
    for k, what in ((image_key, "data.image_key"), (caption_key, "data.caption_key")):
      if k not in cols:
        raise ValueError(f"{path}: no column {k!r} ({what}); columns: {cols} (separator {sep!r})")
    for row in reader:
      cap = (row[caption_key] or "").strip()
      if not cap:
        skipped["empty_caption"] += 1
        continue
      p = (row[image_key] or "").strip()
      paths.append(p if os.path.isabs(p) else os.path.join(root, p))
      caps.append(cap)
  return FileRecords(paths, caps, path), skipped


def expand_braces(pattern: str) -> list[str]:
  """'a-{000..002}.tar' -> ['a-000.tar', 'a-001.tar', 'a-002.tar'] (zero padding kept); '{a,b}' lists;
  several groups expand left to right (the braceexpand rules webdataset uses)."""
  m = re.search(r"\{([^{}]*)\}", pattern)
  if m is None:
    return [pattern]
  body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
  r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if r:
    lo, hi = r.group(1), r.group(2)
    width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
    step = 1 if int(hi) >= int(lo) else -1
    items = [str(v).zfill(width) for v in range(int(lo), int(hi) + step, step)]
  else:
    items = body.split(",")
  return [s for it in items for s in expand_braces(head + it + tail)]


def read_shards(pattern: str):
  """(TarRecords, skipped counts) of WebDataset shards: a sample is the members sharing a key (the
  path up to the first dot of the file name); it needs one image (jpg / jpeg / png / webp) and a txt."""
  shards = expand_braces(pattern)
  missing = [s for s in shards if not os.path.isfile(s)]
  if missing:
    raise FileNotFoundError(f"data.path {pattern}: {len(missing)} of {len(shards)} shards missing, e.g. {missing[0]}")
  cols = {"shard": [], "offset": [], "size": [], "captions": [], "keys": []}
  skipped = {"empty_caption": 0, "missing_image": 0, "missing_caption": 0}
  for si, s in enumerate(shards):
    groups: dict[str, dict] = {}
    try:
      with tarfile.open(s, "r:") as tf:
        for m in tf:
          if not m.isfile():
            continue
          d, base = os.path.split(m.name)
          key, _, ext = base.partition(".")
          g = groups.setdefault(os.path.join(d, key), {})
          ext = ext.lower()
          if ext in IMAGE_EXTS and "image" not in g:
            g["image"] = (m.offset_data, m.size)
          elif ext == "txt":
            g["txt"] = tf.extractfile(m).read().decode("utf-8", "replace").strip()
    except tarfile.TarError as e:
      raise ValueError(f"{s}: not a readable tar file ({e})") from None
    for key, g in groups.items():
      if "image" not in g:
        skipped["missing_image"] += 1
      elif "txt" not in g:
        skipped["missing_caption"] += 1
      elif not g["txt"]:
        skipped["empty_caption"] += 1
      else:
        cols["shard"].append(si)
        cols["offset"].append(g["image"][0])
        cols["size"].append(g["image"][1])
        cols["captions"].append(g["txt"])
        cols["keys"].append(key)
  return TarRecords(shards, cols["shard"], cols["offset"], cols["size"], cols["captions"], cols["keys"],
                    pattern), skipped


# ---------------------------------------------------------------------------------------------- tfds records

def usable_box(box, width: int, height: int):
  """The box clipped to the image as AMC clips it (caption_dataset.py: x1, y1 in [0, w-1] / [0, h-1],
  x2, y2 in [1, w] / [1, h], then int()), or None when the resulting mask is empty."""
  x0, y0, x1, y1 = (float(v) for v in box)
  x0, y0 = int(min(max(x0, 0.0), width - 1)), int(min(max(y0, 0.0), height - 1))
  x1, y1 = int(min(max(x1, 1.0), width)), int(min(max(y1, 1.0), height))
  if x1 <= x0 or y1 <= y0 or box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height:
    return None
  return np.asarray([x0, y0, x1, y1], np.float64)


# Per kind: rows(e) -> [(sub index, reason or None)], and row(e, sub, rng) -> (caption, phrase, box).
def _vg_rows(e):
  w, h = int(e["width"]), int(e["height"])
  return [(k, "empty_caption" if not as_str(p).strip() else
           "box_outside_image" if usable_box(b, w, h) is None else None)
          for k, (p, b) in enumerate(zip(e["prompts"], np.asarray(e["boxes"]).reshape(-1, 4)))]


def _vg_row(e, k, rng):
  p = as_str(e["prompts"][k]).strip()
  return p, p, usable_box(np.asarray(e["boxes"]).reshape(-1, 4)[k], int(e["width"]), int(e["height"]))


def _flickr_boxes(e, k):
  w, h = int(e["width"]), int(e["height"])
  ent = int(np.asarray(e["phrase_entity"])[k])
  boxes = np.asarray(e["boxes"]).reshape(-1, 4)[np.asarray(e["box_entity"]) == ent]
  return [b for b in (usable_box(b, w, h) for b in boxes) if b is not None]


def _flickr_rows(e):
  out = []
  for k, p in enumerate(e["phrases"]):
    if not bool(np.asarray(e["phrase_has_box"])[k]):
      out.append((k, "no_box"))
    elif not as_str(p).strip():
      out.append((k, "empty_caption"))
    else:
      out.append((k, None if _flickr_boxes(e, k) else "box_outside_image"))
  return out


def _flickr_row(e, k, rng):
  boxes = _flickr_boxes(e, k)
  cap = as_str(e["sentences"][int(np.asarray(e["phrase_sentence"])[k])]).strip()
  return cap, as_str(e["phrases"][k]).strip(), boxes[int(rng.integers(len(boxes)))]


def _ref_rows(e):
  w, h = int(e["width"]), int(e["height"])
  boxes = np.asarray(e["ref_boxes"]).reshape(-1, 4)
  return [(k, "empty_caption" if not as_str(s).strip() else
           "box_outside_image" if usable_box(boxes[int(r)], w, h) is None else None)
          for k, (s, r) in enumerate(zip(e["sentences"], np.asarray(e["sentence_ref"])))]


def _ref_row(e, k, rng):
  s = as_str(e["sentences"][k]).strip()
  r = int(np.asarray(e["sentence_ref"])[k])
  return s, s, usable_box(np.asarray(e["ref_boxes"]).reshape(-1, 4)[r], int(e["width"]), int(e["height"]))


def _coco_rows(e):
  return [(k, None if as_str(c).strip() else "empty_caption") for k, c in enumerate(e["captions"])]


def _coco_row(e, k, rng):
  c = as_str(e["captions"][k]).strip()
  return c, c, None


# source name -> (tfds builder, default config, rows, row)
TFDS_SOURCES = {
    "visual_genome": ("trace_visual_genome", "amc", _vg_rows, _vg_row),
    "flickr30k_entities": ("trace_flickr30k_entities", "default", _flickr_rows, _flickr_row),
    "refcoco": ("trace_refcoco", "refcoco_unc", _ref_rows, _ref_row),
    "refcocoplus": ("trace_refcoco", "refcocoplus_unc", _ref_rows, _ref_row),
    "refcocog": ("trace_refcoco", "refcocog_umd", _ref_rows, _ref_row),
    "coco_captions": ("trace_coco", "instances", _coco_rows, _coco_row),
}


def _builder(builder_name: str, config: str, data_dir: str | None):
  import tensorflow_datasets as tfds
  from trace_jax.data import real
  real.module(builder_name)   # registers the builder class
  return tfds.builder_cls(builder_name)(config=config, data_dir=data_dir, file_format="array_record")


class TfdsRecords:
  """Rows (record, sub) of a prepared tfds builder; the data source is opened lazily (in each worker)."""

  def __init__(self, source_name: str, config: str, data_dir: str | None, split: str, items: np.ndarray,
               path: str):
    self.source_name, self.config, self.data_dir, self.split = source_name, config, data_dir, split
    self.items, self.path = np.asarray(items, np.int64).reshape(-1, 2), path
    self._ds = None

  def __getstate__(self):
    return {**self.__dict__, "_ds": None}

  def __len__(self):
    return len(self.items)

  def _source(self):
    if self._ds is None:
      self._ds = _builder(TFDS_SOURCES[self.source_name][0], self.config, self.data_dir).as_data_source(
          split=self.split)
    return self._ds

  def load(self, i, rng):
    r, k = (int(v) for v in self.items[i])
    e = self._source()[r]
    cap, phrase, box = TFDS_SOURCES[self.source_name][3](e, k, rng)
    return gp.Raw(e["image"], cap, phrase, box, where=f"{self.path}[{r}]")


@contextmanager
def file_lock(path: str):
  """Exclusive lock on ``path`` (created): the first process holds it while preparing; the others
  block until it is released (fcntl.flock: processes of one host or a shared POSIX file system)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def tfds_records(source_name: str, d, split: str):
  """(TfdsRecords, skipped counts): prepares the builder if needed (one process; the others wait),
  then lists the usable rows once (cached beside the dataset as trace_rows_<version>_<split>.npz)."""
  builder_name, default_config, rows_fn, _ = TFDS_SOURCES[source_name]
  config = str(_get(d, "builder_config", "") or default_config)
  data_dir = _get(d, "data_dir")
  b = _builder(builder_name, config, data_dir)
  where = os.path.dirname(str(b.data_dir))          # DATA_DIR/<name>/<config>
  cache = os.path.join(where, f"trace_rows_{b.version}_{split}.npz")
  with file_lock(os.path.join(where, ".trace_prepare.lock")):
    b = _builder(builder_name, config, data_dir)   # anew: another process may have prepared it meanwhile
    if not b.is_prepared():
      manual = _get(d, "manual_dir")
      if not manual:
        raise ValueError(f"{builder_name}/{config} is not prepared in {where}: set data.manual_dir to the "
                         "folder of the official files (docs/datasets.md) or prepare it first")
      from trace_jax.data import real
      b = real.prepare(builder_name, str(manual), data_dir, config)
    if split not in b.info.splits:
      raise ValueError(f"{builder_name}/{config} has no split {split!r}; splits: {sorted(b.info.splits.keys())}")
    if not os.path.isfile(cache):
      ds = b.as_data_source(split=split)
      items, skipped = [], {}
      for lo in range(0, len(ds), 64):
        idx = list(range(lo, min(lo + 64, len(ds))))
        for r, e in zip(idx, ds.__getitems__(idx)):
          for k, why in rows_fn(e):
            if why is None:
              items.append((r, k))
            else:
              skipped[why] = skipped.get(why, 0) + 1
      atomic.write_with(cache, lambda tmp: np.savez(tmp, items=np.asarray(items, np.int64).reshape(-1, 2),
                                                    skipped=json.dumps(skipped)))
  z = np.load(cache)
  path = f"{where} ({split})"
  return TfdsRecords(source_name, config, data_dir, split, z["items"], path), json.loads(str(z["skipped"]))


# ---------------------------------------------------------------------------------------------- sources

def _augment(d, split: str) -> bool:
  a = str(_get(d, "augment", "auto"))
  if a not in ("auto", "train", "eval"):
    raise ValueError(f"data.augment must be 'auto', 'train' or 'eval'; got {a!r}")
  return split.startswith("train") if a == "auto" else a == "train"


def make_source(Source, name: str, config, records, skipped: dict, split: str, pi: int, pc: int, tokenizer,
                train_captions: Callable | None = None):
  """A Source over ``records`` (module docstring): batches through the Grain pipeline."""
  d = config.data
  _log_skips(name, records.path, skipped)
  if len(records) == 0:
    raise ValueError(f"data.name={name}: no usable record in {records.path} (skipped: {json.dumps(skipped)})")
  from grain.sharding import ShardOptions
  shard = ShardOptions(shard_index=pi, shard_count=pc)
  seed = int(config.seed)
  mean = tuple(_get(d, "image_mean", CLIP_MEAN))
  std = tuple(_get(d, "image_std", CLIP_STD))
  augment = _augment(d, split)

  def batches(start, **_):
    ds = gp.global_dataset(records, seed=seed, image_size=int(d.image_size), augment=augment, mean=mean, std=std)
    return gp.BatchIterator(ds, batch_size=int(d.batch_size), tokenizer=tokenizer, shard=shard,
                            start_step=int(start), worker_count=int(_get(d, "worker_count", 0)),
                            read_threads=int(_get(d, "read_threads", 1)), prefetch=int(_get(d, "prefetch", 2)),
                            seed=seed, num_records=len(records), name=name)

  info = {"vocab_size": int(tokenizer.vocab_size), "context_length": int(tokenizer.context_length),
          "tokenizer": tokenizer, "image_size": int(d.image_size)}
  if train_captions is not None:
    info["train_captions"] = train_captions
  return Source(name, info, batches, extras={"records": records, "skipped": dict(skipped),
                                                     "path": records.path, "augment": augment})


def _image_text(config, split, pi, pc, tokenizer=None, *, Source):
  d = config.data
  path = str(_get(d, "path", ""))
  if not path:
    raise ValueError("data.name=image_text needs data.path (a CSV / TSV file or 'DIR/shard-{000000..000127}.tar')")
  tok = resolve_tokenizer(config, tokenizer)
  if path.lower().endswith(".tar") or "{" in path:
    records, skipped = read_shards(path)
  else:
    records, skipped = read_csv(path, str(_get(d, "image_key", "filepath")), str(_get(d, "caption_key", "title")),
                                _get(d, "csv_separator") or None)
  return make_source(Source, "image_text", config, records, skipped, split, pi, pc, tok,
                     train_captions=lambda: list(records.captions))


def _tfds_source(name):
  def make(config, split, pi, pc, tokenizer=None, *, Source):
    tok = resolve_tokenizer(config, tokenizer)
    if name == "coco_captions" and split in ("train", "val"):
      split = split + "2017"                         # trace_coco splits are train2017 / val2017
    records, skipped = tfds_records(name, config.data, split)

    def train_captions():
      ds, row, rng = records._source(), TFDS_SOURCES[name][3], np.random.default_rng(0)
      out, cur, ex = [], None, None
      for r, k in records.items:          # a record's caption rows are consecutive: read it once
        if r != cur:
          cur, ex = r, ds[int(r)]
        out.append(row(ex, int(k), rng)[0])
      return out
    return make_source(Source, name, config, records, skipped, split, pi, pc, tok, train_captions=train_captions)
  return make


# name -> factory(config, split, process_index, process_count, tokenizer=None, *, Source); data/sources.py
# registers each (this module does not import it: the layers allow no cycle).
FACTORIES = {"image_text": _image_text, **{n: _tfds_source(n) for n in TFDS_SOURCES}}
