"""The TRACE interpretability report (docs/trace.md §10): one PNG per image and a subspace table.

Per image: (a) the image; (b) every patch coloured by the coarse concept of its dominant subspace
g(argmax_k m_ik), with a legend (what the model says each region *is*); (c) the ground-truth coarse
concept per patch, for comparison; then per caption word (fine / coarse / stuff words of the
vocabulary) its heatmap (13) over the image with the readable trace
``word -> peak patch -> subspace k (share) -> coarse g(k) -> fine`` (``grounding.trace_word``).
The table (markdown + JSON): subspace -> assigned coarse concept, patches it dominates, purity,
the majority concept of its patches and their distribution (``evaluate.subspace_table``).

    python -m trace_jax.trace.report --workdir runs/trace --out runs/trace/report --num_images 8
"""
from __future__ import annotations

import argparse
import json
import os
import textwrap
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.losses import trace as tl
from trace_jax.trace import grounding

# One colour per coarse concept (tab10), grey for "no label".
_PALETTE = np.asarray([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                       [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]],
                      np.float32) / 255.0


def concept_colors(num: int) -> np.ndarray:
  return _PALETTE[np.arange(num) % len(_PALETTE)]


def denormalize(image: np.ndarray) -> np.ndarray:
  """Pipeline-normalised image [S, S, 3] -> float [0, 1] RGB."""
  from trace_jax.data.pipeline import CLIP_MEAN, CLIP_STD
  return np.clip(np.asarray(image) * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN), 0.0, 1.0)


def subspace_markdown(table: dict) -> str:
  """Markdown of ``evaluate.subspace_table``'s result."""
  names = list(table["subspaces"][0]["distribution"]) if table["subspaces"] else []
  lines = ["| subspace | assigned g(k) | patches | purity | majority concept (purity) | " + " | ".join(names) + " |",
           "|---|---|---|---|---|" + "---|" * len(names)]
  for r in table["subspaces"]:
    pur = "—" if r["patches"] == 0 else f"{100 * r['purity']:.1f}"
    maj = "—" if r["majority"] is None else f"{r['majority']} ({100 * r['majority_purity']:.1f})"
    lines.append(f"| {r['subspace']} | {r['assigned']} | {r['patches']} | {pur} | {maj} | "
                 + " | ".join(str(r["distribution"][n]) for n in names) + " |")
  lines.append("")
  lines.append(f"Purity (fixed assignment) {100 * table['purity']:.1f}%, class-balanced "
               f"{100 * table['purity_balanced']:.1f}% (chance {100 * table['chance']:.1f}%), best "
               f"(majority) assignment {100 * table['purity_majority']:.1f}% (base rate of the most "
               f"frequent concept {100 * table['base_rate']:.1f}%), over {table['patches']} patches.")
  return "\n".join(lines)


def render_image(path: str, image, m, assignment, coarse_names: Sequence[str], traces: Sequence,
                 gt_coarse=None, title: str = "") -> str:
  """Write one report PNG. image [S, S, 3] in [0, 1]; m [N, K] memberships; traces: grounding.Trace list;
  gt_coarse int [N] (-1 none) or None."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch
  image = np.asarray(image)
  s = image.shape[0]
  n = m.shape[0]
  g = int(round(np.sqrt(n)))
  cols = concept_colors(len(coarse_names))
  dom = np.asarray(assignment)[np.asarray(m).argmax(-1)].reshape(g, g)
  panels = 3 if gt_coarse is not None else 2
  ncol = panels + len(traces)
  fig, axes = plt.subplots(1, ncol, figsize=(2.6 * ncol, 3.6), squeeze=False)
  axes = axes[0]
  ext = (0, s, s, 0)
  axes[0].imshow(image)
  axes[0].set_title("image", fontsize=8)
  axes[1].imshow(image)
  axes[1].imshow(cols[dom], alpha=0.55, extent=ext, interpolation="nearest")
  axes[1].set_title("dominant subspace -> coarse", fontsize=8)
  if gt_coarse is not None:
    gc = np.asarray(gt_coarse).reshape(g, g)
    rgba = np.concatenate([cols[np.maximum(gc, 0)], (gc >= 0)[..., None] * 0.55], -1)
    axes[2].imshow(image)
    axes[2].imshow(rgba, extent=ext, interpolation="nearest")
    axes[2].set_title("ground truth coarse (patches)", fontsize=8)
  for ax, t in zip(axes[panels:], traces):
    ax.imshow(image)
    ax.imshow(t.heatmap, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, extent=ext, interpolation="nearest")
    pr, pc = t.peak
    step = s / g
    ax.add_patch(matplotlib.patches.Rectangle((pc * step, pr * step), step, step, fill=False, ec="white", lw=1.5))
    ax.set_title(t.word, fontsize=9)
    fine = f" -> fine {t.fine} ({t.fine_prob:.2f})" if t.fine else ""
    text = (f"peak {t.peak} -> subspace {t.subspace} ({t.subspace_share:.2f}) -> coarse {t.coarse} "
            f"({t.coarse_membership:.2f}){fine}" + ("" if t.consistent else f" [word's coarse: {t.word_coarse}]"))
    ax.text(0.0, -0.04, "\n".join(textwrap.wrap(text, 34)), transform=ax.transAxes, va="top", fontsize=6.5)
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.legend(handles=[Patch(color=cols[i], label=c) for i, c in enumerate(coarse_names)], loc="lower left",
             ncol=len(coarse_names), fontsize=7, frameon=False)
  if title:
    fig.suptitle("\n".join(textwrap.wrap(title, 30 * ncol)), fontsize=8)
  fig.subplots_adjust(bottom=0.3, top=0.82, wspace=0.08)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def make_report(task, params, source, out_dir: str, *, indices: Sequence[int] = range(8), max_words: int = 6,
                table: dict | None = None, num_examples: int | None = None, gate: bool | None = None) -> dict:
  """PNGs for ``indices`` of ``source`` and the subspace table (computed with ``evaluate.evaluate`` on
  ``num_examples`` of the source unless ``table`` is given). Returns {'images': [...], 'table': ...}."""
  from trace_jax.data import pipeline
  from trace_jax.data.shapes import scene
  from trace_jax.data.shapes.concepts import load_concepts
  from trace_jax.trace import evaluate as ev
  from trace_jax.trace.vocab import token_to_vocab
  os.makedirs(out_dir, exist_ok=True)
  vocab = task.vocab.closed
  tcfg = task.trace_cfg
  gate = task.gate if gate is None else gate
  assignment = np.asarray(task.arrays["assignment"])
  num_coarse = len(vocab.coarse_names)
  patch = task.cfg.vision.patch_size

  @jax.jit
  def feats(p, images):
    _, aux = task.model.apply({"params": p["clip"]}, images, method="encode_image")
    return tl.trace_features(aux, p["trace"], jnp.asarray(assignment), num_coarse, tcfg)

  examples = pipeline._read(source, list(indices))
  batch = pipeline.make_batch(examples, tokenizer=task.tokenizer, patch_size=patch)
  m, Mc, q = jax.device_get(feats(params, jnp.asarray(batch["image"])))
  g = batch["token_masks"].shape[-1]
  gt = ev.patch_coarse_labels(batch["semantic"], patch, np.asarray(load_concepts().fine_coarse))
  t2v = token_to_vocab(task.tokenizer, vocab)
  kinds = {scene.KIND[k] for k in ev.KINDS}
  paths = []
  for r, idx in enumerate(indices):
    words = []
    for l in range(batch["caption_ids"].shape[1]):
      v = t2v[batch["caption_ids"][r, l]]
      if v >= 0 and batch["token_kind"][r, l] in kinds and vocab.words[v] not in words:
        words.append(vocab.words[v])
    traces = [grounding.trace_word(w, vocab, assignment, m[r], Mc[r], q[r], (g, g), tcfg.temp_token, gate,
                                   getattr(task, "gate_power", 1.0))
              for w in words[:max_words]]
    caption = pipeline._str(examples[r]["caption"])
    path = os.path.join(out_dir, f"trace_{int(idx):05d}.png")
    render_image(path, denormalize(batch["image"][r]), m[r], assignment, vocab.coarse_names, traces, gt[r],
                 title=caption)
    paths.append(path)
  if table is None:
    table = ev.evaluate(task, params, source, method="trace", num_examples=num_examples, gate=gate)["subspaces"]
  with open(os.path.join(out_dir, "subspaces.json"), "w") as f:
    json.dump(table, f, indent=1)
  with open(os.path.join(out_dir, "subspaces.md"), "w") as f:
    f.write(subspace_markdown(table) + "\n")
  return {"images": paths, "table": table}


def main(argv=None):
  from trace_jax.trace import evaluate as ev
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", default=None, help="default <workdir>/report")
  ap.add_argument("--split", default="test")
  ap.add_argument("--num_images", type=int, default=8)
  ap.add_argument("--num_examples", type=int, default=None, help="examples for the purity table (default all)")
  a = ap.parse_args(argv)
  import ml_collections
  from trace_jax import model_dir
  from trace_jax.trace.head import from_model_dir
  with open(os.path.join(a.workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  md = model_dir.load(os.path.join(a.workdir, "model"))
  task, params = from_model_dir(md), jax.tree.map(jnp.asarray, md.tree())
  src = ev.load_source(config, a.split)
  res = make_report(task, params, src, a.out or os.path.join(a.workdir, "report"),
                    indices=range(a.num_images), num_examples=a.num_examples)
  print(subspace_markdown(res["table"]))
  print("\n".join(res["images"]))


if __name__ == "__main__":
  main()
