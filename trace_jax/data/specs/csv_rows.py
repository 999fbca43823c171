"""CSV specs and image folders.

CSV rows: ``image,mask`` (one row per mask file, an image's masks gathered in first-appearance
order), ``image,text`` (one row per prompt, gathered the same way) or ``image``. A header row whose
first cell is ``image`` is optional; paths are relative to the CSV's folder. Item ids: image paths
relative to the CSV's folder (a folder: the file names); mask ids: mask paths relative to it.
"""
from __future__ import annotations

import csv
import os

from trace_jax.data.specs.base import Item, MaskRef, list_images, read_mask_file

SECOND = (None, "mask", "text")


def read_csv(path: str, columns: int, second_is_path: bool = False) -> list[tuple[str, ...]]:
  """Rows of 1 (image) or 2 (image, mask|text) columns; image (and mask: ``second_is_path``) paths made
  absolute from the CSV's folder; an optional header row (first cell 'image') is skipped; a text
  may contain commas (the rest of the row). ValueError naming file:line."""
  base = os.path.dirname(os.path.abspath(path))
  rows = []
  try:
    f = open(path, newline="", encoding="utf-8")
  except OSError as e:
    raise ValueError(f"cannot read {path}: {e}") from e
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


def grouped(rows) -> list[tuple[str, list[str]]]:
  """(image, x) rows -> [(image, [x, ...])] in first-appearance order."""
  out: dict[str, list[str]] = {}
  for img, x in rows:
    out.setdefault(img, []).append(x)
  return list(out.items())


def from_csv(path: str, second: str | None) -> list[Item]:
  """Items of a CSV whose rows are ``image`` (second None), ``image,mask`` or ``image,text``."""
  if second not in SECOND:
    raise ValueError(f"second column must be one of {SECOND}; got {second!r}")
  root = os.path.dirname(os.path.abspath(path))
  rel = lambda p: os.path.relpath(p, root)
  if second is None:
    return [Item(rel(r[0]), r[0]) for r in read_csv(path, 1)]
  groups = grouped(read_csv(path, 2, second_is_path=second == "mask"))
  if second == "text":
    return [Item(rel(img), img, texts=tuple(texts)) for img, texts in groups]
  return [Item(rel(img), img, masks=tuple(MaskRef(rel(m), lambda m=m: read_mask_file(m)) for m in masks))
          for img, masks in groups]


def from_folder(folder: str, texts=()) -> list[Item]:
  """One item per image file of ``folder`` (ids: file names), each with the prompts ``texts``."""
  return [Item(os.path.basename(p), p, texts=tuple(texts)) for p in list_images(folder)]
