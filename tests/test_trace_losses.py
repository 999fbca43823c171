"""TRACE losses, anchors and grounding (trace_jax/losses/trace.py, trace_jax/trace/*).

Losses: values against independent NumPy loops written from docs/trace.md, and gradients against
central finite differences in float64 (``jax.enable_x64(True)``).
"""
import struct

import numpy as np
import pytest

import jax
import jax.numpy as jnp
enable_x64 = lambda: jax.enable_x64(True)  # jax 0.10: the context manager moved to jax.enable_x64

from trace_jax.losses import trace as tl
from trace_jax.trace import anchors as an
from trace_jax.trace import grounding, vocab_arrays


# ---------------------------------------------------------------------------- numpy references

def np_memberships(proj, tau, eps=1e-6):
  e = (proj ** 2).sum(-1)
  x = np.log(e + eps) / tau
  x = np.exp(x - x.max(-1, keepdims=True))
  return x / x.sum(-1, keepdims=True)


def np_smooth_max(x, beta):  # over the last axis
  return np.log(np.mean(np.exp(beta * x), -1)) / beta


def np_cluster(M, yc, beta, eps=1e-6):
  B, N, C = M.shape
  tot = 0.0
  for b in range(B):
    for c in range(C):
      p = np.clip(np_smooth_max(M[b, :, c], beta), eps, 1 - eps)
      tot += -(yc[b, c] * np.log(p) + (1 - yc[b, c]) * np.log(1 - p))
  return tot / (B * C)


def np_anchor(M, q, yc, A, temp):
  tot, n = 0.0, 0
  for b in range(M.shape[0]):
    for c in range(M.shape[2]):
      if yc[b, c]:
        mu = (M[b, :, c:c + 1] * q[b]).sum(0)
        mu /= np.linalg.norm(mu)
        lg = A @ mu / temp
        tot += -(lg[c] - np.log(np.exp(lg).sum()))
        n += 1
  return tot / max(n, 1)


def np_token(s, y, group, beta, temp):
  B, N, V = s.shape
  S = np.stack([[np_smooth_max(s[b, :, v], beta) for v in range(V)] for b in range(B)]) / temp
  tot, n = 0.0, 0
  for b in range(B):
    for v in range(V):
      if not y[b, v]:
        continue
      cands = [S[b, v]]
      cands += [S[b, w] for w in range(V) if w != v and group[v] >= 0 and group[w] == group[v] and not y[b, w]]
      cands += [S[c, v] for c in range(B) if not y[c, v]]
      tot += -S[b, v] + np.log(np.exp(cands).sum())
      n += 1
  return tot / n


def _case(rng, B=3, N=5, K=4, dh=3, D=6, d=4, V=7, C=2):
  proj = rng.standard_normal((B, N, K, dh))
  tokens = rng.standard_normal((B, N, D))
  kernel = rng.standard_normal((D, d))
  A = rng.standard_normal((V, d))
  A /= np.linalg.norm(A, axis=1, keepdims=True)
  # words: 0,1 coarse words; 2,3 children of coarse 0; 4,5 children of coarse 1; 6 a colour (no group)
  coarse = np.array([0, 1, 0, 0, 1, 1, -1], np.int32)
  group = np.array([C, C, 0, 0, 1, 1, -1], np.int32)
  word_ids = np.array([[2, 6, -1], [4, 0, -1], [3, 5, 6]], np.int32)[:B]
  return proj, tokens, kernel, A, coarse, group, word_ids


def _fd_check(f, args, rng, eps=1e-6, rtol=1e-6):
  """f(*args) scalar; compare grad · v with central differences along random v, per argument."""
  grads = jax.grad(f, argnums=tuple(range(len(args))))(*args)
  for i, (a, g) in enumerate(zip(args, grads)):
    v = rng.standard_normal(a.shape)
    plus = list(args); plus[i] = a + eps * v
    minus = list(args); minus[i] = a - eps * v
    fd = (f(*plus) - f(*minus)) / (2 * eps)
    an = float(np.vdot(np.asarray(g), v))
    assert abs(float(fd) - an) <= rtol * max(1.0, abs(an)) + 1e-9, (i, float(fd), an)


# ---------------------------------------------------------------------------- values

def test_loss_values_match_numpy_loops(rng):
  proj, tokens, kernel, A, coarse, group, word_ids = _case(rng)
  assign = tl.assign_subspaces(4, 2)
  np.testing.assert_array_equal(assign, [0, 0, 1, 1])
  with enable_x64():
    m = np.asarray(tl.memberships(jnp.asarray(proj), 0.5))
    np.testing.assert_allclose(m, np_memberships(proj, 0.5), rtol=1e-12)
    M = np.asarray(tl.coarse_memberships(jnp.asarray(m), assign, 2))
    np.testing.assert_allclose(M, np.stack([m[..., :2].sum(-1), m[..., 2:].sum(-1)], -1), rtol=1e-12)
    y = np.zeros((3, 7)); [y.__setitem__((b, v), 1) for b in range(3) for v in word_ids[b] if v >= 0]
    np.testing.assert_array_equal(np.asarray(tl.caption_targets(jnp.asarray(word_ids), 7)), y)
    yc = np.asarray(tl.coarse_targets(jnp.asarray(y), jnp.asarray(coarse), 2))
    np.testing.assert_array_equal(yc, [[1, 0], [1, 1], [1, 1]])
    q = tokens @ kernel
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(tl.project_patches(jnp.asarray(tokens), jnp.asarray(kernel))), q, rtol=1e-10)
    got = float(tl.cluster_loss(jnp.asarray(M), jnp.asarray(yc), 10.0))
    np.testing.assert_allclose(got, np_cluster(M, yc, 10.0), rtol=1e-10)
    got = float(tl.anchor_loss(jnp.asarray(M), jnp.asarray(q), jnp.asarray(yc), jnp.asarray(A[:2]), 0.1))
    np.testing.assert_allclose(got, np_anchor(M, q, yc, A[:2], 0.1), rtol=1e-10)
    s = q @ A.T
    got = float(tl.token_loss(jnp.asarray(s), jnp.asarray(y), jnp.asarray(group), 10.0, 0.1))
    np.testing.assert_allclose(got, np_token(s, y, group, 10.0, 0.1), rtol=1e-10)


def test_smooth_max_and_scale_invariance(rng):
  x = jnp.asarray(rng.standard_normal((4, 9)))
  assert np.all(np.asarray(tl.smooth_max(x, 1e3)) <= np.asarray(x.max(-1)) + 1e-9)
  np.testing.assert_allclose(np.asarray(tl.smooth_max(x, 1e3)), np.asarray(x.max(-1)), atol=5e-3)
  proj = jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32)
  np.testing.assert_allclose(np.asarray(tl.memberships(proj)), np.asarray(tl.memberships(7.0 * proj)), atol=1e-4)
  with pytest.raises(ValueError, match="at least one subspace"):
    tl.assign_subspaces(3, 5)


# ---------------------------------------------------------------------------- gradients

def test_gradients_match_finite_differences(rng):
  proj, tokens, kernel, A, coarse, group, word_ids = _case(rng)
  assign = tl.assign_subspaces(4, 2)
  with enable_x64():
    A_, coarse_, group_ = jnp.asarray(A), jnp.asarray(coarse), jnp.asarray(group)
    y = tl.caption_targets(jnp.asarray(word_ids), 7)
    yc = tl.coarse_targets(y, coarse_, 2)

    def M_of(p):
      return tl.coarse_memberships(tl.memberships(p, 0.5), assign, 2)

    def q_of(t, k):
      return tl.project_patches(t, k)

    f_cluster = lambda p: tl.cluster_loss(M_of(p), yc, 10.0)
    f_anchor = lambda p, t, k: tl.anchor_loss(M_of(p), q_of(t, k), yc, A_[:2], 0.1)
    f_token = lambda t, k: tl.token_loss(q_of(t, k) @ A_.T, y, group_, 10.0, 0.1)
    args = [jnp.asarray(proj), jnp.asarray(tokens), jnp.asarray(kernel)]
    _fd_check(f_cluster, args[:1], rng)
    _fd_check(f_anchor, args, rng)
    _fd_check(f_token, args[1:], rng)

    # the combined loss from a CrateVision-like aux (cls row prepended)
    aux = lambda p, t: {"blocks": [{"proj": jnp.concatenate([p[:, :1] * 0 + 1, p], 1)}],
                        "tokens": jnp.concatenate([t[:, :1] * 0 + 1, t], 1)}
    vocab = {"anchors": A_, "coarse": coarse_, "group": group_, "coarse_anchor_ids": jnp.asarray([0, 1]),
             "assignment": jnp.asarray(assign)}
    f_all = lambda p, t, k: tl.trace_loss(aux(p, t), jnp.asarray(word_ids), vocab, {"kernel": k})[0]
    _fd_check(f_all, args, rng)
    total, met = tl.trace_loss(aux(*args[:2]), jnp.asarray(word_ids), vocab, {"kernel": args[2]})
    np.testing.assert_allclose(float(total), float(f_cluster(args[0]) + f_anchor(*args) + f_token(*args[1:])), rtol=1e-12)
    only_tok = tl.trace_loss(aux(*args[:2]), jnp.asarray(word_ids), vocab, {"kernel": args[2]},
                             tl.TraceConfig(w_cluster=0, w_anchor=0))[1]
    assert set(only_tok) == {"trace_token", "trace"}


def test_trace_loss_on_crate_tower_under_jit():
  from trace_jax.models import build, get_config, init_params
  cfg = get_config("crate-clip-tiny")
  model, params = build(cfg), init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  _, _, _, A, coarse, group, word_ids = _case(rng, B=2, V=7)
  vocab = {"anchors": jnp.asarray(A, jnp.float32), "coarse": jnp.asarray(coarse), "group": jnp.asarray(group),
           "coarse_anchor_ids": jnp.asarray([0, 1]), "assignment": jnp.asarray(tl.assign_subspaces(4, 2))}
  p_trace = tl.init_trace_params(jax.random.PRNGKey(2), cfg.vision.width, A.shape[1])

  @jax.jit
  def step(params, p_trace):
    def loss(params, p_trace):
      _, aux = model.apply({"params": params}, images, method="encode_image")
      return tl.trace_loss(aux, jnp.asarray(word_ids), vocab, p_trace)[0]
    return jax.value_and_grad(loss, argnums=(0, 1))(params, p_trace)

  val, (g, gt) = step(params, p_trace)
  assert np.isfinite(float(val))
  u = g["visual"]["transformer"]["block_1"]["attn"]["qkv"]["kernel"]
  assert float(jnp.abs(u).sum()) > 0 and float(jnp.abs(gt["kernel"]).sum()) > 0


# ---------------------------------------------------------------------------- anchors

def test_glove_and_word2vec_loaders(tmp_path, rng):
  words = ["car", "bus", "vehicle", "dog"]
  vecs = rng.standard_normal((4, 5)).astype(np.float32)
  glove = tmp_path / "g.txt"
  glove.write_text("".join(w + " " + " ".join(repr(float(x)) for x in v) + "\n" for w, v in zip(words, vecs)))
  got_w, got = an.load_glove(str(glove), ["dog", "car"])
  assert got_w == ["dog", "car"]
  np.testing.assert_array_equal(got, vecs[[3, 0]])
  assert an.load_glove(str(glove))[0] == words
  with pytest.raises(ValueError, match="no vector.*'cat'"):
    an.load_glove(str(glove), ["cat", "car"])
  assert an.load_glove(str(glove), ["cat", "car"], allow_missing=True)[0] == ["car"]
  bad = tmp_path / "bad.txt"
  bad.write_text("car 1 2 3\nbus 1 2\n")
  with pytest.raises(ValueError, match=r"bad.txt:2: word 'bus' has 2 values, expected 3"):
    an.load_glove(str(bad))
  bad.write_text("car 1 2 x\n")
  with pytest.raises(ValueError, match=r"bad.txt:1: non-numeric"):
    an.load_glove(str(bad))

  # word2vec binary, written here with struct (the C tool's layout)
  binf = tmp_path / "w.bin"
  with open(binf, "wb") as f:
    f.write(b"4 5\n")
    for w, v in zip(words, vecs):
      f.write(w.encode() + b" " + struct.pack("<5f", *v) + b"\n")
  got_w, got = an.load_word2vec(str(binf), ["vehicle", "bus"])
  assert got_w == ["vehicle", "bus"]
  np.testing.assert_array_equal(got, vecs[[2, 1]])
  an.save_word2vec_binary(str(tmp_path / "w2.bin"), words, vecs)
  assert open(tmp_path / "w2.bin", "rb").read() == open(binf, "rb").read()
  trunc = tmp_path / "t.bin"
  trunc.write_bytes(open(binf, "rb").read()[:-9])
  with pytest.raises(ValueError, match="record 3 .*'dog'.* expected 20"):
    an.load_word2vec(str(trunc))
  txt = tmp_path / "w.txt"
  txt.write_text("4 5\n" + "".join(w + " " + " ".join(repr(float(x)) for x in v) + "\n" for w, v in zip(words, vecs)))
  np.testing.assert_array_equal(an.load_word2vec(str(txt))[1], vecs)
  txt.write_text("four five\n")
  with pytest.raises(ValueError, match="malformed word2vec header"):
    an.load_word2vec(str(txt))


def test_ppmi_svd_retrofit_and_hierarchy():
  # 'cat' and 'dog' share every context; 'car' has its own
  corpus = [["the", "cat", "sleeps"], ["the", "dog", "sleeps"], ["a", "car", "drives"]] * 3
  words, v = an.ppmi_svd_anchors(corpus, dim=8)
  assert len(words) == 7 and v.shape == (7, 7)
  np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, rtol=1e-6)
  ix = {w: i for i, w in enumerate(words)}
  assert v[ix["cat"]] @ v[ix["dog"]] > 0.99 > 0.1 > abs(v[ix["cat"]] @ v[ix["car"]])
  w2, v2 = an.ppmi_svd_anchors(corpus, dim=8)
  np.testing.assert_array_equal(v, v2)   # deterministic (signs fixed)

  h = an.Hierarchy.from_dict({"coarse": ["animal", "vehicle"], "fine": {"cat": "animal", "dog": "animal",
                                                                         "car": "vehicle"},
                              "groups": {"color": ["red", "blue"]}})
  assert h.children("animal") == ("cat", "dog")
  h2 = an.Hierarchy.from_dict({"coarse": [{"name": "animal"}, {"name": "vehicle"}],
                               "fine": [{"name": "cat", "coarse": "animal"}, {"name": "dog", "coarse": "animal"},
                                        {"name": "car", "coarse": "vehicle"}], "groups": {"color": ["red", "blue"]}})
  assert h2 == h
  with pytest.raises(ValueError, match="unknown coarse"):
    an.Hierarchy.from_dict({"coarse": ["animal"], "fine": {"car": "vehicle"}})
  with pytest.raises(ValueError, match="distinct"):
    an.Hierarchy.from_dict({"coarse": ["animal"], "fine": {"animal": "animal"}})

  rng = np.random.default_rng(0)
  words = ["animal", "vehicle", "cat", "dog", "car", "red", "blue"]
  vecs = rng.standard_normal((7, 6))
  vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
  r = an.retrofit(words, vecs, h)
  cos = lambda a, b: float(a @ b)
  assert cos(r[2], r[0]) > cos(vecs[2], vecs[0])          # cat moved towards animal
  np.testing.assert_allclose(r[5], vecs[5], rtol=1e-6)     # words outside the hierarchy unchanged
  vocab = an.build_vocab(h, words, vecs)
  assert vocab.words == ("animal", "vehicle", "cat", "dog", "car", "red", "blue")
  np.testing.assert_array_equal(vocab.coarse, [0, 1, 0, 0, 1, -1, -1])
  np.testing.assert_array_equal(vocab.group, [2, 2, 0, 0, 1, 3, 3])
  np.testing.assert_array_equal(vocab.ids(["a", "red", "cat"]), [-1, 5, 2])
  with pytest.raises(ValueError, match="no anchor vector for: \\['vehicle'\\]"):
    an.build_vocab(h, ["animal", "cat"], vecs[:2], include=["cat"])


# ---------------------------------------------------------------------------- grounding

def test_grounding_on_a_constructed_case():
  """4 patches, K = 4 subspaces of dim 1 (g = [0, 0, 1, 1]), C = 2. Patch i puts all its energy in
  subspace i (memberships one-hot), so M = [[1,0],[1,0],[0,1],[0,1]]. The projected patches equal
  anchors: q_0 = a_cat, q_1 = a_dog, q_2 = q_3 = a_car. Then (13): h_cat = M_·0 · P(cat | animal):
  patch 0 -> 1 · e^{1/T}/(e^{1/T} + e^{<a_cat,a_dog>/T}); patches 2, 3 -> 0 (gate)."""
  h = an.Hierarchy.from_dict({"coarse": ["animal", "vehicle"],
                              "fine": {"cat": "animal", "dog": "animal", "car": "vehicle", "bus": "vehicle"}})
  words = ["animal", "vehicle", "cat", "dog", "car", "bus"]
  a = np.eye(6)[:, :6] + 0.0
  vocab = an.build_vocab(h, words, a)
  arrays = vocab_arrays(vocab, 4)
  np.testing.assert_array_equal(np.asarray(arrays["assignment"]), [0, 0, 1, 1])
  proj = np.zeros((4, 4, 1)); proj[np.arange(4), np.arange(4), 0] = 3.0
  m = tl.memberships(jnp.asarray(proj, jnp.float32), 0.5)
  M = tl.coarse_memberships(m, arrays["assignment"], 2)
  np.testing.assert_allclose(np.asarray(M), [[1, 0], [1, 0], [0, 1], [0, 1]], atol=1e-6)
  q = jnp.asarray(a[[2, 3, 4, 4]], jnp.float32)
  H = np.asarray(grounding.heatmaps(M, q, arrays["anchors"], arrays["coarse"], arrays["group"], 0.1))
  assert H.shape == (6, 4)
  p = np.exp(10) / (np.exp(10) + np.exp(0))
  np.testing.assert_allclose(H[vocab.index("cat")], [p, 1 - p, 0, 0], atol=1e-5)
  np.testing.assert_allclose(H[vocab.index("car")], [0, 0, p, p], atol=1e-5)
  np.testing.assert_allclose(H[vocab.index("animal")], [1, 1, 0, 0], atol=1e-5)   # coarse word: its membership
  ungated = np.asarray(grounding.heatmaps(M, q, arrays["anchors"], arrays["coarse"], arrays["group"], 0.1, gate=False))
  np.testing.assert_allclose(ungated[vocab.index("cat"), 2:], 0.5, atol=1e-5)       # no gate: cat ~ dog on a car patch

  t = grounding.trace_word("dog", vocab, np.asarray(arrays["assignment"]), m, M, q, (2, 2))
  assert t.peak == (0, 1) and t.subspace == 1 and t.coarse == "animal" and t.fine == "dog" and t.consistent
  np.testing.assert_allclose(t.fine_prob, p, rtol=1e-5)
  np.testing.assert_allclose(t.region_subspaces.sum(), 1, rtol=1e-5)
  assert "subspace 1" in str(t) and "'animal'" in str(t)
  t = grounding.trace_word("bus", vocab, np.asarray(arrays["assignment"]), m, M, q, (2, 2))
  assert t.coarse == "vehicle" and t.fine == "car" and t.heatmap.shape == (2, 2)   # bus is absent: car wins


def test_gate_power_tempers_the_coarse_gate(rng):
  """heatmaps(gate_power=γ) against float64 NumPy written from (13) with M^γ: fine word v of coarse c,
  h_iv = M_ic^γ · softmax over v's siblings of <q_i, a_v'>/T; coarse word c, h_ic = M_ic^γ; γ = 1 is (13)."""
  h = an.Hierarchy.from_dict({"coarse": ["animal", "vehicle"],
                              "fine": {"cat": "animal", "dog": "animal", "car": "vehicle", "bus": "vehicle"}})
  words = ["animal", "vehicle", "cat", "dog", "car", "bus"]
  vocab = an.build_vocab(h, words, rng.normal(size=(6, 5)))
  arrays = vocab_arrays(vocab, 2)
  M = rng.dirichlet([1.0, 1.0], size=7)                                   # [N, C]
  q = rng.normal(size=(7, 5))
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  a = np.asarray(vocab.anchors, np.float64)
  for gamma in (1.0, 0.3):
    H = np.asarray(grounding.heatmaps(jnp.asarray(M, jnp.float32), jnp.asarray(q, jnp.float32), arrays["anchors"],
                                      arrays["coarse"], arrays["group"], 0.1, gate_power=gamma))
    s = q @ a.T / 0.1
    for w in words:
      v = vocab.index(w)
      c = int(vocab.coarse[v])
      if w in h.coarse:
        want = M[:, c] ** gamma
      else:
        sib = [u for u in range(6) if vocab.group[u] == vocab.group[v]]
        want = M[:, c] ** gamma * np.exp(s[:, v]) / np.exp(s[:, sib]).sum(1)
      np.testing.assert_allclose(H[v], want, rtol=2e-5, atol=1e-6, err_msg=f"{w} gamma={gamma}")
