"""MaskInversion class retrieval on PASCAL-Context val, 59 classes (MaskInversion Table 2, ViT-B/16 row).

Query = the mask of one class present in a val image (`label_map == c`, background 0 excluded); the
LET is matched against the 59 class prompts; Acc@1/5/10.
Data:  python -m trace_jax.data.real.voc --config context59 --manual_dir ~/datasets/pascal_context
Model: trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16
Run:   python evaluate.py --config configs/eval_maskinversion_context.py [--checkpoint DIR]
Settings: real_config.maskinversion_class_retrieval (as eval_maskinversion_voc.py).
"""
from trace_jax.evaluation import real_config as rc


def get_config():
  return rc.maskinversion_class_retrieval(
      'PascalContext', name='trace_voc', config='context59', split='val',
      manual_dir='~/datasets/pascal_context',
      query='class_mask',            # one query per class present: label_map == c
      class_names='metadata')        # builder.info.metadata['class_names'][1:] (59 classes)
