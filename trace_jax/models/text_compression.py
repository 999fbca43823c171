"""Text-compression module of the local-alignment objective (local-alignment-register-tokens.md §1).

M learnable register tokens R [M, D] (M = number of image patches) read the text tokens through
cross-attention and come out as ``T_compressed`` [B, M, E], one slot per image patch:

    r_0   = R                                     (broadcast over the batch)
    r_l+1 = r_l + CrossAttn(LN(r_l), LN(T W_in))  (queries: registers; keys/values: valid text tokens)
    r_l+1 = r_l+1 + MLP(LN(r_l+1))
    out   = LN(r_L) @ W_out                       [B, M, E]

Reading: the paper says "cross-attention lets each register pull the text information it needs";
the prototype code (toilaluan/patch_wise_clip, notes/amc-and-local-alignment.md §8) instead runs a
joint self-attention over concat(text, registers). We follow the paper (cross-attention only; the
registers do not attend to each other, so slot i is a function of R_i and the text alone). Padding
after the end-of-text token is masked out of the keys. Gradients flow into the text encoder.

The module also holds the local loss's own learnable log-temperature ``logit_scale`` (the prototype
keeps separate pool/patch scales, notes §8).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trace_jax.models.layers import LayerNorm, mlp, part


class CrossAttention(nn.Module):
  """Multi-head attention of queries x [B, M, D] over keys/values y [B, L, D] with mask [B, L]."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, y, valid):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"compression width {width} is not divisible by {self.num_heads} heads")
    hd = width // self.num_heads
    init = nn.initializers.normal(width ** -0.5)
    proj = lambda name: nn.DenseGeneral(
        (self.num_heads, hd), dtype=self.dtype, param_dtype=jnp.float32, name=name,
        kernel_init=part(init, ("embed", "heads", "kv")), bias_init=part(nn.initializers.zeros, ("heads", "kv")))
    q = proj("query")(x) * (hd ** -0.5)
    k = proj("key")(y)
    v = proj("value")(y)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32, name="out",
                           kernel_init=part(init, ("heads", "kv", "embed")),
                           bias_init=part(nn.initializers.zeros, ("embed",)))(out)


class CompressionBlock(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  act: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, r, t, valid):
    width = r.shape[-1]
    r = r + CrossAttention(self.num_heads, self.dtype, name="attn")(
        LayerNorm(self.dtype, name="ln_q")(r), LayerNorm(self.dtype, name="ln_kv")(t), valid)
    return r + mlp(LayerNorm(self.dtype, name="ln_2")(r), int(width * self.mlp_ratio), self.act, self.dtype)


class TextCompression(nn.Module):
  """Registers [M, width] cross-attend to text tokens [B, L, W_text] -> slots [B, M, out_dim].

  Attributes:
    num_registers: M (= number of image patches, gh * gw).
    width: internal width D of the registers.
    out_dim: E, the joint embedding dim (the image patches are projected to it by ln_post @ proj).
  """
  num_registers: int
  width: int
  out_dim: int
  layers: int = 2
  heads: int = 4
  mlp_ratio: float = 4.0
  act: str = "gelu"
  dtype: Any = jnp.float32
  logit_scale_init: float = math.log(1 / 0.07)

  @nn.compact
  def __call__(self, text_tokens, valid):
    """text_tokens [B, L, W_text], valid [B, L] bool -> [B, M, out_dim] float32 (un-normalised)."""
    if text_tokens.ndim != 3 or valid.shape != text_tokens.shape[:2]:
      raise ValueError(f"text_tokens must be [B, L, width] and valid [B, L]; got "
                       f"{tuple(text_tokens.shape)} and {tuple(valid.shape)}")
    self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), (), jnp.float32)
    regs = self.param("registers", part(nn.initializers.normal(0.02), (None, "embed")),
                      (self.num_registers, self.width), jnp.float32)
    t = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, name="in_proj",
                 kernel_init=part(nn.initializers.lecun_normal(), (None, "embed")),
                 bias_init=part(nn.initializers.zeros, ("embed",)))(text_tokens.astype(self.dtype))
    r = jnp.broadcast_to(regs.astype(self.dtype), (text_tokens.shape[0],) + regs.shape)
    for i in range(self.layers):
      r = CompressionBlock(self.heads, self.mlp_ratio, self.act, self.dtype, name=f"block_{i}")(r, t, valid)
    r = LayerNorm(self.dtype, name="ln_out")(r)
    w_out = self.param("out_proj", part(nn.initializers.normal(self.width ** -0.5), ("embed", None)),
                       (self.width, self.out_dim), jnp.float32)
    return (r @ w_out.astype(self.dtype)).astype(jnp.float32)


META_FIELDS = ("num_registers", "width", "out_dim", "layers", "heads", "mlp_ratio", "act")


def to_meta(module: TextCompression, dtype: str = "float32") -> dict:
  """JSON description of a TextCompression (stored as a model dir head, trace_jax/model_dir.py)."""
  return {"kind": "text_compression", "dtype": dtype, **{k: getattr(module, k) for k in META_FIELDS}}


def from_meta(meta: dict) -> TextCompression:
  """The TextCompression that ``to_meta`` described."""
  from trace_jax.models.layers import dtype_of
  return TextCompression(**{k: meta[k] for k in META_FIELDS}, dtype=dtype_of(meta.get("dtype", "float32")))
