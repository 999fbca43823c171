"""MaskInversion class retrieval on COCO 2017 val (MaskInversion paper Table 2, COCO column).

Query = one instance mask (non-crowd annotations of instances_val2017.json); the LET is matched
against the 80 category prompts; Acc@1/5/10. (Table 4 ablations: `query='box'` uses the instance box.)
Data:  python -m trace_jax.data.real.coco --config instances_val2017 --manual_dir ~/datasets/coco
Model: trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16
Settings as eval_maskinversion_voc.py (alpha = 0 for class retrieval).
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.eval = e = ml_collections.ConfigDict()
  e.task = 'class_retrieval'
  e.paper = 'MaskInversion (Bousselham et al., 2025) Table 2, COCO'
  e.dataset = ml_collections.ConfigDict(dict(
      name='trace_coco', config='instances_val2017', split='val2017', manual_dir='~/datasets/coco',
      data_dir='~/tensorflow_datasets'))
  e.query = 'instance_mask'         # 'instance_mask' | 'box' (Table 4); crowd annotations skipped
  e.skip_crowd = True
  e.class_names = 'metadata'        # builder.info.metadata['categories'] (80 COCO categories)
  e.prompt_templates = ('a photo of a {}.',)
  e.checkpoint = '~/models/openai-vit-b-16'
  e.convert = 'trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16'
  e.method = ml_collections.ConfigDict(dict(
      name='maskinversion', explainability='legrad', iterations=10, optimizer='adamw', lr=0.5,
      weight_decay=0.0, alpha=0.0, gradient_decomposition=True))
  e.image_size = 448
  e.batch_size = 1
  e.metrics = ('acc@1', 'acc@5', 'acc@10')
  return c
