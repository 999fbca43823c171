"""CLIP contrastive + patch-wise local alignment with register tokens (λ_global = λ_local = 1)."""
from configs import common


def get_config():
  c = common.get_config()
  c.loss.name = "local_alignment"
  c.train.steps = 3000
  return c
