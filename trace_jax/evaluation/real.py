"""The papers' evaluations on the real datasets (configs/eval_*.py; `python evaluate.py --config ...`).

    results = run(config, checkpoint=None, out_dir=None)   # reads config.eval, writes results.json

``config.eval`` (fields: trace_jax/evaluation/real_config.py) names a tfds builder of trace_jax/data/real, read with
``as_data_source(split)`` (built from ``dataset.manual_dir`` first when ``dataset.data_dir`` holds no
prepared copy), a converted model dir, a task, and the method's settings. Tasks:

* ``class_retrieval`` (MaskInversion Table 2; VOC / PASCAL-Context / COCO): one query mask per class
  present (VOC, Context: ``label_map == c``) or per non-crowd instance (COCO); its region embedding
  (MaskInversion LET or a visual-prompt baseline, evaluation/retrieval.py) is ranked against the
  prompt-ensembled class embeddings (evaluation/zeroshot.py); Acc@k (stable ranks, ties by index).
* ``referring_retrieval`` (MaskInversion Table 1; RefCOCO / RefCOCO+): all COCO instance masks of the
  image are the candidates; each sentence ranks them by cosine with its text embedding; Acc@k, mIoU,
  oIoU of the top-1 mask vs the ref's mask at the original resolution (retrieval.referring_retrieval /
  summarize_referring).
* ``pointing_game`` (AMC; Flickr30k Entities with the per-category table, RefCOCO+ testA / testB):
  GradCAM (attribution/gradcam.py) of every phrase of an image in ONE image forward (phrases padded to
  a size bucket: one compilation per bucket), raw map bicubic-upsampled to the original image, first
  row-major argmax, hit iff strictly inside ANY GT box of the phrase (metrics.pointing_game).
* ``m2ib_localization`` (M2IB Table 1 / 2; MS-CXR): the M2IB image map (attribution/m2ib.py, vmapped
  over a batch of pairs), binarised at > threshold, IoU with the union of the phrase's boxes in the
  model's input frame (metrics.localization), and the image confidence drop / increase
  (metrics.image_confidence); pairs sampled per seed, mean and std over seeds.
* ``trace_grounding`` (TRACE slides; COCO-Stuff): per grounded caption word, the word-to-patch map of
  TRACE (trace/grounding.heatmaps via trace/evaluate.make_maps_fn) or of the CLIP patch-word baseline
  (trace/evaluate.clip_patch_word), bilinearly upsampled to the original image, binarised at >= 0.5;
  precision / recall / IoU against the pixels of the word's COCO-Stuff labels (metrics.mask_scores).

Images: decoded from the stored original bytes, resized to ``eval.image_size`` (``resize`` 'squash' =
the authors' Resize((S, S)) of LeGrad / MaskInversion / AMC, bicubic; 'crop' = the CLIP processor:
shortest side then centre crop), CLIP-normalised (data/preprocess.py). Boxes are the builders'
[x0, y0, x1, y1] original-pixel convention (data/real/common.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.data import preprocess
from trace_jax.evaluation import metrics as M

TASKS = ('class_retrieval', 'referring_retrieval', 'pointing_game', 'm2ib_localization', 'trace_grounding')


# ---------------------------------------------------------------------------------------------- loading

@dataclasses.dataclass
class Loaded:
  """A model ready to evaluate: cfg, the linen module, params, tokenizer and a description."""
  cfg: Any
  model: Any
  params: Any
  tokenizer: Any
  desc: str


def load_model_dir(path: str) -> Loaded:
  """A converted / trained model dir (config.json + params/ [+ tokenizer/]) -> Loaded."""
  from trace_jax.model_dir import load_model
  from trace_jax.models import build
  from trace_jax.tokenizers import load_tokenizer
  path = os.path.abspath(os.path.expanduser(path))
  if not (os.path.isfile(os.path.join(path, 'config.json')) and os.path.isdir(os.path.join(path, 'params'))):
    raise FileNotFoundError(f'{path} is not a trace_jax model dir (config.json + params/); create one with '
                            '`trace-jax convert ...` or `python train.py` (<workdir>/model)')
  cfg, params = load_model(path)
  cfg = cfg.replace(dtype='float32')
  return Loaded(cfg, build(cfg), jax.tree.map(jnp.asarray, params), load_tokenizer(path), f'model dir {path}')


def load_source(d, verbose: bool = True):
  """(builder, data source of d.split) of ``config.eval.dataset`` d; builds from manual_dir if needed."""
  from trace_jax.data import real
  mod = real.module(d.name)  # ValueError for an unknown builder name
  data_dir = os.path.expanduser(d.data_dir) if d.get('data_dir') else None
  cls = next(v for v in vars(mod).values() if isinstance(v, type) and getattr(v, 'name', None) == d.name)
  builder = cls(config=d.config, data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    manual = os.path.expanduser(d.manual_dir) if d.get('manual_dir') else ''
    if not (d.get('build', True) and manual and os.path.isdir(manual)):
      raise FileNotFoundError(
          f'dataset {d.name}/{d.config} is not prepared in {builder.data_dir} and cannot be built here '
          f'(manual_dir {manual or "(unset)"}: {"exists, but dataset.build is False" if manual and os.path.isdir(manual) else "does not exist"}); build it with `python -m {mod.__name__} --config '
          f'{d.config} --manual_dir <official files> --data_dir {data_dir or "~/tensorflow_datasets"}` '
          '(docs/datasets.md) or set --config.eval.dataset.manual_dir / data_dir')
    if verbose:
      print(f'building {d.name}/{d.config} from {manual} into {data_dir or "~/tensorflow_datasets"}')
    builder = real.prepare(d.name, manual, data_dir, d.config)
  splits = sorted(builder.info.splits.keys())
  if d.split not in splits:
    raise ValueError(f'{d.name}/{d.config} has no split {d.split!r}; it has {splits}')
  return builder, builder.as_data_source(split=d.split)


def _s(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def _texts(xs) -> list[str]:
  return [_s(x) for x in xs]


def _image_id(ex):
  v = ex.get('image_id', '')
  return _s(v) if isinstance(v, (bytes, str)) else int(v)


def _masks(pngs) -> np.ndarray:
  """PNG bytes list -> bool [K, H, W]."""
  from trace_jax.data.real.common import decode_png
  return np.stack([decode_png(p) > 0 for p in pngs]) if len(pngs) else np.zeros((0, 1, 1), bool)


def _label_map(png) -> np.ndarray:
  from trace_jax.data.real.common import decode_png
  return decode_png(png).astype(np.int64)


def image_pixels(data: bytes, size: int, resize: str = 'squash') -> tuple[np.ndarray, tuple[int, int]]:
  """Stored image bytes -> (float32 [size, size, 3] pixels in [0, 1], original (H, W))."""
  from PIL import Image
  from trace_jax.data.real.common import decode_image
  rgb = decode_image(data)
  im = preprocess.resize_image(Image.fromarray(rgb), int(size), resize)
  return np.asarray(im, np.float32) / 255.0, rgb.shape[:2]


def frame_transform(hw: tuple[int, int], size: int, resize: str) -> tuple[float, float, float, float]:
  """(sx, sy, left, top): original pixel (x, y) -> model frame (x sx - left, y sy - top), exactly as
  preprocess.resize_image maps the image ('squash': S/W, S/H; 'crop': shortest side then centre crop)."""
  h, w = hw
  if resize == 'squash':
    return size / w, size / h, 0.0, 0.0
  nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
  return nw / w, nh / h, float(int(round((nw - size) / 2.0))), float(int(round((nh - size) / 2.0)))


def tokenize(loaded: Loaded, texts: Sequence[str]) -> np.ndarray:
  ids = np.asarray(loaded.tokenizer(list(texts)), np.int32)
  ctx = loaded.cfg.text.context_length
  if ids.shape[1] > ctx:
    raise ValueError(f"the tokenizer made rows of {ids.shape[1]} tokens; the model's context is {ctx}")
  return ids


def pad_rows(x: np.ndarray) -> np.ndarray:
  """Pad axis 0 to a power of two (copies of row 0): one compilation per bucket. The rows are texts
  whose padded copies cost only a one-block backward each, so few buckets (fewer compilations)
  beat the tight ones MaskInversion uses for masks, whose copies cost full optimisations."""
  n = x.shape[0]
  k = 1 << max(0, n - 1).bit_length()
  return x if k == n else np.concatenate([x, np.repeat(x[:1], k - n, axis=0)])


def _limit(e, source) -> int:
  n = len(source)
  return n if e.get('num_examples') is None else min(int(e.num_examples), n)


def _progress(it, total, desc, verbose):
  if not verbose:
    return it
  from tqdm.auto import tqdm
  return tqdm(it, total=total, desc=desc, dynamic_ncols=True)


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


# ---------------------------------------------------------------------------------------------- M2IB

def box_masks(boxes_list, hws, size: int, resize: str) -> np.ndarray:
  """bool [N, S, S]: the union of each sample's xyxy boxes mapped into the S x S model frame
  (metrics.boxes_to_mask: end-exclusive integer slices, clipped)."""
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
  description) for method 'trace' (a TRACE train.py workdir) or 'clip' (a CLIP model dir)."""
  from trace_jax.trace import evaluate as te
  name = e.method.name
  if name == 'trace':
    _, task, params = te.load_run(os.path.abspath(os.path.expanduser(checkpoint)))
    vocab = task.vocab.closed
    f = te.make_maps_fn(task, 'trace', vocab)
    cfg = task.cfg

    def maps(images, words):
      h = np.asarray(f(params, jnp.asarray(images))[0][0])              # [V_vocab, N]
      return [h[vocab.index(w)] if w in vocab.words else None for w in words]
    return maps, cfg, f'TRACE workdir {checkpoint}'
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


# ---------------------------------------------------------------------------------------------- driver

RUNNERS = {'class_retrieval': run_class_retrieval, 'referring_retrieval': run_referring_retrieval,
           'pointing_game': run_pointing_game, 'm2ib_localization': run_m2ib_localization}


def format_table(results: dict) -> str:
  """Methods x metrics (percent), plus the per-category rows of the pointing game."""
  rows = dict(results['methods'])
  rows.update({f'  {c}': r for c, r in results.get('per_category', {}).items()})
  cols = [k for k in next(iter(results['methods'].values())) if k not in ('n', 'skipped_words')]
  head = f"{'method':<22}" + ''.join(f'{c:>22}' for c in cols) + f"{'n':>8}"
  lines = [f"{results['paper']}", f"{results['dataset']} split {results['split']}, {results['checkpoint']}",
           head, '-' * len(head)]
  for name, r in rows.items():
    lines.append(f'{name:<22}' + ''.join(f'{100 * r[c]:>21.2f}%' if c in r else f"{'':>22}" for c in cols)
                 + f"{r.get('n', ''):>8}")
  return '\n'.join(lines)


def run(config, checkpoint: str | None = None, out_dir: str | None = None, verbose: bool = True) -> dict:
  """Runs ``config.eval`` (see the module docstring); returns the results and writes
  ``<out_dir>/results.json`` (default out_dir: ``<checkpoint>/eval/<task>_<dataset config>_<split>``)."""
  e = config.eval
  task = e.get('task')
  if task not in TASKS:
    raise ValueError(f'unknown eval task {task!r}; expected one of {TASKS}')
  ckpt = os.path.expanduser(checkpoint or e.checkpoint)
  d = e.dataset
  builder, source = load_source(d, verbose)
  if task == 'trace_grounding':
    res = run_trace_grounding(e, ckpt, builder, source, verbose)
  else:
    loaded = load_model_dir(ckpt)
    res = RUNNERS[task](e, loaded, builder, source, verbose)
    res['checkpoint'] = loaded.desc
  res = {'task': task, 'paper': e.get('paper', ''), 'dataset': f'{d.name}/{d.config}', 'split': d.split,
         'skipped_annotations': builder.stats, **res}
  out_dir = out_dir or os.path.join(ckpt, 'eval', f'{task}_{d.config}_{d.split}')
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'results.json')
  with open(path, 'w') as f:
    json.dump(res, f, indent=2, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o))
  if verbose:
    print(format_table(res))
    print(f'wrote {path}')
  return res
