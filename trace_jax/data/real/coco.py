"""COCO 2017 (captions + instances) and COCO-Stuff as a tfds builder `trace_coco` (array_record).

manual_dir layout (official archive names, unzipped in place; see docs/datasets.md):
  train2017/000000xxxxxx.jpg, val2017/...                       (train2017.zip, val2017.zip)
  annotations/instances_{split}.json, annotations/captions_{split}.json
                                                                 (annotations_trainval2017.zip)
  stuffthingmaps_trainval2017/{split}/000000xxxxxx.png           (COCO-Stuff stuffthingmaps_trainval2017.zip;
                                                                  config 'stuff' only)

Configs
  'instances': one example per image: captions, every instance annotation (box, category, crowd
     flag, area, binary mask as PNG). Used by MaskInversion class retrieval on COCO (the query masks
     are the instance masks; the class is the category).
  'stuff': one example per image: captions, the COCO-Stuff label map, and for every caption word the
     COCO-Stuff labels it names (TRACE patch-token ground truth = pixels of those labels).

Conventions
  boxes: COCO `bbox` [x, y, w, h] (pixels) -> [x, y, x + w, y + h] (common.py convention).
  masks: `segmentation` polygons / RLE decoded with common.coco_segmentation_to_mask (a port of the
     COCO API, equal to pycocotools' annToMask), stored as 0/1 PNGs at the image size.
  COCO-Stuff label map: the official stuffthingmaps PNG unchanged: pixel = COCO-Stuff label id - 1
     (0 = person ... 181 = wood; ids of cocostuff labels.txt), 255 = unlabeled. This is the
     "Caffe-compatible" encoding stated in the cocostuff README (nightrome/cocostuff issues #7, #17).
     We use the PNGs rather than stuff_{split}.json because they hold stuff AND thing labels in one
     non-overlapping map, which is what per-pixel ground truth needs.
  Caption words -> labels (`word_labels`): captions are lower-cased and split into words
     ([a-z0-9]+); a word (or a multi-word class name such as "hot dog", longest match first) names a
     label if it equals the class name, the head of a stuff name ("wall" -> all wall-* classes,
     "sky" -> sky-other), a plural of those (s / es / ies), or a synonym from `SYNONYMS`.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from trace_jax.data.real import builder as B
from trace_jax.data.real import masks as M
from trace_jax.data.real import readers as R

SPLITS = ('train2017', 'val2017')

# COCO-Stuff labels (cocostuff labels.txt), id 1..182; stuffthingmaps pixel value = id - 1.
# Ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91 are COCO thing classes that were never annotated.
COCOSTUFF_NAMES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'street sign', 'stop sign', 'parking meter', 'bench', 'bird',
    'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'hat', 'backpack',
    'umbrella', 'shoe', 'eye glasses', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'plate', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl',
    'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut',
    'cake', 'chair', 'couch', 'potted plant', 'bed', 'mirror', 'dining table', 'window', 'desk',
    'toilet', 'door', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave',
    'oven', 'toaster', 'sink', 'refrigerator', 'blender', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush', 'hair brush',
    'banner', 'blanket', 'branch', 'bridge', 'building-other', 'bush', 'cabinet', 'cage',
    'cardboard', 'carpet', 'ceiling-other', 'ceiling-tile', 'cloth', 'clothes', 'clouds', 'counter',
    'cupboard', 'curtain', 'desk-stuff', 'dirt', 'door-stuff', 'fence', 'floor-marble',
    'floor-other', 'floor-stone', 'floor-tile', 'floor-wood', 'flower', 'fog', 'food-other',
    'fruit', 'furniture-other', 'grass', 'gravel', 'ground-other', 'hill', 'house', 'leaves',
    'light', 'mat', 'metal', 'mirror-stuff', 'moss', 'mountain', 'mud', 'napkin', 'net', 'paper',
    'pavement', 'pillow', 'plant-other', 'plastic', 'platform', 'playingfield', 'railing',
    'railroad', 'river', 'road', 'rock', 'roof', 'rug', 'salad', 'sand', 'sea', 'shelf',
    'sky-other', 'skyscraper', 'snow', 'solid-other', 'stairs', 'stone', 'straw',
    'structural-other', 'table', 'tent', 'textile-other', 'towel', 'tree', 'vegetable',
    'wall-brick', 'wall-concrete', 'wall-other', 'wall-panel', 'wall-stone', 'wall-tile',
    'wall-wood', 'water-other', 'waterdrops', 'window-blind', 'window-other', 'wood')
assert len(COCOSTUFF_NAMES) == 182
UNLABELED = 255

# A small, documented synonym list (word -> COCO-Stuff class names). Plurals of every entry and of
# every class name are handled by `_singular`.
SYNONYMS = {
    'people': ['person'], 'man': ['person'], 'men': ['person'], 'woman': ['person'],
    'women': ['person'], 'boy': ['person'], 'girl': ['person'], 'child': ['person'],
    'children': ['person'], 'kid': ['person'], 'guy': ['person'], 'lady': ['person'],
    'ladies': ['person'], 'player': ['person'], 'skier': ['person'], 'surfer': ['person'],
    'skateboarder': ['person'], 'baby': ['person'], 'adult': ['person'], 'persons': ['person'],
    'bike': ['bicycle'], 'motorbike': ['motorcycle'], 'plane': ['airplane'], 'jet': ['airplane'],
    'aeroplane': ['airplane'], 'airliner': ['airplane'], 'television': ['tv'], 'sofa': ['couch'],
    'phone': ['cell phone'], 'cellphone': ['cell phone'], 'smartphone': ['cell phone'],
    'doughnut': ['donut'], 'ball': ['sports ball'], 'racket': ['tennis racket'],
    'racquet': ['tennis racket'], 'fridge': ['refrigerator'], 'table': ['dining table', 'table'],
    'puppy': ['dog'], 'kitten': ['cat'], 'teddy': ['teddy bear'], 'hydrant': ['fire hydrant'],
    'ocean': ['sea'], 'lake': ['water-other'], 'street': ['road'], 'sidewalk': ['pavement'],
    'trees': ['tree'], 'cloud': ['clouds'], 'flowers': ['flower'], 'rocks': ['rock'],
}


def _head(name: str) -> str:
  """'building-other' -> 'building', 'wall-brick' -> 'wall', 'desk-stuff' -> 'desk'."""
  return name.split('-')[0]


def label_vocabulary() -> dict[tuple[str, ...], list[int]]:
  """Word n-gram -> sorted COCO-Stuff label VALUES (pixel values, id - 1) it names."""
  vocab: dict[tuple[str, ...], set] = {}
  index = {n: i for i, n in enumerate(COCOSTUFF_NAMES)}
  for i, name in enumerate(COCOSTUFF_NAMES):
    base = name if '-' not in name else _head(name)
    vocab.setdefault(tuple(base.split()), set()).add(i)
  for word, names in SYNONYMS.items():
    vocab.setdefault(tuple(word.split()), set()).update(index[n] for n in names)
  return {k: sorted(v) for k, v in vocab.items()}


def _singular(word: str, last_words: set) -> str | None:
  """The form of `word` (itself, or singular by the s / es / ies rules) that ends a vocabulary entry."""
  for cand in (word, word[:-1] if word.endswith('s') else None,
               word[:-2] if word.endswith('es') else None,
               word[:-3] + 'y' if word.endswith('ies') else None):
    if cand and cand in last_words:
      return cand
  return None


def ground_caption(caption: str, vocab=None) -> tuple[list[str], list[tuple[int, int]]]:
  """Words of a caption and the (word index, label value) pairs it names; longest n-gram first,
  the plural rule applies to the last word of an n-gram."""
  vocab = label_vocabulary() if vocab is None else vocab
  words = re.findall(r'[a-z0-9]+', caption.lower())
  maxn = max(len(k) for k in vocab)
  last_words = {k[-1] for k in vocab}
  pairs: list[tuple[int, int]] = []
  i = 0
  while i < len(words):
    for n in range(min(maxn, len(words) - i), 0, -1):
      gram = list(words[i:i + n])
      s = _singular(gram[-1], last_words)
      if s is None:
        continue
      key = tuple(gram[:-1] + [s])
      if key in vocab:
        pairs += [(j, lab) for j in range(i, i + n) for lab in vocab[key]]
        i += n
        break
    else:
      i += 1
  return words, pairs


@dataclasses.dataclass(eq=False)
class CocoConfig(tfds.core.BuilderConfig):
  """kind: 'instances' | 'stuff'; splits: which official splits to build; captions: read
  captions_{split}.json (required for 'stuff')."""
  kind: str = 'instances'
  splits: tuple = SPLITS
  captions: bool = True


class TraceCoco(B.RealBuilder, skip_registration=__name__ == "__main__"):
  """COCO 2017 captions + instances, and COCO-Stuff (name 'trace_coco')."""

  name = 'trace_coco'
  BUILDER_CONFIGS = [
      CocoConfig(name='instances', kind='instances', description='COCO 2017 captions + instances'),
      CocoConfig(name='stuff', kind='stuff', description='COCO-Stuff stuffthingmaps + captions'),
      # the evaluation sets alone (what `--splits val2017` on the command line also builds)
      CocoConfig(name='instances_val2017', kind='instances', splits=('val2017',),
                 description='COCO 2017 val captions + instances'),
      CocoConfig(name='stuff_val2017', kind='stuff', splits=('val2017',),
                 description='COCO-Stuff val2017 stuffthingmaps + captions'),
  ]
  DEFAULT_CONFIG_NAME = 'instances'
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  code_path = epath.Path(__file__)

  def _info(self):
    f = {
        'image': B.IMAGE_BYTES(), 'image_id': tfds.features.Scalar(np.int64),
        'file_name': tfds.features.Text(), 'height': tfds.features.Scalar(np.int32),
        'width': tfds.features.Scalar(np.int32), 'captions': B.texts(),
    }
    if self.builder_config.kind == 'instances':
      f.update({
          'ann_id': B.ints(None, dtype=np.int64), 'category_id': B.ints(None),
          'category': B.texts(), 'boxes': B.floats(None, 4),
          'iscrowd': tfds.features.Tensor(shape=(None,), dtype=np.bool_), 'area': B.floats(None),
          'masks': B.bytes_list(),
      })
    elif self.builder_config.kind == 'stuff':
      f.update({
          'label_map': B.PNG_BYTES(), 'labels': B.ints(None),
          'words': B.texts(), 'word_caption': B.ints(None), 'word_labels': B.ints(None, 2),
      })
    else:
      raise ValueError(f"unknown kind {self.builder_config.kind!r}; expected 'instances' or 'stuff'")
    md = self._metadata()
    md['cocostuff_names'] = list(COCOSTUFF_NAMES)
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=tfds.features.FeaturesDict(f), disable_shuffling=True,
                                 metadata=md)

  def _split_generators(self, dl_manager):
    root = self._manual_dir(dl_manager)
    cfg = self.builder_config
    bad = set(cfg.splits) - set(SPLITS)
    if bad:
      raise ValueError(f'unknown COCO splits {sorted(bad)}; expected a subset of {SPLITS}')
    out = {}
    for split in cfg.splits:
      ann = os.path.join(root, 'annotations')
      images = self._load_images(os.path.join(ann, f'instances_{split}.json'))
      captions = (self._load_captions(os.path.join(ann, f'captions_{split}.json'))
                  if cfg.captions or cfg.kind == 'stuff' else {})
      if cfg.kind == 'instances':
        anns, cats = self._load_instances(os.path.join(ann, f'instances_{split}.json'))
        self.info.metadata['categories'] = {str(k): v for k, v in sorted(cats.items())}
        out[split] = self._gen_instances(root, split, images, captions, anns, cats)
      else:
        maps = R.require_dir(os.path.join(root, 'stuffthingmaps_trainval2017', split),
                             'COCO-Stuff stuffthingmaps PNGs')
        out[split] = self._gen_stuff(root, split, images, captions, maps)
    return out

  # ---- annotation files
  def _load_images(self, path):
    js = R.load_json(path, 'COCO instances: images / annotations / categories')
    images = {}
    for i, im in enumerate(R.get_list(js, 'images', path)):
      w = f'images[{i}]'
      images[R.get(im, 'id', path, w, int)] = dict(
          file_name=R.get(im, 'file_name', path, w, str), height=R.get(im, 'height', path, w, int),
          width=R.get(im, 'width', path, w, int))
    return images

  def _load_instances(self, path):
    js = R.load_json(path, 'COCO instances')
    cats = {R.get(c, 'id', path, f'categories[{i}]', int): R.get(c, 'name', path, f'categories[{i}]', str)
            for i, c in enumerate(R.get_list(js, 'categories', path))}
    by_image: dict[int, list] = {}
    for i, a in enumerate(R.get_list(js, 'annotations', path)):
      w = f'annotations[{i}]'
      for key in ('id', 'image_id', 'category_id', 'bbox', 'segmentation'):
        R.get(a, key, path, w)
      R.get_box(a, 'bbox', path, w)
      if a['category_id'] not in cats:
        raise R.AnnotationError(path, f'{w}.category_id', f'{a["category_id"]} is not in categories')
      by_image.setdefault(a['image_id'], []).append((i, a))
    return by_image, cats

  def _load_captions(self, path):
    js = R.load_json(path, 'COCO captions')
    caps: dict[int, list[str]] = {}
    for i, a in enumerate(R.get_list(js, 'annotations', path)):
      w = f'annotations[{i}]'
      caps.setdefault(R.get(a, 'image_id', path, w, int), []).append(
          R.get(a, 'caption', path, w, str).strip())
    return caps

  # ---- generators
  def _image(self, root, split, image_id, meta, n_ann):
    path = os.path.join(root, split, meta['file_name'])
    got = R.read_image(path)
    if got is None:
      self._missing(split, path, n_ann)
    return got

  def _gen_instances(self, root, split, images, captions, anns, cats):
    ann_path = os.path.join(root, 'annotations', f'instances_{split}.json')
    self._publish_skips()
    for image_id in sorted(images):
      meta = images[image_id]
      objs = anns.get(image_id, [])
      got = self._image(root, split, image_id, meta, len(objs) + len(captions.get(image_id, [])))
      if got is None:
        continue
      data, h, w = got
      if (h, w) != (meta['height'], meta['width']):
        raise R.AnnotationError(ann_path, f'images[id={image_id}].height/width',
                                f'{meta["height"]}x{meta["width"]} differs from the file ({h}x{w})')
      masks = [M.encode_png(M.coco_segmentation_to_mask(a['segmentation'], h, w, ann_path,
                                                        f'annotations[{i}].segmentation'))
               for i, a in objs]
      yield image_id, {
          'image': data, 'image_id': image_id, 'file_name': meta['file_name'], 'height': h,
          'width': w, 'captions': captions.get(image_id, []),
          'ann_id': np.asarray([a['id'] for _, a in objs], np.int64),
          'category_id': np.asarray([a['category_id'] for _, a in objs], np.int32),
          'category': [cats[a['category_id']] for _, a in objs],
          'boxes': R.boxes_array([R.xywh_to_xyxy(a['bbox']) for _, a in objs]),
          'iscrowd': np.asarray([bool(a.get('iscrowd', 0)) for _, a in objs], np.bool_),
          'area': np.asarray([float(a.get('area', 0.0)) for _, a in objs], np.float32),
          'masks': np.asarray(masks, dtype=object).reshape(-1),
      }

  def _gen_stuff(self, root, split, images, captions, maps):
    vocab = label_vocabulary()
    self._publish_skips()
    for image_id in sorted(images):
      meta = images[image_id]
      caps = captions.get(image_id, [])
      got = self._image(root, split, image_id, meta, max(1, len(caps)))
      if got is None:
        continue
      data, h, w = got
      png = os.path.join(maps, os.path.splitext(meta['file_name'])[0] + '.png')
      if not os.path.isfile(png):
        self._missing(split, png, max(1, len(caps)), kind='label_map')
        continue
      lab = M.read_label_png(png)
      if lab.shape != (h, w):
        raise R.AnnotationError(png, '<pixels>', f'label map is {lab.shape}, image is {(h, w)}')
      words, word_caption, pairs = [], [], []
      for ci, cap in enumerate(caps):
        ws, ps = ground_caption(cap, vocab)
        pairs += [(len(words) + j, v) for j, v in ps]
        words += ws
        word_caption += [ci] * len(ws)
      present = np.unique(lab)
      yield image_id, {
          'image': data, 'image_id': image_id, 'file_name': meta['file_name'], 'height': h,
          'width': w, 'captions': caps, 'label_map': open(png, 'rb').read(),
          'labels': present[present != UNLABELED].astype(np.int32),
          'words': words, 'word_caption': np.asarray(word_caption, np.int32),
          'word_labels': np.asarray(pairs, np.int32).reshape(-1, 2),
      }


def prepare(manual_dir: str, data_dir: str | None = None, config: str = 'instances', **kw) -> TraceCoco:
  """Builds trace_coco/<config> from manual_dir (e.g. splits=('val2017',))."""
  return B.prepare(TraceCoco, manual_dir, data_dir, config, **kw)


if __name__ == "__main__":
  raise SystemExit(B.main(prepare, 'instances', TraceCoco))
