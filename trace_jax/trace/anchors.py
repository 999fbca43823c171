"""Frozen semantic anchors for TRACE (docs/trace.md §2) and the concept hierarchy (as data).

* ``load_glove(path, words=None)``: GloVe text files (``word v_1 .. v_d`` per line).
* ``load_word2vec(path, words=None)``: word2vec ``.bin`` (binary) or text files (``V d`` header).
* ``ppmi_svd_anchors(sentences, dim)``: anchors derived offline from a corpus (PPMI + truncated SVD,
  Levy, Goldberg & Dagan 2015), used for the embedded dataset with its training captions plus a
  glossary written from the hierarchy (``glossary_sentences``); no download.
* ``Hierarchy``: coarse -> fine concepts, read from a dict / JSON (the embedded dataset's
  ``concepts.json`` format or ``{"coarse": [..], "fine": {"fine_word": "coarse_word"}}``).
* ``Vocab``: the arrays the losses take: unit anchors [V, d], word -> coarse id, word -> sibling group.

Anchors are numpy arrays; they enter the losses as constants (never trained).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from collections import Counter
from typing import Iterable, Sequence

import numpy as np


# ----------------------------------------------------------------------------------------------
# Word-vector files.

def _finish(vocab: list[str], vecs: list[np.ndarray], words: Sequence[str] | None, path: str,
            allow_missing: bool) -> tuple[list[str], np.ndarray]:
  if not vocab:
    raise ValueError(f"{path}: no word vectors found")
  mat = np.stack(vecs).astype(np.float32)
  if words is None:
    return vocab, mat
  index = {}
  for i, w in enumerate(vocab):
    index.setdefault(w, i)  # first occurrence wins (GloVe files have rare duplicates)
  missing = [w for w in words if w not in index]
  if missing and not allow_missing:
    raise ValueError(f"{path}: {len(missing)} requested word(s) have no vector: {missing[:20]}"
                     + (" ..." if len(missing) > 20 else ""))
  kept = [w for w in words if w in index]
  return kept, mat[[index[w] for w in kept]].reshape(len(kept), mat.shape[1])


def _parse_text_line(line: str, lineno: int, dim: int | None, path: str) -> tuple[str, np.ndarray]:
  parts = line.rstrip("\n").rstrip(" ").split(" ")
  if len(parts) < 2:
    raise ValueError(f"{path}:{lineno}: malformed line (expected 'word v1 ... vd'): {line[:80]!r}")
  word, vals = parts[0], parts[1:]
  if dim is not None and len(vals) != dim:
    raise ValueError(f"{path}:{lineno}: word {word!r} has {len(vals)} values, expected {dim}")
  try:
    vec = np.asarray([float(v) for v in vals], np.float32)
  except ValueError:
    raise ValueError(f"{path}:{lineno}: non-numeric value in the vector of {word!r}: {line[:80]!r}") from None
  return word, vec


def load_glove(path: str, words: Sequence[str] | None = None, *, allow_missing: bool = False
               ) -> tuple[list[str], np.ndarray]:
  """GloVe text file -> (words, float32 [V, d]) in the order of ``words`` (all, file order, if None).

  Raises ValueError naming the line for a malformed line or a vector of the wrong length, and
  listing requested words without a vector (unless ``allow_missing``).
  """
  wanted = None if words is None else set(words)
  vocab, vecs, dim = [], [], None
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      word = line.split(" ", 1)[0]
      if wanted is not None and word not in wanted:
        if dim is None:  # still validate the width on the first line
          dim = len(_parse_text_line(line, lineno, None, path)[1])
        continue
      w, v = _parse_text_line(line, lineno, dim, path)
      dim = len(v) if dim is None else dim
      vocab.append(w)
      vecs.append(v)
  return _finish(vocab, vecs, words, path, allow_missing)


def load_word2vec(path: str, words: Sequence[str] | None = None, *, binary: bool | None = None,
                  allow_missing: bool = False) -> tuple[list[str], np.ndarray]:
  """word2vec file (binary if ``binary`` or the name ends in ``.bin``; else text) -> (words, [V, d]).

  Both formats start with a header line ``V d``. Binary records are ``word<space>`` followed by d
  little-endian float32 values (and an optional newline), as the original C tool / gensim write them.
  """
  binary = path.endswith(".bin") if binary is None else binary
  wanted = None if words is None else set(words)
  vocab, vecs = [], []
  with open(path, "rb") as f:
    header = f.readline().decode("utf-8", "replace").split()
    if len(header) != 2 or not all(h.isdigit() for h in header):
      raise ValueError(f"{path}: malformed word2vec header {header!r} (expected 'vocab_size dim')")
    n, dim = int(header[0]), int(header[1])
    if binary:
      nbytes = 4 * dim
      for i in range(n):
        chars = bytearray()
        while True:
          ch = f.read(1)
          if not ch:
            raise ValueError(f"{path}: file ends inside record {i} of {n} (truncated?)")
          if ch == b" ":
            break
          if ch != b"\n" or chars:  # skip the newline that separates records
            chars.extend(ch)
        raw = f.read(nbytes)
        if len(raw) != nbytes:
          raise ValueError(f"{path}: record {i} ({chars[:40].decode('utf-8', 'replace')!r}) has "
                           f"{len(raw)} bytes of vector data, expected {nbytes} (truncated?)")
        word = chars.decode("utf-8", "replace")
        if wanted is None or word in wanted:
          vocab.append(word)
          vecs.append(np.frombuffer(raw, "<f4").astype(np.float32))
    else:
      text = io.TextIOWrapper(f, encoding="utf-8")
      count = 0
      for lineno, line in enumerate(text, 2):
        if not line.strip():
          continue
        w, v = _parse_text_line(line, lineno, dim, path)
        count += 1
        if wanted is None or w in wanted:
          vocab.append(w)
          vecs.append(v)
      if count != n:
        raise ValueError(f"{path}: header says {n} words, found {count}")
  return _finish(vocab, vecs, words, path, allow_missing)


def load_vectors(path: str, words: Sequence[str] | None = None, *, allow_missing: bool = False
                 ) -> tuple[list[str], np.ndarray]:
  """Any word-vector file: word2vec binary (``.bin``), word2vec text (a ``V d`` header line) or GloVe
  text (no header), told apart by the name and the first line."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"word-vector file {path} does not exist")
  if path.endswith(".bin"):
    return load_word2vec(path, words, binary=True, allow_missing=allow_missing)
  with open(path, "rb") as f:
    head = f.readline().split()
  if len(head) == 2 and all(h.isdigit() for h in head):
    return load_word2vec(path, words, binary=False, allow_missing=allow_missing)
  return load_glove(path, words, allow_missing=allow_missing)


def concept_vectors(path: str, concepts: Sequence[str]) -> tuple[list[str], np.ndarray, list[str]]:
  """Anchor rows for concept names from a word-vector file: a one-word concept is its word's vector; a
  multi-word concept ('traffic light') is the mean of its words' vectors (the usual phrase vector for
  GloVe / word2vec, which have no phrase entries). Returns (kept concepts, float32 [V, d], concepts
  dropped because a word of theirs has no vector)."""
  parts = {c: c.split() for c in concepts}
  need = sorted({w for ws in parts.values() for w in ws})
  found, vecs = load_vectors(path, need, allow_missing=True)
  table = dict(zip(found, vecs))
  kept, rows, dropped = [], [], []
  for c, ws in parts.items():
    if ws and all(w in table for w in ws):
      kept.append(c)
      rows.append(np.mean([table[w] for w in ws], axis=0))
    else:
      dropped.append(c)
  if not kept:
    raise ValueError(f"{path}: none of the {len(concepts)} concept words has a vector")
  return kept, np.stack(rows).astype(np.float32), dropped


def save_word2vec_binary(path: str, words: Sequence[str], vectors: np.ndarray) -> None:
  """Write the binary word2vec format (for tests and for exporting derived anchors)."""
  vectors = np.asarray(vectors, "<f4")
  with open(path, "wb") as f:
    f.write(f"{len(words)} {vectors.shape[1]}\n".encode())
    for w, v in zip(words, vectors):
      f.write(w.encode("utf-8") + b" " + v.tobytes() + b"\n")


# ----------------------------------------------------------------------------------------------
# Anchors derived offline from a corpus.

def ppmi_svd_anchors(sentences: Iterable[Sequence[str]], dim: int = 32, *, window: int = 0,
                     alpha: float = 0.75, eig_power: float = 0.5, min_count: int = 1,
                     ) -> tuple[list[str], np.ndarray]:
  """Word vectors from a tokenised corpus: PPMI with context-distribution smoothing, truncated SVD.

  X[w, c] = number of times c occurs within ``window`` words of w (0: anywhere in the sentence,
  which suits short captions), ``PPMI = max(0, log(X[w,c] Σ / (X[w,*] P_α(c))))`` with
  ``P_α(c) ∝ X[*,c]^α``; ``X_ppmi ≈ U S Vᵀ`` and the word vectors are ``U_d S_d^{eig_power}``,
  L2-normalised (Levy, Goldberg & Dagan 2015, the SVD counterpart of word2vec SGNS).
  Deterministic: each singular vector's sign is fixed so that its largest entry is positive.
  Returns (vocabulary sorted by decreasing count then alphabetically, float32 [V, dim']),
  dim' = min(dim, V).
  """
  sentences = [list(s) for s in sentences]
  counts = Counter(w for s in sentences for w in s)
  vocab = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
  if len(vocab) < 2:
    raise ValueError("corpus has fewer than 2 distinct words")
  index = {w: i for i, w in enumerate(vocab)}
  v = len(vocab)
  x = np.zeros((v, v), np.float64)
  for s in sentences:
    ids = [index[w] for w in s if w in index]
    for i, a in enumerate(ids):
      lo, hi = (0, len(ids)) if window <= 0 else (max(0, i - window), min(len(ids), i + window + 1))
      for j in range(lo, hi):
        if j != i:
          x[a, ids[j]] += 1.0
  total = x.sum()
  if total == 0:
    raise ValueError("corpus has no co-occurrences (all sentences have one word?)")
  pw = x.sum(1, keepdims=True) / total
  pc = x.sum(0) ** alpha
  pc = (pc / pc.sum())[None]
  with np.errstate(divide="ignore"):
    pmi = np.log(np.maximum(x / total, 1e-300)) - np.log(np.maximum(pw, 1e-300)) - np.log(np.maximum(pc, 1e-300))
  ppmi = np.where(x > 0, np.maximum(pmi, 0.0), 0.0)
  u, s, _ = np.linalg.svd(ppmi)
  d = min(dim, v)
  u = u[:, :d]
  sign = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(d)])
  vecs = u * sign * (s[:d] ** eig_power)
  vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
  return vocab, vecs.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The concept hierarchy (data, not code).

@dataclasses.dataclass(frozen=True)
class Hierarchy:
  """coarse concepts and fine -> coarse; ``groups`` are extra sibling sets (e.g. colours) with no subspace."""
  coarse: tuple[str, ...]
  fine: tuple[str, ...]
  parent: tuple[int, ...]                        # coarse index of each fine concept
  groups: tuple[tuple[str, tuple[str, ...]], ...] = ()

  def children(self, c: str | int) -> tuple[str, ...]:
    c = self.coarse.index(c) if isinstance(c, str) else c
    return tuple(f for f, p in zip(self.fine, self.parent) if p == c)

  @classmethod
  def from_dict(cls, d: dict) -> "Hierarchy":
    """Either the concepts.json format (``coarse: [{name}], fine: [{name, coarse}]``) or
    ``{"coarse": ["vehicle", ..], "fine": {"car": "vehicle", ..}, "groups": {"color": [..]}}``."""
    if "coarse" not in d or "fine" not in d:
      raise ValueError(f"a concept hierarchy needs 'coarse' and 'fine' entries; got keys {sorted(d)}")
    coarse = tuple(c["name"] if isinstance(c, dict) else str(c) for c in d["coarse"])
    if isinstance(d["fine"], dict):
      pairs = list(d["fine"].items())
    else:
      pairs = [(f["name"], f["coarse"]) for f in d["fine"]]
    bad = [(f, c) for f, c in pairs if c not in coarse]
    if bad:
      raise ValueError(f"fine concepts with an unknown coarse concept: {bad}")
    groups = d.get("groups", {})
    if isinstance(groups, dict):
      groups = tuple((str(k), tuple(v)) for k, v in groups.items())
    words = list(coarse) + [f for f, _ in pairs] + [w for _, ws in groups for w in ws]
    dup = sorted({w for w in words if words.count(w) > 1})
    if dup:
      raise ValueError(f"concept words must be distinct; duplicated: {dup}")
    if not coarse:
      raise ValueError("the hierarchy has no coarse concepts")
    return cls(coarse, tuple(f for f, _ in pairs), tuple(coarse.index(c) for _, c in pairs), tuple(groups))

  def to_dict(self) -> dict:
    """The ``{"coarse": [..], "fine": {fine: coarse}, "groups": {..}}`` form ``from_dict`` reads."""
    return {"coarse": list(self.coarse), "fine": {f: self.coarse[p] for f, p in zip(self.fine, self.parent)},
            "groups": {k: list(ws) for k, ws in self.groups}}

  @classmethod
  def from_json(cls, path_or_text: str) -> "Hierarchy":
    if os.path.exists(path_or_text):
      with open(path_or_text) as f:
        return cls.from_dict(json.load(f))
    return cls.from_dict(json.loads(path_or_text))


def glossary_sentences(h: Hierarchy, repeat: int = 1) -> list[list[str]]:
  """'a <fine> is a <coarse>' for every fine concept (the encyclopaedic text a GloVe corpus has)."""
  return [["a", f, "is", "a", h.coarse[p]] for f, p in zip(h.fine, h.parent)] * repeat


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Everything the TRACE losses need about words, as arrays (docs/trace.md §2).

  words: V words; anchors: float32 [V, d] unit rows (frozen); coarse: int32 [V], the coarse id a word
  belongs to (its own id for a coarse word, the parent for a fine word, -1 otherwise);
  group: int32 [V] sibling group for the token-level negatives (fine words: the parent's id; coarse
  words: C; words of ``Hierarchy.groups[j]``: C + 1 + j; -1: none); coarse_names: C names.
  """
  words: tuple[str, ...]
  anchors: np.ndarray
  coarse: np.ndarray
  group: np.ndarray
  coarse_names: tuple[str, ...]

  def index(self, word: str) -> int:
    try:
      return self.words.index(word)
    except ValueError:
      raise ValueError(f"word {word!r} is not in the TRACE vocabulary ({len(self.words)} words)") from None

  def ids(self, words: Iterable[str]) -> np.ndarray:
    """Vocabulary ids of caption words, -1 for words outside the vocabulary (int32)."""
    lookup = {w: i for i, w in enumerate(self.words)}
    return np.asarray([lookup.get(w, -1) for w in words], np.int32)

  @property
  def coarse_anchor_ids(self) -> np.ndarray:
    """int32 [C]: the vocabulary id of each coarse concept's own word."""
    return np.asarray([self.index(c) for c in self.coarse_names], np.int32)


def build_vocab(h: Hierarchy, words: Sequence[str], vectors: np.ndarray, *,
                include: Sequence[str] | None = None) -> Vocab:
  """Vocab over the hierarchy's coarse + fine + group words (or ``include``), anchors L2-normalised.

  ``words``/``vectors``: any anchor table (load_glove, load_word2vec, ppmi_svd_anchors). Every
  coarse word must have a vector (the cluster-anchor loss uses it); other missing words raise too.
  """
  table = {w: i for i, w in enumerate(words)}
  if include is None:
    include = list(h.coarse) + list(h.fine) + [w for _, ws in h.groups for w in ws]
  missing = [w for w in list(include) + list(h.coarse) if w not in table]
  if missing:
    raise ValueError(f"no anchor vector for: {sorted(set(missing))}")
  include = list(dict.fromkeys(list(include) + [c for c in h.coarse if c not in include]))
  a = np.asarray(vectors, np.float64)[[table[w] for w in include]]
  a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  c = len(h.coarse)
  coarse = np.full(len(include), -1, np.int32)
  group = np.full(len(include), -1, np.int32)
  fine_parent = dict(zip(h.fine, h.parent))
  group_of = {w: c + 1 + j for j, (_, ws) in enumerate(h.groups) for w in ws}
  for i, w in enumerate(include):
    if w in h.coarse:
      coarse[i], group[i] = h.coarse.index(w), c
    elif w in fine_parent:
      coarse[i] = group[i] = fine_parent[w]
    elif w in group_of:
      group[i] = group_of[w]
  return Vocab(tuple(include), a.astype(np.float32), coarse, group, h.coarse)


def remove_top_components(vectors: np.ndarray, n_top: int = 2) -> np.ndarray:
  """'All-but-the-top' (Mu & Viswanath 2018): subtract the mean and the top ``n_top`` principal
  directions, then L2-normalise. On the synthetic captions it separates words that share nearly all
  contexts (grass / water / sand: sibling cos 0.9 -> 0.2-0.5)."""
  v = np.asarray(vectors, np.float64)
  v = v - v.mean(0)
  if n_top:
    _, _, vt = np.linalg.svd(v, full_matrices=False)
    top = vt[:n_top]
    v = v - (v @ top.T) @ top
  return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def retrofit(words: Sequence[str], vectors: np.ndarray, h: Hierarchy, *, iters: int = 10,
             alpha: float = 1.0) -> np.ndarray:
  """Retrofitting to the hierarchy (Faruqui et al. 2015): the graph has an edge fine -- coarse for
  every fine concept; ``q_i <- (alpha q̂_i + Σ_{j ∈ N(i)} q_j) / (alpha + |N(i)|)`` (Jacobi sweeps in a
  fixed order), rows L2-normalised at the end. Words outside the hierarchy are unchanged."""
  index = {w: i for i, w in enumerate(words)}
  missing = [w for w in list(h.coarse) + list(h.fine) if w not in index]
  if missing:
    raise ValueError(f"retrofit: no vector for hierarchy words {missing}")
  q0 = np.asarray(vectors, np.float64)
  q = q0.copy()
  nb: dict[int, list[int]] = {}
  for f, p in zip(h.fine, h.parent):
    a, b = index[f], index[h.coarse[p]]
    nb.setdefault(a, []).append(b)
    nb.setdefault(b, []).append(a)
  for _ in range(iters):
    for i, js in nb.items():
      q[i] = (alpha * q0[i] + q[js].sum(0)) / (alpha + len(js))
  return (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def corpus_anchors(captions: Iterable[Sequence[str]], h: Hierarchy, *, dim: int = 48, n_top: int = 2,
                   retrofit_alpha: float = 1.0) -> tuple[list[str], np.ndarray]:
  """The embedded default (docs/trace.md §2.2): PPMI-SVD on the training captions plus the
  hierarchy's glossary ('a triangle is a polygon'), all-but-the-top, retrofitted to the hierarchy.

  Sibling cosines come out around 0.3-0.5 and fine -> own-coarse around 0.7 (like GloVe's
  car / bus / vehicle), so the frozen anchors carry the hierarchy; no download needed.
  """
  words, vecs = ppmi_svd_anchors(list(captions) + glossary_sentences(h), dim=dim)
  return words, retrofit(words, remove_top_components(vecs, n_top), h, alpha=retrofit_alpha)
