"""CRATE (trace_jax/models/crate.py, trace_jax/convert/crate.py) against an independent float64 NumPy
reference written from notes/crate.md §1 (row vectors, torch-layout weights ``x @ W.T``).

Parameters are built as an official-layout state dict in NumPy (LayerNorm affine params and biases
perturbed away from 1 / 0 so that swapped or dropped entries are caught, notes/crate.md pitfall 6)
and go through the converter, so the key mapping is tested too.
"""
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from trace_jax.convert import crate as conv
from trace_jax.models import build, get_config, init_params, perturbation_zeros
from trace_jax.models import posemb
from trace_jax.models.config import CLIPConfig
from trace_jax.models.crate import (CLASSIFIERS, ISTA, CrateClassifier, CrateConfig, classifier_config,
                                    crate_config_from_clip, subspace_bases)

# float32 forward vs float64 reference; values are O(1) (LayerNormed inputs), logits O(5).
TOL = dict(rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------------------- float64 reference

def _ln(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased, like torch
  return (x - mu) / np.sqrt(var + eps) * w + b


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def ref_forward(sd, images_nhwc, heads, eta=0.1, lambd=0.1, pool="cls", pos=None):
  """notes/crate.md §1, float64. Returns dict(logits, layers=[dict(attn, proj, half, codes)])."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)       # the official code takes NCHW
  b, c, h, w = x.shape
  p = int(round(np.sqrt(sd["to_patch_embedding.1.weight"].size / c)))
  # Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')
  t = x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
  t = _ln(t, sd["to_patch_embedding.1.weight"], sd["to_patch_embedding.1.bias"])
  t = t @ sd["to_patch_embedding.2.weight"].T + sd["to_patch_embedding.2.bias"]
  t = _ln(t, sd["to_patch_embedding.3.weight"], sd["to_patch_embedding.3.bias"])
  n = t.shape[1]
  cls = np.broadcast_to(sd["cls_token"], (b, 1, t.shape[2]))
  pos = sd["pos_embedding"][:, :n + 1] if pos is None else np.asarray(pos, np.float64)[None]
  z = np.concatenate([cls, t], 1) + pos
  layers, i = [], 0
  while f"transformer.layers.{i}.0.norm.weight" in sd:
    pre = f"transformer.layers.{i}."
    y = _ln(z, sd[pre + "0.norm.weight"], sd[pre + "0.norm.bias"])
    wq = y @ sd[pre + "0.fn.qkv.weight"].T                             # [b, N, heads*dh]
    dh = wq.shape[-1] // heads
    wq = wq.reshape(b, n + 1, heads, dh).transpose(0, 2, 1, 3)        # 'b n (h d) -> b h n d'
    attn = _softmax(wq @ wq.transpose(0, 1, 3, 2) * dh ** -0.5)
    o = (attn @ wq).transpose(0, 2, 1, 3).reshape(b, n + 1, heads * dh)
    if pre + "0.fn.to_out.0.weight" in sd:
      o = o @ sd[pre + "0.fn.to_out.0.weight"].T + sd[pre + "0.fn.to_out.0.bias"]
    half = z + o
    u = _ln(half, sd[pre + "1.norm.weight"], sd[pre + "1.norm.bias"])
    d = sd[pre + "1.fn.weight"]
    z = np.maximum(u + eta * (u @ d - (u @ d.T) @ d) - eta * lambd, 0)
    layers.append(dict(attn=attn, proj=wq.transpose(0, 2, 1, 3), half=half, codes=z))
    i += 1
  pooled = z[:, 0] if pool == "cls" else z.mean(1)
  pooled = _ln(pooled, sd["mlp_head.0.weight"], sd["mlp_head.0.bias"])
  return dict(logits=pooled @ sd["mlp_head.1.weight"].T + sd["mlp_head.1.bias"], layers=layers)


def make_state_dict(rng, *, image=32, patch=8, dim=64, depth=3, heads=4, dim_head=16, classes=10, identity_out=False):
  """Random official-layout state dict (numpy float32), affine params perturbed away from 1 / 0."""
  pd, inner, n = 3 * patch * patch, heads * dim_head, (image // patch) ** 2 + 1
  f = lambda *s, scale=1.0: (scale * rng.standard_normal(s)).astype(np.float32)
  lnw = lambda k: (1 + f(k, scale=0.3)).astype(np.float32)
  sd = {"pos_embedding": f(1, n, dim), "cls_token": f(1, 1, dim),
        "to_patch_embedding.1.weight": lnw(pd), "to_patch_embedding.1.bias": f(pd, scale=0.3),
        "to_patch_embedding.2.weight": f(dim, pd, scale=pd ** -0.5), "to_patch_embedding.2.bias": f(dim, scale=0.3),
        "to_patch_embedding.3.weight": lnw(dim), "to_patch_embedding.3.bias": f(dim, scale=0.3)}
  for i in range(depth):
    t = f"transformer.layers.{i}."
    sd[t + "0.norm.weight"], sd[t + "0.norm.bias"] = lnw(dim), f(dim, scale=0.3)
    sd[t + "0.fn.qkv.weight"] = f(inner, dim, scale=1.5 * dim ** -0.5)  # peaky attention
    if not identity_out:
      sd[t + "0.fn.to_out.0.weight"] = f(dim, inner, scale=inner ** -0.5)
      sd[t + "0.fn.to_out.0.bias"] = f(dim, scale=0.3)
    sd[t + "1.norm.weight"], sd[t + "1.norm.bias"] = lnw(dim), f(dim, scale=0.3)
    sd[t + "1.fn.weight"] = f(dim, dim, scale=np.sqrt(2 / dim))      # like kaiming_uniform's variance
  sd.update({"mlp_head.0.weight": lnw(dim), "mlp_head.0.bias": f(dim, scale=0.3),
             "mlp_head.1.weight": f(classes, dim, scale=dim ** -0.5), "mlp_head.1.bias": f(classes, scale=0.3)})
  return sd


CASES = {
    # name: (state-dict sizes, converter kwargs, CrateConfig overrides)
    "crate-test": (dict(), dict(model_name="crate-test"), {}),
    # dim_head * heads != dim, mean pooling, other eta / lambda, heads via --heads
    "inner!=dim,mean": (dict(image=24, patch=4, dim=48, depth=2, heads=3, dim_head=24, classes=7),
                        dict(heads=3, pool="mean"), dict(eta=0.3, lambd=0.05)),
    # heads == 1 and dim_head == dim: to_out is Identity (no keys)
    "identity-out": (dict(dim=32, depth=2, heads=1, dim_head=32, identity_out=True), dict(), {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_float64_reference(case, rng):
  sizes, kw, over = CASES[case]
  sd = make_state_dict(rng, **sizes)
  cfg = conv.config_from_state_dict(sd, **kw).replace(**over)
  params = conv.params_from_state_dict(sd, cfg)
  images = rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  logits, aux = jax.jit(lambda p, x: CrateClassifier(cfg).apply({"params": p}, x))(params, images)
  ref = ref_forward(sd, images, cfg.heads, cfg.eta, cfg.lambd, cfg.pool)
  assert len(aux["blocks"]) == cfg.depth == len(ref["layers"])
  for got, want in zip(aux["blocks"], ref["layers"]):
    for key in ("attn", "proj", "half", "codes"):
      np.testing.assert_allclose(np.asarray(got[key]), want[key], err_msg=key, **TOL)
    np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(got["codes"]))  # no ISTA residual
    assert np.asarray(got["codes"]).min() >= 0
  np.testing.assert_allclose(np.asarray(aux["tokens"]), ref["layers"][-1]["codes"], **TOL)
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], **TOL)
  # the bases are the qkv weights: U = qkv.weight.T reshaped [dim, heads, dim_head] (head outer)
  u = subspace_bases(params, -1)
  want_u = sd[f"transformer.layers.{cfg.depth - 1}.0.fn.qkv.weight"].T.reshape(cfg.dim, cfg.heads, cfg.dim_head)
  np.testing.assert_array_equal(np.asarray(u), want_u)


def test_named_sizes_parameter_counts():
  # notes/crate.md §2 / §3 (counts of the official factories).
  want = {"crate-t": 6_090_856, "crate-s": 13_116_328, "crate-b": 22_796_008, "crate-l": 77_641_192,
          "crate-test": 52_618}
  for name, n in want.items():
    cfg = classifier_config(name)
    sd_shapes = conv.torch_shapes(cfg)
    assert sum(int(np.prod(s)) for s in sd_shapes.values()) == n, name
    shapes = jax.eval_shape(lambda: CrateClassifier(cfg).init(
        jax.random.PRNGKey(0), jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))["params"])
    import flax.linen as nn
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes))) == n, name
  assert classifier_config("CRATE_small") == CLASSIFIERS["crate-s"]
  assert (CLASSIFIERS["crate-s"].dim_head, CLASSIFIERS["crate-s"].heads) == (48, 12)
  with pytest.raises(ValueError, match="unknown CRATE model name"):
    classifier_config("crate-xl")


# ---------------------------------------------------------------------------- ISTA, known answers

def _ista_apply(u, d, eta, lambd):
  return np.asarray(ISTA(eta, lambd).apply({"params": {"D": jnp.asarray(d)}}, jnp.asarray(u)))


def _nonneg_lasso(x, d, lambd, iters=3000, step=0.5):
  """argmin_z 1/2 ||x - D z||^2 + lambd * sum(z), z >= 0, by projected gradient (float64, columns)."""
  z = np.zeros_like(x)
  for _ in range(iters):
    z = np.maximum(z - step * (d.T @ (d @ z - x) + lambd), 0)
  return z


def test_ista_orthogonal_dictionary_one_step_is_the_exact_sparse_code(rng):
  """With D orthogonal (DᵀD = I) and η = 1, one step from z0 = x gives
  ReLU(x + Dᵀ(x − D x) − λ) = ReLU(Dᵀx − λ), which is exactly the non-negative LASSO solution
  argmin_{z>=0} ½‖x − Dz‖² + λ·1ᵀz (‖x − Dz‖ = ‖Dᵀx − z‖ makes it separable). In row form the
  code of a token row u is ReLU(u D − λ). The LASSO solution is computed independently by
  projected gradient descent to convergence."""
  dim, lambd = 16, 0.3
  d, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  u = rng.standard_normal((5, dim))
  got = _ista_apply(u.astype(np.float32), d.astype(np.float32), 1.0, lambd)
  want = np.stack([_nonneg_lasso(row, d, lambd) for row in u])
  np.testing.assert_allclose(got, want, atol=2e-6)
  np.testing.assert_allclose(got, np.maximum(u @ d - lambd, 0), atol=2e-6)
  assert 0 < (got == 0).mean() < 1  # the test case has a non-trivial support
  # the authors' η = 0.1: one step is ReLU(0.9 u + 0.1 u D − 0.01) for orthogonal D
  got = _ista_apply(u.astype(np.float32), d.astype(np.float32), 0.1, 0.1)
  np.testing.assert_allclose(got, np.maximum(0.9 * u + 0.1 * u @ d - 0.01, 0), atol=2e-6)
  # D = I: plain non-negative soft threshold ReLU(u − ηλ)
  got = _ista_apply(u.astype(np.float32), np.eye(dim, dtype=np.float32), 0.1, 0.1)
  np.testing.assert_allclose(got, np.maximum(u - 0.01, 0), atol=2e-6)


# ---------------------------------------------------------------------------- other resolutions

@pytest.mark.parametrize("method", posemb.METHODS)
def test_position_embedding_resampling(method, rng):
  sd = make_state_dict(rng)
  cfg = conv.config_from_state_dict(sd, model_name="crate-test")
  params = conv.params_from_state_dict(sd, cfg)
  images = rng.standard_normal((1, 48, 40, 3)).astype(np.float32)      # grid 6 x 5 instead of 4 x 4
  logits, aux = CrateClassifier(cfg).apply({"params": params}, images, pos_interp=method)
  assert aux["blocks"][0]["attn"].shape == (1, 4, 31, 31)
  pos = posemb.resample_pos_embed(jnp.asarray(sd["pos_embedding"][0]), (6, 5), 1, method)
  assert pos.shape == (31, 64)
  ref = ref_forward(sd, images, cfg.heads, pos=np.asarray(pos))
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], **TOL)
  # at the native size the embedding is used unchanged, whatever the method
  small = images[:, :32, :32]
  a = CrateClassifier(cfg).apply({"params": params}, small, pos_interp=method)[0]
  np.testing.assert_allclose(np.asarray(a), ref_forward(sd, small, cfg.heads)["logits"], **TOL)
  with pytest.raises(ValueError, match="multiple of the patch size"):
    CrateClassifier(cfg).apply({"params": params}, images[:, :30])


# ---------------------------------------------------------------------------- converter

def test_converter_refuses_bad_keys_and_round_trips(rng, tmp_path):
  sd = make_state_dict(rng)
  cfg = conv.config_from_state_dict(sd, model_name="crate-test")
  bad = dict(sd)
  bad["transformer.layers.1.1.fn.D"] = bad.pop("transformer.layers.1.1.fn.weight")
  with pytest.raises(ValueError) as e:
    conv.params_from_state_dict(bad, cfg)
  assert "missing keys (1): transformer.layers.1.1.fn.weight" in str(e.value)
  assert "unexpected keys (1): transformer.layers.1.1.fn.D" in str(e.value)
  bad = dict(sd)
  bad["transformer.layers.0.0.fn.qkv.weight"] = bad["transformer.layers.0.0.fn.qkv.weight"][:32]
  with pytest.raises(ValueError, match=r"mis-shaped keys \(1\): transformer\.layers\.0\.0\.fn\.qkv\.weight"):
    conv.params_from_state_dict(bad, cfg)
  # a CRATE-S name on a small checkpoint: architecture mismatch, listed key by key
  with pytest.raises(ValueError, match="mis-shaped keys"):
    conv.params_from_state_dict(sd, conv.config_from_state_dict(sd, model_name="crate-s"))
  # heads are not in the shapes: refuse unless named / given / uniquely matched
  odd = make_state_dict(rng, dim=40, depth=1, heads=2, dim_head=20)
  with pytest.raises(ValueError, match="cannot infer the number of heads"):
    conv.config_from_state_dict(odd)
  assert conv.config_from_state_dict(sd).heads == 4        # unique match with crate-test's shapes
  # DDP prefix + {'state_dict': ...} wrapper, through an .npz file and a model directory
  wrapped = conv.unwrap_state_dict({"state_dict": {"module." + k: v for k, v in sd.items()}})
  assert set(wrapped) == set(sd)
  np.savez(tmp_path / "w.npz", **{"module." + k: v for k, v in sd.items()})
  cfg2, params = conv.convert(str(tmp_path / "w.npz"), str(tmp_path / "out"), model_name="crate-test")
  cfg3, params3 = conv.load_classifier(str(tmp_path / "out"))
  assert cfg3 == cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params3, jax.tree.map(np.asarray, params))


def test_converter_reads_torch_checkpoint_file(rng, tmp_path):
  from conftest import torch_or_skip
  torch = torch_or_skip()
  import argparse
  sd = make_state_dict(rng)
  ckpt = {"state_dict": {"module." + k: torch.from_numpy(v) for k, v in sd.items()},
          "epoch": 3, "args": argparse.Namespace(lr=1e-3)}
  torch.save(ckpt, tmp_path / "crate.pth")
  from trace_jax.convert import convert
  convert("crate", str(tmp_path / "crate.pth"), str(tmp_path / "dir"), heads=4)
  cfg, params = conv.load_classifier(str(tmp_path / "dir"))
  images = rng.standard_normal((1, 32, 32, 3)).astype(np.float32)
  logits = CrateClassifier(cfg).apply({"params": params}, images)[0]
  np.testing.assert_allclose(np.asarray(logits), ref_forward(sd, images, 4)["logits"], **TOL)


# ---------------------------------------------------------------------------- dual encoder

def test_clip_with_crate_tower_jit_vmap_and_perturbations(rng):
  cfg = get_config("crate-clip-tiny")
  assert cfg.vision.kind == "crate" and CLIPConfig.from_json(cfg.to_json()) == cfg
  ccfg = crate_config_from_clip(cfg)
  assert (ccfg.dim, ccfg.depth, ccfg.heads, ccfg.dim_head, ccfg.eta, ccfg.lambd) == (64, 2, 4, 16, 0.1, 0.1)
  model = build(cfg)
  params = init_params(cfg, jax.random.PRNGKey(0))
  assert params["visual"]["transformer"]["block_1"]["ista"]["D"].shape == (64, 64)
  images = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(1, 999, size=(2, 16)).astype(np.int32)
  out, aux = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(params, images, ids)
  assert out["logits_per_image"].shape == (3, 2)
  assert aux["image"]["blocks"][1]["proj"].shape == (3, 17, 4, 16)
  one = jax.jit(jax.vmap(lambda x: model.apply({"params": params}, x, method="encode_image")))(images)
  emb, _ = model.apply({"params": params}, images, method="encode_image")
  np.testing.assert_allclose(np.asarray(one[0]), np.asarray(emb), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(one[1]["blocks"][0]["attn"]), np.asarray(aux["image"]["blocks"][0]["attn"]),
                             rtol=1e-5, atol=1e-6)
  # project() is the head used by LeGrad-style methods
  pooled = model.apply({"params": params}, aux["image"]["tokens"][:, 0], method=lambda m, x: m.visual.project(x))
  np.testing.assert_allclose(np.asarray(pooled), np.asarray(emb), rtol=1e-5, atol=1e-5)

  # gradients w.r.t. attention probabilities / tokens through the 'perturbations' collection
  zeros = perturbation_zeros(model, params, images[:1], method="encode_image")
  blk = zeros["visual"]["transformer"]["block_0"]
  assert blk["attn"]["attn"].shape == (1, 4, 17, 17) and blk["tokens"].shape == (1, 17, 64)
  txt = jnp.asarray(rng.standard_normal(32), jnp.float32)

  def score(perts):
    e, _ = model.apply({"params": params, "perturbations": perts}, images[:1], method="encode_image")
    return (e @ txt).sum()

  plain = model.apply({"params": params}, images[:1], method="encode_image")[0]
  np.testing.assert_allclose(np.asarray(score(zeros)), np.asarray(plain @ txt).sum(), rtol=1e-6)
  g = jax.jit(jax.grad(score))(zeros)
  score = jax.jit(score)
  # per intermediate, a random direction; float32 central differences (step 1e-4: small against the
  # attention probabilities ~1/17 so few ISTA ReLU kinks are crossed) agree with the gradient to ~1%
  eps = 1e-4
  for path in (("block_0", "attn", "attn"), ("block_1", "attn", "attn"), ("block_0", "tokens")):
    get = lambda t: functools.reduce(lambda a, k: a[k], path, t["visual"]["transformer"])
    v = jnp.asarray(rng.standard_normal(get(zeros).shape), jnp.float32)

    def shifted(sign):
      new = jax.tree.map(lambda a: a, zeros)
      parent = functools.reduce(lambda a, k: a[k], path[:-1], new["visual"]["transformer"])
      parent[path[-1]] = get(zeros) + sign * eps * v
      return new

    fd = float(score(shifted(1)) - score(shifted(-1))) / (2 * eps)
    an = float(jnp.vdot(get(g), v))
    assert abs(fd - an) <= 3e-2 * max(1.0, abs(an)), (path, fd, an)
  # exact check of the last block's tokens gradient: the head as a function of the tokens alone
  toks = model.apply({"params": params}, images[:1], method="encode_image")[1]["tokens"]
  head = lambda t: (model.apply({"params": params}, t[:, 0], method=lambda m, x: m.visual.project(x)) @ txt).sum()
  np.testing.assert_allclose(np.asarray(g["visual"]["transformer"]["block_1"]["tokens"]),
                             np.asarray(jax.grad(head)(toks)), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(g["visual"]["transformer"]["block_0"]["attn"]["attn"]).sum()) > 0


# bfloat16 against float32 on the same (float32) params: relative errors measured on crate-clip-tiny
# with the inputs of the test below (seeds 0-2): embeddings / tokens 0.6-1.3 %, contrastive loss
# 0.1-0.2 %, parameter gradients (global L2) 1.8-2.8 %; the bounds leave 2-5x headroom.
BF16_TOL = dict(out=3e-2, loss=1e-2, grad=8e-2)


def _rel(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_crate_tower_bfloat16_matches_float32(rng):
  """dtype="bfloat16" computes in bfloat16 and agrees with float32 on the same params: embeddings,
  the contrastive loss and its parameter gradients (one train step's), within BF16_TOL.

  Fails on these broken variants (each checked by editing the CRATE model code): the tower ignoring
  the config's dtype (bf16 silently runs float32); MSSA dropping the dim_head ** -0.5 scale when the
  dtype is not float32 (embeddings off by 25 %); LayerNorm dropping its affine scale / bias when the
  dtype is not float32 (10 %); ISTA stopping the gradient into D on the bfloat16 path (forward equal,
  image-tower gradients off by 30 %). Not caught: a bf16-only slip as small as bf16 rounding itself
  (e.g. dropping ISTA's eta * lambd = 0.01 threshold shifts outputs by ~1 %).
  """
  from trace_jax.losses.contrastive import clip_contrastive_loss
  c32 = get_config("crate-clip-tiny")
  c16 = c32.replace(dtype="bfloat16")
  params = init_params(c16, jax.random.PRNGKey(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  # LayerNorm scales / biases away from 1 / 0 so that a path that drops them is seen
  noise = iter(rng.standard_normal(len(jax.tree.leaves(params))))
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.1 * next(noise) * jnp.ones_like(p) if path[-1].key in ("scale", "bias") else p,
      params)
  images = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(1, 999, size=(4, 16)).astype(np.int32)
  got = {}
  for name, cfg in (("f32", c32), ("bf16", c16)):
    model = build(cfg)

    def loss_fn(p, model=model):
      img, aux = model.apply({"params": p}, images, method="encode_image")
      txt, _ = model.apply({"params": p}, ids, method="encode_text")
      return clip_contrastive_loss(img, txt, p["logit_scale"]), (img, txt, aux["tokens"])

    (loss, (img, txt, tokens)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    got[name] = dict(loss=loss, img=img, txt=txt, tokens=tokens, grads=grads)
  lo, hi = got["bf16"], got["f32"]
  assert lo["tokens"].dtype == jnp.bfloat16 and hi["tokens"].dtype == jnp.float32
  assert lo["img"].dtype == jnp.float32  # embeddings come back in float32
  assert _rel(lo["img"], hi["img"]) > 1e-4  # really computed in lower precision
  for k in ("img", "txt", "tokens"):
    assert _rel(lo[k], hi[k]) <= BF16_TOL["out"], (k, _rel(lo[k], hi[k]))
  assert abs(float(lo["loss"]) - float(hi["loss"])) <= BF16_TOL["loss"] * abs(float(hi["loss"]))
  g_lo = np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(lo["grads"])])
  g_hi = np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(hi["grads"])])
  assert np.isfinite(g_lo).all() and _rel(g_lo, g_hi) <= BF16_TOL["grad"], _rel(g_lo, g_hi)
  # the image tower alone (the CRATE part), so that text-tower gradients cannot dominate the sum
  v_lo, v_hi = (np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(x["grads"]["visual"])])
                for x in (lo, hi))
  assert _rel(v_lo, v_hi) <= BF16_TOL["grad"], _rel(v_lo, v_hi)


def test_crate_bad_options():
  bad = get_config("crate-clip-tiny").replace(extra=(("crate_etta", 0.1),))
  with pytest.raises(ValueError, match="crate_etta"):
    crate_config_from_clip(bad)
  with pytest.raises(ValueError, match="pool"):
    CrateConfig(pool="max")


def test_converter_takes_eta_not_stored_in_the_weights(rng, tmp_path):
  """η is not in the weights: `convert --from crate --eta 0.05` reproduces a checkpoint trained with
  ista=0.05 (float64 reference at η = 0.05); the default η = 0.1 does not (it is off by more than the
  tolerance), so a dropped --eta would fail this test."""
  from conftest import torch_or_skip
  torch = torch_or_skip()
  from trace_jax.cli import main
  sd = make_state_dict(rng)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "crate.pth")
  images = rng.standard_normal((1, 32, 32, 3)).astype(np.float32)
  assert main(["convert", "--from", "crate", str(tmp_path / "crate.pth"), str(tmp_path / "d05"),
               "--heads", "4", "--eta", "0.05"]) == 0
  cfg, params = conv.load_classifier(str(tmp_path / "d05"))
  assert cfg.eta == 0.05
  logits = np.asarray(CrateClassifier(cfg).apply({"params": params}, images)[0])
  np.testing.assert_allclose(logits, ref_forward(sd, images, 4, eta=0.05)["logits"], **TOL)
  assert not np.allclose(logits, ref_forward(sd, images, 4, eta=0.1)["logits"], **TOL)
