"""MaskInversion referring-expression retrieval on RefCOCO (UNC splits) (MaskInversion Table 1).

Per image: one LET per COCO instance mask of the image (ALL its instances are candidates); each
referring expression picks the mask whose LET has the highest cosine with its text embedding.
Metrics: Acc@1 (picked mask = the ref's annotation), mIoU and oIoU of the picked mask vs the GT mask.
Data:  python -m trace_jax.data.real.refcoco --config refcoco_unc --manual_dir ~/datasets/refer
Model: trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16
Settings: alpha = 5 for RefCOCO / RefCOCO+ (paper §4.1: global-context regularisation), AdamW,
10 iterations, 448 px. The paper does not name the split; 'val' here, 'testA' / 'testB' in `splits`.
"""
import ml_collections


def get_config(dataset_config='refcoco_unc', paper_column='RefCOCO'):
  c = ml_collections.ConfigDict()
  c.eval = e = ml_collections.ConfigDict()
  e.task = 'refexp_retrieval'
  e.paper = f'MaskInversion (Bousselham et al., 2025) Table 1, {paper_column}'
  e.dataset = ml_collections.ConfigDict(dict(
      name='trace_refcoco', config=dataset_config, split='val', splits=('val', 'testA', 'testB'),
      manual_dir='~/datasets/refer', data_dir='~/tensorflow_datasets'))
  e.candidates = 'all_image_masks'  # every COCO instance of the image (feature 'masks')
  e.text = 'sentences'              # REFER `sent` (lower-cased); 'sentences_raw' for the raw text
  e.checkpoint = '~/models/openai-vit-b-16'
  e.convert = 'trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16'
  e.method = ml_collections.ConfigDict(dict(
      name='maskinversion', explainability='legrad', iterations=10, optimizer='adamw', lr=0.5,
      weight_decay=0.0, alpha=5.0, gradient_decomposition=True))
  e.image_size = 448
  e.batch_size = 1
  e.metrics = ('acc@1', 'miou', 'oiou')
  return c
