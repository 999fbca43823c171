"""MaskInversion class retrieval on COCO 2017 val (MaskInversion Table 2, COCO column).

Query = one non-crowd instance mask of instances_val2017.json; the LET is matched against the 80
category prompts; Acc@1/5/10. (Table 4 ablation: `--config.eval.query=box` uses the instance box.)
Data:  python -m trace_jax.data.real.coco --config instances_val2017 --manual_dir ~/datasets/coco
Model: trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16
Run:   python evaluate.py --config configs/eval_maskinversion_coco.py [--checkpoint DIR]
Settings: real_config.maskinversion_class_retrieval (as eval_maskinversion_voc.py).
"""
from trace_jax.evaluation import real_config as rc


def get_config():
  return rc.maskinversion_class_retrieval(
      'COCO', name='trace_coco', config='instances_val2017', split='val2017',
      manual_dir='~/datasets/coco',
      query='instance_mask',         # 'instance_mask' | 'box' (Table 4); crowd annotations skipped
      class_names='metadata')        # builder.info.metadata['categories'] (80 COCO categories, id order)
