"""Train the CLIP baseline, TRACE and its ablations with the same seed and budget; evaluate; print a table.

    python -m trace_jax.trace.compare --budget-minutes 10 --seed 0 --workdir runs/trace_compare
    python -m trace_jax.trace.compare --steps 400 --seed 0 --workdir runs/trace_compare --runs clip,trace

The runs are ``configs/trace_compare.py`` (clip, trace, cluster_only, token_only): one CRATE tower
(crate-clip-small, 10 heads of 16), one data order, one optimiser; only the loss weights differ.
The budget is steps, the same for every run: ``--steps``, or ``--budget-minutes`` converted once by
timing the most expensive objective (full TRACE) on this machine. Training is ``loop.train`` (resumable
per run directory, ``<workdir>/<run>``); evaluation is ``trace_jax.trace.evaluate`` on the test split
(closed vocabulary) and the openvocab split (held-out words). Writes ``<workdir>/trace_compare.json``
and ``trace_compare.md``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_config(name: str, seed: int, steps: int | None = None, overrides: dict | None = None):
  spec = importlib.util.spec_from_file_location("trace_compare_config",
                                                os.path.join(ROOT, "configs", "trace_compare.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(name)
  c.seed = seed
  if steps is not None:
    c.train.steps = int(steps)
    c.optim.warmup_steps = min(int(c.optim.warmup_steps), max(int(steps) // 10, 1))
  from trace_jax.training.loop import apply_overrides
  apply_overrides(c, overrides or {})
  return c


def time_step(config, n: int = 3) -> float:
  """Seconds per train step of ``config`` on this machine (after compilation)."""
  import jax
  from trace_jax.trace.task import make_trace_task
  from trace_jax.training import loop, mesh as mesh_lib, sharding as shd, state as state_lib, step as step_lib
  batches, info = loop.make_data(config)
  task = make_trace_task(config, info)
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  tx, sched = state_lib.make_optimizer(config.optim, 10)
  state, sh = state_lib.create_state(task.init_params, tx, mesh, config.seed)
  f = step_lib.jit_train_step(step_lib.make_train_step(task.loss_fn, tx, sched), sh, mesh)
  it = batches(0)
  with jax.set_mesh(mesh):
    ts = []
    for k in range(n + 1):
      gb = shd.global_batch({k: v for k, v in next(it).items() if k in step_lib.BATCH_KEYS}, mesh)
      t0 = time.perf_counter()
      state, m = f(state, gb)
      jax.block_until_ready(m["loss"])
      ts.append(time.perf_counter() - t0)
  return float(sorted(ts[1:])[len(ts[1:]) // 2])


def train_and_evaluate(name: str, config, workdir: str, num_examples: int | None = None) -> dict:
  import jax
  from trace_jax.trace import evaluate as ev
  from trace_jax.trace.task import make_trace_task
  from trace_jax.training import loop
  rundir = os.path.join(workdir, name)
  t0 = time.perf_counter()
  state = loop.train(config, rundir)
  train_s = time.perf_counter() - t0
  task = make_trace_task(config)
  params = jax.device_get(state.params)
  out = {"run": name, "steps": int(config.train.steps), "train_seconds": train_s, "results": {}}
  methods = ("clip",) if name == "clip" else ("trace", "clip")
  for setting, split in ev.SETTINGS.items():
    src = ev.load_source(config, split)
    for method in methods:
      r = ev.evaluate(task, params, src, method=method, setting=setting, num_examples=num_examples)
      out["results"][f"{method}/{setting}"] = r
  return out


def table(results: list[dict], setting: str) -> str:
  from trace_jax.trace import evaluate as ev
  lines = [ev.TABLE_HEADER]
  for r in results:
    for key, res in r["results"].items():
      method, s = key.split("/")
      if s != setting:
        continue
      label = {"clip": "patch-word cosine, min-max", "trace": "TRACE heatmap (13)"}[method]
      lines.append(ev.format_row(f"{r['run']} / {label}", res))
  return "\n".join(lines)


def kind_table(results: list[dict]) -> str:
  from trace_jax.trace import evaluate as ev
  lines = ["| model / readout | " + " | ".join(f"{k} P / R / mIoU (n)" for k in ev.KINDS) + " |",
           "|---|" + "---|" * len(ev.KINDS)]
  for r in results:
    for key, res in r["results"].items():
      method, s = key.split("/")
      if s != "closed":
        continue
      cells = []
      for k in ev.KINDS:
        x = res["by_kind"].get(k, {"tokens": 0})
        pc = lambda v: "—" if v != v else f"{100 * v:.1f}"
        cells.append("—" if not x["tokens"] else
                     f"{pc(x['precision'])} / {pc(x['recall'])} / {pc(x['miou'])} ({x['tokens']})")
      lines.append(f"| {r['run']} / {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--budget-minutes", type=float, default=None, help="training minutes per run (-> steps)")
  ap.add_argument("--steps", type=int, default=None, help="steps per run (overrides --budget-minutes)")
  ap.add_argument("--runs", default="clip,trace,cluster_only,token_only")
  ap.add_argument("--num-examples", type=int, default=None, help="evaluation examples per split (default all)")
  ap.add_argument("--set", action="append", default=[], help="config override key=value (every run)")
  a = ap.parse_args(argv)
  os.makedirs(a.workdir, exist_ok=True)
  overrides = dict(kv.split("=", 1) for kv in a.set)
  steps = a.steps
  if steps is None:
    if a.budget_minutes is None:
      raise SystemExit("give --steps or --budget-minutes")
    sec = time_step(run_config("trace", a.seed, 10, overrides))
    steps = max(int(a.budget_minutes * 60 / sec), 10)
    print(f"[compare] TRACE step {sec:.2f} s -> {steps} steps per run ({a.budget_minutes} min)", flush=True)
  results = []
  for name in a.runs.split(","):
    print(f"[compare] run {name}: {steps} steps, seed {a.seed}", flush=True)
    r = train_and_evaluate(name, run_config(name, a.seed, steps, overrides), a.workdir, a.num_examples)
    results.append(r)
    with open(os.path.join(a.workdir, "trace_compare.json"), "w") as f:
      json.dump({"seed": a.seed, "steps": steps, "argv": sys.argv, "runs": results}, f, indent=1)
  md = (f"steps {steps} per run, seed {a.seed}, batch 64, crate-clip-small (10 heads x 16)\n\n"
        f"Closed vocabulary (test split):\n\n{table(results, 'closed')}\n\n"
        f"Open vocabulary (openvocab split, held-out words only):\n\n{table(results, 'open')}\n\n"
        f"By word kind (closed):\n\n{kind_table(results)}\n")
  with open(os.path.join(a.workdir, "trace_compare.md"), "w") as f:
    f.write(md)
  print(md)
  return results


if __name__ == "__main__":
  main()
