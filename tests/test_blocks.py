"""The functional ViT block pieces (trace_jax/models/blocks.py) against the linen forward, and the
tower-kind checks of the methods that use them.

Tolerances (float32, tiny ViT preset): pieces that run the same ops as the linen block (``values``,
``block_tail``, ``run_blocks``, ``vision_head``, also in bfloat16) are bit-identical; the pooled row
(the token mean taken before the MLP's output projection) and the one-query row (a [h, e] x [N, h, e]
product instead of the full [N, N] one) differ by rounding only: atol 1e-5 (measured <= 1e-6).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trace_jax.models import blocks as B
from trace_jax.models import build, get_config, init_params
from trace_jax.models.layers import ResidualAttentionBlock

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
  cfg = get_config("tiny")
  return cfg, build(cfg), init_params(cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def crate():
  cfg = get_config("crate-clip-tiny")
  return cfg, build(cfg), init_params(cfg, jax.random.PRNGKey(0))


def _linen_block(tiny, tower, dtype, x, mask):
  """(output y, aux, captured intermediates) of block_1 of ``tower`` run as the linen module."""
  cfg, _, params = tiny
  c = cfg.vision if tower == "visual" else cfg.text
  bp = params[tower]["transformer"]["block_1"]
  (y, aux), state = ResidualAttentionBlock(c.heads, c.mlp_ratio, cfg.act, dtype).apply(
      {"params": bp}, x, mask, capture_intermediates=True)
  return bp, y, aux, state["intermediates"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tower", ["visual", "text"])
def test_values_and_block_tail_equal_the_linen_block(tiny, tower, dtype):
  cfg = tiny[0]
  c = cfg.vision if tower == "visual" else cfg.text
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 9, c.width)), dtype)
  mask = jnp.tril(jnp.ones((9, 9), bool)) if tower == "text" else None
  bp, y, aux, inter = _linen_block(tiny, tower, dtype, x, mask)
  v = B.values(bp, x, dtype)                                       # [3, 9, heads, hd]
  np.testing.assert_array_equal(v, inter["attn"]["value"]["__call__"][0])
  np.testing.assert_array_equal(B.layer_norm(bp["ln_1"], x, dtype), inter["ln_1"]["__call__"][0])
  o = B.attend(aux["attn"], v, dtype)                              # the block's own probabilities
  got = B.block_tail(bp, x, o, cfg.act, dtype)
  assert got.dtype == y.dtype
  np.testing.assert_array_equal(got, y)
  if dtype == jnp.float32:
    np.testing.assert_allclose(B.pooled_from_o(bp, x, o, cfg.act), y.mean(-2), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tower", ["visual", "text"])
def test_one_query_rows_equal_the_linen_block(tiny, tower):
  cfg = tiny[0]
  c = cfg.vision if tower == "visual" else cfg.text
  causal = tower == "text"
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, c.width)), jnp.float32)
  mask = jnp.tril(jnp.ones((9, 9), bool)) if causal else None
  bp, y, _, _ = _linen_block(tiny, tower, jnp.float32, x, mask)
  for q in (0, 4, 8):
    row = B.block_one_query(bp, x, q, act=cfg.act, causal=causal, heads=c.heads)
    np.testing.assert_allclose(row, y[:, q], atol=ATOL, rtol=0)
    np.testing.assert_allclose(B.block_one_query(bp, x[0], q, act=cfg.act, causal=causal), y[0, q],
                               atol=ATOL, rtol=0)  # unbatched
  with pytest.raises(ValueError, match="heads"):
    B.block_one_query(bp, x, 0, act=cfg.act, heads=c.heads + 1)


def test_towers_and_heads_equal_the_model_forward(tiny):
  cfg, model, params = tiny
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, 998, size=(2, 7)), jnp.int32).at[:, 5].set(999)  # EOT at 5
  emb, aux = model.apply({"params": params}, images, method="encode_image")
  temb, taux = model.apply({"params": params}, ids, method="encode_text")
  vp, tp = params["visual"], params["text"]
  # LeGrad's recompute of block 1 from its input and the model's own probabilities (pooled row).
  x0, blk = aux["blocks"][0]["tokens"], aux["blocks"][1]
  o = B.attend(blk["attn"], B.values(vp["transformer"]["block_1"], x0))
  np.testing.assert_allclose(B.pooled_from_o(vp["transformer"]["block_1"], x0, o, cfg.act),
                             blk["tokens"].mean(-2), atol=ATOL, rtol=0)
  # blocks 1..L-1 from block 0's output: bit-identical to the model's tokens.
  np.testing.assert_array_equal(
      B.run_blocks(vp, cfg.vision, cfg.act, jnp.float32, 1, cfg.vision.layers, x0), aux["tokens"])
  # the head on the model's CLS row: bit-identical to VisionTransformer.project.
  np.testing.assert_array_equal(B.vision_head(vp, aux["tokens"][:, 0]), emb)
  # M2IB's suffixes: the pooled row from block 0's output, then the head.
  cls = B.tower_row(vp, cfg.vision, cfg.act, jnp.float32, 0, x0, 0, False)
  np.testing.assert_allclose(B.vision_head(vp, cls), emb, atol=ATOL, rtol=0)
  np.testing.assert_array_equal(
      B.tower_row(vp, cfg.vision, cfg.act, jnp.float32, cfg.vision.layers - 1, aux["tokens"], 0, False),
      aux["tokens"][:, 0])
  for b in range(2):
    eot = int(taux["eot"][b])
    row = B.tower_row(tp, cfg.text, cfg.act, jnp.float32, 0, taux["blocks"][0]["tokens"][b], eot, True)
    np.testing.assert_allclose(B.text_head(tp, row), temb[b], atol=ATOL, rtol=0)


def test_legrad_feature_of_attn_is_the_layer_feature(tiny):
  """LeGrad's z_l(A) at the model's own A_l equals normalize(ln_post(mean_i x_l) @ proj)."""
  from trace_jax.attribution import legrad as lg
  from trace_jax.models import l2_normalize
  cfg, model, params = tiny
  image = jnp.asarray(np.random.default_rng(3).normal(size=(32, 32, 3)), jnp.float32)
  _, aux = model.apply({"params": params}, image, method="encode_image")
  _, state = lg.image_state(model, params, image, (0, 1))
  for l in (0, 1):
    x_prev, attn = state[l]
    want = l2_normalize(B.vision_head(params["visual"], aux["blocks"][l]["tokens"].mean(0)))
    np.testing.assert_allclose(lg.feature_of_attn(params["visual"], l, cfg.act, x_prev, attn), want,
                               atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- tower kinds

def test_require_vit(tiny, crate):
  B.require_vit(tiny[0], "LeGrad")
  B.require_vit(tiny[1], "LeGrad")  # a model works as well as its config
  with pytest.raises(ValueError, match="LeGrad needs a ViT tower; this model has a CRATE tower"):
    B.require_vit(crate[0], "LeGrad")


def test_methods_name_the_crate_tower(crate):
  from trace_jax.attribution import explain, legrad, m2ib
  from trace_jax.inversion import maskinversion
  cfg, model, params = crate
  rng = np.random.default_rng(4)
  images = jnp.asarray(rng.normal(size=(1, 32, 32, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, 998, size=(1, 6)), jnp.int32).at[:, -1].set(999)
  q = np.ones((1, cfg.embed_dim), np.float32)
  with pytest.raises(ValueError, match="LeGrad needs a ViT tower; this model has a CRATE tower"):
    legrad.legrad(model, params, images, q)
  with pytest.raises(ValueError, match="LeGrad needs a ViT tower; this model has a CRATE tower"):
    explain("legrad", model, params, images, ids)
  with pytest.raises(ValueError, match="M2IB needs a ViT tower; this model has a CRATE tower"):
    m2ib.explain(model, params, images, ids, layer=0)
  with pytest.raises(ValueError, match="M2IB needs a ViT tower; this model has a CRATE tower"):
    m2ib.explain(model, params, images, ids, layer=0, modality="image")
  with pytest.raises(ValueError, match="MaskInversion needs a ViT tower; this model has a CRATE tower"):
    maskinversion.invert(model, params, images[0], np.ones((1, 32, 32), np.float32))
  # M2IB's text bottleneck only needs the image embedding: it runs on any image tower.
  out = m2ib.explain(model, params, images, ids, layer=0, steps=2, samples=2, modality="text")
  assert out["text"].shape == (1, 6) and np.isfinite(np.asarray(out["text"])).all()


def test_generic_methods_run_on_a_crate_tower(crate):
  """GradCAM, rollout, Chefer, saliency and RISE read the model only through (outputs, aux) and the
  attention perturbations, which the CRATE tower provides: they need no tower check."""
  from trace_jax.attribution import explain
  cfg, model, params = crate
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, 998, size=(2, 6)), jnp.int32).at[:, -1].set(999)
  for method, kw in (("gradcam", {}), ("rollout", {}), ("chefer", {}), ("saliency", {}),
                     ("rise", {"num_masks": 8, "s": 4})):
    out = explain(method, model, params, images, ids, **kw)
    m = np.asarray(out["map"])
    assert m.shape == (2, 32, 32) and np.isfinite(m).all(), method
