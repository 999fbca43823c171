"""MaskInversion referring-expression retrieval on RefCOCO+ (UNC splits) (MaskInversion Table 1).
Same protocol and settings as eval_maskinversion_refcoco.py (alpha = 5).
Data:  python -m trace_jax.data.real.refcoco --config refcocoplus_unc --manual_dir ~/datasets/refer
Run:   python evaluate.py --config configs/eval_maskinversion_refcocoplus.py [--checkpoint DIR]
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'eval_maskinversion_refcoco', os.path.join(os.path.dirname(__file__), 'eval_maskinversion_refcoco.py'))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  return _base.get_config('refcocoplus_unc', 'RefCOCO+')
