"""Builder base of the real-dataset tfds builders (array_record; tfds without TensorFlow).

- Features: images and masks are stored as encoded bytes in a `tfds.features.Tensor(shape=(),
  dtype=object)` (`IMAGE_BYTES` / `PNG_BYTES`; `tfds.features.Image` would need TensorFlow).
- Missing images: `SkipCounter` logs, skips and counts annotations whose image file is absent; the
  builders store the counts in `builder.info.metadata['skipped']` (see `RealBuilder.stats`).
- `prepare(builder_cls, manual_dir, ...)` builds from a manual_dir; `main` is every builder's CLI.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

log = logging.getLogger('trace_jax.data.real')


# ----------------------------------------------------------------------------------------------------
# Missing images


class SkipCounter:
  """Counts (and logs the first few of) annotations skipped because a file they point to is missing
  (kind 'image': the photo; other kinds, e.g. 'label_map', name other per-image files)."""

  def __init__(self, dataset: str, max_logged: int = 10, max_listed: int = 50):
    self.dataset = dataset
    self.counts: dict[str, dict[str, int]] = {'image': {}}
    self.files: dict[str, dict[str, list[str]]] = {'image': {}}
    self.max_logged, self.max_listed = max_logged, max_listed
    self._logged = 0

  def missing(self, split: str, path: str, n_annotations: int = 1, kind: str = 'image'):
    """Record that `n_annotations` annotations of `split` point to the missing file `path`."""
    c = self.counts.setdefault(kind, {})
    c[split] = c.get(split, 0) + int(n_annotations)
    lst = self.files.setdefault(kind, {}).setdefault(split, [])
    if len(lst) < self.max_listed:
      lst.append(os.path.basename(path))
    if self._logged < self.max_logged:
      self._logged += 1
      log.warning('%s/%s: %s %s is missing; skipping its %d annotation(s)', self.dataset, split, kind,
                  path, n_annotations)

  def as_dict(self) -> dict:
    """{'missing_image_annotations': {split: n}, 'missing_image_files': {split: [names]}, and the
    same two keys per other kind (e.g. 'missing_label_map_annotations')}."""
    out = {}
    for kind in self.counts:
      out[f'missing_{kind}_annotations'] = dict(self.counts[kind])
      out[f'missing_{kind}_files'] = dict(self.files.get(kind, {}))
    return out


# ----------------------------------------------------------------------------------------------------
# Builder base


IMAGE_BYTES = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)  # noqa: E731
PNG_BYTES = IMAGE_BYTES


def ints(*shape, dtype=np.int32):
  return tfds.features.Tensor(shape=shape, dtype=dtype)


def floats(*shape):
  return tfds.features.Tensor(shape=shape, dtype=np.float32)


def texts():
  return tfds.features.Sequence(tfds.features.Text())


def bytes_list():
  return tfds.features.Tensor(shape=(None,), dtype=np.object_)


class RealBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common base: reads from `dl_manager.manual_dir`, counts skipped annotations per split into
  `info.metadata['skipped']` (persisted with the dataset; read back with `.stats`)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _metadata(self):
    return tfds.core.MetadataDict(skipped={'missing_image_annotations': {}, 'missing_image_files': {}})

  def _manual_dir(self, dl_manager) -> str:
    d = str(dl_manager.manual_dir)
    if not os.path.isdir(d):
      raise FileNotFoundError(f'{self.name}: manual_dir {d} does not exist; pass '
                              "download_config=tfds.download.DownloadConfig(manual_dir=...) "
                              '(see docs/datasets.md)')
    return d

  def _skips(self) -> SkipCounter:
    if not hasattr(self, '_skip_counter'):
      self._skip_counter = SkipCounter(self.name)
    return self._skip_counter

  def _publish_skips(self):
    """Writes the counts into the metadata (saved with dataset_info after generation)."""
    self.info.metadata['skipped'] = self._skips().as_dict()

  def _missing(self, split: str, path: str, n: int = 1, kind: str = 'image'):
    self._skips().missing(split, path, n, kind)
    self._publish_skips()

  def _generate_examples(self, *args, **kwargs):  # each builder defines its generator(s)
    raise NotImplementedError

  @property
  def stats(self) -> dict:
    """{'missing_image_annotations': {split: count}, 'missing_image_files': {split: [names]}}."""
    md = self.info.metadata or {}
    return dict(md.get('skipped', {}))


def prepare(builder_cls, manual_dir: str, data_dir: str | None = None, config: str | None = None,
            **config_kwargs):
  """Builds (array_record) from `manual_dir` and returns the builder. `config` is a BUILDER_CONFIGS
  name; `config_kwargs` override fields of that config (a new config named `config + '_custom'`
  unless `name=` is given)."""
  cfg = config
  if config_kwargs:
    base = next(c for c in builder_cls.BUILDER_CONFIGS
                if c.name == (config or builder_cls.DEFAULT_CONFIG_NAME or builder_cls.BUILDER_CONFIGS[0].name))
    import dataclasses
    name = config_kwargs.pop('name', base.name + '_custom')
    cfg = dataclasses.replace(base, name=name, **config_kwargs)
  b = builder_cls(config=cfg, data_dir=data_dir, file_format='array_record')
  b.download_and_prepare(file_format='array_record',
                         download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return b


def main(prepare_fn, default_config: str, builder_cls=None, argv=None) -> int:
  """`python -m trace_jax.data.real.<module> --manual_dir DIR [--data_dir DIR] [--config NAME]
  [--splits a,b]`: builds (array_record) and prints the splits and the skipped-annotation counts."""
  import argparse
  import time
  p = argparse.ArgumentParser(description='Build a trace_jax real-dataset tfds builder from manual_dir '
                              '(see docs/datasets.md).')
  p.add_argument('--manual_dir', required=True, help='folder with the official files')
  p.add_argument('--data_dir', default=None, help='tfds data_dir (default ~/tensorflow_datasets)')
  p.add_argument('--config', default=default_config)
  p.add_argument('--splits', default=None, help='comma-separated subset of the official splits '
                 '(builders with a `splits` option: coco, flickr30k_entities, voc)')
  a = p.parse_args(argv)
  kw = {}
  if a.splits:
    splits = tuple(s for s in a.splits.split(',') if s)
    name = f'{a.config}_{"_".join(splits)}'
    # a predefined config with exactly these splits (e.g. trace_coco/instances_val2017) is used as is
    kw = ({} if name in {c.name for c in getattr(builder_cls, 'BUILDER_CONFIGS', ())} else
          dict(splits=splits, name=name))
    a.config = name if not kw else a.config
  t = time.time()
  try:
    b = prepare_fn(os.path.expanduser(a.manual_dir), a.data_dir and os.path.expanduser(a.data_dir),
                   a.config, **kw)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}')
    return 2
  print(f'built {b.name}/{b.builder_config.name} in {time.time() - t:.1f}s at {b.data_dir}')
  for split, info in b.info.splits.items():
    print(f'  {split}: {info.num_examples} examples')
  print(f'  skipped: {json.dumps(b.stats)}')
  return 0
