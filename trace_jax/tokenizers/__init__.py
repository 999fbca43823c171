"""Tokenizers: CLIP byte-level BPE (transformers / openai parity), SigLIP's SentencePiece and a
word-level one for synthetic data.

``load_tokenizer(model_dir)`` finds the tokenizer files of a model directory (model_dir.py layout:
``model_dir/tokenizer/``), in this order: ``words.json`` (WordTokenizer), ``spiece.model`` (or
``tokenizer.model`` / ``sentencepiece.model``: SentencePieceTokenizer), ``vocab.json`` + ``merges.txt``
(CLIP BPE, Hugging Face layout), one ``*.txt.gz`` (OpenAI-style BPE merges).
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from trace_jax.tokenizers.clip_bpe import (DEFAULT_CONTEXT_LENGTH, EOT, OPTIONS_FILE, SOT,
                                           CLIPTokenizer, bytes_to_unicode)
from trace_jax.tokenizers.sentencepiece import SPM_NAMES, SentencePieceTokenizer
from trace_jax.tokenizers.word import WORDS_FILE, WordTokenizer, build_vocab, split_words

__all__ = ["CLIPTokenizer", "SentencePieceTokenizer", "WordTokenizer", "build_vocab", "split_words",
           "load_tokenizer", "check_one_kind", "bytes_to_unicode", "SOT", "EOT", "DEFAULT_CONTEXT_LENGTH"]

_EXPECTED = (f"{WORDS_FILE}, a SentencePiece {' / '.join(SPM_NAMES)}, vocab.json + merges.txt, or an "
             f"OpenAI-style *.txt.gz BPE file")


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return data


def _model_context_length(model_dir: str) -> int | None:
  """text.context_length from the model's config.json (the length its position table allows), if any."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    return None
  ctx = _read_json(path).get("text", {})
  ctx = ctx.get("context_length") if isinstance(ctx, dict) else None
  return ctx if isinstance(ctx, int) else None


def _tokenizer_files_dir(model_dir: str) -> str:
  sub = os.path.join(model_dir, "tokenizer")
  if os.path.isdir(sub):
    return sub
  # Also accept a bare tokenizer directory.
  if os.path.isdir(model_dir) and (
      any(os.path.isfile(os.path.join(model_dir, n)) for n in (WORDS_FILE, "vocab.json", "merges.txt") + SPM_NAMES)
      or glob.glob(os.path.join(model_dir, "*.txt.gz"))):
    return model_dir
  raise FileNotFoundError(f"{model_dir}: no tokenizer directory {sub} (expected {_EXPECTED} in it)")


def check_one_kind(d: str) -> None:
  """Refuse a tokenizer folder holding files of two kinds (word-level, SentencePiece, CLIP BPE
  vocab.json + merges.txt, OpenAI BPE *.txt.gz): which one the model was trained with cannot be told,
  and a silent choice would give wrong ids. ValueError names the files."""
  kinds = {
      "word-level": [n for n in (WORDS_FILE,) if os.path.isfile(os.path.join(d, n))],
      "SentencePiece": [n for n in SPM_NAMES if os.path.isfile(os.path.join(d, n))],
      "CLIP BPE": [n for n in ("vocab.json", "merges.txt") if os.path.isfile(os.path.join(d, n))],
      "OpenAI BPE": sorted(os.path.basename(g) for g in glob.glob(os.path.join(d, "*.txt.gz"))),
  }
  found = {k: v for k, v in kinds.items() if v}
  if len(found) > 1:
    listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in found.items())
    raise ValueError(f"{d}: tokenizer files of {len(found)} kinds ({listed}); keep the one the model "
                     f"was trained with")


def load_tokenizer(model_dir: str, context_length: int | None = None
                   ) -> CLIPTokenizer | SentencePieceTokenizer | WordTokenizer:
  """The tokenizer stored with a model directory (or a bare tokenizer directory).

  context_length: explicit argument, else the model's ``config.json`` ``text.context_length``, else
  the tokenizer files' own value (``words.json`` / ``trace_jax_tokenizer.json``), else 77 (64 for
  SentencePiece, SigLIP's).
  Raises FileNotFoundError when no tokenizer files are present, ValueError naming the file when one
  does not parse and naming the files when the folder holds two kinds (``check_one_kind``).
  """
  d = _tokenizer_files_dir(model_dir)
  check_one_kind(d)
  ctx = context_length if context_length is not None else _model_context_length(model_dir)
  words = os.path.join(d, WORDS_FILE)
  if os.path.isfile(words):
    tok = WordTokenizer.load(words)
    if ctx is not None:
      tok.context_length = int(ctx)
    return tok

  spm = [os.path.join(d, n) for n in SPM_NAMES if os.path.isfile(os.path.join(d, n))]
  if len(spm) > 1:
    raise ValueError(f"{d}: several SentencePiece models, cannot choose: {[os.path.basename(p) for p in spm]}")
  kind = "sentencepiece" if spm else "clip_bpe"
  kwargs = {}
  opts_path = os.path.join(d, OPTIONS_FILE)
  if os.path.isfile(opts_path):
    opts = _read_json(opts_path)
    unknown = set(opts) - {"type", "context_length", "pad_id", "clean"}
    if unknown or opts.get("type", kind) != kind:
      raise ValueError(f"{opts_path}: unexpected entries {sorted(unknown) or opts.get('type')!r} "
                       f"for a {kind} tokenizer")
    kwargs = {k: opts[k] for k in ("context_length", "pad_id", "clean") if k in opts}
  if ctx is not None:
    kwargs["context_length"] = int(ctx)
  if spm:
    try:
      return SentencePieceTokenizer.from_file(spm[0], **kwargs)
    except ValueError as e:
      raise ValueError(str(e) if spm[0] in str(e) else f"{spm[0]}: {e}") from None

  vocab, merges = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
  if os.path.isfile(vocab) or os.path.isfile(merges):
    missing = [p for p in (vocab, merges) if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"{d}: CLIP BPE needs vocab.json and merges.txt; {missing[0]} is missing")
    return CLIPTokenizer.from_files(vocab, merges, **kwargs)
  gz = sorted(glob.glob(os.path.join(d, "*.txt.gz")))
  if len(gz) > 1:
    raise ValueError(f"{d}: several BPE files, cannot choose: {[os.path.basename(g) for g in gz]}")
  if gz:
    return CLIPTokenizer.from_bpe_gz(gz[0], **kwargs)
  raise FileNotFoundError(f"{d}: no tokenizer files (expected {_EXPECTED})")


def text_warnings(tokenizer, texts, context_length: int | None = None) -> list[str]:
  """What tokenizing ``texts`` changes behind the user's back, one message each: tokens dropped past the
  context, words the word tokenizer does not know (read as unk), characters the BPE cleaning drops.
  An empty (or all-whitespace) text is a ValueError naming it."""
  ctx = int(context_length or tokenizer.context_length)
  out = []
  for i, t in enumerate(texts):
    if not isinstance(t, str) or not t.strip():
      raise ValueError(f"text {i + 1} is empty: give a phrase to ground")
    ids = tokenizer.encode(t)
    room = ctx - getattr(tokenizer, "num_special_tokens", 2)  # start + end (CLIP, word); end (SigLIP)
    if len(ids) > room:
      out.append(f"text {i + 1} {t[:40]!r}... has {len(ids)} tokens; the context holds {room}: "
                 f"the last {len(ids) - room} were dropped")
    if isinstance(tokenizer, WordTokenizer):
      unknown = [w for w in split_words(t) if w not in tokenizer.ids]
      if unknown:
        out.append(f"text {i + 1}: {len(unknown)} word(s) not in the tokenizer's vocabulary, read as <unk>: "
                   f"{', '.join(dict.fromkeys(unknown))}")
    else:
      kept = "".join(tokenizer.decode(ids).split())
      lost = [c for c in dict.fromkeys("".join(t.lower().split())) if c not in kept]
      if lost:
        out.append(f"text {i + 1}: characters the tokenizer drops: {''.join(lost)!r}")
  return out


# ---------------------------------------------------------------- a row's own tokens (token strips)

def text_span(tok, ids_row) -> tuple[int, int]:
  """Row positions [start, stop) of the text's own tokens: between the start token and the end token
  (the largest id) for CLIP BPE / word ids; from 0 to the first end token for SigLIP's SentencePiece
  rows (no start token; the end id also pads them)."""
  if getattr(tok, "num_special_tokens", 2) == 1:
    hits = np.flatnonzero(np.asarray(ids_row) == tok.eot_id)
    return 0, int(hits[0]) if hits.size else len(ids_row)
  return 1, int(np.argmax(ids_row))


def token_strings(tok, text, ids_row) -> list[str]:
  """Strings of the tokens at the row positions of ``text_span`` (between start and end tokens)."""
  start, stop = text_span(tok, ids_row)
  n = max(stop - start, 0)
  if tok is not None and text is not None:
    if hasattr(tok, "tokens_of"):
      s = [t.strip() or "·" for t in tok.tokens_of(text)]
    elif hasattr(tok, "words_of"):
      s = list(tok.words_of(text))
    else:
      s = []
    if len(s) >= n:
      return s[:n]
  return [str(int(i)) for i in ids_row[start:start + n]]


def text_scores(text_attr, ids_row, tok=None) -> np.ndarray:
  """A text map's values at the ``text_span`` positions, min-max normalised over them (float64)."""
  start, stop = text_span(tok, ids_row)
  v = np.asarray(text_attr, np.float64)[start:stop]
  if v.size == 0:
    return v
  lo, hi = v.min(), v.max()
  return (v - lo) / (hi - lo + 1e-7)
