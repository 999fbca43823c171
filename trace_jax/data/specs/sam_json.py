"""A folder of segment-anything automatic-mask outputs plus the image folder (``--sam-dir D --images DIR``).

segment-anything ``scripts/amg.py --convert-to-rle`` (``SamAutomaticMaskGenerator(output_mode=
'coco_rle')``) writes, for image ``<stem>.<ext>``, the file ``<stem>.json``: a JSON list with one
dict per mask: ``segmentation`` = compressed COCO RLE {'size': [h, w], 'counts': str} (their
``coco_encode_rle``), plus ``area``, ``bbox``, ``predicted_iou``, ``point_coords``,
``stability_score``, ``crop_box``. An uncompressed RLE (``counts`` a list) is read too.

One item per JSON file (sorted names); id = the image's file name; its image = ``<stem>.<ext>`` in
the image folder (any of IMAGE_EXTS; a missing one is an unreadable image: skipped and listed);
mask id = the mask's index in the list (amg.py's PNG mode names them ``<index>.png``). The JSON is
read when the item's shard runs.
"""
from __future__ import annotations

import os

import numpy as np

from trace_jax.data.real import masks as M
from trace_jax.data.real import readers as R
from trace_jax.data.specs.base import Item, MaskRef, find_image


def _rle_mask(segm, path, where):
  """An RLE ``segmentation`` at the size it states -> float32 [h, w]."""
  size = segm.get("size") if isinstance(segm, dict) else None
  if not (isinstance(size, (list, tuple)) and len(size) == 2):
    raise R.AnnotationError(path, where, "expected an RLE {'size': [h, w], 'counts': ...}")
  return M.coco_segmentation_to_mask(segm, int(size[0]), int(size[1]), path, where).astype(np.float32)


def masks_of(json_path: str) -> tuple:
  """The MaskRefs of one amg.py JSON file; AnnotationError naming the file when it is not a list."""
  js = R.load_json(json_path, "segment-anything amg.py masks (a list of dicts)")
  if not isinstance(js, list):
    raise R.AnnotationError(json_path, "<root>", f"expected a list of masks, got {type(js).__name__}")
  out = []
  for k, m in enumerate(js):
    segm = m.get("segmentation") if isinstance(m, dict) else None
    out.append(MaskRef(str(k), lambda s=segm, k=k: _rle_mask(s, json_path, f"[{k}].segmentation")))
  return tuple(out)


def from_sam(sam_dir: str, images_dir: str) -> list[Item]:
  if not os.path.isdir(sam_dir):
    raise ValueError(f"--sam-dir {sam_dir} is not a folder (segment-anything amg.py outputs)")
  if not os.path.isdir(images_dir):
    raise ValueError(f"--images {images_dir} is not a folder (the images the masks belong to)")
  names = sorted(f for f in os.listdir(sam_dir) if f.endswith(".json"))
  if not names:
    raise ValueError(f"{sam_dir}: no .json files (segment-anything amg.py --convert-to-rle writes one per image)")
  items = []
  for f in names:
    stem = f[:-len(".json")]
    img = find_image(images_dir, stem) or os.path.join(images_dir, stem)
    path = os.path.join(sam_dir, f)
    items.append(Item(os.path.basename(img), img, masks=lambda path=path: masks_of(path)))
  return items
