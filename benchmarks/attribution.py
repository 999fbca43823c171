"""Attribution timings: trace_jax vs the PyTorch peers, same weights, same machine, one run.

    python benchmarks/attribution.py                       # all registered cases, ViT-B/16-sized model
    python benchmarks/attribution.py --cases gradcam --model small --n 3   # quick smoke run
    python benchmarks/attribution.py --cases legrad m2ib --n 3             # the other two peers
    python benchmarks/attribution.py --cases legrad_siglip --n 3           # LeGrad on SigLIP B/16

Harness: ``timeit`` (warm-up calls, then the median of n timed calls; JAX results are blocked on),
a registry of cases (``@case('name')`` functions returning ``Row``s) and a markdown ratio table
(``peer / ours``: > 1 means trace_jax is faster). LeGrad and M2IB cases live beside their methods'
helpers (``legrad_bench.py``, ``m2ib_bench.py``, run in subprocesses; ``legrad_siglip_bench.py``
in-process); MaskInversion has its own
script (``maskinversion.py``). More cases: a function decorated with ``@case('name')`` here or in a
module imported by ``--import``, returning rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass
class Row:
  case: str
  setting: str
  ours_s: float
  peer_s: float | None
  peer: str = ""
  note: str = ""

  @property
  def ratio(self) -> float | None:
    return None if self.peer_s is None else self.peer_s / self.ours_s


CASES: dict[str, Callable] = {}


def case(name: str):
  """Register ``fn(ctx) -> list[Row]`` under ``name``."""
  def deco(fn):
    CASES[name] = fn
    return fn
  return deco


def block(x):
  import jax
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def timeit(fn: Callable, n: int = 5, warmup: int = 1) -> float:
  """Median wall time of ``n`` calls after ``warmup`` calls (compilation happens in the warm-up)."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(n):
    t = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def markdown(rows: list[Row], title: str = "") -> str:
  lines = [f"### {title}", ""] if title else []
  lines += ["| case | setting | trace_jax (s) | peer | peer (s) | peer / ours | note |",
            "|---|---|---:|---|---:|---:|---|"]
  for r in rows:
    peer = "–" if r.peer_s is None else f"{r.peer_s:.4f}"
    ratio = "–" if r.ratio is None else f"{r.ratio:.2f}×"
    lines.append(f"| {r.case} | {r.setting} | {r.ours_s:.4f} | {r.peer} | {peer} | {ratio} | {r.note} |")
  return "\n".join(lines)


@dataclasses.dataclass
class Context:
  """What every case gets: a model + weights shared by both sides, the timing parameters."""
  model_name: str
  n: int
  warmup: int
  seed: int = 0
  _cache: dict = dataclasses.field(default_factory=dict)

  def model(self):
    if "model" not in self._cache:
      import jax
      from trace_jax.models import build, get_config, init_params
      cfg = get_config(self.model_name)
      self._cache["model"] = (cfg, build(cfg), init_params(cfg, jax.random.PRNGKey(self.seed)))
    return self._cache["model"]

  def inputs(self, num_images: int, num_texts: int, size: int | None = None):
    cfg, _, _ = self.model()
    s = size or cfg.vision.image_size
    r = np.random.default_rng(self.seed)
    images = r.normal(size=(num_images, s, s, 3)).astype(np.float32)
    L = min(cfg.text.context_length, 16)
    ids = r.integers(1, cfg.text.vocab_size - 2, size=(num_texts, L)).astype(np.int32)
    ids[:, 8] = cfg.text.vocab_size - 1  # end-of-text (argmax pooling)
    return images, ids


# ----------------------------------------------------------------------------- GradCAM vs grad-cam


@case("gradcam")
def gradcam_case(ctx: Context) -> list[Row]:
  """AMC-style ViT GradCAM (last block attention, F * relu(G), mean over heads) vs grad-cam's
  ``GradCAMElementWise`` on the same attention probabilities (the definitions coincide, see
  tests/test_attribution_methods.py). The peer needs one forward per pair (a batch of repeated images
  for 1 image x P prompts); trace_jax runs one image forward and vmaps the P backwards."""
  import jax
  import torch
  from pytorch_grad_cam import GradCAMElementWise
  from trace_jax.testing import CosTarget, torch_visual
  from trace_jax.attribution import common
  from trace_jax.attribution.api import explain_fn
  torch.set_num_threads(2)
  cfg, model, params = ctx.model()
  tv = torch_visual(params, cfg, torch)
  g = cfg.vision.image_size // cfg.vision.patch_size
  cam = GradCAMElementWise(tv, [tv.blocks[-1].probs],
                           reshape_transform=lambda x: x[:, :, 0, 1:].reshape(x.shape[0], x.shape[1], g, g))
  f = explain_fn("gradcam", model)
  rows = []
  for setting, ni, nt in (("1 pair", 1, 1), ("1 image x 8 prompts", 1, 8), ("8 pairs", 8, 8)):
    images, ids = ctx.inputs(ni, nt)
    txt = np.asarray(common.text_targets(model, params, ids))
    ours = timeit(lambda: f(params, images, ids), ctx.n, ctx.warmup)
    x = torch.tensor(images).permute(0, 3, 1, 2).contiguous()
    if ni == 1 and nt > 1:
      x = x.expand(nt, -1, -1, -1).contiguous()
    targets = [CosTarget(t, torch) for t in txt]
    peer = timeit(lambda: cam(x, targets=targets), ctx.n, ctx.warmup)
    rows.append(Row("gradcam", f"{setting} @{cfg.vision.image_size}", ours, peer, "grad-cam GradCAMElementWise"))
  return rows


# ----------------------------------------------------------------------------- LeGrad, M2IB

def _sibling(name: str):
  """Load benchmarks/<name>.py by file name (benchmarks/ is not a package; maskinversion.py there
  would shadow the authors' package if the folder were on sys.path)."""
  spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(HERE, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@case("legrad")
def legrad_case(ctx: Context) -> list[Row]:
  """LeGrad vs legrad-torch on random ViT-B/16 open_clip weights, each side in a fresh process
  (benchmarks/legrad_bench.py; ``--model`` does not apply: the peer needs an open_clip model)."""
  import tempfile
  lb = _sibling("legrad_bench")
  rows = []
  with tempfile.TemporaryDirectory() as d:
    weights = os.path.join(d, "vitb16.pt")
    lb.save_weights(weights)
    for size in (224, 448):
      for name in lb.CASES:
        t = lb.run_case("torch", name, size, ctx.n, weights, script=lb.__file__)
        j = lb.run_case("jax", name, size, ctx.n, weights, script=lb.__file__)
        rows.append(Row("legrad", f"{name} @{size}", j["median"], t["median"], "legrad-torch 1.1"))
  return rows


@case("m2ib")
def m2ib_case(ctx: Context) -> list[Row]:
  """M2IB (image + text maps of one pair) vs the PyTorch port of the authors' code
  (benchmarks/m2ib_bench.py in a subprocess; ViT-B/16-sized random HF CLIP)."""
  import json
  import subprocess
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "m2ib.json")
    subprocess.run([sys.executable, os.path.join(HERE, "m2ib_bench.py"), "--runs", str(ctx.n),
                    "--torch-runs", "1", "--skip-parity", "--json", out], check=True,
                   stdout=subprocess.DEVNULL)
    with open(out) as f:
      r = json.load(f)
  ours = r["ours_warm_median_s"]
  return [Row("m2ib", "1 pair, image + text", ours, r["torch_official_median_s"], "torch port, as official"),
          Row("m2ib", "1 pair, image + text", ours, r["torch_frozen_median_s"], "torch port, frozen weights")]


@case("legrad_siglip")
def legrad_siglip_case(ctx: Context) -> list[Row]:
  """LeGrad on SigLIP B/16 (random ``ViT-B-16-SigLIP`` weights, open_clip 2.23.0), 1 image x 8 prompts
  at 224 px, vs legrad-torch's ``compute_legrad_siglip`` on the same weights in this process
  (benchmarks/legrad_siglip_bench.py ``measure``; ``--model`` does not apply). Theirs gives one map
  per call (the score summed over its prompts), so 8 maps are 8 calls; their single call with all 8
  prompts (one summed map) is the second row."""
  r = _sibling("legrad_siglip_bench").measure(ctx.n, 224, 8)
  setting = f"1 image x {r['prompts']} prompts @{r['size']}"
  return [Row("legrad_siglip", setting, r["ours"], r["peer_loop"], "legrad-torch 1.1",
              f"theirs: {r['prompts']} calls, one map each"),
          Row("legrad_siglip", setting, r["ours"], r["peer_one"], "legrad-torch 1.1",
              f"theirs: 1 call = ONE map of the summed prompts (ours: {r['prompts']} maps)")]


THROUGHPUT_METHODS = ("legrad", "gradcam", "rollout", "chefer", "saliency")


@case("throughput")
def throughput_case(ctx: Context, batch: int = 64) -> list[Row]:
  """Maps per second at batch ``batch`` (64 distinct image-text pairs in one jitted call) for the
  methods that need no optimisation loop, on whatever backend jax has (the GPU figure of issue 10:
  ``python benchmarks/attribution.py --cases throughput`` on the device machine). ``ours_s`` is the
  time of one batch; the setting column carries maps/s. No peer: legrad-torch and grad-cam have no
  batched multi-pair API to compare against (their per-pair times are in the other cases)."""
  from trace_jax.attribution.api import explain_fn
  _, model, params = ctx.model()
  images, ids = ctx.inputs(batch, batch)
  rows = []
  for m in THROUGHPUT_METHODS:
    f = explain_fn(m, model)
    t = timeit(lambda: f(params, images, ids), ctx.n, ctx.warmup)
    rows.append(Row(m, f"{batch} pairs: {batch / t:.1f} maps/s", t, None))
  return rows


def _peak_mb() -> str:
  """The process's peak device memory so far (accelerators), '' where the backend has no stats."""
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # CPU backends may not implement memory_stats
    stats = {}
  return f"peak {stats['peak_bytes_in_use'] / 2 ** 20:.0f} MiB" if "peak_bytes_in_use" in stats else ""


@case("maskinversion_jax")
def maskinversion_jax_case(ctx: Context, masks=(1, 10, 50, 100), steps: int = 10) -> list[Row]:
  """MaskInversion alone (no peer: JAX only, so it runs on a device machine without PyTorch), both
  modes, ``masks`` x ``steps`` at the model's size and 10 masks at twice the size (position
  embeddings resampled): the GPU figure of issue 11 (100 masks x 10 steps <= 0.05 s on ViT-B/16; the
  paper's Table 5: 0.44 s). Official defaults (layer -1, lr 0.1, alpha 0). Cases run smallest
  first, so the process's peak device memory after a case is that case's."""
  import jax.numpy as jnp
  from trace_jax.inversion import invert
  make_masks = _sibling("maskinversion").make_masks  # the peer benchmark's random rectangles
  cfg, model, params = ctx.model()
  rows = []
  base = cfg.vision.image_size
  for k, size in [(k, base) for k in masks] + [(10, 2 * base)]:
    images, _ = ctx.inputs(1, 1, size)
    m = make_masks(k, size, seed=k)
    image = jnp.asarray(images[0])
    for mode in ("decomposed", "exact"):
      t = timeit(lambda: invert(model, params, image, m, mode=mode, steps=steps)["lets"], ctx.n,
                 ctx.warmup)
      rows.append(Row("maskinversion", f"{mode}, {k} masks x {steps} steps @{size}", t, None,
                      note=_peak_mb()))
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", nargs="*", default=None, help=f"default: all registered")
  p.add_argument("--model", default="ViT-B-16", help="config preset (random weights)")
  p.add_argument("--n", type=int, default=5, help="timed calls per measurement (median)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--import", dest="imports", action="append", default=[],
                 help="extra module(s) that register cases (e.g. benchmarks.attribution_legrad)")
  p.add_argument("--out", default=None, help="append the markdown table to this file")
  args = p.parse_args(argv)
  for m in args.imports:
    importlib.import_module(m)
  names = args.cases or list(CASES)
  unknown = [n for n in names if n not in CASES]
  if unknown:
    p.error(f"unknown cases {unknown}; registered: {sorted(CASES)}")
  import jax
  ctx = Context(args.model, args.n, args.warmup)
  rows = []
  for name in names:
    rows += CASES[name](ctx)
  title = (f"{args.model}, random weights, median of {args.n} (warm-up {args.warmup}); "
           f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
           f"on {jax.devices()[0].platform}")
  table = markdown(rows, title)
  print(table)
  if args.out:
    with open(args.out, "a") as f:
      f.write(table + "\n\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
