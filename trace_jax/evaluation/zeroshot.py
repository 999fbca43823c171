"""Zero-shot text embeddings: prompt-ensembled class embeddings and batched text encoding.

CLIP's zero-shot classifier (Radford et al. 2021, the "Prompt_Engineering_for_ImageNet" notebook;
open_clip ``build_zero_shot_classifier``): for each class, format every template with the class name,
encode, L2-normalise each text embedding, average over the templates and L2-normalise the mean.
MaskInversion's class retrieval (maskinversion.md §4.1 and App. B) matches region embeddings against
"the text embeddings of the classes", with prompts such as "A photo of a dog" (§1); the paper does not
list its templates, so the default is CLIP's 80 ImageNet templates, and the embedded synthetic set
uses :data:`SHAPES_TEMPLATES` (its word tokenizer knows no "photo").

All texts go through one jitted ``encode_text`` in fixed-size chunks (the last one padded), so a
class list of any size compiles once per (config, chunk size, context length).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.models import build, l2_normalize

# OpenAI CLIP's 80 ImageNet templates, in their order (= open_clip.zero_shot_metadata
# .OPENAI_IMAGENET_TEMPLATES; tests/test_retrieval.py checks the equality).
OPENAI_IMAGENET_TEMPLATES = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a photo of the hard to see {}.', 'a low resolution photo of the {}.', 'a rendering of a {}.',
    'graffiti of a {}.', 'a bad photo of the {}.', 'a cropped photo of the {}.', 'a tattoo of a {}.',
    'the embroidered {}.', 'a photo of a hard to see {}.', 'a bright photo of a {}.',
    'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.', 'a drawing of a {}.',
    'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.', 'a close-up photo of a {}.',
    'a black and white photo of the {}.', 'a painting of the {}.', 'a painting of a {}.',
    'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.', 'a blurry photo of the {}.', 'a photo of the {}.',
    'a good photo of the {}.', 'a rendering of the {}.', 'a {} in a video game.', 'a photo of one {}.',
    'a doodle of a {}.', 'a close-up photo of the {}.', 'a photo of a {}.', 'the origami {}.',
    'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.', 'a origami {}.',
    'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.',
    'a photo of a nice {}.', 'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.',
    'art of a {}.', 'a sketch of the {}.', 'a embroidered {}.', 'a pixelated photo of a {}.',
    'itap of the {}.', 'a jpeg corrupted photo of the {}.', 'a good photo of a {}.', 'a plushie {}.',
    'a photo of the nice {}.', 'a photo of the small {}.', 'a photo of the weird {}.',
    'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.', 'a photo of the large {}.',
    'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.', 'itap of a {}.',
    'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'a tattoo of the {}.')

# The 7-template subset of the same notebook (open_clip SIMPLE_IMAGENET_TEMPLATES).
SIMPLE_IMAGENET_TEMPLATES = ('itap of a {}.', 'a bad photo of the {}.', 'a origami {}.',
                             'a photo of the large {}.', 'a {} in a video game.', 'art of the {}.',
                             'a photo of the small {}.')

# The single prompt of maskinversion.md §1 ("A photo of a dog").
PHOTO_TEMPLATE = ('a photo of a {}.',)

# Templates in the words of the embedded trace_shapes captions and referring expressions
# (data/shapes/concepts.json function words): every word is in pipeline.make_tokenizer()'s vocabulary.
SHAPES_TEMPLATES = ('a {}', 'the {}')

DEFAULT_BATCH = 256


@functools.lru_cache(maxsize=32)
def _encoder(cfg):
  model = build(cfg)

  def enc(params, ids):
    return l2_normalize(model.apply({'params': params}, ids, method='encode_text')[0])
  return jax.jit(enc)


def _tokenize(tokenizer: Callable, texts: Sequence[str]) -> np.ndarray:
  ids = np.asarray(tokenizer(list(texts)))
  if ids.ndim != 2 or ids.shape[0] != len(texts):
    raise ValueError(f'tokenizer must map {len(texts)} texts to int ids [n, L]; got shape {ids.shape}')
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'tokenizer must return integer ids; got dtype {ids.dtype}')
  return ids


def encode_texts(model, params, tokenizer: Callable, texts: Sequence[str], *,
                 batch_size: int = DEFAULT_BATCH) -> jax.Array:
  """L2-normalised text embeddings [n, E] of ``texts``.

  ``tokenizer(list[str]) -> int ids [n, L]`` (pipeline.make_tokenizer(), tokenizers.CLIPTokenizer).
  The texts are encoded in chunks of ``min(batch_size, next power of two >= n)`` rows (the last
  chunk padded with copies of the first text), so lists of similar length share one compilation.
  """
  texts = list(texts)
  if not texts:
    raise ValueError('no texts to encode')
  if not all(isinstance(t, str) for t in texts):
    raise ValueError('texts must be strings')
  ids = _tokenize(tokenizer, texts)
  n = ids.shape[0]
  b = int(min(batch_size, 1 << (n - 1).bit_length()))
  pad = (-n) % b
  if pad:
    ids = np.concatenate([ids, np.repeat(ids[:1], pad, axis=0)])
  enc = _encoder(model.cfg)
  out = [enc(params, jnp.asarray(ids[i:i + b])) for i in range(0, ids.shape[0], b)]
  return jnp.concatenate(out)[:n]


def ensemble(text_embeds: jax.Array, num_classes: int, num_templates: int) -> jax.Array:
  """[C * T, E] class-major embeddings -> [C, E]: mean of the L2-normalised rows, re-normalised."""
  e = l2_normalize(text_embeds).reshape(num_classes, num_templates, -1)
  return l2_normalize(jnp.mean(e, axis=1))


def class_text_embeddings(model, params, tokenizer: Callable, classnames: Sequence[str],
                          templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES, *,
                          batch_size: int = DEFAULT_BATCH) -> jax.Array:
  """Prompt-ensembled class embeddings [C, E] (CLIP zero-shot; module docstring).

  Args:
    classnames: C class names; templates: T format strings with one ``{}``.
  Returns:
    [C, E] float32, unit norm: normalize(mean_t normalize(encode_text(template_t.format(class_c)))).
  """
  classnames, templates = list(classnames), list(templates)
  if not classnames:
    raise ValueError('no class names')
  if not templates:
    raise ValueError('no templates')
  bad = [t for t in templates if t.count('{}') != 1]
  if bad:
    raise ValueError(f'every template needs exactly one {{}} placeholder; got {bad[:3]}')
  texts = [t.format(c) for c in classnames for t in templates]
  emb = encode_texts(model, params, tokenizer, texts, batch_size=batch_size)
  return ensemble(emb, len(classnames), len(templates))
