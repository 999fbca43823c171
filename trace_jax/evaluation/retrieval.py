"""MaskInversion's downstream tasks (maskinversion.md §4.1, App. B): class retrieval and
referring-expression retrieval from per-region embeddings, with the paper's baselines.

* **Region embeddings** -- :func:`region_embeddings` gives one embedding per mask of an image, [K, E],
  by 'maskinversion' (the LETs of trace_jax/inversion/maskinversion.py) or a baseline of tables 1-2:
  'cls' (CLIP [CLS]), 'crop', 'masked_crop', 'red_circle', 'fgvp' (blur reverse mask); see
  visual_prompts.py for their exact definitions. Baselines build the K prompted images with ``vmap``
  and embed them with one batched forward, all in one ``jit``; K is padded to a size bucket so a
  varying number of masks compiles once per bucket (the buckets of inversion.maskinversion).
* **Class retrieval** -- "given a query mask of an object, classify it by matching its localized
  embedding to the text embeddings of the classes": cosine of each region embedding with the
  prompt-ensembled class embeddings (zeroshot.py); Acc@1/5/10 = fraction of regions whose true
  class is among the k best (:func:`class_retrieval`).
* **Referring-expression retrieval** -- "The query mask whose localized embedding exhibits the
  highest cosine similarity with the text embedding is selected": for each expression, the image's
  candidate masks are ranked by cosine with the expression's text embedding; Acc@k = the referred
  mask is among the k best; mIoU = mean over expressions of IoU(selected mask, GT mask); oIoU
  ("overall IoU", the IoU column of table 1) = sum of intersections / sum of unions over all
  expressions of the set (:func:`referring_retrieval`, :func:`summarize_referring`).

Ranks break ties by index (a stable descending sort): rank(t) = #{j: s_j > s_t} + #{j < t: s_j = s_t}.

:func:`evaluate_region_retrieval` runs both tasks on the embedded trace_shapes data (candidate masks =
the instance masks of an image's objects, classes = its thing classes, expressions =
``pipeline.example_phrases``), for evaluate.py.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.evaluation import metrics
from trace_jax.evaluation import visual_prompts as vp
from trace_jax.evaluation import zeroshot
from trace_jax.inversion import maskinversion as mi
from trace_jax.models import build

METHODS = ('maskinversion', 'cls', 'crop', 'masked_crop', 'red_circle', 'fgvp')
DEFAULT_KS = (1, 5, 10)


# ----------------------------------------------------------------------------- metrics
# Acc@k, the ranking (stable, ties by index) and the mask IoUs are metrics.py's; here they are applied
# to embeddings. Host-side NumPy: a few small reductions per image whose shapes change with every
# image (eager jnp ops would compile once per shape).

def cosine_scores(queries, keys) -> np.ndarray:
  """[Q, E] x [N, E] -> [Q, N] float64 cosine similarities (both sides L2-normalised here)."""
  q = np.asarray(queries, np.float64)
  k = np.asarray(keys, np.float64)
  q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
  k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
  # einsum, not BLAS: a BLAS GEMM may accumulate different columns in different orders (SIMD edge
  # kernels), so identical candidates (e.g. [CLS] for every mask) would not tie exactly and the
  # stable tie-break by index would depend on the machine's BLAS build.
  return np.einsum('qe,ne->qn', q, k)


def topk(scores, k: int) -> np.ndarray:
  """[Q, N] -> [Q, min(k, N)] indices, best first (stable: ties by index, as metrics.py ranks)."""
  order = np.argsort(-np.asarray(scores), axis=1, kind='stable')
  return order[:, :min(int(k), order.shape[1])]


def class_retrieval(region_embeds, class_embeds, labels, ks: Sequence[int] = DEFAULT_KS) -> dict:
  """Class retrieval of K regions among C classes.

  Args:
    region_embeds [K, E] (LETs or baseline embeddings, any norm); class_embeds [C, E];
    labels [K] int class index of each region.
  Returns:
    dict (NumPy): 'scores' [K, C] cosine, 'ranks' [K] 0-based rank of the true class, 'top'
    [K, min(max ks, C)] predictions best first, and 'acc@k' for k in ks
    (``metrics.retrieval_accuracy``).
  """
  labels = np.asarray(labels)
  region_embeds, class_embeds = np.asarray(region_embeds), np.asarray(class_embeds)
  if region_embeds.ndim != 2 or class_embeds.ndim != 2 or region_embeds.shape[1] != class_embeds.shape[1]:
    raise ValueError(f'need region_embeds [K, E] and class_embeds [C, E]; got {region_embeds.shape} '
                     f'and {class_embeds.shape}')
  if labels.shape != (region_embeds.shape[0],):
    raise ValueError(f'labels must be [K={region_embeds.shape[0]}]; got shape {labels.shape}')
  if labels.size and (labels.min() < 0 or labels.max() >= class_embeds.shape[0]):
    raise ValueError(f'labels must lie in [0, {class_embeds.shape[0]}); got [{labels.min()}, {labels.max()}]')
  s = cosine_scores(region_embeds, class_embeds)
  acc = metrics.retrieval_accuracy(s, labels, ks)
  out = {'scores': s, 'ranks': acc.pop('rank'), 'top': topk(s, max(ks))}
  out.update(acc)
  return out


def referring_retrieval(expr_embeds, region_embeds, targets, masks, gt_masks=None,
                        ks: Sequence[int] = DEFAULT_KS) -> dict:
  """Referring-expression retrieval on one image.

  Args:
    expr_embeds [X, E] text embeddings of the X expressions; region_embeds [M, E] of the M candidate
    masks; targets [X] index of each expression's referred mask among the candidates;
    masks [M, H, W] the candidates; gt_masks [X, H, W] the referred GT masks (default
    masks[targets]). Masks are binarised at > 0.5 for the IoU.
  Returns:
    dict (NumPy): 'scores' [X, M], 'ranks' [X], 'selected' [X] (top-1 mask), 'inter' / 'union' /
    'iou' [X] of the selected mask vs the GT mask, and 'acc@k', 'miou', 'oiou' of this image alone
    (``metrics.retrieval_accuracy`` / ``metrics.referring_iou``; several images:
    :func:`summarize_referring`).
  """
  targets = np.asarray(targets)
  masks = np.asarray(masks) > 0.5
  expr_embeds, region_embeds = np.asarray(expr_embeds), np.asarray(region_embeds)
  if masks.ndim != 3 or masks.shape[0] != region_embeds.shape[0]:
    raise ValueError(f'masks must be [M={region_embeds.shape[0]}, H, W]; got shape {masks.shape}')
  if targets.shape != (expr_embeds.shape[0],):
    raise ValueError(f'targets must be [X={expr_embeds.shape[0]}]; got shape {targets.shape}')
  if targets.size and (targets.min() < 0 or targets.max() >= masks.shape[0]):
    raise ValueError(f'targets must index the {masks.shape[0]} candidate masks; got '
                     f'[{targets.min()}, {targets.max()}]')
  gt = masks[targets] if gt_masks is None else np.asarray(gt_masks) > 0.5
  if gt.shape != (len(targets),) + masks.shape[1:]:
    raise ValueError(f'gt_masks must be [X, H, W] = {(len(targets),) + masks.shape[1:]}; got {gt.shape}')
  s = cosine_scores(expr_embeds, region_embeds)
  acc = metrics.retrieval_accuracy(s, targets, ks)
  selected = topk(s, 1)[:, 0]
  iou = metrics.referring_iou(masks[selected], gt)
  out = {'scores': s, 'ranks': acc.pop('rank'), 'selected': selected, 'inter': iou['intersection'],
         'union': iou['union'], 'iou': iou['iou'], 'miou': iou['miou'], 'oiou': iou['oiou'],
         'n': len(targets)}
  out.update(acc)
  return out


def summarize_referring(ranks, inter, union, ks: Sequence[int] = DEFAULT_KS) -> dict:
  """Table-1 metrics of a whole set from per-expression counts (streaming: no masks kept).

  acc@k = mean(rank < k); 'miou' = mean of inter / union ('oiou' = sum(inter) / sum(union), so large
  objects weigh more); as ``metrics.referring_iou``, an expression with union 0 is left out of the
  mIoU. Also 'n' expressions.
  """
  r = np.asarray(ranks)
  inter, union = np.asarray(inter, np.float64), np.asarray(union, np.float64)
  out = {f'acc@{k}': float(np.mean(r < k)) if r.size else float('nan') for k in ks}
  ok = union > 0
  out['miou'] = float(np.mean(inter[ok] / union[ok])) if ok.any() else float('nan')
  out['oiou'] = float(inter.sum() / union.sum()) if union.sum() > 0 else float('nan')
  out['n'] = int(r.size)
  return out


# ----------------------------------------------------------------------------- region embeddings

@functools.lru_cache(maxsize=64)
def _prompt_fn(cfg, method: str, out_hw, thickness: float, sigma: float, fill: tuple,
               crop_to_box: bool, scale: float, mean: tuple, std: tuple, pos_interp):
  """jit(params, image_px [H, W, 3], masks [K, H, W], boxes [K, 4]) -> [K, E] for a baseline."""
  model = build(cfg)

  def fn(params, image, masks, boxes):
    encode = lambda x: vp.cls_embedding(model, params, vp.normalize(x, mean, std), pos_interp)
    k = masks.shape[0]
    if method == 'cls':
      e = encode(image[None])
      return jnp.broadcast_to(e, (k, e.shape[-1]))
    if method == 'crop':
      x = jax.vmap(lambda b: vp.crop(image, b, out_hw))(boxes)
    elif method == 'masked_crop':
      x = jax.vmap(lambda m, b: vp.masked_crop(image, m, b, out_hw, fill, crop_to_box))(masks, boxes)
    elif method == 'red_circle':
      x = jax.vmap(lambda b: vp.red_circle(image, b, thickness=thickness, scale=scale))(boxes)
    elif method == 'fgvp':
      blurred = vp.pil_gaussian_blur(image, sigma)  # once per image, not per mask
      x = jax.vmap(lambda m: vp.fgvp_blur_reverse_mask(image, m, sigma, blurred))(masks)
    else:
      raise ValueError(f'unknown baseline {method!r}')
    return encode(x)

  return jax.jit(fn)


def mask_boxes_np(masks, threshold: float = 0.5) -> np.ndarray:
  """NumPy :func:`visual_prompts.mask_box` of [K, H, W] masks -> float32 [K, 4] (x0, y0, x1, y1)."""
  on = np.asarray(masks) > threshold
  k, h, w = on.shape
  rows, cols = on.any(2), on.any(1)
  out = np.tile(np.asarray([0, 0, w, h], np.float32), (k, 1))
  nz = rows.any(1)
  out[nz, 0] = cols[nz].argmax(1)
  out[nz, 1] = rows[nz].argmax(1)
  out[nz, 2] = w - cols[nz, ::-1].argmax(1)
  out[nz, 3] = h - rows[nz, ::-1].argmax(1)
  return out


def _as_pixels(image) -> np.ndarray:
  x = np.asarray(image)
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / 255.0
  x = x.astype(np.float32)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise ValueError(f'image must be one [H, W, 3] image in pixel space ([0, 1] float or uint8); '
                     f'got shape {x.shape}')
  if x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
    raise ValueError(f'image must be in pixel space [0, 1] (or uint8), not normalised; got range '
                     f'[{x.min():g}, {x.max():g}]')
  return x


def region_embeddings(method: str, model, params, image, masks=None, boxes=None, *,
                      mean: Sequence[float] = vp.CLIP_MEAN, std: Sequence[float] = vp.CLIP_STD,
                      out_size=None, thickness: float = vp.FGVP_THICKNESS,
                      sigma: float = vp.FGVP_BLUR_STD, fill: Sequence[float] = vp.CLIP_MEAN,
                      masked_crop_to_box: bool = True, circle_scale: float = 1.0,
                      pos_interp: str | None = None, bucket: bool = True, **inversion_kw):
  """One embedding per region of one image, [K, E] (un-normalised, like the [CLS] embedding).

  Args:
    method: 'maskinversion' | 'cls' | 'crop' | 'masked_crop' | 'red_circle' | 'fgvp'.
    image: [H, W, 3] in **pixel space** ([0, 1] float, or uint8); prompts are drawn there and the
      result is normalised with ``mean`` / ``std`` (CLIP's by default) before the image tower.
    masks: [K, H, W] in [0, 1] at the image's resolution (MaskInversion also takes other sizes);
    boxes: [K, 4] (x0, y0, x1, y1) pixels, end-exclusive. Give masks, boxes or both: missing boxes
      are the masks' tight boxes; missing masks are the boxes rasterised
      (inversion.maskinversion.rasterize_boxes).
    out_size: crop / masked-crop output (h, w) or int; default the image size, the resolution every
      other method forwards at.
    thickness, circle_scale: red-circle line width (px) and semi-axes factor; sigma: FGVP blur std
      (px); fill, masked_crop_to_box: Masked Crop's background value (pixel space) and whether it
      crops (table 7) or keeps the frame; pos_interp: position-embedding resampling when the image
      size differs from the model's; bucket: pad K to ``maskinversion.bucket_size`` (compile once per bucket).
    inversion_kw: for 'maskinversion', passed to ``inversion.maskinversion.invert`` (mode, steps, lr,
      alpha, layers, ...).
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}; got {method!r}')
  if inversion_kw and method != 'maskinversion':
    raise ValueError(f'unexpected keyword(s) {sorted(inversion_kw)} for method {method!r}')
  x = _as_pixels(image)
  h, w = x.shape[:2]
  if masks is None and boxes is None:
    raise ValueError('give masks [K, H, W] and/or boxes [K, 4]')
  if boxes is not None:
    boxes = np.asarray(boxes, np.float32)
    if boxes.ndim == 1:
      boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
      raise ValueError(f'boxes must be [K, 4] (x0, y0, x1, y1); got shape {boxes.shape}')
  if masks is not None:
    masks = np.asarray(masks)
    masks = masks.astype(np.float32) if masks.dtype != np.float32 else masks
    if masks.ndim == 2:
      masks = masks[None]
    if masks.ndim != 3:
      raise ValueError(f'masks must be [K, H, W]; got shape {masks.shape}')
    if boxes is not None and boxes.shape[0] != masks.shape[0]:
      raise ValueError(f'{masks.shape[0]} masks but {boxes.shape[0]} boxes')
  if method == 'maskinversion':
    if pos_interp is not None:
      inversion_kw['pos_interp'] = pos_interp
    xn = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    if masks is None:
      return mi.invert(model, params, xn, boxes=boxes, mask_size=(h, w), **inversion_kw)['lets']
    return mi.invert(model, params, xn, masks, **inversion_kw)['lets']

  if masks is None:
    masks = mi.rasterize_boxes(boxes, (h, w))
  else:
    mi.check_masks(masks)
    if masks.shape[1:] != (h, w):
      raise ValueError(f'masks must be at the image resolution {(h, w)} for {method!r}; got '
                       f'{masks.shape[1:]}')
  if boxes is None:
    boxes = mask_boxes_np(masks)
  k = masks.shape[0]
  kp = mi.bucket_size(k) if bucket else k
  if kp > k:  # padding regions: the full frame (valid for every prompt), dropped below
    masks = np.concatenate([masks, np.ones((kp - k, h, w), np.float32)])
    boxes = np.concatenate([boxes, np.tile(np.asarray([[0, 0, w, h]], np.float32), (kp - k, 1))])
  out_hw = (h, w) if out_size is None else vp._hw(out_size, x)
  fn = _prompt_fn(model.cfg, method, tuple(out_hw), float(thickness), float(sigma),
                  tuple(float(f) for f in fill), bool(masked_crop_to_box), float(circle_scale),
                  tuple(float(m) for m in mean), tuple(float(s) for s in std), pos_interp)
  return fn(params, jnp.asarray(x), jnp.asarray(masks), jnp.asarray(boxes))[:k]


# ----------------------------------------------------------------------------- trace_shapes evaluation

def shapes_regions(example) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Candidate regions of a trace_shapes example: (masks float32 [n, S, S] = visible pixels of
  object k, boxes float32 [n, 4] (x0, y0, x1, y1), fine labels int32 [n])."""
  inst = np.asarray(example['instance'])
  fine = np.asarray(example['objects']['fine'], np.int32)
  n = len(fine)
  masks = (inst[None] == np.arange(1, n + 1)[:, None, None]).astype(np.float32)
  boxes = vp.yxyx_to_xyxy(np.asarray(example['objects']['box'])).astype(np.float32)
  return masks, boxes.reshape(n, 4), fine


def evaluate_region_retrieval(model, params, tokenizer, source, method='maskinversion', *,
                              tasks: Sequence[str] = ('class', 'refexp'), indices=None,
                              num_examples: int | None = None, class_names: Sequence[str] | None = None,
                              templates: Sequence[str] = zeroshot.SHAPES_TEMPLATES,
                              phrase_source: str = 'refexp', ks: Sequence[int] = DEFAULT_KS,
                              batch_size: int = zeroshot.DEFAULT_BATCH, **method_kw) -> dict:
  """Class and referring-expression retrieval on trace_shapes examples.

  Args:
    source: random-access examples (``pipeline.load_split(...)``, or a list of example dicts);
      indices / num_examples choose which (default all).
    method: a name of :data:`METHODS`, or a callable ``method(image_px, masks, boxes, example) ->
      [K, E]`` (tests, custom embedders).
    tasks: 'class' and/or 'refexp'. Class retrieval classifies each object's instance mask among the
      thing classes (``class_names`` default: concepts.json thing classes, in label order),
      prompt-ensembled over ``templates``; referring retrieval ranks an image's object masks for each
      of its expressions (``pipeline.example_phrases(example, phrase_source)``).
    method_kw: passed to :func:`region_embeddings` (e.g. steps, lr, alpha, mode for MaskInversion).
  Returns:
    {'method', 'num_images', 'class': {'acc@k'..., 'n'}, 'refexp': {'acc@k'..., 'miou', 'oiou',
    'n'}} (only the requested tasks).
  """
  from trace_jax.data import pipeline
  from trace_jax.data.shapes.concepts import load_concepts
  tasks = tuple(tasks)
  bad = set(tasks) - {'class', 'refexp'}
  if bad or not tasks:
    raise ValueError(f"tasks must be a non-empty subset of ('class', 'refexp'); got {tasks}")
  if isinstance(method, str) and method not in METHODS:
    raise ValueError(f'method must be one of {METHODS} or a callable; got {method!r}')
  if indices is None:
    indices = range(len(source) if num_examples is None else min(int(num_examples), len(source)))
  examples = [source[int(i)] for i in indices]
  if not examples:
    raise ValueError('no examples to evaluate')

  # Text side, once: class embeddings and every expression of the set in fixed-size chunks.
  label_index = None
  if 'class' in tasks:
    if class_names is None:
      c = load_concepts()
      things = c.things
      class_names = [c.fine_names[i] for i in things]
      label_index = {lab: j for j, lab in enumerate(things)}
    class_emb = np.asarray(zeroshot.class_text_embeddings(model, params, tokenizer, class_names,
                                                          templates, batch_size=batch_size))
  phrases = [pipeline.example_phrases(e, phrase_source) for e in examples] if 'refexp' in tasks else []
  texts = [t for ph in phrases for t, _ in ph]
  expr_emb = (np.asarray(zeroshot.encode_texts(model, params, tokenizer, texts, batch_size=batch_size))
              if texts else None)

  class_ranks, ref_ranks, ref_inter, ref_union = [], [], [], []
  offset = 0
  for j, ex in enumerate(examples):
    masks, boxes, fine = shapes_regions(ex)
    x = len(phrases[j]) if phrases else 0
    if masks.shape[0] == 0:
      offset += x
      continue
    if callable(method):
      emb = np.asarray(method(np.asarray(ex['image'], np.float32) / 255.0, masks, boxes, ex))
    else:
      emb = np.asarray(region_embeddings(method, model, params, ex['image'], masks, boxes, **method_kw))
    if emb.shape[0] != masks.shape[0]:
      raise ValueError(f'method returned {emb.shape[0]} embeddings for {masks.shape[0]} regions')
    if 'class' in tasks:
      labels = fine if label_index is None else np.asarray([label_index[int(f)] for f in fine])
      class_ranks.append(class_retrieval(emb, class_emb, labels, ks)['ranks'])
    if x:
      targets = np.asarray([k for _, k in phrases[j]])
      r = referring_retrieval(expr_emb[offset:offset + x], emb, targets, masks, ks=ks)
      offset += x
      ref_ranks.append(r['ranks'])
      ref_inter.append(r['inter'])
      ref_union.append(r['union'])

  out = {'method': method if isinstance(method, str) else getattr(method, '__name__', 'callable'),
         'num_images': len(examples)}
  if 'class' in tasks:
    ranks = np.concatenate(class_ranks) if class_ranks else np.zeros(0, np.int32)
    out['class'] = {f'acc@{k}': float(np.mean(ranks < k)) if ranks.size else float('nan') for k in ks}
    out['class']['n'] = int(ranks.size)
  if 'refexp' in tasks:
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    out['refexp'] = summarize_referring(cat(ref_ranks), cat(ref_inter), cat(ref_union), ks)
  return out
