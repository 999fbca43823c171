"""RISE (Petsiuk, Das, Saenko 2018, "Randomized input sampling for explanation of black-box models").

Masks (their ``generate_masks``): N binary grids s x s with P(1) = p, bilinearly upsampled to
``(s + 1) * cell`` (cell = ceil(H / s)) and cropped at a random shift in [0, cell) per axis, giving
smooth masks M_i [H, W] in [0, 1]. Saliency of a pair with score function f:

    S = Σ_i f(I ⊙ M_i) · M_i / (N · p)              (their ``explanations / N / p1``)

f = cos(image embedding of the masked image, text embedding). The mask multiplies the already
normalised image tensor, as their code does (``torch.mul(masks, x)``). Upsampling here is the
half-pixel, edge-clamped torch bilinear of trace_jax/resize.py instead of skimage's ``resize(order=1,
mode='reflect')`` — a different random-mask family of the same kind, not a different method.
Forwards are batched: ``lax.map`` over chunks of ``batch_size`` masks, each chunk ``vmap``-ed; for one
image + P prompts the N masked forwards are shared by all prompts.
Map: per-sample min-max (+1e-7); grid: mean of the raw saliency over each patch, then min-max.
Deterministic for a fixed ``key``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from trace_jax.attribution import common
from trace_jax.attribution.saliency import pool_to_grid
from trace_jax.models import l2_normalize
from trace_jax.resize import upsample_bilinear


def generate_masks(key, num_masks: int, image_hw: tuple[int, int], s: int = 8, p: float = 0.5) -> jax.Array:
  """[N, H, W] float32 RISE masks (see module docstring)."""
  H, W = image_hw
  ch, cw = math.ceil(H / s), math.ceil(W / s)
  kg, kx, ky = jax.random.split(key, 3)
  grid = jax.random.bernoulli(kg, p, (num_masks, s, s)).astype(jnp.float32)
  up = upsample_bilinear(grid, ((s + 1) * ch, (s + 1) * cw))
  up = jnp.clip(up, 0.0, 1.0)  # float rounding of the resize weights gives 1 + 2e-7
  dx = jax.random.randint(kx, (num_masks,), 0, ch)
  dy = jax.random.randint(ky, (num_masks,), 0, cw)
  return jax.vmap(lambda m, x, y: jax.lax.dynamic_slice(m, (x, y), (H, W)))(up, dx, dy)


def mask_scores(model, params, images, targets_n, masks, pair: common.Pairing, *, batch_size: int = 32,
                pos_interp=None) -> jax.Array:
  """Scores [N, P] of every masked image against its pair's target."""
  def one(mask):  # [H, W] -> [n_img, E]
    x = images * mask[None, :, :, None]
    return model.apply({"params": params}, x, method="encode_image", pos_interp=pos_interp)[0]

  emb = l2_normalize(jax.lax.map(one, masks, batch_size=batch_size))  # [N, n_img, E]
  if pair.single_image:
    cos = emb[:, 0] @ targets_n.T
  else:
    cos = jnp.einsum("nbe,be->nb", emb, targets_n)
  if model.cfg.vision.kind == "siglip":
    # SigLIP scores a pair by sigmoid(exp(t) cos + b), its match probability (RISE weights masks by the
    # model's probability of the class; SigLIP's per-pair sigmoid is that probability).
    from trace_jax.models.siglip import pair_logit
    return jax.nn.sigmoid(pair_logit(params, cos))
  return cos


def saliency_from_scores(scores: jax.Array, masks: jax.Array, p: float) -> jax.Array:
  """Σ_i scores[i, P] · masks[i] / (N · p) -> [P, H, W]."""
  n = masks.shape[0]
  return jnp.einsum("np,nhw->phw", scores, masks, precision=jax.lax.Precision.HIGHEST) / (n * p)


def explain(model, params, images, ids=None, *, query=None, key=None, masks=None, num_masks: int = 2048,
            s: int = 8, p: float = 0.5, batch_size: int = 32, pos_interp=None,
            normalize: bool = True) -> dict:
  """{'grid' [P, gh, gw], 'raw', 'map' [P, H, W], 'score' [P] (unmasked cosine)}.

  ``key``: PRNG key for the masks (default PRNGKey(0)); or pass ``masks`` [N, H, W] directly (then
  ``p`` must be the probability they were drawn with). M2IB's baseline used 2048 image masks.
  """
  images = common.as_images(images)
  targets = common.text_targets(model, params, ids, query)
  pair = common.pairing(images.shape[0], targets.shape[0])
  targets = common.broadcast_texts(targets, pair)
  hw = images.shape[1:3]
  if masks is None:
    masks = generate_masks(jax.random.PRNGKey(0) if key is None else key, num_masks, hw, s, p)
  masks = jnp.asarray(masks, jnp.float32)
  if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(hw):
    raise ValueError(f"masks must be [N, {hw[0]}, {hw[1]}]; got {tuple(masks.shape)}")
  scores = mask_scores(model, params, images, targets, masks, pair, batch_size=batch_size,
                       pos_interp=pos_interp)
  sal = saliency_from_scores(scores, masks, p)
  raw = pool_to_grid(sal, model.cfg.vision.patch_size)
  emb, _ = model.apply({"params": params}, images, method="encode_image", pos_interp=pos_interp)
  clean = jnp.sum(l2_normalize(common.take_pairs(emb, pair)) * targets, -1)
  return {"raw": raw, "grid": common.minmax(raw) if normalize else raw,
          "map": common.minmax(sal) if normalize else sal, "saliency": sal, "score": clean}
