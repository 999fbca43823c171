"""tfds builders (array_record, no TensorFlow) for the public benchmark datasets, read from a
`manual_dir` in their official formats. See docs/datasets.md for the layouts and build commands.

  trace_coco                coco.py                COCO 2017 captions + instances; COCO-Stuff
  trace_refcoco             refcoco.py             RefCOCO / RefCOCO+ / RefCOCOg (REFER pickles)
  trace_flickr30k_entities  flickr30k_entities.py  Flickr30k Entities phrases and boxes
  trace_visual_genome       visual_genome.py       VG -> AMC (image, prompt, box) triplets
  trace_voc                 voc.py                 PASCAL VOC 2012 / PASCAL-Context class masks
  trace_mscxr               mscxr.py               MS-CXR style image / text / box CSV

Each module has `prepare(manual_dir, data_dir, config, **overrides) -> builder`; read with
`builder.as_data_source(split)`; `builder.stats` gives the skipped-annotation counts.
Boxes everywhere: float32 [N, 4] [x0, y0, x1, y1] in original-image pixels (readers.py).
Shared pieces: readers.py (annotation files, images), masks.py (PNG / COCO mask codecs), builder.py
(builder base, skip counts, the build CLI).
"""
import importlib

BUILDERS = {
    'trace_coco': 'trace_jax.data.real.coco',
    'trace_refcoco': 'trace_jax.data.real.refcoco',
    'trace_flickr30k_entities': 'trace_jax.data.real.flickr30k_entities',
    'trace_visual_genome': 'trace_jax.data.real.visual_genome',
    'trace_voc': 'trace_jax.data.real.voc',
    'trace_mscxr': 'trace_jax.data.real.mscxr',
}


def module(name: str):
  """The module of builder `name` (e.g. 'trace_refcoco'); importing it registers the builder."""
  if name not in BUILDERS:
    raise ValueError(f'unknown dataset {name!r}; expected one of {sorted(BUILDERS)}')
  return importlib.import_module(BUILDERS[name])


def prepare(name: str, manual_dir: str, data_dir: str | None = None, config: str | None = None, **kw):
  """Builds dataset `name` (config `config`, default the builder's default) from manual_dir."""
  m = module(name)
  return m.prepare(manual_dir, data_dir, **({'config': config} if config else {}), **kw)
