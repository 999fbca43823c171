"""The README main job: a small CLIP trained with contrastive + AMC on the embedded 64 px data,
sized to train and evaluate on 2 CPU cores in well under 15 minutes.

    python train.py --config configs/demo.py --workdir /tmp/trace_demo
    python evaluate.py --config configs/demo.py --checkpoint /tmp/trace_demo
"""
from configs import common


def get_config():
  c = common.get_config()
  c.seed = 0
  c.data.image_size = 64
  c.data.batch_size = 32
  c.model.preset = "small"            # ViT 4 x 128 (patch 8: 8 x 8 grid), text 3 x 128
  c.loss.name = "amc"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.train.steps = 400
  c.train.log_every = 10
  c.checkpoint.every_steps = 100
  c.eval.methods = "gradcam,patch_similarity"
  c.eval.num_examples = 500
  return c
