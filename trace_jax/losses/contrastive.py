"""Symmetric CLIP InfoNCE with a learnable temperature (Radford et al. 2021, Fig. 3 pseudo-code).

    logits = exp(clip(t, 0, ln 100)) * I_n @ T_n^T                        [B, B]
    L      = ( CE(logits, arange B) + CE(logits^T, arange B) ) / 2         (mean over rows)

``t`` is the log-temperature parameter (``params['logit_scale']``, init ln(1/0.07)). CLIP clips the
*scale* at 100 (open_clip clamps the parameter to [0, ln 100] after every optimiser step); the train
step does the same projection (trace_jax/training/step.py) and the loss clips too, so an
out-of-range value never scales logits beyond 100.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from trace_jax.models.clip import MAX_LOG_SCALE  # noqa: F401 - re-exported for the losses


def _l2n(x, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def clip_logits(image_embeds: jax.Array, text_embeds: jax.Array, log_scale: jax.Array, *,
                normalize: bool = True, max_log_scale: float = MAX_LOG_SCALE) -> jax.Array:
  """[B, E], [B, E], scalar -> logits [B_img, B_txt] (float32)."""
  if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
    raise ValueError(f"image and text embeddings must both be [batch, embed] of the same shape; got "
                     f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
  i = image_embeds.astype(jnp.float32)
  t = text_embeds.astype(jnp.float32)
  if normalize:
    i, t = _l2n(i), _l2n(t)
  scale = jnp.exp(jnp.clip(jnp.asarray(log_scale, jnp.float32), 0.0, max_log_scale))
  return scale * (i @ t.T)


def clip_contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array, log_scale: jax.Array, *,
                          normalize: bool = True, max_log_scale: float = MAX_LOG_SCALE) -> jax.Array:
  """Symmetric InfoNCE; pair b = (image b, text b) is the positive, every other sample a negative.

  Args:
    image_embeds: [B, E] (L2-normalised here unless ``normalize=False``).
    text_embeds: [B, E].
    log_scale: scalar log of the inverse temperature (clipped to [0, ln 100]).
  Returns:
    scalar float32 loss.
  """
  logits = clip_logits(image_embeds, text_embeds, log_scale, normalize=normalize,
                       max_log_scale=max_log_scale)
  labels = jnp.arange(logits.shape[0])
  li = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1).mean()
  lt = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0).mean()
  return 0.5 * (li + lt)


def retrieval_accuracy(logits: jax.Array) -> jax.Array:
  """Mean of image->text and text->image top-1 accuracy of a [B, B] logit matrix (a metric)."""
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (jnp.mean(jnp.argmax(logits, 1) == labels) + jnp.mean(jnp.argmax(logits, 0) == labels))
