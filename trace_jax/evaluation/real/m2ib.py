"""M2IB localization on the real datasets (M2IB Tables 1 / 2; trace_jax/evaluation/real/).

* ``m2ib_localization`` (M2IB Table 1 / 2; MS-CXR): the M2IB image map (attribution/m2ib.py, vmapped
  over a batch of pairs), binarised at > threshold, IoU with the union of the phrase's boxes in the
  model's input frame (metrics.localization), and the image confidence drop / increase
  (metrics.image_confidence); pairs sampled per seed, mean and std over seeds.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.data import preprocess
from trace_jax.evaluation import metrics as M
from trace_jax.evaluation.real.common import (
    Loaded, _limit, _progress, _s, frame_transform, image_pixels, tokenize)


# ---------------------------------------------------------------------------------------------- M2IB

def box_masks(boxes_list, hws, size: int, resize: str) -> np.ndarray:
  """bool [N, S, S]: the union of each sample's xyxy boxes mapped into the S x S model frame
  (metrics.boxes_to_mask: end-exclusive integer slices, clipped). The M2IB repository has no
  localisation code (notes/m2ib.md), so this is AMC's int() rule (notes/amc-and-local-alignment.md §4;
  the two rules: trace_jax/boxes.py)."""
  out = []
  for b, hw in zip(boxes_list, hws):
    sx, sy, left, top = frame_transform(hw, size, resize)
    bb = np.asarray(b, np.float64).reshape(-1, 4) * [sx, sy, sx, sy] - [left, top, left, top]
    out.append(M.boxes_to_mask(bb, (size, size), 'xyxy'))
  return np.stack(out) if out else np.zeros((0, size, size), bool)


def run_m2ib_localization(e, loaded: Loaded, builder, source, verbose=True) -> dict:
  """M2IB localization (eq. 16) and image confidence drop / increase (eq. 17-18) over seeds."""
  from trace_jax.attribution import m2ib
  from trace_jax.models import l2_normalize
  m = e.method
  if m.name != 'm2ib':
    raise ValueError(f"m2ib_localization runs method 'm2ib'; got {m.name!r}")
  model, params = loaded.model, loaded.params
  size, resize, bs = int(e.image_size), e.get('resize', 'crop'), int(e.get('batch_size', 8))

  @jax.jit
  def scorer(params, images, text_emb):  # cos(image, its paired text) [B]
    emb, _ = model.apply({'params': params}, images, method='encode_image')
    return jnp.sum(l2_normalize(emb) * text_emb, -1)

  @jax.jit
  def encode_text(params, ids):
    return l2_normalize(model.apply({'params': params}, ids, method='encode_text')[0])

  n_all = _limit(e, source)
  seeds = list(e.get('seeds', (0,)))
  per_seed = []
  for seed in seeds:
    rng = np.random.default_rng(int(seed))
    k = min(int(e.get('num_samples') or n_all), n_all)
    idx = np.sort(rng.choice(n_all, k, replace=False))
    key = jax.random.PRNGKey(int(seed))
    ious, orig, dist = [], [], []
    for lo in _progress(range(0, k, bs), -(-k // bs), f'm2ib seed {seed}', verbose):
      exs = [source[int(j)] for j in idx[lo:lo + bs]]
      pix = [image_pixels(x['image'], size, resize) for x in exs]
      images = preprocess.normalize_unit(np.stack([p for p, _ in pix]))
      ids = tokenize(loaded, [_s(x['text']) for x in exs])
      b = len(exs)
      if b < bs:  # fixed batch shape: one compilation
        images = np.concatenate([images, np.repeat(images[:1], bs - b, 0)])
        ids = np.concatenate([ids, np.repeat(ids[:1], bs - b, 0)])
      key, sub = jax.random.split(key)
      out = m2ib.explain(model, params, images, ids, layer=int(m.vision_layer), text_layer=int(m.text_layer),
                         beta=float(m.beta), steps=int(m.steps), lr=float(m.lr), samples=int(m.samples),
                         key=sub, out_size=None, modality='image')
      maps = np.asarray(out['map'])[:b]
      gt = box_masks([x['boxes'] for x in exs], [hw for _, hw in pix], size, resize)
      ious.append(M.localization(maps, gt, float(e.binarize_threshold), bool(e.get('percentile', False)))['iou'])
      text_emb = encode_text(params, jnp.asarray(ids))
      sc = lambda x: np.asarray(scorer(params, jnp.asarray(x, jnp.float32), text_emb))
      full_maps = np.concatenate([maps, np.ones((bs - b,) + maps.shape[1:], maps.dtype)]) if b < bs else maps
      cc = M.image_confidence(sc, images, full_maps)
      orig.append(cc['original'][:b])
      dist.append(cc['distilled'][:b])
    iou = np.concatenate(ious)
    ok = ~np.isnan(iou)
    cc = M.confidence_change(np.concatenate(orig), np.concatenate(dist))
    per_seed.append({'seed': int(seed), 'n': int(k),
                     'localization_iou': float(iou[ok].mean()) if ok.any() else float('nan'),
                     'confidence_drop': cc['drop'], 'confidence_increase': cc['increase']})
  keys = ('localization_iou', 'confidence_drop', 'confidence_increase')
  res = {kk: float(np.mean([s[kk] for s in per_seed])) for kk in keys}
  res.update({f'{kk}_std': float(np.std([s[kk] for s in per_seed])) for kk in keys})
  res['n'] = int(sum(s['n'] for s in per_seed))
  return {'num_examples': n_all, 'methods': {'m2ib': res}, 'seeds': per_seed}
