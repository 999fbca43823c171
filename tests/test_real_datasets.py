"""Real-dataset tfds builders on tiny fixtures written in the official layouts (tests/fixtures_real.py):
parsed boxes, masks, phrases and splits against what the fixtures hold; errors naming the file and
field; skip-and-count of annotations whose image is missing; the COCO mask decoder against
pycocotools; the eval configs; every builder with TensorFlow hidden from the import system.
"""
import glob
import importlib.util
import json
import os
import pickle
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(__file__))
import fixtures_real as FX  # noqa: E402
from conftest import require_peer  # noqa: E402

from trace_jax.data.real import builder as B  # noqa: E402
from trace_jax.data.real import masks as M  # noqa: E402
from trace_jax.data.real import readers as R  # noqa: E402
from trace_jax.data.real import coco, flickr30k_entities, mscxr, refcoco, visual_genome, voc  # noqa: E402


def _s(x):
  return x.decode() if isinstance(x, bytes) else x


def _all(builder, split):
  ds = builder.as_data_source(split=split)
  return [ds[i] for i in range(len(ds))]


# Run in a fresh interpreter in which `import tensorflow` raises ImportError, whether or not
# TensorFlow is installed: every builder is imported, built from its
# fixture, read back and its images / masks decoded.
_NO_TF_SCRIPT = r"""
import importlib.abc, sys

class _HideTensorFlow(importlib.abc.MetaPathFinder):
  # Wraps a finder so that it finds no `tensorflow` / `tensorflow.*`: with every finder wrapped, an
  # import raises ModuleNotFoundError and importlib.util.find_spec returns None, exactly as when
  # TensorFlow is not installed (`sys.modules['tensorflow'] = None` would not do: tfds then takes
  # TensorFlow as loaded).
  def __init__(self, finder):
    self.finder = finder

  def find_spec(self, name, path=None, target=None):
    if name == 'tensorflow' or name.startswith('tensorflow.'):
      return None
    return self.finder.find_spec(name, path, target)

  def invalidate_caches(self):
    getattr(self.finder, 'invalidate_caches', lambda: None)()

assert not any(m == 'tensorflow' or m.startswith('tensorflow.') for m in sys.modules)
sys.meta_path[:] = [_HideTensorFlow(f) for f in sys.meta_path]
try:
  import tensorflow  # noqa: F401
  raise AssertionError('tensorflow is still importable')
except ModuleNotFoundError:
  pass
tests_dir, tmp = sys.argv[1], sys.argv[2]
sys.path.insert(0, tests_dir)
import os
import fixtures_real as FX
from trace_jax.data.real import coco, flickr30k_entities, masks, mscxr, readers, refcoco, visual_genome, voc
cases = [('coco', FX.write_coco, coco, 'instances_val2017', 'image', 'masks'),
         ('coco_stuff', FX.write_coco, coco, 'stuff_val2017', 'image', 'label_map'),
         ('refcoco', FX.write_refcoco, refcoco, None, 'image', 'masks'),
         ('flickr', FX.write_flickr30k_entities, flickr30k_entities, None, 'image', None),
         ('vg', FX.write_visual_genome, visual_genome, None, 'image', None),
         ('voc', FX.write_voc, voc, None, 'image', 'label_map'),
         ('mscxr', FX.write_mscxr, mscxr, None, 'image', None)]
for name, write, mod, config, image_key, mask_key in cases:
  root = os.path.join(tmp, name)
  write(root)
  b = mod.prepare(root, os.path.join(tmp, name + '_data'), config)
  n = 0
  for split in b.info.splits.keys():
    ds = b.as_data_source(split=split)
    for i in range(len(ds)):
      e = ds[i]
      assert readers.decode_image(e[image_key]).ndim == 3
      if mask_key:
        for m in (e[mask_key] if mask_key == 'masks' else [e[mask_key]]):
          assert masks.decode_png(m).ndim == 2
      n += 1
  assert n > 0, name
  print(name, n)
assert not any(m == 'tensorflow' or m.startswith('tensorflow.') for m in sys.modules), 'tensorflow loaded'
print('built without tensorflow')
"""


def test_builders_run_with_tensorflow_blocked(tmp_path):
  """Every real builder imports, builds, and reads back with TensorFlow hidden from the import system
  (every `sys.meta_path` finder wrapped, in a fresh interpreter), so the check holds where TensorFlow
  is installed.

  Fails on these broken variants (checked by editing trace_jax/data/real/builder.py): an
  `import tensorflow` at the top of builder.py (also with a stand-in `tensorflow` package on
  PYTHONPATH, i.e. where TensorFlow is installed); `IMAGE_BYTES` as `tfds.features.Image()` (no
  longer the original encoded bytes).
  """
  import subprocess
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  repo = os.path.dirname(tests_dir)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  r = subprocess.run([sys.executable, '-c', _NO_TF_SCRIPT, tests_dir, str(tmp_path)], env=env, cwd=repo,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  assert 'built without tensorflow' in r.stdout


# ----------------------------------------------------------------------------------------------------
# COCO mask decoding


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_polygon_and_rle_match_pycocotools(rng):
  mask_api = require_peer('pycocotools.mask', 'pycocotools')  # in the test extras
  for t in range(200):
    h, w = (int(v) for v in rng.integers(4, 50, 2))
    k = int(rng.integers(3, 10))
    poly = rng.uniform(-2, [w + 2, h + 2], (k, 2)).reshape(-1)
    poly = (np.round(poly) if t % 3 == 0 else poly).tolist()
    ref = mask_api.decode(mask_api.merge(mask_api.frPyObjects([poly], h, w))).astype(bool)
    ours = M.polygons_to_mask([poly], h, w)
    np.testing.assert_array_equal(ours, ref, err_msg=f'polygon case {t}')
    enc = mask_api.encode(np.asfortranarray(ref.astype(np.uint8)))
    assert M.rle_to_string(M.rle_encode(ref)) == enc['counts'].decode()
    np.testing.assert_array_equal(M.rle_decode(M.rle_from_string(enc['counts']), h, w), ref)


def test_rle_independent_of_pycocotools(rng):
  for _ in range(20):
    m = rng.random((13, 17)) < 0.4
    runs = FX.column_major_runs(m)          # written without trace_jax
    np.testing.assert_array_equal(M.rle_decode(runs, 13, 17), m)
    assert M.rle_encode(m) == runs
    np.testing.assert_array_equal(M.rle_decode(M.rle_from_string(M.rle_to_string(runs)), 13, 17), m)
  # integer rectangle polygon -> rows y0..y1-1, cols x0..x1-1
  m = M.polygons_to_mask([[2, 3, 7, 3, 7, 9, 2, 9]], 12, 10)
  ref = np.zeros((12, 10), bool)
  ref[3:9, 2:7] = True
  np.testing.assert_array_equal(m, ref)
  with pytest.raises(R.AnnotationError, match='segmentation'):
    M.coco_segmentation_to_mask({'counts': [3, 4], 'size': [3, 3]}, 3, 3)


# ----------------------------------------------------------------------------------------------------
# COCO


@pytest.fixture(scope='module')
def coco_built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('coco_manual'))
  truth = FX.write_coco(root)
  data = str(tmp_path_factory.mktemp('coco_data'))
  inst = coco.prepare(root, data, 'instances', splits=('val2017',), name='val_instances')
  stuff = coco.prepare(root, data, 'stuff', splits=('val2017',), name='val_stuff')
  return truth, inst, stuff, root


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_coco_instances(coco_built):
  truth, b, _, _ = coco_built
  assert list(b.info.splits.keys()) == ['val2017']
  ex = _all(b, 'val2017')
  assert [int(e['image_id']) for e in ex] == [139, 285]
  # image 632 is missing: its 1 instance + 1 caption are skipped and counted
  assert b.stats['missing_image_annotations'] == {'val2017': 2}
  assert b.stats['missing_image_files'] == {'val2017': ['000000000632.jpg']}
  anns = {a['id']: a for a in truth['annotations']}
  caps = {}
  for c in truth['captions']:
    caps.setdefault(c['image_id'], []).append(c['caption'])
  for e in ex:
    iid = int(e['image_id'])
    mine = [a for a in truth['annotations'] if a['image_id'] == iid]
    assert [_s(c) for c in e['captions']] == caps[iid]
    assert e['ann_id'].tolist() == [a['id'] for a in mine]
    want = [[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in mine)]
    np.testing.assert_allclose(e['boxes'], want)
    assert [_s(c) for c in e['category']] == [
        {1: 'person', 18: 'dog', 47: 'cup'}[a['category_id']] for a in mine]
    img = R.decode_image(e['image'])
    assert img.shape == (e['height'], e['width'], 3)
    assert e['masks'].shape == (len(mine),)
  masks = {a: M.decode_png(m) for e in ex for a, m in zip(e['ann_id'].tolist(), e['masks'])}
  rect = np.zeros((40, 48), np.uint8)
  rect[6:26, 4:14] = 1
  np.testing.assert_array_equal(masks[1], rect)
  np.testing.assert_array_equal(masks[3], truth['crowd_mask'].astype(np.uint8))
  assert bool(ex[0]['iscrowd'][2]) and not bool(ex[0]['iscrowd'][0])
  mask_api = require_peer('pycocotools.mask', 'pycocotools')
  for aid in (2, 4):
    a = anns[aid]
    h, w = (40, 48) if a['image_id'] == 139 else (32, 30)
    ref = mask_api.decode(mask_api.merge(mask_api.frPyObjects(a['segmentation'], h, w)))
    np.testing.assert_array_equal(masks[aid], ref)


def test_coco_stuff(coco_built):
  truth, _, b, _ = coco_built
  ex = _all(b, 'val2017')
  assert [int(e['image_id']) for e in ex] == [139, 285]
  for e in ex:
    lab = M.decode_png(e['label_map'])
    np.testing.assert_array_equal(lab, truth['maps'][int(e['image_id'])])
    assert e['labels'].tolist() == [0, 156, 170]
  e = ex[0]
  words = [_s(w) for w in e['words']]
  assert words[:5] == ['a', 'man', 'and', 'his', 'dog']
  got = {(words[i], int(e['word_caption'][i]), int(v)) for i, v in e['word_labels'].tolist()}
  # by hand from labels.txt ids (pixel value = id - 1): person 1, dog 18, wall-* 171..177, sky-other 157
  want = {('man', 0, 0), ('dog', 0, 17)} | {('wall', 0, v) for v in range(170, 177)} | {
      ('people', 1, 0), ('sky', 1, 156)}
  assert got == want
  e = ex[1]
  words = [_s(w) for w in e['words']]
  got = {(words[i], int(v)) for i, v in e['word_labels'].tolist()}
  assert got == {('cup', 46), ('table', 66), ('table', 164)}
  assert b.info.metadata['cocostuff_names'][156] == 'sky-other'


def test_coco_errors(tmp_path):
  root = tmp_path / 'm'
  FX.write_coco(str(root))
  os.remove(root / 'annotations' / 'captions_val2017.json')
  with pytest.raises(FileNotFoundError, match='captions_val2017.json'):
    coco.prepare(str(root), str(tmp_path / 'd'), 'instances', splits=('val2017',), name='e1')
  FX.write_coco(str(root))
  p = root / 'annotations' / 'instances_val2017.json'
  js = json.loads(p.read_text())
  del js['annotations'][1]['bbox']
  p.write_text(json.dumps(js))
  with pytest.raises(R.AnnotationError) as e:
    coco.prepare(str(root), str(tmp_path / 'd'), 'instances', splits=('val2017',), name='e2')
  assert 'instances_val2017.json' in str(e.value) and "'annotations[1].bbox'" in str(e.value)
  p.write_text('{"images": [')
  with pytest.raises(R.AnnotationError, match='instances_val2017.json.*not valid JSON'):
    coco.prepare(str(root), str(tmp_path / 'd'), 'instances', splits=('val2017',), name='e3')


# ----------------------------------------------------------------------------------------------------
# RefCOCO


@pytest.fixture(scope='module')
def refcoco_built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('ref_manual'))
  truth = FX.write_refcoco(root, 'refcoco+', 'unc')
  b = refcoco.prepare(root, str(tmp_path_factory.mktemp('ref_data')), 'refcocoplus_unc')
  return truth, b


def test_refcoco(refcoco_built):
  truth, b = refcoco_built
  assert sorted(b.info.splits.keys()) == ['testA', 'testB']
  a = _all(b, 'testA')
  assert len(a) == 1 and int(a[0]['image_id']) == 9
  e = a[0]
  # every COCO instance of the image is a candidate; refs point into them
  assert e['ann_id'].tolist() == [100, 101, 102]
  np.testing.assert_allclose(e['boxes'], [[2, 3, 12, 15], [20, 4, 35, 24], [5, 20, 11, 26]])
  assert e['ref_id'].tolist() == [0, 1] and e['ref_ann_id'].tolist() == [100, 101]
  assert e['ref_object'].tolist() == [0, 1]
  np.testing.assert_allclose(e['ref_boxes'], [[2, 3, 12, 15], [20, 4, 35, 24]])
  assert [_s(s) for s in e['sentences']] == ['man on the left', 'left guy', 'right man']
  assert [_s(s) for s in e['sentences_raw']] == ['Man on the LEFT', 'left guy', 'right man']
  assert e['sentence_ref'].tolist() == [0, 0, 1] and e['sent_id'].tolist() == [0, 1, 2]
  m = M.decode_png(e['masks'][2])
  want = np.zeros((30, 40), np.uint8)
  want[20:26, 5:11] = 1
  np.testing.assert_array_equal(m, want)
  bb = _all(b, 'testB')
  assert len(bb) == 1 and int(bb[0]['image_id']) == 25
  np.testing.assert_allclose(bb[0]['ref_boxes'], [[1.5, 2.5, 21.5, 32.5]])
  assert [_s(s) for s in bb[0]['sentences']] == ['the cup', 'white cup']
  # image 30 is missing: its 1 ref is skipped and counted
  assert b.stats['missing_image_annotations'] == {'testB': 1}


def test_refcoco_via_tfds_data_source(refcoco_built):
  _, b = refcoco_built
  ds = tfds.data_source(f'trace_refcoco/{b.builder_config.name}', data_dir=b.data_dir.split(
      '/trace_refcoco')[0], split='testA')
  assert len(ds) == 1 and int(ds[0]['image_id']) == 9


def test_refcoco_errors(tmp_path):
  root = tmp_path / 'm'
  FX.write_refcoco(str(root), 'refcocog', 'umd')
  with pytest.raises(FileNotFoundError, match=r'refs\(google\)\.p'):
    refcoco.prepare(str(root), str(tmp_path / 'd'), 'refcocog_google')
  p = root / 'refcocog' / 'refs(umd).p'
  refs = pickle.loads(p.read_bytes())
  del refs[2]['split']
  p.write_bytes(pickle.dumps(refs, protocol=2))
  with pytest.raises(R.AnnotationError) as e:
    refcoco.prepare(str(root), str(tmp_path / 'd'), 'refcocog_umd')
  assert 'refs(umd).p' in str(e.value) and "'refs[2].split'" in str(e.value)


# ----------------------------------------------------------------------------------------------------
# Flickr30k Entities


@pytest.fixture(scope='module')
def flickr_built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('f_manual'))
  FX.write_flickr30k_entities(root)
  return flickr30k_entities.prepare(root, str(tmp_path_factory.mktemp('f_data')))


def test_flickr30k_entities(flickr_built):
  b = flickr_built
  assert sorted(b.info.splits.keys()) == ['test', 'train', 'val']
  e = _all(b, 'val')[0]
  assert _s(e['image_id']) == '1000092795'
  assert [_s(s) for s in e['sentences']] == [
      'Two young guys with shaggy hair look at their hands while hanging out in the yard .',
      'Two friends enjoy time spent together .']
  assert [_s(p) for p in e['phrases']] == ['Two young guys', 'shaggy hair', 'their hands', 'the yard',
                                           'Two friends', 'time']
  assert e['phrase_entity'].tolist() == [1, 2, 3, 4, 1, 5]
  assert e['phrase_sentence'].tolist() == [0, 0, 0, 0, 1, 1]
  assert e['phrase_first_word'].tolist() == [0, 4, 8, 14, 0, 3]
  assert [_s(t) for t in e['phrase_type']] == ['people', 'bodyparts', 'bodyparts', 'scene', 'people',
                                               'notvisual']
  assert e['phrase_has_box'].tolist() == [True, True, True, False, True, False]
  # several boxes per entity; XML 1-based inclusive -> [xmin - 1, ymin - 1, xmax, ymax]
  raw = FX.FLICKR_BOXES['1000092795']
  for eid in (1, 2, 3):
    got = e['boxes'][e['box_entity'] == eid]
    np.testing.assert_allclose(got, [[x0 - 1, y0 - 1, x1, y1] for x0, y0, x1, y1 in raw[str(eid)]])
  assert e['scene_entities'].tolist() == [4] and e['nobox_entities'].tolist() == [5]
  t = _all(b, 'train')[0]
  assert [_s(x) for x in t['phrase_types']] == ['people/other', 'clothing', 'other']
  # the first test image is missing: skipped, its 2 phrases counted
  assert [_s(x['image_id']) for x in _all(b, 'test')] == ['10002456']
  assert b.stats['missing_image_annotations'] == {'test': 2}
  assert b.stats['missing_image_files'] == {'test': ['1000268201.jpg']}


def test_flickr_errors(tmp_path):
  root = tmp_path / 'm'
  FX.write_flickr30k_entities(str(root))
  (root / 'Annotations' / '10002456.xml').write_text('<annotation><size><width>3</width></size></annotation>')
  with pytest.raises(R.AnnotationError, match=r'10002456\.xml.*size\.height'):
    flickr30k_entities.prepare(str(root), str(tmp_path / 'd'), splits=('train',), name='x')
  os.remove(root / 'Sentences' / '10002456.txt')
  with pytest.raises(FileNotFoundError, match=r'Sentences/10002456\.txt'):
    flickr30k_entities.prepare(str(root), str(tmp_path / 'd'), splits=('train',), name='y')


# ----------------------------------------------------------------------------------------------------
# Visual Genome


def test_visual_genome(tmp_path):
  root = tmp_path / 'm'
  FX.write_visual_genome(str(root))
  b = visual_genome.prepare(str(root), str(tmp_path / 'd'))
  assert list(b.info.splits.keys()) == ['train']
  ex = {int(e['image_id']): e for e in _all(b, 'train')}
  assert sorted(ex) == [1, 2]
  # By hand (AMC §4.1): image 1 is 100 x 80, 8 % = 640 px^2: the 5 x 5 ball and the 6 x 6 region drop.
  got = sorted((_s(p), tuple(bx), int(k)) for p, bx, k in zip(ex[1]['prompts'], ex[1]['boxes'].tolist(),
                                                              ex[1]['kind']))
  want = sorted([
      ('two dogs playing on grass', (0, 0, 100, 80), 0),
      ('a brown dog', (0, 0, 30, 30), 1), ('a white dog', (60, 45, 100, 80), 1),
      ('an apple', (35, 20, 65, 60), 1),
      ('dog on the left', (0, 0, 30, 30), 2), ('top dog', (0, 0, 30, 30), 2),
      ('top left dog', (0, 0, 30, 30), 2),
      ('dog on the right', (60, 45, 100, 80), 2), ('bottom dog', (60, 45, 100, 80), 2),
      ('bottom right dog', (60, 45, 100, 80), 2)])
  assert got == want
  got2 = sorted((_s(p), tuple(bx), int(k)) for p, bx, k in zip(ex[2]['prompts'], ex[2]['boxes'].tolist(),
                                                               ex[2]['kind']))
  assert got2 == [('a wooden table', (5, 5, 55, 55), 0), ('a wooden table', (10, 10, 50, 50), 1)]
  # image 3 is missing: its region + its object prompt are skipped and counted
  assert b.stats['missing_image_annotations'] == {'train': 2}
  # every kept box covers >= 8 % of its image
  for e in ex.values():
    bx = e['boxes']
    assert ((bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1]) >= 0.08 * e['height'] * e['width']).all()


def test_visual_genome_errors(tmp_path):
  root = tmp_path / 'm'
  FX.write_visual_genome(str(root))
  p = root / 'objects.json'
  js = json.loads(p.read_text())
  del js[0]['objects'][1]['w']
  p.write_text(json.dumps(js))
  with pytest.raises(R.AnnotationError) as e:
    visual_genome.prepare(str(root), str(tmp_path / 'd'))
  assert 'objects.json' in str(e.value) and "'[0].objects[1].w'" in str(e.value)
  os.remove(root / 'region_descriptions.json')
  with pytest.raises(FileNotFoundError, match='region_descriptions.json'):
    visual_genome.prepare(str(root), str(tmp_path / 'd'), name='x')


# ----------------------------------------------------------------------------------------------------
# PASCAL VOC / Context


def test_voc2012(tmp_path):
  root = tmp_path / 'm'
  truth = FX.write_voc(str(root))
  b = voc.prepare(str(root), str(tmp_path / 'd'))
  assert sorted(b.info.splits.keys()) == ['train', 'val']
  for split in ('train', 'val'):
    ex = _all(b, split)
    ids = [i for i in truth['ids'][split] if i != '2007_000042']
    assert [_s(e['image_id']) for e in ex] == ids
    for e in ex:
      lab = truth['labels'][_s(e['image_id'])]
      np.testing.assert_array_equal(M.decode_png(e['label_map']), lab)
      assert e['labels'].tolist() == sorted(set(np.unique(lab).tolist()) - {0, 255})
  assert b.stats['missing_image_annotations'] == {'val': 1}
  assert b.info.metadata['class_names'][15] == 'person'


def test_pascal_context(tmp_path):
  root = tmp_path / 'm'
  truth = FX.write_pascal_context(str(root))
  b59 = voc.prepare(str(root), str(tmp_path / 'd'), 'context59')
  b459 = voc.prepare(str(root), str(tmp_path / 'd'), 'context459')
  assert b59.info.metadata['class_names'] == ['background'] + truth['subset']
  full = {i + 1: n for i, n in enumerate(truth['labels'])}
  sub = {n: k + 1 for k, n in enumerate(truth['subset'])}
  for split in ('train', 'val'):
    (e59,), (e459,) = _all(b59, split), _all(b459, split)
    raw = truth['maps'][truth['ids'][split][0]]
    np.testing.assert_array_equal(M.decode_png(e459['label_map']), raw)
    want = np.vectorize(lambda v: sub.get(full.get(int(v), ''), 0))(raw)
    np.testing.assert_array_equal(M.decode_png(e59['label_map']), want)
    assert e59['labels'].tolist() == sorted(set(np.unique(want).tolist()) - {0})


# ----------------------------------------------------------------------------------------------------
# MS-CXR


def test_mscxr(tmp_path):
  root = tmp_path / 'm'
  truth = FX.write_mscxr(str(root))
  b = mscxr.prepare(str(root), str(tmp_path / 'd'))
  assert sorted(b.info.splits.keys()) == ['test', 'train']
  test = _all(b, 'test')
  assert [_s(e['text']) for e in test] == ['right lower lobe opacity', 'enlarged heart']
  np.testing.assert_allclose(test[0]['boxes'], [[5, 6, 15, 18], [30, 8, 42, 22]])   # two rows, one phrase
  np.testing.assert_allclose(test[1]['boxes'], [[15, 15, 35, 35]])
  assert _s(test[0]['category']) == 'Pneumonia' and _s(test[0]['image_id']) == '02aa804e-bde0afdd'
  (tr,) = _all(b, 'train')
  # CSV frame 60 x 60, JPEG 30 x 30 -> boxes scaled by 0.5
  np.testing.assert_allclose(tr['boxes'], [[5, 10, 15, 14]])
  assert b.stats['missing_image_annotations'] == {'test': 1}
  assert len(truth['rows']) == 5


def test_mscxr_errors(tmp_path):
  root = tmp_path / 'm'
  FX.write_mscxr(str(root))
  p = root / 'MS_CXR_Local_Alignment_v1.1.0.csv'
  lines = p.read_text().splitlines()
  p.write_text('\n'.join([lines[0].replace('label_text', 'text')] + lines[1:]) + '\n')
  with pytest.raises(R.AnnotationError, match=r'v1\.1\.0\.csv.*label_text.*column missing'):
    mscxr.prepare(str(root), str(tmp_path / 'd'))
  with pytest.raises(FileNotFoundError, match=r'v1\.0\.0\.csv'):
    mscxr.prepare(str(root), str(tmp_path / 'd'), 'v1_0_0')


# ----------------------------------------------------------------------------------------------------
# Eval configs


CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'configs', 'eval_*.py')))


def _load_config(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_eval_configs_name_real_builders():
  from trace_jax.data import real
  names = {os.path.basename(p) for p in CONFIGS}
  assert {'eval_maskinversion_voc.py', 'eval_maskinversion_coco.py', 'eval_maskinversion_refcoco.py',
          'eval_maskinversion_refcocoplus.py', 'eval_amc_flickr30k.py', 'eval_amc_refcocoplus.py',
          'eval_m2ib_mscxr.py', 'eval_trace_cocostuff.py'} <= names
  for p in CONFIGS:
    cfg = _load_config(p)
    d = cfg.eval.dataset
    mod = real.module(d.name)
    builder_cls = next(v for v in vars(mod).values() if isinstance(v, type)
                       and issubclass(v, B.RealBuilder) and v is not B.RealBuilder)
    assert d.config in {c.name for c in builder_cls.BUILDER_CONFIGS}, p
    assert d.split and d.manual_dir and cfg.eval.checkpoint and cfg.eval.method, p


def test_build_command_line(tmp_path, capsys):
  root = tmp_path / 'm'
  FX.write_coco(str(root))
  rc = B.main(coco.prepare, 'instances', coco.TraceCoco,
              ['--manual_dir', str(root), '--data_dir', str(tmp_path / 'd'), '--config', 'stuff',
               '--splits', 'val2017'])
  out = capsys.readouterr().out
  assert rc == 0 and 'trace_coco/stuff_val2017' in out and 'val2017: 2 examples' in out
  assert '"missing_image_annotations": {"val2017": 1}' in out
  os.remove(root / 'annotations' / 'captions_val2017.json')
  rc = B.main(coco.prepare, 'instances', coco.TraceCoco,
              ['--manual_dir', str(root), '--data_dir', str(tmp_path / 'd2'), '--config', 'stuff_val2017'])
  assert rc == 2 and 'captions_val2017.json' in capsys.readouterr().out
