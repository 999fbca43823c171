"""AMC pointing game on RefCOCO+ testA / testB (AMC paper Table 1).

One query per referring expression (REFER `sent`); GT = the ref's annotation box; heatmap at 384 px
(24 x 24 map for /16; position embeddings interpolated from the 256-px model), bicubic to the
original size, first row-major argmax; hit iff strictly inside the box (x1 < x < x1 + w,
y1 < y < y1 + h, no tolerance) (notes/amc-and-local-alignment.md §7).
Data:  python -m trace_jax.data.real.refcoco --config refcocoplus_unc --manual_dir ~/datasets/refer
Model: as eval_amc_flickr30k.py (AMC-finetuned CLIP from configs/amc.py).
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.eval = e = ml_collections.ConfigDict()
  e.task = 'pointing_game'
  e.paper = 'AMC (Yang et al., CVPR 2023) Table 1: RefCOCO+ testA / testB'
  e.dataset = ml_collections.ConfigDict(dict(
      name='trace_refcoco', config='refcocoplus_unc', split='testA', splits=('testA', 'testB'),
      manual_dir='~/datasets/refer', data_dir='~/tensorflow_datasets'))
  e.text = 'sentences'
  e.hit = 'strictly_inside'         # the ref box (feature 'ref_boxes')
  e.checkpoint = '~/runs/amc/model'
  e.convert = 'python train.py --config configs/amc.py --workdir ~/runs/amc'
  e.method = ml_collections.ConfigDict(dict(
      name='gradcam', layer=-1, target='similarity', grad_relu='before_product', head_mean=True,
      upsample='bicubic', normalize=False))
  e.image_size = 384
  e.pos_interp = 'torch_bicubic'
  e.batch_size = 32
  e.metrics = ('pointing_accuracy',)
  return c
