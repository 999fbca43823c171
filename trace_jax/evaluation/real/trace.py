"""TRACE grounding on the real datasets (TRACE slides; trace_jax/evaluation/real/).

* ``trace_grounding`` (TRACE slides; COCO-Stuff): per grounded caption word, the word-to-patch map of
  TRACE (trace/grounding.heatmaps via trace/evaluate.make_maps_fn, with the model dir's gate power,
  min-max per map: the normalisation of the CLIP readout) or of the CLIP patch-word baseline
  (trace/evaluate.clip_patch_word), bilinearly upsampled to the original image, binarised at >= 0.5;
  precision / recall / IoU against the pixels of the word's COCO-Stuff labels (metrics.mask_scores).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.data import preprocess
from trace_jax.evaluation import metrics as M
from trace_jax.evaluation.real.common import (
    _label_map, _limit, _progress, _texts, image_pixels, load_model_dir, pad_rows, tokenize)


# ---------------------------------------------------------------------------------------------- TRACE

def grounded_words(ex) -> tuple[list[str], list[np.ndarray]]:
  """(word per grounded caption-word token, its COCO-Stuff label values) from ``word_labels``."""
  words = _texts(ex['words'])
  pairs = np.asarray(ex['word_labels'], np.int64).reshape(-1, 2)
  out_w, out_l = [], []
  for wi in np.unique(pairs[:, 0]):
    out_w.append(words[int(wi)])
    out_l.append(pairs[pairs[:, 0] == wi, 1])
  return out_w, out_l


def trace_maps_fn(e, checkpoint: str):
  """(f(images [1, S, S, 3], words) -> ([P, N] maps in [0, 1] or None rows, grid (gh, gw)), image size,
  description) for method 'trace' (a TRACE model dir: <workdir>/model) or 'clip' (a CLIP model dir)."""
  from trace_jax.trace import evaluate as te
  name = e.method.name
  if name == 'trace':
    from trace_jax import model_dir
    from trace_jax.trace.head import from_model_dir
    md = model_dir.load(checkpoint)
    task, params = from_model_dir(md), jax.tree.map(jnp.asarray, md.tree())
    vocab = task.vocab.closed
    f = te.make_maps_fn(task, 'trace_minmax', vocab)    # min-max per map, as the CLIP readout below
    cfg = task.cfg

    from trace_jax.data.real.coco import _singular
    known = set(vocab.words)

    def maps(images, words):
      h = np.asarray(f(params, jnp.asarray(images))[0][0])              # [V_vocab, N]
      # a plural caption word is grounded by its singular concept ('dogs' -> 'dog'), by the rule that
      # found its COCO-Stuff labels (coco.py ground_caption)
      keys = [_singular(w, known) for w in words]
      return [h[vocab.index(k)] if k is not None else None for k in keys]
    return maps, cfg, f'TRACE {md.desc}'
  if name != 'clip':
    raise ValueError(f"trace_grounding method must be 'trace' or 'clip'; got {name!r}")
  loaded = load_model_dir(checkpoint)

  @jax.jit
  def f(params, images, ids):
    return te.clip_patch_word(loaded.model, params, images, ids)[0][0]   # [V, N]

  def maps(images, words):
    uniq = list(dict.fromkeys(words))
    h = np.asarray(f(loaded.params, jnp.asarray(images), pad_rows(tokenize(loaded, uniq))))
    return [h[uniq.index(w)] for w in words]
  return maps, loaded.cfg, loaded.desc


def run_trace_grounding(e, checkpoint, builder, source, verbose=True) -> dict:
  """Patch-token grounding P / R / IoU per grounded caption word (module docstring)."""
  from trace_jax.resize import torch_bilinear_matrix
  maps_fn, cfg, desc = trace_maps_fn(e, checkpoint)
  size = cfg.vision.image_size if e.method.name == 'trace' else int(e.image_size)
  g = size // cfg.vision.patch_size
  thr = float(e.get('threshold', 0.5))
  tp, fp, fn, prec, rec, iou = [], [], [], [], [], []
  skipped = 0
  n = _limit(e, source)
  for i in _progress(range(n), n, f'{e.method.name} grounding', verbose):
    ex = source[i]
    words, labels = grounded_words(ex)
    if not words:
      continue
    px, (h, w) = image_pixels(ex['image'], size, e.get('resize', 'squash'))
    hm = maps_fn(preprocess.normalize_unit(px)[None], words)
    lab = _label_map(ex['label_map'])
    wh, ww = torch_bilinear_matrix(g, h), torch_bilinear_matrix(g, w)
    for m, labs in zip(hm, labels):
      if m is None:
        skipped += 1
        continue
      up = wh @ np.asarray(m, np.float64).reshape(g, g) @ ww.T      # torch bilinear, align_corners=False
      s = M.threshold_scores(up[None], np.isin(lab, labs)[None], thr)
      for acc, k in ((tp, 'tp'), (fp, 'fp'), (fn, 'fn'), (prec, 'precision'), (rec, 'recall'), (iou, 'iou')):
        acc.append(s[k])
  cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
  TP, FP, FN = cat(tp).sum(), cat(fp).sum(), cat(fn).sum()
  ratio = lambda a, b: float(a / b) if b > 0 else float('nan')
  res = {'precision': M._nanmean(cat(prec)), 'recall': M._nanmean(cat(rec)), 'miou': M._nanmean(cat(iou)),
         'micro_precision': ratio(TP, TP + FP), 'micro_recall': ratio(TP, TP + FN),
         'micro_iou': ratio(TP, TP + FP + FN), 'n': int(cat(iou).size), 'skipped_words': skipped}
  return {'num_examples': n, 'methods': {e.method.name: res}, 'checkpoint': desc}
