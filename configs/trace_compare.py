"""TRACE vs the CLIP baseline and the ablations: same tower, data order, optimiser, steps and seed.

    python compare.py --suite trace --budget-minutes 10 --seed 0 --workdir runs/trace_compare
    python train.py --config configs/trace_compare.py:cluster_only --workdir runs/tc/cluster_only   # one run

``get_config(arg)``, arg in RUNS:
  clip          L_clip only (w_cluster = w_anchor = w_token = 0): the contrastive baseline, CRATE tower
  trace         L_clip + L_cluster + L_anchor + L_token (docs/trace.md (12))
  cluster_only  L_clip + L_cluster + L_anchor (w_token = 0)
  token_only    L_clip + L_token (w_cluster = w_anchor = 0; heatmaps without the coarse gate)
"""
from configs import trace as trace_config

RUNS = ("clip", "trace", "cluster_only", "token_only")


def get_config(arg: str = "trace"):
  if arg not in RUNS:
    raise ValueError(f"trace_compare config takes one of {RUNS}; got {arg!r}")
  c = trace_config.get_config()
  c.seed = 0
  c.data.image_size = 64
  c.data.batch_size = 64
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.train.steps = 600
  c.train.log_every = 25
  c.checkpoint.every_steps = 0          # the final state only (short runs)
  c.checkpoint.async_save = False
  t = c.loss.trace
  if arg == "clip":
    t.w_cluster = t.w_anchor = t.w_token = 0.0
  elif arg == "cluster_only":
    t.w_token = 0.0
  elif arg == "token_only":
    t.w_cluster = t.w_anchor = 0.0
    t.gate = False
  return c
