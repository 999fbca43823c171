"""SigLIP dual encoder (Zhai et al. 2023) as linen modules: ViT with a MAP head + text transformer.

Same conventions as trace_jax/models/clip.py (NHWC images, ``[B, L]`` ids, ``(outputs, aux)``,
attention probabilities through ``sow``-free ``perturb``), built to give the numbers of the three
reference implementations on the same weights (tests/test_siglip.py):

* big_vision ``proj/image_text/two_towers.py`` + ``vit.py`` (``pool_type='map'``) +
  ``text_transformer.py`` (``pool_type='last'``), the original JAX code;
* open_clip 2.23.0 ``ViT-B-16-SigLIP*`` = ``CustomTextCLIP``: timm ``vit_*_siglip_*`` trunk
  (``class_token=False``, ``global_pool='map'``) + open_clip ``TextTransformer`` with
  ``no_causal_mask``, ``pool_type='last'``, ``proj_bias`` and LayerNorm eps 1e-6;
* Hugging Face ``SiglipModel``.

Image tower (timm ``VisionTransformer.forward_features`` + ``forward_head``, big_vision ``_Model``):

    x = patches @ conv1 + conv1_bias + pos          [.., N, W]   no class token, no ln_pre
    x = blocks(x); x = ln_post(x)                   ``trunk.norm`` / ``encoder_norm`` / ``post_layernorm``
    a = softmax((probe Wq + bq)(x Wk + bk)^T / sqrt(e))   [.., heads, 1, N]   the MAP head's attention
    y = (a (x Wv + bv)) Wo + bo;  y = y + mlp(ln(y)) pooled [.., W]   (timm AttentionPoolLatent: no
                                                       residual from the probe)
    emb = y  (or y @ proj + proj_bias where the checkpoint has an image ``head``)

Text tower: token + position embedding, blocks WITHOUT a causal mask, ln_final on every token, the
LAST position's row (``x[:, -1]``: the references pad to the context length; big_vision "sticky
EOS"), then ``text_projection`` with a bias. Logits: ``exp(logit_scale) * cos + logit_bias``
(the SigLIP paper's sigmoid logits; HF ``SiglipModel``, open_clip ``CustomTextCLIP`` with
``init_logit_bias``, big_vision ``t`` / ``b``).

The config is a ``CLIPConfig`` with ``vision.kind == 'siglip'`` and the SigLIP options in
``extra`` (:func:`options`): ``ln_eps`` (1e-6 in all three references), ``logit_bias_init``
(-10), ``image_head`` (False: big_vision's SigLIP configs and open_clip's ``timm_proj='none'``).
``act`` is ``'gelu'`` (erf; timm / open_clip) or ``'gelu_tanh'`` (HF ``gelu_pytorch_tanh``,
big_vision ``nn.gelu``): the same checkpoint gives slightly different numbers in each.

aux of the image tower: ``blocks`` (each block's ``attn`` [.., h, N, N] and ``tokens``), ``tokens``
(after ln_post), ``pool`` = {'attn': [.., h, 1, N]} the MAP head's attention probabilities, also
``perturb``-ed at ``('visual', 'map_head', 'attn')`` so methods can differentiate w.r.t. them.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trace_jax.models import posemb
from trace_jax.models.clip import l2_normalize
from trace_jax.models.config import CLIPConfig, VisionConfig
from trace_jax.models.layers import (ACTIVATIONS, LN_EPS, LayerNorm, ResidualAttentionBlock, Transformer,
                                     acc_dtype, check_images, check_token_ids, dtype_of, part, text_embeddings)

KIND = "siglip"
# SigLIP reads pixels in [-1, 1] (big_vision value_range(-1, 1), open_clip / timm INCEPTION_MEAN / STD):
# the loaders normalise by tower kind (data/preprocess.py pixel_stats).
DEFAULTS = {"ln_eps": 1e-6, "logit_bias_init": -10.0, "image_head": False}
POOL_PATH = ("visual", "map_head", "attn")  # perturbation path of the MAP head's probabilities


def is_siglip(cfg) -> bool:
  cfg = getattr(cfg, "cfg", cfg)
  return cfg.vision.kind == KIND


def options(cfg: CLIPConfig) -> dict[str, Any]:
  """The SigLIP options of a config (``extra`` over :data:`DEFAULTS`); unknown keys are refused."""
  extra = dict(cfg.extra)
  bad = set(extra) - set(DEFAULTS)
  if bad:
    raise ValueError(f"unknown SigLIP model options {sorted(bad)}; known: {sorted(DEFAULTS)}")
  return {**DEFAULTS, **extra}


def make_config(*, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                mlp_dim: int, embed_dim: int | None = None, context_length: int = 64,
                vocab_size: int = 32000, text_width: int | None = None, text_heads: int | None = None,
                text_layers: int | None = None, text_mlp_dim: int | None = None, act: str = "gelu",
                ln_eps: float = 1e-6, logit_bias_init: float = -10.0, image_head: bool = False,
                logit_scale_init: float = math.log(10.0)) -> CLIPConfig:
  """A SigLIP ``CLIPConfig`` (text tower defaults to the image tower's sizes, as in SigLIP B/L/So400m).

  ``logit_scale_init`` log(10), ``logit_bias_init`` -10: the paper's initialisation (t' = log 10,
  b = -10), big_vision ``temperature_init=10, bias_init=-10``, open_clip ``init_logit_bias=-10``.
  """
  from trace_jax.models.config import TextConfig
  tw = text_width or width
  return CLIPConfig(
      vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                          heads=heads, mlp_ratio=mlp_dim / width, kind=KIND),
      text=TextConfig(context_length=context_length, vocab_size=vocab_size, width=tw,
                      heads=text_heads or heads, layers=text_layers or layers,
                      mlp_ratio=(text_mlp_dim or mlp_dim) / tw, pool="last", eos_token_id=1),
      embed_dim=embed_dim or tw, act=act, logit_scale_init=logit_scale_init,
      extra=tuple(sorted({"ln_eps": ln_eps, "logit_bias_init": logit_bias_init,
                          "image_head": image_head}.items())))


class MAPHead(nn.Module):
  """Multihead attention pooling: one learned probe attends over the tokens (big_vision ``MAPHead``,
  timm ``AttentionPoolLatent``, HF ``SiglipMultiheadAttentionPoolingHead``).

  x [.., N, W] -> (pooled [.., W], probs [.., heads, 1, N]). Parameters: ``probe`` [1, W]; ``query``
  / ``key`` / ``value`` [W, heads, e] + biases; ``out`` [heads, e, W]; ``ln``; ``mlp_fc`` / ``mlp_proj``.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  act: str = "gelu"
  dtype: Any = jnp.float32
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    w = x.shape[-1]
    if w % self.num_heads:
      raise ValueError(f"width {w} is not divisible by {self.num_heads} heads")
    e = w // self.num_heads
    init = nn.initializers.normal(w ** -0.5)
    probe = self.param("probe", part(nn.initializers.normal(w ** -0.5), (None, "embed")), (1, w), jnp.float32)
    proj = lambda name: nn.DenseGeneral(
        (self.num_heads, e), dtype=self.dtype, param_dtype=jnp.float32, name=name,
        kernel_init=part(init, ("embed", "heads", "kv")), bias_init=part(nn.initializers.zeros, ("heads", "kv")))
    q = proj("query")(probe.astype(self.dtype)) * (e ** -0.5)   # [1, h, e]: scaled before the product
    k = proj("key")(x)                                           # [.., N, h, e]
    v = proj("value")(x)
    logits = jnp.einsum("qhd,...khd->...hqk", q, k).astype(acc_dtype(self.dtype))
    probs = jax.nn.softmax(logits, axis=-1)                      # [.., h, 1, N]
    probs = self.perturb("attn", probs)
    o = jnp.einsum("...hqk,...khd->...qhd", probs.astype(self.dtype), v)
    y = nn.DenseGeneral(w, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32, name="out",
                        kernel_init=part(init, ("heads", "kv", "embed")),
                        bias_init=part(nn.initializers.zeros, ("embed",)))(o)       # [.., 1, W]
    hidden = int(w * self.mlp_ratio)
    h = LayerNorm(self.dtype, eps=self.ln_eps, name="ln")(y)
    h = nn.Dense(hidden, dtype=self.dtype, param_dtype=jnp.float32, name="mlp_fc",
                 kernel_init=part(nn.initializers.normal((2 * w) ** -0.5), ("embed", "mlp")),
                 bias_init=part(nn.initializers.zeros, ("mlp",)))(h)
    h = ACTIVATIONS[self.act](h)
    h = nn.Dense(w, dtype=self.dtype, param_dtype=jnp.float32, name="mlp_proj",
                 kernel_init=part(nn.initializers.normal(hidden ** -0.5), ("mlp", "embed")),
                 bias_init=part(nn.initializers.zeros, ("embed",)))(h)
    y = y + h
    return y[..., 0, :], probs


class SigLIPVision(nn.Module):
  cfg: VisionConfig
  embed_dim: int
  act: str = "gelu"
  dtype: Any = jnp.float32
  ln_eps: float = 1e-6
  image_head: bool = False

  def setup(self):
    c = self.cfg
    w = c.width
    self.conv1 = self.param("conv1", part(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                            (c.patch_size, c.patch_size, 3, w), jnp.float32)
    self.conv1_bias = self.param("conv1_bias", part(nn.initializers.zeros, ("embed",)), (w,), jnp.float32)
    self.positional_embedding = self.param(
        "positional_embedding", part(nn.initializers.normal(w ** -0.5), (None, "embed")),
        (c.grid ** 2, w), jnp.float32)
    self.transformer = Transformer(c.layers, c.heads, c.mlp_ratio, self.act, self.dtype, ln_eps=self.ln_eps)
    self.ln_post = LayerNorm(self.dtype, eps=self.ln_eps)
    self.map_head = MAPHead(c.heads, c.mlp_ratio, self.act, self.dtype, self.ln_eps)
    if self.image_head:
      self.proj = self.param("proj", part(nn.initializers.normal(w ** -0.5), ("embed", None)),
                             (w, self.embed_dim), jnp.float32)
      self.proj_bias = self.param("proj_bias", part(nn.initializers.zeros, (None,)), (self.embed_dim,),
                                  jnp.float32)
    elif self.embed_dim != w:
      raise ValueError(f"SigLIP image tower without an image head embeds to its width {w}, "
                       f"not embed_dim {self.embed_dim}; set the 'image_head' option")

  def embed_patches(self, images, pos_interp: str | None = None):
    """[.., H, W, 3] -> tokens [.., gh*gw, width] (no class token; position added)."""
    check_images(images, self.cfg.patch_size, self.cfg.image_size)
    p = self.cfg.patch_size
    *lead, h, w, ch = images.shape
    gh, gw = h // p, w // p
    x = images.astype(self.dtype).reshape(*lead, gh, p, gw, p, ch)
    x = jnp.einsum("...hpwqc,pqcd->...hwd", x, self.conv1.astype(self.dtype))
    x = x.reshape(*lead, gh * gw, self.cfg.width) + self.conv1_bias.astype(self.dtype)
    # timm dynamic_img_size resamples the grid with bicubic + antialias (= 'antialias', posemb.py).
    pos = posemb.resample_pos_embed(self.positional_embedding, (gh, gw), 0, pos_interp or self.cfg.pos_interp)
    return x + pos.astype(self.dtype)

  def head(self, tokens):
    """ln_post'ed tokens [.., N, W] -> (embedding [.., E] un-normalised, MAP probs [.., h, 1, N])."""
    pooled, probs = self.map_head(tokens)
    if self.image_head:
      pooled = pooled @ self.proj.astype(self.dtype) + self.proj_bias.astype(self.dtype)
    return pooled.astype(acc_dtype(self.dtype)), probs

  def project(self, tokens):
    """Per-token embeddings [.., N, E] of ln_post'ed tokens [.., N, W]: the MAP head's output when its
    probe attends to that token alone (value, out projection, its MLP residual; each token run as a
    one-key sequence, whose softmax is 1) and the image head if any. The SigLIP analogue of CLIP's
    per-token ``ln_post @ proj`` (MaskCLIP-style dense features), used by local alignment's patch
    features (trace_jax/losses/local_alignment.py); the pooled embedding is their attention-weighted
    mix before the MLP."""
    pooled, _ = self.map_head(tokens[..., :, None, :])
    if self.image_head:
      pooled = pooled @ self.proj.astype(self.dtype) + self.proj_bias.astype(self.dtype)
    return pooled.astype(acc_dtype(self.dtype))

  def __call__(self, images, pos_interp: str | None = None):
    x, blocks = self.transformer(self.embed_patches(images, pos_interp))
    x = self.ln_post(x)
    emb, probs = self.head(x)
    return emb, {"blocks": blocks, "tokens": x, "pool": {"attn": probs}}


class SigLIPText(nn.Module):
  cfg: Any  # TextConfig
  embed_dim: int
  act: str = "gelu"
  dtype: Any = jnp.float32
  ln_eps: float = 1e-6

  def setup(self):
    c = self.cfg
    self.token_embedding, self.positional_embedding = text_embeddings(self, c, self.dtype)
    self.transformer = Transformer(c.layers, c.heads, c.mlp_ratio, self.act, self.dtype, ln_eps=self.ln_eps)
    self.ln_final = LayerNorm(self.dtype, eps=self.ln_eps)
    self.text_projection = self.param(
        "text_projection", part(nn.initializers.normal(c.width ** -0.5), ("embed", None)),
        (c.width, self.embed_dim), jnp.float32)
    self.text_projection_bias = self.param("text_projection_bias", part(nn.initializers.zeros, (None,)),
                                           (self.embed_dim,), jnp.float32)

  def __call__(self, ids):
    check_token_ids(ids, self.cfg.context_length)
    n = ids.shape[-1]
    x = self.token_embedding(ids) + self.positional_embedding[:n].astype(self.dtype)
    x, blocks = self.transformer(x)   # no causal mask (open_clip no_causal_mask=True, HF, big_vision)
    x = self.ln_final(x)
    emb = self.project(x[..., -1, :])  # pool_type 'last' (pad ids to the context length, as the references)
    eot = jnp.full(ids.shape[:-1], n - 1, jnp.int32)
    return emb, {"blocks": blocks, "tokens": x, "eot": eot}

  def project(self, pooled):
    """ln_final'ed pooled row [.., W] -> embedding [.., E] (un-normalised): the projection with its bias."""
    emb = pooled @ self.text_projection.astype(self.dtype) + self.text_projection_bias.astype(self.dtype)
    return emb.astype(acc_dtype(self.dtype))


class SigLIP(nn.Module):
  """Dual encoder with sigmoid logits. ``__call__(images, ids) -> (out, aux)``; ``out`` as CLIP's plus
  ``logit_bias``; ``logits_per_image = exp(logit_scale) * cos + logit_bias`` [B, T]."""
  cfg: CLIPConfig

  def setup(self):
    c = self.cfg
    if c.vision.kind != KIND:
      raise ValueError(f"SigLIP needs vision kind {KIND!r}; got {c.vision.kind!r}")
    o = options(c)
    dt = dtype_of(c.dtype)
    self.visual = SigLIPVision(c.vision, c.embed_dim, c.act, dt, o["ln_eps"], bool(o["image_head"]))
    self.text = SigLIPText(c.text, c.embed_dim, c.act, dt, o["ln_eps"])
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init), (), jnp.float32)
    self.logit_bias = self.param("logit_bias", nn.initializers.constant(o["logit_bias_init"]), (), jnp.float32)

  def encode_image(self, images, pos_interp: str | None = None):
    return self.visual(images, pos_interp)

  def encode_text(self, ids):
    return self.text(ids)

  def logits(self, img_n, txt_n):
    """Sigmoid logits of normalised embeddings: exp(t) * img_n @ txt_n.T + b."""
    return jnp.exp(self.logit_scale) * (img_n @ txt_n.T) + self.logit_bias

  def __call__(self, images, ids, pos_interp: str | None = None):
    img, img_aux = self.visual(images, pos_interp)
    txt, txt_aux = self.text(ids)
    img_n, txt_n = l2_normalize(img), l2_normalize(txt)
    out = {"image_embeds": img_n, "text_embeds": txt_n, "logits_per_image": self.logits(img_n, txt_n),
           "logit_scale": jnp.exp(self.logit_scale), "logit_bias": self.logit_bias}
    return out, {"image": img_aux, "text": txt_aux}


def run_blocks(tower_params, tower_cfg, cfg: CLIPConfig, start: int, x):
  """Blocks ``start .. layers-1`` of a SigLIP tower (``params['visual']`` / ``params['text']``, its
  ``cfg.vision`` / ``cfg.text``) on x [.., N, W]: the linen block with the model's LayerNorm eps and
  no mask (neither SigLIP tower is causal)."""
  block = ResidualAttentionBlock(tower_cfg.heads, tower_cfg.mlp_ratio, cfg.act, dtype_of(cfg.dtype),
                                 ln_eps=options(cfg)["ln_eps"])
  for i in range(start, tower_cfg.layers):
    x, _ = block.apply({"params": tower_params["transformer"][f"block_{i}"]}, x)
  return x


def image_from_block(params, cfg: CLIPConfig, layer: int, x):
  """The image embedding [.., E] (un-normalised, as ``encode_image``) from the output x [.., N, W] of
  block ``layer``: the blocks after it, ln_post on every token, the MAP head (it attends over all of
  them) and the image head if any. M2IB's bottleneck sits there (attribution/m2ib.py)."""
  x = run_blocks(params["visual"], cfg.vision, cfg, layer + 1, x)
  return SigLIP(cfg).apply({"params": params}, x, method=lambda m, t: m.visual.head(m.visual.ln_post(t))[0])


def text_from_block(params, cfg: CLIPConfig, layer: int, x):
  """The text embedding [.., E] (un-normalised, as ``encode_text``) from the output x [.., L, W] of
  block ``layer``: the blocks after it (no causal mask: every position reaches the pooled one),
  ln_final on the LAST row, the projection with its bias."""
  x = run_blocks(params["text"], cfg.text, cfg, layer + 1, x)
  return SigLIP(cfg).apply({"params": params}, x, method=lambda m, t: m.text.project(m.text.ln_final(t[..., -1, :])))


def pair_logit(params, cos):
  """SigLIP's logit of a pair from its cosine: exp(logit_scale) * cos + logit_bias (params: the model's)."""
  return jnp.exp(params["logit_scale"]) * cos + params["logit_bias"]


__all__ = ["SigLIP", "SigLIPVision", "SigLIPText", "MAPHead", "make_config", "options", "is_siglip",
           "pair_logit", "run_blocks", "image_from_block", "text_from_block", "KIND", "POOL_PATH", "LN_EPS"]
