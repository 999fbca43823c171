"""RefCOCO / RefCOCO+ / RefCOCOg (REFER toolkit format) as a tfds builder `trace_refcoco`.

manual_dir layout (the REFER toolkit's `data/` folder, lichengunc/refer):
  refcoco/instances.json   refcoco/refs(unc).p   refcoco/refs(google).p
  refcoco+/instances.json  refcoco+/refs(unc).p
  refcocog/instances.json  refcocog/refs(umd).p  refcocog/refs(google).p
  images/mscoco/images/train2014/COCO_train2014_000000xxxxxx.jpg   (or train2014/ at the top)

Configs: 'refcoco_unc', 'refcoco_google', 'refcoco+_unc' (named 'refcocoplus_unc'), 'refcocog_umd',
'refcocog_google'. Splits are the refs' own `split` values: unc -> train, val, testA, testB;
umd -> train, val, test; google -> train, val (+ test for refcoco).

One example per (split, image): ALL COCO instances of the image from instances.json (the candidate
masks of MaskInversion's referring-expression retrieval) and the refs of that split on it
(AMC pointing game: one query per sentence, GT box = the ref's annotation box).
  boxes: REFER/COCO `bbox` [x, y, w, h] -> [x, y, x + w, y + h]. AMC's pointing game tests the point
    strictly inside (x1 < x < x1 + w, y1 < y < y1 + h) on the ORIGINAL box (notes/amc-and-local-
    alignment.md §7) — the same open box in this convention.
  masks: instance `segmentation` (polygons / RLE) -> 0/1 PNG (common.coco_segmentation_to_mask).
  refs: ref_id, ann_id, the index of its annotation among the image's objects (`ref_object`),
    category_id; sentences flattened: `sentences` (the REFER `sent` field: lower-cased, tokenised),
    `sentences_raw` (`raw`), `sentence_ref` (index into the refs), `sent_id`.
"""
from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from trace_jax.data.real import builder as B
from trace_jax.data.real import masks as M
from trace_jax.data.real import readers as R

DATASETS = {  # config name -> (folder, splitBy)
    'refcoco_unc': ('refcoco', 'unc'), 'refcoco_google': ('refcoco', 'google'),
    'refcocoplus_unc': ('refcoco+', 'unc'), 'refcocog_umd': ('refcocog', 'umd'),
    'refcocog_google': ('refcocog', 'google'),
}
IMAGE_DIRS = (os.path.join('images', 'mscoco', 'images', 'train2014'), 'train2014')


@dataclasses.dataclass(eq=False)
class RefConfig(tfds.core.BuilderConfig):
  dataset: str = 'refcoco'
  split_by: str = 'unc'


def load_refs(path: str) -> list[dict]:
  """The REFER refs pickle (written by Python 2: latin1 for its byte strings)."""
  R.require_file(path, 'REFER refs pickle')
  try:
    with open(path, 'rb') as f:
      refs = pickle.load(f, encoding='latin1')
  except Exception as e:  # UnpicklingError, EOFError, ...
    raise R.AnnotationError(path, '<file>', f'not a readable pickle ({e})') from None
  if not isinstance(refs, list):
    raise R.AnnotationError(path, '<root>', f'expected a list of refs, got {type(refs).__name__}')
  for i, r in enumerate(refs):
    w = f'refs[{i}]'
    for key, t in (('ref_id', int), ('ann_id', int), ('image_id', int), ('split', str),
                   ('sentences', list), ('category_id', int)):
      R.get(r, key, path, w, t)
    for j, s in enumerate(r['sentences']):
      R.get(s, 'sent', path, f'{w}.sentences[{j}]', str)
  return refs


class TraceRefcoco(B.RealBuilder, skip_registration=__name__ == "__main__"):
  """RefCOCO / RefCOCO+ / RefCOCOg (name 'trace_refcoco')."""

  name = 'trace_refcoco'
  BUILDER_CONFIGS = [RefConfig(name=n, dataset=d, split_by=s, description=f'{d} ({s} splits)')
                     for n, (d, s) in DATASETS.items()]
  DEFAULT_CONFIG_NAME = 'refcoco_unc'
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  code_path = epath.Path(__file__)

  def _info(self):
    f = tfds.features.FeaturesDict({
        'image': B.IMAGE_BYTES(), 'image_id': tfds.features.Scalar(np.int64),
        'file_name': tfds.features.Text(), 'height': tfds.features.Scalar(np.int32),
        'width': tfds.features.Scalar(np.int32),
        # all COCO instances of the image
        'ann_id': B.ints(None, dtype=np.int64), 'category_id': B.ints(None),
        'boxes': B.floats(None, 4), 'masks': B.bytes_list(),
        # refs of this split on the image
        'ref_id': B.ints(None, dtype=np.int64), 'ref_ann_id': B.ints(None, dtype=np.int64),
        'ref_object': B.ints(None), 'ref_category_id': B.ints(None), 'ref_boxes': B.floats(None, 4),
        'sentences': B.texts(), 'sentences_raw': B.texts(), 'sentence_ref': B.ints(None),
        'sent_id': B.ints(None, dtype=np.int64),
    })
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=f,
                                 disable_shuffling=True, metadata=self._metadata())

  def _split_generators(self, dl_manager):
    root = self._manual_dir(dl_manager)
    cfg = self.builder_config
    folder = os.path.join(root, cfg.dataset)
    refs_path = os.path.join(folder, f'refs({cfg.split_by}).p')
    inst_path = os.path.join(folder, 'instances.json')
    refs = load_refs(refs_path)
    js = R.load_json(inst_path, f'{cfg.dataset} COCO instances (images, annotations, categories)')
    images = {}
    for i, im in enumerate(R.get_list(js, 'images', inst_path)):
      w = f'images[{i}]'
      images[R.get(im, 'id', inst_path, w, int)] = (R.get(im, 'file_name', inst_path, w, str),
                                                    R.get(im, 'height', inst_path, w, int),
                                                    R.get(im, 'width', inst_path, w, int))
    anns_by_image: dict[int, list] = {}
    ann_index = {}
    for i, a in enumerate(R.get_list(js, 'annotations', inst_path)):
      w = f'annotations[{i}]'
      for key in ('id', 'image_id', 'category_id', 'segmentation'):
        R.get(a, key, inst_path, w)
      R.get_box(a, 'bbox', inst_path, w)
      anns_by_image.setdefault(a['image_id'], []).append((i, a))
      ann_index[a['id']] = a
    for i, r in enumerate(refs):
      if r['ann_id'] not in ann_index:
        raise R.AnnotationError(refs_path, f'refs[{i}].ann_id', f'{r["ann_id"]} not in {inst_path}')
      if r['image_id'] not in images:
        raise R.AnnotationError(refs_path, f'refs[{i}].image_id', f'{r["image_id"]} not in {inst_path}')
      if ann_index[r['ann_id']]['image_id'] != r['image_id']:
        raise R.AnnotationError(refs_path, f'refs[{i}].ann_id', f'annotation {r["ann_id"]} belongs to '
                                f'image {ann_index[r["ann_id"]]["image_id"]}, not {r["image_id"]}')
    image_dir = next((os.path.join(root, d) for d in IMAGE_DIRS if os.path.isdir(os.path.join(root, d))),
                     None)
    if image_dir is None:
      R.require_dir(os.path.join(root, IMAGE_DIRS[0]), 'COCO train2014 images')
    groups: dict[str, dict[int, list]] = {}
    for r in refs:
      groups.setdefault(r['split'], {}).setdefault(r['image_id'], []).append(r)
    return {split: self._generate_examples(split, groups[split], images, anns_by_image, image_dir,
                                           inst_path)
            for split in sorted(groups)}

  def _generate_examples(self, split, by_image, images, anns_by_image, image_dir, inst_path):
    self._publish_skips()
    for image_id in sorted(by_image):
      refs = sorted(by_image[image_id], key=lambda r: r['ref_id'])
      file_name, h0, w0 = images[image_id]
      path = os.path.join(image_dir, file_name)
      got = R.read_image(path)
      if got is None:
        self._missing(split, path, len(refs))
        continue
      data, h, w = got
      if (h, w) != (h0, w0):
        raise R.AnnotationError(inst_path, f'images[id={image_id}].height/width',
                                f'{h0}x{w0} differs from the file ({h}x{w})')
      objs = anns_by_image.get(image_id, [])
      pos = {a['id']: k for k, (_, a) in enumerate(objs)}
      sentences, raw, sent_ref, sent_id = [], [], [], []
      for k, r in enumerate(refs):
        for s in r['sentences']:
          sentences.append(s['sent'])
          raw.append(s.get('raw', s['sent']))
          sent_ref.append(k)
          sent_id.append(int(s.get('sent_id', -1)))
      yield f'{image_id}', {
          'image': data, 'image_id': image_id, 'file_name': file_name, 'height': h, 'width': w,
          'ann_id': np.asarray([a['id'] for _, a in objs], np.int64),
          'category_id': np.asarray([a['category_id'] for _, a in objs], np.int32),
          'boxes': R.boxes_array([R.xywh_to_xyxy(a['bbox']) for _, a in objs]),
          'masks': np.asarray([M.encode_png(M.coco_segmentation_to_mask(
              a['segmentation'], h, w, inst_path, f'annotations[{i}].segmentation'))
              for i, a in objs], dtype=object).reshape(-1),
          'ref_id': np.asarray([r['ref_id'] for r in refs], np.int64),
          'ref_ann_id': np.asarray([r['ann_id'] for r in refs], np.int64),
          'ref_object': np.asarray([pos[r['ann_id']] for r in refs], np.int32),
          'ref_category_id': np.asarray([r['category_id'] for r in refs], np.int32),
          'ref_boxes': R.boxes_array([R.xywh_to_xyxy(objs[pos[r['ann_id']]][1]['bbox']) for r in refs]),
          'sentences': sentences, 'sentences_raw': raw,
          'sentence_ref': np.asarray(sent_ref, np.int32), 'sent_id': np.asarray(sent_id, np.int64),
      }


def prepare(manual_dir: str, data_dir: str | None = None, config: str = 'refcoco_unc', **kw) -> TraceRefcoco:
  return B.prepare(TraceRefcoco, manual_dir, data_dir, config, **kw)


if __name__ == "__main__":
  raise SystemExit(B.main(prepare, 'refcoco_unc', TraceRefcoco))
