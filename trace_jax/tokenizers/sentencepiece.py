"""SigLIP's SentencePiece tokenizer (the T5 / big_vision ``c4_en`` vocabulary and the like).

Rows are ``tokens..., </s>, pad...`` of ``context_length`` (64 for every released SigLIP): no start
token, the end token ``</s>`` (id 1 in the T5 vocabularies) after the text, padding with the END id
(``pad_id=None``), as big_vision's ``tokenize(max_len=64, eos='sticky', pad_value=1)``, open_clip
2.23.0's ``SigLipTokenizer`` (``pad_token_id = eos_token_id = 1``) and transformers'
``SiglipTokenizer`` (``pad_token='</s>'``). SigLIP's text tower pools the LAST position
(trace_jax/models/siglip.py), so the padding is part of what the model reads: it must be the id the
model was trained with. Too long texts keep their first ``context_length - 1`` tokens and the end
token last (transformers ``truncation=True``; big_vision ``eos='sticky'``).

Text cleaning (``clean=``), because the references differ:

* ``'hf'`` (default) reproduces transformers' ``SiglipTokenizer`` (5.x, ``do_lower_case=True``): a
  ``'▁'`` is put in front of the text (``'▁'`` inside it becomes a space); the special tokens
  (``</s>``, ``<unk>``) written literally in the text are split off (with the whitespace next to them)
  and become their ids; every other piece is canonicalised (lower-case, ASCII punctuation removed,
  whitespace runs -> ' ', stripped: big_vision's ``prompt_engineering.canonicalize_text``) and encoded
  as ``sp.encode('<unk>' + piece)`` minus the pieces of ``'<unk>'`` (transformers' way of encoding
  without SentencePiece's dummy prefix; a piece that follows a special token thus gets no
  word-start ``'▁'``).
* ``'openclip'`` reproduces open_clip 2.23.0's ``HFTokenizer(clean='canonicalize')``, the tokenizer
  of its ``ViT-*-SigLIP*`` configs: ftfy + html unescaping (``clip_bpe.clean_openai``; ftfy when
  installed) and open_clip's ``canonicalize_text`` (``'_'`` -> space first, then as above) before the
  transformers tokenizer; literal special tokens cannot survive (their ``<``, ``/``, ``>`` are removed).

The SentencePiece model itself (normalisation, the dummy prefix, the pieces) is the ``sentencepiece``
package's, run on the model file the checkpoint ships (``spiece.model`` in a Hugging Face folder,
``tokenizer.model`` / ``sentencepiece.model`` elsewhere). tests/test_sentencepiece.py compares the rows
with transformers' ``SiglipTokenizer`` and open_clip's ``HFTokenizer`` on a model trained in the test.
"""
from __future__ import annotations

import json
import os
import re
import string
from typing import Sequence

import numpy as np

SPM_FILE = "spiece.model"       # the name transformers' SiglipTokenizer saves and loads
SPM_NAMES = (SPM_FILE, "tokenizer.model", "sentencepiece.model")  # names a checkpoint may ship
DEFAULT_CONTEXT_LENGTH = 64     # every released SigLIP text tower
CLEAN_MODES = ("hf", "openclip")
SPIECE_UNDERLINE = "\u2581"
EOS, UNK = "</s>", "<unk>"
_PUNCT = str.maketrans("", "", string.punctuation)
_WS = re.compile(r"\s+")        # Python's \s, as both references' re.sub(r"\s+", " ", text)


def canonicalize(text: str) -> str:
  """transformers ``SiglipTokenizer.canonicalize_text`` (do_lower_case): lower-case, ASCII punctuation
  removed, whitespace runs -> ' ', stripped (big_vision prompt_engineering.py)."""
  return _WS.sub(" ", text.lower().translate(_PUNCT)).strip()


def clean_openclip(text: str) -> str:
  """open_clip 2.23.0 ``_clean_canonicalize``: ``basic_clean`` (ftfy, html unescape twice, strip) then
  its ``canonicalize_text`` ('_' -> ' ', punctuation removed, lower-case, whitespace runs, strip)."""
  from trace_jax.tokenizers.clip_bpe import clean_openai  # ftfy + html.unescape x2 (+ lower, whitespace)
  return canonicalize(clean_openai(text).replace("_", " "))


def _load_processor(model: str | bytes):
  try:
    import sentencepiece as spm
  except ImportError as e:  # a dependency of trace_jax (pyproject.toml); say what is missing
    raise ImportError("the SentencePiece tokenizer needs the `sentencepiece` package (pip install "
                      "sentencepiece)") from e
  sp = spm.SentencePieceProcessor()
  try:
    if isinstance(model, (bytes, bytearray)):
      sp.LoadFromSerializedProto(bytes(model))
    else:
      sp.Load(model)
  except (OSError, RuntimeError) as e:
    where = model if isinstance(model, str) else "serialized model"
    raise ValueError(f"{where}: not a SentencePiece model ({e})") from None
  return sp


class SentencePieceTokenizer:
  """SentencePiece tokenizer of SigLIP. ``tok(texts) -> int32 [B, context_length]`` rows
  ``tokens..., </s>, pad...`` (module docstring).

  Args:
    model: path of a SentencePiece ``.model`` file, or its bytes.
    context_length: row length of ``__call__`` (64 for SigLIP).
    pad_id: id written after the end token; ``None`` (default) = the end id, as big_vision
      (``pad_value=1``), open_clip and transformers pad for SigLIP.
    clean: 'hf' (transformers ``SiglipTokenizer``, default) or 'openclip' (open_clip ``HFTokenizer``
      with ``clean='canonicalize'``).
  """
  num_special_tokens = 1  # tokens a row adds around the text (the end token only)

  def __init__(self, model: str | bytes, *, context_length: int = DEFAULT_CONTEXT_LENGTH,
               pad_id: int | None = None, clean: str = "hf"):
    if clean not in CLEAN_MODES:
      raise ValueError(f"clean must be one of {CLEAN_MODES}, got {clean!r}")
    if context_length < 1:
      raise ValueError(f"context_length must be >= 1 (room for the end token), got {context_length}")
    self.sp = _load_processor(model)
    self.path = model if isinstance(model, str) else None
    where = self.path or "SentencePiece model"
    n = self.sp.GetPieceSize()
    self.eot_id = self.sp.PieceToId(EOS)
    self.unk_id = self.sp.PieceToId(UNK)
    # PieceToId returns the unk id for an unknown piece: the end token must be a piece of its own.
    if self.sp.IdToPiece(self.eot_id) != EOS:
      raise ValueError(f"{where}: has no {EOS!r} piece (SigLIP's end token)")
    self.pad_id = self.eot_id if pad_id is None else int(pad_id)
    if not 0 <= self.pad_id < n:
      raise ValueError(f"pad_id {self.pad_id} is outside the vocabulary (size {n})")
    self.context_length = int(context_length)
    self.clean = clean
    # transformers: special tokens are split off the raw text (their AddedTokens strip whitespace).
    self._specials = {EOS: self.eot_id}
    if self.sp.IdToPiece(self.unk_id) == UNK:
      self._specials[UNK] = self.unk_id
    self._special_split = re.compile("(" + "|".join(re.escape(s) for s in sorted(self._specials, key=len,
                                                                                  reverse=True)) + ")")
    self._unk_len = len(self.sp.encode(UNK))  # SiglipTokenizer.unk_token_length

  # ---------------------------------------------------------------- loading / saving
  @classmethod
  def from_file(cls, path: str, **kwargs) -> "SentencePieceTokenizer":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"SentencePiece model {path} does not exist")
    return cls(path, **kwargs)

  def save(self, directory: str) -> str:
    """Write ``spiece.model`` (the SentencePiece model, readable by transformers' SiglipTokenizer)
    and our options; returns the directory."""
    from trace_jax.tokenizers.clip_bpe import OPTIONS_FILE
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, SPM_FILE), "wb") as f:
      f.write(self.sp.serialized_model_proto())
    with open(os.path.join(directory, OPTIONS_FILE), "w") as f:
      json.dump(self.options(), f, indent=2)
    return directory

  def options(self) -> dict:
    return {"type": "sentencepiece", "context_length": self.context_length, "pad_id": self.pad_id,
            "clean": self.clean}

  @property
  def vocab_size(self) -> int:
    return self.sp.GetPieceSize()

  # ---------------------------------------------------------------- encoding
  def _encode_piece(self, piece: str) -> list[str]:
    """transformers ``SiglipTokenizer._tokenize``: canonicalise, encode without the dummy prefix."""
    pieces = self.sp.encode(UNK + canonicalize(piece), out_type=str)
    return pieces[self._unk_len:] if len(pieces) >= self._unk_len else pieces

  def _pieces(self, text: str) -> list[str]:
    """The pieces of ``text`` as transformers' ``SiglipTokenizer.tokenize`` gives them (an unknown
    character keeps its surface string; specials written in the text are their own pieces)."""
    if self.clean == "openclip":
      text = clean_openclip(text)
    # SiglipTokenizer.tokenize: '▁' + text, then the added tokens split off (PythonBackend.tokenize).
    parts = self._special_split.split(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
    for k in range(1, len(parts), 2):  # lstrip / rstrip of the special tokens eat adjacent whitespace
      parts[k - 1], parts[k + 1] = parts[k - 1].rstrip(), parts[k + 1].lstrip()
    out: list[tuple[str, bool]] = []  # (piece, is a special token split off the text)
    for k, part in enumerate(parts):
      if k % 2:
        out.append((part, True))
      elif part:
        out.extend((p, False) for p in self._encode_piece(part))
    # SiglipTokenizer.tokenize drops a lone '▁' piece in front of a leading special token.
    if len(out) > 1 and out[1][1] and out[0][0] == SPIECE_UNDERLINE:
      out = out[1:]
    return [p for p, _ in out]

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` without the end token and without truncation (a piece not in the
    vocabulary reads as ``<unk>``, as transformers' ``_convert_token_to_id``)."""
    return [self._specials.get(p) if p in self._specials else self.sp.PieceToId(p) for p in self._pieces(text)]

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None, *,
               truncate: bool = True) -> np.ndarray:
    """int32 [B, context_length]: ids, end token, pad. Too long texts keep their first
    context_length-1 tokens and the end token last; with ``truncate=False`` they raise ValueError."""
    if isinstance(texts, str):
      texts = [texts]
    ctx = self.context_length if context_length is None else int(context_length)
    if ctx < 1:
      raise ValueError(f"context_length must be >= 1 (room for the end token), got {ctx}")
    out = np.full((len(texts), ctx), self.pad_id, np.int32)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(f"texts[{i}] is {type(text).__name__}, expected str")
      ids = self.encode(text)
      if len(ids) > ctx - 1 and not truncate:
        raise ValueError(f"texts[{i}] has {len(ids)} tokens, more than context_length - 1 = {ctx - 1}: "
                         f"{text[:60]!r}")
      ids = ids[:ctx - 1] + [self.eot_id]
      out[i, :len(ids)] = ids
    return out

  # ---------------------------------------------------------------- decoding / display
  def _check_ids(self, ids: list[int]) -> None:
    for i in ids:
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is not in the vocabulary (size {self.vocab_size})")

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of ``ids``; ``skip_special_tokens`` drops the end, padding and ``<unk>`` ids (as
    transformers' ``decode(skip_special_tokens=True)``: a row's padding reads as nothing)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    self._check_ids(ids)
    if skip_special_tokens:
      ids = [i for i in ids if i not in (self.eot_id, self.pad_id, self.unk_id)]
    return self.sp.decode(ids).strip()

  def tokens_of(self, text: str, raw: bool = False) -> list[str]:
    """Per-token strings aligned with ``encode(text)`` (row position i holds token i: no start token).

    raw=True: the SentencePiece pieces ('▁cat'; an unknown character as itself), as transformers'
    ``tokenize``. Otherwise display strings: the word-start marker
    '▁' shown as a leading space, so that ''.join(...) reads as the cleaned text.
    """
    pieces = self._pieces(text)
    return pieces if raw else [p.replace(SPIECE_UNDERLINE, " ") for p in pieces]

  def __repr__(self) -> str:
    return (f"SentencePieceTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"pad_id={self.pad_id}, clean={self.clean!r})")
