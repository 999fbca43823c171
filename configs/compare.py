"""The comparison runs: plain contrastive vs AMC vs local alignment, same seed, data and budget.

    python compare.py --workdir runs/compare            # trains the three, evaluates, prints the table
    python train.py --config configs/compare.py:amc --workdir runs/compare/amc   # one of them

``get_config(arg)`` with arg in {contrastive, amc, local_alignment}; everything but the objective is
shared (model, data order, optimiser, steps, seed).
"""
from configs import common

NAMES = ("contrastive", "amc", "local_alignment")


def get_config(arg: str = "contrastive"):
  if arg not in NAMES:
    raise ValueError(f"compare config takes one of {NAMES}; got {arg!r}")
  c = common.get_config()
  c.seed = 0
  c.data.image_size = 64
  c.data.batch_size = 64
  c.model.preset = "small"
  c.loss.name = arg
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.train.steps = 1500
  c.train.log_every = 25
  c.checkpoint.every_steps = 250
  c.eval.methods = "gradcam,patch_similarity" + (",local_slots" if arg == "local_alignment" else "")
  c.eval.num_examples = 500
  return c
