"""AMC pointing game on RefCOCO+ testA / testB (AMC paper Table 1).

One query per referring expression (REFER `sent`); GT = the ref's annotation box; heatmap at 384 px
(24 x 24 map for /16; position embeddings interpolated from the 256-px model), bicubic to the
original size, first row-major argmax; hit iff strictly inside the box (x1 < x < x1 + w,
y1 < y < y1 + h, no tolerance) (notes/amc-and-local-alignment.md §7).
Data:  python -m trace_jax.data.real.refcoco --config refcocoplus_unc --manual_dir ~/datasets/refer
Model: as eval_amc_flickr30k.py (AMC-finetuned CLIP from configs/amc.py).
Run:   python evaluate.py --config configs/eval_amc_refcocoplus.py --config.eval.dataset.split=testB
"""
from trace_jax.evaluation import real_config as rc


def get_config():
  return rc.base(
      'pointing_game', 'AMC (Yang et al., CVPR 2023) Table 1: RefCOCO+ testA / testB',
      name='trace_refcoco', config='refcocoplus_unc', split='testA', splits=('testA', 'testB'),
      manual_dir='~/datasets/refer', checkpoint='~/runs/amc/model',
      convert='python train.py --config configs/amc.py --workdir ~/runs/amc',
      method=rc.amc_gradcam(), image_size=384,
      pos_interp='torch_bicubic', metrics=('pointing_accuracy',),
      text='sentences',              # one query per sentence; GT = the ref box (feature 'ref_boxes')
      per_category='')
