"""Word-level tokenizer for the synthetic data: one id per known word.

Ids: pad 0, unk 1, the words in order (2 .. n+1), then start ``n+2 = vocab_size-2`` and end
``n+3 = vocab_size-1``. The end token is the largest id so that CLIP's argmax pooling (OpenAI
convention, models/config.py ``pool='argmax'``) lands on it; padding with 0 keeps that true.
Text is lower-cased and split on whitespace and punctuation; punctuation (and '_') is dropped.
"""
from __future__ import annotations

import collections
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

WORDS_FILE = "words.json"
PAD_ID = 0
UNK_ID = 1
_WORD = re.compile(r"[^\W_]+")  # Unicode letters and digits; everything else separates words


def split_words(text: str) -> list[str]:
  """Lower-cased words of `text`, punctuation and whitespace dropped ("A red-cube!" -> a, red, cube)."""
  return _WORD.findall(text.lower())


def build_vocab(texts: Iterable[str], min_count: int = 1) -> list[str]:
  """Words seen at least `min_count` times, most frequent first (ties alphabetical: deterministic)."""
  counts = collections.Counter(w for t in texts for w in split_words(t))
  return sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))


class WordTokenizer:
  """``tok(texts) -> int32 [B, context_length]`` rows ``sot, word ids..., eot, 0...``."""

  def __init__(self, words: Sequence[str], context_length: int):
    words = list(words)
    for i, w in enumerate(words):
      if not isinstance(w, str) or split_words(w) != [w]:
        raise ValueError(f"words[{i}] = {w!r} is not a single lower-case word without punctuation")
    dup = sorted(w for w, c in collections.Counter(words).items() if c > 1)
    if dup:
      raise ValueError(f"duplicate words in the vocabulary: {dup[:10]}")
    if int(context_length) < 2:
      raise ValueError(f"context_length must be >= 2 (start + end token), got {context_length}")
    self.words = words
    self.context_length = int(context_length)
    self.ids = {w: i + 2 for i, w in enumerate(words)}
    self.pad_id, self.unk_id = PAD_ID, UNK_ID
    self.sot_id = len(words) + 2
    self.eot_id = len(words) + 3

  @property
  def vocab_size(self) -> int:
    return len(self.words) + 4

  def encode(self, text: str) -> list[int]:
    """Word ids of `text` (unknown words -> unk 1), no start/end tokens, no truncation."""
    return [self.ids.get(w, UNK_ID) for w in split_words(text)]

  def words_of(self, text: str, context_length: int | None = None) -> list[str]:
    """The words that fill a row of `text`: row position i+1 holds word i (truncated like the row)."""
    ctx = self.context_length if context_length is None else int(context_length)
    return split_words(text)[:ctx - 2]

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    """int32 [B, ctx]; too long texts keep their first ctx-2 words and end with eot at position ctx-1."""
    if isinstance(texts, str):
      texts = [texts]
    ctx = self.context_length if context_length is None else int(context_length)
    if ctx < 2:
      raise ValueError(f"context_length must be >= 2 (start + end token), got {ctx}")
    out = np.full((len(texts), ctx), PAD_ID, np.int32)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(f"texts[{i}] is {type(text).__name__}, expected str")
      ids = [self.sot_id] + self.encode(text)[:ctx - 2] + [self.eot_id]
      out[i, :len(ids)] = ids
    return out

  def word_boundaries(self) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) bool [vocab_size]: every token is a whole word (all True)."""
    return np.ones(self.vocab_size, bool), np.ones(self.vocab_size, bool)

  def decode(self, ids: Sequence[int]) -> str:
    """Words of `ids` joined by spaces; pad/start/end dropped, unknown words shown as '<unk>'."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i in (PAD_ID, self.sot_id, self.eot_id):
        continue
      if i == UNK_ID:
        out.append("<unk>")
      elif 2 <= i < self.eot_id:
        out.append(self.words[i - 2])
      else:
        raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
    return " ".join(out)

  def save(self, path: str) -> str:
    """Write ``{"words": [...], "context_length": n}``; `path` is a file or a directory (-> words.json)."""
    if os.path.isdir(path):
      path = os.path.join(path, WORDS_FILE)
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"words": self.words, "context_length": self.context_length}, f, ensure_ascii=False)
    return path

  @classmethod
  def load(cls, path: str) -> "WordTokenizer":
    if os.path.isdir(path):
      path = os.path.join(path, WORDS_FILE)
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("words"), list) or \
        not isinstance(data.get("context_length"), int) or isinstance(data.get("context_length"), bool):
      raise ValueError(f'{path}: expected {{"words": [str, ...], "context_length": int}}')
    try:
      return cls(data["words"], data["context_length"])
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None

  def options(self) -> dict:
    return {"type": "word", "context_length": self.context_length, "pad_id": PAD_ID}

  def __repr__(self) -> str:
    return f"WordTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"
