"""TRACE patch-token grounding on COCO-Stuff val2017 (TRACE slides: precision / recall / mIoU at
threshold 0.5).

For each caption word that names a COCO-Stuff label (feature `word_labels`, coco.py vocabulary), the
ground truth is the pixels of those labels in the stuffthingmaps label map; the model's word-to-patch
map is min-max normalised, upsampled to the image, binarised at 0.5, and scored by precision, recall
and IoU (averaged over grounded words).
Data:  python -m trace_jax.data.real.coco --config stuff_val2017 --manual_dir ~/datasets/coco
Model: a TRACE (CRATE image encoder) model dir written by the TRACE training config (issue 6), or a
  CLIP baseline: trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16
The slides give no layer / normalisation choice: those here are ours.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.eval = e = ml_collections.ConfigDict()
  e.task = 'token_grounding'
  e.paper = 'TRACE (Nguyen & Nguyen, 2025) slides: precision / recall / mIoU @ 0.5'
  e.dataset = ml_collections.ConfigDict(dict(
      name='trace_coco', config='stuff_val2017', split='val2017', manual_dir='~/datasets/coco',
      data_dir='~/tensorflow_datasets'))
  e.ground_truth = 'word_labels'    # (word index, label value) pairs; mask = isin(label_map, labels)
  e.checkpoint = '~/runs/trace/model'
  e.convert = 'python train.py --config configs/trace.py --workdir ~/runs/trace'
  e.method = ml_collections.ConfigDict(dict(name='trace', normalize='minmax', upsample='bilinear'))
  e.threshold = 0.5
  e.image_size = 224
  e.batch_size = 32
  e.metrics = ('precision', 'recall', 'miou')
  return c
