"""CLIP contrastive + Attention Mask Consistency (AMC eq. 4-9) on the phrase box masks.

GradCAM of the phrase-image cosine at the last ViT block (``loss.amc.layer``); Δ1 = 0.1, Δ2 = 0.5,
λ1 = 0.2, λ2 = 0.8; L_mean pooled over the batch as the authors' code (``mean_pooling='sample'``
for paper eq. 7).
"""
from configs import common


def get_config():
  c = common.get_config()
  c.loss.name = "amc"
  c.train.steps = 3000
  return c
