"""CLIP contrastive + patch-wise local alignment with register tokens (λ_global = λ_local = 1)."""
from trace_jax.training.loop import default_config


def get_config():
  c = default_config()
  c.loss.name = "local_alignment"
  c.train.steps = 3000
  return c
