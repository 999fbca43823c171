"""The concept hierarchy of the embedded `trace_shapes` dataset, as data: concepts.json with id lookups.

Label id = position in concepts.json `fine` (things first, then stuff); `load_concepts` validates the
file and raises ValueError naming the problem.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class Concepts:
  """concepts.json, with id lookups. Label id = index into `fine_names` (things, then stuff)."""
  coarse_names: tuple[str, ...]
  coarse_kind: tuple[str, ...]  # 'thing' | 'stuff'
  fine_names: tuple[str, ...]
  fine_coarse: tuple[int, ...]  # coarse id of each label
  prepositions: dict
  ground_stuff: tuple[int, ...]  # label ids that may lie under the sky
  color_names: tuple[str, ...]
  color_rgb: np.ndarray  # [C, 3] uint8
  sizes: tuple[str, ...]
  textures: tuple[str, ...]
  function_words: tuple[str, ...]
  heldout: frozenset  # {(color id, label id)}
  open_vocab: frozenset  # {label id}

  @property
  def things(self) -> tuple[int, ...]:
    return tuple(i for i, c in enumerate(self.fine_coarse) if self.coarse_kind[c] == 'thing')

  @property
  def stuff(self) -> tuple[int, ...]:
    return tuple(i for i, c in enumerate(self.fine_coarse) if self.coarse_kind[c] == 'stuff')

  @property
  def num_labels(self) -> int:
    return len(self.fine_names)

  def label(self, name: str) -> int:
    return self.fine_names.index(name)

  def children(self, coarse: str) -> tuple[str, ...]:
    """Fine names under a coarse concept (the hierarchy, coarse -> fine)."""
    c = self.coarse_names.index(coarse)
    return tuple(n for n, p in zip(self.fine_names, self.fine_coarse) if p == c)


CONCEPTS_PATH = os.path.join(os.path.dirname(__file__), 'concepts.json')


@functools.lru_cache(maxsize=8)
def load_concepts(path: str = CONCEPTS_PATH) -> Concepts:
  """Parses and validates concepts.json; raises ValueError naming the problem."""
  with open(path) as f:
    d = json.load(f)
  coarse_names = tuple(c['name'] for c in d['coarse'])
  coarse_kind = tuple(c['kind'] for c in d['coarse'])
  if set(coarse_kind) - {'thing', 'stuff'}:
    raise ValueError(f'{path}: coarse kinds must be "thing" or "stuff", got {set(coarse_kind)}')
  fine_names = tuple(f['name'] for f in d['fine'])
  for f in d['fine']:
    if f['coarse'] not in coarse_names:
      raise ValueError(f'{path}: fine concept {f["name"]!r} has unknown coarse {f["coarse"]!r}')
  fine_coarse = tuple(coarse_names.index(f['coarse']) for f in d['fine'])
  color_names = tuple(c['name'] for c in d['colors'])
  words = list(coarse_names) + list(fine_names) + list(color_names) + d['sizes'] + d['textures']
  if len(set(words)) != len(words):
    raise ValueError(f'{path}: concept / attribute words must be distinct, got duplicates')
  heldout = set()
  for color, fine in d['heldout_combinations']:
    if color not in color_names or fine not in fine_names:
      raise ValueError(f'{path}: heldout combination {(color, fine)} names an unknown color or class')
    heldout.add((color_names.index(color), fine_names.index(fine)))
  for w in d['open_vocab']:
    if w not in fine_names or coarse_kind[fine_coarse[fine_names.index(w)]] != 'thing':
      raise ValueError(f'{path}: open-vocab word {w!r} is not a thing class')
  prepositions = {fine_names.index(f['name']): f['preposition'] for f in d['fine'] if 'preposition' in f}
  c = Concepts(
      coarse_names=coarse_names, coarse_kind=coarse_kind, fine_names=fine_names,
      fine_coarse=fine_coarse, prepositions=prepositions,
      ground_stuff=tuple(fine_names.index(n) for n in d['ground_stuff']),
      color_names=color_names, color_rgb=np.asarray([c['rgb'] for c in d['colors']], np.uint8),
      sizes=tuple(d['sizes']), textures=tuple(d['textures']),
      function_words=tuple(d['function_words']), heldout=frozenset(heldout),
      open_vocab=frozenset(fine_names.index(w) for w in d['open_vocab']))
  if set(c.stuff) != set(prepositions) or 'sky' not in fine_names:
    raise ValueError(f'{path}: every stuff class needs a preposition, and "sky" must exist')
  for f in set(c.things):
    if all((k, f) in c.heldout for k in range(len(color_names))):
      raise ValueError(f'{path}: every color of {fine_names[f]!r} is held out')
  return c
