"""Functional pieces of the ViT block that attribution and inversion methods recompute.

The linen modules (trace_jax/models/layers.py, clip.py) run whole blocks. LeGrad, M2IB and
MaskInversion need parts of a block as plain functions of its parameters
``bp = params[tower]['transformer'][f'block_{l}']``: LeGrad differentiates a block's pooled output
w.r.t. its attention probabilities, MaskInversion w.r.t. the attention output, and M2IB evaluates only
the pooled row of a tower's last block. Each piece is built from the same linen layers with the same
parameters and dtype rules as ``ResidualAttentionBlock`` (LayerNorm and attention logits / softmax in
at least float32, the rest in ``dtype``), so it computes what the block computes; tests/test_blocks.py
checks every piece against the linen forward.

Block of an open_clip / OpenAI / HF CLIP ViT (notes/legrad-maskinversion.md, "Hooked attention"),
tokens x [.., N, W], heads h, head dim e:

    u       = ln_1(x)
    q, k, v = u Wq + bq, u Wk + bk, u Wv + bv                  [.., N, h, e]   (q scaled by e^-1/2)
    A       = softmax(q k^T)                                    [.., h, N, N]   (post-softmax probs)
    o       = A v                                               [.., N, h, e]
    x_mid   = x + o Wout + bout                                 [.., N, W]
    y       = x_mid + mlp(ln_2(x_mid))                          [.., N, W]      the block output

Pieces (all shapes may carry leading batch axes):

* :func:`values`          v from the block input x;
* :func:`attend`          o = A v;
* :func:`block_tail`      y from x and o (everything after the softmax);
* :func:`pooled_from_o`   mean_i y[i] from x and o: the pooled row of LeGrad's layer feature (the token
                          mean is taken before the MLP's output projection, which is affine);
* :func:`block_one_query` y[q], one query row (M2IB reads only the CLS / EOT row of the last block);
* :func:`run_blocks`, :func:`tower_row`   blocks ``start..stop-1`` of a tower; row q of its output;
* :func:`vision_head`, :func:`text_head`  ln_post @ proj, ln_final @ text_projection on pooled rows.

:func:`require_vit` is the tower-kind check of the methods that recompute these pieces: a CRATE
tower (trace_jax/models/crate.py) has no ``value`` projection, MLP or ``ln_pre``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trace_jax.models.layers import ACTIVATIONS, LayerNorm, ResidualAttentionBlock, acc_dtype

Dtype = Any
F32 = jnp.float32

TOWER_NAMES = {"vit": "ViT", "crate": "CRATE", "siglip": "SigLIP (MAP-pooled ViT)"}


# ----------------------------------------------------------------------------- tower kind

def tower_name(kind: str) -> str:
  """'vit' -> 'ViT', 'crate' -> 'CRATE' (unknown kinds are quoted)."""
  return TOWER_NAMES.get(kind, repr(kind))


def require_vit(cfg, method: str, note: str = "", allow: tuple = ()) -> None:
  """ValueError unless the image tower is a ViT (``cfg.vision.kind == 'vit'``) or one of the kinds in
  ``allow`` (e.g. ``('siglip',)`` for the methods with a SigLIP path).

  ``cfg``: a CLIPConfig or a model with ``.cfg``. The message names the method and the tower, e.g.
  "LeGrad needs a ViT tower; this model has a CRATE tower (vision kind 'crate')"; ``note`` is appended.
  """
  cfg = getattr(cfg, "cfg", cfg)
  kind = cfg.vision.kind
  if kind != "vit" and kind not in allow:
    notes = [f"{' and '.join(tower_name(k) for k in allow)} towers work too"] if allow else []
    notes += [note] if note else []
    raise ValueError(f"{method} needs a ViT tower; this model has a {tower_name(kind)} tower "
                     f"(vision kind {kind!r}): it recomputes pieces of the ViT block (attention values, "
                     f"MLP) from their parameters" + "".join(f". {n}" for n in notes))


# ----------------------------------------------------------------------------- layers

def layer_norm(p, x, dtype: Dtype = F32):
  """The model's LayerNorm (eps 1e-5, in at least float32, cast to ``dtype``) on ``p = {'ln': ..}``."""
  return LayerNorm(dtype).apply({"params": p}, x)


def _heads(p, x, dtype):
  """DenseGeneral [.., W] -> [.., h, e] of the ``query`` / ``key`` / ``value`` params ``p``."""
  h, e = p["kernel"].shape[-2:]
  return nn.DenseGeneral((h, e), dtype=dtype, param_dtype=F32).apply({"params": p}, x)


def _dense(p, x, dtype):
  return nn.Dense(p["kernel"].shape[-1], dtype=dtype, param_dtype=F32).apply({"params": p}, x)


def _out(p, o, dtype):
  """Attention output projection [.., N, h, e] -> [.., N, W]."""
  return nn.DenseGeneral(p["kernel"].shape[-1], axis=(-2, -1), dtype=dtype,
                         param_dtype=F32).apply({"params": p}, o)


def _mlp_hidden(bp, x_mid, act: str, dtype):
  """act(ln_2(x_mid) @ mlp_fc) [.., N, mlp]."""
  return ACTIVATIONS[act](_dense(bp["mlp_fc"], layer_norm(bp["ln_2"], x_mid, dtype), dtype))


# ----------------------------------------------------------------------------- block pieces

def values(bp, x, dtype: Dtype = F32):
  """Attention values v [.., N, h, e] of a block from its input x [.., N, W]."""
  return _heads(bp["attn"]["value"], layer_norm(bp["ln_1"], x, dtype), dtype)


def attend(attn, v, dtype: Dtype = F32):
  """o = A v: probabilities attn [.., h, N, N] and values v [.., N, h, e] -> [.., N, h, e]."""
  return jnp.einsum("...hqk,...khd->...qhd", attn.astype(dtype), v)


def block_tail(bp, x, o, act: str, dtype: Dtype = F32):
  """Block output y [.., N, W] from its input x [.., N, W] and the attention output o [.., N, h, e]."""
  x_mid = x + _out(bp["attn"]["out"], o, dtype)
  return x_mid + _dense(bp["mlp_proj"], _mlp_hidden(bp, x_mid, act, dtype), dtype)


def pooled_from_o(bp, x, o, act: str, dtype: Dtype = F32):
  """mean_i y[i] [.., W] (the block output averaged over ALL N tokens) from x [.., N, W], o [.., N, h, e].

  y = x_mid + mlp(ln_2(x_mid)): the token mean is taken before the MLP's output projection (affine),
  so a backward pass does that matmul once, not N times (LeGrad's layer feature, notes step 2).
  """
  x_mid = x + _out(bp["attn"]["out"], o, dtype)
  hidden = jnp.mean(_mlp_hidden(bp, x_mid, act, dtype), axis=-2)
  return jnp.mean(x_mid, axis=-2) + _dense(bp["mlp_proj"], hidden, dtype)


def block_one_query(bp, x, q, *, act: str, dtype: Dtype = F32, causal: bool = False,
                    heads: int | None = None):
  """Output row ``q`` of a block, y[.., q, :] [.., W], from its input x [.., N, W].

  Keys / values of all tokens, but the query, attention output and MLP of one row only (~1/6 of a
  full block at ViT-B/16 size). ``causal``: the row attends to tokens <= q (the text tower).
  ``heads``, if given, is checked against the kernels.
  """
  a = bp["attn"]
  if heads is not None and heads != a["query"]["kernel"].shape[-2]:
    raise ValueError(f"heads={heads} but the block's kernels have {a['query']['kernel'].shape[-2]} heads")
  u = layer_norm(bp["ln_1"], x, dtype)
  e = a["query"]["kernel"].shape[-1]
  qv = _heads(a["query"], jnp.take(u, q, axis=-2), dtype) * (e ** -0.5)   # [.., h, e]
  k = _heads(a["key"], u, dtype)                                           # [.., N, h, e]
  v = _heads(a["value"], u, dtype)
  logits = jnp.einsum("...hd,...khd->...hk", qv, k).astype(acc_dtype(dtype))
  if causal:
    logits = jnp.where(jnp.arange(x.shape[-2]) <= q, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)                                  # [.., h, N]
  o = jnp.einsum("...hk,...khd->...hd", probs.astype(dtype), v)
  x_mid = jnp.take(x, q, axis=-2) + _out(a["out"], o, dtype)
  return x_mid + _dense(bp["mlp_proj"], _mlp_hidden(bp, x_mid, act, dtype), dtype)


# ----------------------------------------------------------------------------- towers

def run_blocks(tower_params, tower_cfg, act: str, dtype: Dtype, start: int, stop: int, x, mask=None):
  """Blocks ``start .. stop-1`` of a tower (the linen block itself) on x [.., N, W] -> [.., N, W].

  ``tower_params`` = ``params['visual']`` or ``params['text']``; ``tower_cfg`` = ``cfg.vision`` /
  ``cfg.text`` (heads, mlp_ratio); ``mask`` [N, N] bool (causal for the text tower) or None.
  """
  block = ResidualAttentionBlock(tower_cfg.heads, tower_cfg.mlp_ratio, act, dtype)
  for i in range(start, stop):
    x, _ = block.apply({"params": tower_params["transformer"][f"block_{i}"]}, x, mask)
  return x


def tower_row(tower_params, tower_cfg, act: str, dtype: Dtype, layer: int, t, q, causal: bool):
  """Row q [.., W] of the tower's final tokens, from the output t [.., N, W] of block ``layer``.

  Blocks ``layer+1 .. L-2`` run in full, the last block only for row q (:func:`block_one_query`).
  """
  n_layers = tower_cfg.layers
  if layer == n_layers - 1:  # nothing after: the row itself
    return jnp.take(t, q, axis=-2)
  mask = jnp.tril(jnp.ones((t.shape[-2],) * 2, bool)) if causal else None
  x = run_blocks(tower_params, tower_cfg, act, dtype, layer + 1, n_layers - 1, t, mask)
  return block_one_query(tower_params["transformer"][f"block_{n_layers - 1}"], x, q, act=act,
                         dtype=dtype, causal=causal)


def vision_head(vp, pooled, dtype: Dtype = F32):
  """``VisionTransformer.project``: ln_post then @ proj, [.., W] -> [.., E] (un-normalised)."""
  return (layer_norm(vp["ln_post"], pooled, dtype) @ vp["proj"].astype(dtype)).astype(acc_dtype(dtype))


def text_head(tp, pooled, dtype: Dtype = F32):
  """The text tower's head on pooled rows: ln_final then @ text_projection, [.., W] -> [.., E].

  ln_final is per token, so pooling first gives the model's numbers.
  """
  y = layer_norm(tp["ln_final"], pooled, dtype) @ tp["text_projection"].astype(dtype)
  return y.astype(acc_dtype(dtype))
