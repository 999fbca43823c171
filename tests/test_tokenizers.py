"""Tokenizers: parity of our CLIP BPE with transformers' CLIPTokenizer and open_clip's SimpleTokenizer on
1,200 generated strings, loaders, bad files, and the word-level tokenizer."""
import gzip
import importlib.util
import json
import os
import random
import sys
import unicodedata

import numpy as np
import pytest

from trace_jax.tokenizers import CLIPTokenizer, WordTokenizer, build_vocab, load_tokenizer
from trace_jax.tokenizers.clip_bpe import NUM_MERGES, bytes_to_unicode

N_STRINGS = 1200
CTX = 77


def _peer_or_skip(name):
  if importlib.util.find_spec(name) is None:
    if os.environ.get("CI"):
      raise ImportError(f"{name} (a peer) is not installed")
    pytest.skip(f"{name} (the peers) not installed")


def _open_clip_simple_tokenizer():
  """open_clip's SimpleTokenizer class, loaded from its file alone (importing the open_clip package pulls
  in all its models and timm: slow)."""
  from conftest import torch_or_skip
  torch_or_skip()  # open_clip/tokenizer.py imports torch
  _peer_or_skip("open_clip")
  path = os.path.join(importlib.util.find_spec("open_clip").submodule_search_locations[0], "tokenizer.py")
  spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SimpleTokenizer


def _bpe_gz():
  _peer_or_skip("open_clip")
  path = os.path.join(importlib.util.find_spec("open_clip").submodule_search_locations[0],
                      "bpe_simple_vocab_16e6.txt.gz")
  assert os.path.isfile(path), path
  return path


# ------------------------------------------------------------------ deterministic test strings
_WORDS = ["a", "photo", "of", "the", "cat", "dog", "sitting", "on", "red", "sofa", "tokenization",
          "supercalifragilistic", "hello", "world", "Zebra", "QUICK", "brown", "fox", "jumps", "LaTeX",
          "iPhone", "McDonald", "x-ray", "e-mail", "naïve", "café", "Ångström", "jalapeño", "Straße",
          "façade", "crème", "brûlée", "Ørsted", "Łódź", "İstanbul", "ΟΔΟΣ", "Σοφία", "МОСКВА", "привет",
          "東京タワー", "中文字符", "한국어", "日本語のテキスト", "ภาษาไทย", "العربية", "עברית", "हिन्दी",
          "ﬁne", "ﬀ", "ſtraße", "\u212aelvin", "ǅemal", "e\u0301clair", "cafe\u0301", "n\u0303o",
          "cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "don't", "it's", "WE'LL", "they're", "I'VE", "I'm", "she'd",
          "'S", "o'clock", "rock'n'roll", "’curly’", "“double”", "<b>bold</b>"]
_PUNCT = [".", ",", "!", "?", "...", "!!!", "?!", ";", ":", "-", "--", "—", "–", "(", ")", "[x]", "{y}",
          "\"", "'", "`", "~", "@", "#hashtag", "$", "%", "^", "&", "*", "_", "+", "=", "|", "\\", "/",
          "<", ">", "©", "®", "™", "°", "±", "§", "¶", "•", "…", "¿", "¡", "«", "»", "‰", "€", "£", "¥"]
_NUMBERS = ["0", "7", "42", "2023", "3.14159", "1,000,000", "-5", "+12", "1e-5", "10%", "$9.99",
            "٣", "१२", "½", "²", "Ⅻ", "①", "０１２", "12th", "4K", "v2.0"]
_EMOJI = ["😀", "👍", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️", "🔥🔥", "🙂🙃", "☃", "✨", "🐱", "🤖"]
_HTML = ["&amp;", "&lt;b&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&amp;amp;", "&eacute;", "&copy;",
         "&lt;3", "AT&amp;T"]
_SPACE = [" ", " ", " ", "  ", "   ", "\t", "\n", "\r\n", " \n\t ", "\u00a0", "\u3000", "\u2009",
          "\u200b", "\x1c", "\x1f", "\x85", "\u2028", "\ufeff", "\x0b", "\x0c"]


def _make_strings(n=N_STRINGS, seed=20240607):
  rng = random.Random(seed)
  pools = [_WORDS] * 8 + [_PUNCT] * 2 + [_NUMBERS] * 2 + [_EMOJI, _HTML]
  out = ["", " ", "   \n ", "a", "A.", "hello world", "Hello, World!", "ΟΔΟΣ ΣΑΣ", "&amp;"]
  while len(out) < n:
    k = len(out)
    if k % 10 == 0:  # long texts: well beyond 77 tokens
      n_parts = rng.randint(60, 160)
    else:
      n_parts = rng.randint(1, 14)
    parts = []
    for _ in range(n_parts):
      tok = rng.choice(rng.choice(pools))
      r = rng.random()
      if r < 0.15:
        tok = tok.upper()
      elif r < 0.25:
        tok = tok.capitalize()
      parts.append(tok)
      parts.append(rng.choice(_SPACE) if rng.random() < 0.8 else "")
    s = "".join(parts)
    if rng.random() < 0.1:
      s = rng.choice(_SPACE) + s
    out.append(s)
  return out


STRINGS = _make_strings()
# open_clip 2.23 names its specials <start_of_text>/<end_of_text>, transformers <|startoftext|>: literal
# special tokens are only compared with transformers.
WITH_SPECIALS = ["x<|endoftext|>y", "<|startoftext|>a photo<|endoftext|>", "<|ENDOFTEXT|> loud",
                 "a<|endoftext|><|endoftext|>b", "<|endoftext|>\u0301é"]


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
  """vocab.json + merges.txt written here from open_clip's .gz (independently of our loaders)."""
  gz = _bpe_gz()
  merges = gzip.open(gz).read().decode("utf-8").split("\n")[1:NUM_MERGES + 1]
  byte_tokens = list(bytes_to_unicode().values())
  assert len(set(byte_tokens)) == 256
  vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  assert len(vocab) == 49408
  d = tmp_path_factory.mktemp("hf_tok")
  with open(d / "vocab.json", "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(d / "merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  return str(d / "vocab.json"), str(d / "merges.txt"), gz


@pytest.fixture(scope="module")
def hf(hf_files):
  _peer_or_skip("transformers")
  from transformers import CLIPTokenizer as HFCLIPTokenizer
  return HFCLIPTokenizer(hf_files[0], hf_files[1])


@pytest.fixture(scope="module")
def ours(hf_files):
  return {"gz": CLIPTokenizer.from_bpe_gz(hf_files[2]), "files": CLIPTokenizer.from_files(*hf_files[:2])}


def test_loaders_agree(ours):
  a, b = ours["gz"], ours["files"]
  assert a.encoder == b.encoder and a.merges == b.merges
  assert a.vocab_size == 49408 and len(a.merges) == 49152 - 256 - 2
  assert (a.sot_id, a.eot_id, a.pad_id, a.context_length) == (49406, 49407, 49407, 77)


def test_parity_with_transformers_rows(ours, hf):
  texts = STRINGS + WITH_SPECIALS
  ref = np.asarray(hf(texts, padding="max_length", max_length=CTX, truncation=True)["input_ids"])
  assert ref.shape == (len(texts), CTX)
  n_full = int((ref[:, -2] != hf.pad_token_id).sum())  # >= 75 text tokens: truncated (or exactly full)
  assert n_full >= 100, "the generated strings must exercise truncation"
  for name, tok in ours.items():
    got = tok(texts)
    assert got.dtype == np.int32 and got.shape == ref.shape
    bad = [i for i in range(len(texts)) if not np.array_equal(got[i], ref[i])]
    assert not bad, f"{name}: {len(bad)} rows differ, first {texts[bad[0]]!r}:\n{got[bad[0]]}\n{ref[bad[0]]}"


def test_parity_with_transformers_untruncated(ours, hf):
  texts = STRINGS + WITH_SPECIALS
  ref = hf(texts, add_special_tokens=False)["input_ids"]
  tok = ours["files"]
  bad = [i for i, t in enumerate(texts) if tok.encode(t) != ref[i]]
  assert not bad, f"{len(bad)} differ, first {texts[bad[0]]!r}"
  assert max(map(len, ref)) > 200


def test_decode_and_tokens_of(ours, hf):
  tok = ours["files"]
  for t in STRINGS[:400]:
    ids = tok.encode(t)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), t
    raw = tok.tokens_of(t, raw=True)
    assert [tok.encoder[r] for r in raw] == ids
    shown = tok.tokens_of(t)
    assert len(shown) == len(ids)
    assert "".join(shown).strip() == tok.decode(ids), t
  # a row decodes to its text (padding after the end token is ignored)
  assert tok.decode(tok("A photo of a cat.")[0]) == "a photo of a cat ."


def test_parity_with_open_clip_openai_cleaning(hf_files):
  SimpleTokenizer = _open_clip_simple_tokenizer()
  ref = SimpleTokenizer(hf_files[2])(STRINGS).numpy()
  tok = CLIPTokenizer.from_bpe_gz(hf_files[2], clean="openai", pad_id=0)
  got = tok(STRINGS)
  bad = [i for i in range(len(STRINGS)) if not np.array_equal(got[i], ref[i])]
  assert not bad, f"{len(bad)} rows differ, first {STRINGS[bad[0]]!r}:\n{got[bad[0]]}\n{ref[bad[0]]}"
  # the two cleanings really differ on these strings (html entities, ftfy fixes, final sigma)
  assert (tok(STRINGS) != CLIPTokenizer.from_bpe_gz(hf_files[2], pad_id=0)(STRINGS)).any(1).sum() > 50


def test_openai_cleaning_without_ftfy(hf_files, monkeypatch):
  """Without ftfy the 'openai' cleaning is NFC only: equal to open_clip where ftfy changes nothing."""
  SimpleTokenizer = _open_clip_simple_tokenizer()
  import ftfy
  texts = [t for t in STRINGS if ftfy.fix_text(t) == unicodedata.normalize("NFC", t)]
  assert len(texts) > 100
  ref = SimpleTokenizer(hf_files[2])(texts).numpy()
  monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy -> ImportError
  got = CLIPTokenizer.from_bpe_gz(hf_files[2], clean="openai", pad_id=0)(texts)
  np.testing.assert_array_equal(got, ref)


def test_truncation_padding_options(ours):
  tok = ours["gz"]
  long = " ".join(["cat"] * 200)
  row = tok(long)[0]
  assert row[0] == 49406 and row[-1] == 49407 and (row[1:-1] == tok.encoder["cat</w>"]).all()
  with pytest.raises(ValueError, match="200 tokens"):
    tok(long, truncate=False)
  short = tok(["a dog", "cat"], context_length=8)
  assert short.shape == (2, 8) and (short[1, 3:] == 49407).all()
  zero = CLIPTokenizer(tok.encoder, tok.merges, pad_id=0)(["cat"])[0]
  assert list(zero[:3]) == [49406, tok.encoder["cat</w>"], 49407] and (zero[3:] == 0).all()
  # argmax pooling (OpenAI convention) finds the real end token with either padding
  assert np.argmax(tok("cat")[0]) == 2 == np.argmax(zero)
  with pytest.raises(ValueError, match="context_length"):
    tok("cat", context_length=1)
  with pytest.raises(ValueError, match="clean"):
    CLIPTokenizer(tok.encoder, tok.merges, clean="ftfy")


def test_save_and_load_tokenizer(ours, tmp_path, hf):
  tok = CLIPTokenizer(ours["gz"].encoder, ours["gz"].merges, pad_id=0, clean="openai", context_length=32)
  tok.save(str(tmp_path / "m" / "tokenizer"))
  back = load_tokenizer(str(tmp_path / "m"))
  assert isinstance(back, CLIPTokenizer)
  assert (back.encoder, back.merges) == (tok.encoder, tok.merges)
  assert (back.pad_id, back.clean, back.context_length) == (0, "openai", 32)
  # the model's config.json context length wins over the tokenizer's own
  (tmp_path / "m" / "config.json").write_text(json.dumps({"text": {"context_length": 16}}))
  assert load_tokenizer(str(tmp_path / "m")).context_length == 16
  assert load_tokenizer(str(tmp_path / "m"), context_length=10).context_length == 10
  # saved files are readable by transformers and give the same ids
  from transformers import CLIPTokenizer as HFCLIPTokenizer
  h2 = HFCLIPTokenizer(str(tmp_path / "m" / "tokenizer" / "vocab.json"),
                       str(tmp_path / "m" / "tokenizer" / "merges.txt"))
  assert h2("A photo of Łódź!")["input_ids"] == hf("A photo of Łódź!")["input_ids"]


def test_load_tokenizer_gz_dir(hf_files, tmp_path):
  d = tmp_path / "tokenizer"
  d.mkdir()
  with open(hf_files[2], "rb") as src:
    (d / "bpe_simple_vocab_16e6.txt.gz").write_bytes(src.read())
  tok = load_tokenizer(str(tmp_path))
  assert isinstance(tok, CLIPTokenizer) and tok.vocab_size == 49408 and tok.context_length == 77
  assert load_tokenizer(str(d)).vocab_size == 49408  # a bare tokenizer directory also works


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")


def test_bad_tokenizer_files(tmp_path):
  vocab = {t: i for i, t in enumerate(["a", "b</w>", "ab</w>", "<|startoftext|>", "<|endoftext|>", "b"])}
  ok = tmp_path / "ok" / "tokenizer"
  _write(ok / "vocab.json", json.dumps(vocab))
  _write(ok / "merges.txt", "#version: 0.2\na b</w>\n")
  # 'ab' -> a + b</w> -> ab</w>; 'ba' -> b, a</w>, and 'a</w>' is unknown -> unk (= <|endoftext|>, as in HF)
  assert load_tokenizer(str(ok.parent)).encode("ab ba") == [2, 5, 4]

  v = json.dumps(vocab)
  cases = {  # name: (files, exception, message pattern)
      "bad_json": ({"vocab.json": "{not json", "merges.txt": "a b\n"}, ValueError,
                   r"vocab\.json: not valid JSON"),
      "json_list": ({"vocab.json": "[1, 2]", "merges.txt": "a b\n"}, ValueError,
                    r"vocab\.json: expected a JSON object"),
      "bad_merge": ({"vocab.json": v, "merges.txt": "#version: 0.2\na b</w>\nabc\n"}, ValueError,
                    r"merges\.txt:3: malformed merge line 'abc'"),
      "merge_oov": ({"vocab.json": v, "merges.txt": "a c\n"}, ValueError,
                    r"merges\.txt:1: merge 'a c' uses 'c'"),
      "no_special": ({"vocab.json": json.dumps({"a": 0}), "merges.txt": ""}, ValueError,
                     r"vocab\.json: .*<\|startoftext\|>"),
      "only_vocab": ({"vocab.json": v}, FileNotFoundError, r"merges\.txt is missing"),
      "bad_gz": ({"bpe.txt.gz": "plain text"}, ValueError, r"bpe\.txt\.gz: not a gzip"),
      "bad_words": ({"words.json": '{"words": "cat", "context_length": 8}'}, ValueError,
                    r"words\.json: expected"),
      "empty": ({"README": "nothing here"}, FileNotFoundError, r"no tokenizer files"),
  }
  for name, (files, exc, msg) in cases.items():
    d = tmp_path / name / "tokenizer"
    for fname, content in files.items():
      _write(d / fname, content)
    with pytest.raises(exc, match=msg):
      load_tokenizer(str(d.parent))
  with pytest.raises(FileNotFoundError, match="no tokenizer directory"):
    load_tokenizer(str(tmp_path / "nowhere"))
  short = tmp_path / "short" / "tokenizer" / "bpe.txt.gz"
  short.parent.mkdir(parents=True)
  short.write_bytes(gzip.compress(b"header\na b\n"))
  with pytest.raises(ValueError, match=r"has 1 merges, CLIP needs the first 48894"):
    load_tokenizer(str(tmp_path / "short"))


# ------------------------------------------------------------------ word-level tokenizer
WORDS = ["red", "green", "blue", "cube", "sphere", "left", "of", "a", "the"]


def test_word_tokenizer_ids_and_roundtrip(tmp_path):
  tok = WordTokenizer(WORDS, context_length=8)
  assert tok.vocab_size == len(WORDS) + 4
  assert (tok.pad_id, tok.unk_id, tok.sot_id, tok.eot_id) == (0, 1, 11, 12)
  rows = tok(["A red cube, left of the BLUE sphere!", "green"])
  assert rows.dtype == np.int32 and rows.shape == (2, 8)
  # written out from the definition: sot, then 2 + index of each word, eot, pad 0
  expect0 = [11] + [2 + WORDS.index(w) for w in ["a", "red", "cube", "left", "of", "the"]] + [12]
  assert rows[0].tolist() == expect0
  assert rows[1].tolist() == [11, 3, 12, 0, 0, 0, 0, 0]
  assert (rows.max(1) == tok.eot_id).all() and (np.argmax(rows, 1) == [7, 2]).all()
  assert tok.decode(rows[1]) == "green"
  assert tok.words_of("A red cube, left of the BLUE sphere!") == ["a", "red", "cube", "left", "of", "the"]
  back = WordTokenizer.load(tok.save(str(tmp_path)))
  assert back.words == WORDS and back.context_length == 8
  np.testing.assert_array_equal(back(["a red cube"]), tok(["a red cube"]))
  assert json.loads((tmp_path / "words.json").read_text()) == {"words": WORDS, "context_length": 8}
  assert isinstance(load_tokenizer(str(tmp_path)), WordTokenizer)


def test_word_tokenizer_unknown_and_truncation():
  tok = WordTokenizer(WORDS, context_length=5)
  assert tok.encode("a purple cube") == [9, 1, 5]
  assert tok.decode(tok("a purple cube")[0]) == "a <unk> cube"
  row = tok("red green blue cube sphere")[0]
  assert row.tolist() == [11, 2, 3, 4, 12]  # first ctx-2 words, eot kept last
  assert tok.words_of("red green blue cube sphere") == ["red", "green", "blue"]
  assert tok("red", context_length=3)[0].tolist() == [11, 2, 12]
  with pytest.raises(ValueError, match="out"):
    tok.decode([99])


def test_word_tokenizer_bad_input(tmp_path):
  with pytest.raises(ValueError, match="duplicate"):
    WordTokenizer(["a", "b", "a"], 8)
  with pytest.raises(ValueError, match="single lower-case word"):
    WordTokenizer(["red cube"], 8)
  with pytest.raises(ValueError, match="single lower-case word"):
    WordTokenizer(["Red"], 8)
  with pytest.raises(ValueError, match="context_length"):
    WordTokenizer(["a"], 1)
  p = tmp_path / "words.json"
  p.write_text("{broken")
  with pytest.raises(ValueError, match=r"words\.json: not valid JSON"):
    WordTokenizer.load(str(p))
  p.write_text(json.dumps({"words": ["a", "a"], "context_length": 4}))
  with pytest.raises(ValueError, match=r"words\.json: duplicate"):
    WordTokenizer.load(str(p))


def test_build_vocab():
  texts = ["A red cube.", "a blue cube!", "the red sphere", "red"]
  assert build_vocab(texts) == ["red", "a", "cube", "blue", "sphere", "the"]
  assert build_vocab(texts, min_count=2) == ["red", "a", "cube"]
