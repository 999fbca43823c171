"""Plain CLIP contrastive training on the embedded grounding data (the baseline of compare.py)."""
from configs import common


def get_config():
  c = common.get_config()
  c.loss.name = "contrastive"
  c.train.steps = 3000
  return c
