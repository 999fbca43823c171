"""MaskInversion at scale: many masks on one image, chunked by a memory budget, over 1..n devices.

    python benchmarks/maskinversion_scale.py [--quick] [--preset ViT-B-16] [--size 224 448]
        [--masks 1000] [--devices 1 2 4 8] [--budget-gb 24] [--mode exact] [--steps 10] [--repeat 1]

Each (size, devices) case runs in a fresh subprocess with ``--xla_force_host_platform_device_count``
= devices (emulated CPU devices: correctness and scaling of the program only; the figures that
matter come from an accelerator, benchmarks/device.sh). Random weights of the preset's shape.
Reported per case: the plan (calls x masks per call), first call (compile + run), a second timed
call (``--repeat 0``: none; masks/s then from the first call, compile included), masks/s, peak RSS
of the process, and max|LET - LET(1 device)| / max|LET| against the
1-device case of the same size (saved in a temp file), per mask. That error is held to the run's OWN
float32 sensitivity, not a fixed 1e-3: random ViT-B/16 weights at 100 masks amplify rounding (the
map's min-max, the dice's argmax cells) chaotically in a few masks, so that 1e-6 noise on the pixels
moves 20-30 of 100 masks beyond 1e-3 and the worst by ~1e-1. So the 1-device case also runs
``--sensitivity`` (default 3) more times with the image + N(0, 1e-6) noise, and a case passes when
the median mask agrees to 1e-3 (the bulk: a sharding bug moves most masks) and the worst mask moves
no more than 2 x the worst noise draw's (``judge``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def _peer_bench():
  """benchmarks/maskinversion.py, loaded by file name (its name would shadow the authors' package)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "maskinversion_bench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "maskinversion.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def child(a) -> None:
  import jax
  from trace_jax.inversion import maskinversion as mi
  from trace_jax.models import build, get_config, init_params
  cfg = get_config(a.preset)
  params = init_params(cfg, jax.random.PRNGKey(0))
  model = build(cfg)
  s = a.size
  img = np.random.default_rng(0).standard_normal((s, s, 3)).astype(np.float32)
  masks = _peer_bench().make_masks(a.masks, s)  # the random rectangles of benchmarks/maskinversion.py
  budget = a.budget_gb * 2 ** 30
  pl = mi.plan(cfg, (s, s), a.masks, 1, a.mode, budget=budget, num_devices=a.devices)
  kw = dict(mode=a.mode, steps=a.steps, budget=budget, devices=a.devices)
  t0 = time.perf_counter()
  out = mi.invert(model, params, img, masks, **kw)
  jax.block_until_ready(out["lets"])
  first = time.perf_counter() - t0
  second = None
  if a.repeat:
    t0 = time.perf_counter()
    out = mi.invert(model, params, img, masks, **kw)
    jax.block_until_ready(out["lets"])
    second = time.perf_counter() - t0
  lets = np.asarray(out["lets"])
  noise = []     # per noise draw: (max, median) over masks of |dLET| / max|LET|
  if a.devices == 1:   # the run's own float32 sensitivity (module docstring)
    for draw in range(1, a.sensitivity + 1):
      pert = img + np.random.default_rng(draw).normal(0, 1e-6, img.shape).astype(np.float32)
      other = np.asarray(mi.invert(model, params, pert, masks, **kw)["lets"])
      noise.append(_mask_errors(other, lets))
  err = None
  if a.ref and os.path.exists(a.ref):
    err = _mask_errors(lets, np.load(a.ref))
  elif a.ref:
    np.save(a.ref, lets)
  print(json.dumps({"size": s, "devices": a.devices, "calls": pl["calls"], "chunk": pl["chunk"],
                    "est_gb_per_device": pl["bytes_per_device"] / 1e9, "first_s": first,
                    "second_s": second, "masks_per_s": a.masks / (second or first),
                    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                    "let_err_vs_1_device": err, "let_err_1e-6_noise": noise}))


def _mask_errors(lets, ref) -> dict:
  """Per-mask max |lets - ref| / max|ref| -> {'max', 'median', 'over_1e-3' (count of masks)}."""
  per = np.abs(lets - ref).max(axis=1) / np.abs(ref).max()
  return {"max": float(per.max()), "median": float(np.median(per)), "over_1e-3": int((per > 1e-3).sum())}


def judge(err: dict, noise: list) -> tuple[bool, str]:
  """A case vs 1 device passes when its BULK agrees to float32 (median over masks <= 1e-3: a
  sharding bug, e.g. masks on the wrong rows or the wrong 1/K weights, moves most masks) and its
  worst mask moves no more than 1e-6 pixel noise moves one (max <= max(1e-3, 2 x the largest max
  over the noise draws): the optimisation amplifies rounding chaotically in a few masks, and
  reordered float32 sums are such a perturbation; seen here: one mask moving 5.9e-2 between two
  runs of the same 4-device program while 1e-6 noise moved 19-31 masks beyond 1e-3, up to 8.6e-2)."""
  worst = max([n["max"] for n in noise], default=0.0)
  tol = max(1e-3, 2 * worst)
  ok = err["median"] <= 1e-3 and err["max"] <= tol
  return ok, (f"max {err['max']:.1e} ({'<=' if err['max'] <= tol else 'ABOVE'} {tol:.1e}), median "
              f"{err['median']:.1e}, {err['over_1e-3']} masks > 1e-3")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="tiny model, 32 px, 300 masks, 2 steps")
  p.add_argument("--preset", default="ViT-B-16")
  p.add_argument("--size", type=int, nargs="+", default=[224, 448])
  p.add_argument("--masks", type=int, default=1000)
  p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  p.add_argument("--budget-gb", type=float, default=24.0)
  p.add_argument("--mode", default="exact", choices=("exact", "decomposed"))
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--repeat", type=int, default=1, choices=(0, 1), help="a second, timed call (0: none)")
  p.add_argument("--sensitivity", type=int, default=3,
                  help="1-device case: this many more calls with 1e-6 pixel noise (the tolerance of the others)")
  p.add_argument("--child", action="store_true")
  p.add_argument("--ref", default=None)
  a = p.parse_args()
  if a.child:
    a.size, a.devices = a.size[0], a.devices[0]
    return child(a)
  if a.quick:
    a.preset, a.size, a.masks, a.steps, a.budget_gb = "tiny", [32], 300, 2, 0.001
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for s in a.size:
      ref = os.path.join(tmp, f"ref{s}.npy")
      for d in sorted(a.devices):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}",
                   JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        cmd = [sys.executable, __file__, "--child", "--preset", a.preset, "--size", str(s),
               "--masks", str(a.masks), "--devices", str(d), "--budget-gb", str(a.budget_gb),
               "--mode", a.mode, "--steps", str(a.steps), "--repeat", str(a.repeat), "--ref", ref,
               "--sensitivity", str(a.sensitivity)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
          print(r.stderr[-3000:], file=sys.stderr)
          raise SystemExit(f"case size {s}, {d} devices failed")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
  print("\n| size | devices | calls x masks | est. GB/device | first s | second s | masks/s | peak RSS GB "
        "| per-mask LET error vs 1 device |")
  print("|---|---|---|---|---|---|---|---|---|")
  noise = {r["size"]: r["let_err_1e-6_noise"] for r in rows if r["devices"] == 1}
  failed = []
  for r in rows:
    sec = "—" if r["second_s"] is None else f"{r['second_s']:.2f}"
    if r["let_err_vs_1_device"] is None:
      cell = "— (1e-6 noise, per draw: " + "; ".join(
          f"max {n['max']:.1e}, median {n['median']:.1e}, {n['over_1e-3']} > 1e-3" for n in r["let_err_1e-6_noise"]) + ")"
    else:
      ok, cell = judge(r["let_err_vs_1_device"], noise.get(r["size"], []))
      if not ok:
        failed.append(r)
    print(f"| {r['size']} | {r['devices']} | {r['calls']} x {r['chunk']} | {r['est_gb_per_device']:.2f} | "
          f"{r['first_s']:.1f} | {sec} | {r['masks_per_s']:.1f} | {r['peak_rss_gb']:.2f} | {cell} |")
  if failed:
    raise SystemExit(f"{len(failed)} case(s) differ from 1 device beyond the tolerance")


if __name__ == "__main__":
  main()
