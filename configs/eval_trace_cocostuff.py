"""TRACE patch-token grounding on COCO-Stuff val2017 (TRACE slides: precision / recall / mIoU at
threshold 0.5).

For each caption word that names COCO-Stuff labels (feature `word_labels`, coco.py vocabulary), the
ground truth is the pixels of those labels in the stuffthingmaps label map; the model's word-to-patch
map ([0, 1]) is bilinearly upsampled to the original image, binarised at >= 0.5, and scored by
precision, recall and IoU (macro over grounded caption words; micro = pooled pixels).
Methods: 'trace' = the TRACE heatmap (13) of a TRACE model dir (<workdir>/model; words outside its vocabulary
are counted and skipped); 'clip' = patch-word cosine of any CLIP model dir (ln_post + proj on the
patch tokens vs the word's text embedding, min-max per map; trace_jax/trace/evaluate.py).
Data:  python -m trace_jax.data.real.coco --config stuff_val2017 --manual_dir ~/datasets/coco
Model: the model dir of `python train.py --config configs/trace.py --workdir ~/runs/trace`, or a
  CLIP baseline: trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16 with
  --config.eval.method.name=clip
Run:   python evaluate.py --config configs/eval_trace_cocostuff.py [--checkpoint DIR]
The slides give no layer / normalisation choice: those here are ours.
"""
from trace_jax.evaluation import real_config as rc


def get_config():
  return rc.base(
      'trace_grounding', 'TRACE (Nguyen & Nguyen, 2025) slides: precision / recall / mIoU @ 0.5',
      name='trace_coco', config='stuff_val2017', split='val2017', manual_dir='~/datasets/coco',
      checkpoint='~/runs/trace/model', convert='python train.py --config configs/trace.py --workdir ~/runs/trace',
      method=dict(name='trace'),     # 'trace' (TRACE model dir) | 'clip' (any CLIP model dir)
      image_size=224, metrics=('precision', 'recall', 'miou'),
      threshold=0.5)                 # image_size is replaced by the TRACE model's own for 'trace'
