"""A built tfds dataset split (``--tfds NAME:SPLIT [--tfds-data-dir DIR]``), read with
``builder.as_data_source`` (array_record random access; no TensorFlow).

NAME: a tfds name (``trace_voc/voc2012``, ``trace_coco/instances``, any array_record builder whose
examples have an encoded ``image``) or a short name of ``ALIASES``; the trace_jax builders
(trace_jax/data/real/) are registered on demand. Build them first (docs/datasets.md).

One item per record i (id ``SPLIT[i]``), read when its shard runs. Masks and prompts, by feature:
  ``masks`` (PNG bytes, trace_coco instances): one mask per entry (> 0), id = ``ann_id`` (else the
      entry's index); prompts = the ``category`` names (each once);
  ``label_map`` + ``labels`` (trace_voc, trace_coco stuff): one mask per present label c
      (label_map == c), id = c; prompts = the labels' names from ``metadata['class_names']``.
"""
from __future__ import annotations

import numpy as np

from trace_jax.data.preprocess import as_str
from trace_jax.data.real import masks as M
from trace_jax.data.specs.base import Item, MaskRef

ALIASES = {"voc2012": "trace_voc/voc2012", "context59": "trace_voc/context59",
           "context459": "trace_voc/context459", "coco": "trace_coco/instances"}


def parse(spec: str) -> tuple[str, str]:
  """'NAME:SPLIT' -> (tfds name, split)."""
  name, sep, split = spec.rpartition(":")
  if not sep or not name or not split:
    raise ValueError(f"--tfds expects NAME:SPLIT (e.g. voc2012:val or trace_voc/voc2012:val); got {spec!r}")
  return ALIASES.get(name, name), split


class _Records:
  """Random access to one split, remembering the last record (an item's image, masks and prompts
  are read from one record)."""

  def __init__(self, source):
    self.source, self._last = source, (None, None)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if self._last[0] != i:
      self._last = (i, self.source[i])
    return self._last[1]


def _masks(e) -> tuple:
  if "masks" in e:
    ids = e["ann_id"] if "ann_id" in e else range(len(e["masks"]))
    return tuple(MaskRef(str(int(a)), lambda b=b: (M.decode_png(b) > 0).astype(np.float32))
                 for a, b in zip(ids, e["masks"]))
  if "label_map" in e and "labels" in e:
    lab = M.decode_png(e["label_map"])
    return tuple(MaskRef(str(int(c)), lambda c=int(c): (lab == c).astype(np.float32)) for c in e["labels"])
  return ()


def _texts(e, names) -> tuple:
  if "category" in e:
    return tuple(dict.fromkeys(as_str(c) for c in e["category"]))
  if "labels" in e and names:
    return tuple(dict.fromkeys(names[int(c)] for c in e["labels"] if 0 <= int(c) < len(names)))
  return ()


def from_tfds(spec: str, data_dir: str | None = None) -> list[Item]:
  """Items of a built tfds split; ValueError naming the dataset when it is not built or has no ``image``."""
  import tensorflow_datasets as tfds
  from trace_jax.data import real
  name, split = parse(spec)
  base = name.split("/")[0]
  if base in real.BUILDERS:
    real.module(base)  # registers the builder class
  try:
    b = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises its own DatasetNotFoundError and friends
    raise ValueError(f"--tfds {spec}: no tfds dataset {name!r} ({str(e).splitlines()[0]})") from None
  if not b.is_prepared():
    raise ValueError(f"--tfds {spec}: {name} is not built in {b.data_dir} (build it first, docs/datasets.md; "
                     f"--tfds-data-dir names the tfds data_dir)")
  if split not in b.info.splits:
    raise ValueError(f"--tfds {spec}: no split {split!r}; {name} has {sorted(b.info.splits)}")
  if "image" not in b.info.features:
    raise ValueError(f"--tfds {spec}: {name} has no 'image' feature")
  recs = _Records(b.as_data_source(split=split))
  names = list((b.info.metadata or {}).get("class_names", []) or [])
  return [Item(f"{split}[{i}]", lambda i=i: recs[i]["image"], masks=lambda i=i: _masks(recs[i]),
               texts=lambda i=i: _texts(recs[i], names)) for i in range(len(recs))]
