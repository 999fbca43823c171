"""The pointing game on the real datasets (AMC; trace_jax/evaluation/real/).

* ``pointing_game`` (AMC; Flickr30k Entities with the per-category table, RefCOCO+ testA / testB):
  GradCAM (attribution/gradcam.py) of every phrase of an image in ONE image forward (phrases padded to
  a size bucket: one compilation per bucket), raw map bicubic-upsampled to the original image, first
  row-major argmax, hit iff strictly inside ANY GT box of the phrase (metrics.pointing_game).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from trace_jax.data import preprocess
from trace_jax.evaluation import metrics as M
from trace_jax.evaluation.real.common import (
    Loaded, _image_id, _limit, _progress, _texts, image_pixels, pad_rows, tokenize)


# ---------------------------------------------------------------------------------------------- pointing game

def pointing_queries(e, ex) -> tuple[list[str], list[np.ndarray], list[str]]:
  """(texts [P], boxes per text [n_p, 4] xyxy original pixels, categories [P]) of one example.

  Flickr30k Entities ('phrases'): phrases whose entity has boxes; the entity's boxes (a hit in ANY
  counts). RefCOCO ('sentences' / 'sentences_raw'): each sentence with its ref's box."""
  t = e.get('text', 'phrases')
  if t == 'phrases':
    ok = np.asarray(ex['phrase_has_box'], bool)
    ent = np.asarray(ex['phrase_entity'])
    boxes, box_ent = np.asarray(ex['boxes'], np.float64).reshape(-1, 4), np.asarray(ex['box_entity'])
    texts = [s for s, k in zip(_texts(ex['phrases']), ok) if k]
    cats = [s for s, k in zip(_texts(ex['phrase_type']), ok) if k]
    return texts, [boxes[box_ent == en] for en in ent[ok]], cats
  if t in ('sentences', 'sentences_raw'):
    refs = np.asarray(ex['sentence_ref'])
    rb = np.asarray(ex['ref_boxes'], np.float64).reshape(-1, 4)
    texts = _texts(ex[t])
    return texts, [rb[r][None] for r in refs], [''] * len(texts)
  raise ValueError(f"unknown text field {t!r} for the pointing game; expected 'phrases', 'sentences' or "
                   "'sentences_raw'")


def gradcam_fn(loaded: Loaded, e) -> Callable:
  """f(image [1, S, S, 3] normalised, ids [P, L]) -> raw GradCAM grids [P, gh, gw] (jitted per bucket)."""
  from trace_jax.attribution.api import explain_fn
  m = e.method
  if m.name != 'gradcam':
    raise ValueError(f"the pointing game runs method 'gradcam' (AMC); got {m.name!r}")
  f = explain_fn('gradcam', loaded.model, layer=int(m.get('layer', -1)), relu_grad=bool(m.get('relu_grad', True)),
                 relu=bool(m.get('relu', True)), pos_interp=e.get('pos_interp'), normalize=False)
  return lambda image, ids: np.asarray(f(loaded.params, image, ids)['raw'])


def run_pointing_game(e, loaded: Loaded, builder, source, verbose=True) -> dict:
  """AMC pointing game: one image forward per image for all its phrases."""
  f = gradcam_fn(loaded, e)
  grids, boxes, sizes, cats, qs = [], [], [], [], []
  n = _limit(e, source)
  for i in _progress(range(n), n, 'pointing game', verbose):
    ex = source[i]
    texts, bx, ct = pointing_queries(e, ex)
    if not texts:
      continue
    px, hw = image_pixels(ex['image'], e.image_size, e.get('resize', 'squash'))
    g = f(preprocess.normalize_unit(px)[None], pad_rows(tokenize(loaded, texts)))[:len(texts)]
    grids += list(g)
    boxes += bx
    sizes += [hw] * len(texts)
    cats += ct
    qs += [(_image_id(ex), t) for t in texts]
  pg = M.pointing_game(grids, boxes, sizes, box_format='xyxy')
  res = {'pointing_accuracy': pg['accuracy'], 'n': len(grids)}
  out = {'num_examples': n, 'methods': {'gradcam': res},
         'queries': [{'image_id': iid, 'text': t, 'category': c, 'point': [int(v) for v in p], 'hit': bool(h)}
                     for (iid, t), c, p, h in zip(qs, cats, pg['points'], pg['hits'])]}
  if e.get('per_category'):
    cats = np.asarray(cats)
    out['per_category'] = {c: {'pointing_accuracy': float(pg['hits'][cats == c].mean()), 'n': int((cats == c).sum())}
                           for c in sorted(set(cats.tolist()))}
  return out
