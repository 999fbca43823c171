"""TRACE on real vocabularies (issue 17): anchors from a GloVe / word2vec file, a hierarchy JSON (the
shipped COCO-Stuff one), caption words mapped to their CLIP BPE spans, training on the COCO fixture
and the COCO-Stuff evaluation with its real words.

References: the word matcher against a pure-Python matcher over the caption's words (independent of
token ids: it works on the text, then converts word positions to token positions with the BPE length
of each word); the shipped hierarchy against the COCO-Stuff class list of the builder; the anchor
rows against the vector file's own numbers.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fixtures_real as FX  # noqa: E402
from conftest import clip_bpe  # noqa: E402

from trace_jax.losses import trace as tl  # noqa: E402
from trace_jax.trace import anchors as A  # noqa: E402
from trace_jax.trace.vocab import COCOSTUFF_HIERARCHY, concepts, make_vocab, token_to_vocab, word_spans  # noqa: E402

CTX = 24


@pytest.fixture(scope="module")
def bpe():
  return clip_bpe(CTX)


def _glove(path, words, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  vecs = rng.normal(size=(len(words), dim)).astype(np.float32)
  with open(path, "w") as f:
    for w, v in zip(words, vecs):
      f.write(w + " " + " ".join(f"{x:.6f}" for x in v) + "\n")
  return dict(zip(words, vecs.astype(np.float64).round(6)))


def _reference_word_ids(tok, caption, words):
  """Pure-Python: whole-word occurrences of each (possibly multi-word) concept in the caption's words,
  longest first, non-overlapping; reported at the token position of the first word (BPE lengths)."""
  cw = caption.lower().replace(".", " .").split()
  lens = [len(tok.encode(w)) for w in cw]
  pos = 1 + np.cumsum([0] + lens[:-1])                 # token position of each caption word (after sot)
  parts = [w.split() for w in words]
  out, i = {}, 0
  while i < len(cw):
    best = max((k for k, p in enumerate(parts) if cw[i:i + len(p)] == p), key=lambda k: len(parts[k]), default=None)
    if best is None:
      i += 1
      continue
    out[int(pos[i])] = best
    i += len(parts[best])
  return out


def test_bpe_word_spans_match_whole_words(bpe):
  h = A.Hierarchy.from_dict({"coarse": ["animal", "outdoor", "furniture"],
                             "fine": {"cat": "animal", "skateboarder": "animal", "traffic light": "outdoor",
                                      "light": "furniture", "table": "furniture", "field": "outdoor"}})
  words = ["animal", "outdoor", "furniture", "cat", "skateboarder", "traffic light", "light", "table", "field"]
  vocab = A.build_vocab(h, words, np.eye(len(words)), include=words)
  seqs, lens, starts, ends = word_spans(bpe, vocab)
  assert lens[vocab.index("skateboarder")] == 2 and lens[vocab.index("traffic light")] == 2   # subword spans
  caps = ["a skateboarder near a traffic light and a cat", "cats and a bobcat under the light",
          "the light on a table in a field", "skateboarders eat ; a cat . furniture", "concatenate the animal traffic",
          "a playingfield and a skate boarder"]
  ids = bpe(caps)
  got = np.asarray(jax.jit(tl.match_words)(jnp.asarray(ids), jnp.asarray(seqs), jnp.asarray(lens),
                                           jnp.asarray(starts), jnp.asarray(ends)))
  for r, cap in enumerate(caps):
    want = np.full(CTX, -1)
    for p, k in _reference_word_ids(bpe, cap, list(vocab.words)).items():
      want[p] = k
    np.testing.assert_array_equal(got[r], want, err_msg=cap)
  # 'cats', 'bobcat', 'concatenate' ('con' 'cat' ...), 'playingfield' ('playing' 'field</w>') hold a
  # vocabulary word's tokens but are other words
  assert (got[1] >= 0).sum() == 1 and (got[4] >= 0).sum() == 1 and (got[5] >= 0).sum() == 0


def test_word_level_tokenizer_is_the_token_lookup():
  """With one token per word the matcher is exactly tok2vocab[ids] (the embedded set's path)."""
  from trace_jax.tokenizers import WordTokenizer
  words = ["red", "circle", "shape", "square", "on", "grass", "a"]
  tok = WordTokenizer(words, 12)
  h = A.Hierarchy.from_dict({"coarse": ["shape"], "fine": {"circle": "shape", "square": "shape"}})
  vocab = A.build_vocab(h, ["shape", "circle", "square"], np.eye(3))
  ids = np.random.default_rng(0).integers(0, tok.vocab_size, (16, 12)).astype(np.int32)
  spans = [jnp.asarray(a) for a in word_spans(tok, vocab)]
  np.testing.assert_array_equal(np.asarray(tl.match_words(jnp.asarray(ids), *spans)), token_to_vocab(tok, vocab)[ids])


def test_vector_files_and_multiword_concepts(tmp_path):
  words = ["traffic", "light", "cat", "animal"]
  table = _glove(str(tmp_path / "g.txt"), words)
  A.save_word2vec_binary(str(tmp_path / "w.bin"), words, np.stack([table[w] for w in words]))
  with open(tmp_path / "w.txt", "w") as f:
    f.write(f"{len(words)} 6\n" + open(tmp_path / "g.txt").read())
  for name in ("g.txt", "w.bin", "w.txt"):
    kept, vecs, dropped = A.concept_vectors(str(tmp_path / name), ["cat", "traffic light", "zebra", "animal"])
    assert kept == ["cat", "traffic light", "animal"] and dropped == ["zebra"]
    np.testing.assert_allclose(vecs[1], (table["traffic"] + table["light"]) / 2, atol=1e-6)
    np.testing.assert_allclose(vecs[0], table["cat"], atol=1e-6)
  with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
    A.load_vectors(str(tmp_path / "nope.txt"))


def test_shipped_cocostuff_hierarchy_covers_every_class():
  from trace_jax.data.real.coco import COCOSTUFF_NAMES
  raw = json.load(open(COCOSTUFF_HIERARCHY))
  h, open_words = concepts(COCOSTUFF_HIERARCHY)
  assert open_words == ()
  assert sorted(n for ns in raw["official"].values() for n in ns) == sorted(COCOSTUFF_NAMES)   # 182, once each
  words = set(h.coarse) | set(h.fine)
  for sc, names in raw["official"].items():
    for n in names:      # each class is grounded by its caption word (coco.py: the head of a stuff name)
      w = n.split("-")[0]
      assert w in words, n
      parent = h.coarse[h.parent[h.fine.index(w)]] if w in h.fine else w
      assert parent in words
  assert h.coarse[h.parent[h.fine.index("giraffe")]] == "animal"
  assert h.coarse[h.parent[h.fine.index("grass")]] == "plant"
  assert len(h.coarse) == 25


def test_missing_coarse_vector_is_named(tmp_path):
  _glove(str(tmp_path / "g.txt"), ["cat", "dog"])
  hp = tmp_path / "h.json"
  hp.write_text(json.dumps({"coarse": ["animal"], "fine": {"cat": "animal", "dog": "animal"}}))
  with pytest.raises(ValueError, match=r"no vector for the coarse concept\(s\) \['animal'\]"):
    make_vocab(None, anchors_path=str(tmp_path / "g.txt"), hierarchy_path=str(hp))


@pytest.mark.slow
def test_trace_trains_on_coco_with_glove_and_cocostuff_hierarchy_and_evaluates(tmp_path, bpe):
  """TRACE from a GloVe-format file + the shipped COCO-Stuff hierarchy, on the COCO captions fixture
  (BPE tokenizer), through the train loop; the export evaluated on the COCO-Stuff fixture grounds every
  caption word that is in its vocabulary and counts the others as skipped."""
  from configs import common
  from trace_jax import objectives
  from trace_jax.data import sources
  from trace_jax.data.real.coco import ground_caption
  from trace_jax.evaluation import real
  from trace_jax.training import loop
  h, _ = concepts(COCOSTUFF_HIERARCHY)
  all_words = sorted({w for c in list(h.coarse) + list(h.fine) for w in c.split()} - {"zebra"})
  _glove(str(tmp_path / "glove.txt"), all_words, dim=8)
  FX.write_coco(str(tmp_path / "coco"))
  c = common.get_config()
  c.data.name, c.data.image_size, c.data.batch_size = "coco_captions", 32, 2
  c.data.manual_dir, c.data.data_dir, c.data.builder_config = str(tmp_path / "coco"), str(tmp_path / "tfds"), "stuff_val2017"
  c.data.split, c.data.augment = "val", "eval"
  c.loss.name = "trace"
  c.loss.trace.anchors_path, c.loss.trace.hierarchy_path = str(tmp_path / "glove.txt"), COCOSTUFF_HIERARCHY
  c.model.preset = "crate-clip-tiny"
  c.model.vision_heads, c.model.crate_dim_head, c.model.text_layers = 25, 4, 1    # one subspace per coarse concept
  c.optim.warmup_steps, c.train.steps, c.train.log_every, c.train.progress = 1, 2, 1, False
  c.checkpoint.async_save = False
  with pytest.warns(UserWarning, match=r"1 concept\(s\) without a vector .*'zebra'"):
    source = sources.make(c, tokenizer=bpe)
    task = objectives.make(c, source.info)
  assert "zebra" not in task.vocab.closed.words and "traffic light" in task.vocab.closed.words
  np.testing.assert_allclose(task.vocab.closed.anchors[task.vocab.closed.index("giraffe")],
                             _unit(json_vec(tmp_path / "glove.txt", "giraffe")), atol=1e-6)
  wd = tmp_path / "run"
  loop.train(c, str(wd), task, source, mesh=loop.mesh_lib.single_device_mesh())
  rows = [json.loads(r) for r in open(wd / "metrics.jsonl")]
  assert all(np.isfinite(r["loss"]) and r["trace_cluster"] > 0 for r in rows)
  # evaluation with the exported vocabulary, on the COCO-Stuff fixture's real words
  from test_real_eval import _cfg
  ev = _cfg("eval_trace_cocostuff.py", tmp_path / "coco", tmp_path / "tfds")
  res = real.run(ev, str(wd / "model"), str(tmp_path / "out"), verbose=False)["methods"]["trace"]
  vocab = set(task.vocab.closed.words)
  grounded = [w for cap in ["A man and his dog sit near a brick wall.", "Two people in a room under the sky",
                            "A cup on a table."] for w in _grounded(ground_caption, cap)]
  assert res["n"] == sum(w in vocab for w in grounded) >= 4          # dog, wall, sky, cup, table
  assert res["skipped_words"] == sum(w not in vocab for w in grounded) >= 2   # man, people (not class words)


def _grounded(ground_caption, cap):
  words, pairs = ground_caption(cap)
  return [words[i] for i in sorted({p[0] for p in pairs})]


def json_vec(path, word):
  for line in open(path):
    w, *v = line.split()
    if w == word:
      return np.asarray(v, np.float64)
  raise KeyError(word)


def _unit(v):
  return v / np.linalg.norm(v)
