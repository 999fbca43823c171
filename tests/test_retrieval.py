"""MaskInversion downstream tasks: metrics, visual-prompt baselines, zero-shot text embeddings and the
trace_shapes evaluation plumbing (tiny random model; the plumbing is tested, not the model)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import torch_or_skip
from PIL import Image, ImageFilter

from trace_jax.data import pipeline
from trace_jax.data.shapes import scene
from trace_jax.data.shapes.concepts import load_concepts
from trace_jax.evaluation import retrieval as R
from trace_jax.evaluation import visual_prompts as vp
from trace_jax.evaluation import zeroshot as zs
from trace_jax.models import build, get_config, init_params


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def tok():
  return pipeline.make_tokenizer()


@pytest.fixture(scope='module')
def tiny(tok):
  """Tiny random CLIP whose text tower takes the trace_shapes word tokenizer's ids."""
  cfg = get_config('tiny')
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=tok.vocab_size,
                                             context_length=tok.context_length,
                                             eos_token_id=tok.eot_id))
  return build(cfg), init_params(cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope='module')
def examples():
  """Four 32 px scenes (1-5 objects each), rendered directly (no tfds build needed)."""
  return [scene.generate_example(0, 'test', i, image_size=32) for i in range(4)]


# ----------------------------------------------------------------------------- metrics

def test_ranks_topk_and_ties():
  s = np.array([[0.1, 0.5, 0.5, 0.2],
                [0.9, 0.0, -1.0, 0.3]], np.float32)
  # Region embeddings whose cosines with the axes of R^4 are the rows of s / sqrt(2) (norm sqrt(2)
  # with a 5th coordinate that no class uses).
  cls = np.eye(4, 5, dtype=np.float32)
  reg = np.concatenate([s, np.sqrt(2 - (s ** 2).sum(1, keepdims=True))], 1)
  # row 0: order 1, 2 (tie broken by index), 3, 0
  out = R.class_retrieval(reg, cls, [2, 0], ks=(1, 2, 4))
  np.testing.assert_array_equal(out['ranks'], [1, 0])
  assert (out['acc@1'], out['acc@2'], out['acc@4']) == (0.5, 1.0, 1.0)
  np.testing.assert_array_equal(R.class_retrieval(reg, cls, [0, 2])['ranks'], [3, 3])
  np.testing.assert_array_equal(R.topk(s, 3), [[1, 2, 3], [0, 3, 1]])
  assert R.topk(s, 10).shape == (2, 4)


def test_class_retrieval_hand_made():
  # Class embeddings: the 4 axes of R^4. Region i points mostly at class order[i] (cosines known).
  cls = np.eye(4, dtype=np.float32)
  regions = np.array([[3.0, 2.0, 1.0, 0.0],    # ranking 0, 1, 2, 3
                      [0.0, 1.0, 5.0, 2.0],    # ranking 2, 3, 1, 0
                      [1.0, 1.0, 0.0, 0.0]],   # tie 0 = 1, then 2 = 3
                     np.float32)
  labels = np.array([0, 1, 1])
  out = R.class_retrieval(regions, cls, labels, ks=(1, 2, 3))
  np.testing.assert_array_equal(out['ranks'], [0, 2, 1])
  assert out['acc@1'] == pytest.approx(1 / 3)
  assert out['acc@2'] == pytest.approx(2 / 3)
  assert out['acc@3'] == 1.0
  np.testing.assert_array_equal(np.asarray(out['top'])[:, 0], [0, 2, 0])
  # cosine, not dot product: scaling a region changes nothing
  out2 = R.class_retrieval(regions * np.array([[7.0], [0.1], [3.0]], np.float32), cls, labels, (1, 2, 3))
  np.testing.assert_array_equal(np.asarray(out2['ranks']), [0, 2, 1])
  with pytest.raises(ValueError, match='labels must lie'):
    R.class_retrieval(regions, cls, np.array([0, 1, 4]))
  with pytest.raises(ValueError, match='labels must be'):
    R.class_retrieval(regions, cls, np.array([0, 1]))


def test_referring_retrieval_hand_made():
  # Three overlapping candidate masks on a 4 x 4 grid.
  m = np.zeros((3, 4, 4), np.float32)
  m[0, :2, :2] = 1          # 4 px
  m[1, :2, :] = 1           # 8 px, contains mask 0
  m[2, 3, :] = 1            # 4 px, disjoint
  regions = np.eye(3, 5, dtype=np.float32)  # region k = axis k
  expr = np.array([[1.0, 0.2, 0.0, 0, 0],   # -> selects 0; GT 1: IoU 4 / 8, rank of 1 = 1
                   [0.0, 0.0, 1.0, 0, 0],   # -> selects 2; GT 2: IoU 1,     rank 0
                   [0.1, 1.0, 0.3, 0, 0]],  # -> selects 1; GT 0: IoU 4 / 8, rank of 0 = 2
                  np.float32)
  out = R.referring_retrieval(expr, regions, np.array([1, 2, 0]), m, ks=(1, 2, 3))
  np.testing.assert_array_equal(np.asarray(out['selected']), [0, 2, 1])
  np.testing.assert_array_equal(np.asarray(out['ranks']), [1, 0, 2])
  np.testing.assert_allclose(np.asarray(out['inter']), [4, 4, 4])
  np.testing.assert_allclose(np.asarray(out['union']), [8, 4, 8])
  np.testing.assert_allclose(np.asarray(out['iou']), [0.5, 1.0, 0.5])
  assert out['acc@1'] == pytest.approx(1 / 3)
  assert out['acc@2'] == pytest.approx(2 / 3)
  assert out['acc@3'] == 1.0
  assert out['miou'] == pytest.approx(2 / 3)
  assert out['oiou'] == pytest.approx(12 / 20)
  # Explicit GT masks (not among the candidates): GT of expression 0 = mask 0 shifted by one row.
  gt = m[[1, 2, 0]].copy()
  gt[0] = 0
  gt[0, 1:3, :2] = 1   # vs selected mask 0: inter 2, union 6
  out = R.referring_retrieval(expr, regions, np.array([1, 2, 0]), m, gt_masks=gt)
  np.testing.assert_allclose(np.asarray(out['iou']), [2 / 6, 1.0, 0.5])


def test_summarize_referring_miou_vs_oiou(rng):
  # Four expressions' counts: mIoU averages the ratios, oIoU divides the sums.
  out = R.summarize_referring(np.array([0, 3, 0, 1]), np.array([10, 0, 1, 5]),
                              np.array([10, 30, 4, 20]), ks=(1, 2))
  assert out['acc@1'] == 0.5 and out['acc@2'] == 0.75 and out['n'] == 4
  assert out['miou'] == pytest.approx((1 + 0 + 0.25 + 0.25) / 4)
  assert out['oiou'] == pytest.approx(16 / 64)
  # From counts (streaming) = metrics.referring_iou on the masks themselves.
  from trace_jax.evaluation import metrics
  pred, gt = rng.random((6, 9, 9)) > 0.6, rng.random((6, 9, 9)) > 0.5
  ref = metrics.referring_iou(pred, gt)
  out = R.summarize_referring(np.zeros(6), ref['intersection'], ref['union'])
  assert out['miou'] == pytest.approx(ref['miou']) and out['oiou'] == pytest.approx(ref['oiou'])


# ----------------------------------------------------------------------------- visual prompts

_CROP = jax.jit(vp.crop, static_argnums=2)
_DRAW = jax.jit(vp.red_circle, static_argnames='thickness')
_MCROP = jax.jit(vp.masked_crop, static_argnames=('out_size', 'crop_to_box'))


def _torch_bilinear(x_hwc, out_hw):
  torch = torch_or_skip()
  t = torch.from_numpy(np.ascontiguousarray(x_hwc.transpose(2, 0, 1)))[None].double()
  y = torch.nn.functional.interpolate(t, size=out_hw, mode='bilinear', align_corners=False)
  return y[0].numpy().transpose(1, 2, 0)


@pytest.mark.parametrize('box,out_hw', [((3, 5, 17, 12), (20, 24)),   # upsample, other aspect
                                        ((0, 0, 32, 32), (16, 16)),   # whole image, downsample
                                        ((10.4, 2.6, 30.2, 29.0), (32, 32)),  # widened to whole px
                                        ((31, 31, 32, 32), (4, 4))])  # one pixel
def test_crop_matches_torch_interpolate(rng, box, out_hw):
  img = rng.random((32, 32, 3)).astype(np.float32)
  x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
  x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
  ref = _torch_bilinear(img[y0:y1, x0:x1].astype(np.float64), out_hw)
  out = np.asarray(_CROP(img, np.asarray(box, np.float32), out_hw))
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_masked_crop_and_mask_box(rng):
  img = rng.random((24, 32, 3)).astype(np.float32)
  mask = np.zeros((24, 32), np.float32)
  mask[4:9, 6:11] = 1
  mask[12:15, 3:5] = 1
  ys, xs = np.nonzero(mask)
  box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)  # (3, 4, 11, 15)
  mb = jax.jit(vp.mask_box)
  np.testing.assert_array_equal(np.asarray(mb(mask)), box)
  np.testing.assert_array_equal(np.asarray(mb(np.zeros_like(mask))), [0, 0, 32, 24])
  np.testing.assert_array_equal(R.mask_boxes_np(np.stack([mask, 0 * mask])), [box, [0, 0, 32, 24]])
  fill = np.array(vp.CLIP_MEAN, np.float32)
  filled = np.where(mask[..., None] > 0, img, fill)
  ref = _torch_bilinear(filled[4:15, 3:11].astype(np.float64), (16, 16))
  np.testing.assert_allclose(np.asarray(_MCROP(img, mask, None, 16)), ref, atol=1e-5)
  full = np.asarray(_MCROP(img, mask, out_size=None, crop_to_box=False))
  np.testing.assert_allclose(full, filled, atol=1e-6)
  # CLIP normalisation maps the default fill to 0: the background carries no signal.
  norm = (full - np.asarray(vp.CLIP_MEAN, np.float32)) / np.asarray(vp.CLIP_STD, np.float32)
  np.testing.assert_allclose(norm[mask == 0], 0.0, atol=1e-6)


def _ellipse_distance_ref(hw, box, n=20000):
  """float64: distance of each pixel centre to a densely sampled ellipse inscribed in the box."""
  x0, y0, x1, y1 = box
  cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  ex, ey = cx + a * np.cos(t), cy + b * np.sin(t)
  ys, xs = np.mgrid[:hw[0], :hw[1]] + 0.5
  d = np.full(hw, np.inf)
  for i in range(0, n, 4000):  # chunked min over the samples (spacing < 0.01 px: error < 5e-3)
    d = np.minimum(d, np.min(np.hypot(xs[..., None] - ex[i:i + 4000], ys[..., None] - ey[i:i + 4000]), -1))
  return d


@pytest.mark.parametrize('box,thickness', [((4, 6, 28, 26), 2.0), ((2, 10, 30, 16), 2.0),
                                           ((10, 3, 14, 30), 3.0)])
def test_red_circle_ring_matches_numpy(rng, box, thickness):
  img = rng.random((32, 32, 3)).astype(np.float32)
  d = _ellipse_distance_ref((32, 32), box)
  out = np.asarray(_DRAW(img, np.asarray(box, np.float32), thickness=thickness))
  ring = np.all(out == np.array([1.0, 0.0, 0.0], np.float32), -1) & ~np.all(img == out, -1)
  clear = np.abs(d - thickness / 2) > 5e-3  # pixels not on the line's edge within sampling error
  np.testing.assert_array_equal(ring[clear], (d <= thickness / 2)[clear])
  assert ring.sum() > 10
  np.testing.assert_array_equal(out[~ring], img[~ring])  # nothing else is touched
  # From a mask: its tight box.
  mask = np.zeros((32, 32), np.float32)
  mask[box[1]:box[3], box[0]:box[2]] = 1
  np.testing.assert_array_equal(np.asarray(_DRAW(img, mask=mask, thickness=thickness)), out)


@pytest.mark.parametrize('hw,sigma', [((32, 40), 100.0), ((48, 32), 3.0), ((20, 30), 1.3)])
def test_pil_gaussian_blur_matches_pillow(rng, hw, sigma):
  img = (rng.random(hw + (3,)) * 255).astype(np.uint8)
  ref = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma)), np.float64)
  out = np.asarray(vp.pil_gaussian_blur(img.astype(np.float32), sigma))
  # Pillow rounds to uint8 after each of its 6 passes; the float operator does not.
  assert np.abs(out - ref).max() <= 2.0
  assert np.abs(out - ref).mean() < 0.6
  if sigma < 10:  # a different sigma is clearly further away
    wrong = np.asarray(vp.pil_gaussian_blur(img.astype(np.float32), sigma * 1.5))
    assert np.abs(wrong - ref).mean() > 2 * np.abs(out - ref).mean()


def test_fgvp_blur_reverse_mask_matches_pillow_paste(rng):
  img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
  mask = np.zeros((32, 32), np.uint8)
  mask[8:20, 5:25] = 1
  # FGVP 'blur_mask': overlay = blur(img); overlay.paste(img, mask=mask)
  over = Image.fromarray(img).filter(ImageFilter.GaussianBlur(100))
  over.paste(Image.fromarray(img), mask=Image.fromarray(mask * 255))
  ref = np.asarray(over, np.float64) / 255
  out = np.asarray(vp.fgvp_blur_reverse_mask(img.astype(np.float32) / 255, mask.astype(np.float32)))
  inside = mask.astype(bool)
  np.testing.assert_array_equal(out[inside], img[inside].astype(np.float32) / 255)  # untouched
  assert np.abs(out - ref).max() <= 2.0 / 255
  assert np.abs(out[~inside] - img[~inside] / 255).mean() > 0.1  # heavily blurred outside


# ----------------------------------------------------------------------------- zero-shot

def test_templates_are_clips():
  torch_or_skip()
  import open_clip.zero_shot_metadata as z
  assert zs.OPENAI_IMAGENET_TEMPLATES == tuple(t('{}') for t in z.OPENAI_IMAGENET_TEMPLATES)
  assert zs.SIMPLE_IMAGENET_TEMPLATES == tuple(t('{}') for t in z.SIMPLE_IMAGENET_TEMPLATES)


def test_class_text_embeddings_vs_loop(tiny, tok):
  model, params = tiny
  names = ['triangle', 'circle', 'star', 'heart', 'ring']
  templates = ('a {}', 'the {}', 'a red {}')
  out = np.asarray(zs.class_text_embeddings(model, params, tok, names, templates, batch_size=4))
  one = jax.jit(lambda ids: model.apply({'params': params}, ids, method='encode_text')[0][0])
  ref = []
  for c in names:  # one text at a time, float64 averaging
    es = []
    for t in templates:
      e = np.asarray(one(jnp.asarray(tok([t.format(c)]))), np.float64)
      es.append(e / np.linalg.norm(e))
    m = np.mean(es, 0)
    ref.append(m / np.linalg.norm(m))
  np.testing.assert_allclose(out, np.asarray(ref), atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match='placeholder'):
    zs.class_text_embeddings(model, params, tok, names, ('no slot',))


# ----------------------------------------------------------------------------- region embeddings

def _encode_one(model, params, x):
  """One pixel-space image -> its [CLS] embedding (one jitted forward per call)."""
  return _ENC(model)(params, x)


_ENCODERS = {}


def _ENC(model):
  if model not in _ENCODERS:
    _ENCODERS[model] = jax.jit(lambda p, x: vp.cls_embedding(model, p, vp.normalize(x[None]))[0])
  return _ENCODERS[model]


def _regions(example):
  masks, boxes, fine = R.shapes_regions(example)
  return np.asarray(example['image'], np.float32) / 255, masks, boxes, fine


@pytest.mark.parametrize('method', ['cls', 'crop', 'masked_crop', 'red_circle', 'fgvp'])
def test_region_embeddings_equal_a_loop(tiny, examples, method):
  """The batched (vmapped, bucket-padded) embeddings equal one prompt + one forward per region."""
  model, params = tiny
  ex = max(examples, key=lambda e: len(e['objects']['fine']))
  img, masks, boxes, _ = _regions(ex)
  assert masks.shape[0] >= 3  # padded to the next bucket
  out = np.asarray(R.region_embeddings(method, model, params, ex['image'], masks, boxes))
  prompt = jax.jit({'cls': lambda m, b: img,
                    'crop': lambda m, b: vp.crop(img, b),
                    'masked_crop': lambda m, b: vp.masked_crop(img, m),
                    'red_circle': lambda m, b: vp.red_circle(img, b),
                    'fgvp': lambda m, b: vp.fgvp_blur_reverse_mask(img, m)}[method])
  ref = [np.asarray(_encode_one(model, params, prompt(m, b))) for m, b in zip(masks, boxes)]
  assert out.shape == (masks.shape[0], model.cfg.embed_dim)
  np.testing.assert_allclose(out, np.asarray(ref), rtol=1e-4, atol=1e-5)


def test_region_embeddings_masks_or_boxes(tiny, examples):
  """Missing boxes are the masks' tight boxes (= trace_shapes' visible boxes); missing masks are the
  rasterised boxes."""
  from trace_jax.inversion import maskinversion as mi
  model, params = tiny
  img, masks, boxes, _ = _regions(examples[1])
  np.testing.assert_array_equal(R.mask_boxes_np(masks), boxes)
  both = np.asarray(R.region_embeddings('red_circle', model, params, img, masks, boxes))
  np.testing.assert_array_equal(np.asarray(R.region_embeddings('red_circle', model, params, img, masks)),
                                both)
  from_boxes = np.asarray(R.region_embeddings('masked_crop', model, params, img, boxes=boxes))
  box_masks = mi.rasterize_boxes(boxes, img.shape[:2])
  np.testing.assert_array_equal(
      from_boxes, np.asarray(R.region_embeddings('masked_crop', model, params, img, box_masks, boxes)))


def test_region_embeddings_maskinversion_dispatch(tiny, examples):
  from trace_jax.inversion import maskinversion as mi
  model, params = tiny
  img, masks, boxes, _ = _regions(examples[0])
  lets = np.asarray(R.region_embeddings('maskinversion', model, params, img, masks, boxes,
                                        steps=2, mode='exact'))
  ref = mi.invert(model, params, np.asarray(vp.normalize(img)), masks, steps=2, mode='exact')['lets']
  np.testing.assert_allclose(lets, np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_region_embeddings_errors(tiny, examples):
  model, params = tiny
  img, masks, boxes, _ = _regions(examples[0])
  with pytest.raises(ValueError, match='method must be one of'):
    R.region_embeddings('alpha_clip', model, params, img, masks)
  with pytest.raises(ValueError, match='pixel space'):
    R.region_embeddings('crop', model, params, np.asarray(vp.normalize(img)) * 3, masks)
  with pytest.raises(ValueError, match='masks but'):
    R.region_embeddings('crop', model, params, img, masks, boxes[:1])
  with pytest.raises(ValueError, match='image resolution'):
    R.region_embeddings('fgvp', model, params, img, masks[:, :16, :16])
  with pytest.raises(ValueError, match='empty'):
    R.region_embeddings('fgvp', model, params, img, np.zeros_like(masks))
  with pytest.raises(ValueError, match='unexpected keyword'):
    R.region_embeddings('crop', model, params, img, masks, steps=3)


# ----------------------------------------------------------------------------- end to end

def test_evaluate_with_oracles(tiny, tok, examples):
  model, params = tiny
  c = load_concepts()
  names = [c.fine_names[i] for i in c.things]
  cls_emb = np.asarray(zs.class_text_embeddings(model, params, tok, names, zs.SHAPES_TEMPLATES))
  n_regions = sum(len(e['objects']['fine']) for e in examples)

  def oracle(img, masks, boxes, ex):  # the true class's text embedding
    return cls_emb[np.asarray(ex['objects']['fine'])]
  out = R.evaluate_region_retrieval(model, params, tok, examples, oracle, tasks=('class',))
  assert out['class'] == {'acc@1': 1.0, 'acc@5': 1.0, 'acc@10': 1.0, 'n': n_regions}
  assert 'refexp' not in out

  perm = np.roll(np.arange(len(names)), 3)

  def permuted(img, masks, boxes, ex):  # the text embedding of another class
    return cls_emb[perm[np.asarray(ex['objects']['fine'])]]
  out = R.evaluate_region_retrieval(model, params, tok, examples, permuted, tasks=('class',))
  labels = np.concatenate([e['objects']['fine'] for e in examples])
  s = cls_emb[perm[labels]] @ cls_emb.T / np.linalg.norm(cls_emb[perm[labels]], axis=1)[:, None] \
      / np.linalg.norm(cls_emb, axis=1)[None]
  ranks = [int(np.sum(s[i] > s[i, l]) + np.sum(s[i, :l] == s[i, l])) for i, l in enumerate(labels)]
  for k in (1, 5, 10):
    assert out['class'][f'acc@{k}'] == pytest.approx(np.mean(np.asarray(ranks) < k))
  assert out['class']['acc@1'] == 0.0  # the permutation has no fixed point

  # Referring expressions: region k = the embedding of the expression that refers to object k.
  texts = [t for e in examples for t, _ in pipeline.example_phrases(e)]
  temb = np.asarray(zs.encode_texts(model, params, tok, texts))
  table = dict(zip(texts, temb))

  def ref_oracle(img, masks, boxes, ex):
    e = -np.ones((masks.shape[0], temb.shape[1]), np.float32)  # objects without an expression
    for t, k in pipeline.example_phrases(ex):
      e[k] = table[t]
    return e
  out = R.evaluate_region_retrieval(model, params, tok, examples, ref_oracle, tasks=('refexp',))
  assert out['refexp'] == {'acc@1': 1.0, 'acc@5': 1.0, 'acc@10': 1.0, 'miou': 1.0, 'oiou': 1.0,
                           'n': len(texts)}


def test_evaluate_cls_selects_first_mask(tiny, tok, examples):
  """[CLS] gives every mask the same embedding: ties select mask 0 for every expression, so Acc@1
  is the fraction of expressions about object 0 and the IoUs are those of mask 0 with the GT."""
  model, params = tiny
  out = R.evaluate_region_retrieval(model, params, tok, examples, 'cls')
  hits, ious, inter, union, ranks = [], [], 0, 0, []
  for e in examples:
    inst = np.asarray(e['instance'])
    for _, k in pipeline.example_phrases(e):
      a, b = inst == 1, inst == k + 1
      i, u = np.sum(a & b), np.sum(a | b)
      hits.append(k == 0)
      ious.append(i / u)
      inter, union = inter + i, union + u
      ranks.append(k)  # all scores tie: the referred mask k is ranked k-th
  r = out['refexp']
  assert r['n'] == len(hits)
  assert r['acc@1'] == pytest.approx(np.mean(hits))
  for kk in (1, 5, 10):
    assert r[f'acc@{kk}'] == pytest.approx(np.mean(np.asarray(ranks) < kk))
  assert r['miou'] == pytest.approx(np.mean(ious))
  assert r['oiou'] == pytest.approx(inter / union)
  assert out['class']['n'] == sum(len(e['objects']['fine']) for e in examples)
  assert 0.0 <= out['class']['acc@1'] <= out['class']['acc@5'] <= out['class']['acc@10'] <= 1.0
