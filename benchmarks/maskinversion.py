"""MaskInversion: trace_jax (decomposed / exact) vs the authors' maskinversion-torch 1.1 — the paper's
table 5 on this machine. Same random ViT-B/16-sized open_clip weights, 10 steps, official defaults
(layer_index -1, lr 0.1, AdamW, wd 0, alpha 0), random rectangular masks at image size.

    python benchmarks/maskinversion.py [--quick] [--n 3] [--masks 1 10 50 100] [--out-md F]

Each (implementation, case) runs in a fresh subprocess: model build, one warm-up call (JAX: compile
+ run, reported as 'first'), then the median of n timed calls; peak RSS of that process. Timed: the
official ``compute_maskinversion(image[1], masks[K])`` (its K-copy forward included) and
``invert(model, params, image, masks, mode=...)`` up to ``block_until_ready`` (forward included).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

# This file's name shadows the authors' `maskinversion` package when run as a script: drop its
# folder from the path and load the sibling helper module by file name.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
_spec = importlib.util.spec_from_file_location("legrad_bench", os.path.join(_HERE, "legrad_bench.py"))
lb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lb)

IMPLS = ("torch", "decomposed", "exact")


def make_masks(k, size, seed=0):
  rng = np.random.default_rng(seed)
  m = np.zeros((k, size, size), np.float32)
  for i in range(k):
    h, w = rng.integers(size // 8, size // 2, 2)
    y, x = rng.integers(0, size - h), rng.integers(0, size - w)
    m[i, y:y + h, x:x + w] = 1
  return m


def child(args):
  k, s = args.k, args.size
  img = np.random.default_rng(1).standard_normal((1, 3, s, s)).astype(np.float32)
  masks = make_masks(k, s)
  if args.impl == "torch":
    import torch
    from maskinversion import MaskInversion
    with contextlib.redirect_stdout(io.StringIO()):
      w = MaskInversion(lb.load_torch(args.weights))
    ti, tm = torch.tensor(img), torch.tensor(masks)
    base = lb.rss_mb()
    fn = lambda: w.compute_maskinversion(ti, tm).detach()
  else:
    import jax
    from trace_jax.inversion import invert
    model, params = lb.load_jax(args.weights)
    x = jax.numpy.asarray(img[0].transpose(1, 2, 0))
    base = lb.rss_mb()
    fn = lambda: jax.block_until_ready(invert(model, params, x, masks, mode=args.impl)["lets"])
  first, med, lo, hi = lb.timed(fn, args.n)
  print(json.dumps(dict(first=first, median=med, min=lo, max=hi, base_mb=base, peak_mb=lb.rss_mb())))


def run_case(impl, k, size, n, weights):
  out = subprocess.run([sys.executable, __file__, "--child", "--impl", impl, "--k", str(k), "--size",
                        str(size), "--n", str(n), "--weights", weights], capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{impl} K={k} {size}px failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--child", action="store_true")
  p.add_argument("--impl")
  p.add_argument("--k", type=int)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--weights")
  p.add_argument("--n", type=int, default=3)
  p.add_argument("--torch-n", type=int, default=None,
                 help="timed torch calls (default --n); 0 = its first call only (no compile to amortise)")
  p.add_argument("--masks", type=int, nargs="+", default=[1, 10, 50, 100])
  p.add_argument("--impls", nargs="+", default=list(IMPLS))
  p.add_argument("--no-448", action="store_true", help="skip the 10 masks at 448 px case")
  p.add_argument("--quick", action="store_true", help="1 and 10 masks at 224, n=1")
  p.add_argument("--out-md", help="append the markdown table here")
  args = p.parse_args()
  if args.child:
    return child(args)
  cases = [(k, 224) for k in args.masks] + ([] if args.no_448 else [(10, 448)])
  n = args.n
  if args.quick:
    cases, n = [(1, 224), (10, 224)], 1
  with tempfile.TemporaryDirectory() as d:
    weights = os.path.join(d, "vitb16.pt")
    lb.save_weights(weights)
    cols = " | ".join(f"{i} s (first) | {i} MB" for i in args.impls)
    rows = [f"| masks | size | {cols} | torch / decomposed | torch / exact | exact / decomposed |",
            "|---" * (5 + 2 * len(args.impls)) + "|"]
    for k, size in cases:
      tn = n if args.torch_n is None else args.torch_n
      res = {i: run_case(i, k, size, tn if i == "torch" else n, weights) for i in args.impls}
      cells = " | ".join(f"{res[i]['median']:.2f} ({res[i]['first']:.1f}) | {res[i]['peak_mb']:.0f}"
                         for i in args.impls)
      ratio = lambda a, b: (f"{res[a]['median'] / res[b]['median']:.1f}x" if a in res and b in res else "-")
      rows.append(f"| {k} | {size} | {cells} | {ratio('torch', 'decomposed')} | {ratio('torch', 'exact')} "
                  f"| {ratio('exact', 'decomposed')} |")
      print(rows[-1], flush=True)
  md = (lb.header(f"MaskInversion, ViT-B/16-sized random open_clip, 10 steps, median of {n}"
                     + ("" if args.torch_n is None else f" (torch: {'first call' if args.torch_n == 0 else f'median of {args.torch_n}'})")) + "\n"
        + "\n".join(rows) + "\n")
  print(md)
  if args.out_md:
    with open(args.out_md, "a") as f:
      f.write(md + "\n")


if __name__ == "__main__":
  main()
