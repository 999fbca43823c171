"""MaskInversion referring-expression retrieval on RefCOCO+ (UNC splits) (MaskInversion Table 1).
Same protocol and settings as eval_maskinversion_refcoco.py (alpha = 5).
Data:  python -m trace_jax.data.real.refcoco --config refcocoplus_unc --manual_dir ~/datasets/refer
Run:   python evaluate.py --config configs/eval_maskinversion_refcocoplus.py [--checkpoint DIR]
"""
from trace_jax.evaluation import real_config as rc


def get_config():
  return rc.maskinversion_referring_retrieval('refcocoplus_unc', 'RefCOCO+')
