"""Training data sources by name (``config.data.name``): ``make(config) -> Source``.

A source says what it yields and nothing about models:

    src = sources.make(config)                      # config.data picks and sets it up
    src.info        # tokenizer facts: vocab_size, context_length[, tokenizer, train_captions()]
    src.keys        # the canonical batch keys it yields (trace_jax/objectives/base.py BATCH_KEYS)
    src.needs       # what it must be told to build a batch, e.g. ('patch_size',) for patch-grid masks
    it = src.batches(start_step, patch_size=8)      # iterator of THIS host's rows of each global batch

Batches are a pure function of (seed, step): step k of a run reads the same examples whether or not
it was resumed; process p of P keeps rows [p B / P, (p + 1) B / P) of the global batch.

  trace_shapes   the embedded grounding set (trace_jax/data/shapes; built into data.data_dir)
  random         arrays of the right shapes and ranges (tests)
  image_text, visual_genome, flickr30k_entities, refcoco, refcocoplus, refcocog, coco_captions
                 real data through Grain (data/train_sources.py, data/grain_pipeline.py)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np

CANONICAL_KEYS = ("image", "caption_ids", "phrase_ids", "mask", "mask_indicator")
_REGISTRY: dict[str, Callable] = {}


@dataclasses.dataclass
class Source:
  name: str
  info: dict
  batches: Callable[..., Iterator[dict]]    # (start_step, **needs) -> iterator of this host's batches
  keys: tuple[str, ...] = CANONICAL_KEYS
  needs: tuple[str, ...] = ()
  extras: dict = dataclasses.field(default_factory=dict)   # source-specific handles (e.g. the tfds source)


def register(name: str):
  def wrap(fn):
    if name in _REGISTRY:
      raise ValueError(f"data source {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn
  return wrap


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def make(config, split: str | None = None, *, process_index: int | None = None,
         process_count: int | None = None, tokenizer=None) -> Source:
  """The source of ``config.data`` (``split`` overrides ``config.data.split``); this host's share is
  ``process_index`` of ``process_count`` (default: jax's). ``tokenizer``: the model's (a model dir's,
  ``config.init_from``), used instead of the source's own; ``tok(texts) -> int32 [B, L]``."""
  d = config.data
  if d.name not in _REGISTRY:
    raise ValueError(f"unknown data.name {d.name!r}; expected one of {names()}")
  if int(d.batch_size) <= 0:
    raise ValueError(f"data.batch_size must be positive; got {d.batch_size}")
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  if d.batch_size % process_count:
    raise ValueError(f"data.batch_size {d.batch_size} is not divisible by the {process_count} processes")
  return _REGISTRY[d.name](config, split or d.split, process_index, process_count, tokenizer=tokenizer)


def host_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """This host's rows of a global batch."""
  n = batch_size // process_count
  return slice(process_index * n, (process_index + 1) * n)


# ---------------------------------------------------------------------------------------------- random

def random_batch(config, step: int, rows: slice) -> dict:
  """Deterministic random batch of global step ``step`` (this host's ``rows``)."""
  d = config.data
  b, s, L, v = d.batch_size, d.image_size, d.context_length, d.vocab_size
  r = np.random.default_rng([config.seed, step])
  ids = np.zeros((2, b, L), np.int32)
  lens = r.integers(2, L + 1, (2, b))
  for t in range(2):
    for i in range(b):
      ids[t, i, :lens[t, i] - 1] = r.integers(1, v - 1, lens[t, i] - 1)
      ids[t, i, lens[t, i] - 1] = v - 1          # end-of-text = largest id (argmax pooling)
  y0, x0 = r.integers(0, s // 2, (2, b))
  h, w = r.integers(s // 4, s // 2 + 1, (2, b))
  yy, xx = np.arange(s)[None, :, None], np.arange(s)[None, None, :]
  mask = ((yy >= y0[:, None, None]) & (yy < (y0 + h)[:, None, None]) &
          (xx >= x0[:, None, None]) & (xx < (x0 + w)[:, None, None])).astype(np.float32)
  out = {"image": r.normal(size=(b, s, s, 3)).astype(np.float32), "caption_ids": ids[0],
         "phrase_ids": ids[1], "mask": mask, "mask_indicator": (r.random(b) < 0.75).astype(np.float32)}
  return {k: v[rows] for k, v in out.items()}


@register("random")
def _random_source(config, split, pi, pc, tokenizer=None) -> Source:
  d = config.data
  if tokenizer is not None:
    raise ValueError("data.name 'random' draws token ids itself; it takes no tokenizer (init_from)")
  rows = host_rows(d.batch_size, pi, pc)

  def batches(start, **_):
    k = start
    while True:
      yield random_batch(config, k, rows)
      k += 1
  return Source("random", {"vocab_size": d.vocab_size, "context_length": d.context_length,
                           "image_size": d.image_size}, batches)


# ---------------------------------------------------------------------------------------------- trace_shapes

def builder_kwargs(d) -> dict:
  """Builder options of the embedded dataset from ``config.data`` (seed, split sizes)."""
  kw = {"seed": d.dataset_seed}
  if d.split_sizes:
    from trace_jax.data.shapes.builder import DEFAULT_SPLIT_SIZES
    sizes = dict(DEFAULT_SPLIT_SIZES)
    for item in str(d.split_sizes).split(","):
      k, _, v = item.partition("=")
      if k.strip() not in sizes or not v.strip().isdigit():
        raise ValueError(f"data.split_sizes: bad entry {item!r}; expected name=count with name in {sorted(sizes)}")
      sizes[k.strip()] = int(v)
    kw["split_sizes"] = sizes
  return kw


def load_shapes_split(d, split: str, image_size: int | None = None):
  """The embedded dataset's tfds data source of ``split`` for ``config.data`` ``d`` (built if needed)."""
  from trace_jax.data import pipeline
  return pipeline.load_split(pipeline.DATASET_NAME, d.data_dir, image_size or d.image_size, split,
                             **builder_kwargs(d))


def split_captions(source) -> list[str]:
  """Every caption of a trace_shapes split (TRACE's anchors are derived from them)."""
  from trace_jax.data import pipeline
  out = []
  for lo in range(0, len(source), 256):
    out += [pipeline._str(e["caption"]) for e in pipeline._read(source, range(lo, min(lo + 256, len(source))))]
  return out


@register("trace_shapes")
def _shapes_source(config, split, pi, pc, tokenizer=None) -> Source:
  d = config.data
  if d.mask not in ("box", "pixels"):
    raise ValueError(f"data.mask must be 'box' or 'pixels'; got {d.mask!r}")
  from trace_jax.data import pipeline
  source = load_shapes_split(d, split)
  tok = tokenizer or pipeline.make_tokenizer()
  mask_key = "phrase_box_mask" if d.mask == "box" else "phrase_mask"

  def canonical(b):
    return {"image": b["image"], "caption_ids": b["caption_ids"], "phrase_ids": b["phrase_ids"],
            "mask": b[mask_key], "mask_indicator": np.ones(len(b["image"]), np.float32)}

  def batches(start, *, patch_size: int):
    it = pipeline.batches(source, batch_size=d.batch_size, start_step=start, prefetch=d.prefetch,
                          seed=config.seed, tokenizer=tok, patch_size=patch_size, phrase_source=d.phrase_source,
                          process_index=pi, process_count=pc)
    return (canonical(b) for b in it)

  def train_captions():
    return split_captions(load_shapes_split(d, "train"))

  info = {"vocab_size": tok.vocab_size, "context_length": tok.context_length, "tokenizer": tok,
          "train_captions": train_captions, "image_size": d.image_size}   # images rendered at this size
  return Source("trace_shapes", info, batches, needs=("patch_size",), extras={"source": source})


# The real training sources (data/train_sources.py; it does not import this module).
def _register_train_sources():
  import functools
  from trace_jax.data import train_sources
  for name, factory in train_sources.FACTORIES.items():
    register(name)(functools.partial(factory, Source=Source))


_register_train_sources()
