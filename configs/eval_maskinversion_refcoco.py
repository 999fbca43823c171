"""MaskInversion referring-expression retrieval on RefCOCO (UNC splits) (MaskInversion Table 1).

Per image: one LET per COCO instance mask of the image (ALL its instances are candidates); each
referring expression picks the mask whose LET has the highest cosine with its text embedding.
Metrics (trace_jax.evaluation.retrieval): Acc@1/5/10 (rank of the ref's annotation), mIoU and oIoU
of the picked mask vs the GT mask at the original resolution.
Data:  python -m trace_jax.data.real.refcoco --config refcoco_unc --manual_dir ~/datasets/refer
Model: trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16
Run:   python evaluate.py --config configs/eval_maskinversion_refcoco.py [--checkpoint DIR]
Settings: alpha = 5 for RefCOCO / RefCOCO+ (paper §4.1: global-context regularisation), AdamW,
10 iterations, 448 px. The paper does not name the split; 'val' here ('testA' / 'testB':
--config.eval.dataset.split=testA). Baselines of Table 1:
--config.eval.baselines=cls,crop,masked_crop,red_circle,fgvp
"""
from trace_jax.evaluation import real_config as rc


def get_config():
  return rc.maskinversion_referring_retrieval('refcoco_unc', 'RefCOCO')
