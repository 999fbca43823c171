"""M2IB for one image-text pair (image AND text maps): trace_jax vs a PyTorch port of the authors' code.

Model: a random Hugging Face ``CLIPModel`` of ViT-B/16 size (224 px, patch 16 -> 197 tokens, vision
12 x 768, text 12 x 512, projection 512), converted with ``trace_jax.convert.hf.from_torch_model``.
Input: one 224 x 224 image and one unpadded 12-token caption (SOT + 10 + EOT), as notes/m2ib.md §13.
Settings: the official defaults (layer 9 / 9, beta 0.1, lr 1, 10 steps, 10 samples).

Timed: ``trace_jax.attribution.m2ib.explain`` (first call incl. compilation, then warm calls);
``benchmarks/m2ib_torch_port.py`` as the authors' code behaves (weights with ``requires_grad``) and
with the weights frozen. A warm-up pair is excluded for torch (as in the note), runs are repeated and
the median reported. A replayed-noise run checks that both sides give the same maps.

    python benchmarks/m2ib_bench.py [--runs 3] [--torch-runs 1] [--skip-official] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def hf_model(torch, seed=0):
  from transformers import CLIPConfig, CLIPModel
  cfg = CLIPConfig(
      text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
                       max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
                       eos_token_id=49407, bos_token_id=49406, pad_token_id=1),
      vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         image_size=224, patch_size=16, hidden_act="quick_gelu"),
      projection_dim=512)
  torch.manual_seed(seed)
  return CLIPModel(cfg).eval()


def timed(fn, *a):
  """(wall s, process CPU s over all threads); CPU time is robust to other jobs' load."""
  w, c = time.perf_counter(), time.process_time()
  fn(*a)
  return time.perf_counter() - w, time.process_time() - c


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--runs", type=int, default=3, help="warm trace_jax runs")
  ap.add_argument("--torch-runs", type=int, default=1, help="timed torch runs per variant (after a warm-up)")
  ap.add_argument("--skip-official", action="store_true", help="skip the requires_grad (official) variant")
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--skip-parity", action="store_true")
  ap.add_argument("--torch-warmup", type=int, default=1, help="1: an untimed warm-up pair first")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()

  import torch
  torch.set_num_threads(2)
  import jax
  import jax.numpy as jnp

  import m2ib_torch_port as port
  from trace_jax.attribution import m2ib
  from trace_jax.convert.hf import from_torch_model
  from trace_jax.models import build

  hf = hf_model(torch)
  cfg, params = from_torch_model(hf)
  model = build(cfg)
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(1, 3, 224, 224)).astype(np.float32)
  ids = np.array([[49406] + list(rng.integers(300, 40000, size=10)) + [49407]], np.int64)
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  res = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
         "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg(),
         "jax": jax.__version__, "torch": torch.__version__}

  t_pix, t_ids = torch.tensor(pixels), torch.tensor(ids)

  # -- parity with replayed noise (same eps on both sides)
  if not args.skip_parity:
    K, S = 10, 10
    nv = rng.standard_normal((S, K, 197, 768)).astype(np.float32)
    nt = rng.standard_normal((S, K, ids.shape[1], 512)).astype(np.float32)
    out = m2ib.explain(model, params, images, ids, image_noise=nv, text_noise=nt)
    vm = port.vision_heatmap_iba(t_ids, t_pix, hf, 9, 0.1, 1, noise=nv, freeze=True)
    tm = port.text_heatmap_iba(t_ids, t_pix, hf, 9, 0.1, 1, noise=nt, freeze=True)
    res["parity_max_abs_vision_map"] = float(np.max(np.abs(np.asarray(out["map"][0]) - vm)))
    res["parity_max_abs_text_map"] = float(np.max(np.abs(np.asarray(out["text"][0]) - tm)))
    print("replayed-noise parity: max|d| vision map %.2e, text map %.2e"
          % (res["parity_max_abs_vision_map"], res["parity_max_abs_text_map"]), flush=True)

  # -- trace_jax (key-drawn noise: its own jit signature, so the first call includes compilation)
  def ours(seed):
    jax.block_until_ready(m2ib.explain(model, params, images, ids, key=jax.random.PRNGKey(seed)))

  w, c = timed(ours, 0)
  res["ours_first_call_s"], res["ours_first_call_cpu_s"] = w, c
  runs = [timed(ours, r + 1) for r in range(args.runs)]
  res["ours_warm_s"] = [r[0] for r in runs]
  res["ours_warm_cpu_s"] = [r[1] for r in runs]
  res["ours_warm_median_s"] = statistics.median(res["ours_warm_s"])
  res["ours_warm_median_cpu_s"] = statistics.median(res["ours_warm_cpu_s"])
  print("trace_jax: first call %.1f s (cpu %.1f s), warm median %.1f s (cpu %.1f s)" % (
      w, c, res["ours_warm_median_s"], res["ours_warm_median_cpu_s"]), flush=True)

  # -- the torch port of the authors' code
  if not args.skip_torch:
    variants = [("frozen", True)] + ([] if args.skip_official else [("official", False)])
    for name, freeze in variants:
      def pair():
        port.vision_heatmap_iba(t_ids, t_pix, hf, 9, 0.1, 1, freeze=freeze)
        port.text_heatmap_iba(t_ids, t_pix, hf, 9, 0.1, 1, freeze=freeze)
      torch.manual_seed(0)
      if args.torch_warmup:
        pair()  # warm-up pair, excluded (as notes/m2ib.md §13)
      runs = [timed(pair) for _ in range(args.torch_runs)]
      res[f"torch_{name}_s"] = [r[0] for r in runs]
      res[f"torch_{name}_cpu_s"] = [r[1] for r in runs]
      res[f"torch_{name}_median_s"] = statistics.median(res[f"torch_{name}_s"])
      res[f"torch_{name}_median_cpu_s"] = statistics.median(res[f"torch_{name}_cpu_s"])
      print("torch port (%s): median %.1f s per pair (cpu %.1f s)" % (
          name, res[f"torch_{name}_median_s"], res[f"torch_{name}_median_cpu_s"]), flush=True)
  res["load_after"] = os.getloadavg()
  print(json.dumps(res, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
