"""Patch-token grounding of TRACE and of the CLIP baseline on the embedded data (docs/trace.md §9).

For every caption token that names something visible — word kind fine, coarse or stuff, a non-empty
ground-truth patch mask (``token_masks >= 0.5``: the patch is at least half covered by the pixels the
word names) and a word of the evaluated vocabulary — the method's heatmap on the patch grid is
binarised at 0.5 and scored with ``trace_jax.evaluation.metrics.threshold_scores`` (precision, recall,
IoU per token; macro means over tokens, micro = pooled counts).

Methods (both produce [B, V, N] maps in [0, 1] for every vocabulary word in one image forward):
* ``trace``: the TRACE heatmap (13) (``grounding.heatmaps``: probabilities, thresholded as they are);
* ``clip``: patch-word similarity of a contrastively trained dual encoder: the patch tokens of the last
  layer through ``ln_post`` and ``proj`` (the same head as the image embedding), cosine with the
  word's text embedding (``encode_text`` of ``sot word eot``), then per-map min-max normalisation to
  [0, 1] (as attribution maps are; the cosine itself has no calibrated scale), then the 0.5 threshold.

Settings: ``closed`` = every token of the test split whose word is in the training vocabulary;
``open`` = the tokens of the open-vocabulary words (hexagon, crescent, arrow) on the ``openvocab``
split, with those words added to the vocabulary (their anchors were never trained against).

Purity (subspaces -> coarse concepts): every patch whose area is at least half one label gets that
label's coarse concept as ground truth; its dominant subspace is argmax_k m_ik (2). ``purity`` =
fraction of such patches whose dominant subspace is assigned (fixed g(k), §3.1) to the patch's coarse
concept; chance = 1 / C. ``purity_majority`` assigns each subspace the majority coarse concept of its
patches instead (the best any assignment can do; a descriptive statistic, not a trained map).

    python evaluate.py --config configs/trace.py --checkpoint runs/trace [--config.eval.num_examples=500]
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax import ops
from trace_jax.evaluation import metrics as M
from trace_jax.losses import trace as tl
from trace_jax.models import l2_normalize
from trace_jax.trace import grounding, vocab_arrays

KINDS = ("fine", "coarse", "stuff")          # scene.WORD_KINDS that name visible things
# readouts: 'trace' the heatmap (13) as probabilities; 'trace_minmax' the same heatmap min-max normalised
# per map, the normalisation the CLIP readout gets (so that one threshold means the same for both);
# 'clip' patch-word cosine, min-max (the baseline)
METHODS = ("trace", "trace_minmax", "clip")
SETTINGS = {"closed": "test", "open": "openvocab"}


def word_text_ids(tokenizer, words: Sequence[str]) -> np.ndarray:
  """int32 [V, L]: ``sot word eot`` per word (the text side of the CLIP patch-word map)."""
  return tokenizer(list(words))


def minmax(x, axis=-1):
  """Per-map min-max normalisation to [0, 1] along ``axis``: (x - min) / max(max - min, 1e-12), a
  constant map -> 0 (trace_jax/ops.py)."""
  return ops.minmax(x, axis=axis, min_range=1e-12)


def clip_patch_word(model, clip_params, images, text_ids):
  """CLIP baseline maps: images [B, S, S, 3], text_ids int [V, L] -> [B, V, N] in [0, 1] (min-max per map),
  plus the CRATE tower's aux (for the memberships)."""
  _, aux = model.apply({"params": clip_params}, images, method="encode_image")
  patches = model.apply({"params": clip_params}, aux["tokens"][:, 1:],
                        method=lambda m, x: m.visual.project(x))                  # [B, N, E]
  words, _ = model.apply({"params": clip_params}, text_ids, method="encode_text")   # [V, E]
  sim = jnp.einsum("bne,ve->bvn", l2_normalize(patches), l2_normalize(words))
  return minmax(sim), aux


def make_maps_fn(task, method: str, vocab, *, gate: bool | None = None):
  """jitted ``f(params, images) -> (heatmaps [B, V, N], m [B, N, K])`` for ``vocab`` (a Vocab)."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  model, tcfg = task.model, task.trace_cfg
  arrays = vocab_arrays(vocab, task.cfg.vision.heads, np.asarray(task.arrays["assignment"]))
  num_coarse = arrays["coarse_anchor_ids"].shape[0]
  gate = task.gate if gate is None else gate
  text_ids = jnp.asarray(word_text_ids(task.tokenizer, vocab.words))

  def f(params, images):
    if method == "clip":
      h, aux = clip_patch_word(model, params["clip"], images, text_ids)
      proj = aux["blocks"][tcfg.layer]["proj"][:, 1:]
      return h, tl.memberships(proj, tcfg.tau_member, tcfg.eps)
    _, aux = model.apply({"params": params["clip"]}, images, method="encode_image")
    m, Mc, q = tl.trace_features(aux, params["trace"], arrays["assignment"], num_coarse, tcfg)
    h = grounding.heatmaps(Mc, q, arrays["anchors"], arrays["coarse"], arrays["group"], tcfg.temp_token, gate,
                           getattr(task, "gate_power", 1.0))
    return (minmax(h) if method == "trace_minmax" else h), m
  return jax.jit(f)


def select_tokens(batch: dict, tok2vocab: np.ndarray, *, words: Sequence[int] | None = None):
  """The scored tokens of a batch: (rows, positions, vocabulary ids, kind names) as arrays.

  A token is scored iff its row is valid, its kind is in KINDS, its GT patch mask is non-empty and its
  token id maps to a vocabulary word (and, if ``words`` is given, to one of those vocabulary ids).
  """
  from trace_jax.data.shapes import scene
  kind_ids = np.asarray([scene.KIND[k] for k in KINDS])
  vid = tok2vocab[batch["caption_ids"]]                                        # [B, L]
  gt_any = (batch["token_masks"] >= 0.5).any(axis=(-1, -2))                    # [B, L]
  ok = np.isin(batch["token_kind"], kind_ids) & gt_any & (vid >= 0)
  ok &= np.asarray(batch.get("valid", np.ones(len(vid), bool)))[:, None]
  if words is not None:
    ok &= np.isin(vid, np.asarray(words))
  rows, pos = np.nonzero(ok)
  kinds = np.asarray(scene.WORD_KINDS)[batch["token_kind"][rows, pos]]
  return rows, pos, vid[rows, pos], kinds


def patch_coarse_labels(semantic: np.ndarray, patch: int, label_coarse: np.ndarray) -> np.ndarray:
  """int [B, G*G]: the coarse id of the label covering at least half of each patch, -1 if none."""
  b, s, _ = semantic.shape
  g = s // patch
  nl = len(label_coarse)
  onehot = semantic[..., None] == np.arange(nl)                                 # [B, S, S, nl]
  frac = onehot.reshape(b, g, patch, g, patch, nl).mean(axis=(2, 4)).reshape(b, g * g, nl)
  lab = frac.argmax(-1)
  return np.where(frac.max(-1) >= 0.5, np.asarray(label_coarse)[lab], -1)


def subspace_table(counts: np.ndarray, assignment: np.ndarray, coarse_names: Sequence[str]) -> dict:
  """Purity statistics from counts [K, C] (patches whose dominant subspace is k and GT coarse is c)."""
  counts = np.asarray(counts, np.int64)
  k, c = counts.shape
  tot = counts.sum()
  fixed = sum(counts[i, assignment[i]] for i in range(k))
  majority = counts.max(1).sum()
  rows = []
  for i in range(k):
    n = int(counts[i].sum())
    rows.append({"subspace": i, "assigned": coarse_names[assignment[i]], "patches": n,
                 "purity": float(counts[i, assignment[i]] / n) if n else float("nan"),
                 "majority": coarse_names[int(counts[i].argmax())] if n else None,
                 "majority_purity": float(counts[i].max() / n) if n else float("nan"),
                 "distribution": {coarse_names[j]: int(counts[i, j]) for j in range(c)}})
  per_class = counts.sum(0)                                                    # GT patches per concept
  hit = np.zeros(c)
  for i in range(k):
    hit[assignment[i]] += counts[i, assignment[i]]
  seen = per_class > 0
  return {"purity": float(fixed / tot) if tot else float("nan"),
          "purity_balanced": float(np.mean(hit[seen] / per_class[seen])) if seen.any() else float("nan"),
          "purity_majority": float(majority / tot) if tot else float("nan"),
          "chance": 1.0 / c, "base_rate": float(per_class.max() / tot) if tot else float("nan"),
          "patch_share": {coarse_names[j]: float(per_class[j] / max(tot, 1)) for j in range(c)},
          "patches": int(tot), "subspaces": rows}


def evaluate(task, params, source, *, method: str = "trace", setting: str = "closed", batch_size: int = 100,
             num_examples: int | None = None, threshold: float = 0.5, gate: bool | None = None,
             maps_fn=None) -> dict:
  """Grounding scores and purity of one method on one split source (see the module docstring).

  ``maps_fn(params, batch) -> (heatmaps [B, V, N], m [B, N, K])`` replaces the method's maps (tests:
  oracle maps); V indexes the setting's vocabulary.
  """
  from trace_jax.data import pipeline
  from trace_jax.data.shapes.concepts import load_concepts
  if setting not in SETTINGS:
    raise ValueError(f"unknown setting {setting!r}; expected one of {sorted(SETTINGS)}")
  tv = task.vocab
  vocab = tv.closed if setting == "closed" else tv.open
  from trace_jax.trace.vocab import token_to_vocab
  tok2vocab = token_to_vocab(task.tokenizer, vocab)
  words = None if setting == "closed" else [vocab.index(w) for w in tv.open_words if w in vocab.words]
  if maps_fn is None:
    f = make_maps_fn(task, method, vocab, gate=gate)
    maps_fn = lambda p, b: f(p, jnp.asarray(b["image"]))
  patch = task.cfg.vision.patch_size
  label_coarse = np.asarray(load_concepts().fine_coarse)
  assignment = np.asarray(task.arrays["assignment"])
  num_coarse = len(vocab.coarse_names)
  n = len(source) if num_examples is None else min(int(num_examples), len(source))
  preds, gts, kinds, wids = [], [], [], []
  counts = np.zeros((len(assignment), num_coarse), np.int64)
  for step in range(-(-n // batch_size)):
    b = pipeline.get_batch(source, step, batch_size=batch_size, shuffle=False, drop_remainder=False,
                           tokenizer=task.tokenizer, patch_size=patch, process_index=0, process_count=1)
    lo = step * batch_size
    b["valid"] = b["valid"] & (np.arange(lo, lo + batch_size) < n)
    h, m = jax.device_get(maps_fn(params, b))
    h, m = np.asarray(h), np.asarray(m)
    rows, pos, vid, kd = select_tokens(b, tok2vocab, words=words)
    g = b["token_masks"].shape[-1]
    preds.append(h[rows, vid].reshape(-1, g, g))
    gts.append(b["token_masks"][rows, pos] >= 0.5)
    kinds.append(kd)
    wids.append(vid)
    gt_c = patch_coarse_labels(b["semantic"], patch, label_coarse)             # [B, N]
    dom = m.argmax(-1)                                                         # [B, N]
    keep = (gt_c >= 0) & b["valid"][:, None]
    np.add.at(counts, (dom[keep], gt_c[keep]), 1)
  pred, gt = np.concatenate(preds), np.concatenate(gts)
  kinds, wids = np.concatenate(kinds), np.concatenate(wids)
  out = {"method": method, "setting": setting, "examples": n, "threshold": threshold}
  out.update(_scores(pred, gt, threshold))
  out["by_kind"] = {k: _scores(pred[kinds == k], gt[kinds == k], threshold) for k in KINDS if (kinds == k).any()}
  if setting == "open":
    out["by_word"] = {vocab.words[w]: _scores(pred[wids == w], gt[wids == w], threshold)
                      for w in np.unique(wids)}
  out["subspaces"] = subspace_table(counts, assignment, vocab.coarse_names)
  out["purity"] = out["subspaces"]["purity"]
  out["purity_balanced"] = out["subspaces"]["purity_balanced"]
  out["purity_majority"] = out["subspaces"]["purity_majority"]
  return out


def _scores(pred, gt, threshold) -> dict:
  if len(pred) == 0:
    return {"tokens": 0}
  s = M.threshold_scores(pred, gt, threshold)
  # coverage: the share of patches predicted, against the share the words really cover (what a
  # readout that lights half of every image gains in recall it pays in precision)
  return {"tokens": int(len(pred)), "coverage": float(np.mean(pred >= threshold)), "gt_coverage": float(np.mean(gt)),
          "precision": s["macro_precision"], "recall": s["macro_recall"],
          "miou": s["miou"], "micro_precision": s["micro_precision"], "micro_recall": s["micro_recall"],
          "micro_iou": s["micro_iou"], "empty_predictions": float(np.mean(s["tp"] + s["fp"] == 0))}


def format_row(name: str, r: dict) -> str:
  pct = lambda x: "—" if x is None or np.isnan(x) else f"{100 * x:.2f}"
  return (f"| {name} | {pct(r.get('precision'))} | {pct(r.get('recall'))} | {pct(r.get('miou'))} | "
          f"{pct(r.get('purity'))} | {pct(r.get('purity_balanced'))} | {pct(r.get('purity_majority'))} | "
          f"{r.get('tokens', 0)} |")


TABLE_HEADER = ("| model / readout | precision | recall | mIoU | purity (fixed g) | balanced purity (fixed g; "
                "chance 20) | purity (majority g) | tokens |\n|---|---|---|---|---|---|---|---|")


# ---------------------------------------------------------------------------------------------- run

def load_source(config, split: str):
  """The embedded set's ``split`` for ``config.data``."""
  from trace_jax.data.sources import load_shapes_split
  return load_shapes_split(config.data, split)


def run(config, md, out_path: str | None = None, *, methods=("trace", "clip"), settings=("closed", "open"),
        num_examples: int | None = None, verbose: bool = True) -> dict:
  """Every method x setting on a TRACE model dir ``md`` (``trace_jax.model_dir.load``): prints the table
  and writes the results to ``out_path`` (JSON). The vocabulary is the one stored in the model dir."""
  from trace_jax.trace.head import from_model_dir
  tm = from_model_dir(md)
  params = jax.tree.map(jnp.asarray, md.tree())
  results = {}
  if verbose:
    print(TABLE_HEADER)
  for setting in settings:
    src = load_source(config, SETTINGS[setting])
    for method in methods:
      r = evaluate(tm, params, src, method=method, setting=setting, num_examples=num_examples)
      results[f"{method}/{setting}"] = r
      if verbose:
        print(format_row(f"{method} ({setting})", r), flush=True)
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
      json.dump(results, f, indent=1)
  return results
