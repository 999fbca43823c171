"""LeGrad on SigLIP B/16: trace_jax vs the authors' ``legrad-torch==1.1`` ``compute_legrad_siglip``,
1 image x 8 prompts, random ``ViT-B-16-SigLIP`` weights (open_clip 2.23.0), one run, as a ratio.

    python benchmarks/legrad_siglip_bench.py --n 3 [--size 224]

Theirs gives ONE map for all prompts of a call (it sums the score over the prompts), so 8 per-prompt
maps take 8 calls (each with its own image forward): that is the timed peer case ("8 calls"); their
single call with all 8 prompts (one summed map) is reported too. Ours: ``explain('legrad', ...)``
with one image and 8 prompts (one image forward, 8 vmapped backwards), correction on, as theirs.
Inputs and text embeddings are prepared before timing; the median of ``n`` calls after one warm-up.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time


def _median(fn, n):
  fn()  # warm-up (compilation)
  return statistics.median(_times(fn, n))


def measure(n: int = 3, size: int = 224, prompts: int = 8) -> dict:
  """Median seconds of ours (``prompts`` maps in one call) and theirs (``prompts`` calls, and one call
  with all prompts = one summed map) on the same random ``ViT-B-16-SigLIP`` weights (module docstring).
  Also used by ``benchmarks/attribution.py --cases legrad_siglip``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import open_clip
  import torch
  from legrad import LeWrapper
  from trace_jax.attribution import explain_fn
  from trace_jax.convert.siglip import from_openclip_model
  from trace_jax.models import build
  torch.manual_seed(0)
  model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).eval()
  mc = open_clip.get_model_config("ViT-B-16-SigLIP")
  cfg, params = from_openclip_model(model, mc)
  ours_model = build(cfg)
  rng = np.random.default_rng(0)
  image = rng.standard_normal((1, 3, size, size)).astype(np.float32)
  ids = rng.integers(2, 32000, (prompts, 64))
  empty = rng.integers(2, 32000, (64,))
  with torch.no_grad():
    t = torch.nn.functional.normalize(model.encode_text(torch.as_tensor(ids)), dim=-1)
    e = torch.nn.functional.normalize(model.encode_text(torch.as_tensor(empty[None])), dim=-1)
  with contextlib.redirect_stdout(io.StringIO()):
    w = LeWrapper(model, layer_index=-2)
  w.empty_embedding = e.t()
  img_t = torch.as_tensor(image)
  peer_loop = _median(lambda: [w.compute_legrad_siglip(t[i:i + 1], img_t) for i in range(prompts)], n)
  peer_one = _median(lambda: w.compute_legrad_siglip(t, img_t), n)
  f = explain_fn("legrad", ours_model, empty_ids=jnp.asarray(empty, jnp.int32))
  x = jnp.asarray(image.transpose(0, 2, 3, 1))
  q = jnp.asarray(t.numpy())
  ours = _median(lambda: jax.block_until_ready(f(params, x, query=q)["map"]), n)
  return {"ours": ours, "peer_loop": peer_loop, "peer_one": peer_one, "size": size, "prompts": prompts,
          "jax": f"jax {jax.__version__} on {jax.devices()[0].platform}",
          "torch": f"torch {torch.__version__} ({torch.get_num_threads()} threads)"}


def _times(fn, n):
  ts = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return ts


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=3)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--prompts", type=int, default=8)
  a = p.parse_args(argv)
  r = measure(a.n, a.size, a.prompts)
  ours, peer_loop, peer_one = r["ours"], r["peer_loop"], r["peer_one"]
  print(f"| case | ours s | legrad-torch s | ratio |\n|---|---|---|---|\n"
        f"| LeGrad SigLIP B/16 @{a.size}, 1 image x {a.prompts} prompts ({a.prompts} maps; theirs: "
        f"{a.prompts} calls) | {ours:.3f} | {peer_loop:.3f} | {peer_loop / ours:.2f}x |\n"
        f"| (theirs, one call with {a.prompts} prompts = one summed map) | — | {peer_one:.3f} | — |\n"
        f"median of {a.n} after 1 warm-up; {r['jax']}, {r['torch']}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
