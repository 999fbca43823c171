"""TRACE's word side: the concept hierarchy, the frozen anchors and the closed / open vocabularies
(docs/trace.md §2), and their JSON form stored with a trained model dir (the ``trace`` head), so that
evaluation uses the anchors the model was trained against without the training data (the JSON round
trip gives bit-identical anchors: tests/test_trace_training.py
``test_vocab_round_trips_through_its_json_form``).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Sequence

import numpy as np

from trace_jax.trace.anchors import Hierarchy, Vocab, build_vocab, concept_vectors, corpus_anchors


# ------------------------------------------------------------------------------------------- vocabulary

COCOSTUFF_HIERARCHY = os.path.join(os.path.dirname(__file__), "cocostuff_hierarchy.json")


def concepts(concepts_path: str | None = None) -> tuple[Hierarchy, tuple[str, ...]]:
  """(hierarchy, open-vocabulary words) of a hierarchy JSON (default: the embedded dataset's concepts.json)."""
  import json
  from trace_jax.data.shapes.concepts import CONCEPTS_PATH
  path = concepts_path or CONCEPTS_PATH
  if not os.path.exists(path):
    raise FileNotFoundError(f"concept hierarchy {path} does not exist")
  with open(path) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"concept hierarchy {path}: not valid JSON ({e})") from None
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


def make_vocab(captions: Sequence[str] | None, dim: int = 48, concepts_path: str | None = None, *,
               anchors_path: str | None = None, hierarchy_path: str | None = None) -> TraceVocab:
  """The frozen word side of TRACE (docs/trace.md §2).

  Hierarchy: ``hierarchy_path`` (JSON, ``Hierarchy.from_dict``'s forms, optional ``open_vocab`` list;
  e.g. the shipped COCO-Stuff file ``COCOSTUFF_HIERARCHY``) or the embedded set's concepts.json.
  Anchors: ``anchors_path`` (GloVe / word2vec file, ``anchors.load_vectors``; a multi-word concept is
  the mean of its words' vectors; concepts without a vector are left out of the vocabulary, named in
  a warning; a coarse concept without one is an error) or, by default, derived from ``captions``
  (``corpus_anchors``: PPMI-SVD + the hierarchy's glossary, no download).
  """
  from trace_jax.tokenizers.word import split_words
  h, open_words = concepts(hierarchy_path or concepts_path)
  if captions is not None:
    leaked = sorted({w for c in captions for w in split_words(c)} & set(open_words))
    if leaked:
      raise ValueError(f"open-vocabulary words {leaked} occur in the training captions")
  base = list(h.coarse) + list(h.fine) + [w for _, ws in h.groups for w in ws]
  if anchors_path:
    words, vecs, dropped = concept_vectors(anchors_path, list(dict.fromkeys(base + list(open_words))))
    lost = [c for c in h.coarse if c in dropped]
    if lost:
      raise ValueError(f"{anchors_path}: no vector for the coarse concept(s) {lost} (the cluster-anchor loss "
                       "needs one per coarse concept); rename them in the hierarchy or use another file")
    if dropped:
      warnings.warn(f"{anchors_path}: {len(dropped)} concept(s) without a vector are left out of the TRACE "
                    f"vocabulary: {dropped[:20]}" + (" ..." if len(dropped) > 20 else ""))
  else:
    if captions is None:
      raise ValueError("TRACE anchors: give loss.trace.anchors_path (a GloVe / word2vec file) or a data source "
                       "with training captions to derive them from")
    words, vecs = corpus_anchors([split_words(c) for c in captions], h, dim=dim)
  have = set(words)
  closed = build_vocab(h, words, vecs, include=[w for w in base if w not in open_words and w in have])
  opened = build_vocab(h, words, vecs, include=list(closed.words) + [w for w in open_words if w in have])
  return TraceVocab(h, closed, opened, tuple(open_words), tuple(words), vecs)


def token_to_vocab(tokenizer, vocab: Vocab, spans=None) -> np.ndarray:
  """int32 [tokenizer.vocab_size]: the TRACE vocabulary id of each token id that is a whole vocabulary
  word by itself (-1 else). Word-level tokenizers: every one-word concept; subword tokenizers: the
  words that are one token (use ``word_spans`` + ``losses.trace.match_words`` for all of them).
  ``spans``: ``word_spans(tokenizer, vocab)`` when the caller has them already."""
  table = np.full(tokenizer.vocab_size, -1, np.int32)
  seqs, lens, _, _ = word_spans(tokenizer, vocab) if spans is None else spans
  for i in np.flatnonzero(lens == 1):
    table[seqs[i, 0]] = i
  return table


def word_spans(tokenizer, vocab: Vocab, max_tokens: int = 8):
  """How each vocabulary word appears in token ids, for ``losses.trace.match_words``.

  Returns (seqs int32 [V, T] each word's token ids without start / end tokens, -1 padded; lens int32 [V]
  (0: never matched: unknown to the tokenizer or longer than ``max_tokens``); starts, ends bool
  [tokenizer vocab]: a token begins / ends a word (``tokenizer.word_boundaries()``)). A caption word
  maps to its span of subword tokens (CLIP BPE: 'giraffe' -> 'gir', 'affe</w>').
  """
  enc = [list(tokenizer.encode(w)) for w in vocab.words]
  unk = getattr(tokenizer, "unk_id", None)
  t = max(1, min(max_tokens, max((len(e) for e in enc), default=1)))
  seqs = np.full((len(enc), t), -1, np.int32)
  lens = np.zeros(len(enc), np.int32)
  for i, (w, e) in enumerate(zip(vocab.words, enc)):
    if not e or len(e) > t or (unk is not None and unk in e):
      continue                                     # an unknown word never matches (its unk id would)
    seqs[i, :len(e)] = e
    lens[i] = len(e)
  starts, ends = tokenizer.word_boundaries()
  return seqs, lens, np.asarray(starts, bool), np.asarray(ends, bool)


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
