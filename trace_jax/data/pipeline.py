"""Input pipeline for the embedded grounding dataset: tfds data sources -> dicts of NumPy batches.

No TensorFlow: records are read with `builder.as_data_source` (array_record random access) and
batches are assembled in NumPy. The order is a pure function of (seed, step): step k of a run reads
the same examples whether or not the run was resumed, and every host computes the same global batch
and keeps its own slice (rows [p * B / P, (p + 1) * B / P) for process p of P).

Batch dict (B = per-host batch, S = image size, L = context length, G = S / patch_size):
  image            float32 [B, S, S, 3]  (x / 255 - mean) / std, CLIP mean / std by default
  caption_ids      int32   [B, L]        WordTokenizer ids (pad 0, unk 1, sot, words..., eot)
  token_masks      float32 [B, L, G, G]  fraction of each patch covered by the pixels token l names
                                         (row position l = caption word l - 1; 0 where it names nothing)
  token_kind       int32   [B, L]        scene.WORD_KINDS index of the word at l; -1 for sot/eot/pad
  token_object     int32   [B, L]        object index the word describes, -1 if none
  token_label      int32   [B, L]        label id (concepts.json `fine`) of what the word names, -1 if none
  phrase_ids       int32   [B, L]        one phrase per image (a unique referring expression by default)
  phrase_object    int32   [B]           its object index
  phrase_box       int32   [B, 4]        its box, [y0, x0, y1, x1] pixels, end-exclusive
  phrase_box_mask  float32 [B, S, S]     1 inside that box (AMC's region mask M)
  phrase_mask      float32 [B, S, S]     1 on the object's visible pixels (exact region)
  phrase_heldout   bool    [B]           the phrase's object has a held-out (color, class) combination
  semantic         int32   [B, S, S]     label id per pixel
  instance         int32   [B, S, S]     k + 1 on object k, 0 on stuff
  index            int32   [B]           record index in the split
  valid            bool    [B]           False on padding rows (only with drop_remainder=False)
"""
from __future__ import annotations

import functools
import queue
import threading
from typing import Iterator, Sequence

import numpy as np

from trace_jax.boxes import boxes_to_masks
from trace_jax.data.preprocess import CLIP_MEAN, CLIP_STD, as_str  # noqa: F401 - CLIP_* re-exported
from trace_jax.data.shapes import scene
from trace_jax.data.shapes.concepts import CONCEPTS_PATH, load_concepts

DATASET_NAME = 'trace_shapes'
# The longest caption has scene.MAX_CAPTION_WORDS = 33 words; + sot + eot = 35.
DEFAULT_CONTEXT_LENGTH = 36
PHRASE_SOURCES = ('refexp', 'phrase')


# ----------------------------------------------------------------------------------------------------
# Vocabulary and tokenizer (fixed data, from concepts.json)


def vocabulary(concepts_path: str = CONCEPTS_PATH, *, include_open_vocab: bool = True) -> list[str]:
  """Every word the generator can write, in a fixed order from concepts.json: function words,
  colors, sizes, textures, coarse concepts, fine concepts (things then stuff).

  include_open_vocab=False leaves out the open-vocabulary words (they then tokenize to unk 1).
  """
  c = load_concepts(concepts_path)
  fine = [n for i, n in enumerate(c.fine_names) if include_open_vocab or i not in c.open_vocab]
  words = list(c.function_words) + list(c.color_names) + list(c.sizes) + list(c.textures) + list(
      c.coarse_names) + fine
  return list(dict.fromkeys(words))


def make_tokenizer(context_length: int = DEFAULT_CONTEXT_LENGTH, *, include_open_vocab: bool = True,
                   concepts_path: str = CONCEPTS_PATH):
  """WordTokenizer over `vocabulary(...)` (vocab_size = len(words) + 4)."""
  from trace_jax.tokenizers.word import WordTokenizer
  return WordTokenizer(vocabulary(concepts_path, include_open_vocab=include_open_vocab), context_length)


def token_concepts(tokenizer, concepts_path: str = CONCEPTS_PATH) -> dict[str, np.ndarray]:
  """The hierarchy per token id (for concept-level methods such as TRACE).

  Returns int32 arrays [vocab_size]: 'fine' = label id (concepts.json `fine`) the token's word names,
  -1 otherwise; 'coarse' = coarse id the word names, or the coarse parent of a fine word, -1 otherwise.
  """
  c = load_concepts(concepts_path)
  fine = np.full(tokenizer.vocab_size, -1, np.int32)
  coarse = np.full(tokenizer.vocab_size, -1, np.int32)
  for i, name in enumerate(c.fine_names):
    if name in tokenizer.ids:
      fine[tokenizer.ids[name]] = i
      coarse[tokenizer.ids[name]] = c.fine_coarse[i]
  for i, name in enumerate(c.coarse_names):
    if name in tokenizer.ids:
      coarse[tokenizer.ids[name]] = i
  return {'fine': fine, 'coarse': coarse}


# ----------------------------------------------------------------------------------------------------
# Data sources


def load_split(name: str = DATASET_NAME, data_dir: str | None = None, image_size: int = 64,
               split: str = 'train', *, build: bool = True, in_memory: bool = False, **builder_kwargs):
  """Random-access data source of one split (`source[i]` -> example dict of NumPy arrays).

  in_memory=True decodes the whole split once (InMemorySource).

  For 'trace_shapes' the builder of `image_size` (and `seed`, `split_sizes` in builder_kwargs) is
  built into `data_dir` first if needed (`build=False` raises instead). Other names go to
  `tfds.data_source` (their builders must have been prepared as array_record).
  """
  import tensorflow_datasets as tfds
  if name != DATASET_NAME:
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=build)
    return InMemorySource(src) if in_memory else src
  from trace_jax.data.shapes import builder as shapes_builder
  if split not in scene.SPLITS:
    raise ValueError(f'unknown split {split!r} of {name}; expected one of {scene.SPLITS}')
  b = shapes_builder.make_builder(image_size, data_dir, **builder_kwargs)
  if build:
    b.download_and_prepare(file_format='array_record')
  elif not b.is_prepared():
    raise ValueError(f'{name}/{b.builder_config.name} is not built in {b.data_dir}; '
                     f'run `python -m trace_jax.data.shapes.builder --data_dir ...`')
  if split not in b.info.splits:
    raise ValueError(f'split {split!r} is empty in {name}/{b.builder_config.name}')
  src = b.as_data_source(split=split)
  return InMemorySource(src) if in_memory else src


class InMemorySource:
  """A data source decoded once into a list (`len`, `[i]`, `__getitems__`): skips the per-batch tfds
  record decoding (about 2/3 of a batch's cost). The 64 px train split takes about 80 MB."""

  def __init__(self, source):
    self.examples = _read(source, range(len(source)))

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]

  def __getitems__(self, indices):
    return [self.examples[int(i)] for i in indices]


def _read(source, indices: Sequence[int]) -> list[dict]:
  indices = [int(i) for i in indices]
  if hasattr(source, '__getitems__'):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


_str = as_str


def example_phrases(example: dict, source: str = 'refexp') -> list[tuple[str, int]]:
  """(text, object index) pairs of an example: its unique referring expressions ('refexp') or the
  objects' caption noun phrases ('phrase', which may be ambiguous between look-alikes)."""
  if source == 'refexp':
    r = example['refexps']
    return [(_str(t), int(k)) for t, k in zip(r['text'], np.asarray(r['object']))]
  if source == 'phrase':
    return [(_str(t), k) for k, t in enumerate(example['objects']['phrase'])]
  raise ValueError(f'phrase source must be one of {PHRASE_SOURCES}, got {source!r}')


word_masks = scene.word_masks  # bool [W, S, S] per caption word of one example


# ----------------------------------------------------------------------------------------------------
# Order: a pure function of (seed, step)


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
  n, b = int(num_examples), int(batch_size)
  return n // b if drop_remainder else -(-n // b)


@functools.lru_cache(maxsize=4)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def batch_indices(num_examples: int, step: int, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                  drop_remainder: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
  """Global batch of `step`: (indices int64 [B], valid bool [B], epoch).

  Epoch e = step // steps_per_epoch visits a fresh permutation of the split (seeded by (seed, e)), or
  0..N-1 in order without shuffle. With drop_remainder=False the last batch of an epoch is padded
  (valid False) by repeating its first index.
  """
  spe = steps_per_epoch(num_examples, batch_size, drop_remainder)
  if spe == 0:
    raise ValueError(f'batch_size {batch_size} exceeds the {num_examples} examples of the split '
                     f'(drop_remainder=True leaves no batch)')
  if step < 0:
    raise ValueError(f'step must be >= 0, got {step}')
  epoch, j = divmod(int(step), spe)
  order = _permutation(num_examples, seed, epoch) if shuffle else np.arange(num_examples)
  idx = order[j * batch_size:(j + 1) * batch_size]
  valid = np.ones(batch_size, bool)
  valid[len(idx):] = False
  idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[0], idx.dtype)])
  return idx.astype(np.int64), valid, epoch


# ----------------------------------------------------------------------------------------------------
# Assembling a batch


def _patch_fraction(masks: np.ndarray, patch_size: int) -> np.ndarray:
  """bool [..., S, S] -> float32 [..., S/p, S/p]: covered fraction of each p x p patch."""
  *lead, s, _ = masks.shape
  g = s // patch_size
  m = masks.reshape(*lead, g, patch_size, g, patch_size)
  return m.mean(axis=(-3, -1), dtype=np.float32)


def make_batch(examples: Sequence[dict], *, tokenizer, patch_size: int = 8, phrase_source: str = 'refexp',
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
               phrase_rngs: Sequence[np.random.Generator] | None = None) -> dict:
  """Stacks decoded examples into the batch dict of the module docstring (pure NumPy).

  phrase_rngs: one generator per example choosing its phrase (default: the first phrase).
  """
  if phrase_source not in PHRASE_SOURCES:
    raise ValueError(f'phrase_source must be one of {PHRASE_SOURCES}, got {phrase_source!r}')
  b = len(examples)
  s = int(np.asarray(examples[0]['image']).shape[0])
  if s % patch_size:
    raise ValueError(f'patch_size {patch_size} does not divide the image size {s}')
  ctx, g = tokenizer.context_length, s // patch_size
  images = np.stack([np.asarray(e['image']) for e in examples])
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  out = {
      'image': (images.astype(np.float32) / 255.0 - mean) / std,
      'semantic': np.stack([np.asarray(e['semantic'], np.int32) for e in examples]),
      'instance': np.stack([np.asarray(e['instance'], np.int32) for e in examples]),
      'index': np.zeros(b, np.int32),
      'caption_ids': tokenizer([_str(e['caption']) for e in examples]),
      'token_masks': np.zeros((b, ctx, g, g), np.float32),
      'token_kind': np.full((b, ctx), -1, np.int32),
      'token_object': np.full((b, ctx), -1, np.int32),
      'token_label': np.full((b, ctx), -1, np.int32),
      'phrase_object': np.zeros(b, np.int32),
      'phrase_box': np.zeros((b, 4), np.int32),
      'phrase_box_mask': np.zeros((b, s, s), np.float32),
      'phrase_heldout': np.zeros(b, bool),
  }
  phrases = []
  for i, e in enumerate(examples):
    out['index'][i] = int(e.get('id', 0))
    # Caption words -> token rows: the tokenizer puts word w at position w + 1 and keeps ctx - 2 words.
    w = min(len(e['word_obj']), ctx - 2)
    obj = np.asarray(e['word_obj'])[:w]
    stuff = np.asarray(e['word_stuff'])[:w]
    fine = np.asarray(e['objects']['fine'])
    # Patch coverage of each distinct referent (objects, then stuff labels, then nothing), then
    # gathered per word: the same masks as scene.word_masks, pooled once per referent.
    labels = np.unique(stuff[stuff >= 0])
    inst, sem = np.asarray(e['instance']), np.asarray(e['semantic'])
    regions = np.concatenate([inst[None] == np.arange(1, len(fine) + 1)[:, None, None],
                              sem[None] == labels[:, None, None], np.zeros((1, s, s), bool)])
    table = _patch_fraction(regions, patch_size)
    ref = np.where(obj >= 0, obj, len(fine) + len(labels))
    ref = np.where(stuff >= 0, len(fine) + np.searchsorted(labels, stuff), ref)
    out['token_masks'][i, 1:w + 1] = table[ref]
    out['token_kind'][i, 1:w + 1] = np.asarray(e['word_kind'])[:w]
    out['token_object'][i, 1:w + 1] = obj
    out['token_label'][i, 1:w + 1] = np.where(obj >= 0, fine[np.maximum(obj, 0)], stuff)
    # One phrase per image.
    cands = example_phrases(e, phrase_source) or example_phrases(e, 'phrase')
    j = 0 if phrase_rngs is None else int(phrase_rngs[i].integers(len(cands)))
    text, k = cands[j]
    phrases.append(text)
    box = np.asarray(e['objects']['box'])[k]
    out['phrase_object'][i] = k
    out['phrase_box'][i] = box
    # AMC's box mask rule (int() slices, notes/amc-and-local-alignment.md §4; trace_jax/boxes.py)
    out['phrase_box_mask'][i] = boxes_to_masks(box, (s, s), rule='truncate', box_format='yxyx')[0]
    out['phrase_heldout'][i] = bool(np.asarray(e['objects']['heldout'])[k])
  out['phrase_ids'] = tokenizer(phrases)
  out['phrase_mask'] = (out['instance'] == (out['phrase_object'][:, None, None] + 1)).astype(np.float32)
  return out


def _process_slice(batch_size: int, process_index: int | None, process_count: int | None):
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f'global batch_size {batch_size} is not divisible by process_count {process_count}')
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def get_batch(source, step: int, *, batch_size: int, seed: int = 0, shuffle: bool = True,
              drop_remainder: bool = True, tokenizer=None, patch_size: int = 8,
              phrase_source: str = 'refexp', mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD, process_index: int | None = None,
              process_count: int | None = None) -> dict:
  """This host's part of global batch `step` (a pure function of its arguments).

  batch_size is the global batch; each of the process_count hosts (default jax.process_count())
  gets batch_size / process_count rows. The phrase of example i in epoch e is drawn with the
  generator seeded by (seed, e, i), so it too depends only on (seed, step).
  """
  tokenizer = tokenizer or make_tokenizer()
  idx, valid, epoch = batch_indices(len(source), step, batch_size=batch_size, seed=seed, shuffle=shuffle,
                                    drop_remainder=drop_remainder)
  sl = _process_slice(batch_size, process_index, process_count)
  idx, valid = idx[sl], valid[sl]
  examples = _read(source, idx)
  rngs = [np.random.default_rng([int(seed), epoch, int(i), 1]) for i in idx]
  out = make_batch(examples, tokenizer=tokenizer, patch_size=patch_size, phrase_source=phrase_source,
                   mean=mean, std=std, phrase_rngs=rngs)
  out['index'] = idx.astype(np.int32)
  out['valid'] = valid
  return out


def batches(source, *, batch_size: int, start_step: int = 0, num_steps: int | None = None,
            num_epochs: int | None = None, prefetch: int = 2, **kw) -> Iterator[dict]:
  """Yields get_batch(source, k, ...) for k = start_step, start_step + 1, ... .

  Stops after num_steps batches, or at the end of epoch num_epochs (e.g. num_epochs=1,
  shuffle=False, drop_remainder=False for one evaluation pass); infinite if both are None.
  prefetch > 0 assembles that many batches ahead in a background thread. Other keywords go to
  get_batch (seed, shuffle, drop_remainder, tokenizer, patch_size, phrase_source, mean, std,
  process_index, process_count).
  """
  kw.setdefault('tokenizer', make_tokenizer())
  stop = None
  if num_epochs is not None:
    stop = num_epochs * steps_per_epoch(len(source), batch_size, kw.get('drop_remainder', True))
  if num_steps is not None:
    stop = start_step + num_steps if stop is None else min(stop, start_step + num_steps)

  def steps():
    k = start_step
    while stop is None or k < stop:
      yield k
      k += 1

  if prefetch <= 0:
    for k in steps():
      yield get_batch(source, k, batch_size=batch_size, **kw)
    return

  q: queue.Queue = queue.Queue(maxsize=prefetch)
  done = threading.Event()
  end = object()

  def work():
    try:
      for k in steps():
        item = get_batch(source, k, batch_size=batch_size, **kw)
        while not done.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if done.is_set():
          return
      q.put(end)
    except BaseException as e:  # surface errors in the consumer
      q.put(e)

  t = threading.Thread(target=work, daemon=True, name='trace_shapes_prefetch')
  t.start()
  try:
    while True:
      item = q.get()
      if item is end:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    done.set()
