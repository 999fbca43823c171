"""Flickr30k Entities (BryanPlummer/flickr30k_entities) as a tfds builder `trace_flickr30k_entities`.

manual_dir layout (the official repository's annotations.zip unzipped, its split lists, and the
Flickr30k images):
  Annotations/<image_id>.xml     Sentences/<image_id>.txt
  train.txt  val.txt  test.txt   (one image id per line)
  flickr30k-images/<image_id>.jpg

One example per image: its 5 sentences and every phrase with its entity id and types, and the
boxes of every entity (several boxes per entity are common: "two men" -> 2 boxes).
  Sentences markup `[/EN#<entity_id>/<type>[/<type>...] words of the phrase]` is parsed like the
    official `flickr30k_entities_utils.get_sentence_data` (phrase text, first-word index, id, types).
  Boxes: the XML `<bndbox>` xmin/ymin/xmax/ymax are 1-based inclusive pixel indices (the official
    utils subtract 1 to get 0-based inclusive); in our continuous convention that pixel range is
    [xmin - 1, ymin - 1, xmax, ymax].
  `phrase_has_box`: the entity has >= 1 box (AMC's pointing game evaluates exactly those phrases; a hit
    is a point strictly inside ANY of the entity's boxes, notes/amc-and-local-alignment.md §7).
  Entity categories (AMC table 4): `phrase_type` = the first type; `phrase_types` = all, '/'-joined.
    The official types: people, clothing, bodyparts, animals, vehicles, instruments, scene, other,
    notvisual.
"""
from __future__ import annotations

import dataclasses
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from trace_jax.data.real import builder as B
from trace_jax.data.real import readers as R

SPLITS = ('train', 'val', 'test')
CATEGORIES = ('people', 'clothing', 'bodyparts', 'animals', 'vehicles', 'instruments', 'scene',
              'other', 'notvisual')


def parse_sentences(path: str) -> list[dict]:
  """Sentences/<id>.txt -> [{'sentence', 'phrases': [{'first_word_index', 'phrase', 'phrase_id',
  'phrase_type': [types]}]}] (as flickr30k_entities_utils.get_sentence_data)."""
  R.require_file(path, 'Flickr30k Entities sentences')
  with open(path, encoding='utf-8') as f:
    lines = f.read().split('\n')
  out = []
  for ln, line in enumerate(lines):
    if not line.strip():
      continue
    words, phrases = [], []
    current, inside = None, False
    for token in line.split():
      if inside:
        end = token.endswith(']')
        tok = token[:-1] if end else token
        current['words'].append(tok)
        words.append(tok)
        if end:
          inside = False
          current['phrase'] = ' '.join(current.pop('words'))
          phrases.append(current)
      elif token.startswith('[/EN#'):
        parts = token.split('/')
        m = re.fullmatch(r'EN#(\d+)', parts[1]) if len(parts) >= 3 else None
        if m is None:
          raise R.AnnotationError(path, f'line {ln + 1}', f'malformed entity tag {token!r}')
        current = {'first_word_index': len(words), 'phrase_id': int(m.group(1)),
                   'phrase_type': parts[2:], 'words': []}
        inside = True
      else:
        words.append(token)
    if inside:
      raise R.AnnotationError(path, f'line {ln + 1}', 'unterminated [/EN#...] phrase')
    out.append({'sentence': ' '.join(words), 'phrases': phrases})
  return out


def parse_annotation(path: str) -> dict:
  """Annotations/<id>.xml -> {'width', 'height', 'boxes': {entity_id: [[xmin, ymin, xmax, ymax]]}
  (raw XML values), 'scene': [ids], 'nobox': [ids]}."""
  R.require_file(path, 'Flickr30k Entities annotation XML')
  try:
    root = ET.parse(path).getroot()
  except ET.ParseError as e:
    raise R.AnnotationError(path, '<file>', f'not valid XML ({e})') from None
  size = root.find('size')
  if size is None:
    raise R.AnnotationError(path, 'size', 'missing')
  info = {'boxes': {}, 'scene': [], 'nobox': []}
  for key in ('width', 'height'):
    el = size.find(key)
    if el is None or not (el.text or '').strip().isdigit():
      raise R.AnnotationError(path, f'size.{key}', 'missing or not an integer')
    info[key] = int(el.text)
  for k, obj in enumerate(root.findall('object')):
    names = obj.findall('name')
    if not names:
      raise R.AnnotationError(path, f'object[{k}].name', 'missing')
    box = obj.find('bndbox')
    for name in names:
      eid = int(name.text)
      if box is not None:
        vals = []
        for key in ('xmin', 'ymin', 'xmax', 'ymax'):
          el = box.find(key)
          try:
            vals.append(float(el.text))
          except (AttributeError, TypeError, ValueError):
            raise R.AnnotationError(path, f'object[{k}].bndbox.{key}', 'missing or not a number') from None
        info['boxes'].setdefault(eid, []).append(vals)
      else:
        if int(getattr(obj.find('nobndbox'), 'text', 0) or 0) > 0:
          info['nobox'].append(eid)
        if int(getattr(obj.find('scene'), 'text', 0) or 0) > 0:
          info['scene'].append(eid)
  return info


@dataclasses.dataclass(eq=False)
class FlickrConfig(tfds.core.BuilderConfig):
  splits: tuple = SPLITS


class TraceFlickr30kEntities(B.RealBuilder, skip_registration=__name__ == "__main__"):
  """Flickr30k Entities (name 'trace_flickr30k_entities')."""

  name = 'trace_flickr30k_entities'
  BUILDER_CONFIGS = [FlickrConfig(name='default', description='sentences, phrases, entity boxes')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  code_path = epath.Path(__file__)

  def _info(self):
    f = tfds.features.FeaturesDict({
        'image': B.IMAGE_BYTES(), 'image_id': tfds.features.Text(),
        'height': tfds.features.Scalar(np.int32), 'width': tfds.features.Scalar(np.int32),
        'sentences': B.texts(),
        'phrases': B.texts(), 'phrase_sentence': B.ints(None), 'phrase_first_word': B.ints(None),
        'phrase_entity': B.ints(None), 'phrase_type': B.texts(), 'phrase_types': B.texts(),
        'phrase_has_box': tfds.features.Tensor(shape=(None,), dtype=np.bool_),
        'boxes': B.floats(None, 4), 'box_entity': B.ints(None),
        'scene_entities': B.ints(None), 'nobox_entities': B.ints(None),
    })
    md = self._metadata()
    md['categories'] = list(CATEGORIES)
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=f,
                                 disable_shuffling=True, metadata=md)

  def _split_generators(self, dl_manager):
    root = self._manual_dir(dl_manager)
    R.require_dir(os.path.join(root, 'Annotations'), 'Flickr30k Entities Annotations/*.xml')
    R.require_dir(os.path.join(root, 'Sentences'), 'Flickr30k Entities Sentences/*.txt')
    out = {}
    for split in self.builder_config.splits:
      lst = R.require_file(os.path.join(root, f'{split}.txt'), f'Flickr30k Entities {split} image ids')
      with open(lst) as f:
        ids = [t.strip() for t in f if t.strip()]
      out[split] = self._generate_examples(root, split, ids)
    return out

  def _generate_examples(self, root, split, ids):
    self._publish_skips()
    for image_id in ids:
      sents = parse_sentences(os.path.join(root, 'Sentences', f'{image_id}.txt'))
      ann_path = os.path.join(root, 'Annotations', f'{image_id}.xml')
      ann = parse_annotation(ann_path)
      path = os.path.join(root, 'flickr30k-images', f'{image_id}.jpg')
      got = R.read_image(path)
      if got is None:
        self._missing(split, path, sum(len(s['phrases']) for s in sents))
        continue
      data, h, w = got
      if (h, w) != (ann['height'], ann['width']):
        raise R.AnnotationError(ann_path, 'size', f'{ann["height"]}x{ann["width"]} differs from the '
                                f'image ({h}x{w})')
      phrases = [(si, p) for si, s in enumerate(sents) for p in s['phrases']]
      boxes = [(eid, b) for eid in sorted(ann['boxes']) for b in ann['boxes'][eid]]
      yield image_id, {
          'image': data, 'image_id': image_id, 'height': h, 'width': w,
          'sentences': [s['sentence'] for s in sents],
          'phrases': [p['phrase'] for _, p in phrases],
          'phrase_sentence': np.asarray([si for si, _ in phrases], np.int32),
          'phrase_first_word': np.asarray([p['first_word_index'] for _, p in phrases], np.int32),
          'phrase_entity': np.asarray([p['phrase_id'] for _, p in phrases], np.int32),
          'phrase_type': [p['phrase_type'][0] if p['phrase_type'] else '' for _, p in phrases],
          'phrase_types': ['/'.join(p['phrase_type']) for _, p in phrases],
          'phrase_has_box': np.asarray([p['phrase_id'] in ann['boxes'] for _, p in phrases], np.bool_),
          # 1-based inclusive pixel indices -> continuous [x0, y0, x1, y1]
          'boxes': R.boxes_array([[b[0] - 1, b[1] - 1, b[2], b[3]] for _, b in boxes]),
          'box_entity': np.asarray([e for e, _ in boxes], np.int32),
          'scene_entities': np.asarray(sorted(set(ann['scene'])), np.int32),
          'nobox_entities': np.asarray(sorted(set(ann['nobox'])), np.int32),
      }


def prepare(manual_dir: str, data_dir: str | None = None, config: str = 'default', **kw):
  return B.prepare(TraceFlickr30kEntities, manual_dir, data_dir, config, **kw)


if __name__ == "__main__":
  raise SystemExit(B.main(prepare, 'default', TraceFlickr30kEntities))
