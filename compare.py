#!/usr/bin/env python
"""Comparisons at one seed and one budget, trained and evaluated in one command, printed as tables.

    python compare.py --workdir runs/compare [--seed 0] [--steps 1500] [--only amc,contrastive] [--set KEY=VALUE]
    python compare.py --suite trace --workdir runs/trace_compare --steps 300 [--budget-minutes 10] [--only clip,trace]

Suites (their configs: ``configs/compare.py`` and ``configs/trace_compare.py``):

* ``objectives`` (default): plain contrastive vs AMC vs local alignment. Columns: pointing game and
  patch mIoU with GradCAM (the map AMC trains) and with the dense patch-text similarity (the readout
  the local loss trains); local alignment also with its own slot readout. Writes ``compare.json``.
* ``finetune``: fine-tuning from a model dir on the embedded set: contrastive pretraining for
  ``--pretrain-steps`` and its export, then AMC for ``--steps`` from that export (``init_from``) and AMC
  for the same ``--steps`` from random weights; GradCAM pointing game and patch mIoU of both (and of the
  pretrained model). Writes ``finetune.json``.
* ``trace``: the CLIP baseline vs TRACE and its ablations on one CRATE tower (crate-clip-small, 10 heads
  of 16); only the loss weights differ. The budget is steps, the same for every run: ``--steps``, or
  ``--budget-minutes`` converted once by timing full TRACE on this machine. Evaluation on the test split
  (closed vocabulary) and the openvocab split (held-out words). Writes ``trace_compare.json`` / ``.md``.

Each run lives in ``<workdir>/<name>`` (resumable: re-running continues unfinished runs and skips
finished ones) and is evaluated from its exported model dir. See docs/training.md and docs/trace.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
SUITES = {"objectives": ("compare", "contrastive,amc,local_alignment"),
          "trace": ("trace_compare", "clip,trace,cluster_only,token_only"),
          "finetune": ("compare", "pretrain,amc_init_from,amc_scratch")}


def run_config(suite: str, name: str, seed: int, steps: int | None, overrides: dict[str, str]):
  import importlib
  from configs.common import apply_overrides
  c = importlib.import_module(f"configs.{SUITES[suite][0]}").get_config(name)
  c.seed = seed
  if steps is not None:
    c.train.steps = int(steps)
    if suite == "trace":
      c.optim.warmup_steps = min(int(c.optim.warmup_steps), max(int(steps) // 10, 1))
  return apply_overrides(c, overrides)


def time_step(config, n: int = 3) -> float:
  """Seconds per train step of ``config`` on this machine (after compilation)."""
  import jax
  from trace_jax import objectives
  from trace_jax.data import sources
  from trace_jax.training import mesh as mesh_lib, sharding as shd, state as state_lib, step as step_lib
  src = sources.make(config)
  task = objectives.make(config, src.info)
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  tx, sched = state_lib.make_optimizer(config.optim, 10)
  state, sh = state_lib.create_state(task.init_params, tx, mesh, config.seed)
  f = step_lib.jit_train_step(step_lib.make_train_step(task.loss_fn, tx, sched), sh, mesh)
  it = src.batches(0, patch_size=task.cfg.vision.patch_size)
  with jax.set_mesh(mesh):
    ts = []
    for _ in range(n + 1):
      gb = shd.global_batch({k: v for k, v in next(it).items() if k in src.keys}, mesh)
      t0 = time.perf_counter()
      state, m = f(state, gb)
      jax.block_until_ready(m["loss"])
      ts.append(time.perf_counter() - t0)
  return float(sorted(ts[1:])[len(ts[1:]) // 2])


# ---------------------------------------------------------------------------------------------- objectives

def objectives_table(rows: dict, seed: int) -> str:
  cols = [("gradcam", "pointing_game"), ("patch_similarity", "pointing_game"), ("gradcam", "patch_miou"),
          ("patch_similarity", "patch_miou"), ("local_slots", "patch_miou")]
  labels = [m + " " + k.replace("_game", "").replace("pointing", "PG") for m, k in cols]
  w = max(map(len, labels)) + 2          # every header keeps a gap to its neighbour
  head = f"{'model':<17}" + "".join(f"{label:>{w}}" for label in labels)
  lines = [f"seed {seed}, test split", head, "-" * len(head)]
  for name, r in rows.items():
    cells = [f"{100 * r[m][k]:>{w - 1}.1f}%" if m in r else f"{'-':>{w}}" for m, k in cols]
    lines.append(f"{name:<17}" + "".join(cells))
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- trace

def trace_table(results: list[dict], setting: str) -> str:
  from trace_jax.trace import evaluate as ev
  lines = [ev.TABLE_HEADER]
  for r in results:
    for key, res in r["results"].items():
      method, s = key.split("/")
      if s != setting:
        continue
      label = {"clip": "patch-word cosine, min-max", "trace": "TRACE heatmap (13)",
               "trace_minmax": "TRACE heatmap (13), min-max"}[method]
      lines.append(ev.format_row(f"{r['run']} / {label}", res))
  return "\n".join(lines)


def kind_table(results: list[dict]) -> str:
  from trace_jax.trace import evaluate as ev
  lines = ["| model / readout | " + " | ".join(f"{k} P / R / mIoU (n)" for k in ev.KINDS) + " |",
           "|---|" + "---|" * len(ev.KINDS)]
  pc = lambda v: "—" if v != v else f"{100 * v:.1f}"
  for r in results:
    for key, res in r["results"].items():
      method, s = key.split("/")
      if s != "closed":
        continue
      cells = []
      for k in ev.KINDS:
        x = res["by_kind"].get(k, {"tokens": 0})
        cells.append("—" if not x["tokens"] else
                     f"{pc(x['precision'])} / {pc(x['recall'])} / {pc(x['miou'])} ({x['tokens']})")
      lines.append(f"| {r['run']} / {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def finetune_suite(args, overrides: dict, steps: int | None) -> int:
  """Contrastive pretraining -> export -> AMC with init_from, against AMC from random weights."""
  import train
  from trace_jax import model_dir
  from trace_jax.evaluation import embedded
  rows, wd = {}, lambda n: os.path.join(args.workdir, n)
  pre = run_config("objectives", "contrastive", args.seed, args.pretrain_steps or steps, overrides)
  pre.eval.methods = "gradcam,patch_similarity"
  train.run(pre, wd("pretrain"))
  for name in ("pretrain", "amc_init_from", "amc_scratch"):
    c = pre
    if name != "pretrain":
      c = run_config("objectives", "amc", args.seed, steps, overrides)
      c.eval.methods = "gradcam,patch_similarity"
      if name == "amc_init_from":
        c.init_from = os.path.join(wd("pretrain"), "model")
        c.model.preset = None          # the architecture comes from the model dir
      train.run(c, wd(name))
    rows[name] = embedded.evaluate(c, model_dir.load(os.path.join(wd(name), "model")), os.path.join(wd(name), "eval"),
                                   verbose=False)["methods"]
  print(f"contrastive pretraining {pre.train.steps} steps; AMC {steps or 'default'} steps\n"
        + objectives_table(rows, args.seed))
  with open(os.path.join(args.workdir, "finetune.json"), "w") as f:
    json.dump({"seed": args.seed, "pretrain_steps": int(pre.train.steps), "results": rows}, f, indent=2)
  return 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--suite", default="objectives", choices=sorted(SUITES))
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--steps", type=int, default=None, help="override the shared step budget")
  ap.add_argument("--budget-minutes", type=float, default=None, help="trace suite: training minutes per run")
  ap.add_argument("--only", "--runs", dest="only", default=None, help="comma-separated runs of the suite")
  ap.add_argument("--num-examples", type=int, default=None, help="trace suite: evaluation examples per split")
  ap.add_argument("--pretrain-steps", type=int, default=None, help="finetune suite: contrastive pretraining steps")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override for every run, e.g. --set eval.num_examples=100 (repeatable)")
  args = ap.parse_args(argv)
  sys.path.insert(0, ROOT)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  import train
  from trace_jax import model_dir
  from trace_jax.evaluation import embedded
  overrides = dict(kv.split("=", 1) for kv in args.set)
  names = [n.strip() for n in (args.only or SUITES[args.suite][1]).split(",") if n.strip()]
  os.makedirs(args.workdir, exist_ok=True)
  steps = args.steps
  if args.suite == "objectives":
    rows = {}
    for name in names:
      c = run_config("objectives", name, args.seed, steps, overrides)
      wd = os.path.join(args.workdir, name)
      train.run(c, wd)
      rows[name] = embedded.evaluate(c, model_dir.load(os.path.join(wd, "model")), os.path.join(wd, "eval"),
                                     verbose=False)["methods"]
    print(objectives_table(rows, args.seed))
    with open(os.path.join(args.workdir, "compare.json"), "w") as f:
      json.dump({"seed": args.seed, "results": rows}, f, indent=2)
    return 0

  if args.suite == "finetune":
    return finetune_suite(args, overrides, steps)

  from trace_jax.trace import evaluate as te
  if steps is None:
    if args.budget_minutes is None:
      raise SystemExit("compare.py --suite trace: give --steps or --budget-minutes")
    sec = time_step(run_config("trace", "trace", args.seed, 10, overrides))
    steps = max(int(args.budget_minutes * 60 / sec), 10)
    print(f"[compare] TRACE step {sec:.2f} s -> {steps} steps per run ({args.budget_minutes} min)", flush=True)
  results = []
  for name in names:
    print(f"[compare] run {name}: {steps} steps, seed {args.seed}", flush=True)
    c = run_config("trace", name, args.seed, steps, overrides)
    wd = os.path.join(args.workdir, name)
    t0 = time.perf_counter()
    train.run(c, wd)
    out = {"run": name, "steps": int(c.train.steps), "train_seconds": time.perf_counter() - t0}
    methods = ("clip",) if name == "clip" else ("trace", "trace_minmax", "clip")
    out["results"] = te.run(c, model_dir.load(os.path.join(wd, "model")), None, methods=methods,
                            num_examples=args.num_examples, verbose=False)
    results.append(out)
    with open(os.path.join(args.workdir, "trace_compare.json"), "w") as f:
      json.dump({"seed": args.seed, "steps": steps, "argv": sys.argv, "runs": results}, f, indent=1)
  md = (f"steps {steps} per run, seed {args.seed}, batch 64, crate-clip-small (10 heads x 16)\n\n"
        f"Closed vocabulary (test split):\n\n{trace_table(results, 'closed')}\n\n"
        f"Open vocabulary (openvocab split, held-out words only):\n\n{trace_table(results, 'open')}\n\n"
        f"By word kind (closed):\n\n{kind_table(results)}\n")
  with open(os.path.join(args.workdir, "trace_compare.md"), "w") as f:
    f.write(md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
