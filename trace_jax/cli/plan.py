"""``trace-jax plan``: compile the real train step of a config for a TPU topology on this CPU host.

    trace-jax plan --config configs/amc.py --topology v5e:4x4 --batch 4096 --mesh 4,4,1 \
        [--set model.preset=ViT-B-16 --set model.remat=block ...] [--search] [--json OUT.json]

Prints per chip: arguments, outputs, donated and temporary bytes against the chip's HBM (fits / does
not fit, by how much), FLOPs and HBM bytes per step (XLA cost analysis), the roofline step time and
the MFU bound it implies (trace_jax/training/plan.py: compiled estimates, not measurements).
``--search`` compiles mesh shapes (data x fsdp x tensor) x memory tools (model.remat, model.attention,
train.microbatches) and ranks the plans that fit by estimated step time. Needs libtpu
(``pip install -e '.[tpu]'``); no TPU.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="experiment config file (configs/*.py)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override (repeatable), e.g. model.preset=ViT-L-14, model.remat=block")
  parser.add_argument("--topology", default="v5e:2x2", help="TPU topology name, e.g. v5e:16x16, v5p:4x4x4")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default: data.batch_size)")
  parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor (one may be -1)")
  parser.add_argument("--search", action="store_true", help="try meshes x memory tools; rank those that fit")
  parser.add_argument("--json", default=None, help="write every plan as JSON lines here")


def _config(path: str, sets: list[str]):
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if root not in sys.path:
    sys.path.insert(0, root)
  from configs import common
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found")
  spec = importlib.util.spec_from_file_location("_plan_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  import ast
  for s in sets:
    if "=" not in s:
      raise ValueError(f"--set {s!r}: expected KEY=VALUE")
    k, v = s.split("=", 1)
    node = config
    for part in k.split(".")[:-1]:
      node = node.get(part) if hasattr(node, "get") else None
    if node is not None and k.split(".")[-1] in node and node[k.split(".")[-1]] is None:  # unset placeholder
      try:
        node[k.split(".")[-1]] = ast.literal_eval(v)
        continue
      except (ValueError, SyntaxError, TypeError):
        pass
    common.apply_overrides(config, {k: v})
  return config


def _task(config):
  """The objective's Task; the tokenizer facts come from the model preset (no data is read), except
  for TRACE, whose vocabulary is built from the training captions (the data source)."""
  from trace_jax import objectives
  info = {}
  if config.loss.name == "trace":
    from trace_jax.data import sources
    info = sources.make(config).info
  return objectives.make(config, info)


def _mesh(s: str):
  parts = [int(x) for x in s.split(",")]
  if len(parts) != 3:
    raise ValueError(f"--mesh {s!r}: expected data,fsdp,tensor")
  return tuple(parts)


def _candidates(n: int):
  """Mesh shapes (data, fsdp, tensor) of n chips: tensor in {1, 2, 4}, fsdp a power of two."""
  out = []
  for t in (1, 2, 4):
    for f in (2 ** i for i in range(0, 12)):
      if n % (t * f) == 0:
        out.append((n // (t * f), f, t))
  return out


def run(args) -> int:
  from trace_jax.training import plan as plan_lib
  base = _config(args.config, args.set)
  batch = args.batch or int(base.data.batch_size)
  devices = plan_lib.topology(args.topology)
  jobs = []
  if args.search:
    tools = [dict(remat=r, attention=a, microbatches=m) for r, a, m in
             itertools.product(("none", "dots_with_no_batch_dims_saveable", "block"), ("explicit", "fused"), (1, 4))]
    for mesh in _candidates(len(devices)):
      for tool in tools:
        jobs.append((mesh, tool))
  else:
    jobs.append((_mesh(args.mesh), dict(remat=base.model.remat, attention=base.model.attention,
                                        microbatches=int(base.train.get("microbatches", 1)))))
  plans = []
  out = open(args.json, "w") if args.json else None
  for mesh, tool in jobs:
    config = _config(args.config, args.set)
    config.model.remat, config.model.attention = tool["remat"], tool["attention"]
    cost_task = None
    if config.model.scan_layers:   # XLA counts a scanned block once: FLOPs from the unrolled step
      plain = _config(args.config, args.set + ["model.scan_layers=False"])
      plain.model.remat, plain.model.attention = tool["remat"], tool["attention"]
      cost_task = _task(plain)
    try:
      p = plan_lib.compile_train_step(_task(config), config, devices, args.topology, batch=batch,
                                      mesh_shape=mesh, microbatches=tool["microbatches"], cost_task=cost_task)
    except ValueError as e:   # a mesh the batch / microbatches do not divide: skipped in a search
      if not args.search:
        raise
      print(f"skipped mesh {mesh} {tool}: {e}", file=sys.stderr)
      continue
    plans.append(p)
    print(plan_lib.format_plan(p), flush=True)
    if out:
      out.write(json.dumps(p.row()) + "\n")
      out.flush()
  if out:
    out.close()
  if args.search:
    fit = sorted((p for p in plans if p.fits), key=lambda p: p.step_time_s)
    print(f"\n{len(fit)} of {len(plans)} plans fit; fastest first (estimated step time, MFU bound):")
    for p in fit[:10]:
      print(f"  {p.step_time_s * 1e3:9.2f} ms  MFU<={100 * p.mfu_bound:5.1f} %  {p.bytes_per_chip / plan_lib.GiB:6.2f} GiB  "
            f"mesh {'x'.join(map(str, p.mesh))}  " + " ".join(f"{k}={v}" for k, v in p.options.items()))
  return 0
