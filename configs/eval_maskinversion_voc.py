"""MaskInversion class retrieval on PASCAL VOC 2012 val (MaskInversion paper Table 2, ViT-B/16 row).

Query = the mask of one class present in a val image (`label_map == c`, void 255 excluded); the
localized embedding (LET) is matched against the 20 class prompts; Acc@1/5/10.
Data:  python -m trace_jax.data.real.voc --config voc2012 --manual_dir ~/datasets/pascal_voc
Model: trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16
Run:   python evaluate.py --config configs/eval_maskinversion_voc.py [--checkpoint DIR] [--out DIR]
Settings: real_config.maskinversion_class_retrieval (AdamW, 10 iterations, alpha 0, lr 0.5, 448 px).
Baselines of Table 2: --config.eval.baselines=cls,crop,masked_crop,red_circle,fgvp
"""
from trace_jax.evaluation import real_config as rc


def get_config():
  return rc.maskinversion_class_retrieval(
      'PascalVOC', name='trace_voc', config='voc2012', split='val', manual_dir='~/datasets/pascal_voc',
      query='class_mask',            # one query per class present: label_map == c (255 = void ignored)
      class_names='metadata')        # builder.info.metadata['class_names'][1:] (20 classes, no background)
