"""MS-CXR (PhysioNet "MS-CXR: local alignment chest X-ray", Boecking et al. 2022) and any CSV in its
layout, as a tfds builder `trace_mscxr` (M2IB localization, paper §4.3).

manual_dir layout
  MS_CXR_Local_Alignment_v1.1.0.csv     (or v1.0.0; the file name is configurable: `csv_name`)
  files/p1x/p1xxxxxxx/sxxxxxxxx/<dicom_id>.jpg   (MIMIC-CXR-JPG images, at the CSV's `path`)

CSV columns (the official MS-CXR header): dicom_id, category_name, label_text, path, x, y, w, h,
image_width, image_height [, split]. Other CSVs can rename them through the config's `columns` map.
One CSV row is one box; rows with the same (path, label_text) form one example with several boxes
(M2IB scores against ALL boxes of a phrase).
  boxes: x, y, w, h are in the pixel frame of (image_width, image_height); if the JPEG on disk has
    another size the box is rescaled to it; then [x, y, x + w, y + h].
  splits: the `split` column's values (v1.1.0: train / val / test); without that column everything
    is in split 'test' (v1.0.0 has no split; M2IB samples its evaluation pairs from the whole set).
"""
from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from trace_jax.data.real import builder as B
from trace_jax.data.real import readers as R

COLUMNS = dict(image_id='dicom_id', category='category_name', text='label_text', path='path',
               x='x', y='y', w='w', h='h', image_width='image_width', image_height='image_height',
               split='split')
REQUIRED = ('text', 'path', 'x', 'y', 'w', 'h')


@dataclasses.dataclass(eq=False)
class MsCxrConfig(tfds.core.BuilderConfig):
  csv_name: str = 'MS_CXR_Local_Alignment_v1.1.0.csv'
  columns: dict = dataclasses.field(default_factory=lambda: dict(COLUMNS))
  image_root: str = ''     # relative to manual_dir; the CSV `path` is appended
  default_split: str = 'test'


def read_rows(path: str, columns: dict) -> list[dict]:
  """CSV rows with our field names; AnnotationError names the file, the column and the line."""
  R.require_file(path, 'MS-CXR style CSV (image path, text, box)')
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    for k in REQUIRED:
      if columns[k] not in header:
        raise R.AnnotationError(path, columns[k], f'column missing (header: {header})')
    rows = []
    for ln, r in enumerate(reader, start=2):
      row = {k: r.get(c) for k, c in columns.items() if c in header}
      for k in ('x', 'y', 'w', 'h', 'image_width', 'image_height'):
        if k in row:
          try:
            row[k] = float(row[k])
          except (TypeError, ValueError):
            raise R.AnnotationError(path, f'{columns[k]} (line {ln})', f'not a number: {row[k]!r}') from None
      rows.append(row)
  return rows


class TraceMsCxr(B.RealBuilder, skip_registration=__name__ == "__main__"):
  """MS-CXR phrase grounding (name 'trace_mscxr')."""

  name = 'trace_mscxr'
  BUILDER_CONFIGS = [MsCxrConfig(name='v1_1_0', description='MS-CXR v1.1.0 CSV'),
                     MsCxrConfig(name='v1_0_0', csv_name='MS_CXR_Local_Alignment_v1.0.0.csv',
                                 description='MS-CXR v1.0.0 CSV (no split column)')]
  DEFAULT_CONFIG_NAME = 'v1_1_0'
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  code_path = epath.Path(__file__)

  def _info(self):
    f = tfds.features.FeaturesDict({
        'image': B.IMAGE_BYTES(), 'image_id': tfds.features.Text(), 'path': tfds.features.Text(),
        'height': tfds.features.Scalar(np.int32), 'width': tfds.features.Scalar(np.int32),
        'text': tfds.features.Text(), 'category': tfds.features.Text(), 'boxes': B.floats(None, 4),
    })
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=f,
                                 disable_shuffling=True, metadata=self._metadata())

  def _split_generators(self, dl_manager):
    root = self._manual_dir(dl_manager)
    cfg = self.builder_config
    cols = {**COLUMNS, **dict(cfg.columns)}
    csv_path = os.path.join(root, cfg.csv_name)
    rows = read_rows(csv_path, cols)
    groups: dict[str, dict[tuple, list]] = {}
    for r in rows:
      split = (r.get('split') or cfg.default_split).strip()
      groups.setdefault(split, {}).setdefault((r['path'], r['text']), []).append(r)
    return {s: self._generate_examples(root, s, groups[s], csv_path) for s in sorted(groups)}

  def _generate_examples(self, root, split, groups, csv_path):
    self._publish_skips()
    for k, ((rel, text), rows) in enumerate(groups.items()):
      path = os.path.join(root, self.builder_config.image_root, rel)
      got = R.read_image(path)
      if got is None:
        self._missing(split, path, len(rows))
        continue
      data, h, w = got
      boxes = []
      for r in rows:
        sx = w / r['image_width'] if r.get('image_width') else 1.0
        sy = h / r['image_height'] if r.get('image_height') else 1.0
        boxes.append(R.xywh_to_xyxy([r['x'] * sx, r['y'] * sy, r['w'] * sx, r['h'] * sy]))
      yield k, {
          'image': data, 'image_id': rows[0].get('image_id') or os.path.splitext(os.path.basename(rel))[0],
          'path': rel, 'height': h, 'width': w, 'text': text.strip(),
          'category': rows[0].get('category') or '', 'boxes': R.boxes_array(boxes),
      }


def prepare(manual_dir: str, data_dir: str | None = None, config: str = 'v1_1_0', **kw):
  return B.prepare(TraceMsCxr, manual_dir, data_dir, config, **kw)


if __name__ == "__main__":
  raise SystemExit(B.main(prepare, 'v1_1_0', TraceMsCxr))
