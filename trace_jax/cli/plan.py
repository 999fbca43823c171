"""``trace-jax plan``: compile the real jitted step of a config for a TPU topology on this CPU host.

    trace-jax plan --config configs/amc.py --topology v5e:4x4 --batch 4096 --mesh 4,4,1 \
        [--set model.preset=ViT-B-16 --set model.remat=block ...] [--search] [--json OUT.json]
    trace-jax plan --config configs/contrastive.py --step explain --method legrad --batch 256 ...

Prints per chip: arguments, outputs, donated and temporary bytes against the chip's HBM (fits / does
not fit, by how much), FLOPs and HBM bytes per step (XLA cost analysis), the roofline step time and
the MFU bound it implies (trace_jax/training/plan.py: compiled estimates, not measurements).

``--step``: ``train`` (default: the loop's train step), or an inference step of the config's model as
``trace_jax/inference`` runs it (model dir layout: unrolled, the memory tools off; params sharded by
the rule table on ``--mesh``, i.e. replicated on the default data-only mesh, as inference puts them):
``embed`` (B images through the image tower and B texts through the text tower, ``inference/embed``'s
jitted towers), ``explain`` (B image-text pairs through ``attribution.api``'s jitted ``--method``),
``invert`` (B images with ``--masks`` K masks each, MaskInversion's vmapped ``--inv-steps`` program).

``--search`` (train step) compiles mesh shapes (data x fsdp x tensor) x memory tools (model.remat,
model.attention, train.microbatches) and ranks the plans that fit by estimated step time; the
``--search-*`` flags narrow the space (each compile takes minutes for a ViT-B/16 on a 2-core host).
Needs libtpu (``pip install -e '.[tpu]'``); no TPU.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys

STEPS = ("train", "embed", "explain", "invert")
REMATS = ("none", "dots_with_no_batch_dims_saveable", "block")
ATTENTIONS = ("explicit", "fused")
MICROBATCHES = (1, 4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="experiment config file (configs/*.py)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override (repeatable), e.g. model.preset=ViT-L-14, model.remat=block")
  parser.add_argument("--topology", default="v5e:2x2", help="TPU topology name, e.g. v5e:16x16, v5p:4x4x4")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default: data.batch_size)")
  parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor (one may be -1)")
  parser.add_argument("--step", default="train", choices=STEPS, help="which jitted step to plan")
  parser.add_argument("--method", default="legrad", help="--step explain: the attribution method")
  parser.add_argument("--masks", type=int, default=8, help="--step invert: masks per image")
  parser.add_argument("--inv-steps", type=int, default=None, help="--step invert: MaskInversion steps "
                      "(default: its default)")
  parser.add_argument("--search", action="store_true", help="try meshes x memory tools; rank those that fit")
  parser.add_argument("--search-meshes", default=None, help="';'-separated data,fsdp,tensor shapes to try "
                      "(default: every tensor in {1,2,4} x power-of-two fsdp that divides the chips)")
  parser.add_argument("--search-remat", default=",".join(REMATS), help="model.remat values to try")
  parser.add_argument("--search-attention", default=",".join(ATTENTIONS), help="model.attention values to try")
  parser.add_argument("--search-microbatches", default=",".join(map(str, MICROBATCHES)),
                      help="train.microbatches values to try")
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
  for s in sets:
    if "=" not in s:
      raise ValueError(f"--set {s!r}: expected KEY=VALUE")
    common.apply_overrides(config, dict([s.split("=", 1)]))
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
    raise ValueError(f"mesh {s!r}: expected data,fsdp,tensor")
  return tuple(parts)


def _candidates(n: int):
  """Mesh shapes (data, fsdp, tensor) of n chips: tensor in {1, 2, 4}, fsdp a power of two."""
  out = []
  for t in (1, 2, 4):
    for f in (2 ** i for i in range(0, 12)):
      if n % (t * f) == 0:
        out.append((n // (t * f), f, t))
  return out


def _choices(s: str, allowed, kind=str, flag=""):
  want = f"a comma-separated subset of {tuple(allowed)}" if allowed else "comma-separated positive integers"
  try:
    vals = [kind(x.strip()) for x in s.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{flag} {s!r}: expected {want}") from None
  if not vals or any(v not in allowed if allowed else v < 1 for v in vals):
    raise ValueError(f"{flag} {s!r}: expected {want}")
  return vals


def _train_setup(config_path: str, sets: list[str], tool: dict):
  """(config, task, cost_task, model_task) of the config with ``tool``'s model options (remat,
  attention) set; model_task (remat off: the model FLOPs) is None when the tool has no remat."""
  tool_sets = [f"model.remat={tool['remat']}", f"model.attention={tool['attention']}"]
  config = _config(config_path, sets + tool_sets)
  cost_task = model_task = None
  if config.model.scan_layers:   # XLA counts a scanned block once: HBM bytes from the unrolled step
    cost_task = _task(_config(config_path, sets + tool_sets + ["model.scan_layers=False"]))
  if config.model.remat != "none":
    model_task = _task(_config(config_path, sets + tool_sets + ["model.remat=none"]))
  return config, _task(config), cost_task, model_task


def plan_train(config_path: str, sets: list[str], devices, topology: str, *, batch: int, mesh, tool: dict,
               setup=None, cost_plan=None):
  """The train-step plan of the config with ``tool`` = {remat, attention, microbatches} applied
  (``setup``: its :func:`_train_setup`, when the caller already built it; ``cost_plan``: the plain
  plan a scanned / microbatched one takes its XLA cost from, when the caller has it compiled)."""
  from trace_jax.training import plan as plan_lib
  config, task, cost_task, model_task = setup or _train_setup(config_path, sets, tool)
  return plan_lib.compile_train_step(task, config, devices, topology, batch=batch, mesh_shape=mesh,
                                     microbatches=int(tool["microbatches"]), cost_task=cost_task,
                                     model_task=model_task, cost_plan=cost_plan)


def search(config_path: str, sets: list[str], devices, topology: str, *, batch: int, meshes=None,
           remats=REMATS, attentions=ATTENTIONS, microbatches=MICROBATCHES, on_plan=None, known=()):
  """Compile every (mesh, remat, attention, microbatches) of the space -> (all plans, the plans that
  fit ranked by estimated step time, fastest first; a tie goes to the fewer bytes per chip). A mesh /
  microbatch count that does not divide the batch is skipped (reported on stderr); ``on_plan(plan)``
  is called after each compile.
  ``known``: plans already compiled for this config, batch and topology (``Plan.cell`` says where
  they sit in the space), taken instead of compiling those points again."""
  meshes = list(meshes) if meshes is not None else _candidates(len(devices))
  plans, setups = [], {}   # one task per model option pair, shared by the meshes and microbatches
  have = {p.cell(): p for p in known}
  for mesh, remat, attn, mb in itertools.product(meshes, remats, attentions, microbatches):
    tool = dict(remat=remat, attention=attn, microbatches=int(mb))
    if (tuple(mesh), remat, attn, int(mb)) in have:
      plans.append(have[tuple(mesh), remat, attn, int(mb)])
      continue
    if (remat, attn) not in setups:
      setups[remat, attn] = _train_setup(config_path, sets, tool)
    try:
      p = plan_train(config_path, sets, devices, topology, batch=batch, mesh=tuple(mesh), tool=tool,
                     setup=setups[remat, attn])
    except ValueError as e:   # a mesh the batch / microbatches do not divide
      print(f"skipped mesh {tuple(mesh)} {tool}: {e}", file=sys.stderr)
      continue
    plans.append(p)
    if on_plan is not None:
      on_plan(p)
  # equal estimated times (compute-bound plans of the same FLOPs): the one with more HBM left ranks first
  return plans, sorted((p for p in plans if p.fits), key=lambda p: (p.step_time_s, p.bytes_per_chip))


def _abstract(tree, shardings):
  import jax
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


@contextlib.contextmanager
def _loops_unrolled():
  """While tracing: every ``jax.lax.scan`` fully unrolled and every ``jax.lax.map`` one ``vmap``.

  The same work (FLOPs, bytes), but no while loop: XLA's cost analysis counts a loop body once, so
  MaskInversion's ``steps`` loop (a ``lax.scan``) and its chunked Jacobian (a ``lax.map``) would be
  counted as one iteration. Only for the cost compile of an inference plan (its memory is the real
  program's)."""
  import jax
  scan, lmap = jax.lax.scan, jax.lax.map

  def unrolled_scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
    return scan(f, init, xs, length, reverse, unroll=True, **kw)

  def vmapped_map(f, xs, *, batch_size=None):
    return jax.vmap(f)(xs)
  jax.lax.scan, jax.lax.map = unrolled_scan, vmapped_map
  try:
    yield
  finally:
    jax.lax.scan, jax.lax.map = scan, lmap


def plan_inference(step: str, config, devices, topology: str, *, batch: int, mesh=(-1, 1, 1),
                   method: str = "legrad", masks: int = 8, inv_steps: int | None = None):
  """The plan of an inference step (module docstring) of ``config``'s model at ``batch``.

  Memory is the real jitted program's; FLOPs / bytes come from a second compile of the same program
  traced with its loops unrolled (``_loops_unrolled``), as XLA counts a loop body once."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from trace_jax.models import build, init_params
  from trace_jax.models.config import SCALE_DEFAULTS
  from trace_jax.training import mesh as mesh_lib
  from trace_jax.training import plan as plan_lib
  from trace_jax.training import sharding as shd
  if step not in STEPS[1:]:
    raise ValueError(f"inference step must be one of {STEPS[1:]}; got {step!r}")
  cfg = _task(config).cfg.replace(**SCALE_DEFAULTS)   # a model dir's layout (models/scale.inference_layout)
  model = build(cfg)
  m = mesh_lib.make_mesh(*mesh, devices=devices)
  shd.check_batch_size(batch, m)
  boxed = jax.eval_shape(lambda r: init_params(cfg, r, unbox=False), jax.random.PRNGKey(0))
  params = _abstract(nn.unbox(boxed), shd.logical_shardings(boxed, m))
  rows, rep = shd.batch_sharding(m), shd.replicated(m)
  s, L = cfg.vision.image_size, cfg.text.context_length
  images = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32, sharding=rows)
  ids = jax.ShapeDtypeStruct((batch, L), jnp.int32, sharding=rows)
  options = dict(step=step, dtype=cfg.dtype)
  if step == "embed":
    from trace_jax.inference import embed
    args = (params, images, ids)

    def make(fresh):   # inference/embed's jitted towers (no loops: its own cost analysis is complete)
      img, txt = embed._tower(model, "encode_image"), embed._tower(model, "encode_text")
      return jax.jit(lambda p, x, t: (img(p, x), txt(p, t)))
  elif step == "explain":
    from trace_jax.attribution import api
    mod = api.method_module(method)
    if not getattr(mod, "JIT", True):
      raise ValueError(f"--step explain: {method} is not one jitted program (it validates on the host and "
                       f"jits its pieces); plan one of {tuple(x for x in api.METHODS if x != method)}")
    args = (params, images, ids, None, ())
    options["method"] = method

    def make(fresh):   # attribution.api's jitted method (what explain() calls)
      return (api._jitted.__wrapped__ if fresh else api._jitted)(method, model, (), ())
  else:
    from trace_jax.attribution.legrad import resolve_layers
    from trace_jax.inversion import maskinversion as mi
    steps = int(inv_steps or mi.DEFAULT_STEPS)
    layer_ids = resolve_layers(mi.DEFAULT_LAYER_INDEX, cfg.vision.layers)
    # auto mode as invert() picks it, with half the chip's HBM as the budget (maskinversion.memory_budget)
    mode = mi.choose_mode(cfg, (s, s), masks, steps, len(layer_ids),
                          budget=0.5 * plan_lib.CHIPS[plan_lib.chip_of(topology)]["hbm_bytes"])
    hyper = mi.hyper_args(mi.DEFAULT_LR, 0.0, 0.0, steps) + [jnp.zeros((cfg.embed_dim,), jnp.float32)]
    args = (params, images, jax.ShapeDtypeStruct((batch, masks, s, s), jnp.float32, sharding=rows),
            jax.ShapeDtypeStruct((batch, masks), jnp.float32, sharding=rows),
            *[jax.ShapeDtypeStruct(jnp.shape(h), jnp.result_type(h), sharding=rep) for h in hyper])
    options.update(masks=masks, steps=steps, mode=mode)

    def make(fresh):   # invert()'s vmapped program over images
      return (mi._compiled.__wrapped__ if fresh else mi._compiled)(cfg, layer_ids, steps, mode, "antialias", None)

  def cost_of():
    with _loops_unrolled():
      c = plan_lib.compile_plan(make(True), args, m, topology, batch=batch, options=options)
    if not c.compiled:
      raise ValueError(f"the loop-unrolled {step} program (for the cost analysis) does not fit: {c.error}")
    return c.flops_per_chip, c.hbm_accessed_per_chip
  return plan_lib.compile_plan(make(False), args, m, topology, batch=batch, options=options,
                               cost_of=None if step == "embed" else cost_of)


def run(args) -> int:
  from trace_jax.training import plan as plan_lib
  base = _config(args.config, args.set)
  batch = args.batch or int(base.data.batch_size)
  devices = plan_lib.topology(args.topology)
  # JSON lines go to a .tmp beside the target while plans come in (a long search keeps what it has),
  # then replace the target once the command is done: a reader never sees a half-written file
  out = open(args.json + ".tmp", "w") if args.json else None

  def report(p):
    print(plan_lib.format_plan(p), flush=True)
    if out:
      out.write(json.dumps(p.row()) + "\n")
      out.flush()

  try:
    if args.step != "train":
      if args.search:
        raise ValueError("--search ranks train-step plans; drop --search or use --step train")
      report(plan_inference(args.step, base, devices, args.topology, batch=batch, mesh=_mesh(args.mesh),
                            method=args.method, masks=args.masks, inv_steps=args.inv_steps))
    elif args.search:
      meshes = ([_mesh(s) for s in args.search_meshes.split(";") if s.strip()] if args.search_meshes else None)
      plans, fit = search(args.config, args.set, devices, args.topology, batch=batch, meshes=meshes,
                          remats=_choices(args.search_remat, REMATS, flag="--search-remat"),
                          attentions=_choices(args.search_attention, ATTENTIONS, flag="--search-attention"),
                          microbatches=_choices(args.search_microbatches, None, int, "--search-microbatches"),
                          on_plan=report)
      print(f"\n{len(fit)} of {len(plans)} plans fit; fastest first (estimated step time, MFU bound):")
      for p in fit[:10]:
        print(f"  {p.step_time_s * 1e3:9.2f} ms  MFU<={100 * p.mfu_bound:5.1f} %  "
              f"{p.bytes_per_chip / plan_lib.GiB:6.2f} GiB  mesh {'x'.join(map(str, p.mesh))}  "
              + " ".join(f"{k}={v}" for k, v in p.options.items()))
    else:
      tool = dict(remat=base.model.remat, attention=base.model.attention,
                  microbatches=int(base.train.get("microbatches", 1)))
      report(plan_train(args.config, args.set, devices, args.topology, batch=batch, mesh=_mesh(args.mesh),
                        tool=tool))
  finally:
    if out:
      out.close()
  if out:
    os.replace(args.json + ".tmp", args.json)
  return 0
