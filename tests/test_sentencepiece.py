"""SigLIP's SentencePiece tokenizer (trace_jax/tokenizers/sentencepiece.py) against transformers'
``SiglipTokenizer`` and open_clip 2.23.0's ``HFTokenizer(clean='canonicalize')`` (the tokenizer of its
``ViT-*-SigLIP*`` configs), on a SentencePiece model trained in the test (T5 layout: pad 0, ``</s>`` 1,
``<unk>`` 2, no BOS, unigram) from generated strings. Compared: full rows (64 and a short 16-token
context, so long texts are truncated), untruncated ids, pieces and decoding, exactly (ids are integers).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import require_peer
from test_tokenizers import _make_strings  # punctuation, case, accents, scripts, emoji, html, long texts

STRINGS = _make_strings(600, seed=20)
# literal special tokens, '▁' in the text, underscores, empty / blank texts
EXTRA = ["hello </s> world", "</s>", "</s> a", "a </s>", "<unk> thing", "x</s></s>y", "</S> loud", "<UNK>",
         "\u2581under\u2581score", "under_score", "\u2581", "\u2581\u2581a", " \u2581 </s>", "a\u2581</s>",
         "A Photo, of: the DOG!!", "  spaces   and\ttabs\n", "", "   "]
TEXTS = STRINGS + EXTRA
CTX = 64


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
  spm = require_peer("sentencepiece")
  d = tmp_path_factory.mktemp("spm")
  corpus = d / "corpus.txt"
  corpus.write_text("\n".join(s for s in _make_strings(400, seed=7) if s.strip()), encoding="utf-8")
  # character_coverage < 1: rare characters stay out of the vocabulary (read as <unk>)
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tiny"), vocab_size=400,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 character_coverage=0.995, minloglevel=2)
  return str(d / "tiny.model")


@pytest.fixture(scope="module")
def hf(spm_file):
  transformers = require_peer("transformers")
  return transformers.SiglipTokenizer(vocab_file=spm_file)


def _rows(hf_tok, texts, ctx):
  return np.asarray(hf_tok(list(texts), padding="max_length", max_length=ctx, truncation=True).input_ids)


@pytest.mark.parametrize("ctx", [CTX, 16])
def test_rows_equal_transformers_siglip_tokenizer(spm_file, hf, ctx):
  from trace_jax.tokenizers import SentencePieceTokenizer
  ours = SentencePieceTokenizer(spm_file, context_length=ctx)
  got, want = ours(TEXTS), _rows(hf, TEXTS, ctx)
  assert got.shape == want.shape == (len(TEXTS), ctx) and got.dtype == np.int32
  bad = np.flatnonzero((got != want).any(-1))
  assert bad.size == 0, [(TEXTS[i][:50], want[i][:12].tolist(), got[i][:12].tolist()) for i in bad[:5]]
  # the rows exercise truncation (end token last), padding with the end id 1 and unknown pieces
  assert (got[:, -1] == 1).all() and ours.pad_id == ours.eot_id == 1


def test_untruncated_ids_pieces_and_decode_equal_transformers(spm_file, hf):
  from trace_jax.tokenizers import SentencePieceTokenizer
  ours = SentencePieceTokenizer(spm_file)
  assert (ours.eot_id, ours.unk_id, ours.vocab_size) == (hf.eos_token_id, hf.unk_token_id, hf.vocab_size)
  long = [t for t in TEXTS if len(hf(t, add_special_tokens=False).input_ids) > CTX]
  assert len(long) >= 20  # long texts are compared untruncated
  assert any(ours.unk_id in hf(t).input_ids for t in TEXTS)  # and some hold unknown characters
  for t in TEXTS:
    assert ours.encode(t) == hf(t, add_special_tokens=False).input_ids, t[:60]
  for t in STRINGS[:200]:
    assert ours.tokens_of(t, raw=True) == hf.tokenize(t), t[:60]
    row = ours([t])[0]
    assert ours.decode(row) == hf.decode(row, skip_special_tokens=True).strip(), t[:60]
  assert "".join(ours.tokens_of("A Photo, of the DOG!")).strip() == "a photo of the dog"


def test_openclip_cleaning_equals_open_clip_hf_tokenizer(spm_file, hf, tmp_path):
  require_peer("open_clip", "open_clip_torch")
  from open_clip.tokenizer import HFTokenizer
  from trace_jax.tokenizers import SentencePieceTokenizer
  hf.save_pretrained(str(tmp_path / "hf"))
  theirs = HFTokenizer(str(tmp_path / "hf"), context_length=CTX, clean="canonicalize")
  ours = SentencePieceTokenizer(spm_file, clean="openclip")
  want = theirs(TEXTS).numpy()
  got = ours(TEXTS)
  bad = np.flatnonzero((got != want).any(-1))
  assert bad.size == 0, [(TEXTS[i][:50], want[i][:12].tolist(), got[i][:12].tolist()) for i in bad[:5]]
  # the modes differ where open_clip's cleaning differs: html entities, '_' -> ' ', literal specials
  hf_mode = SentencePieceTokenizer(spm_file)
  for t in ("AT&amp;T", "under_score", "a </s> b"):
    assert ours.encode(t) != hf_mode.encode(t), t


def test_save_load_through_model_dir_and_errors(spm_file, hf, tmp_path):
  from trace_jax.tokenizers import SentencePieceTokenizer, check_one_kind, load_tokenizer, text_warnings
  transformers = require_peer("transformers")
  ours = SentencePieceTokenizer(spm_file, context_length=CTX, clean="openclip")
  d = ours.save(str(tmp_path / "md" / "tokenizer"))
  assert sorted(os.listdir(d)) == ["spiece.model", "trace_jax_tokenizer.json"]
  back = load_tokenizer(str(tmp_path / "md"))
  assert isinstance(back, SentencePieceTokenizer) and back.clean == "openclip" and back.context_length == CTX
  np.testing.assert_array_equal(back(TEXTS[:50]), ours(TEXTS[:50]))
  # the stored model is the same SentencePiece model for transformers too
  re_hf = transformers.SiglipTokenizer(vocab_file=os.path.join(d, "spiece.model"))
  np.testing.assert_array_equal(_rows(re_hf, TEXTS[:50], CTX), _rows(hf, TEXTS[:50], CTX))
  # a context length in the model's config.json wins (as for the other tokenizers)
  assert load_tokenizer(str(tmp_path / "md"), context_length=16)(["a"]).shape == (1, 16)
  # a dropped tail is counted against ctx - 1 (no start token)
  w = text_warnings(back, ["cat " * 70], CTX)
  assert any("the context holds 63" in m for m in w), w

  (tmp_path / "md" / "tokenizer" / "vocab.json").write_text("{}")
  with pytest.raises(ValueError, match="2 kinds.*SentencePiece: spiece.model"):
    check_one_kind(d)
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
    SentencePieceTokenizer(str(bad))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    SentencePieceTokenizer.from_file(str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="clean must be one of"):
    SentencePieceTokenizer(spm_file, clean="lower")
  with pytest.raises(ValueError, match="more than context_length - 1 = 15"):
    SentencePieceTokenizer(spm_file, context_length=16)(["cat " * 30], truncate=False)
  with pytest.raises(ValueError, match="not in the vocabulary"):
    ours.decode([5, 10_000])
  opts = tmp_path / "o" / "tokenizer"
  ours.save(str(opts))
  (opts / "trace_jax_tokenizer.json").write_text('{"type": "clip_bpe"}')
  with pytest.raises(ValueError, match="for a sentencepiece tokenizer"):
    load_tokenizer(str(tmp_path / "o"))


def test_token_strip_positions_for_sentencepiece_rows(spm_file):
  """SigLIP rows have no start token: the text's tokens are positions 0 .. n-1, the end token at n (it
  also pads). The CLI strip and the serve page's token scores read exactly those positions."""
  from trace_jax.serve.engine import token_scores
  from trace_jax.tokenizers import SentencePieceTokenizer, text_span, token_strings
  tok = SentencePieceTokenizer.from_file(spm_file, context_length=32)
  text = "a small cat sits on the mat"
  ids = tok.encode(text)
  row = tok([text])[0]
  assert text_span(tok, row) == (0, len(ids))
  assert token_strings(tok, text, row) == [t.strip() or "·" for t in tok.tokens_of(text)][:len(ids)]
  attr = np.arange(32, dtype=np.float64)[::-1]            # decreasing: the first token scores highest
  pairs = token_scores(tok, text, row, attr)
  assert len(pairs) == len(ids) and abs(pairs[0][1] - 1) < 1e-6 and abs(pairs[-1][1]) < 1e-9
