"""Transformer building blocks shared by the CLIP towers.

Every block returns ``(x, aux)`` where ``aux = {'attn': probs [.., heads, N, N], 'tokens': x}``
(big_vision style) and also passes both through ``self.perturb`` so that a caller can take
``jax.grad`` with respect to them (see ``trace_jax.models.perturbations``). With no
``'perturbations'`` collection in the variables ``perturb`` is the identity, so the forward
numerics are unchanged.

Parameter logical axes (mapped to a mesh in ``trace_jax/training/sharding.py``):
``embed`` (model width), ``mlp`` (MLP hidden), ``heads``, ``kv`` (head dim), ``vocab``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

LN_EPS = 1e-5  # torch nn.LayerNorm default; flax's 1e-6 drifts ~1e-4 (notes/crate.md pitfalls)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
  return jax.nn.gelu(x, approximate=False)  # torch nn.GELU() / HF "gelu" are the erf form


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def dtype_of(name: str):
  """The jnp dtype of a config's dtype name ('float32', 'bfloat16', 'float16', 'float64')."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {tuple(DTYPES)}")
  return DTYPES[name]


def acc_dtype(dtype: Dtype):
  """Dtype of the precision-sensitive parts (LayerNorm, attention logits / softmax, projected
  embeddings): at least float32, as open_clip upcasts them for bf16 / fp16; float64 stays float64
  (the float64 model that the tight finite-difference tests use)."""
  return jnp.promote_types(dtype, jnp.float32)


def part(init, axes):
  return nn.with_logical_partitioning(init, axes)


class LayerNorm(nn.Module):
  """torch-default LayerNorm (eps 1e-5, two-pass variance) in at least float32 (like open_clip's
  LayerNorm for low precision), cast back; ``axis_name`` is the feature axis' logical name."""
  dtype: Dtype = jnp.float32
  axis_name: str | None = "embed"

  @nn.compact
  def __call__(self, x):
    acc = acc_dtype(self.dtype)
    # use_fast_variance=False: two-pass variance like torch (E[x²]-E[x]² loses digits on large means).
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=acc, param_dtype=jnp.float32, use_fast_variance=False,
                     scale_init=part(nn.initializers.ones, (self.axis_name,)),
                     bias_init=part(nn.initializers.zeros, (self.axis_name,)), name="ln")(x.astype(acc))
    return y.astype(self.dtype)


def check_images(images, patch_size: int, image_size: int, channels: int = 3) -> None:
  """Static shape checks of NHWC images (or one HWC image) with messages that name the problem."""
  if images.ndim not in (3, 4):
    raise ValueError(f"images must be NHWC [batch, height, width, {channels}] or a single HWC image; "
                     f"got rank {images.ndim} with shape {tuple(images.shape)}")
  h, w, c = images.shape[-3:]
  if c != channels:
    raise ValueError(f"images must have {channels} channels last (NHWC); got shape {tuple(images.shape)}")
  p = patch_size
  if h % p or w % p or h < p or w < p:
    raise ValueError(f"image size {h}x{w} is not a positive multiple of the patch size {p} "
                     f"(the model was trained at {image_size}x{image_size})")


class MultiHeadAttention(nn.Module):
  """Softmax attention with explicit probabilities (needed for attribution).

  q, k, v: DenseGeneral kernels [embed, heads, kv]; out: [heads, kv, embed]. The head index is
  the outer factor of the feature axis, as in torch MHA / HF CLIP.
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
    hd = width // self.num_heads
    init = nn.initializers.normal(width ** -0.5)
    proj = lambda name: nn.DenseGeneral(
        (self.num_heads, hd), dtype=self.dtype, param_dtype=jnp.float32, name=name,
        kernel_init=part(init, ("embed", "heads", "kv")),
        bias_init=part(nn.initializers.zeros, ("heads", "kv")))
    q = proj("query")(x) * (hd ** -0.5)  # scale q before the product, as torch MHA and HF do
    k = proj("key")(x)
    v = proj("value")(x)
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(acc_dtype(self.dtype))
    if mask is not None:
      logits = jnp.where(mask, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = self.perturb("attn", probs)
    out = jnp.einsum("...hqk,...khd->...qhd", probs.astype(self.dtype), v)
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32, name="out",
                          kernel_init=part(init, ("heads", "kv", "embed")),
                          bias_init=part(nn.initializers.zeros, ("embed",)))(out)
    return out, probs


def mlp(h, hidden: int, act: str, dtype: Dtype):
  """The transformer MLP [.., W] -> [.., W]: Dense(hidden) ``mlp_fc``, activation, Dense(W) ``mlp_proj``.

  A plain function, not a module: called inside a compact ``__call__`` its two Dense layers are the
  caller's children, so the parameters keep the flat OpenAI names (``block_i/mlp_fc``,
  ``block_i/mlp_proj``) that the converters and checkpoints use. Init as open_clip's
  (std (2W)^-1/2 and hidden^-1/2).
  """
  width = h.shape[-1]
  h = nn.Dense(hidden, dtype=dtype, param_dtype=jnp.float32, name="mlp_fc",
               kernel_init=part(nn.initializers.normal((2 * width) ** -0.5), ("embed", "mlp")),
               bias_init=part(nn.initializers.zeros, ("mlp",)))(h)
  h = ACTIVATIONS[act](h)
  return nn.Dense(width, dtype=dtype, param_dtype=jnp.float32, name="mlp_proj",
                  kernel_init=part(nn.initializers.normal(hidden ** -0.5), ("mlp", "embed")),
                  bias_init=part(nn.initializers.zeros, ("embed",)))(h)


class ResidualAttentionBlock(nn.Module):
  """x + attn(ln_1(x)); x + mlp(ln_2(x)) — open_clip / OpenAI / HF CLIP block."""
  num_heads: int
  mlp_ratio: float = 4.0
  act: str = "quick_gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    width = x.shape[-1]
    y, probs = MultiHeadAttention(self.num_heads, self.dtype, name="attn")(
        LayerNorm(self.dtype, name="ln_1")(x), mask)
    x = x + y
    x = x + mlp(LayerNorm(self.dtype, name="ln_2")(x), int(width * self.mlp_ratio), self.act, self.dtype)
    x = self.perturb("tokens", x)
    return x, {"attn": probs, "tokens": x}


class Transformer(nn.Module):
  """A stack of blocks named ``block_{i}``; returns (x, [aux_0, ..., aux_{L-1}])."""
  layers: int
  num_heads: int
  mlp_ratio: float = 4.0
  act: str = "quick_gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    auxes = []
    for i in range(self.layers):
      x, aux = ResidualAttentionBlock(self.num_heads, self.mlp_ratio, self.act, self.dtype,
                                      name=f"block_{i}")(x, mask)
      auxes.append(aux)
    return x, auxes
