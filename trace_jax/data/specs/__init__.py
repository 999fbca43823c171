"""Dataset SPECs of the dataset-scale commands (``trace-jax invert | explain | embed``), read into
``Item``s: one per image, cheap to list (every process lists them all and takes its shards), its
pixels, masks and prompts loaded only when its shard is computed. Data knows no model.

  from_csv(path, second)          csv_rows.py   ``image,mask`` / ``image,text`` / ``image`` rows
  from_folder(folder, texts)      csv_rows.py   a folder of images (each with the given prompts)
  from_coco(json, images)         coco_json.py  COCO annotation file + image folder (polygons, RLE)
  from_sam(folder, images)        sam_json.py   segment-anything amg.py ``--convert-to-rle`` outputs
  from_tfds(name_split, data_dir) tfds_split.py a built tfds dataset (array_record, no TensorFlow)

Shapes: a mask loads as float32 [H, W] in [0, 1] (a ``.npy`` may hold [K, H, W]), at its own
resolution (MaskInversion resizes its map to the mask, notes/legrad-maskinversion.md step 6).
"""
from trace_jax.data.specs.base import IMAGE_EXTS, Item, MaskRef, find_image, list_images, read_mask_file
from trace_jax.data.specs.coco_json import from_coco
from trace_jax.data.specs.csv_rows import from_csv, from_folder, read_csv
from trace_jax.data.specs.sam_json import from_sam
from trace_jax.data.specs.tfds_split import from_tfds

__all__ = ["IMAGE_EXTS", "Item", "MaskRef", "find_image", "list_images", "read_mask_file", "from_coco",
           "from_csv", "from_folder", "read_csv", "from_sam", "from_tfds"]
