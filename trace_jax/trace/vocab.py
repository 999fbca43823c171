"""TRACE's word side: the concept hierarchy, the frozen anchors and the closed / open vocabularies
(docs/trace.md §2), and their JSON form stored with a trained model dir (the ``trace`` head), so that
evaluation uses the anchors the model was trained against without the training data (the JSON round
trip gives bit-identical anchors: tests/test_trace_training.py
``test_vocab_round_trips_through_its_json_form``).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from trace_jax.trace.anchors import Hierarchy, Vocab, build_vocab, corpus_anchors


# ------------------------------------------------------------------------------------------- vocabulary

def concepts(concepts_path: str | None = None) -> tuple[Hierarchy, tuple[str, ...]]:
  """(hierarchy, open-vocabulary words) of the embedded dataset's concepts.json."""
  import json
  from trace_jax.data.shapes.concepts import CONCEPTS_PATH
  path = concepts_path or CONCEPTS_PATH
  with open(path) as f:
    raw = json.load(f)
  return Hierarchy.from_dict(raw), tuple(raw.get("open_vocab", ()))


@dataclasses.dataclass(frozen=True)
class TraceVocab:
  """The frozen word side of TRACE: closed and open vocabularies over the same anchor table."""
  hierarchy: Hierarchy
  closed: Vocab                   # training words (coarse + fine, open-vocabulary words left out)
  open: Vocab                     # closed + the open-vocabulary words (evaluation only)
  open_words: tuple[str, ...]
  words: tuple[str, ...]          # the anchor table (corpus_anchors)
  vectors: np.ndarray


def make_vocab(captions: Sequence[str], dim: int = 48, concepts_path: str | None = None) -> TraceVocab:
  """Anchors from the captions (docs/trace.md §2.2) and the closed / open vocabularies."""
  from trace_jax.tokenizers.word import split_words
  h, open_words = concepts(concepts_path)
  leaked = sorted({w for c in captions for w in split_words(c)} & set(open_words))
  if leaked:
    raise ValueError(f"open-vocabulary words {leaked} occur in the training captions")
  words, vecs = corpus_anchors([split_words(c) for c in captions], h, dim=dim)
  base = list(h.coarse) + list(h.fine) + [w for _, ws in h.groups for w in ws]
  closed = build_vocab(h, words, vecs, include=[w for w in base if w not in open_words])
  opened = build_vocab(h, words, vecs, include=list(closed.words) + [w for w in open_words if w in words])
  return TraceVocab(h, closed, opened, tuple(open_words), tuple(words), vecs)


def token_to_vocab(tokenizer, vocab: Vocab) -> np.ndarray:
  """int32 [tokenizer.vocab_size]: the TRACE vocabulary id of each token id (-1: not a vocabulary word)."""
  table = np.full(tokenizer.vocab_size, -1, np.int32)
  for i, w in enumerate(vocab.words):
    if w in tokenizer.ids:
      table[tokenizer.ids[w]] = i
  return table


def vocab_to_meta(v: TraceVocab) -> dict:
  """JSON form of a TraceVocab: the hierarchy, the closed / open word lists and the raw anchor rows of
  the open vocabulary's words (the only rows either vocabulary reads)."""
  table = {w: i for i, w in enumerate(v.words)}
  words = list(v.open.words)
  return {"hierarchy": v.hierarchy.to_dict(), "open_words": list(v.open_words), "closed": list(v.closed.words),
          "open": words, "anchor_words": words,
          "anchor_vectors": np.asarray(v.vectors, np.float64)[[table[w] for w in words]].tolist()}


def vocab_from_meta(meta: dict) -> TraceVocab:
  """The TraceVocab that ``vocab_to_meta`` described (same words, same anchors, same order)."""
  h = Hierarchy.from_dict(meta["hierarchy"])
  words, vecs = tuple(meta["anchor_words"]), np.asarray(meta["anchor_vectors"], np.float64)
  closed = build_vocab(h, words, vecs, include=meta["closed"])
  opened = build_vocab(h, words, vecs, include=meta["open"])
  return TraceVocab(h, closed, opened, tuple(meta["open_words"]), words, vecs)
