"""TRACE (docs/trace.md): a CRATE-tower dual encoder trained on the embedded data with
L = L_clip(captions) + L_cluster + L_anchor + L_token, from image-caption pairs only.

    python train.py --config configs/trace.py --workdir runs/trace
    python evaluate.py --config configs/trace.py --checkpoint runs/trace     # grounding P / R / mIoU, purity

Ablations are overrides: cluster-level only ``--config.loss.trace.w_token=0``; token-level only
``--config.loss.trace.w_cluster=0 --config.loss.trace.w_anchor=0 --config.loss.trace.gate=False``;
the CLIP baseline (same tower) sets all three TRACE weights to 0.
"""
from configs import common


def get_config():
  c = common.get_config()
  c.loss.name = "trace"
  # crate-clip-small (64 px, patch 8, width 128, 4 layers) with 10 heads of width 16: two subspaces per
  # coarse concept of the embedded data (5 coarse concepts; g(k) = floor(k C / K), docs/trace.md §3.1).
  c.model.preset = "crate-clip-small"
  c.model.vision_heads = 10
  c.model.crate_dim_head = 16
  c.train.steps = 3000
  return c
