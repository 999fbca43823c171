"""tfds builder of the embedded grounding dataset `trace_shapes` (array_record, no TensorFlow needed).

Build:  python -m trace_jax.data.shapes.builder --data_dir ~/tensorflow_datasets [--image_size 64]
or:     from trace_jax.data.shapes.builder import prepare; prepare(image_size=64, data_dir=...)
Read:   trace_jax.data.pipeline.load_split(...)  (builder.as_data_source; records in index order)

Pixels are stored as `tfds.features.Tensor` (zlib-compressed) rather than `tfds.features.Image`,
because tfds encodes images through TensorFlow, which is not installed (issue 5).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from trace_jax.data.shapes import scene
from trace_jax.data.shapes.concepts import load_concepts

DEFAULT_SPLIT_SIZES = {'train': 4000, 'validation': 500, 'test': 500, 'heldout': 500, 'openvocab': 500}
IMAGE_SIZES = (64, 112, 224)

_DESCRIPTION = """\
Procedurally generated grounding scenes: 1-5 shapes (fine class under a coarse superclass, with a
color, size and texture) on textured "stuff" backgrounds, with a caption, per-object noun phrases,
boxes and masks, unique referring expressions (with spatial words where attributes do not suffice),
exact semantic / instance masks and, for every caption word, the object or stuff it names.
See docs/data.md and trace_jax/data/shapes/concepts.json.
"""


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """image_size: S of the S x S images; seed: the dataset seed; split_sizes: examples per split."""
  image_size: int = 64
  seed: int = 0
  split_sizes: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SPLIT_SIZES))


def config_name(image_size: int, seed: int = 0, split_sizes: dict | None = None) -> str:
  """'64px' for the defaults; otherwise a name that spells out every non-default setting, so that
  differently configured builds never share a directory."""
  name = f'{int(image_size)}px'
  if seed:
    name += f'_seed{int(seed)}'
  if split_sizes is not None and dict(split_sizes) != DEFAULT_SPLIT_SIZES:
    name += '_' + '_'.join(f'{k}{int(split_sizes.get(k, 0))}' for k in scene.SPLITS)
  return name


class TraceShapes(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == '__main__'):
  """The embedded default grounding dataset (name 'trace_shapes')."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [ShapesConfig(name=config_name(s), image_size=s, description=f'{s} x {s} images')
                     for s in IMAGE_SIZES]
  DEFAULT_CONFIG_NAME = '64px'
  # tfds derives code_path through `importlib_resources` (not installed, not needed here), which
  # raises for builders inside a package; the file itself is the answer.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    s = int(self.builder_config.image_size)
    zlib = tfds.features.Encoding.ZLIB
    i32 = lambda *shape: tfds.features.Tensor(shape=shape, dtype=np.int32)  # noqa: E731
    features = tfds.features.FeaturesDict({
        'id': tfds.features.Scalar(dtype=np.int64),
        'image': tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding=zlib),
        'semantic': tfds.features.Tensor(shape=(s, s), dtype=np.uint8, encoding=zlib),
        'instance': tfds.features.Tensor(shape=(s, s), dtype=np.uint8, encoding=zlib),
        'stuff': i32(None),
        'caption': tfds.features.Text(),
        'word_obj': i32(None),
        'word_stuff': i32(None),
        'word_kind': i32(None),
        'objects': tfds.features.FeaturesDict({
            'fine': i32(None), 'coarse': i32(None), 'color': i32(None), 'size': i32(None),
            'texture': i32(None), 'box': i32(None, 4), 'area': i32(None), 'full_area': i32(None),
            'heldout': tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            'phrase': tfds.features.Sequence(tfds.features.Text()),
        }),
        'refexps': tfds.features.FeaturesDict({
            'text': tfds.features.Sequence(tfds.features.Text()),
            'object': i32(None),
            'spatial': tfds.features.Tensor(shape=(None,), dtype=np.bool_),
        }),
    })
    return tfds.core.DatasetInfo(
        builder=self, description=_DESCRIPTION, features=features,
        # Records in generation order: record i of a split is example (seed, split, i).
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(seed=int(self.builder_config.seed), image_size=s))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    sizes = self.builder_config.split_sizes
    bad = set(sizes) - set(scene.SPLITS)
    if bad:
      raise ValueError(f'unknown splits {sorted(bad)}; expected a subset of {scene.SPLITS}')
    return {split: self._generate_examples(split) for split in scene.SPLITS if sizes.get(split, 0) > 0}

  def _generate_examples(self, split):
    cfg = self.builder_config
    concepts = load_concepts()
    for i in range(int(cfg.split_sizes[split])):
      yield i, scene.generate_example(cfg.seed, split, i, cfg.image_size, concepts)


def make_builder(image_size: int = 64, data_dir: str | None = None, *, seed: int = 0,
                 split_sizes: dict | None = None, name: str | None = None) -> TraceShapes:
  """A TraceShapes builder writing array_record into `data_dir` (None: tfds default,
  ~/tensorflow_datasets or $TFDS_DATA_DIR). Non-default seed / split sizes make a config of their own
  (named by `config_name` unless `name` is given)."""
  if int(image_size) < 32:
    raise ValueError(f'image_size must be >= 32, got {image_size}')
  sizes = dict(DEFAULT_SPLIT_SIZES if split_sizes is None else split_sizes)
  default = config_name(image_size, seed, sizes)
  if name is None and default in {c.name for c in TraceShapes.BUILDER_CONFIGS}:
    config = default
  else:
    config = ShapesConfig(name=name or default, image_size=int(image_size), seed=int(seed),
                          split_sizes=sizes, description='custom trace_shapes configuration')
  return TraceShapes(config=config, data_dir=data_dir, file_format='array_record')


def prepare(image_size: int = 64, data_dir: str | None = None, **kw) -> TraceShapes:
  """Builds (if not already built) and returns the builder; see make_builder for the arguments."""
  builder = make_builder(image_size, data_dir, **kw)
  builder.download_and_prepare(file_format='array_record')
  return builder


def main(argv=None):
  p = argparse.ArgumentParser(description='Build the trace_shapes dataset (tfds, array_record).')
  p.add_argument('--data_dir', default=None, help='tfds data_dir (default ~/tensorflow_datasets)')
  p.add_argument('--image_size', type=int, default=64)
  p.add_argument('--seed', type=int, default=0)
  for split, n in DEFAULT_SPLIT_SIZES.items():
    p.add_argument(f'--num_{split}', type=int, default=n)
  a = p.parse_args(argv)
  sizes = {s: getattr(a, f'num_{s}') for s in DEFAULT_SPLIT_SIZES}
  t = time.time()
  b = prepare(a.image_size, a.data_dir, seed=a.seed, split_sizes=sizes)
  print(f'built {b.name}/{b.builder_config.name} in {time.time() - t:.1f}s at {b.data_dir}')
  for split, info in b.info.splits.items():
    print(f'  {split}: {info.num_examples} examples')


if __name__ == '__main__':
  main()
