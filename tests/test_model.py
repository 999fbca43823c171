"""Model behaviour: gradients w.r.t. attention probabilities (vs float64 finite differences), jit/vmap
consistency, bfloat16 compute, input validation, model-dir round trip.

The reference for the gradient test is an independent float64 NumPy forward of the CLIP towers
written from the OpenAI CLIP definition (pre-LN blocks, q scaled by hd^-0.5, softmax, QuickGELU,
class-token / argmax pooling, ln_post @ proj), with the attention probabilities of one block
perturbed additively exactly as ``perturb`` does.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trace_jax.models import build, get_config, init_params, l2_normalize, perturbation_zeros


@functools.lru_cache(maxsize=None)
def _tiny_params():
  return init_params(get_config("tiny"), jax.random.PRNGKey(0))


def _noisy_params(cfg, seed=0, scale=0.1):
  """Random params with non-trivial LayerNorm affines and biases (zero / one at init)."""
  params = _tiny_params()
  leaves, tree = jax.tree.flatten(params)
  r = np.random.default_rng(seed)
  leaves = [np.asarray(x, np.float32) + scale * r.standard_normal(np.shape(x)).astype(np.float32) for x in leaves]
  return jax.tree.unflatten(tree, leaves)


# ---------------------------------------------------------------------------------------------
# float64 NumPy reference

def _ln(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["ln"]["scale"] + p["ln"]["bias"]


def _np_block(x, p, mask=None, delta=None):
  """One pre-LN block on x [N, W]; ``delta`` [H, N, N] is added to the attention probabilities."""
  h = _ln(x, p["ln_1"])
  a = p["attn"]
  q = np.einsum("nw,whd->hnd", h, a["query"]["kernel"]) + a["query"]["bias"][:, None]
  k = np.einsum("nw,whd->hnd", h, a["key"]["kernel"]) + a["key"]["bias"][:, None]
  v = np.einsum("nw,whd->hnd", h, a["value"]["kernel"]) + a["value"]["bias"][:, None]
  logits = np.einsum("hqd,hkd->hqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  if delta is not None:
    probs = probs + delta
  o = np.einsum("hqk,hkd->qhd", probs, v)
  x = x + np.einsum("qhd,hdw->qw", o, a["out"]["kernel"]) + a["out"]["bias"]
  m = _ln(x, p["ln_2"]) @ p["mlp_fc"]["kernel"] + p["mlp_fc"]["bias"]
  m = m / (1 + np.exp(-1.702 * m))  # QuickGELU
  return x + m @ p["mlp_proj"]["kernel"] + p["mlp_proj"]["bias"]


def _np_image(p, img, pcfg, layer=None, delta=None):
  """img [H, W, 3] -> un-normalised embedding [E] (float64)."""
  ps = pcfg.patch_size
  h, w, _ = img.shape
  patches = img.reshape(h // ps, ps, w // ps, ps, 3).transpose(0, 2, 1, 3, 4).reshape(-1, ps * ps * 3)
  x = patches @ p["conv1"].reshape(ps * ps * 3, -1)
  x = np.concatenate([p["class_embedding"][None], x], 0) + p["positional_embedding"]
  x = _ln(x, p["ln_pre"])
  for i in range(pcfg.layers):
    x = _np_block(x, p["transformer"][f"block_{i}"], None, delta if i == layer else None)
  return _ln(x[0], p["ln_post"]) @ p["proj"]


def _np_text(p, ids, tcfg):
  n = len(ids)
  x = p["token_embedding"]["embedding"][ids] + p["positional_embedding"][:n]
  mask = np.tril(np.ones((n, n), bool))
  for i in range(tcfg.layers):
    x = _np_block(x, p["transformer"][f"block_{i}"], mask)
  x = _ln(x, p["ln_final"])
  return x[np.argmax(ids)] @ p["text_projection"]


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_numpy_reference_forward_agrees():
  """The float64 reference is itself checked against the model (so the FD test compares like with like)."""
  cfg = get_config("tiny")
  params = _noisy_params(cfg)
  r = np.random.default_rng(0)
  img = r.standard_normal((32, 32, 3)).astype(np.float32)
  ids = np.array([5, 17, 300, 999, 0, 0], np.int32)
  model = build(cfg)
  emb, _ = jax.jit(lambda x: model.apply({"params": params}, x, method="encode_image"))(img[None])
  temb, _ = jax.jit(lambda t: model.apply({"params": params}, t, method="encode_text"))(ids[None])
  p64 = _f64(params)
  np.testing.assert_allclose(emb[0], _np_image(p64["visual"], img.astype(np.float64), cfg.vision), atol=2e-5)
  np.testing.assert_allclose(temb[0], _np_text(p64["text"], ids, cfg.text), atol=2e-5)


def test_grad_wrt_attention_probs_matches_finite_differences():
  """d score / d A_0 (visual block 0, all heads and entries) by jax.grad through the
  ``perturbations`` collection vs central differences of the float64 NumPy reference.
  score = cos(image embedding, fixed text embedding). Tolerance: max-abs error <= 1e-4 (the
  gradient entries are O(1e-2..1); float32 vs float64 rounding is ~1e-6, FD step 1e-5 on f64)."""
  cfg = get_config("tiny")
  params = _noisy_params(cfg, seed=1)
  model = build(cfg)
  r = np.random.default_rng(1)
  img = r.standard_normal((1, 32, 32, 3)).astype(np.float32)
  text = r.standard_normal(cfg.embed_dim)
  text /= np.linalg.norm(text)
  layer = 0

  zeros = perturbation_zeros(model, params, img, method="encode_image")

  @jax.jit
  def score(perts):
    emb, _ = model.apply({"params": params, "perturbations": perts}, img, method="encode_image")
    return jnp.sum(l2_normalize(emb)[0] * text.astype(np.float32))

  g = jax.grad(score)(zeros)
  g_attn = np.asarray(g["visual"]["transformer"][f"block_{layer}"]["attn"]["attn"])[0]  # [H, N, N]
  # the other layer's attention gradient exists too and differs (the path is the right one)
  assert g_attn.shape == (cfg.vision.heads, 17, 17)

  p64 = _f64(params)["visual"]
  x64 = img[0].astype(np.float64)

  def f(delta):
    e = _np_image(p64, x64, cfg.vision, layer, delta)
    return float(e @ text / np.linalg.norm(e))

  eps = 1e-5
  fd = np.zeros(g_attn.shape)
  for idx in np.ndindex(*g_attn.shape):
    d = np.zeros(g_attn.shape)
    d[idx] = eps
    fd[idx] = (f(d) - f(-d)) / (2 * eps)
  assert np.abs(fd).max() > 1e-2  # a non-trivial gradient
  np.testing.assert_allclose(g_attn, fd, atol=1e-4, rtol=0)
  # and the forward with zero perturbations is unchanged
  np.testing.assert_allclose(float(score(zeros)), f(np.zeros(g_attn.shape)), atol=1e-5)


def test_jit_vmap_equals_one_by_one():
  cfg = get_config("tiny")
  params = _noisy_params(cfg, seed=2)
  model = build(cfg)
  r = np.random.default_rng(2)
  imgs = r.standard_normal((4, 32, 32, 3)).astype(np.float32)
  ids = r.integers(1, 999, size=(4, 16)).astype(np.int32)
  ids[np.arange(4), [3, 7, 15, 1]] = 999

  pair = jax.jit(jax.vmap(lambda x, t: model.apply({"params": params}, x, t)[0]))
  out = pair(imgs, ids)  # per pair: unbatched image [H,W,3] and ids [L]
  single = jax.jit(lambda x, t: model.apply({"params": params}, x, t)[0])
  for i in range(4):
    one = single(imgs[i:i + 1], ids[i:i + 1])
    np.testing.assert_allclose(out["image_embeds"][i], one["image_embeds"][0], atol=1e-5)
    np.testing.assert_allclose(out["text_embeds"][i], one["text_embeds"][0], atol=1e-5)
    np.testing.assert_allclose(out["logits_per_image"][i], one["logits_per_image"][0, 0], atol=1e-4)

  # image-only vmap against the full text batch, incl. every block's attention probabilities
  enc = jax.jit(jax.vmap(lambda x: model.apply({"params": params}, x, method="encode_image")))
  emb, aux = enc(imgs)
  single_img = jax.jit(lambda x: model.apply({"params": params}, x, method="encode_image"))
  for i in range(4):
    e1, a1 = single_img(imgs[i])  # single HWC image
    np.testing.assert_allclose(emb[i], e1, atol=1e-5)
    for b, b1 in zip(aux["blocks"], a1["blocks"]):
      np.testing.assert_allclose(b["attn"][i], b1["attn"], atol=1e-6)

  # per-example gradients w.r.t. attention under jit(vmap(grad)) equal one-by-one grads
  text = jnp.asarray(r.standard_normal(cfg.embed_dim), jnp.float32)
  z1 = perturbation_zeros(model, params, imgs[0], method="encode_image")

  def s(perts, x):
    e, _ = model.apply({"params": params, "perturbations": perts}, x, method="encode_image")
    return l2_normalize(e) @ text

  gb = jax.jit(jax.vmap(jax.grad(s), in_axes=(None, 0)))(z1, imgs)
  g1 = jax.jit(jax.grad(s))
  for i in range(4):
    gi = g1(z1, imgs[i])
    np.testing.assert_allclose(gb["visual"]["transformer"]["block_1"]["attn"]["attn"][i],
                               gi["visual"]["transformer"]["block_1"]["attn"]["attn"], atol=1e-6)


def test_bfloat16_compute_close_to_float32_params_stay_float32():
  cfg = get_config("tiny")
  params = _noisy_params(cfg, seed=3)
  cfg16 = cfg.replace(dtype="bfloat16")
  shapes = jax.eval_shape(lambda: init_params(cfg16, jax.random.PRNGKey(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  r = np.random.default_rng(3)
  imgs = r.standard_normal((2, 32, 32, 3)).astype(np.float32)
  ids = r.integers(1, 999, size=(3, 16)).astype(np.int32)
  o32, _ = jax.jit(lambda p: build(cfg).apply({"params": p}, imgs, ids))(params)
  o16, aux = jax.jit(lambda p: build(cfg16).apply({"params": p}, imgs, ids))(params)
  assert aux["image"]["blocks"][0]["tokens"].dtype == jnp.bfloat16  # really computed in bf16
  assert o16["image_embeds"].dtype == jnp.float32
  # loose: bf16 has an 8-bit mantissa (~4e-3 relative per op)
  for k in ("image_embeds", "text_embeds"):
    cos = np.sum(np.asarray(o16[k]) * np.asarray(o32[k]), -1)
    assert cos.min() > 0.995, (k, cos)
    np.testing.assert_allclose(o16[k], o32[k], atol=5e-2)
  np.testing.assert_allclose(o16["logits_per_image"], o32["logits_per_image"], atol=0.5)


@pytest.mark.parametrize("images,msg", [
    (np.zeros((32, 32), np.float32), "rank 2"),
    (np.zeros((1, 32, 32, 4), np.float32), "3 channels"),
    (np.zeros((1, 3, 32, 32), np.float32), "3 channels"),
    (np.zeros((1, 30, 30, 3), np.float32), "30x30 is not a positive multiple of the patch size 8"),
])
def test_bad_images_raise(images, msg):
  cfg = get_config("tiny")
  params = _tiny_params()
  with pytest.raises(ValueError, match=msg):
    build(cfg).apply({"params": params}, jnp.asarray(images), method="encode_image")


@pytest.mark.parametrize("ids,msg", [
    (np.zeros((1, 17), np.int32), "17 tokens is longer than the context length 16"),
    (np.zeros((1, 5), np.float32), "must be integers"),
    (np.zeros((1, 2, 5), np.int32), "must be \\[batch, length\\]"),
])
def test_bad_text_raises(ids, msg):
  cfg = get_config("tiny")
  params = _tiny_params()
  with pytest.raises(ValueError, match=msg):
    build(cfg).apply({"params": params}, jnp.asarray(ids), method="encode_text")


def test_save_load_round_trip_exact(tmp_path):
  from trace_jax.model_dir import load_model, save_model
  cfg = get_config("tiny").replace(vision=dataclasses.replace(get_config("tiny").vision, pos_interp="torch_bicubic"))
  params = _noisy_params(cfg, seed=4)
  tok = tmp_path / "words.json"
  tok.write_text('{"a": 1}')
  d = save_model(str(tmp_path / "m"), params, cfg, source="test", tokenizer_files={"words.json": str(tok)})
  cfg2, params2 = load_model(d)
  assert cfg2 == cfg
  flat1, flat2 = jax.tree.leaves_with_path(params), jax.tree.leaves_with_path(params2)
  assert [k for k, _ in flat1] == [k for k, _ in flat2]
  for (k, a), (_, b) in zip(flat1, flat2):
    assert np.asarray(b).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(k))
  assert (tmp_path / "m" / "tokenizer" / "words.json").read_text() == '{"a": 1}'


def test_checkpoint_with_renamed_key_is_refused(tmp_path):
  import orbax.checkpoint as ocp
  from trace_jax.model_dir import load_model, save_model
  cfg = get_config("tiny")
  params = _tiny_params()
  d = save_model(str(tmp_path / "m"), params, cfg)
  bad = jax.tree.map(np.asarray, params)
  bad["visual"]["ln_pre"]["ln"]["gamma"] = bad["visual"]["ln_pre"]["ln"].pop("scale")
  bad["text"]["text_projection"] = bad["text"]["text_projection"][:, :-1]
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(d, "params"), bad, force=True)
  ckpt.wait_until_finished()
  with pytest.raises(ValueError) as e:
    load_model(d)
  msg = str(e.value)
  assert "missing keys (1): visual/ln_pre/ln/scale" in msg
  assert "unexpected keys (1): visual/ln_pre/ln/gamma" in msg
  assert "mis-shaped keys (1): text/text_projection: (32, 31) != expected (32, 32)" in msg
