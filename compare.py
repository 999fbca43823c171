#!/usr/bin/env python
"""Train plain contrastive, AMC and local-alignment models with the same seed and budget, evaluate
each on the test split and print one table.

    python compare.py --workdir runs/compare [--seed 0] [--steps 1500] [--only amc,contrastive] [--set KEY=VALUE]

Each run lives in ``<workdir>/<name>`` (resumable: re-running continues unfinished runs and skips
finished ones). Columns: pointing game and patch mIoU with GradCAM (the map AMC trains) and with the
dense patch-text similarity (the readout the local loss trains); local alignment also with its own
slot readout. Writes ``<workdir>/compare.json``. See docs/training.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def _config(name: str, seed: int, steps: int | None, overrides: dict[str, str]):
  spec = importlib.util.spec_from_file_location("compare_config", os.path.join(ROOT, "configs", "compare.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(name)
  c.seed = seed
  if steps is not None:
    c.train.steps = steps
  from trace_jax.training.loop import apply_overrides
  return apply_overrides(c, overrides)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--steps", type=int, default=None, help="override the shared step budget")
  ap.add_argument("--only", default="contrastive,amc,local_alignment")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override for every run, e.g. --set eval.num_examples=100 (repeatable)")
  args = ap.parse_args(argv)
  sys.path.insert(0, ROOT)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  import evaluate
  from trace_jax.training.loop import train
  rows = {}
  for name in [n.strip() for n in args.only.split(",") if n.strip()]:
    c = _config(name, args.seed, args.steps, dict(kv.split("=", 1) for kv in args.set))
    wd = os.path.join(args.workdir, name)
    train(c, wd)
    rows[name] = evaluate.evaluate(c, wd, os.path.join(wd, "eval"), verbose=False)["methods"]
  cols = [("gradcam", "pointing_game"), ("patch_similarity", "pointing_game"), ("gradcam", "patch_miou"),
          ("patch_similarity", "patch_miou"), ("local_slots", "patch_miou")]
  head = f"{'model':<17}" + "".join(f"{(m + ' ' + k.replace('_game', '').replace('pointing', 'PG')):>26}" for m, k in cols)
  lines = [f"seed {args.seed}, test split", head, "-" * len(head)]
  for name, r in rows.items():
    cells = [f"{100 * r[m][k]:>25.1f}%" if m in r else f"{'-':>26}" for m, k in cols]
    lines.append(f"{name:<17}" + "".join(cells))
  print("\n".join(lines))
  with open(os.path.join(args.workdir, "compare.json"), "w") as f:
    json.dump({"seed": args.seed, "results": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
