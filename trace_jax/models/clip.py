"""CLIP-style dual encoder (ViT image tower + causal text transformer) as linen modules.

Conventions (match OpenAI CLIP / open_clip 2.23.0 / HF ``CLIPModel`` so that converted weights
give the same numbers, see tests/test_convert_parity.py):

* images are NHWC float32 (already normalised), or a single HWC image (e.g. under ``vmap``);
* token ids are ``[B, L]`` (or ``[L]``) with ``L <= context_length``; the text is pooled at the
  end-of-text token: ``argmax(ids)`` (OpenAI / open_clip, EOT = highest id) or the first
  ``eos_token_id`` (HF, ``text_pool='eos'``);
* every call returns ``(outputs, aux)``; ``aux['blocks'][i]`` holds block i's attention
  probabilities ``attn [.., heads, N, N]`` and output ``tokens [.., N, width]``; both are also
  ``perturb``-ed (see ``trace_jax.models.perturbations``) so gradients w.r.t. them can be taken.
"""
from __future__ import annotations

import math

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trace_jax.models import posemb
from trace_jax.models.config import CLIPConfig, TextConfig, VisionConfig
from trace_jax.models.layers import (LayerNorm, Transformer, acc_dtype, check_token_ids, dtype_of, part,
                                     text_embeddings)
from trace_jax.models.layers import check_images as _check_images


_dtype = dtype_of

# open_clip clamps the learnable log-temperature to [0, ln 100] after each update (its train loop);
# the losses cap it the same way. Defined with the model whose parameter it bounds.
MAX_LOG_SCALE = math.log(100.0)


def check_images(images: jax.Array, cfg: VisionConfig) -> None:
  """Static shape checks with messages that name the problem (``layers.check_images``)."""
  _check_images(images, cfg.patch_size, cfg.image_size)


class VisionTransformer(nn.Module):
  cfg: VisionConfig
  embed_dim: int
  act: str = "quick_gelu"
  dtype: Any = jnp.float32
  scale: tuple = ()   # (remat, scan_layers, attention) of CLIPConfig; () = the defaults

  def setup(self):
    c = self.cfg
    w = c.width
    self.conv1 = self.param("conv1", part(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                            (c.patch_size, c.patch_size, 3, w), jnp.float32)
    self.class_embedding = self.param("class_embedding", part(nn.initializers.normal(w ** -0.5), ("embed",)),
                                      (w,), jnp.float32)
    n = (c.image_size // c.patch_size) ** 2 + 1
    self.positional_embedding = self.param(
        "positional_embedding", part(nn.initializers.normal(w ** -0.5), (None, "embed")), (n, w), jnp.float32)
    self.ln_pre = LayerNorm(self.dtype)
    self.transformer = Transformer(c.layers, c.heads, c.mlp_ratio, self.act, self.dtype, *self.scale)
    self.ln_post = LayerNorm(self.dtype)
    self.proj = self.param("proj", part(nn.initializers.normal(w ** -0.5), ("embed", None)),
                           (w, self.embed_dim), jnp.float32)

  def embed_patches(self, images, pos_interp: str | None = None):
    """[.., H, W, 3] -> tokens [.., 1 + gh*gw, width] (class token first, position added)."""
    check_images(images, self.cfg)
    p = self.cfg.patch_size
    *lead, h, w, ch = images.shape
    gh, gw = h // p, w // p
    x = images.astype(self.dtype).reshape(*lead, gh, p, gw, p, ch)
    x = jnp.einsum("...hpwqc,pqcd->...hwd", x, self.conv1.astype(self.dtype))
    x = x.reshape(*lead, gh * gw, self.cfg.width)
    cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (*lead, 1, self.cfg.width))
    x = jnp.concatenate([cls, x], axis=-2)
    pos = posemb.resample_pos_embed(self.positional_embedding, (gh, gw), 1,
                                    pos_interp or self.cfg.pos_interp)
    return x + pos.astype(self.dtype)

  def project(self, pooled):
    """ln_post then projection: [.., width] -> [.., embed] (un-normalised)."""
    return (self.ln_post(pooled) @ self.proj.astype(self.dtype)).astype(acc_dtype(self.dtype))

  def __call__(self, images, pos_interp: str | None = None):
    x = self.ln_pre(self.embed_patches(images, pos_interp))
    x, blocks = self.transformer(x)
    emb = self.project(x[..., 0, :])
    return emb, {"blocks": blocks, "tokens": x}


class TextTransformer(nn.Module):
  cfg: TextConfig
  embed_dim: int
  act: str = "quick_gelu"
  dtype: Any = jnp.float32
  scale: tuple = ()   # (remat, scan_layers, attention) of CLIPConfig; () = the defaults

  def setup(self):
    c = self.cfg
    self.token_embedding, self.positional_embedding = text_embeddings(self, c, self.dtype)
    self.transformer = Transformer(c.layers, c.heads, c.mlp_ratio, self.act, self.dtype, *self.scale)
    self.ln_final = LayerNorm(self.dtype)
    self.text_projection = self.param(
        "text_projection", part(nn.initializers.normal(c.width ** -0.5), ("embed", None)),
        (c.width, self.embed_dim), jnp.float32)

  def eot_index(self, ids):
    if self.cfg.pool == "argmax":
      return jnp.argmax(ids, axis=-1)
    return jnp.argmax(ids == self.cfg.eos_token_id, axis=-1)  # first occurrence, as HF

  def __call__(self, ids):
    check_token_ids(ids, self.cfg.context_length)
    n = ids.shape[-1]
    x = self.token_embedding(ids) + self.positional_embedding[:n].astype(self.dtype)
    causal = jnp.tril(jnp.ones((n, n), bool))
    x, blocks = self.transformer(x, causal)
    x = self.ln_final(x)
    eot = self.eot_index(ids)
    pooled = jnp.take_along_axis(x, eot[..., None, None], axis=-2)[..., 0, :]
    emb = (pooled @ self.text_projection.astype(self.dtype)).astype(acc_dtype(self.dtype))
    return emb, {"blocks": blocks, "tokens": x, "eot": eot}


def l2_normalize(x, axis=-1, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


class CLIP(nn.Module):
  """Dual encoder. ``__call__(images, ids) -> (out, aux)`` with HF ``CLIPModel`` names."""
  cfg: CLIPConfig

  def setup(self):
    c = self.cfg
    dt = _dtype(c.dtype)
    scale = (c.remat, c.scan_layers, c.attention)
    if c.vision.kind == "crate":  # CRATE white-box image tower (trace_jax/models/crate.py)
      from trace_jax.models.crate import CrateVision, crate_config_from_clip
      self.visual = CrateVision(crate_config_from_clip(c), dt, embed_dim=c.embed_dim)
    elif c.vision.kind == "vit":
      self.visual = VisionTransformer(c.vision, c.embed_dim, c.act, dt, scale)
    else:
      raise ValueError(f"unknown image tower kind {c.vision.kind!r}; expected 'vit' or 'crate'")
    self.text = TextTransformer(c.text, c.embed_dim, c.act, dt, scale)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init), (), jnp.float32)

  def encode_image(self, images, pos_interp: str | None = None):
    return self.visual(images, pos_interp)

  def encode_text(self, ids):
    return self.text(ids)

  def __call__(self, images, ids, pos_interp: str | None = None):
    img, img_aux = self.visual(images, pos_interp)
    txt, txt_aux = self.text(ids)
    img_n, txt_n = l2_normalize(img), l2_normalize(txt)
    scale = jnp.exp(self.logit_scale)
    logits = scale * (img_n @ txt_n.T)  # [B, T]; [T] / scalar for unbatched inputs
    out = {"image_embeds": img_n, "text_embeds": txt_n, "logits_per_image": logits,
           "logit_scale": scale}
    return out, {"image": img_aux, "text": txt_aux}
