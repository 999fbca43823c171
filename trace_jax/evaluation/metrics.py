"""Evaluation metrics for attribution maps and region-text matching (pure NumPy).

Conventions (each function's docstring repeats what applies):

* heatmaps are ``[h, w]`` (one) or ``[N, h, w]`` arrays; images are ``H x W`` pixels; pixel (y, x)
  is row y, column x; points are ``(x, y)`` integer pixel coordinates (the AMC code's order);
* boxes are ``xywh`` = ``[x1, y1, w, h]`` (REFER / RefCOCO+, MS-CXR) or ``xyxy`` = ``[x1, y1, x2, y2]``
  (Flickr30k Entities) in pixels of the ORIGINAL image;
* masks are boolean ``[H, W]`` / ``[N, H, W]``;
* rates are fractions in [0, 1] (multiply by 100 for the papers' percentages);
* a per-sample ratio with a zero denominator is NaN and is left out of the macro average (stated
  per function); micro averages pool the counts first.

Sources: notes/amc-and-local-alignment.md §7 (pointing game, box ranking), the M2IB paper §4.3-4.4 and
its eval.py (confidence drop / increase, localization), the TRACE slides (precision / recall / mIoU at
a threshold), MaskInversion §4.1 / App. B (Acc@k, mIoU, oIoU).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from trace_jax.boxes import boxes_to_masks
from trace_jax.resize import torch_bicubic_matrix


def _nanmean(x) -> float:
  x = np.asarray(x, np.float64)
  ok = ~np.isnan(x)
  return float(x[ok].mean()) if ok.any() else float("nan")


def _ratio(num, den):
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


# ------------------------------------------------------------------------------------------------
# Pointing game and box ranking (AMC code, notes/amc-and-local-alignment.md §7).

def upsample_bicubic(heatmap, size_hw: tuple[int, int]) -> np.ndarray:
  """[h, w] -> [H, W] as ``F.interpolate(mode='bicubic', align_corners=False)`` (a = -0.75, border clamp).

  Computed in float64 (the AMC code runs float32 on CUDA; only exact near-ties could differ).
  """
  hm = np.asarray(heatmap, np.float64)
  if hm.ndim != 2:
    raise ValueError(f"heatmap must be [h, w]; got shape {hm.shape}")
  wh = torch_bicubic_matrix(hm.shape[0], int(size_hw[0]))
  ww = torch_bicubic_matrix(hm.shape[1], int(size_hw[1]))
  return wh @ hm @ ww.T


def argmax_point(heatmap) -> tuple[int, int]:
  """(x, y) of the maximum of a [H, W] map; ties -> the first in row-major order (smallest y, then x).

  = the AMC code's ``(mask == mask.max()).nonzero()[0]`` (which returns (y, x)).
  """
  hm = np.asarray(heatmap)
  if np.isnan(hm).any():
    raise ValueError("heatmap contains NaN; the pointing game needs a finite map")
  y, x = np.unravel_index(int(np.argmax(hm)), hm.shape)  # np.argmax = first occurrence, row-major
  return int(x), int(y)


def _as_boxes(boxes) -> np.ndarray:
  b = np.asarray(boxes, np.float64)
  if b.ndim == 1:
    b = b[None]
  if b.ndim != 2 or b.shape[1] != 4:
    raise ValueError(f"boxes must be [4] or [n, 4]; got shape {b.shape}")
  return b


def point_in_boxes(point, boxes, box_format: str = "xywh") -> bool:
  """True iff the point is STRICTLY inside ANY of the boxes (AMC ``point_in_box`` / ``_xyxy``).

  xywh: x1 < x < x1 + w and y1 < y < y1 + h; xyxy: x1 < x < x2 and y1 < y < y2. No tolerance:
  a point on a border is a miss.
  """
  x, y = point
  b = _as_boxes(boxes)
  if box_format == "xywh":
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
  elif box_format == "xyxy":
    x1, y1, x2, y2 = b.T
  else:
    raise ValueError(f"box_format must be 'xywh' or 'xyxy'; got {box_format!r}")
  return bool(np.any((x > x1) & (x < x2) & (y > y1) & (y < y2)))


def pointing_game(heatmaps: Sequence, boxes: Sequence, image_sizes: Sequence[tuple[int, int]],
                  box_format: str = "xywh", upsample: bool = True) -> dict:
  """Pointing-game accuracy (AMC ``grounding_eval(on_bbox=False)`` / ``grounding_eval_flickr``).

  Args:
    heatmaps: N maps, each [h, w] (raw, un-normalised is fine: only the argmax matters).
    boxes: N entries, each one box [4] or several boxes [n, 4] (a hit in ANY counts; Flickr30k).
    image_sizes: N (H, W) original image sizes; the map is bicubic-upsampled to it first.
    box_format: 'xywh' (RefCOCO+/ReferIt) or 'xyxy' (Flickr30k Entities).
    upsample: False if the maps are already at image size.
  Returns: {'accuracy': hits / N, 'hits': bool [N], 'points': int [N, 2] (x, y)}.
  """
  if not (len(heatmaps) == len(boxes) == len(image_sizes)):
    raise ValueError(f"got {len(heatmaps)} heatmaps, {len(boxes)} box sets, {len(image_sizes)} sizes")
  hits, points = [], []
  for hm, b, hw in zip(heatmaps, boxes, image_sizes):
    m = upsample_bicubic(hm, hw) if upsample else np.asarray(hm)
    pt = argmax_point(m)
    points.append(pt)
    hits.append(point_in_boxes(pt, b, box_format))
  hits = np.asarray(hits, bool)
  return {"accuracy": float(hits.mean()) if len(hits) else float("nan"), "hits": hits,
          "points": np.asarray(points, np.int64).reshape(-1, 2)}


def box_iou_inclusive(box1, box2) -> float:
  """IoU of two xywh boxes with inclusive pixel ends (REFER / AMC ``computeIoU``).

  Intersection ``(ix2 - ix1 + 1) (iy2 - iy1 + 1)`` with ``ix2 = min(x + w - 1)``, counted only if
  ``ix1 < ix2`` and ``iy1 < iy2`` (strict, as the code); union = w1 h1 + w2 h2 - intersection.
  """
  b1, b2 = np.asarray(box1, np.float64), np.asarray(box2, np.float64)
  ix1, iy1 = max(b1[0], b2[0]), max(b1[1], b2[1])
  ix2 = min(b1[0] + b1[2] - 1, b2[0] + b2[2] - 1)
  iy2 = min(b1[1] + b1[3] - 1, b2[1] + b2[3] - 1)
  inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if (ix1 < ix2 and iy1 < iy2) else 0.0
  return float(inter / (b1[2] * b1[3] + b2[2] * b2[3] - inter))


def box_ranking(heatmaps: Sequence, detections: Sequence, gt_boxes: Sequence,
                image_sizes: Sequence[tuple[int, int]], alpha: float = 0.5, iou_threshold: float = 0.5,
                upsample: bool = True) -> dict:
  """Box-ranking recall@1 ("box accuracy"; AMC ``grounding_eval(on_bbox=True)``).

  Each candidate xywh box d scores ``sum(map[int(y):int(y+h), int(x):int(x+w)]) / (w h)^alpha`` on the
  map bicubic-upsampled to the image; the first box with the highest score strictly above 0 is the
  prediction (the code starts from ``max_score = 0`` and updates on ``>``); a hit iff its
  ``box_iou_inclusive`` with the GT box is >= ``iou_threshold``. A sample where no box scores > 0 is a
  miss (the official code would silently reuse the previous sample's box). Slices start at 0 at least.

  Args: heatmaps N [h, w]; detections N arrays [M_i, >=4] (xywh first); gt_boxes N xywh [4];
  image_sizes N (H, W). Returns {'accuracy', 'hits' [N], 'pred' int [N] (index or -1), 'iou' [N]}.
  """
  if not (len(heatmaps) == len(detections) == len(gt_boxes) == len(image_sizes)):
    raise ValueError("heatmaps, detections, gt_boxes and image_sizes must have the same length")
  hits, preds, ious = [], [], []
  for hm, dets, gt, hw in zip(heatmaps, detections, gt_boxes, image_sizes):
    m = upsample_bicubic(hm, hw) if upsample else np.asarray(hm, np.float64)
    best, best_i = 0.0, -1
    for i, d in enumerate(np.asarray(dets, np.float64).reshape(-1, np.shape(dets)[-1] if len(dets) else 4)):
      x, y, w, h = d[:4]
      y0, y1 = max(int(y), 0), max(int(y + h), 0)
      x0, x1 = max(int(x), 0), max(int(x + w), 0)
      s = m[y0:y1, x0:x1].sum() / (w * h) ** alpha
      if s > best:
        best, best_i = s, i
    iou = box_iou_inclusive(gt, np.asarray(dets, np.float64)[best_i, :4]) if best_i >= 0 else 0.0
    preds.append(best_i)
    ious.append(iou)
    hits.append(best_i >= 0 and iou >= iou_threshold)
  hits = np.asarray(hits, bool)
  return {"accuracy": float(hits.mean()) if len(hits) else float("nan"), "hits": hits,
          "pred": np.asarray(preds, np.int64), "iou": np.asarray(ious)}


# ------------------------------------------------------------------------------------------------
# Binary-mask scores at a threshold (TRACE: precision / recall / mIoU) and M2IB localization.

def binarize(heatmaps, threshold: float = 0.5, inclusive: bool = True) -> np.ndarray:
  """heatmap >= threshold (``inclusive``) or heatmap > threshold; NaN -> False."""
  hm = np.asarray(heatmaps, np.float64)
  with np.errstate(invalid="ignore"):
    return (hm >= threshold) if inclusive else (hm > threshold)


def mask_scores(pred_masks, gt_masks) -> dict:
  """Precision / recall / IoU of boolean masks [N, H, W] (or one [H, W]) against GT masks.

  Per sample: precision = TP / (TP + FP) (NaN if nothing predicted), recall = TP / (TP + FN) (NaN if
  the GT is empty), IoU = TP / (TP + FP + FN) (NaN if both are empty).
  macro_* = mean over samples of the per-sample values, NaN samples left out (``miou`` = macro IoU);
  micro_* = the same ratios of TP / FP / FN summed over all samples (pixels pooled).
  """
  p = np.asarray(pred_masks, bool)
  g = np.asarray(gt_masks, bool)
  if p.shape != g.shape:
    raise ValueError(f"prediction {p.shape} and ground-truth {g.shape} masks differ in shape")
  if p.ndim == 2:
    p, g = p[None], g[None]
  ax = tuple(range(1, p.ndim))
  tp = np.sum(p & g, axis=ax)
  fp = np.sum(p & ~g, axis=ax)
  fn = np.sum(~p & g, axis=ax)
  prec, rec, iou = _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(tp, tp + fp + fn)
  TP, FP, FN = tp.sum(), fp.sum(), fn.sum()
  return {"tp": tp, "fp": fp, "fn": fn, "precision": prec, "recall": rec, "iou": iou,
          "macro_precision": _nanmean(prec), "macro_recall": _nanmean(rec), "miou": _nanmean(iou),
          "micro_precision": float(_ratio(TP, TP + FP)), "micro_recall": float(_ratio(TP, TP + FN)),
          "micro_iou": float(_ratio(TP, TP + FP + FN))}


def threshold_scores(heatmaps, gt_masks, threshold: float = 0.5, inclusive: bool = True) -> dict:
  """TRACE's precision / recall / mIoU of heatmaps binarised at ``threshold`` (default 0.5).

  heatmaps [N, H, W] (one per token or per sample, at the masks' resolution, values normally in
  [0, 1]); gt_masks [N, H, W] bool. A pixel is predicted iff ``heatmap >= threshold``
  (``inclusive=False``: ``>``). Returns ``mask_scores`` (per-sample and macro / micro averages).
  """
  return mask_scores(binarize(heatmaps, threshold, inclusive), gt_masks)


def boxes_to_mask(boxes, size_hw: tuple[int, int], box_format: str = "xywh") -> np.ndarray:
  """Union of boxes as a bool [H, W] mask: pixels ``mask[int(y1):int(y2), int(x1):int(x2)]``.

  (end-exclusive integer slices, as the AMC box masks ``gt_mask[y1:y2, x1:x2] = 1``); clipped to the image.
  """
  if box_format not in ("xywh", "xyxy"):
    raise ValueError(f"box_format must be 'xywh' or 'xyxy'; got {box_format!r}")
  h, w = int(size_hw[0]), int(size_hw[1])
  if not len(np.asarray(boxes).reshape(-1)):
    return np.zeros((h, w), bool)
  # AMC's int() rule (notes/amc-and-local-alignment.md §4, trace_jax/boxes.py); M2IB's repository has
  # no localisation code (notes/m2ib.md), so its ground truth uses the same rule.
  return boxes_to_masks(_as_boxes(boxes), (h, w), rule="truncate", box_format=box_format).any(axis=0)


def localization(heatmaps, gt_masks, threshold: float = 0.75, percentile: bool = False) -> dict:
  """M2IB paper eq. (16): IoU of the binarised saliency map and the GT box map, averaged.

  heatmaps [N, H, W] normalised to [0, 1] (M2IB maps are min-max normalised); gt_masks [N, H, W]
  bool (``boxes_to_mask`` of ALL the sample's boxes). S_pred = heatmap > threshold ("scores higher
  than the threshold (75%)"); the paper does not say whether 75 % is a value or a percentile and the
  released code has no localization script, so ``percentile=True`` uses ``> np.percentile(map, 75)``
  instead. Returns {'localization': mean IoU (NaN samples = both masks empty, left out), 'iou' [N]}.
  """
  hm = np.asarray(heatmaps, np.float64)
  if hm.ndim == 2:
    hm = hm[None]
  if percentile:
    thr = np.percentile(hm.reshape(hm.shape[0], -1), threshold * 100.0, axis=1)[:, None, None]
    pred = hm > thr
  else:
    pred = binarize(hm, threshold, inclusive=False)
  s = mask_scores(pred, np.asarray(gt_masks, bool).reshape(pred.shape))
  return {"localization": s["miou"], "iou": s["iou"]}


# ------------------------------------------------------------------------------------------------
# M2IB degradation metrics: confidence drop / increase (paper eq. 17-18, eval.py get_metrics,
# pytorch-grad-cam DropInConfidence / IncreaseInConfidence).

def confidence_change(original, distilled) -> dict:
  """Drop = mean(max(0, o - s)); increase = mean(1[o < s]) (paper eq. 17, 18; fractions, x100 = %).

  original o [N]: cosine of the clean pair; distilled s [N]: cosine after distilling one modality.
  """
  o = np.asarray(original, np.float64).reshape(-1)
  s = np.asarray(distilled, np.float64).reshape(-1)
  if o.shape != s.shape:
    raise ValueError(f"original {o.shape} and distilled {s.shape} scores differ in shape")
  drop = np.maximum(o - s, 0.0)
  inc = (o < s).astype(np.float64)
  return {"drop": float(drop.mean()) if len(o) else float("nan"),
          "increase": float(inc.mean()) if len(o) else float("nan"),
          "drop_per_sample": drop, "increase_per_sample": inc, "original": o, "distilled": s}


def distill_image(images, maps) -> np.ndarray:
  """Pointwise product of each image with its saliency map (pytorch-grad-cam ``multiply_tensor_with_cam``).

  images [N, H, W, C] (the model's NORMALISED input, as eval.py passes ``pixel_values``); maps [N, H, W]
  in [0, 1] at the image resolution (M2IB's ``map``).
  """
  x = np.asarray(images)
  m = np.asarray(maps, x.dtype)
  if m.shape != x.shape[:-1]:
    raise ValueError(f"maps {m.shape} must match the images' [N, H, W] {x.shape[:-1]}")
  return x * m[..., None]


def keep_top_tokens(scores, q: float = 50.0) -> np.ndarray:
  """Tokens kept for the text metrics: ``scores > np.percentile(scores, q)`` (eval.py; strict, linear
  interpolation), per row. scores [L] or [N, L] (a list of 1-D arrays for ragged rows)."""
  if isinstance(scores, (list, tuple)):
    return [keep_top_tokens(s, q) for s in scores]
  s = np.asarray(scores, np.float64)
  return s > np.percentile(s, q, axis=-1, keepdims=True)


def image_confidence(scorer: Callable, images, maps) -> dict:
  """Confidence drop / increase for image maps: o = scorer(images), s = scorer(images * maps).

  scorer: images [N, H, W, C] -> [N] cosine similarity of each image with ITS paired text embedding
  (e.g. ``lambda x: cos(encode_image(x), text_emb)``). Returns ``confidence_change(o, s)``.
  """
  o = np.asarray(scorer(np.asarray(images)))
  s = np.asarray(scorer(distill_image(images, maps)))
  return confidence_change(o, s)


def text_confidence(scorer: Callable, ids: Sequence, token_scores: Sequence, *, strip_special: bool = True,
                    blank_id: int = 0, q: float = 50.0, pad_id: int = 0) -> dict:
  """Confidence drop / increase for text maps, as M2IB's eval.py computes them.

  ids: N unpadded token-id rows (SOT ... EOT), token_scores: N matching text maps (M2IB ``text``).
  With ``strip_special`` (the official eval) SOT and EOT are removed from the ids AND the scores before
  anything, for o as well as s; the kept tokens are ``scores > percentile(scores, q)`` (q = 50) and the
  others are replaced by ``blank_id`` (the code multiplies the ids by the boolean map, so blank = 0; the
  paper says "the padding token"). ``strip_special=False`` keeps SOT/EOT (never blanked) and blanks only
  the words, ranked among the words.
  scorer: ids [N, L'] int (rows right-padded with ``pad_id``) -> [N] cosine of each text with ITS paired
  image. Trailing padding does not change a causal text tower's pooled token; note that without EOT
  an argmax-pooled tower pools at the highest remaining id (what the official eval measures).
  Returns ``confidence_change(o, s)`` plus 'kept' (the bool rows).
  """
  if len(ids) != len(token_scores):
    raise ValueError(f"{len(ids)} texts but {len(token_scores)} score rows")
  orig, dist, kept = [], [], []
  for row, sc in zip(ids, token_scores):
    row = np.asarray(row).reshape(-1)
    sc = np.asarray(sc, np.float64).reshape(-1)[: len(row)]
    if len(sc) != len(row):
      raise ValueError(f"token scores ({len(sc)}) shorter than the ids ({len(row)})")
    if strip_special:
      row, sc = row[1:-1], sc[1:-1]
      keep = sc > np.percentile(sc, q) if len(sc) else np.zeros(0, bool)
    else:
      keep = np.ones(len(row), bool)
      inner = sc[1:-1]
      if len(inner):
        keep[1:-1] = inner > np.percentile(inner, q)
    orig.append(row)
    dist.append(np.where(keep, row, blank_id))
    kept.append(keep)
  n = max([len(r) for r in orig] + [1])
  pad = lambda rows: np.stack([np.pad(r, (0, n - len(r)), constant_values=pad_id) for r in rows]).astype(np.int32)
  out = confidence_change(np.asarray(scorer(pad(orig))), np.asarray(scorer(pad(dist))))
  out["kept"] = kept
  return out


# ------------------------------------------------------------------------------------------------
# Retrieval and referring expressions (MaskInversion Table 1 / 2).

def retrieval_accuracy(similarity, targets, ks: Sequence[int] = (1, 5, 10)) -> dict:
  """Acc@k: the fraction of queries whose correct candidate is among the k highest scores.

  similarity [Q, C] (higher = better); targets: int [Q] (the correct column) or bool [Q, C] (several
  correct candidates: a hit if ANY is in the top k). Ranking is a stable sort on descending score:
  tied candidates are ranked by column index (lower first). Returns {'acc@k': ..., 'rank': [Q]
  (0-based rank of the best-ranked correct candidate; C if none is correct)}.
  """
  s = np.asarray(similarity, np.float64)
  if s.ndim != 2:
    raise ValueError(f"similarity must be [queries, candidates]; got shape {s.shape}")
  Q, C = s.shape
  t = np.asarray(targets)
  if t.dtype == bool:
    if t.shape != s.shape:
      raise ValueError(f"boolean targets {t.shape} must match similarity {s.shape}")
    correct = t
  else:
    t = t.reshape(-1)
    if t.shape[0] != Q or np.any(t < 0) or np.any(t >= C):
      raise ValueError(f"targets must be {Q} column indices in [0, {C}); got {t.tolist()}")
    correct = np.zeros((Q, C), bool)
    correct[np.arange(Q), t] = True
  order = np.argsort(-s, axis=1, kind="stable")
  ranked = np.take_along_axis(correct, order, axis=1)
  rank = np.where(ranked.any(1), np.argmax(ranked, axis=1), C)
  out = {f"acc@{k}": float(np.mean(rank < k)) if Q else float("nan") for k in ks}
  out["rank"] = rank
  return out


def mask_iou(pred, gt) -> tuple[np.ndarray, np.ndarray]:
  """Per-sample (intersection, union) pixel counts of bool masks [N, H, W] (or lists of [H, W])."""
  inter, union = [], []
  for p, g in zip(pred, gt):
    p, g = np.asarray(p, bool), np.asarray(g, bool)
    if p.shape != g.shape:
      raise ValueError(f"mask shapes differ: {p.shape} vs {g.shape}")
    inter.append(np.sum(p & g))
    union.append(np.sum(p | g))
  return np.asarray(inter, np.int64), np.asarray(union, np.int64)


def referring_iou(pred_masks, gt_masks) -> dict:
  """Referring-expression mIoU and oIoU (MaskInversion Table 1).

  mIoU = mean over samples of I_i / U_i (samples with U_i = 0 left out); oIoU ("overall IoU") =
  sum_i I_i / sum_i U_i (cumulative intersection over cumulative union, so large objects weigh more).
  pred_masks / gt_masks: N bool masks (equal shapes per sample; sizes may differ between samples).
  """
  inter, union = mask_iou(pred_masks, gt_masks)
  iou = _ratio(inter, union)
  return {"miou": _nanmean(iou), "oiou": float(_ratio(inter.sum(), union.sum())), "iou": iou,
          "intersection": inter, "union": union}


def referring_retrieval(scores: Sequence, candidate_masks: Sequence, gt_index: Sequence[int],
                        ks: Sequence[int] = (1, 5, 10)) -> dict:
  """MaskInversion's referring-expression protocol: per expression, rank its image's candidate masks.

  scores: N arrays [M_i] (similarity of the expression with each candidate mask's embedding);
  candidate_masks: N arrays [M_i, H, W] bool; gt_index: N ints (the GT mask among the candidates).
  The top-1 candidate is the prediction: Acc@k from the ranking (``retrieval_accuracy``, ties by index),
  mIoU / oIoU of the predicted mask vs the GT mask (``referring_iou``).
  """
  if not (len(scores) == len(candidate_masks) == len(gt_index)):
    raise ValueError("scores, candidate_masks and gt_index must have the same length")
  ranks, preds, gts = [], [], []
  for s, masks, g in zip(scores, candidate_masks, gt_index):
    r = retrieval_accuracy(np.asarray(s, np.float64)[None], np.asarray([g]), ks=())["rank"][0]
    ranks.append(r)
    top = int(np.argsort(-np.asarray(s, np.float64), kind="stable")[0])
    preds.append(np.asarray(masks)[top])
    gts.append(np.asarray(masks)[g])
  ranks = np.asarray(ranks)
  out = {f"acc@{k}": float(np.mean(ranks < k)) if len(ranks) else float("nan") for k in ks}
  out.update(referring_iou(preds, gts))
  out["rank"] = ranks
  return out
