"""A COCO-format instance annotation file plus its image folder (``--coco-json F --images DIR``).

The official ``instances_*.json`` layout: ``images`` [{id, file_name, height, width}],
``annotations`` [{id, image_id, category_id, segmentation}], ``categories`` [{id, name}].
``segmentation`` is a polygon list, an uncompressed RLE {'counts': [..], 'size': [h, w]} or a
compressed RLE {'counts': str, 'size': [h, w]}; each is decoded by our NumPy port of the COCO API
(trace_jax/data/real/masks.py ``coco_segmentation_to_mask``, equal to pycocotools' annToMask) at
the size the ``images`` entry states. One item per ``images`` entry, in file order; id =
``file_name``; masks = its annotations in file order (mask id = the annotation id); texts = the
category names of its annotations (first-appearance order, each once).
"""
from __future__ import annotations

import os

import numpy as np

from trace_jax.data.real import masks as M
from trace_jax.data.real import readers as R
from trace_jax.data.specs.base import Item, MaskRef


def _mask_loader(segm, h, w, path, where):
  return lambda: M.coco_segmentation_to_mask(segm, h, w, path, where).astype(np.float32)


def from_coco(json_path: str, images_dir: str) -> list[Item]:
  """Items of a COCO instances file; AnnotationError (a ValueError) names the file and the field.
  A malformed ``segmentation`` fails only its own mask, when it is loaded (skipped and listed)."""
  if not os.path.isdir(images_dir):
    raise ValueError(f"--images {images_dir} is not a folder (the COCO images)")
  js = R.load_json(json_path, "COCO instances: images / annotations / categories")
  cats = {R.get(c, "id", json_path, f"categories[{i}]", int): R.get(c, "name", json_path, f"categories[{i}]", str)
          for i, c in enumerate(R.get_list(js, "categories", json_path))}
  images = []
  for i, im in enumerate(R.get_list(js, "images", json_path)):
    w = f"images[{i}]"
    images.append((R.get(im, "id", json_path, w, int), R.get(im, "file_name", json_path, w, str),
                   R.get(im, "height", json_path, w, int), R.get(im, "width", json_path, w, int)))
  by_image: dict[int, list] = {}
  for i, a in enumerate(R.get_list(js, "annotations", json_path)):
    w = f"annotations[{i}]"
    for key in ("id", "image_id", "category_id", "segmentation"):
      R.get(a, key, json_path, w)
    if a["category_id"] not in cats:
      raise R.AnnotationError(json_path, f"{w}.category_id", f"{a['category_id']} is not in categories")
    by_image.setdefault(a["image_id"], []).append((i, a))
  items = []
  for image_id, name, h, w in images:
    anns = by_image.get(image_id, [])
    masks = tuple(MaskRef(str(a["id"]), _mask_loader(a["segmentation"], h, w, json_path,
                                                      f"annotations[{i}].segmentation"))
                  for i, a in anns)
    texts = tuple(dict.fromkeys(cats[a["category_id"]] for _, a in anns))
    items.append(Item(name, os.path.join(images_dir, name), masks=masks, texts=texts))
  return items
