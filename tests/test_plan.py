"""``trace-jax plan`` (trace_jax/training/plan.py): the real train step compiled by libtpu for a v5e:2x2
topology on this CPU host (no TPU), tiny model.

* per-chip memory and FLOPs are reported; the argument bytes are the sharded state + batch (checked
  against an independent count from the parameter tree and the mesh);
* FLOPs scale with the batch (2x batch -> between 1.6x and 2x the FLOPs: the per-example work doubles,
  the optimiser update does not);
* scan_layers: XLA counts a while-loop body once, so the plan takes its FLOPs from the unrolled step
  (equal to the plain plan's) while its memory is the scanned program's; remat=block costs FLOPs
  (the recomputed forward) and saves temporaries; microbatches=4 cuts the temporaries (measured 105 ->
  17 MiB) at the per-example FLOPs; attention=fused compiles to the same FLOPs and, on TPU, the same
  temporaries (no TPU kernel behind jax.nn.dot_product_attention);
* an oversized config (a 6144-wide tower, replicated: mesh 4 x 1 x 1) is reported as not fitting, by how much;
* the block-boundary batch constraint (models/scale.constrain_batch) lowers the planned temporaries
  against the same step compiled without it;
* ``--step embed|explain|invert``: the inference programs compile with the same report; their FLOPs
  scale with the batch, and MaskInversion's step loop is counted once per step (not once in all);
* ``--search`` ranks the plans that fit by estimated step time and leaves out the one that does not;
* a mesh that no subset of a torus' physical axes matches (v5p 4x4x4, 4 x 8 x 2) is still built.
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common
from trace_jax import objectives

INFO = {"vocab_size": 1000, "context_length": 8}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _libtpu_or_skip():
  try:
    import libtpu  # noqa: F401
  except ImportError:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]', which `make test` does)")


@pytest.fixture(scope="module")
def devices():
  _libtpu_or_skip()
  from trace_jax.training import plan as plan_lib
  return plan_lib.topology("v5e:2x2")


def _config(**model):
  """The tiny preset with one block per tower unless ``model`` says otherwise: each block more costs
  the libtpu compile ~35 % here, and what these tests check does not need depth (those that do set it)."""
  c = common.get_config()
  c.data.name, c.data.image_size, c.data.batch_size = "random", 32, 32
  c.data.context_length, c.data.vocab_size = 8, 1000
  c.model.preset = "tiny"
  c.model.vision_layers, c.model.text_layers = 1, 1
  for k, v in model.items():
    c.model[k] = v
  return c


_PLANS = {}   # (batch, mesh, model options) -> Plan of the unpatched model


def _plan(devices, batch, mesh=(2, 2, 1), **model):
  """The plain plan of the unpatched model, compiled once per module: the deep batch-512 plan is the
  baseline of two tests. A plan that depends on anything else (a cost_plan, microbatches, a test's
  monkeypatch of the model code) compiles through ``_compile``, which keeps nothing."""
  key = (batch, tuple(mesh), tuple(sorted(model.items())))
  if key not in _PLANS:
    _PLANS[key] = _compile(devices, batch, mesh, **model)
  return _PLANS[key]


def _compile(devices, batch, mesh=(2, 2, 1), cost_plan=None, microbatches=1, **model):
  from trace_jax.training import plan as plan_lib
  config = _config(**model)
  cost = objectives.make(_config(**{**model, "scan_layers": False}), INFO) if model.get("scan_layers") else None
  plain = objectives.make(_config(**{**model, "remat": "none"}), INFO) if model.get("remat") else None
  return plan_lib.compile_train_step(objectives.make(config, INFO), config, devices, "v5e:2x2", batch=batch,
                                     mesh_shape=mesh, microbatches=microbatches, cost_task=cost, model_task=plain,
                                     cost_plan=cost_plan)


def test_plan_memory_and_flops_scale_with_batch(devices):
  from trace_jax.training import plan as plan_lib
  assert len(devices) == 4 and "v5" in devices[0].device_kind.lower()
  p32, p64 = _plan(devices, 32), _plan(devices, 64)
  for p in (p32, p64):
    assert p.compiled and p.fits and p.hbm_bytes == 16 * plan_lib.GiB
    assert p.flops_per_chip > 0 and p.step_time_s > 0 and 0 < p.mfu_bound <= 1
  assert p64.temp_bytes >= p32.temp_bytes and p64.argument_bytes > p32.argument_bytes
  ratio = p64.flops_per_chip / p32.flops_per_chip
  assert 1.6 < ratio <= 2.0, ratio
  # the jaxpr counts (flops.py): the per-example matmuls double, the B x B logits quadruple
  r = p64.model_flops_per_chip / p32.model_flops_per_chip
  assert 2.0 < r < 2.05 and p32.hw_flops_per_chip == p32.model_flops_per_chip, r   # no remat: equal
  spec = plan_lib.CHIPS["v5e"]
  assert p32.mfu_bound == pytest.approx(p32.model_flops_per_chip / spec["bf16_flops"] / p32.step_time_s)
  # arguments = this chip's shard of (params + Adam mu, nu + step/rng) + its rows of the batch
  task = objectives.make(_config(), INFO)
  shapes = nn.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
  ru = lambda n, m: -(-n // m) * m
  # TPU layouts tile the last two dims by (8, 128): the upper bound pads every leaf (a rank-1 leaf to 8 x 128)
  pad = lambda s: 1 if not s else (ru(s[0], 128) * 8 if len(s) == 1 else int(np.prod(s[:-2])) * ru(s[-2], 8) * ru(s[-1], 128))
  n_padded = sum(pad(a.shape) for a in jax.tree.leaves(shapes))
  batch_bytes = 32 * (32 * 32 * 3 * 4 + 2 * 8 * 4 + 32 * 32 * 4 + 4)
  upper = 3 * n_padded * 4 + 4 * batch_bytes + 4096          # unsharded, padded params + mu + nu; padded batch
  lower = 3 * n_params * 4 / 2 + batch_bytes / 4             # fsdp=2 splits at most every leaf in two
  assert lower <= p32.argument_bytes <= upper, (lower, p32.argument_bytes, upper)
  text = plan_lib.format_plan(p32)
  assert "fits" in text and "FLOPs" in text and "not measurements" in text


DEEP = dict(vision_layers=4, text_layers=1, image_size=64)


@pytest.mark.slow
def test_plan_scan_layers_and_remat_show_their_memory(devices):
  """A 4-block image tower (65 tokens: 64 px / 8; one text block, 8 tokens: little to save, and each
  block costs compile time), batch 512: with the batch split at every block boundary the saved
  activations (attention probabilities, MLP hidden) dominate the temporaries, and remat=block keeps
  only each block's input (measured: temporaries 100 MiB plain, 25 MiB remat=block; FLOPs +25 %)."""
  vl, tl = DEEP["vision_layers"], DEEP["text_layers"]
  plain = _plan(devices, 512, **DEEP)
  scanned = _compile(devices, 512, scan_layers=True, cost_plan=plain, **DEEP)   # plain: its XLA cost, not compiled again
  with pytest.raises(ValueError, match="cost_plan must be the plain"):
    _compile(devices, 256, scan_layers=True, cost_plan=plain, **DEEP)
  assert scanned.compiled and scanned.flops_per_chip == pytest.approx(plain.flops_per_chip, rel=1e-6)
  remat = _plan(devices, 512, remat="block", **DEEP)
  print({k: (p.temp_bytes, p.flops_per_chip) for k, p in (("plain", plain), ("scan", scanned), ("remat", remat))})
  assert remat.compiled and remat.flops_per_chip > plain.flops_per_chip      # the recomputed forward
  assert remat.temp_bytes < plain.temp_bytes                                  # fewer saved activations
  # jaxpr counts (flops.py): a scan counts its body x layers (= the unrolled step's), remat's model
  # FLOPs are the plain step's, its hardware FLOPs add exactly one forward of every block of both
  # towers (the textbook count: q/k/v/out, QK^T, attention x V, MLP fc) but the block's last matmul
  # (mlp_proj: its backward needs its input, not its output, so JAX's remat does not recompute it)
  assert scanned.hw_flops_per_chip == plain.hw_flops_per_chip == plain.model_flops_per_chip > 0
  assert remat.model_flops_per_chip == plain.model_flops_per_chip
  blocks = lambda rows, n, w, l: rows * l * (3 * 2 * n * w * w + 2 * 2 * n * n * w + 2 * n * w * w + 2 * n * w * 4 * w)
  extra = (blocks(512, 1 + (64 // 8) ** 2, 64, vl) + blocks(512, 8, 32, tl)) / 4      # per chip of 4
  assert remat.hw_flops_per_chip - plain.hw_flops_per_chip == extra


def test_mesh_on_a_torus_whose_axes_do_not_multiply_to_the_mesh_axes():
  """v5p:4x4x4 (64 chips) and mesh 4 x 8 x 2: no subset of the physical axes (4, 4, 4) multiplies to 8
  or 2, so jax.make_mesh refuses; make_mesh splits the physical axes instead (the --search space has
  tensor = 2 meshes on every topology). Where jax finds an assignment, make_mesh keeps it."""
  _libtpu_or_skip()
  from trace_jax.training import mesh as mesh_lib
  from trace_jax.training import plan as plan_lib
  devs = plan_lib.topology("v5p:4x4x4")
  with pytest.raises(NotImplementedError):
    jax.make_mesh((4, 8, 2), mesh_lib.AXES, devices=devs)
  m = mesh_lib.make_mesh(4, 8, 2, devices=devs)
  assert dict(m.shape) == {"data": 4, "fsdp": 8, "tensor": 2}
  assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in devs)   # every chip once
  kept = mesh_lib.make_mesh(4, 16, 1, devices=devs)
  assert (kept.devices == jax.make_mesh((4, 16, 1), mesh_lib.AXES, devices=devs).devices).all()


def test_plan_reports_oversized_config_as_not_fitting(devices):
  p = _plan(devices, 64, mesh=(4, 1, 1), vision_width=6144, text_width=4096, vision_layers=2, text_layers=2)
  assert not p.fits and p.bytes_per_chip > p.hbm_bytes
  from trace_jax.training import plan as plan_lib
  assert "DOES NOT FIT" in plan_lib.format_plan(p)


def test_plan_command_line(tmp_path):
  """The command end to end (its own process: libtpu topology, config file, --set, --json)."""
  _libtpu_or_skip()
  cfg = tmp_path / "cfg.py"
  cfg.write_text("from configs import common\n\ndef get_config():\n  c = common.get_config()\n"
                 "  c.data.name, c.data.image_size, c.data.context_length = 'random', 32, 8\n"
                 "  c.model.preset = 'tiny'\n  c.model.vision_layers = c.model.text_layers = 1\n  return c\n")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  out = subprocess.run([sys.executable, "-m", "trace_jax.cli", "plan", "--config", str(cfg), "--topology",
                        "v5e:2x2", "--batch", "32", "--mesh", "2,2,1", "--set", "model.remat=block",
                        "--json", str(tmp_path / "p.jsonl")], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "remat=block" in out.stdout and "roofline step time" in out.stdout and "fits" in out.stdout
  import json
  row = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
  assert row["fits"] and row["flops_per_chip"] > 0 and row["mesh"] == [2, 2, 1]
  # remat=block: the model FLOPs (remat off, built by the command) are below the hardware FLOPs
  assert 0 < row["model_flops_per_chip"] < row["hw_flops_per_chip"] and "hardware" in out.stdout


@pytest.mark.slow
def test_block_batch_constraint_lowers_planned_temporaries(devices, monkeypatch):
  """The same tiny step on v5e:2x2 (mesh 1 x 4 x 1, batch 64) with and without the block-boundary batch
  constraint (measured: 0.0 vs 19.7 MiB of temporaries; ViT-B/16 at batch 32k on v5e:16x16 with
  remat=block: 4.7 vs 49.7 GiB, docs/scaling.md)."""
  from trace_jax.models import layers
  deep = dict(vision_layers=2, text_layers=2)
  on = _plan(devices, 64, mesh=(1, 4, 1), **deep)
  monkeypatch.setattr(layers, "constrain_batch", lambda x: x)   # the model without the constraint
  off = _compile(devices, 64, (1, 4, 1), **deep)   # not _plan: the patched model must compile anew
  print("temporaries with / without the constraint:", on.temp_bytes, off.temp_bytes)
  assert on.compiled and off.compiled
  assert on.temp_bytes < off.temp_bytes and on.bytes_per_chip < off.bytes_per_chip
  assert on.flops_per_chip <= 1.05 * off.flops_per_chip


def _base_config(tmp_path, vision_layers=1):
  """The tiny config file of the command tests (one text block; LeGrad's default layers need 2 vision blocks)."""
  cfg = tmp_path / "cfg.py"
  cfg.write_text("from configs import common\n\ndef get_config():\n  c = common.get_config()\n"
                 "  c.data.name, c.data.image_size, c.data.context_length = 'random', 32, 8\n"
                 f"  c.model.preset = 'tiny'\n  c.model.vision_layers, c.model.text_layers = {vision_layers}, 1\n"
                 "  return c\n")
  return str(cfg)


@pytest.mark.slow
def test_plan_inference_steps(devices, tmp_path):
  """embed / explain / invert on v5e:2x2 (mesh 4 x 1 x 1: params replicated, rows split, as inference
  runs them). embed FLOPs double with the batch; legrad costs more than the embed forward of the same
  pairs (its backward); MaskInversion's FLOPs grow with its steps (XLA alone counts the step loop once:
  10 and 20 steps measured equal before the loop-unrolled cost compile)."""
  from trace_jax.cli import plan as cli
  from trace_jax.training import plan as plan_lib
  config = cli._config(_base_config(tmp_path, vision_layers=2), [])
  p = {}
  for step, batch, kw in (("embed", 32, {}), ("embed", 64, {}), ("explain", 32, {}),
                          ("invert", 8, dict(masks=2, inv_steps=2)), ("invert", 8, dict(masks=2, inv_steps=4))):
    p[step, batch, kw.get("inv_steps")] = q = cli.plan_inference(step, config, devices, "v5e:2x2", batch=batch, **kw)
    assert q.compiled and q.fits and q.flops_per_chip > 0 and q.mesh == (4, 1, 1) and q.options["step"] == step
    assert "roofline step time" in plan_lib.format_plan(q)
  ratio = p["embed", 64, None].flops_per_chip / p["embed", 32, None].flops_per_chip
  assert 1.9 < ratio < 2.1, ratio
  assert p["explain", 32, None].flops_per_chip > 1.15 * p["embed", 32, None].flops_per_chip   # measured 1.33x
  inv2, inv4 = p["invert", 8, 2], p["invert", 8, 4]
  assert inv2.options["steps"] == 2 and inv2.options["mode"] in ("exact", "decomposed")
  assert inv4.flops_per_chip > 1.05 * inv2.flops_per_chip, (inv2.flops_per_chip, inv4.flops_per_chip)
  with pytest.raises(ValueError, match="inference step must be one of"):
    cli.plan_inference("train", config, devices, "v5e:2x2", batch=32)


def test_plan_command_inference_step_and_search_flag_errors(devices, tmp_path, capsys):
  """``run`` with --step embed writes its JSON row (atomically: no .tmp left); bad flags are named."""
  import argparse
  import json
  from trace_jax.cli import plan as cli
  ap = argparse.ArgumentParser()
  cli.add_arguments(ap)
  out = tmp_path / "p.jsonl"
  args = ap.parse_args(["--config", _base_config(tmp_path), "--step", "embed", "--batch", "32", "--json", str(out)])
  assert cli.run(args) == 0
  row = json.loads(out.read_text().splitlines()[0])
  assert row["fits"] and row["options"]["step"] == "embed" and not (tmp_path / "p.jsonl.tmp").exists()
  assert "step=embed" in capsys.readouterr().out
  for flags, msg in ((["--step", "explain", "--search"], "--search ranks train-step plans"),
                     (["--search", "--search-remat", "sometimes"], "--search-remat 'sometimes'"),
                     (["--search", "--search-microbatches", "0"], "positive integers")):
    with pytest.raises(ValueError, match=msg):
      cli.run(ap.parse_args(["--config", _base_config(tmp_path), "--batch", "32"] + flags))


def test_search_ranks_plans_that_fit(devices, tmp_path, monkeypatch):
  """--search on v5e:2x2, tiny model 512 wide with one block per tower, batch 64, with the chip's HBM set (for this test) to the bytes of
  the replicated params + Adam moments: the replicated mesh 4 x 1 x 1 then does not fit and is left
  out; the fsdp meshes (a half / a quarter of that state per chip) fit and come back sorted by
  estimated step time. (A real over-HBM compile error is test_plan_reports_oversized_config_as_not_fitting.)"""
  from trace_jax.cli import plan as cli
  from trace_jax.training import plan as plan_lib
  # one block per tower (each block costs XLA:TPU compile time, not what is tested); state > activations
  path, sets = _base_config(tmp_path), ["model.vision_width=512", "model.text_width=512", "model.vision_layers=1",
                                        "model.text_layers=1"]
  task = cli._task(cli._config(path, sets))
  n_params = sum(int(np.prod(a.shape)) for a in
                 jax.tree.leaves(nn.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))))
  monkeypatch.setitem(plan_lib.CHIPS, "v5e", {**plan_lib.CHIPS["v5e"], "hbm_bytes": 3 * 4 * n_params})
  seen = []
  plans, fit = cli.search(path, sets, devices, "v5e:2x2", batch=64,
                          meshes=[(4, 1, 1), (2, 2, 1), (1, 4, 1)], remats=("none",), attentions=("explicit",),
                          microbatches=(1, 3), on_plan=seen.append)
  print([(p.mesh, p.bytes_per_chip, p.hbm_bytes, p.step_time_s) for p in plans])
  assert len(plans) == 3 and seen == plans          # microbatches=3 does not divide 64: skipped, not planned
  wide = [p for p in plans if p.mesh == (4, 1, 1)]
  assert len(wide) == 1 and wide[0].compiled and not wide[0].fits and wide[0] not in fit
  assert len(fit) == 2 and all(p.fits for p in fit) and {p.mesh for p in fit} == {(2, 2, 1), (1, 4, 1)}
  times = [p.step_time_s for p in fit]
  assert times == sorted(times) and times[0] > 0
  # known plans (a cache's rows, through Plan.row / from_row) are taken, not compiled again (the
  # cells not known are compiled: the first search above)
  seen2 = []
  known = [plan_lib.Plan.from_row(json.loads(json.dumps(p.row()))) for p in plans]
  plans2, fit2 = cli.search(path, sets, devices, "v5e:2x2", batch=64, meshes=[(4, 1, 1), (2, 2, 1), (1, 4, 1)],
                            remats=("none",), attentions=("explicit",), microbatches=(1,), on_plan=seen2.append,
                            known=known)
  assert plans2 == known and seen2 == []
  assert [p.mesh for p in fit2] == [p.mesh for p in fit]
  # a tie on estimated time (compute-bound plans of the same FLOPs) ranks the plan with fewer bytes per chip first
  a, b = (plan_lib.Plan.from_row(json.loads(json.dumps(p.row()))) for p in fit)
  b.step_time_s, b.bytes_per_chip = a.step_time_s, a.bytes_per_chip / 2
  _, tied = cli.search(path, sets, devices, "v5e:2x2", batch=64, meshes=[a.mesh, b.mesh], remats=("none",),
                       attentions=("explicit",), microbatches=(1,), known=[a, b])
  assert tied == [b, a]


@pytest.mark.slow
def test_plan_microbatches_and_fused_attention_show_their_memory(devices):
  """microbatches=4 at batch 512 (DEEP: the activations dominate, as above): the scanned step keeps one microbatch's
  activations (128 rows), so its temporaries fall against the plain step's, at the same per-example
  FLOPs (jaxpr counts: the plain step's less 3/4 of the contrastive logits' B x B matmuls, which shrink
  to M x (B/M)^2); its XLA cost is M x the unrolled step's at batch 128 (XLA counts a loop body once).
  attention=fused compiles to the same jaxpr FLOPs (the same matmuls through jax.nn.dot_product_attention);
  on TPU it saves no memory (no TPU kernel: XLA's own implementation, benchmarks/RESULTS.md), which the
  plan shows rather than this test asserting a saving (measured: temporaries 105 MiB plain and fused,
  17 MiB microbatches=4)."""
  from trace_jax.training import plan as plan_lib
  plain = _plan(devices, 512, **DEEP)
  small = _plan(devices, 128, **DEEP)
  mb = _compile(devices, 512, microbatches=4, cost_plan=small, **DEEP)
  fused = _plan(devices, 512, attention="fused", **DEEP)
  print({k: (p.temp_bytes, p.hw_flops_per_chip) for k, p in (("plain", plain), ("mb4", mb), ("fused", fused))})
  assert mb.compiled and mb.options["microbatches"] == 4
  assert mb.temp_bytes < 0.5 * plain.temp_bytes, (mb.temp_bytes, plain.temp_bytes)
  assert mb.flops_per_chip == 4 * small.flops_per_chip and mb.hbm_accessed_per_chip == 4 * small.hbm_accessed_per_chip
  assert 0.97 * plain.hw_flops_per_chip < mb.hw_flops_per_chip < plain.hw_flops_per_chip
  assert fused.compiled and fused.options["attention"] == "fused"
  assert fused.hw_flops_per_chip == plain.hw_flops_per_chip == fused.model_flops_per_chip
  assert "microbatches=4" in plan_lib.format_plan(mb) and "attention=fused" in plan_lib.format_plan(fused)
