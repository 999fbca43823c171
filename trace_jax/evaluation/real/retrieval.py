"""Region-text retrieval on the real datasets (MaskInversion Tables 1 and 2; trace_jax/evaluation/real/).

* ``class_retrieval`` (MaskInversion Table 2; VOC / PASCAL-Context / COCO): one query mask per class
  present (VOC, Context: ``label_map == c``) or per non-crowd instance (COCO); its region embedding
  (MaskInversion LET or a visual-prompt baseline, evaluation/retrieval.py) is ranked against the
  prompt-ensembled class embeddings (evaluation/zeroshot.py); Acc@k (stable ranks, ties by index).
* ``referring_retrieval`` (MaskInversion Table 1; RefCOCO / RefCOCO+): all COCO instance masks of the
  image are the candidates; each sentence ranks them by cosine with its text embedding; Acc@k, mIoU,
  oIoU of the top-1 mask vs the ref's mask at the original resolution (retrieval.referring_retrieval /
  summarize_referring).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from trace_jax.evaluation.real.common import (
    Loaded, _image_id, _label_map, _limit, _masks, _progress, _texts, frame_transform, image_pixels)


def _methods(e) -> list[str]:
  base = [str(e.method.name)]
  extra = [m.strip() for m in str(e.get('baselines', '') or '').split(',') if m.strip()]
  from trace_jax.evaluation.retrieval import METHODS
  bad = [m for m in base + extra if m not in METHODS]
  if bad:
    raise ValueError(f'unknown region-embedding method(s) {bad}; expected {METHODS}')
  return list(dict.fromkeys(base + extra))


# ---------------------------------------------------------------------------------------------- retrieval

def region_embeddings(loaded: Loaded, e, method: str, px: np.ndarray, masks: np.ndarray | None = None,
                      boxes: np.ndarray | None = None, hw: tuple[int, int] | None = None) -> np.ndarray:
  """[K, E] region embeddings of the K masks (bool [K, H, W] original resolution) or boxes
  ([K, 4] original pixels) of one image ``px`` (pixels at the model input size).

  MaskInversion takes the masks at their original resolution (the authors pass the photo-size masks
  with the image squashed to 448, notes/legrad-maskinversion.md "Masks are never resized"); the
  visual-prompt baselines draw on the input image, so masks are resized there (nearest) and boxes
  mapped into the input frame.
  """
  from trace_jax.evaluation import retrieval
  pos = e.get('pos_interp')
  s = px.shape[0]
  if boxes is not None:  # boxes -> the input frame (every method draws / rasterises them there)
    sx, sy, left, top = frame_transform(hw, s, e.get('resize', 'squash'))
    boxes = np.asarray(boxes, np.float32) * np.asarray([sx, sy, sx, sy], np.float32) - np.asarray(
        [left, top, left, top], np.float32)
  if method == 'maskinversion':
    m = e.method
    if m.get('explainability', 'legrad') != 'legrad':
      raise ValueError(f"MaskInversion explainability {m.explainability!r}: only 'legrad' is implemented")
    kw = dict(steps=int(m.iterations), lr=float(m.lr), alpha=float(m.alpha), wd=float(m.weight_decay),
              mode=str(m.get('mode', 'auto')))
    return np.asarray(retrieval.region_embeddings(
        'maskinversion', loaded.model, loaded.params, px,
        None if masks is None else masks.astype(np.float32), boxes, pos_interp=pos, **kw))
  if masks is not None:
    from PIL import Image
    masks = np.stack([np.asarray(Image.fromarray(mk.astype(np.uint8) * 255).resize((s, s), Image.NEAREST)) > 127
                      for mk in masks]).astype(np.float32)
  return np.asarray(retrieval.region_embeddings(method, loaded.model, loaded.params, px, masks, boxes,
                                                pos_interp=pos))


def class_names(e, builder) -> tuple[list[str], Callable]:
  """(names [C], label_of: builder label value -> class index) for class retrieval."""
  md = builder.info.metadata or {}
  if e.get('class_names', 'metadata') != 'metadata':
    names = list(e.class_names)
    return names, lambda v: int(v) - 1
  if builder.name == 'trace_coco' and 'categories' in md:  # COCO: category ids in id order
    cats = sorted((int(k), v) for k, v in md['categories'].items())
    index = {k: i for i, (k, _) in enumerate(cats)}
    return [v for _, v in cats], lambda v: index[int(v)]
  if 'class_names' in md:  # VOC / Context: index 0 = background, labels 1..C
    return list(md['class_names'])[1:], lambda v: int(v) - 1
  raise ValueError(f'{builder.name}: no class names in the metadata; set config.eval.class_names')


def class_queries(e, ex) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
  """(masks bool [K, H, W] or None, boxes [K, 4] or None, label values [K]) of one example."""
  q = e.query
  if q == 'class_mask':
    lab = _label_map(ex['label_map'])
    values = np.asarray(ex['labels'], np.int64)
    return lab[None] == values[:, None, None], None, values
  if q in ('instance_mask', 'box'):
    keep = ~np.asarray(ex['iscrowd'], bool) if e.get('skip_crowd', True) else np.ones(len(ex['iscrowd']), bool)
    values = np.asarray(ex['category_id'], np.int64)[keep]
    if q == 'box':
      return None, np.asarray(ex['boxes'], np.float32)[keep], values
    return _masks([m for m, k in zip(ex['masks'], keep) if k]), None, values
  raise ValueError(f"unknown query {q!r}; expected 'class_mask', 'instance_mask' or 'box'")


def templates(e) -> list[str]:
  from trace_jax.evaluation import zeroshot
  t = e.get('prompt_templates', ('a photo of a {}.',))
  named = {'openai_imagenet': zeroshot.OPENAI_IMAGENET_TEMPLATES, 'simple_imagenet': zeroshot.SIMPLE_IMAGENET_TEMPLATES}
  return list(named[t]) if isinstance(t, str) and t in named else list(t)


def run_class_retrieval(e, loaded: Loaded, builder, source, verbose=True) -> dict:
  """MaskInversion Table 2: Acc@k of the query regions among the class prompts, per method."""
  from trace_jax.evaluation import retrieval, zeroshot
  names, label_of = class_names(e, builder)
  class_emb = np.asarray(zeroshot.class_text_embeddings(loaded.model, loaded.params, loaded.tokenizer,
                                                       names, templates(e)))
  methods = _methods(e)
  ks = retrieval.DEFAULT_KS
  ranks = {m: [] for m in methods}
  queries = []
  n = _limit(e, source)
  for i in _progress(range(n), n, 'class retrieval', verbose):
    ex = source[i]
    masks, boxes, values = class_queries(e, ex)
    if len(values) == 0:
      continue
    labels = np.asarray([label_of(v) for v in values])
    px, hw = image_pixels(ex['image'], e.image_size, e.get('resize', 'squash'))
    for m in methods:
      emb = region_embeddings(loaded, e, m, px, masks, boxes, hw)
      ranks[m].append(retrieval.class_retrieval(emb, class_emb, labels, ks)['ranks'])
    queries += [{'image_id': _image_id(ex), 'class': names[c], 'rank': {m: int(ranks[m][-1][j]) for m in methods}}
                for j, c in enumerate(labels)]
  out = {}
  for m in methods:
    r = np.concatenate(ranks[m]) if ranks[m] else np.zeros(0, np.int64)
    out[m] = {f'acc@{k}': float(np.mean(r < k)) if r.size else float('nan') for k in ks}
    out[m]['n'] = int(r.size)
  return {'num_examples': n, 'num_classes': len(names), 'methods': out, 'queries': queries}


def run_referring_retrieval(e, loaded: Loaded, builder, source, verbose=True) -> dict:
  """MaskInversion Table 1: every sentence ranks ALL instance masks of its image."""
  from trace_jax.evaluation import retrieval, zeroshot
  methods = _methods(e)
  acc = {m: {'ranks': [], 'inter': [], 'union': []} for m in methods}
  queries = []
  n = _limit(e, source)
  for i in _progress(range(n), n, 'referring retrieval', verbose):
    ex = source[i]
    texts = _texts(ex[e.get('text', 'sentences')])
    if not texts or len(ex['masks']) == 0:
      continue
    targets = np.asarray(ex['ref_object'])[np.asarray(ex['sentence_ref'])]
    masks = _masks(ex['masks'])
    expr = np.asarray(zeroshot.encode_texts(loaded.model, loaded.params, loaded.tokenizer, texts))
    px, hw = image_pixels(ex['image'], e.image_size, e.get('resize', 'squash'))
    for m in methods:
      emb = region_embeddings(loaded, e, m, px, masks, None, hw)
      r = retrieval.referring_retrieval(expr, emb, targets, masks)
      for k in ('ranks', 'inter', 'union'):
        acc[m][k].append(r[k])
    queries += [{'image_id': _image_id(ex), 'text': t, 'target': int(targets[j]),
                 'rank': {m: int(acc[m]['ranks'][-1][j]) for m in methods},
                 'iou': {m: float(acc[m]['inter'][-1][j] / max(acc[m]['union'][-1][j], 1)) for m in methods}}
                for j, t in enumerate(texts)]
  cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
  out = {m: retrieval.summarize_referring(cat(a['ranks']), cat(a['inter']), cat(a['union']))
         for m, a in acc.items()}
  return {'num_examples': n, 'methods': out, 'queries': queries}
