"""Visual Genome -> AMC training triplets (image, prompt, box) as a tfds builder
`trace_visual_genome` (AMC paper §4.1; notes/amc-and-local-alignment.md §4).

manual_dir layout (official VG v1.2 / v1.4 release files, unzipped):
  image_data.json  objects.json  attributes.json  region_descriptions.json
  VG_100K/<image_id>.jpg  VG_100K_2/<image_id>.jpg    (images.zip, images2.zip)

One example per image with every prompt built for it (`prompts`, `boxes`, `kind`):
  kind 0 'region':    a region description (`phrase`) with its region box.
  kind 1 'object':    a box from objects.json described by the prompt template
                      "a <attr_1> ... <attr_k> <name>" (article "an" before a vowel), attributes
                      from attributes.json (same object_id; first `max_attributes`, de-duplicated,
                      in file order), e.g. dog + brown -> "a brown dog" (the paper's example).
  kind 2 'spatial':   for an object name with more than one (kept) box in the image: the leftmost box
                      (smallest centre x) -> "<name> on the left", the rightmost -> "<name> on the
                      right", the top (smallest centre y) -> "top <name>", the bottom -> "bottom
                      <name>"; and a box whose centre lies in a corner cell (outer thirds of both
                      axes) additionally -> "top left <name>", "top right <name>", "bottom left
                      <name>", "bottom right <name>".
  Boxes smaller than `min_area_frac` (8 %) of the image area are dropped before anything else (AMC
  §4.1: "We filter out bounding boxes smaller than 8% of the whole image").
The paper gives only the example and the spatial words: the exact templates, attribute count, which
box counts as "top" and the corner rule are our documented choices. The authors' pre-processed JSONs
(`vg_attributes_spatial.json` etc.) are not public.
  boxes: VG x, y, w, h (pixels) -> [x, y, x + w, y + h], clipped to the image.
  Split: VG has no official split; everything goes to 'train' (AMC trains on it; Flickr30k / RefCOCO
  are the evaluation sets). `exclude_image_ids` can list images to leave out (e.g. overlaps).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from trace_jax.data.real import builder as B
from trace_jax.data.real import readers as R

KINDS = ('region', 'object', 'spatial')
IMAGE_DIRS = ('VG_100K', 'VG_100K_2')


@dataclasses.dataclass(eq=False)
class VGConfig(tfds.core.BuilderConfig):
  min_area_frac: float = 0.08
  regions: bool = True
  objects: bool = True
  spatial: bool = True
  max_attributes: int = 1
  exclude_image_ids: tuple = ()


def _article(text: str) -> str:
  return 'an' if text[:1].lower() in 'aeiou' else 'a'


def object_prompt(name: str, attributes=()) -> str:
  """'a brown dog' from ('dog', ['brown']); 'an apple' from ('apple', [])."""
  words = ' '.join([a.strip() for a in attributes if a.strip()] + [name.strip()])
  return f'{_article(words)} {words}'


def spatial_prompts(name: str, boxes: np.ndarray, width: int, height: int) -> list[tuple[int, str]]:
  """(box index, prompt) for the boxes [N, 4] (xyxy) of one object name in one image (N > 1)."""
  if len(boxes) < 2:
    return []
  cx = (boxes[:, 0] + boxes[:, 2]) / 2
  cy = (boxes[:, 1] + boxes[:, 3]) / 2
  out = [(int(np.argmin(cx)), f'{name} on the left'), (int(np.argmax(cx)), f'{name} on the right'),
         (int(np.argmin(cy)), f'top {name}'), (int(np.argmax(cy)), f'bottom {name}')]
  for i in range(len(boxes)):
    v = 'top' if cy[i] < height / 3 else 'bottom' if cy[i] > 2 * height / 3 else None
    h = 'left' if cx[i] < width / 3 else 'right' if cx[i] > 2 * width / 3 else None
    if v and h:
      out.append((i, f'{v} {h} {name}'))
  return out


def _xyxy(o, path, where, width, height):
  for k in ('x', 'y', 'w', 'h'):
    v = R.get(o, k, path, where)
    if not isinstance(v, (int, float)):
      raise R.AnnotationError(path, f'{where}.{k}', f'expected a number, got {v!r}')
  x0, y0, x1, y1 = R.xywh_to_xyxy([o['x'], o['y'], o['w'], o['h']])
  return [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]


def _region_xyxy(r, path, where, width, height):
  q = dict(x=R.get(r, 'x', path, where), y=R.get(r, 'y', path, where),
           w=R.get(r, 'width', path, where), h=R.get(r, 'height', path, where))
  return _xyxy(q, path, where, width, height)


class TraceVisualGenome(B.RealBuilder, skip_registration=__name__ == "__main__"):
  """Visual Genome AMC triplets (name 'trace_visual_genome')."""

  name = 'trace_visual_genome'
  BUILDER_CONFIGS = [VGConfig(name='amc', description='AMC §4.1 triplets: regions, objects+attributes, spatial'),
                     VGConfig(name='amc_boxes', regions=False,
                              description='AMC* : object boxes + attributes (+ spatial) only')]
  DEFAULT_CONFIG_NAME = 'amc'
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  code_path = epath.Path(__file__)

  def _info(self):
    f = tfds.features.FeaturesDict({
        'image': B.IMAGE_BYTES(), 'image_id': tfds.features.Scalar(np.int64),
        'height': tfds.features.Scalar(np.int32), 'width': tfds.features.Scalar(np.int32),
        'prompts': B.texts(), 'boxes': B.floats(None, 4), 'kind': B.ints(None),
        'source_id': B.ints(None, dtype=np.int64),
    })
    md = self._metadata()
    md['kinds'] = list(KINDS)
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=f,
                                 disable_shuffling=True, metadata=md)

  def _split_generators(self, dl_manager):
    root = self._manual_dir(dl_manager)
    self._root = root
    cfg = self.builder_config
    p = os.path.join(root, 'image_data.json')
    images = {}
    for i, im in enumerate(self._as_list(R.load_json(p, 'VG image metadata'), p)):
      w = f'[{i}]'
      iid = im.get('image_id', im.get('id')) if isinstance(im, dict) else None
      if not isinstance(iid, int):
        raise R.AnnotationError(p, f'{w}.image_id', 'missing or not an integer')
      images[iid] = dict(width=R.get(im, 'width', p, w, int), height=R.get(im, 'height', p, w, int),
                         url=im.get('url', ''))
    objects, attrs, regions = {}, {}, {}
    if cfg.objects:
      p = os.path.join(root, 'objects.json')
      for i, e in enumerate(self._as_list(R.load_json(p, 'VG objects'), p)):
        objects[self._image_id(e, p, f'[{i}]')] = (i, R.get_list(e, 'objects', p, f'[{i}]'))
      p = os.path.join(root, 'attributes.json')
      for i, e in enumerate(self._as_list(R.load_json(p, 'VG attributes'), p)):
        for j, o in enumerate(R.get_list(e, 'attributes', p, f'[{i}]')):
          oid = o.get('object_id', o.get('id')) if isinstance(o, dict) else None
          if oid is None:
            raise R.AnnotationError(p, f'[{i}].attributes[{j}].object_id', 'missing')
          attrs[oid] = [str(a) for a in (o.get('attributes') or [])]
    if cfg.regions:
      p = os.path.join(root, 'region_descriptions.json')
      for i, e in enumerate(self._as_list(R.load_json(p, 'VG region descriptions'), p)):
        regions[self._image_id(e, p, f'[{i}]')] = (i, R.get_list(e, 'regions', p, f'[{i}]'))
    return {'train': self._generate_examples(root, images, objects, attrs, regions)}

  @staticmethod
  def _as_list(js, path):
    if not isinstance(js, list):
      raise R.AnnotationError(path, '<root>', f'expected a list, got {type(js).__name__}')
    return js

  @staticmethod
  def _image_id(e, path, where):
    iid = e.get('image_id', e.get('id')) if isinstance(e, dict) else None
    if not isinstance(iid, int):
      raise R.AnnotationError(path, f'{where}.image_id', 'missing or not an integer')
    return iid

  def _image_path(self, root, image_id, url):
    cands = ([os.path.join(root, os.path.basename(os.path.dirname(url)), os.path.basename(url))]
             if url else [])
    cands += [os.path.join(root, d, f'{image_id}.jpg') for d in IMAGE_DIRS]
    return next((c for c in cands if os.path.isfile(c)), cands[0])

  def triplets(self, image_id, width, height, objects, attrs, regions):
    """[(prompt, xyxy box, kind, source id)] of one image, after the area filter."""
    cfg = self.builder_config
    min_area = cfg.min_area_frac * width * height
    out = []
    if image_id in regions:
      i, rs = regions[image_id]
      p = os.path.join(self._root, 'region_descriptions.json')
      for j, r in enumerate(rs):
        w = f'[{i}].regions[{j}]'
        b = _region_xyxy(r, p, w, width, height)
        if (b[2] - b[0]) * (b[3] - b[1]) >= min_area:
          out.append((str(R.get(r, 'phrase', p, w, str)).strip(), b, 0,
                      int(r.get('region_id', r.get('id', -1)))))
    if image_id in objects:
      i, objs = objects[image_id]
      p = os.path.join(self._root, 'objects.json')
      by_name: dict[str, list] = {}
      for j, o in enumerate(objs):
        w = f'[{i}].objects[{j}]'
        names = o.get('names', [o['name']] if 'name' in o else None) if isinstance(o, dict) else None
        if not names:
          raise R.AnnotationError(p, f'{w}.names', 'missing or empty')
        name = str(names[0]).strip().lower()
        b = _xyxy(o, p, w, width, height)
        if (b[2] - b[0]) * (b[3] - b[1]) < min_area:
          continue
        oid = int(o.get('object_id', o.get('id', -1)))
        a = list(dict.fromkeys(t.strip().lower() for t in attrs.get(oid, []) if t.strip()))
        out.append((object_prompt(name, a[:cfg.max_attributes]), b, 1, oid))
        by_name.setdefault(name, []).append((b, oid))
      if cfg.spatial:
        for name, lst in by_name.items():
          boxes = np.asarray([b for b, _ in lst], np.float64)
          for k, prompt in spatial_prompts(name, boxes, width, height):
            out.append((prompt, lst[k][0], 2, lst[k][1]))
    return out

  def _generate_examples(self, root, images, objects, attrs, regions):
    self._publish_skips()
    skip = set(self.builder_config.exclude_image_ids)
    for image_id in sorted(images):
      if image_id in skip:
        continue
      meta = images[image_id]
      trip = self.triplets(image_id, meta['width'], meta['height'], objects, attrs, regions)
      path = self._image_path(root, image_id, meta['url'])
      got = R.read_image(path)
      if got is None:
        self._missing('train', path, max(1, len(trip)))
        continue
      data, h, w = got
      if (h, w) != (meta['height'], meta['width']):
        # VG image_data.json sizes are those of the released files; a mismatch means a wrong file.
        raise R.AnnotationError(os.path.join(root, 'image_data.json'), f'image_id={image_id}.width/height',
                                f'{meta["width"]}x{meta["height"]} differs from the file ({w}x{h})')
      if not trip:
        continue
      yield image_id, {
          'image': data, 'image_id': image_id, 'height': h, 'width': w,
          'prompts': [t[0] for t in trip], 'boxes': R.boxes_array([t[1] for t in trip]),
          'kind': np.asarray([t[2] for t in trip], np.int32),
          'source_id': np.asarray([t[3] for t in trip], np.int64),
      }


def prepare(manual_dir: str, data_dir: str | None = None, config: str = 'amc', **kw):
  return B.prepare(TraceVisualGenome, manual_dir, data_dir, config, **kw)


if __name__ == "__main__":
  raise SystemExit(B.main(prepare, 'amc', TraceVisualGenome))
