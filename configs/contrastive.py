"""Plain CLIP contrastive training on the embedded grounding data (the baseline of compare.py)."""
from trace_jax.training.loop import default_config


def get_config():
  c = default_config()
  c.loss.name = "contrastive"
  c.train.steps = 3000
  return c
