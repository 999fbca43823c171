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
import importlib.util
import os


def _base():
  spec = importlib.util.spec_from_file_location('base_eval', os.path.join(os.path.dirname(__file__), 'base_eval.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def get_config(dataset_config='refcoco_unc', paper_column='RefCOCO'):
  b = _base()
  return b.base(
      'referring_retrieval', f'MaskInversion (Bousselham et al., 2025) Table 1, {paper_column}',
      name='trace_refcoco', config=dataset_config, split='val', splits=('val', 'testA', 'testB'),
      manual_dir='~/datasets/refer', checkpoint=b.MODEL_OPENAI_B16, convert=b.CONVERT_OPENAI_B16,
      method=b.maskinversion_method(5.0), image_size=448,
      metrics=('acc@1', 'acc@5', 'acc@10', 'miou', 'oiou'),
      candidates='all_image_masks',  # every COCO instance of the image (feature 'masks')
      text='sentences',              # REFER `sent` (lower-cased); 'sentences_raw' for the raw text
      baselines='')
