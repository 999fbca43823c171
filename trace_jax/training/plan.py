"""A compiled plan of the real train step for a TPU topology, on a host without a TPU (docs/scaling.md).

    devices = topology("v5e:16x16")                   # libtpu's compiler: jax[tpu], no TPU needed
    p = compile_train_step(task, config, devices, "v5e:16x16", batch=32768, mesh_shape=(16, 16, 1),
                           model_task=task_without_remat)
    p.fits, p.bytes_per_chip, p.model_flops_per_chip, p.step_time_s, p.mfu_bound

``jax.experimental.topologies.get_topology_desc`` gives the topology's devices; the mesh, the
parameter / optimiser shardings (``sharding.py`` rules) and the jitted step (``step.py``) are the
ones a training run builds; the state and batch are ``ShapeDtypeStruct``s carrying their shardings,
so nothing is allocated (``compile_plan`` does the same for any jitted step: trace_jax/cli/plan.py plans
the embed / explain / invert programs with it). XLA:TPU's ``memory_analysis`` (per chip: arguments, outputs, aliased
(donated) buffers, temporaries) and ``cost_analysis`` (per chip: FLOPs, HBM bytes accessed) of the
compiled SPMD program are read back.

These are COMPILED ESTIMATES, not measurements: the step time is the roofline
max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per chip from the chip's published peaks (``CHIPS``),
with no communication time (ICI / DCN collectives) and no kernel inefficiency. Train plans take
their FLOPs from the step's jaxpr (``flops.py``), not from XLA's cost analysis (which gave fewer
FLOPs with remat than without): the hardware FLOPs (remat's recompute included) set the compute
time, the model FLOPs (the same step with remat off) over that time and the chip's peak give the
MFU bound (model-FLOPs utilisation, an upper bound). XLA's FLOPs stay in the plan for reference.
XLA's cost analysis counts a ``while`` loop body once, so plans with ``scan_layers`` or
``microbatches`` > 1 take their HBM bytes from a second compile of the unrolled, un-accumulated
step (``compile_train_step``'s ``cost_task``).
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from trace_jax.training import accumulate
from trace_jax.training import flops as flops_lib
from trace_jax.training import mesh as mesh_lib
from trace_jax.training import sharding as shd
from trace_jax.training import state as state_lib
from trace_jax.training import step as step_lib

GiB = 1024 ** 3

# Published per-chip peaks (Google Cloud TPU documentation, system-architecture pages
# https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e): dense bf16 FLOP/s, HBM capacity
# (bytes) and bandwidth (bytes/s).
CHIPS = {
    "v4": dict(bf16_flops=275e12, hbm_bytes=32 * GiB, hbm_bw=1228e9),
    "v5e": dict(bf16_flops=197e12, hbm_bytes=16 * GiB, hbm_bw=819e9),
    "v5p": dict(bf16_flops=459e12, hbm_bytes=95 * GiB, hbm_bw=2765e9),
    "v6e": dict(bf16_flops=918e12, hbm_bytes=32 * GiB, hbm_bw=1640e9),
}


def chip_of(topology_name: str) -> str:
  kind = topology_name.split(":")[0].lower()
  if kind not in CHIPS:
    raise ValueError(f"unknown TPU generation {kind!r} in topology {topology_name!r}; known: {sorted(CHIPS)} "
                     "(e.g. v5e:4x4, v5p:4x4x4, v4:2x2x1, v6e:8x8)")
  return kind


def topology(name: str):
  """The devices of a named TPU topology through libtpu's compiler (``pip install 'jax[tpu]'``)."""
  chip_of(name)
  # Compile-only use (no TPU is opened): let several processes load libtpu (a test and the command it
  # runs, two plans side by side) instead of failing on libtpu's single-user lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
  except (ImportError, RuntimeError) as e:
    raise ValueError(f"cannot build TPU topology {name!r}: {str(e).splitlines()[0][:200]} (the plan needs "
                     "libtpu: pip install 'jax[tpu]==<your jax version>'; no TPU is needed)") from None


@dataclasses.dataclass
class Plan:
  topology: str
  chip: str
  mesh: tuple
  batch: int
  options: dict
  compiled: bool
  argument_bytes: float = 0.0
  output_bytes: float = 0.0
  alias_bytes: float = 0.0
  temp_bytes: float = 0.0
  bytes_per_chip: float = 0.0      # peak HBM: arguments + outputs - aliased (donated) + temporaries
  hbm_bytes: float = 0.0
  flops_per_chip: float = 0.0      # XLA cost analysis of one step (whole global batch, per chip)
  model_flops_per_chip: float = 0.0   # jaxpr matmul count, remat off (flops.py; train plans)
  hw_flops_per_chip: float = 0.0      # jaxpr matmul count of the step as planned (remat's recompute in)
  hbm_accessed_per_chip: float = 0.0
  step_time_s: float = 0.0         # roofline estimate, no communication
  mfu_bound: float = 0.0
  compile_s: float = 0.0
  error: str = ""

  @property
  def fits(self) -> bool:
    return self.compiled and self.bytes_per_chip <= self.hbm_bytes

  def row(self) -> dict:
    d = dataclasses.asdict(self)
    d["fits"] = self.fits
    return d

  @classmethod
  def from_row(cls, row: dict) -> "Plan":
    """The plan a ``row()`` describes (a cached compile: benchmarks/plan_table.py)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in row.items() if k in names}, "mesh": tuple(row["mesh"])})

  def cell(self) -> tuple:
    """(mesh, remat, attention, microbatches): the point of ``trace-jax plan --search``'s space."""
    o = self.options
    return (tuple(self.mesh), o["remat"], o["attention"], int(o["microbatches"]))


# XLA:TPU's over-HBM compile errors (two wordings seen from libtpu): the bytes it needed.
_OOM = (re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
        re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"))


def _parse_oom(msg: str) -> tuple[float, str] | None:
  """(bytes needed, the sentence) of an out-of-HBM compile error, else None."""
  unit = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
  for pat in _OOM:
    m = pat.search(msg)
    if m:
      line = next((l for l in msg.splitlines() if m.group(0) in l), m.group(0)).strip()
      return float(m.group(1)) * unit[m.group(2)], line
  return None


def abstract_batch(keys_shapes: dict[str, tuple[tuple, Any]], mesh) -> dict:
  sh = shd.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sh) for k, (s, d) in keys_shapes.items()}


def batch_shapes(cfg, batch: int) -> dict:
  """The canonical batch keys (objectives/base.BATCH_KEYS) at the model's image size / context."""
  s, L = cfg.vision.image_size, cfg.text.context_length
  return {"image": ((batch, s, s, 3), jnp.float32), "caption_ids": ((batch, L), jnp.int32),
          "phrase_ids": ((batch, L), jnp.int32), "mask": ((batch, s, s), jnp.float32),
          "mask_indicator": ((batch,), jnp.float32)}


def compile_plan(jitted, args: tuple, mesh, topology_name: str, *, batch: int, options: dict,
                 cost_of=None, count_hw_flops: bool = False) -> Plan:
  """Lower + compile ``jitted(*args)`` (``ShapeDtypeStruct`` args carrying their shardings on ``mesh``)
  for the topology's chips; per-chip memory and cost (any step: train, embed, explain, invert).

  ``cost_of``: None (FLOPs / HBM bytes from this program's cost analysis) or a callable returning
  the (flops, bytes accessed) per chip to use instead (XLA counts a while-loop body once: see
  ``compile_train_step``); it runs only when the program compiled. An over-HBM program is a plan
  that does not fit (``compiled`` False, the bytes XLA:TPU said it needs); other errors raise.
  ``count_hw_flops``: also count the program's FLOPs from the jaxpr traced for this compile
  (``flops.py``; no second trace) into ``hw_flops_per_chip``."""
  chip = chip_of(topology_name)
  plan = Plan(topology_name, chip, tuple(int(mesh.shape[a]) for a in mesh_lib.AXES), batch, dict(options),
              False, hbm_bytes=CHIPS[chip]["hbm_bytes"])
  t0 = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      traced = jitted.trace(*args)
      compiled = traced.lower().compile()
  except Exception as e:  # noqa: BLE001 - XLA:TPU reports an over-HBM program as a compile error
    plan.compile_s = time.perf_counter() - t0
    oom = _parse_oom(str(e))
    if oom is None:
      raise
    plan.bytes_per_chip, plan.error = oom[0], oom[1]
    return plan
  plan.compile_s = time.perf_counter() - t0
  plan.compiled = True
  if count_hw_flops:
    plan.hw_flops_per_chip = flops_lib.count_jaxpr(traced.jaxpr) / mesh.devices.size
  mem = compiled.memory_analysis()
  plan.argument_bytes = float(mem.argument_size_in_bytes)
  plan.output_bytes = float(mem.output_size_in_bytes)
  plan.alias_bytes = float(mem.alias_size_in_bytes)
  plan.temp_bytes = float(mem.temp_size_in_bytes)
  plan.bytes_per_chip = plan.argument_bytes + plan.output_bytes - plan.alias_bytes + plan.temp_bytes
  if cost_of is None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    plan.flops_per_chip = float(cost.get("flops", 0.0))
    plan.hbm_accessed_per_chip = float(cost.get("bytes accessed", 0.0))
  else:
    t1 = time.perf_counter()
    plan.flops_per_chip, plan.hbm_accessed_per_chip = cost_of()
    plan.compile_s += time.perf_counter() - t1
  return roofline(plan)


def _train_program(task, config, mesh, *, batch: int, microbatches: int = 1):
  """(jitted step, abstract state, abstract batch) of ``task``'s train step on ``mesh``: the loop's
  own step (training/loop.py) over ``ShapeDtypeStruct``s carrying their shardings."""
  shd.check_batch_size(batch, mesh)
  accumulate.check_microbatches(batch, microbatches, mesh)
  trainable = getattr(task, "trainable", None)
  tx, schedule = state_lib.make_optimizer(config.optim, int(config.train.steps), trainable)
  shardings = state_lib.state_shardings(task.init_params, tx, mesh, config.seed)
  state = state_lib.abstract_with_shardings(task.init_params, tx, shardings, config.seed)
  fn = step_lib.make_train_step(task.loss_fn, tx, schedule, trainable, microbatches=microbatches, mesh=mesh)
  step = step_lib.jit_train_step(fn, shardings, mesh)
  return step, state, abstract_batch(batch_shapes(task.cfg, batch), mesh)


def train_step_flops(task, config, mesh, *, batch: int, microbatches: int = 1) -> float:
  """Global matmul FLOPs of one train step, counted from its jaxpr (``flops.py``; traced, not compiled)."""
  step, state, b = _train_program(task, config, mesh, batch=batch, microbatches=microbatches)
  with jax.set_mesh(mesh):
    return flops_lib.count(step, state, b)


def compile_train_step(task, config, devices, topology_name: str, *, batch: int, mesh_shape=(-1, 1, 1),
                       microbatches: int = 1, cost_task=None, model_task=None, cost_plan=None) -> Plan:
  """Lower + compile the train step of ``task`` for ``devices``; memory and cost per chip.

  ``cost_task``: the same objective with ``scan_layers`` off, required when ``task`` scans its
  blocks. XLA's cost analysis counts a while-loop body once, so the HBM bytes (and XLA's FLOPs) of a
  plan with ``scan_layers`` or ``microbatches`` M > 1 are M x those of ``cost_task``'s plain step at
  batch / M (exact for the per-example work; counts the optimiser update M times, negligible at large batch).

  ``model_task``: the same objective with remat off (required when ``task`` has remat; default
  ``task``; False: no jaxpr counts, XLA's alone): its jaxpr FLOP count is the plan's model FLOPs (the
  MFU numerator); ``task``'s own count (remat's recompute included) is the hardware FLOPs that set
  the compute time (``flops.py``; both per chip = global / chips).
  ``cost_plan``: ``cost_task``'s plain plan at batch / M on the same mesh when the caller has it
  (its XLA cost is taken instead of compiling it again)."""
  if task.cfg.scan_layers and (cost_task is None or cost_task.cfg.scan_layers):
    raise ValueError("a scan_layers plan needs cost_task (the same objective with scan_layers off)")
  if task.cfg.remat != "none" and model_task is None:
    raise ValueError(f"a remat={task.cfg.remat} plan needs model_task (the same objective with remat='none'): "
                     "its model FLOPs are the MFU numerator, the recomputed forward is not model work")
  mesh = mesh_lib.make_mesh(*mesh_shape, devices=devices)
  shape = tuple(int(mesh.shape[a]) for a in mesh_lib.AXES)
  if cost_plan is not None and (cost_plan.batch != batch // microbatches or tuple(cost_plan.mesh) != shape
                                or cost_plan.options.get("scan_layers") or cost_plan.options.get("microbatches") != 1
                                or cost_plan.options.get("remat") != task.cfg.remat):
    raise ValueError(f"cost_plan must be the plain (unscanned, one-microbatch, remat={task.cfg.remat}) plan "
                     f"at batch {batch // microbatches} on mesh {shape}; got batch {cost_plan.batch}, mesh "
                     f"{cost_plan.mesh}, options {cost_plan.options}")
  step, state, b = _train_program(task, config, mesh, batch=batch, microbatches=microbatches)
  cost_of = None
  if task.cfg.scan_layers or microbatches > 1:
    def cost_of():
      plain = cost_plan or compile_train_step(cost_task or task, config, devices, topology_name,
                                              batch=batch // microbatches, mesh_shape=mesh_shape, model_task=False)
      if not plain.compiled:
        raise ValueError(f"the unrolled step at batch {batch // microbatches} (for the cost analysis) does "
                         f"not compile: {plain.error}")
      return microbatches * plain.flops_per_chip, microbatches * plain.hbm_accessed_per_chip
  options = dict(step="train", remat=task.cfg.remat, scan_layers=task.cfg.scan_layers,
                 attention=task.cfg.attention, dtype=task.cfg.dtype, microbatches=microbatches)
  plan = compile_plan(step, (state, b), mesh, topology_name, batch=batch, options=options, cost_of=cost_of,
                      count_hw_flops=model_task is not False)
  if plan.compiled and model_task is not False:
    count_flops(plan, task, config, devices, model_task)   # hardware FLOPs already counted from the compile's trace
  return plan


def count_flops(plan: Plan, task, config, devices, model_task=None) -> Plan:
  """Fill ``plan``'s jaxpr FLOP counts (hardware: ``task``'s step as planned, unless the plan has
  them from its compile's trace; model: ``model_task``'s, the same objective with remat off, default
  ``task``) and its roofline; per chip = global / chips. Tracing only, no compile: a cached plan gets
  its counts in seconds (benchmarks/plan_table.py --flops)."""
  mesh = mesh_lib.make_mesh(*plan.mesh, devices=devices)
  n = mesh.devices.size
  if not plan.hw_flops_per_chip:
    microbatches = int(plan.options.get("microbatches", 1))
    plan.hw_flops_per_chip = train_step_flops(task, config, mesh, batch=plan.batch, microbatches=microbatches) / n
  plan.model_flops_per_chip = (plan.hw_flops_per_chip if model_task is None else
                               train_step_flops(model_task, config, mesh, batch=plan.batch) / n)
  return roofline(plan)


def roofline(plan: Plan) -> Plan:
  """Step time = max(compute, HBM) per chip from the chip's peaks; MFU bound = model FLOPs / peak / that time.

  Compute is the jaxpr-counted hardware FLOPs (``flops.py``) when the plan has them, else XLA's
  cost analysis (inference plans); the MFU numerator is the model FLOPs (remat off) when known."""
  spec = CHIPS[plan.chip]
  hw = plan.hw_flops_per_chip or plan.flops_per_chip
  model = plan.model_flops_per_chip or hw
  t_compute, t_memory = hw / spec["bf16_flops"], plan.hbm_accessed_per_chip / spec["hbm_bw"]
  plan.step_time_s = max(t_compute, t_memory)
  plan.mfu_bound = model / spec["bf16_flops"] / plan.step_time_s if plan.step_time_s > 0 else 0.0
  return plan


def format_plan(p: Plan) -> str:
  g = lambda b: f"{b / GiB:.2f} GiB" if abs(b) >= 0.1 * GiB else f"{b / 2 ** 20:.2f} MiB"
  head = (f"{p.topology} ({p.chip}, mesh data x fsdp x tensor = "
          f"{' x '.join(map(str, p.mesh))}), global batch {p.batch}, " +
          ", ".join(f"{k}={v}" for k, v in p.options.items()))
  if not p.compiled:
    return (f"{head}\n  DOES NOT FIT: at least {g(p.bytes_per_chip)} per chip needed of {g(p.hbm_bytes)} HBM "
            f"(over by >= {g(p.bytes_per_chip - p.hbm_bytes)}); XLA:TPU: {p.error}; compile {p.compile_s:.1f} s")
  verdict = (f"fits ({g(p.hbm_bytes - p.bytes_per_chip)} free)" if p.fits
             else f"DOES NOT FIT (over by {g(p.bytes_per_chip - p.hbm_bytes)})")
  return "\n".join([
      head,
      f"  per chip: arguments {g(p.argument_bytes)} + outputs {g(p.output_bytes)} - donated "
      f"{g(p.alias_bytes)} + temporaries {g(p.temp_bytes)} = {g(p.bytes_per_chip)} of {g(p.hbm_bytes)} HBM: {verdict}",
      (f"  per chip per step: model {p.model_flops_per_chip:.3e} FLOPs, hardware {p.hw_flops_per_chip:.3e} "
       f"(jaxpr matmul counts; XLA cost analysis {p.flops_per_chip:.3e}), {p.hbm_accessed_per_chip:.3e} HBM "
       "bytes accessed (XLA)" if p.hw_flops_per_chip else
       f"  per chip per step: {p.flops_per_chip:.3e} FLOPs, {p.hbm_accessed_per_chip:.3e} HBM bytes accessed "
       f"(XLA cost analysis)"),
      f"  roofline step time {p.step_time_s * 1e3:.2f} ms, MFU bound {100 * p.mfu_bound:.1f} % "
      f"(compiled estimates from the chip's peak bf16 FLOP/s and HBM bandwidth, no communication; not "
      f"measurements); compile {p.compile_s:.1f} s",
  ])
