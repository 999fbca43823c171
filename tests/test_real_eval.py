"""The papers' evaluations on the real-dataset builders (trace_jax/evaluation/real.py, configs/eval_*.py).

Each task runs its config (tiny overrides) on the official-format fixtures of tests/fixtures_real.py with a
tiny random CLIP saved as a model dir, and its numbers are recomputed independently here: the images
resized with PIL in the test, masks / boxes / phrases / label maps taken from what the fixture WROTE (not
from the builders), embeddings and maps from the model / method functions called directly one query at a
time (no bucketing, no batching), and the metrics in float64 NumPy written out here.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import fixtures_real as FX  # noqa: E402

from trace_jax.evaluation import real  # noqa: E402
from trace_jax.models import build, get_config, init_params, l2_normalize  # noqa: E402
from trace_jax.tokenizers import WordTokenizer, build_vocab  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), '..')
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
S = 32  # tiny model: 32 px, patch 8 -> 4 x 4 grid


def load_config(name):
  path = os.path.join(ROOT, 'configs', name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _texts():
  """Every text the tests tokenize (the word tokenizer only knows these words)."""
  out = [s for ss in FX.FLICKR_SENTENCES.values() for s in ss]
  out += ['man on the left', 'left guy', 'right man', 'the cup', 'white cup', 'a person', 'a photo of a']
  out += ['aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person',
          'pottedplant sheep sofa train tvmonitor cup',
          'right lower lobe opacity enlarged heart small left apical pneumothorax mild edema',
          'man dog wall people sky person']
  return [t.replace('[/EN#', ' ').replace(']', ' ') for t in out]


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  from trace_jax.model_dir import save_model
  d = tmp_path_factory.mktemp('model')
  tok = WordTokenizer(build_vocab(_texts()), 16)
  words = tok.save(str(tmp_path_factory.mktemp('tok')))
  cfg = get_config('tiny')
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=tok.vocab_size, eos_token_id=tok.eot_id))
  params = init_params(cfg, jax.random.PRNGKey(0))
  save_model(str(d), params, cfg, source='test', tokenizer_files={'words.json': words})
  return str(d), cfg, jax.tree.map(jnp.asarray, params), tok


def _cfg(name, manual_dir, data_dir, **eval_overrides):
  c = load_config(name)
  c.eval.dataset.manual_dir = str(manual_dir)
  c.eval.dataset.data_dir = str(data_dir)
  c.eval.image_size = S
  for k, v in eval_overrides.items():
    node = c.eval
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _pixels(path, size=S, mode='squash'):
  """Independent preprocessing: PIL bicubic squash (or shortest side + centre crop) -> [0, 1]."""
  im = Image.open(path).convert('RGB')
  w, h = im.size
  if mode == 'squash':
    return np.asarray(im.resize((size, size), Image.BICUBIC), np.float32) / 255.0, (h, w)
  nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
  im = im.resize((nw, nh), Image.BICUBIC)
  l, t = int(round((nw - size) / 2)), int(round((nh - size) / 2))
  return np.asarray(im.crop((l, t, l + size, t + size)), np.float32) / 255.0, (h, w)


def _norm(px):
  return ((px - MEAN) / STD).astype(np.float32)


_encode_text = jax.jit(lambda params, ids, model: model.apply({'params': params}, ids, method='encode_text')[0],
                       static_argnums=2)


def _text_emb(model, params, tok, texts):
  out = []
  for t in texts:  # one text at a time
    out.append(np.asarray(_encode_text(params, jnp.asarray(tok([t])), model)[0], np.float64))
  e = np.stack(out)
  return e / np.linalg.norm(e, axis=1, keepdims=True)


def _cos(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return a @ b.T


def _rank(scores, target):
  """0-based rank of column `target` (stable descending: ties -> lower index first)."""
  s = scores[target]
  return int(np.sum(scores > s) + np.sum(scores[:target] == s))


def _rect(h, w, x0, y0, x1, y1):
  m = np.zeros((h, w), bool)
  m[y0:y1, x0:x1] = True
  return m


MI = dict(iterations=2, lr=0.5, alpha=0.0, weight_decay=0.0)


def _invert(model, params, px, masks, alpha):
  """MaskInversion LETs of one image's masks (the optimiser is tested in tests/test_maskinversion.py)."""
  from trace_jax.inversion.maskinversion import invert
  return np.asarray(invert(model, params, _norm(px), masks.astype(np.float32), steps=MI['iterations'],
                           lr=MI['lr'], alpha=alpha, wd=0.0, mode='exact')['lets'])


# ----------------------------------------------------------------------------------------------- tasks

def test_class_retrieval_voc(tmp_path, model_dir):
  path, cfg, params, tok = model_dir
  model = build(cfg)
  root = tmp_path / 'voc'
  truth = FX.write_voc(str(root))
  c = _cfg('eval_maskinversion_voc.py', root, tmp_path / 'data', **{'dataset.split': 'train', 'baselines': 'cls'},
           **{f'method.{k}': v for k, v in MI.items()}, **{'method.mode': 'exact'})
  res = real.run(c, path, str(tmp_path / 'out'), verbose=False)
  assert json.load(open(tmp_path / 'out' / 'results.json'))['methods'] == json.loads(json.dumps(res['methods']))
  from trace_jax.data.real.voc import VOC_CLASSES
  names = VOC_CLASSES[1:]
  class_emb = np.stack([_text_emb(model, params, tok, [f'a photo of a {n}.'])[0] for n in names])
  ranks = {'maskinversion': [], 'cls': []}
  for iid in truth['ids']['train']:
    lab = truth['labels'][iid]
    values = [v for v in np.unique(lab) if v not in (0, 255)]
    masks = np.stack([lab == v for v in values])
    px, _ = _pixels(root / 'VOCdevkit' / 'VOC2012' / 'JPEGImages' / f'{iid}.jpg')
    lets = _invert(model, params, px, masks, 0.0)
    cls = np.asarray(model.apply({'params': params}, jnp.asarray(_norm(px))[None], method='encode_image')[0])
    for m, emb in (('maskinversion', lets), ('cls', np.repeat(cls, len(values), 0))):
      s = _cos(emb, class_emb)
      ranks[m] += [_rank(s[j], int(v) - 1) for j, v in enumerate(values)]
  for m, r in ranks.items():
    assert [q['rank'][m] for q in res['queries']] == r, m
    r = np.asarray(r)
    assert res['methods'][m]['n'] == len(r) == 4
    for k in (1, 5, 10):
      assert res['methods'][m][f'acc@{k}'] == pytest.approx(np.mean(r < k), abs=1e-12), (m, k)
  assert res['num_classes'] == 20 and res['split'] == 'train'


def test_referring_retrieval_refcocoplus(tmp_path, model_dir):
  path, cfg, params, tok = model_dir
  model = build(cfg)
  root = tmp_path / 'refer'
  truth = FX.write_refcoco(str(root), 'refcoco+', 'unc')
  c = _cfg('eval_maskinversion_refcocoplus.py', root, tmp_path / 'data', **{'dataset.split': 'testA'},
           **{f'method.{k}': v for k, v in dict(MI, alpha=5.0, mode='exact').items()})
  out = real.run(c, path, str(tmp_path / 'out'), verbose=False)
  res = out['methods']['maskinversion']
  # image 9: its three instances (integer-rectangle polygons) are the candidates
  im = truth['images'][0]
  h, w = im['height'], im['width']
  anns = [a for a in truth['annotations'] if a['image_id'] == 9]
  masks = np.stack([_rect(h, w, *[int(v) for v in (a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2],
                                                   a['bbox'][1] + a['bbox'][3])]) for a in anns])
  px, _ = _pixels(root / 'images' / 'mscoco' / 'images' / 'train2014' / im['file_name'])
  lets = _invert(model, params, px, masks, 5.0)
  ids = [a['id'] for a in anns]
  sents, targets = [], []
  for r in truth['refs']:
    if r['split'] == 'testA':
      for s in r['sentences']:
        sents.append(s['sent'])
        targets.append(ids.index(r['ann_id']))
  sc = _cos(_text_emb(model, params, tok, sents), lets)
  ranks = np.asarray([_rank(sc[q], t) for q, t in enumerate(targets)])
  sel = [int(np.argmax(sc[q])) for q in range(len(targets))]
  inter = np.asarray([np.sum(masks[s] & masks[t]) for s, t in zip(sel, targets)], np.float64)
  union = np.asarray([np.sum(masks[s] | masks[t]) for s, t in zip(sel, targets)], np.float64)
  assert res['n'] == 3
  assert [q['rank']['maskinversion'] for q in out['queries']] == ranks.tolist()
  assert [q['target'] for q in out['queries']] == targets
  for k in (1, 5, 10):
    assert res[f'acc@{k}'] == pytest.approx(np.mean(ranks < k), abs=1e-12)
  assert res['miou'] == pytest.approx(np.mean(inter / union), abs=1e-12)
  assert res['oiou'] == pytest.approx(inter.sum() / union.sum(), abs=1e-12)


def _gradcam(params, image, ids, model):
  from trace_jax.attribution.gradcam import gradcam_grid
  return gradcam_grid(model, params, image[None], ids, layer=-1, relu_grad=True, relu=True)[0]


_gradcam = jax.jit(_gradcam, static_argnums=3)


def _gradcam_one(model, params, image, text_ids):
  """Raw AMC GradCAM (last block) of ONE (image, text) pair (no bucketing, no batching)."""
  return np.asarray(_gradcam(params, jnp.asarray(image), jnp.asarray(text_ids), model), np.float64)


def _bicubic_argmax_hit(grid, hw, boxes):
  """Independent pointing: torch bicubic (a = -0.75, clamped borders) to hw, first argmax, strict inside."""
  def mat(n_in, n_out):
    a = -0.75
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
      src = (o + 0.5) * n_in / n_out - 0.5
      i0 = int(np.floor(src))
      t = src - i0
      ws = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
      for k in range(4):
        w[o, min(max(i0 - 1 + k, 0), n_in - 1)] += ws[k]
    return w
  up = mat(grid.shape[0], hw[0]) @ grid @ mat(grid.shape[1], hw[1]).T
  y, x = np.unravel_index(np.argmax(up), up.shape)
  return [int(x), int(y)], any(b[0] < x < b[2] and b[1] < y < b[3] for b in boxes)


def test_pointing_game_flickr30k(tmp_path, model_dir, monkeypatch):
  path, cfg, params, tok = model_dir
  model = build(cfg)
  root = tmp_path / 'flickr'
  # entity 2 ("shaggy hair") gets a second box covering the image: a hit in ANY box counts
  monkeypatch.setitem(FX.FLICKR_BOXES['1000092795'], '2', [[5, 6, 12, 10], [1, 1, 44, 34]])
  FX.write_flickr30k_entities(str(root))
  c = _cfg('eval_amc_flickr30k.py', root, tmp_path / 'data', **{'dataset.split': 'val'})
  res = real.run(c, path, str(tmp_path / 'out'), verbose=False)
  iid = '1000092795'   # the val image
  px, hw = _pixels(root / 'flickr30k-images' / f'{iid}.jpg')
  hits, cats, points = [], [], []
  for sent in FX.FLICKR_SENTENCES[iid]:
    for tag, words in [(t.split(' ', 1)[0], t.split(' ', 1)[1]) for t in sent.split('[/EN#')[1:]]:
      eid, typ = tag.split('/')[0], tag.split('/')[1]
      phrase = words.split(']')[0]
      if eid not in FX.FLICKR_BOXES[iid]:
        continue   # scene / no-box entities are not evaluated
      boxes = [[b[0] - 1, b[1] - 1, b[2], b[3]] for b in FX.FLICKR_BOXES[iid][eid]]
      g = _gradcam_one(model, params, _norm(px), tok([phrase]))
      pt, hit = _bicubic_argmax_hit(g, hw, boxes)
      points.append(pt)
      hits.append(hit)
      cats.append(typ)
  r = res['methods']['gradcam']
  assert r['n'] == len(hits) == 4
  assert r['pointing_accuracy'] == pytest.approx(np.mean(hits), abs=1e-12)
  assert [q['point'] for q in res['queries']] == points
  assert [q['hit'] for q in res['queries']] == hits and hits[1]
  cats = np.asarray(cats)
  assert set(res['per_category']) == {'people', 'bodyparts'}
  for cat, v in res['per_category'].items():
    assert v['n'] == int((cats == cat).sum())
    assert v['pointing_accuracy'] == pytest.approx(np.mean(np.asarray(hits)[cats == cat]), abs=1e-12)


def test_pointing_game_refcocoplus_through_evaluate_py(tmp_path, model_dir, monkeypatch):
  """evaluate.py's main() dispatches a config with eval.task to real.run (its flags parsed in-process)."""
  from absl import flags
  path, cfg, params, tok = model_dir
  model = build(cfg)
  root = tmp_path / 'refer'
  truth = FX.write_refcoco(str(root), 'refcoco+', 'unc')
  # ref 0's annotation (id 100) becomes the whole image, so its sentences hit and ref 1's may not
  inst = root / 'refcoco+' / 'instances.json'
  js = json.load(open(inst))
  a100 = next(a for a in js['annotations'] if a['id'] == 100)
  a100.update(bbox=[0, 0, 40, 30], segmentation=[[0, 0, 40, 0, 40, 30, 0, 30]])
  json.dump(js, open(inst, 'w'))
  truth['annotations'] = js['annotations']
  spec = importlib.util.spec_from_file_location('evaluate_script', os.path.join(ROOT, 'evaluate.py'))
  ev = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ev)
  out = tmp_path / 'out'
  argv = ['evaluate.py', '--config', os.path.join(ROOT, 'configs', 'eval_amc_refcocoplus.py'),
          '--checkpoint', path, '--out', str(out), f'--config.eval.image_size={S}',
          f'--config.eval.dataset.manual_dir={root}', f'--config.eval.dataset.data_dir={tmp_path / "d"}',
          '--config.eval.dataset.split=testA']
  monkeypatch.setattr(sys, 'argv', argv)   # config_flags reads its --config.* overrides from sys.argv
  flags.FLAGS(argv)
  try:
    assert ev.main(['evaluate.py']) == 0
  finally:
    flags.FLAGS.unparse_flags()
  res = json.load(open(out / 'results.json'))
  im = truth['images'][0]
  px, hw = _pixels(root / 'images' / 'mscoco' / 'images' / 'train2014' / im['file_name'])
  hits, points = [], []
  for r in truth['refs']:
    if r['split'] != 'testA':
      continue
    x, y, w, h = next(a['bbox'] for a in truth['annotations'] if a['id'] == r['ann_id'])
    for s in r['sentences']:
      g = _gradcam_one(model, params, _norm(px), tok([s['sent']]))
      pt, hit = _bicubic_argmax_hit(g, hw, [[x, y, x + w, y + h]])
      points.append(pt)
      hits.append(hit)
  assert res['methods']['gradcam']['n'] == len(hits) == 3
  assert [q['point'] for q in res['queries']] == points and [q['hit'] for q in res['queries']] == hits
  assert hits[0] and hits[1]
  assert res['methods']['gradcam']['pointing_accuracy'] == pytest.approx(np.mean(hits), abs=1e-12)
  assert res['skipped_annotations']['missing_image_annotations'] == {'testB': 1}


def test_m2ib_localization_mscxr(tmp_path, model_dir):
  from trace_jax.attribution import m2ib
  path, cfg, params, tok = model_dir
  model = build(cfg)
  root = tmp_path / 'cxr'
  truth = FX.write_mscxr(str(root))
  meth = {'method.vision_layer': 0, 'method.text_layer': 1, 'method.steps': 3, 'method.samples': 2}
  c = _cfg('eval_m2ib_mscxr.py', root, tmp_path / 'data', num_samples=2, seeds=(0, 3), batch_size=2, **meth)
  res = real.run(c, path, str(tmp_path / 'out'), verbose=False)
  # test split: the two phrases of p1 (the third row's image is missing); sorted sample = both, in order
  rows = [r for r in truth['rows'] if r[-1] == 'test' and 'missing' not in r[3]]
  groups = {}
  for r in rows:
    groups.setdefault(r[2], []).append(r)
  texts = list(groups)
  px, (h, w) = _pixels(root / rows[0][3], mode='crop')
  images = np.stack([_norm(px)] * 2)
  ids = tok(texts)
  # the box union in the 32 x 32 crop frame: scale by S / min(h, w), shift by the crop offset
  s = S / min(h, w)
  nw, nh = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)
  left, top = int(round((nw - S) / 2)), int(round((nh - S) / 2))
  gt = np.zeros((2, S, S), bool)
  for j, t in enumerate(texts):
    for r in groups[t]:
      x0, y0 = r[4] * nw / w - left, r[5] * nh / h - top
      x1, y1 = (r[4] + r[6]) * nw / w - left, (r[5] + r[7]) * nh / h - top
      gt[j, max(int(y0), 0):max(int(y1), 0), max(int(x0), 0):max(int(x1), 0)] = True
  del s
  temb = _text_emb(model, params, tok, texts)

  def cosines(x):
    e = np.asarray(model.apply({'params': params}, jnp.asarray(x, jnp.float32), method='encode_image')[0], np.float64)
    return np.sum(e / np.linalg.norm(e, axis=1, keepdims=True) * temb, 1)
  for seed_res, seed in zip(res['seeds'], (0, 3)):
    # real.py: key = PRNGKey(seed), split once per batch of pairs
    _, sub = jax.random.split(jax.random.PRNGKey(seed))
    maps = np.asarray(m2ib.explain(model, params, images, ids, layer=0, text_layer=1, beta=1.0, steps=3, lr=1.0,
                                   samples=2, key=sub, out_size=None, modality='image')['map'], np.float64)
    pred = maps > 0.75
    iou = [np.sum(p & g) / np.sum(p | g) for p, g in zip(pred, gt) if np.sum(p | g)]
    assert seed_res['n'] == 2
    assert seed_res['localization_iou'] == pytest.approx(np.mean(iou), abs=1e-9)
    o, d = cosines(images), cosines(images * maps[..., None])
    assert seed_res['confidence_drop'] == pytest.approx(np.mean(np.maximum(o - d, 0)), abs=1e-5)
    assert seed_res['confidence_increase'] == pytest.approx(np.mean(o < d), abs=1e-12)
  r = res['methods']['m2ib']
  assert r['localization_iou'] == pytest.approx(np.mean([s['localization_iou'] for s in res['seeds']]))


def test_trace_grounding_cocostuff_clip(tmp_path, model_dir):
  from trace_jax.data.real.coco import ground_caption
  path, cfg, params, tok = model_dir
  model = build(cfg)
  root = tmp_path / 'coco'
  truth = FX.write_coco(str(root))
  c = _cfg('eval_trace_cocostuff.py', root, tmp_path / 'data', **{'method.name': 'clip'})
  res = real.run(c, path, str(tmp_path / 'out'), verbose=False)['methods']['clip']
  ious, precs, recs = [], [], []
  for im in truth['images'][:2]:
    px, (h, w) = _pixels(root / 'val2017' / im['file_name'])
    _, aux = model.apply({'params': params}, jnp.asarray(_norm(px))[None], method='encode_image')
    patches = np.asarray(model.apply({'params': params}, aux['tokens'][:, 1:],
                                     method=lambda m, x: m.visual.project(x))[0], np.float64)  # [N, E]
    lab = truth['maps'][im['id']]
    for cap in [cc['caption'] for cc in truth['captions'] if cc['image_id'] == im['id']]:
      words, pairs = ground_caption(cap)
      for wi in sorted({p[0] for p in pairs}):
        labels = [v for j, v in pairs if j == wi]
        sim = _cos(patches, _text_emb(model, params, tok, [words[wi]]))[:, 0]
        mm = ((sim - sim.min()) / (sim.max() - sim.min())).reshape(4, 4)
        up = np.asarray(jax.image.resize(jnp.asarray(mm), (h, w), 'linear'), np.float64)  # = torch bilinear
        pred, gt = up >= 0.5, np.isin(lab, labels)
        tp, fp, fn = np.sum(pred & gt), np.sum(pred & ~gt), np.sum(~pred & gt)
        if tp + fp:
          precs.append(tp / (tp + fp))
        if tp + fn:
          recs.append(tp / (tp + fn))
        if tp + fp + fn:
          ious.append(tp / (tp + fp + fn))
  assert res['n'] == len(ious) and res['n'] >= 5
  assert res['miou'] == pytest.approx(np.mean(ious), abs=1e-5)
  assert res['precision'] == pytest.approx(np.mean(precs), abs=1e-5)
  assert res['recall'] == pytest.approx(np.mean(recs), abs=1e-5)
  assert res['skipped_words'] == 0


# ----------------------------------------------------------------------------------------------- errors

def test_unknown_task_and_missing_dataset(tmp_path, model_dir):
  path = model_dir[0]
  c = load_config('eval_amc_flickr30k.py')
  c.eval.task = 'segmentation'
  with pytest.raises(ValueError, match='unknown eval task.*pointing_game'):
    real.run(c, path, str(tmp_path / 'o'), verbose=False)
  c = _cfg('eval_amc_flickr30k.py', tmp_path / 'nowhere', tmp_path / 'data')
  with pytest.raises(FileNotFoundError, match='nowhere.*python -m trace_jax.data.real.flickr30k_entities'):
    real.run(c, path, str(tmp_path / 'o'), verbose=False)
  root = tmp_path / 'f'
  FX.write_flickr30k_entities(str(root))
  c = _cfg('eval_amc_flickr30k.py', root, tmp_path / 'data', **{'dataset.split': 'testB'})
  with pytest.raises(ValueError, match=r"no split 'testB'.*'test'"):
    real.run(c, path, str(tmp_path / 'o'), verbose=False)
  c = _cfg('eval_amc_flickr30k.py', root, tmp_path / 'data', **{'dataset.split': 'val'})
  with pytest.raises(FileNotFoundError, match='not a trace_jax model dir'):
    real.run(c, str(tmp_path), str(tmp_path / 'o'), verbose=False)


def test_every_eval_config_has_a_known_task():
  import glob
  for p in sorted(glob.glob(os.path.join(ROOT, 'configs', 'eval_*.py'))):
    c = load_config(os.path.basename(p))
    assert c.eval.task in real.TASKS, p
    assert c.eval.dataset.manual_dir and c.eval.checkpoint and c.eval.method.name, p
