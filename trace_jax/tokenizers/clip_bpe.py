"""CLIP's byte-level BPE tokenizer in pure Python (stdlib ``re`` + ``unicodedata``, no ``regex`` needed).

Two text-cleaning modes, because the two references disagree:

* ``clean='hf'`` (default) reproduces transformers' ``CLIPTokenizer`` (the tokenizers-backed one of
  transformers >= 5): NFC, whitespace runs -> ' ', per-character lower-casing (so no Greek final sigma),
  and ``<|startoftext|>`` / ``<|endoftext|>`` written literally in the raw text become the special ids.
  No ftfy, no html unescaping.
* ``clean='openai'`` reproduces openai/CLIP's and open_clip's ``SimpleTokenizer``: ``ftfy.fix_text``
  (when ftfy is importable; otherwise only NFC, see docs/tokenizers.md), ``html.unescape`` twice,
  strip + whitespace clean, ``str.lower()``.

Both then split with CLIP's pattern
``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` (``\\p{..}`` classes are generated from
``unicodedata``; ``\\s`` is Unicode White_Space, as in both ``regex`` and the Rust tokenizers), map the
UTF-8 bytes to printable characters (GPT-2's ``bytes_to_unicode``) and apply the merges to each piece with
``</w>`` on its last symbol. Vocabulary layout (notes/checkpoint-formats.md, "Tokenizer files"): 256 byte
tokens, their 256 ``</w>`` variants, one token per merge (CLIP uses the first 49152-256-2 merges of
``bpe_simple_vocab_16e6.txt.gz``), then ``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407.
"""
from __future__ import annotations

import codecs
import functools
import gzip
import html
import json
import os
import re
import unicodedata
from typing import Sequence

import numpy as np

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
EOW = "</w>"
# notes/checkpoint-formats.md, "Tokenizer files": CLIP uses the first 49152 - 256 - 2 merges.
NUM_MERGES = 49152 - 256 - 2
DEFAULT_CONTEXT_LENGTH = 77
OPTIONS_FILE = "trace_jax_tokenizer.json"
CLEAN_MODES = ("hf", "openai")

# Unicode White_Space: what `\s` means in the `regex` package (openai/CLIP) and in Oniguruma (the Rust
# tokenizers behind transformers). Python's `re` `\s` also takes U+001C..U+001F, so it is not used.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_CONTRACTIONS = r"'s|'t|'re|'ve|'m|'ll|'d"


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP map byte -> printable character; its value order is the order of the 256 byte tokens."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _ranges(flags: Sequence[bool]) -> str:
  """Regex class body (escaped ranges) for the code points where `flags` is true."""
  parts, start = [], None
  for c, f in enumerate(list(flags) + [False]):
    if f and start is None:
      start = c
    elif not f and start is not None:
      a, b = start, c - 1
      parts.append(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}")
      start = None
  return "".join(parts)


@functools.lru_cache(maxsize=None)
def _letter_number_classes() -> tuple[str, str]:
  """Class bodies equivalent to \\p{L} and \\p{N}, built once (~0.3 s) from unicodedata's categories."""
  major = [unicodedata.category(chr(c))[0] for c in range(0x110000)]
  return _ranges([m == "L" for m in major]), _ranges([m == "N" for m in major])


@functools.lru_cache(maxsize=None)
def _split_pattern(clean: str) -> re.Pattern:
  letters, numbers = _letter_number_classes()
  if clean == "openai":
    # openai/CLIP compiles its pattern with re.IGNORECASE: that only matters for the contractions (e.g.
    # "'ſ" matches "'s"), and it makes `regex` drop U+0345 (it case-folds to a letter but is Mn), so
    # U+0345 matches no alternative there either.
    contractions, other_extra = f"(?i:{_CONTRACTIONS})", "\u0345"
    specials = f"{re.escape(SOT)}|{re.escape(EOT)}|"
  else:
    # transformers splits the literal special tokens off the raw text before normalising (see encode).
    contractions, other_extra, specials = _CONTRACTIONS, "", ""
  return re.compile(f"{specials}{contractions}|[{letters}]+|[{numbers}]"
                    f"|[^{_WHITESPACE}{letters}{numbers}{other_extra}]+")


_WS_RUN = re.compile(f"[{_WHITESPACE}]+")
_SPECIAL_SPLIT = re.compile(f"({re.escape(SOT)}|{re.escape(EOT)})")


def clean_hf(text: str) -> str:
  """transformers CLIPTokenizer's normaliser: NFC, whitespace runs -> ' ', per-character lower-case."""
  text = _WS_RUN.sub(" ", unicodedata.normalize("NFC", text))
  # Per character, like the Rust normaliser: str.lower() would turn a word-final 'Σ' into 'ς'.
  return "".join(c.lower() for c in text)


def clean_openai(text: str) -> str:
  """openai/CLIP basic_clean + whitespace_clean + lower (ftfy when installed, else NFC only)."""
  try:
    import ftfy
    text = ftfy.fix_text(text)
  except ImportError:  # documented difference: no mojibake/ligature/etc. fixing without ftfy
    text = unicodedata.normalize("NFC", text)
  text = html.unescape(html.unescape(text)).strip()
  return _WS_RUN.sub(" ", text).strip().lower()


def _bpe_merge(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
  """Greedy BPE: repeatedly merge every occurrence (left to right) of the lowest-ranked adjacent pair."""
  while len(word) > 1:
    pairs = set(zip(word[:-1], word[1:]))
    best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
    if best not in ranks:
      break
    first, second = best
    merged, i = [], 0
    while i < len(word):
      if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
        merged.append(first + second)
        i += 2
      else:
        merged.append(word[i])
        i += 1
    word = tuple(merged)
  return word


def _parse_merge(line: str, where: str) -> tuple[str, str]:
  parts = line.split(" ")
  if len(parts) != 2 or not parts[0] or not parts[1]:
    raise ValueError(f"{where}: malformed merge line {line!r} (expected two symbols separated by one space)")
  return parts[0], parts[1]


class CLIPTokenizer:
  """CLIP BPE tokenizer. ``tok(texts) -> int32 [B, context_length]`` rows ``sot, tokens..., eot, pad...``.

  Args:
    encoder: token string -> id (``vocab.json``); must hold ``<|startoftext|>`` and ``<|endoftext|>``.
    merges: merge pairs in rank order (lowest rank merges first).
    context_length: row length of ``__call__`` (77 for every released CLIP).
    pad_id: id written after the end token. ``None`` (default) pads with the end-token id 49407, as
      transformers' CLIPTokenizer does (tests/test_tokenizers.py compares padded rows with it);
      open_clip pads with 0. Both pool correctly in CLIP's text tower: argmax pooling takes the
      *first* maximum (the real end token) and 'eos' pooling the first end token; the causal mask
      keeps padding from changing the pooled position.
    clean: 'hf' (transformers parity, default) or 'openai' (openai/CLIP and open_clip parity).
  """

  def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]], *,
               context_length: int = DEFAULT_CONTEXT_LENGTH, pad_id: int | None = None,
               clean: str = "hf", cache_size: int = 1 << 16):
    for special in (SOT, EOT):
      if special not in encoder:
        raise ValueError(f"CLIP vocabulary has no {special!r} token")
    if clean not in CLEAN_MODES:
      raise ValueError(f"clean must be one of {CLEAN_MODES}, got {clean!r}")
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2 (start + end token), got {context_length}")
    self.encoder = dict(encoder)
    self.decoder = {i: t for t, i in self.encoder.items()}
    self.merges = [tuple(m) for m in merges]
    self.ranks = {m: r for r, m in reversed(list(enumerate(self.merges)))}  # first occurrence wins
    self.context_length = int(context_length)
    self.sot_id = self.encoder[SOT]
    self.eot_id = self.encoder[EOT]
    self.unk_id = self.eot_id  # transformers' unk_token is <|endoftext|>
    self.pad_id = self.eot_id if pad_id is None else int(pad_id)
    self.clean = clean
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    self._pattern = _split_pattern(clean)
    # Per-word cache; built per instance so that the cache does not keep `self` alive globally.
    self._bpe = functools.lru_cache(maxsize=cache_size)(self._bpe_uncached)

  # ---------------------------------------------------------------- loading / saving
  @classmethod
  def from_files(cls, vocab_json: str, merges_txt: str, **kwargs) -> "CLIPTokenizer":
    """From the Hugging Face layout: ``vocab.json`` (token -> id) and ``merges.txt`` ('#version' header)."""
    try:
      with open(vocab_json, encoding="utf-8") as f:
        encoder = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{vocab_json}: not valid JSON ({e})") from None
    if not isinstance(encoder, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in encoder.items()):
      raise ValueError(f"{vocab_json}: expected a JSON object mapping token strings to integer ids")
    if len(set(encoder.values())) != len(encoder):
      raise ValueError(f"{vocab_json}: token ids are not unique")
    with open(merges_txt, encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = []
    for n, line in enumerate(lines, 1):
      if (n == 1 and line.startswith("#version")) or not line.strip():
        continue
      a, b = _parse_merge(line, f"{merges_txt}:{n}")
      for sym in (a, b, a + b):
        if sym not in encoder:
          raise ValueError(f"{merges_txt}:{n}: merge {line!r} uses {sym!r}, which is not in {vocab_json}")
      merges.append((a, b))
    try:
      return cls(encoder, merges, **kwargs)
    except ValueError as e:
      raise ValueError(f"{vocab_json}: {e}") from None

  @classmethod
  def from_bpe_gz(cls, path: str, num_merges: int = NUM_MERGES, **kwargs) -> "CLIPTokenizer":
    """From an OpenAI-style ``bpe_simple_vocab_16e6.txt.gz``: a header line, then merges, one per line."""
    try:
      with gzip.open(path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not a gzip-compressed UTF-8 BPE merges file ({e})") from None
    body = lines[1:num_merges + 1]
    if len(body) < num_merges or not all(body):
      have = sum(1 for line in body if line)
      raise ValueError(f"{path}: has {have} merges, CLIP needs the first {num_merges}")
    merges = [_parse_merge(line, f"{path}:{n}") for n, line in enumerate(body, 2)]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + EOW for t in byte_tokens] + [a + b for a, b in merges] + [SOT, EOT]
    return cls({t: i for i, t in enumerate(vocab)}, merges, **kwargs)

  def save(self, directory: str) -> str:
    """Write ``vocab.json`` + ``merges.txt`` (transformers-readable) and our options; returns the dir."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(self.encoder, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
    with open(os.path.join(directory, OPTIONS_FILE), "w") as f:
      json.dump(self.options(), f, indent=2)
    return directory

  def options(self) -> dict:
    return {"type": "clip_bpe", "context_length": self.context_length, "pad_id": self.pad_id,
            "clean": self.clean}

  @property
  def vocab_size(self) -> int:
    return max(self.encoder.values()) + 1

  # ---------------------------------------------------------------- encoding
  def _bpe_uncached(self, piece: str) -> tuple[str, ...]:
    chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
    return _bpe_merge(tuple(chars[:-1]) + (chars[-1] + EOW,), self.ranks)

  def _pieces(self, text: str) -> list[tuple[str, bool]]:
    """(piece, is_special) in order; specials become their ids, other pieces go through BPE."""
    if self.clean == "openai":
      return [(p, p in (SOT, EOT)) for p in self._pattern.findall(clean_openai(text))]
    out = []
    for k, seg in enumerate(_SPECIAL_SPLIT.split(text)):
      if k % 2:
        out.append((seg, True))
      elif seg:
        out.extend((p, False) for p in self._pattern.findall(clean_hf(seg)))
    return out

  def _tokens(self, text: str) -> list[str]:
    toks = []
    for piece, special in self._pieces(text):
      toks.extend((piece,) if special else self._bpe(piece))
    return toks

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` without start/end tokens and without truncation."""
    return [self.encoder.get(t, self.unk_id) for t in self._tokens(text)]

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None, *,
               truncate: bool = True) -> np.ndarray:
    """int32 [B, context_length]: sot, ids, eot, pad. Too long texts keep their first
    context_length-2 tokens and the end token at the last position (transformers truncation=True);
    with ``truncate=False`` they raise ValueError."""
    if isinstance(texts, str):
      texts = [texts]
    ctx = self.context_length if context_length is None else int(context_length)
    if ctx < 2:
      raise ValueError(f"context_length must be >= 2 (start + end token), got {ctx}")
    out = np.full((len(texts), ctx), self.pad_id, np.int32)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(f"texts[{i}] is {type(text).__name__}, expected str")
      ids = self.encode(text)
      if len(ids) > ctx - 2 and not truncate:
        raise ValueError(f"texts[{i}] has {len(ids)} tokens, more than context_length - 2 = {ctx - 2}: "
                         f"{text[:60]!r}")
      ids = [self.sot_id] + ids[:ctx - 2] + [self.eot_id]
      out[i, :len(ids)] = ids
    return out

  def word_boundaries(self) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) bool [vocab_size]: which token ids begin / end a word. CLIP BPE marks the last
    piece of a word with '</w>' (so a word ends where such a token is); no piece marks a start.
    Special and padding tokens count as both (a word next to them is whole)."""
    ends = np.zeros(self.vocab_size, bool)
    for t, i in self.encoder.items():
      ends[i] = t.endswith(EOW)
    starts = np.zeros(self.vocab_size, bool)
    for i in (self.sot_id, self.eot_id, self.pad_id):
      starts[i] = ends[i] = True
    return starts, ends

  # ---------------------------------------------------------------- decoding / display
  def _bytes_of(self, token: str) -> bytes:
    return bytes(self.byte_decoder[c] for c in token if c in self.byte_decoder)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids` (as in openai/CLIP and transformers: '</w>' becomes a space). With
    `skip_special_tokens`, a leading start token is dropped and decoding stops at the first end token
    (what follows it in a row is padding)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if skip_special_tokens:
      if self.eot_id in ids:
        ids = ids[:ids.index(self.eot_id)]
      ids = [i for i in ids if i != self.sot_id]
    for i in ids:
      if i not in self.decoder:
        raise ValueError(f"token id {i} is not in the vocabulary (size {self.vocab_size})")
    text = "".join(self.decoder[i] for i in ids)
    specials = {SOT, EOT}
    chunks = re.split(f"({re.escape(SOT)}|{re.escape(EOT)})", text)
    text = "".join(c if c in specials else self._bytes_of(c).decode("utf-8", errors="replace")
                   for c in chunks)
    return text.replace(EOW, " ").strip()

  def tokens_of(self, text: str, raw: bool = False) -> list[str]:
    """Per-token strings aligned with ``encode(text)`` (row position i+1 holds token i).

    raw=True: BPE symbols such as 'hello</w>'. Otherwise display strings: the characters completed by each
    token's bytes (a multi-byte character split over several tokens is shown on the token that finishes
    it; the others get ''), plus a trailing ' ' on word-final tokens, so that ''.join(...) is the cleaned
    text.
    """
    toks = self._tokens(text)
    if raw:
      return toks
    out, dec = [], codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in toks:
      if t in (SOT, EOT):
        out.append(dec.decode(b"", final=True) + t)
        continue
      end = t.endswith(EOW)
      s = dec.decode(self._bytes_of(t[:-len(EOW)] if end else t), final=end)
      out.append(s + (" " if end else ""))
    return out

  def __repr__(self) -> str:
    return (f"CLIPTokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"context_length={self.context_length}, pad_id={self.pad_id}, clean={self.clean!r})")
