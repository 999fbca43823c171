"""The embedded grounding dataset (trace_shapes): determinism, mutual consistency of its ground truth,
held-out splits, and the input pipeline (shapes, token-pixel labels, resumption, host sharding).

The checks re-derive everything independently from the rendered masks and from concepts.json read
as plain JSON (boxes via np.nonzero, referents by parsing the expression text), not via the
generator's own helpers.
"""
import filecmp
import json
import os
import sys

import numpy as np
import pytest

from trace_jax.data import pipeline
from trace_jax.data.shapes import builder as shapes_builder
from trace_jax.data.shapes import scene
from trace_jax.data.shapes.concepts import CONCEPTS_PATH, load_concepts

TINY = dict(image_size=32, split_sizes={'train': 24, 'validation': 4, 'test': 4, 'heldout': 8,
                                        'openvocab': 8})
with open(CONCEPTS_PATH) as f:
  CJ = json.load(f)
FINE = [f['name'] for f in CJ['fine']]
COARSE = [c['name'] for c in CJ['coarse']]
COARSE_OF = {f['name']: f['coarse'] for f in CJ['fine']}
COLORS = [c['name'] for c in CJ['colors']]
STUFF = [f['name'] for f in CJ['fine'] if dict((c['name'], c['kind']) for c in CJ['coarse'])[f['coarse']]
         == 'stuff']
HELDOUT = {tuple(p) for p in CJ['heldout_combinations']}
OPEN = set(CJ['open_vocab'])


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds_a'))
  b = shapes_builder.prepare(data_dir=d, **TINY)
  b.root = d
  return b


@pytest.fixture(scope='module')
def examples():
  """Scenes rendered directly at the default size, from every split."""
  out = []
  for split in scene.SPLITS:
    n = 90 if split == 'train' else 30
    out += [(split, scene.generate_example(0, split, i, 64)) for i in range(n)]
  return out


def _s(x):
  return x.decode() if isinstance(x, bytes) else x


def _bbox(mask):
  ys, xs = np.nonzero(mask)
  return [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]


# ----------------------------------------------------------------------------------------------------
# Builder


def test_builder_same_seed_same_bytes(built, tmp_path):
  b2 = shapes_builder.prepare(data_dir=str(tmp_path / 'b'), **TINY)
  d1, d2 = built.data_path, b2.data_path
  recs = sorted(f for f in os.listdir(d1) if '.array_record' in f)
  assert len(recs) == len(scene.SPLITS)
  assert recs == sorted(f for f in os.listdir(d2) if '.array_record' in f)
  for f in recs:
    assert filecmp.cmp(os.path.join(d1, f), os.path.join(d2, f), shallow=False), f
  # A different seed really changes the data (the comparison above can fail).
  b3 = shapes_builder.prepare(data_dir=str(tmp_path / 'c'), seed=1, **TINY)
  f = [r for r in recs if '-train.' in r][0]
  assert not filecmp.cmp(os.path.join(d1, f), os.path.join(b3.data_path, f), shallow=False)
  assert 'tensorflow' not in sys.modules  # built and read without TensorFlow


def test_records_are_the_generator_output_in_index_order(built):
  for split, n in TINY['split_sizes'].items():
    src = built.as_data_source(split=split)
    assert len(src) == n
    for i in (0, n - 1):
      rec, ref = src[i], scene.generate_example(0, split, i, 32)
      assert rec['id'] == i
      for k in ('image', 'semantic', 'instance', 'word_obj', 'word_stuff', 'word_kind', 'stuff'):
        np.testing.assert_array_equal(rec[k], ref[k])
      assert _s(rec['caption']) == ref['caption']
      for k, v in ref['objects'].items():
        if k == 'phrase':
          assert [_s(p) for p in rec['objects'][k]] == v
        else:
          np.testing.assert_array_equal(rec['objects'][k], v)
      assert [_s(t) for t in rec['refexps']['text']] == ref['refexps']['text']
      np.testing.assert_array_equal(rec['refexps']['object'], ref['refexps']['object'])


def test_generator_is_a_function_of_seed_split_index():
  a, b = scene.generate_example(3, 'test', 7, 48), scene.generate_example(3, 'test', 7, 48)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['caption'] == b['caption']
  c = scene.generate_example(3, 'test', 8, 48)
  assert not np.array_equal(a['image'], c['image'])
  with pytest.raises(ValueError, match='unknown split'):
    scene.generate_example(0, 'tran', 0)
  with pytest.raises(ValueError, match='image_size'):
    scene.generate_example(0, 'train', 0, 8)


# ----------------------------------------------------------------------------------------------------
# Ground truth consistency


def test_masks_boxes_semantic_agree(examples):
  for split, e in examples:
    inst, sem, o = e['instance'], e['semantic'], e['objects']
    n = len(o['fine'])
    assert e['image'].shape == (64, 64, 3) and e['image'].dtype == np.uint8
    assert 1 <= n <= 5 and set(np.unique(inst)) <= set(range(n + 1))
    for k in range(n):
      m = inst == k + 1
      assert m.sum() == o['area'][k] > 0
      assert o['area'][k] >= 0.7 * o['full_area'][k]  # mostly visible
      assert list(o['box'][k]) == _bbox(m)
      assert (sem[m] == o['fine'][k]).all()
      assert COARSE[o['coarse'][k]] == COARSE_OF[FINE[o['fine'][k]]]
      assert FINE[o['fine'][k]] not in STUFF
    # Semantic = union of instances by class; the rest is the listed stuff.
    bg = inst == 0
    assert set(np.unique(sem[bg])) <= set(e['stuff'].tolist())
    assert all(FINE[s] in STUFF for s in e['stuff'])


def test_caption_words_name_their_pixels(examples):
  for split, e in examples:
    words = e['caption'].split(' ')
    o = e['objects']
    assert len(words) == len(e['word_obj']) == len(e['word_stuff']) == len(e['word_kind'])
    wm = pipeline.word_masks(e)
    for i, w in enumerate(words):
      kind = scene.WORD_KINDS[e['word_kind'][i]]
      k, st = e['word_obj'][i], e['word_stuff'][i]
      if kind == 'function':
        assert k == -1 and st == -1 and not wm[i].any()
        assert w in CJ['function_words']
        continue
      if kind == 'stuff':
        assert k == -1 and FINE[st] == w and st in e['stuff']
        expect = (e['instance'] == 0) & (e['semantic'] == st)
      else:
        assert st == -1 and 0 <= k < len(o['fine'])
        fine = FINE[o['fine'][k]]
        assert {'fine': fine, 'coarse': COARSE_OF[fine], 'color': COLORS[o['color'][k]],
                'size': CJ['sizes'][o['size'][k]], 'texture': CJ['textures'][o['texture'][k]]}[kind] == w
        expect = e['instance'] == k + 1
      np.testing.assert_array_equal(wm[i], expect)
      assert wm[i].any()  # every content word names something visible
    # Each object's phrase is a contiguous span of the caption attached to that object.
    for k, ph in enumerate(o['phrase']):
      pw = ph.split(' ')
      starts = [i for i in range(len(words)) if words[i:i + len(pw)] == pw
                and all(e['word_obj'][j] == k for j in range(i + 1, i + len(pw)))]
      assert starts, (ph, e['caption'])


def _resolve(text, e, size):
  """Independent reading of a referring expression: the object it picks out, or None if ambiguous."""
  w = text.split(' ')
  assert w[0] == 'the'
  o, inst = e['objects'], e['instance']
  centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in (_bbox(inst == k + 1) for k in
                                                            range(len(o['fine'])))]
  nouns = [x for x in w if x in FINE or x in COARSE]
  assert len(nouns) == 1
  cand = []
  for k in range(len(o['fine'])):
    fine = FINE[o['fine'][k]]
    if nouns[0] not in (fine, COARSE_OF[fine]):
      continue
    attrs = {COLORS[o['color'][k]], CJ['sizes'][o['size'][k]], CJ['textures'][o['texture'][k]]}
    if all(x in attrs for x in w if x in COLORS or x in CJ['sizes'] or x in CJ['textures']):
      cand.append(k)
  gap = scene.SPATIAL_MARGIN * size
  y = {k: centres[k][0] for k in cand}
  x = {k: centres[k][1] for k in cand}

  def extreme(val, sign, n_required):
    if n_required == 2 and len(cand) != 2 or n_required == 3 and len(cand) < 3:
      return None
    best = min(cand, key=lambda k: sign * val[k])
    ok = all(sign * (val[j] - val[best]) >= gap - 1e-9 for j in cand if j != best)
    return best if ok else None

  if w[-1] == 'corner':
    top, left = w[-3] == 'top', w[-2] == 'left'
    inside = [k for k in cand if (y[k] < size / 3 if top else y[k] > 2 * size / 3)
              and (x[k] < size / 3 if left else x[k] > 2 * size / 3)]
    quad = [k for k in cand if (y[k] < size / 2) == top and (x[k] < size / 2) == left]
    return inside[0] if len(inside) == 1 and quad == inside else None
  for word, val, sign in (('leftmost', x, 1), ('rightmost', x, -1), ('topmost', y, 1),
                          ('bottommost', y, -1)):
    if w[1] == word:
      return extreme(val, sign, 3)
  if w[-2:] == ['the', 'left']:
    return extreme(x, 1, 2)
  if w[-2:] == ['the', 'right']:
    return extreme(x, -1, 2)
  if w[1] == 'top':
    return extreme(y, 1, 2)
  if w[1] == 'bottom':
    return extreme(y, -1, 2)
  return cand[0] if len(cand) == 1 else None


def test_referring_expressions_are_unique_and_correct(examples):
  n_spatial = n_objects = n_refs = 0
  kinds = set()
  for split, e in examples:
    r = e['refexps']
    n_objects += len(e['objects']['fine'])
    n_refs += len(r['text'])
    for text, k, sp in zip(r['text'], r['object'], r['spatial']):
      assert _resolve(text, e, 64) == k, (text, e['caption'])
      words = set(text.split())
      assert bool(sp) == bool(words & {'left', 'right', 'top', 'bottom', 'leftmost', 'rightmost',
                                       'topmost', 'bottommost', 'corner'})
      n_spatial += bool(sp)
      if sp:
        kinds.add('corner' if 'corner' in words else text.split()[1] if text.split()[1] in (
            'top', 'bottom', 'leftmost', 'rightmost', 'topmost', 'bottommost') else text.split()[-1])
  assert n_refs >= 0.95 * n_objects  # almost every object gets a unique expression
  assert n_spatial >= 0.08 * n_refs and len(kinds) >= 4  # spatial words are really exercised


def test_heldout_and_open_vocab_splits(examples):
  for split, e in examples:
    o = e['objects']
    pairs = [(COLORS[c], FINE[f]) for c, f in zip(o['color'], o['fine'])]
    np.testing.assert_array_equal(o['heldout'], [p in HELDOUT for p in pairs])
    if split == 'heldout':
      assert any(p in HELDOUT for p in pairs)
    else:
      assert not any(p in HELDOUT for p in pairs)  # never seen in train (nor val / test)
    texts = [e['caption']] + list(e['refexps']['text'])
    used = {w for t in texts for w in t.split()}
    if split == 'openvocab':
      assert used & OPEN
    else:
      assert not used & OPEN  # open-vocabulary words only ever appear in the openvocab split
    assert used <= set(pipeline.vocabulary())
    assert used.isdisjoint(OPEN) or split == 'openvocab'
  vocab = pipeline.vocabulary(include_open_vocab=False)
  assert not set(vocab) & OPEN and set(pipeline.vocabulary()) - set(vocab) == OPEN


def test_concept_hierarchy_is_two_levels():
  c = load_concepts()
  for coarse in COARSE:
    assert len(c.children(coarse)) >= 2
  assert set(c.things) | set(c.stuff) == set(range(len(FINE)))
  assert {FINE[i] for i in c.stuff} == set(STUFF)


# ----------------------------------------------------------------------------------------------------
# Pipeline


KEYS = {  # key: (shape with B=4, S=32, L=36, G=4, dtype)
    'image': ((4, 32, 32, 3), np.float32), 'caption_ids': ((4, 36), np.int32),
    'token_masks': ((4, 36, 4, 4), np.float32), 'token_kind': ((4, 36), np.int32),
    'token_object': ((4, 36), np.int32), 'token_label': ((4, 36), np.int32),
    'phrase_ids': ((4, 36), np.int32), 'phrase_object': ((4,), np.int32),
    'phrase_box': ((4, 4), np.int32), 'phrase_box_mask': ((4, 32, 32), np.float32),
    'phrase_mask': ((4, 32, 32), np.float32), 'phrase_heldout': ((4,), np.bool_),
    'semantic': ((4, 32, 32), np.int32), 'instance': ((4, 32, 32), np.int32),
    'index': ((4,), np.int32), 'valid': ((4,), np.bool_),
}


@pytest.fixture(scope='module')
def source(built):
  return pipeline.load_split(data_dir=built.root, split='train', build=False, **TINY)


def _batch(src, step, **kw):
  kw = dict(dict(batch_size=4, seed=5, patch_size=8, process_index=0, process_count=1), **kw)
  return pipeline.get_batch(src, step, **kw)


def test_batch_shapes_and_labels(source):
  tok = pipeline.make_tokenizer()
  b = _batch(source, 0, tokenizer=tok)
  assert set(b) == set(KEYS)
  for k, (shape, dtype) in KEYS.items():
    assert b[k].shape == shape and b[k].dtype == dtype, k
  for r in range(4):
    e = source[int(b['index'][r])]
    raw = (b['image'][r] * np.array(pipeline.CLIP_STD) + np.array(pipeline.CLIP_MEAN)) * 255
    np.testing.assert_allclose(raw, e['image'], atol=1e-3)
    words = _s(e['caption']).split(' ')
    assert tok.decode(b['caption_ids'][r]) == ' '.join(words[:34])
    wm = pipeline.word_masks(e).astype(np.float64)
    for i in range(min(len(words), 34)):  # token i + 1 is word i
      pooled = wm[i].reshape(4, 8, 4, 8).mean(axis=(1, 3))
      np.testing.assert_allclose(b['token_masks'][r, i + 1], pooled, atol=1e-6)
      assert b['token_kind'][r, i + 1] == e['word_kind'][i]
      k = e['word_obj'][i]
      assert b['token_object'][r, i + 1] == k
      assert b['token_label'][r, i + 1] == (e['objects']['fine'][k] if k >= 0 else e['word_stuff'][i])
    assert (b['token_kind'][r, 0] == -1) and not b['token_masks'][r, 0].any()
    # The phrase is a unique expression of that object; its masks are the object's box and pixels.
    k = b['phrase_object'][r]
    text = tok.decode(b['phrase_ids'][r])
    assert _resolve(text, {'objects': e['objects'], 'instance': e['instance']}, 32) == k
    m = e['instance'] == k + 1
    np.testing.assert_array_equal(b['phrase_mask'][r], m)
    assert list(b['phrase_box'][r]) == _bbox(m)
    y0, x0, y1, x1 = b['phrase_box'][r]
    assert b['phrase_box_mask'][r].sum() == (y1 - y0) * (x1 - x0) == b['phrase_box_mask'][r, y0:y1,
                                                                                           x0:x1].sum()


def test_resume_at_step_k_gives_the_same_batches(source):
  tok = pipeline.make_tokenizer()
  kw = dict(batch_size=4, seed=5, tokenizer=tok, process_index=0, process_count=1)
  full = list(pipeline.batches(source, num_steps=9, **kw))  # 6 steps per epoch: crosses an epoch
  resumed = list(pipeline.batches(source, start_step=4, num_steps=5, prefetch=0, **kw))
  for a, b in zip(full[4:], resumed):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Each epoch is a permutation; the next epoch is a different one.
  ep0 = np.concatenate([b['index'] for b in full[:6]])
  assert sorted(ep0) == list(range(24))
  assert not np.array_equal(ep0[:8], np.concatenate([b['index'] for b in full[6:8]]))
  other = next(pipeline.batches(source, num_steps=1, **dict(kw, seed=6)))
  assert not np.array_equal(other['index'], full[0]['index'])


def test_host_slices_tile_the_global_batch(source):
  g = _batch(source, 3)
  parts = [_batch(source, 3, process_index=p, process_count=2) for p in range(2)]
  for k in g:
    np.testing.assert_array_equal(g[k], np.concatenate([p[k] for p in parts]))
  with pytest.raises(ValueError, match='divisible'):
    _batch(source, 0, process_index=0, process_count=3)


def test_one_evaluation_pass_covers_every_example_once(built):
  src = pipeline.load_split(data_dir=built.root, split='heldout', build=False, **TINY)
  bs = list(pipeline.batches(src, batch_size=3, num_epochs=1, shuffle=False, drop_remainder=False,
                             process_index=0, process_count=1))
  assert len(bs) == 3  # 8 examples -> 3 + 3 + 2 (+ 1 padding row)
  idx = np.concatenate([b['index'][b['valid']] for b in bs])
  assert idx.tolist() == list(range(8)) and (~bs[-1]['valid']).sum() == 1
  assert all(b['phrase_heldout'][b['valid']].dtype == bool for b in bs)


def test_bad_arguments_raise(source):
  with pytest.raises(ValueError, match='exceeds'):
    _batch(source, 0, batch_size=100)
  with pytest.raises(ValueError, match='patch_size'):
    _batch(source, 0, patch_size=5)
  with pytest.raises(ValueError, match='phrase_source'):
    _batch(source, 0, phrase_source='caption')
  with pytest.raises(ValueError, match='unknown split'):
    pipeline.load_split(split='dev', build=False)


def test_token_concepts_follow_the_hierarchy():
  tok = pipeline.make_tokenizer()
  tc = pipeline.token_concepts(tok)
  for f in CJ['fine']:
    i = tok.encode(f['name'])[0]
    assert FINE[tc['fine'][i]] == f['name'] and COARSE[tc['coarse'][i]] == f['coarse']
  for c in COARSE:
    i = tok.encode(c)[0]
    assert tc['fine'][i] == -1 and COARSE[tc['coarse'][i]] == c
  for w in CJ['function_words'] + COLORS:
    i = tok.encode(w)[0]
    assert tc['fine'][i] == -1 and tc['coarse'][i] == -1
  assert (tc['fine'][[0, 1, tok.sot_id, tok.eot_id]] == -1).all()


def test_in_memory_source_gives_the_same_batches(built, source):
  mem = pipeline.load_split(data_dir=built.root, split='train', build=False, in_memory=True, **TINY)
  assert len(mem) == len(source)
  a, b = _batch(source, 2), _batch(mem, 2)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
