"""MaskInversion class retrieval on PASCAL VOC 2012 (MaskInversion paper Table 2, ViT-B/16 row).

Query = the mask of one class present in a val image (`label_map == c`, void 255 excluded); the
localized embedding (LET) is matched against the 20 class prompts; Acc@1/5/10.
Data:  python -m trace_jax.data.real.voc --config voc2012 --manual_dir ...  (docs/datasets.md)
Model: trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16
Settings (notes/legrad-maskinversion.md §MaskInversion 8): AdamW, 10 iterations, alpha = 0 (no
regularisation for class retrieval), LeGrad explainability, 448 px input (paper), lr 0.5 (upstream
README / examples; the code default is 0.1 and the paper states none).
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.eval = e = ml_collections.ConfigDict()
  e.task = 'class_retrieval'
  e.paper = 'MaskInversion (Bousselham et al., 2025) Table 2, PascalVOC'
  e.dataset = ml_collections.ConfigDict(dict(
      name='trace_voc', config='voc2012', split='val', manual_dir='~/datasets/pascal_voc',
      data_dir='~/tensorflow_datasets'))
  e.query = 'class_mask'            # one query per class present: label_map == c (255 = void ignored)
  e.class_names = 'metadata'        # builder.info.metadata['class_names'][1:] (20 classes, no background)
  e.prompt_templates = ('a photo of a {}.',)
  e.checkpoint = '~/models/openai-vit-b-16'
  e.convert = 'trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16'
  e.method = ml_collections.ConfigDict(dict(
      name='maskinversion', explainability='legrad', iterations=10, optimizer='adamw', lr=0.5,
      weight_decay=0.0, alpha=0.0, gradient_decomposition=True))
  e.image_size = 448
  e.batch_size = 1                  # images; all query masks of an image are inverted together
  e.metrics = ('acc@1', 'acc@5', 'acc@10')
  return c
