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

from trace_jax.models.scale import constrain_batch

Dtype = Any

LN_EPS = 1e-5  # torch nn.LayerNorm default; flax's 1e-6 drifts ~1e-4 (notes/crate.md pitfalls)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
  return jax.nn.gelu(x, approximate=False)  # torch nn.GELU() / HF "gelu" are the erf form


def gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)  # HF "gelu_pytorch_tanh" / big_vision nn.gelu (SigLIP)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu, "gelu_tanh": gelu_tanh}

# Large-model options of the ViT / text towers (docs/scaling.md); the defaults change nothing.
ATTENTION = ("explicit", "fused")
REMAT_POLICIES = ("none", "block", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable", "nothing_saveable")


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
  eps: float = LN_EPS  # SigLIP towers (timm / HF / big_vision): 1e-6

  @nn.compact
  def __call__(self, x):
    acc = acc_dtype(self.dtype)
    # use_fast_variance=False: two-pass variance like torch (E[x²]-E[x]² loses digits on large means).
    y = nn.LayerNorm(epsilon=self.eps, dtype=acc, param_dtype=jnp.float32, use_fast_variance=False,
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


def check_token_ids(ids, context_length: int) -> None:
  """Static checks of token ids [batch, length] or [length] (CLIP and SigLIP text towers): rank,
  length within ``context_length``, integer dtype; messages name the problem."""
  if ids.ndim not in (1, 2):
    raise ValueError(f"token ids must be [batch, length] or [length]; got shape {tuple(ids.shape)}")
  n = ids.shape[-1]
  if n > context_length:
    raise ValueError(f"text of {n} tokens is longer than the context length "
                     f"{context_length}; tokenize with truncation")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"token ids must be integers; got dtype {ids.dtype}")


def text_embeddings(module: nn.Module, c, dtype):
  """(token embedding [vocab, width], positional embedding [context, width]) of a text tower, created
  in ``module.setup`` (CLIP and SigLIP share them: names, initialisers and logical axes)."""
  tok = nn.Embed(c.vocab_size, c.width, dtype=dtype, param_dtype=jnp.float32,
                 embedding_init=part(nn.initializers.normal(0.02), ("vocab", "embed")))
  pos = module.param("positional_embedding", part(nn.initializers.normal(0.01), (None, "embed")),
                     (c.context_length, c.width), jnp.float32)
  return tok, pos


class MultiHeadAttention(nn.Module):
  """Softmax attention with explicit probabilities (needed for attribution).

  q, k, v: DenseGeneral kernels [embed, heads, kv]; out: [heads, kv, embed]. The head index is
  the outer factor of the feature axis, as in torch MHA / HF CLIP.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  attention: str = "explicit"   # or "fused": see ``uses_fused`` (docs/scaling.md)

  def uses_fused(self) -> bool:
    """``attention='fused'`` takes ``jax.nn.dot_product_attention`` (no probabilities materialised,
    cuDNN flash attention on GPU) only where nothing reads the probabilities: a call without a
    ``'perturbations'`` collection. GradCAM (AMC's too), Chefer and saliency apply the model with
    perturbations (attribution/common.encode_vjp); rollout, LeGrad and MaskInversion read the
    probabilities of a plain forward and rebuild the model explicit first
    (attribution/common.explicit_attention). A plain forward here returns None for them."""
    if self.attention == "explicit":
      return False
    return not (self.is_mutable_collection("perturbations") or self.has_variable("perturbations", "attn"))

  @nn.compact
  def __call__(self, x, mask=None):
    if self.attention not in ATTENTION:
      raise ValueError(f"model attention must be one of {ATTENTION}; got {self.attention!r}")
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
    if self.uses_fused():
      # Same math (q pre-scaled, so scale=1); probabilities are not returned (None in aux).
      out = jax.nn.dot_product_attention(q, k, v, scale=1.0, mask=mask)
      probs = None
    else:
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
  attention: str = "explicit"
  ln_eps: float = LN_EPS  # 1e-6 in the SigLIP towers (trace_jax/models/siglip.py)

  @nn.compact
  def __call__(self, x, mask=None):
    x = constrain_batch(x)   # block boundary: tokens stay split over the batch (models/scale.py)
    width = x.shape[-1]
    y, probs = MultiHeadAttention(self.num_heads, self.dtype, self.attention, name="attn")(
        LayerNorm(self.dtype, eps=self.ln_eps, name="ln_1")(x), mask)
    x = x + y
    x = x + mlp(LayerNorm(self.dtype, eps=self.ln_eps, name="ln_2")(x), int(width * self.mlp_ratio),
                self.act, self.dtype)
    x = self.perturb("tokens", constrain_batch(x))
    return x, {"attn": probs, "tokens": x}


class _ScannedBlock(ResidualAttentionBlock):
  """A block as ``nn.scan``'s body: carry = tokens; no per-layer outputs (stacking every layer's
  attention probabilities would cost the memory that scanning saves)."""

  def __call__(self, x, mask=None):
    x, _ = super().__call__(x, mask)
    return x, None


def remat_policy(name: str):
  """``model.remat`` -> a ``jax.checkpoint`` policy: 'block' recomputes the whole block in the
  backward pass (saves only its input); other names are ``jax.checkpoint_policies`` members."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat must be one of {REMAT_POLICIES}; got {name!r}")
  if name == "block":
    return jax.checkpoint_policies.nothing_saveable
  return getattr(jax.checkpoint_policies, name)


class Transformer(nn.Module):
  """A stack of blocks named ``block_{i}``; returns (x, [aux_0, ..., aux_{L-1}]).

  Memory options (docs/scaling.md; defaults = the plain unrolled stack):
  ``remat`` wraps each block in ``nn.remat`` with a named policy (same params, same numerics);
  ``scan_layers`` runs ONE compiled block body under ``nn.scan`` over params stacked on a leading
  'layers' axis (``params['blocks']`` instead of ``block_{i}``; ``trace_jax.models.scale`` converts
  between the layouts), returns ``None`` for the per-block aux and refuses a ``'perturbations'``
  collection (attribution needs the unrolled layout: model dirs are always saved unrolled).
  """
  layers: int
  num_heads: int
  mlp_ratio: float = 4.0
  act: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  remat: str = "none"
  scan_layers: bool = False
  attention: str = "explicit"
  ln_eps: float = LN_EPS  # 1e-6 in the SigLIP towers (trace_jax/models/siglip.py)

  @nn.compact
  def __call__(self, x, mask=None):
    policy = remat_policy(self.remat) if self.remat != "none" else None
    args = (self.num_heads, self.mlp_ratio, self.act, self.dtype, self.attention, self.ln_eps)
    if self.scan_layers:
      if not self.is_initializing() and (self.is_mutable_collection("perturbations")
                                         or "perturbations" in self.variables):
        raise ValueError("model.scan_layers does not expose per-block attention (attribution, AMC's "
                         "GradCAM); train with scan_layers=False (model.remat saves memory and keeps it)")
      body = _ScannedBlock if policy is None else nn.remat(_ScannedBlock, policy=policy, prevent_cse=False)
      stack = nn.scan(body, variable_axes={"params": 0, "perturbations": 0}, split_rngs={"params": True},
                      in_axes=nn.broadcast, length=self.layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(*args, name="blocks")(x, mask)
      return x, None
    block = ResidualAttentionBlock if policy is None else nn.remat(ResidualAttentionBlock, policy=policy)
    auxes = []
    for i in range(self.layers):
      x, aux = block(*args, name=f"block_{i}")(x, mask)
      auxes.append(aux)
    return x, auxes
