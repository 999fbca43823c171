"""Images per second of the real-image pipeline (trace_jax/data/grain_pipeline.py) against what one
train step consumes, on this machine.

    python benchmarks/data.py                                  # 0 / 1 / 2 Grain workers, ViT-B/16 step
    python benchmarks/data.py --workers 0 --steps 5 --step-preset small   # quick

Pipeline: ``data.name=image_text`` over a CSV of ``--n`` synthetic 224 x 224 JPEGs (smooth random
content, quality 90), open_clip's train augmentation (RandomResizedCrop(224, scale (0.9, 1.0)),
bicubic, CLIP mean / std), CLIP BPE tokenisation (open_clip's vocabulary), global batch ``--batch``.
Timed: ``--steps`` batches after the first (the first includes the workers' start-up, reported
apart). Train step: a jitted value_and_grad of the contrastive objective of ``--step-preset`` at
224 px on a batch of ``--step-batch``, median of 3 calls after one compiling call; its images per
second is what the pipeline must deliver to keep the step busy.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(HERE))


def write_jpegs(root: str, n: int, size: int = 224) -> str:
  from PIL import Image
  rng = np.random.default_rng(0)
  rows = []
  for i in range(n):
    small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    p = os.path.join(root, f"{i:05d}.jpg")
    img.save(p, quality=90)
    rows.append(f"{i:05d}.jpg,a photo of thing number {i}")
  path = os.path.join(root, "train.csv")
  with open(path, "w") as f:
    f.write("filepath,title\n" + "\n".join(rows) + "\n")
  return path


def tokenizer():
  import open_clip
  from trace_jax.tokenizers import CLIPTokenizer
  return CLIPTokenizer.from_bpe_gz(os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz"))


def pipeline_rate(csv: str, tok, workers: int, batch: int, steps: int) -> tuple[float, float]:
  """(seconds to the first batch, images / s over the next `steps` batches)."""
  from configs import common
  from trace_jax.data import sources
  c = common.get_config()
  c.data.name, c.data.path, c.data.image_size, c.data.batch_size = "image_text", csv, 224, batch
  c.data.worker_count = workers
  src = sources.make(c, process_index=0, process_count=1, tokenizer=tok)
  t0 = time.perf_counter()
  it = src.batches(0)
  next(it)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  dt = time.perf_counter() - t0
  it.close()
  return first, steps * batch / dt


def step_rate(preset: str, batch: int) -> float:
  """Images / s of one jitted contrastive forward + backward at 224 px."""
  import jax
  import flax.linen as nn
  from configs import common
  from trace_jax import objectives
  c = common.get_config()
  c.model.preset, c.data.image_size, c.data.batch_size, c.loss.name = preset, 224, batch, "contrastive"
  info = {"vocab_size": 49408, "context_length": 77}
  task = objectives.make(c, info)
  params = nn.unbox(task.init_params(jax.random.PRNGKey(0)))
  r = np.random.default_rng(0)
  ids = r.integers(1, 49000, (batch, 77)).astype(np.int32)
  ids[:, 20] = 49407
  ids[:, 21:] = 0
  b = {"image": r.normal(size=(batch, 224, 224, 3)).astype(np.float32), "caption_ids": ids, "phrase_ids": ids,
       "mask": np.zeros((batch, 224, 224), np.float32), "mask_indicator": np.zeros(batch, np.float32)}
  f = jax.jit(jax.value_and_grad(lambda p, x: task.loss_fn(p, x, jax.random.PRNGKey(1))[0]))
  jax.block_until_ready(f(params, b))
  ts = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(f(params, b))
    ts.append(time.perf_counter() - t0)
  return batch / statistics.median(ts)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", type=int, default=512, help="JPEGs written")
  p.add_argument("--batch", type=int, default=32, help="pipeline global batch")
  p.add_argument("--steps", type=int, default=8, help="timed batches per setting")
  p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--step-preset", default="ViT-B-16", help="model preset of the train step ('' to skip)")
  p.add_argument("--step-batch", type=int, default=8)
  a = p.parse_args(argv)
  tok = tokenizer()
  print(f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
  print("| setting | first batch | images / s |\n|---|---|---|")
  with tempfile.TemporaryDirectory() as d:
    csv = write_jpegs(d, a.n)
    for w in a.workers:
      first, rate = pipeline_rate(csv, tok, w, a.batch, a.steps)
      print(f"| pipeline, {w} Grain worker(s), batch {a.batch} | {first:.1f} s | {rate:.0f} |", flush=True)
  if a.step_preset:
    rate = step_rate(a.step_preset, a.step_batch)
    print(f"| train step consumes: {a.step_preset} contrastive fwd+bwd, batch {a.step_batch} | | {rate:.1f} |")


if __name__ == "__main__":
  main()
