"""training/flops.py: matmul FLOPs counted from a jaxpr, against closed-form counts written out here.

* dot_general (plain, batched, multi-contraction), convolution (strided patch embedding, grouped);
* the gradient of a matmul chain is 3x its forward (2 extra matmuls per layer), remat adds the
  recomputed forward (4x), a scan is its body x length, a cond its larger branch, a shard_map body
  x the devices it runs on; a while loop is refused (its trip count is unknown);
* the real CLIP forward (trace_jax/models/clip.py, tiny preset) equals the textbook ViT count
  (patch embedding, q/k/v/out, QK^T and attention x V, MLP, heads, the logits matmul).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from trace_jax.training import flops


def _s(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_dot_general_counts():
  assert flops.count(lambda a, b: a @ b, _s(5, 7), _s(7, 3)) == 2 * 5 * 7 * 3
  # batched + two contracted dims: "bnhd,bmhd->bhnm" = 2 * b*h * d * n * m
  f = lambda q, k: jnp.einsum("bnhd,bmhd->bhnm", q, k)
  assert flops.count(f, _s(2, 5, 3, 4), _s(2, 6, 3, 4)) == 2 * (2 * 3) * 4 * 5 * 6
  f = lambda x, w: jnp.einsum("bhd,hde->be", x, w)     # contract h and d
  assert flops.count(f, _s(4, 3, 5), _s(3, 5, 7)) == 2 * 4 * (3 * 5) * 7


def test_convolution_counts():
  # a 16x16 patch embedding of [2, 64, 64, 3] to 32 features: 2 * out elements * window * in features
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (16, 16), "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert flops.count(conv, _s(2, 64, 64, 3), _s(16, 16, 3, 32)) == 2 * (2 * 4 * 4 * 32) * (16 * 16) * 3
  # grouped (4 groups of 2 input features): each output sums over its group's 2 features only
  grouped = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=4,
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert flops.count(grouped, _s(1, 5, 5, 8), _s(3, 3, 2, 8)) == 2 * (5 * 5 * 8) * 9 * 2


def _mlp(ws, x):
  for w in ws:
    x = jnp.tanh(x @ w)
  return x


def test_gradient_remat_scan_cond_shard_map():
  n, d = 16, 8
  ws, x = [_s(d, d)] * 3, _s(n, d)
  fwd = 3 * 2 * n * d * d
  assert flops.count(_mlp, ws, x) == fwd
  # grad wrt weights AND input: every layer adds dW = x^T g and dx = g W^T, 2 matmuls of the same size
  loss = lambda ws, x: _mlp(ws, x).sum()
  assert flops.count(jax.grad(loss, argnums=(0, 1)), ws, x) == 3 * fwd
  # wrt the weights only, the first layer's dx is not needed (JAX drops it): 3x - 1 matmul
  assert flops.count(jax.grad(loss), ws, x) == 3 * fwd - 2 * n * d * d
  # remat: the backward recomputes the forward once more
  remat = lambda ws, x: jax.checkpoint(_mlp)(ws, x).sum()
  assert flops.count(jax.grad(remat, argnums=(0, 1)), ws, x) == 4 * fwd
  # scan over 5 steps of one layer: 5 x the body (XLA's cost analysis counts the body once)
  scan = lambda w, x: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0]
  assert flops.count(scan, _s(d, d), x) == 5 * 2 * n * d * d
  # cond: the larger branch (an upper bound on what runs)
  cond = lambda p, w, x: jax.lax.cond(p, lambda: (x @ w) @ w, lambda: x @ w)
  assert flops.count(cond, jax.ShapeDtypeStruct((), bool), _s(d, d), x) == 2 * 2 * n * d * d
  # while: refused, not counted once
  loop = lambda w, x: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w, c[1] + 1), (x, 0))[0]
  with pytest.raises(ValueError, match="while loop"):
    flops.count(loop, _s(d, d), x)


def test_shard_map_counts_every_device():
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("x",), devices=devices)
  rows = 4 * len(devices)
  f = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x"))
  a = jax.ShapeDtypeStruct((rows, 6), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  b = jax.ShapeDtypeStruct((6, 5), jnp.float32, sharding=NamedSharding(mesh, P()))
  assert flops.count(f, a, b) == 2 * rows * 6 * 5     # the global matmul, not one shard's


def test_clip_forward_is_the_textbook_vit_count():
  from trace_jax.models import presets
  from trace_jax.models.clip import CLIP
  cfg = presets.get_config("tiny")
  v, t = cfg.vision, cfg.text
  model = CLIP(cfg)
  B, T = 3, 5
  images, ids = _s(B, v.image_size, v.image_size, 3), jax.ShapeDtypeStruct((T, t.context_length), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, ids)
  got = flops.count(lambda p, x, i: model.apply(p, x, i), params, images, ids)

  def tower(rows, n, w, layers, mlp_ratio):
    hidden = int(w * mlp_ratio)
    per_block = (3 * 2 * n * w * w        # q, k, v
                 + 2 * n * n * w          # QK^T over all heads (heads x head_dim = w)
                 + 2 * n * n * w          # attention x V
                 + 2 * n * w * w          # out projection
                 + 2 * 2 * n * w * hidden)  # MLP fc + proj
    return rows * layers * per_block

  g = v.image_size // v.patch_size
  n_img = 1 + g * g
  want = (B * 2 * g * g * (v.patch_size ** 2 * 3) * v.width      # patch embedding
          + tower(B, n_img, v.width, v.layers, v.mlp_ratio)
          + B * 2 * v.width * cfg.embed_dim                        # ln_post @ proj (class token)
          + tower(T, t.context_length, t.width, t.layers, t.mlp_ratio)
          + T * 2 * t.width * cfg.embed_dim                        # text_projection (EOT row)
          + 2 * B * T * cfg.embed_dim)                             # the logits img @ txt.T
  assert got == want, (got, want, got - want)
