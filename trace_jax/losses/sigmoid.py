"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

Paper eq. (1) / Algorithm 1, as big_vision trains it (trainers/proj/image_text/siglip.py ``loss_fn``
@ 0127fb6):

    logits_ij = exp(t) * <x_i, y_j> + b          x, y L2-normalised, t the log-temperature, b the bias
    z_ij      = +1 if i == j else -1
    L         = -1/B * sum_i sum_j log sigmoid(z_ij * logits_ij)     (mean over images of row sums)

``t`` is clipped to [0, ln 100] like the CLIP losses (the train step clamps the parameter the same
way, training/step.py); SigLIP's init t = ln 10 lies inside.

:func:`sigmoid_loss_chunked` is the paper's §3.1 "efficient loss implementation" across devices: each
device keeps its images and passes its texts around a ring (``lax.ppermute`` over the batch axes),
computing one [b, b] block of negatives per hop; the positives sit in the first (own) block. No
device ever holds the whole batch of embeddings (no all-gather). It equals :func:`sigmoid_loss` on
the global batch (tests/test_sigmoid_loss.py, 8 emulated devices).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from trace_jax.models.clip import MAX_LOG_SCALE, l2_normalize

# the mesh axes the batch is sharded over: training/sharding.py's BATCH_AXES, restated because losses
# may not import training (docs/architecture.md layers); tests/test_sigmoid_loss.py checks they agree
BATCH_AXES = ("data", "fsdp")


def _prep(image_embeds, text_embeds, log_scale, normalize, max_log_scale):
  if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
    raise ValueError(f"image and text embeddings must both be [batch, embed] of the same shape; got "
                     f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
  i, t = image_embeds.astype(jnp.float32), text_embeds.astype(jnp.float32)
  if normalize:
    i, t = l2_normalize(i), l2_normalize(t)
  scale = jnp.exp(jnp.clip(jnp.asarray(log_scale, jnp.float32), 0.0, max_log_scale))
  return i, t, scale


def sigmoid_loss(image_embeds, text_embeds, log_scale, bias, *, normalize: bool = True,
                 max_log_scale: float = MAX_LOG_SCALE) -> jax.Array:
  """Scalar float32 sigmoid loss of pairs (image b, text b); every other pair is a negative.

  image_embeds, text_embeds: [B, E] (L2-normalised here unless ``normalize=False``); log_scale, bias:
  scalars (``params['logit_scale']``, ``params['logit_bias']``).
  """
  i, t, scale = _prep(image_embeds, text_embeds, log_scale, normalize, max_log_scale)
  logits = scale * (i @ t.T) + jnp.asarray(bias, jnp.float32)
  z = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0   # big_vision m1_diag1
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / logits.shape[0]


def _batch_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def sigmoid_loss_chunked(image_embeds, text_embeds, log_scale, bias, *, mesh=None, normalize: bool = True,
                         max_log_scale: float = MAX_LOG_SCALE) -> jax.Array:
  """:func:`sigmoid_loss` over a batch sharded along the mesh's batch axes, by a ring of ``ppermute``.

  ``mesh``: a ``jax.sharding.Mesh`` (default: the context mesh of ``jax.set_mesh``, as the train loop
  sets). With no mesh or a single batch shard it is :func:`sigmoid_loss`. The global batch must
  divide evenly over the batch shards.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  axes = _batch_axes(mesh) if mesh is not None and not mesh.empty else ()
  n = math.prod(mesh.shape[a] for a in axes) if axes else 1
  if n == 1:
    return sigmoid_loss(image_embeds, text_embeds, log_scale, bias, normalize=normalize,
                        max_log_scale=max_log_scale)
  B = image_embeds.shape[0]
  if B % n:
    raise ValueError(f"sigmoid loss: batch {B} does not divide over {n} batch shards {axes}")
  i, t, scale = _prep(image_embeds, text_embeds, log_scale, normalize, max_log_scale)
  b = jnp.asarray(bias, jnp.float32)
  ring = [(k, (k + 1) % n) for k in range(n)]

  def local(i, t, scale, b):
    # own block: positives on the diagonal, negatives elsewhere
    logits = scale * (i @ t.T) + b
    z = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    total = -jnp.sum(jax.nn.log_sigmoid(z * logits))

    def hop(_, carry):  # the texts of the previous device arrive; all of them are negatives here
      t_cur, acc = carry
      t_cur = jax.lax.ppermute(t_cur, axes, ring)
      return t_cur, acc - jnp.sum(jax.nn.log_sigmoid(-(scale * (i @ t_cur.T) + b)))

    _, total = jax.lax.fori_loop(0, n - 1, hop, (t, total))
    return jax.lax.psum(total, axes) / B

  f = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=P())
  return f(i, t, scale, b)
