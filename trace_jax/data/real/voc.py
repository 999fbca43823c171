"""PASCAL VOC 2012 segmentation and PASCAL-Context as a tfds builder `trace_voc`
(MaskInversion class retrieval: one query mask per class present in an image).

manual_dir layout
  config 'voc2012' (VOCtrainval_11-May-2012.tar, unpacked):
    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png        palette PNG: index = class, 255 = void
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt
  configs 'context59' / 'context459' (PASCAL-Context, cs.stanford.edu/~roozbeh/pascal-context, on
  VOC 2010 images):
    VOCdevkit/VOC2010/JPEGImages/<id>.jpg
    VOCdevkit/VOC2010/ImageSets/Main/{train,val}.txt   (4998 / 5105 images: the usual Context split)
    pascal_context/trainval/<id>.mat   (trainval.tar.gz; MATLAB `LabelMap` uint16, 1..459, 0 = none)
    pascal_context/labels.txt          ("<id>: <name>" for the 459 classes)
    pascal_context/59_labels.txt       ("<n>: <name>" for the 59-class subset; context59 only)

Features: `label_map` = PNG of class indices (uint8 for VOC / context59, uint16 for context459),
`labels` = classes present (without background 0 and void 255), `class_names` in metadata.
  voc2012:    0 = background, 1..20 = the VOC classes, 255 = void (object borders), unchanged.
  context459: the official LabelMap unchanged (0 = unlabeled).
  context59:  the 59 classes of 59_labels.txt renumbered 1..59 in file order, everything else 0
              (background), matching names against labels.txt.
Images missing from JPEGImages, or a split id without its label file, are skipped and counted.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from trace_jax.data.real import builder as B
from trace_jax.data.real import masks as M
from trace_jax.data.real import readers as R

VOC_CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
               'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
               'sheep', 'sofa', 'train', 'tvmonitor')
VOID = 255


@dataclasses.dataclass(eq=False)
class VocConfig(tfds.core.BuilderConfig):
  kind: str = 'voc2012'   # 'voc2012' | 'context59' | 'context459'
  splits: tuple = ('train', 'val')


def read_label_list(path: str) -> list[tuple[int, str]]:
  """'<id>: <name>' lines -> [(id, name)]."""
  R.require_file(path, 'PASCAL-Context class list ("<id>: <name>" per line)')
  out = []
  with open(path, encoding='utf-8') as f:
    for ln, line in enumerate(f):
      if not line.strip():
        continue
      if ':' not in line:
        raise R.AnnotationError(path, f'line {ln + 1}', f'expected "<id>: <name>", got {line.strip()!r}')
      i, name = line.split(':', 1)
      try:
        out.append((int(i), name.strip()))
      except ValueError:
        raise R.AnnotationError(path, f'line {ln + 1}', f'id {i!r} is not an integer') from None
  return out


def read_context_mat(path: str) -> np.ndarray:
  """PASCAL-Context <id>.mat -> its `LabelMap` [H, W] integer array."""
  import scipy.io
  try:
    mat = scipy.io.loadmat(path)
  except Exception as e:
    raise R.AnnotationError(path, '<file>', f'not a readable MATLAB file ({e})') from None
  if 'LabelMap' not in mat:
    raise R.AnnotationError(path, 'LabelMap', 'missing')
  return np.asarray(mat['LabelMap']).astype(np.int64)


class TraceVoc(B.RealBuilder, skip_registration=__name__ == "__main__"):
  """PASCAL VOC 2012 and PASCAL-Context semantic segmentation (name 'trace_voc')."""

  name = 'trace_voc'
  BUILDER_CONFIGS = [VocConfig(name='voc2012', kind='voc2012', description='VOC 2012 SegmentationClass'),
                     VocConfig(name='context59', kind='context59', description='PASCAL-Context 59 classes'),
                     VocConfig(name='context459', kind='context459', description='PASCAL-Context full')]
  DEFAULT_CONFIG_NAME = 'voc2012'
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  code_path = epath.Path(__file__)

  def _info(self):
    f = tfds.features.FeaturesDict({
        'image': B.IMAGE_BYTES(), 'image_id': tfds.features.Text(),
        'height': tfds.features.Scalar(np.int32), 'width': tfds.features.Scalar(np.int32),
        'label_map': B.PNG_BYTES(), 'labels': B.ints(None),
    })
    md = self._metadata()
    if self.builder_config.kind == 'voc2012':
      md['class_names'] = list(VOC_CLASSES)
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=f,
                                 disable_shuffling=True, metadata=md)

  def _split_generators(self, dl_manager):
    root = self._manual_dir(dl_manager)
    kind = self.builder_config.kind
    if kind == 'voc2012':
      base = os.path.join(root, 'VOCdevkit', 'VOC2012')
      sets = os.path.join(base, 'ImageSets', 'Segmentation')
      R.require_dir(os.path.join(base, 'SegmentationClass'), 'VOC2012 SegmentationClass PNGs')
      lut = None
    elif kind in ('context59', 'context459'):
      base = os.path.join(root, 'VOCdevkit', 'VOC2010')
      sets = os.path.join(base, 'ImageSets', 'Main')
      ctx = os.path.join(root, 'pascal_context')
      R.require_dir(os.path.join(ctx, 'trainval'), 'PASCAL-Context trainval/*.mat')
      full = read_label_list(os.path.join(ctx, 'labels.txt'))
      if kind == 'context459':
        names = ['unlabeled'] + [''] * max(i for i, _ in full)
        for i, n in full:
          names[i] = n
        lut = None
      else:
        sub = read_label_list(os.path.join(ctx, '59_labels.txt'))
        by_name = {n: i for i, n in full}
        lut = np.zeros(max(by_name.values()) + 1, np.int64)
        names = ['background']
        for k, (_, n) in enumerate(sub):
          if n not in by_name:
            raise R.AnnotationError(os.path.join(ctx, '59_labels.txt'), f'class {n!r}',
                                    'not found in labels.txt')
          lut[by_name[n]] = k + 1
          names.append(n)
      self.info.metadata['class_names'] = names
    else:
      raise ValueError(f"unknown kind {kind!r}; expected 'voc2012', 'context59' or 'context459'")
    out = {}
    for split in self.builder_config.splits:
      lst = R.require_file(os.path.join(sets, f'{split}.txt'), f'{split} image id list')
      with open(lst) as f:
        ids = [t.split()[0] for t in f if t.strip()]
      out[split] = self._generate_examples(root, base, split, ids, lut)
    return out

  def _generate_examples(self, root, base, split, ids, lut):
    kind = self.builder_config.kind
    self._publish_skips()
    for image_id in ids:
      if kind == 'voc2012':
        lab_path = os.path.join(base, 'SegmentationClass', f'{image_id}.png')
      else:
        lab_path = os.path.join(root, 'pascal_context', 'trainval', f'{image_id}.mat')
      if not os.path.isfile(lab_path):
        self._missing(split, lab_path, 1, kind='label_map')
        continue
      path = os.path.join(base, 'JPEGImages', f'{image_id}.jpg')
      got = R.read_image(path)
      if got is None:
        self._missing(split, path, 1)
        continue
      data, h, w = got
      if kind == 'voc2012':
        lab = M.read_label_png(lab_path).astype(np.int64)
      else:
        lab = read_context_mat(lab_path)
        if lut is not None:
          if lab.size and lab.max() >= len(lut):
            raise R.AnnotationError(lab_path, 'LabelMap', f'class {lab.max()} not in labels.txt')
          lab = lut[lab]
      if lab.shape != (h, w):
        raise R.AnnotationError(lab_path, '<pixels>', f'label map is {lab.shape}, image is {(h, w)}')
      present = np.unique(lab)
      present = present[(present != 0) & (present != VOID if kind != 'context459' else True)]
      yield image_id, {
          'image': data, 'image_id': image_id, 'height': h, 'width': w,
          'label_map': M.encode_png(lab.astype(np.uint16 if kind == 'context459' else np.uint8)),
          'labels': present.astype(np.int32),
      }


def prepare(manual_dir: str, data_dir: str | None = None, config: str = 'voc2012', **kw):
  return B.prepare(TraceVoc, manual_dir, data_dir, config, **kw)


if __name__ == "__main__":
  raise SystemExit(B.main(prepare, 'voc2012', TraceVoc))
