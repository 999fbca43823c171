#!/usr/bin/env python
"""The #18 table of benchmarks/RESULTS.md: compiled TPU plans (``trace-jax plan``) of CLIP training steps.

    nice -n 15 python benchmarks/plan_table.py [--budget-s 1800] [--rows 0,1,4] [--search] [--wide] [--tools] \
        [--cache benchmarks/plan_table.jsonl]

Rows: ViT-B/16, ViT-L/14, ViT-H/14 CLIP x contrastive / AMC x v5e-256 (v5e:16x16, 256 chips) / v5p-128
(v5p:4x4x4: 64 chips, 128 TensorCores; v5p slice names count cores), global batch 32768, bfloat16
compute, remat=block, explicit attention, mesh 1 x chips x 1 (every chip an fsdp shard). Each row is
one compile of the real train step (training/plan.py; minutes on a 2-core host), appended to the cache
as soon as it is done, so a re-run skips the rows it has; ``--budget-s`` starts no new row after that
many seconds. ``--search`` then runs ``trace-jax plan --search`` (cli/plan.search) over a narrow space
(``SEARCH``) for the rows that have a plan, and records the fastest plan that fits; each compiled
cell is cached too, so a killed search resumes without recompiling it (nor the row's own plan). Prints the Markdown
table (rows not run say so). ``--flops`` adds to every cached plan the jaxpr FLOP counts (model /
hardware, training/flops.py; tracing only) that the step times and MFU bounds are computed from. ``--wide``: one row (``WIDE_ROW``) searched
beyond that space (``WIDE``: tensor > 1, fused attention, microbatches). ``--tools``: one step (``TOOLS_ROW``) compiled once per memory / speed
tool, each alone (``TOOLS``), to show what each saves. Compiled estimates, not measurements
(docs/scaling.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BATCH = 32768
TOPOLOGIES = {"v5e-256": "v5e:16x16", "v5p-128": "v5p:4x4x4"}
PRESETS = {"ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-H/14": "ViT-H-14"}
CONFIGS = {"contrastive": "configs/contrastive.py", "AMC": "configs/amc.py"}
# Order: the ViT-B/16 rows, then the goal (ViT-L/14 + AMC on v5e-256), then the rest.
ROWS = [("ViT-B/16", "contrastive", "v5e-256"), ("ViT-B/16", "AMC", "v5e-256"),
        ("ViT-B/16", "contrastive", "v5p-128"), ("ViT-B/16", "AMC", "v5p-128"),
        ("ViT-L/14", "AMC", "v5e-256"), ("ViT-L/14", "contrastive", "v5e-256"),
        ("ViT-L/14", "contrastive", "v5p-128"), ("ViT-L/14", "AMC", "v5p-128"),
        ("ViT-H/14", "contrastive", "v5e-256"), ("ViT-H/14", "AMC", "v5e-256"),
        ("ViT-H/14", "contrastive", "v5p-128"), ("ViT-H/14", "AMC", "v5p-128")]
TOOL = dict(remat="block", attention="explicit", microbatches=1)
# --tools: what each memory / speed tool changes, one at a time against the default step (docs/scaling.md):
# ViT-B/16 contrastive, bf16, global batch 2048 on v5e:4x4 (16 chips, 128 rows per chip as in ROWS on v5e-256), mesh 1 x 16 x 1
TOOLS_ROW = ("ViT-B/16", "contrastive", "v5e:4x4", 2048)
TOOLS = {"default": ({}, []), "remat=block": ({"remat": "block"}, []),
         "remat=dots_with_no_batch_dims_saveable": ({"remat": "dots_with_no_batch_dims_saveable"}, []),
         "scan_layers": ({}, ["model.scan_layers=True"]), "microbatches=4": ({"microbatches": 4}, []),
         "attention=fused": ({"attention": "fused"}, []),
         # scan_layers is meant with remat (alone its scanned body keeps every layer's residuals): its
         # XLA cost is remat=block's plain step, taken from that row's cached plan (no second compile)
         "scan_layers + remat=block": ({"remat": "block"}, ["model.scan_layers=True"])}
COST_PLAN = {"scan_layers + remat=block": "remat=block"}
# --search: fsdp-heavy meshes (pure fsdp, and data x 16-way fsdp) x the two remat policies that save most
SEARCH = dict(remats=("block", "dots_with_no_batch_dims_saveable"), attentions=("explicit",), microbatches=(1,))

# --wide: one row (ViT-B/16 AMC on v5p-128: the quickest AMC row to compile, ~4 min a cell here) searched
# beyond SEARCH, in three sub-spaces rather than their full product (48 cells): meshes with tensor > 1
# and a data-heavy one (both remat policies), then fused attention and microbatches = 2 on the two
# meshes SEARCH compared. Cached under their own key ("wide | <row>"): the main tables do not change.
WIDE_ROW = ("ViT-B/16", "AMC", "v5p-128")
WIDE = [dict(meshes=[(4, 8, 2), (1, 32, 2), (2, 8, 4), (16, 4, 1)], remats=SEARCH["remats"],
             attentions=("explicit",), microbatches=(1,)),
        dict(meshes=[(1, 64, 1), (4, 16, 1)], remats=SEARCH["remats"], attentions=("fused",), microbatches=(1,)),
        dict(meshes=[(1, 64, 1), (4, 16, 1)], remats=SEARCH["remats"], attentions=("explicit",), microbatches=(2,))]


def _sets(preset: str) -> list[str]:
  return [f"model.preset={PRESETS[preset]}", "model.image_size=224", "model.dtype=bfloat16"]


def _key(row) -> str:
  return " | ".join(row)


def _load(cache: str) -> dict:
  out = {}
  if os.path.exists(cache):
    with open(cache) as f:
      for line in f:
        try:
          r = json.loads(line)
        except ValueError:   # a line cut by a kill mid-write
          continue
        out[(r["key"], r["kind"])] = r
  return out


def _append(cache: str, rec: dict) -> None:
  with open(cache, "a") as f:
    f.write(json.dumps(rec) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _tflops(p: dict) -> str:
  """model / hardware TFLOP per chip (jaxpr counts, training/flops.py), or '—' before ``--flops``."""
  if not p.get("hw_flops_per_chip"):
    return "—"
  return f"{p['model_flops_per_chip'] / 1e12:.2f} / {p['hw_flops_per_chip'] / 1e12:.2f}"


def _cell(p: dict | None) -> list[str]:
  if p is None:
    return ["not run"] * 5
  gib = p["bytes_per_chip"] / 2 ** 30
  if not p["compiled"]:
    return ["no", f">= {gib:.1f}", "—", "—", "—"]
  return ["yes" if p["fits"] else "no", f"{gib:.2f}", _tflops(p), f"{p['step_time_s'] * 1e3:.0f}",
          f"{100 * p['mfu_bound']:.1f}"]


def _row_plans(done: dict, key: str) -> list[dict]:
  """A row's own plan and the cells its search compiled (plan dicts)."""
  return [r["plan"] for (k, kind), r in done.items() if k == key and (kind == "plan" or kind.startswith("cell "))]


def _best(done: dict, key: str) -> dict | None:
  """The fastest plan that fits among ``_row_plans`` (re-ranked here, so that ``--flops`` counts,
  which move the step times, are taken into account)."""
  return min((p for p in _row_plans(done, key) if p["fits"]), key=lambda p: (p["step_time_s"], p["bytes_per_chip"]),
             default=None)   # a tie (compute-bound, same FLOPs): the plan with more HBM left, as cli.search ranks


def markdown(done: dict) -> str:
  head = ("| model | objective | slice | fits | GiB / chip | TFLOP / chip (model / hw) | est. step (ms) "
          "| MFU bound (%) | compile (s) | best plan `--search` found |\n|---|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for row in ROWS:
    p = done.get((_key(row), "plan"))
    s = done.get((_key(row), "search"))
    p = p and p["plan"]
    b = _best(done, _key(row)) if s is not None else None
    if s is None:
      best = "not run"
    elif b is None:
      best = f"none of {s['n']} fit"
    else:
      best = (f"mesh {'x'.join(map(str, b['mesh']))} remat={b['options']['remat']}: {b['step_time_s'] * 1e3:.0f} ms, "
              f"MFU<={100 * b['mfu_bound']:.1f} %, {b['bytes_per_chip'] / 2 ** 30:.2f} GiB ({s['n']} plans)")
    lines.append("| " + " | ".join(list(row) + _cell(p) + [f"{p['compile_s']:.0f}" if p else "—", best]) + " |")
  return "\n".join(lines)


def costs_markdown(done: dict) -> str:
  """Per-chip FLOPs (model / hardware from the jaxpr, XLA's for reference), HBM traffic and memory of each row's plan."""
  lines = ["| model | objective | slice | model TFLOP / chip | hardware TFLOP / chip | XLA TFLOP / chip "
           "| HBM GB / chip | temporaries GiB | arguments GiB |", "|---|---|---|---|---|---|---|---|---|"]
  for row in ROWS:
    r = done.get((_key(row), "plan"))
    if r is None or not r["plan"]["compiled"]:
      continue
    p = r["plan"]
    tf = lambda k: f"{p[k] / 1e12:.1f}" if p.get(k) else "—"
    lines.append("| " + " | ".join(list(row) + [tf("model_flops_per_chip"), tf("hw_flops_per_chip"), tf("flops_per_chip"),
                                              f"{p['hbm_accessed_per_chip'] / 1e9:.0f}", f"{p['temp_bytes'] / 2 ** 30:.2f}",
                                              f"{p['argument_bytes'] / 2 ** 30:.3f}"]) + " |")
  return "\n".join(lines)


def search_markdown(done: dict) -> str:
  """Every searched cell of every row that has a ``--search`` record, the fastest that fits in bold."""
  lines = ["| row | mesh | remat | fits | GiB / chip | TFLOP / chip (model / hw) | est. step (ms) | MFU bound (%) |",
           "|---|---|---|---|---|---|---|---|"]
  for row in ROWS:
    key = _key(row)
    if (key, "search") not in done:
      continue
    best = _best(done, key)
    plans = sorted(_row_plans(done, key), key=lambda p: (p["options"]["remat"], tuple(p["mesh"])))
    for i, p in enumerate(plans):
      b = "**" if p is best else ""
      name = f"{row[0]} {row[1]} {row[2]}" if i == 0 else ""
      cols = [" x ".join(map(str, p["mesh"])), p["options"]["remat"]] + _cell(p)
      lines.append("| " + " | ".join([name] + [f"{b}{v}{b}" for v in cols]) + " |")
  return "\n".join(lines)


def wide_markdown(done: dict) -> str:
  """WIDE_ROW's cells: its --search cells and the --wide ones, ranked by estimated step time (fitting
  plans first), the fastest in bold."""
  plans = _row_plans(done, _key(WIDE_ROW)) + _row_plans(done, _key(("wide",) + WIDE_ROW))
  rank = lambda p: (not p["fits"], p["step_time_s"] if p["compiled"] else float("inf"), p["bytes_per_chip"])
  from trace_jax.training import plan as plan_lib
  plans = sorted({plan_lib.Plan.from_row(p).cell(): p for p in plans}.values(), key=rank)   # a cell once
  lines = [f"{' '.join(WIDE_ROW)}, global batch {BATCH} ({len(plans)} plans):", "",
           "| mesh | remat | attention | microbatches | fits | GiB / chip | TFLOP / chip (model / hw) "
           "| est. step (ms) | MFU bound (%) |", "|---|---|---|---|---|---|---|---|---|"]
  for i, p in enumerate(plans):
    b = "**" if i == 0 and p["fits"] else ""
    o = p["options"]
    cols = [" x ".join(map(str, p["mesh"])), o["remat"], o["attention"], str(o["microbatches"])] + _cell(p)
    lines.append("| " + " | ".join(f"{b}{v}{b}" for v in cols) + " |")
  return "\n".join(lines)


def tools_markdown(done: dict) -> str:
  """The --tools table: each tool alone against the default step (GiB per chip, temporaries, FLOPs)."""
  preset, objective, topo, batch = TOOLS_ROW
  lines = [f"{preset} {objective}, bf16, global batch {batch}, {topo}, mesh 1 x chips x 1:", "",
           "| tool | fits | GiB / chip | temporaries GiB | TFLOP / chip model / hw (XLA) | HBM GB / chip "
           "| est. step (ms) | MFU bound (%) | compile (s) |", "|---|---|---|---|---|---|---|---|---|"]
  for name in TOOLS:
    r = done.get((_key(("tools", name)), "tool"))
    if r is None:
      lines.append(f"| {name} | not run |  |  |  |  |  |  |  |")
      continue
    p = r["plan"]
    if not p["compiled"]:
      lines.append(f"| {name} | no | >= {p['bytes_per_chip'] / 2 ** 30:.1f} | — | — | — | — | — | {p['compile_s']:.0f} |")
      continue
    lines.append(f"| {name} | {'yes' if p['fits'] else 'no'} | {p['bytes_per_chip'] / 2 ** 30:.2f} | "
                 f"{p['temp_bytes'] / 2 ** 30:.2f} | {_tflops(p)} ({p['flops_per_chip'] / 1e12:.2f}) | "
                 f"{p['hbm_accessed_per_chip'] / 1e9:.0f} | {p['step_time_s'] * 1e3:.0f} | "
                 f"{100 * p['mfu_bound']:.1f} | {p['compile_s']:.0f} |")
  return "\n".join(lines)


def _fill_flops(done: dict, record, devices: dict) -> None:
  """Every cached compiled plan (rows, searched cells, tools) gets its jaxpr FLOP counts and the
  roofline they imply (``plan.count_flops``), appended to the cache as an updated record."""
  from trace_jax.cli import plan as cli
  from trace_jax.training import plan as plan_lib
  setups = {}
  for (key, kind), rec in list(done.items()):
    p = rec.get("plan")
    if p is None or not p["compiled"] or p.get("hw_flops_per_chip"):
      continue
    if kind == "tool":
      preset, objective, topo, _ = TOOLS_ROW
      sets = _sets(preset) + TOOLS[key.split(" | ", 1)[1]][1]
    else:
      preset, objective, sl = key.split(" | ")[-3:]   # a row's key, or "wide | " + WIDE_ROW's
      topo, sets = TOPOLOGIES[sl], _sets(preset)
    o = p["options"]
    tool = dict(remat=o["remat"], attention=o["attention"], microbatches=int(o["microbatches"]))
    ck = (objective, tuple(sets), o["remat"], o["attention"])
    if ck not in setups:
      setups[ck] = cli._train_setup(os.path.join(ROOT, CONFIGS[objective]), sets, tool)
    config, task, _, model_task = setups[ck]
    t = time.perf_counter()
    plan = plan_lib.count_flops(plan_lib.Plan.from_row(p), task, config,
                                devices.setdefault(topo, plan_lib.topology(topo)), model_task)
    print(f"{key} {kind}: model {plan.model_flops_per_chip / 1e12:.2f}, hardware {plan.hw_flops_per_chip / 1e12:.2f} "
          f"TFLOP/chip (XLA {plan.flops_per_chip / 1e12:.2f}); MFU bound {100 * plan.mfu_bound:.1f} % "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    record(key, {**rec, "plan": plan.row()})


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "plan_table.jsonl"))
  ap.add_argument("--budget-s", type=float, default=1800.0, help="start no new compile after this many s")
  ap.add_argument("--rows", default=None, help="comma-separated row indices of ROWS (default: all, in order)")
  ap.add_argument("--search", action="store_true", help="also --search each row that has a plan")
  ap.add_argument("--wide", action="store_true",
                  help="also search WIDE_ROW beyond SEARCH (tensor > 1, fused attention, microbatches: WIDE)")
  ap.add_argument("--tools", action="store_true", help="also the one-tool-at-a-time table (TOOLS)")
  ap.add_argument("--flops", action="store_true",
                  help="add the jaxpr FLOP counts (model / hardware, training/flops.py) to every cached plan "
                       "without them: tracing only, no compile")
  args = ap.parse_args()
  from trace_jax.cli import plan as cli
  from trace_jax.training import plan as plan_lib
  rows = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
  done = _load(args.cache)
  t0 = time.perf_counter()
  devices = {}

  def pending(kind):
    """(row, config path, devices, topology) of each row still without a ``kind`` record, while the
    compile budget lasts (a search needs the row's plan first); records what it skips."""
    for row in rows:
      if (_key(row), kind) in done or (kind == "search" and (_key(row), "plan") not in done):
        continue
      if time.perf_counter() - t0 > args.budget_s:
        print(f"budget spent: {kind} of {_key(row)} not run", file=sys.stderr)
        continue
      preset, objective, sl = row
      topo = TOPOLOGIES[sl]
      yield row, os.path.join(ROOT, CONFIGS[objective]), devices.setdefault(topo, plan_lib.topology(topo)), topo

  def record(row, rec):
    """Append ``rec`` for ``row`` (a ROWS tuple or a cache key) to the cache and to ``done``."""
    key = row if isinstance(row, str) else _key(row)
    rec = {**rec, "key": key}
    _append(args.cache, rec)
    done[(key, rec["kind"])] = rec

  for row, config, devs, topo in pending("plan"):
    p = cli.plan_train(config, _sets(row[0]), devs, topo, batch=BATCH, mesh=(1, len(devs), 1), tool=TOOL)
    print(_key(row), "\n", plan_lib.format_plan(p), flush=True)
    record(row, {"kind": "plan", "plan": p.row()})
  if args.search:
    for row, config, devs, topo in pending("search"):
      n = len(devs)
      # the row's own plan and any cell a killed search compiled are taken from the cache, not recompiled
      known = [plan_lib.Plan.from_row(r["plan"]) for (k, kind), r in done.items()
               if k == _key(row) and (kind == "plan" or kind.startswith("cell "))]

      def on_plan(p, row=row):
        print(plan_lib.format_plan(p), flush=True)
        record(row, {"kind": f"cell {p.cell()}", "plan": p.row()})
      plans, fit = cli.search(config, _sets(row[0]), devs, topo, batch=BATCH,
                              meshes=[(1, n, 1), (n // 16, 16, 1)], **SEARCH, on_plan=on_plan, known=known)
      record(row, {"kind": "search", "n": len(plans), "best": fit[0].row() if fit else None})
  if args.wide:
    preset, objective, sl = WIDE_ROW
    topo, wide_key = TOPOLOGIES[sl], _key(("wide",) + WIDE_ROW)
    devs = devices.setdefault(topo, plan_lib.topology(topo))

    def on_wide_plan(p):
      print(plan_lib.format_plan(p), flush=True)
      record(wide_key, {"kind": f"cell {p.cell()}", "plan": p.row()})
    for space in WIDE:
      # the row's plan, its --search cells and any --wide cell a killed run compiled are not compiled again
      known = [plan_lib.Plan.from_row(p) for p in _row_plans(done, _key(WIDE_ROW)) + _row_plans(done, wide_key)]
      if time.perf_counter() - t0 > args.budget_s:
        print(f"budget spent: wide space {space} not run", file=sys.stderr)
        continue
      cli.search(os.path.join(ROOT, CONFIGS[objective]), _sets(preset), devs, topo, batch=BATCH, **space,
                 on_plan=on_wide_plan, known=known)
    print(wide_markdown(done))
  if args.tools:
    preset, objective, topo, batch = TOOLS_ROW
    config = os.path.join(ROOT, CONFIGS[objective])
    for name, (tool, sets) in TOOLS.items():
      key = ("tools", name)
      if (_key(key), "tool") in done:
        continue
      if time.perf_counter() - t0 > args.budget_s:
        print(f"budget spent: tool {name} not run", file=sys.stderr)
        continue
      devs = devices.setdefault(topo, plan_lib.topology(topo))
      cached = done.get((_key(("tools", COST_PLAN.get(name, ""))), "tool"))
      p = cli.plan_train(config, _sets(preset) + sets, devs, topo, batch=batch, mesh=(1, len(devs), 1),
                         tool={"remat": "none", "attention": "explicit", "microbatches": 1, **tool},
                         cost_plan=plan_lib.Plan.from_row(cached["plan"]) if cached else None)
      print(name, "\n", plan_lib.format_plan(p), flush=True)
      record(key, {"kind": "tool", "plan": p.row()})
    print(tools_markdown(done))
  if args.flops:
    _fill_flops(done, record, devices)
    print(tools_markdown(done))
  print(markdown(done))
  print(costs_markdown(done))
  if any(kind == "search" for _, kind in done):
    print(search_markdown(done))
  return 0


if __name__ == "__main__":
  sys.exit(main())
