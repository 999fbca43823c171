"""LeGrad: trace_jax vs the authors' legrad-torch 1.1, same random ViT-B/16-sized open_clip weights.

    python benchmarks/legrad_bench.py [--quick] [--n 5] [--sizes 224 448] [--out-md F]

Each (implementation, case) runs in a fresh subprocess (so peak RSS is that case's): model build,
one warm-up call (for JAX: compile + run, reported as 'first'), then the median of n timed calls.
Timed: the official ``compute_legrad_clip`` call (its ViT forward included; for pairs
``encode_image`` + ``compute_legrad_clip(image=None)``), and ``legrad.legrad(...)`` up to
``block_until_ready``. Inputs and text embeddings are prepared outside the timer.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

CASES = {  # name: (num images, num prompts, pairs, layer_index)
    "1 pair": (1, 1, False, -2),
    "1 image x 8 prompts": (1, 8, False, -2),
    "8 pairs": (8, 8, True, -2),
    "1 pair, all layers": (1, 1, False, 0),
}


def model_cfg():
  import open_clip
  mc = dict(open_clip.get_model_config("ViT-B-16"))
  mc["quick_gelu"] = True
  return mc


def save_weights(path, seed=0):
  import open_clip
  import torch
  torch.manual_seed(seed)
  m = open_clip.model.CLIP(**model_cfg())
  torch.save(m.state_dict(), path)


def load_torch(path):
  import open_clip
  import torch
  torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
  m = open_clip.model.CLIP(**model_cfg())
  m.load_state_dict(torch.load(path))
  return m.eval().float()


def load_jax(path):
  from trace_jax.convert.openclip import from_torch_model
  from trace_jax.models import build
  cfg, params = from_torch_model(load_torch(path), model_cfg())
  import jax
  params = jax.tree.map(jax.numpy.asarray, params)
  return build(cfg), params


def rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, n):
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  if n == 0:  # the first call is the only one (torch has no compilation: slow cases run once)
    return first, first, first, first
  ts = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return first, float(np.median(ts)), float(np.min(ts)), float(np.max(ts))


def child(args):
  rng = np.random.default_rng(0)
  nimg, nprompt, pairs, li = CASES[args.case]
  s = args.size
  imgs = rng.standard_normal((nimg, 3, s, s)).astype(np.float32)
  text = rng.standard_normal((nprompt, 512)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  if args.impl == "torch":
    import torch
    from legrad import LeWrapper
    with contextlib.redirect_stdout(io.StringIO()):
      w = LeWrapper(load_torch(args.weights), layer_index=li)
    ti, tt = torch.tensor(imgs), torch.tensor(text)
    base = rss_mb()
    if pairs:
      def fn():
        w.encode_image(ti)
        return w.compute_legrad_clip(tt, None).detach()
    else:
      fn = lambda: w.compute_legrad_clip(tt, ti).detach()
  else:
    import jax
    from trace_jax.attribution import legrad as lg
    model, params = load_jax(args.weights)
    x, q = jax.numpy.asarray(imgs.transpose(0, 2, 3, 1)), jax.numpy.asarray(text)
    base = rss_mb()
    fn = lambda: jax.block_until_ready(lg.legrad(model, params, x, q, layers=li)["map"])
  first, med, lo, hi = timed(fn, args.n)
  print(json.dumps(dict(first=first, median=med, min=lo, max=hi, base_mb=base, peak_mb=rss_mb())))


def run_case(impl, case, size, n, weights, script=__file__):
  out = subprocess.run([sys.executable, script, "--child", "--impl", impl, "--case", case, "--size",
                        str(size), "--n", str(n), "--weights", weights], capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{impl} {case} {size} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def header(title):
  import jax
  import torch
  return (f"### {title}\n\n{time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}; jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__} ({os.environ.get('BENCH_THREADS', '2')} threads)\n")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--child", action="store_true")
  p.add_argument("--impl")
  p.add_argument("--case")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--weights")
  p.add_argument("--n", type=int, default=5)
  p.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
  p.add_argument("--quick", action="store_true", help="224 only, n=2, the first three cases")
  p.add_argument("--out-md", help="append the markdown table here")
  args = p.parse_args()
  if args.child:
    return child(args)
  sizes, n, cases = args.sizes, args.n, list(CASES)
  if args.quick:
    sizes, n, cases = [224], 2, cases[:3]
  with tempfile.TemporaryDirectory() as d:
    weights = os.path.join(d, "vitb16.pt")
    save_weights(weights)
    rows = ["| size | case | legrad-torch s | trace_jax s | speed-up | trace_jax first call s | "
            "peak RSS MB torch / jax |", "|---|---|---|---|---|---|---|"]
    for size in sizes:
      for case in cases:
        t = run_case("torch", case, size, n, weights)
        j = run_case("jax", case, size, n, weights)
        rows.append(f"| {size} | {case} | {t['median']:.3f} | {j['median']:.3f} | "
                    f"{t['median'] / j['median']:.1f}x | {j['first']:.1f} | "
                    f"{t['peak_mb']:.0f} / {j['peak_mb']:.0f} |")
        print(rows[-1], flush=True)
  md = header(f"LeGrad, ViT-B/16-sized random open_clip, median of {n}") + "\n" + "\n".join(rows) + "\n"
  print(md)
  if args.out_md:
    with open(args.out_md, "a") as f:
      f.write(md + "\n")


if __name__ == "__main__":
  main()
