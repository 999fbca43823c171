"""GradCAM for CLIP ViTs on the attention probabilities (AMC eq. 4-6, MaskInversion §3.1).

Definition (per pair p, block ``layer`` of the image tower):

    s   = cos(image_embed, text_embed)        the image-text similarity (cosine of the L2-normalised
                                              embeddings; CLIP has no ITM head, so this is AMC's
                                              "itc" eval mode, notes/amc-and-local-alignment.md §2)
    F   = A^layer [heads, N, N]               post-softmax attention probabilities
    G   = ds / dF                             (through the model's ``perturb('attn', ...)``)
    cam = mean_h( F[h, 0, 1:] * relu(G[h, 0, 1:]) )   [CLS] query row, patch key columns -> [gh, gw]

``relu_grad=True`` is the AMC code (gradient clamped BEFORE the product; the final ReLU is then a
no-op). ``relu_grad=False`` uses F * G; ``relu=True`` then applies GradCAM's final ReLU,
``relu=False`` gives MaskInversion's "GradCAM without ReLU" (their Table 6, ‡).

Everything is a pure JAX function of ``params``: ``jax.grad`` of any function of the cam w.r.t.
params is a second-order derivative (AMC trains through it with ``create_graph=True``,
notes/amc-and-local-alignment.md §3).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from trace_jax.attribution import common


def _cam(F, G, relu_grad: bool, relu: bool, prefix: int = 1):
  """F, G: [P, heads, N, N] -> [P, N - 1] (CLS row, patch columns, mean over heads).

  SigLIP (``prefix=0``): F, G are the MAP head's [P, heads, 1, N] (its probe is the pooling query,
  as the CLS row is CLIP's; no class token) -> [P, N]."""
  f = F[:, :, 0, prefix:]
  g = G[:, :, 0, prefix:]
  g = jnp.maximum(g, 0.0) if relu_grad else g  # AMC: grad.clamp(0) (notes §2)
  cam = jnp.mean(f * g, axis=1)
  return jnp.maximum(cam, 0.0) if relu else cam


def gradcam_pairs(model, params, images, ids=None, *, query=None, layer: int = -1,
                  relu_grad: bool = True, relu: bool = True, pos_interp=None):
  """Raw GradCAM grids [P, gh, gw] and scores [P] for the pairs of ``images`` and texts/queries.

  Pairing as in ``common`` (one image + P texts = one image forward, P vmapped backwards).
  """
  images = common.as_images(images)
  targets = common.text_targets(model, params, ids, query)
  pair = common.pairing(images.shape[0], targets.shape[0])
  if not pair.single_image and images.shape[0] != pair.num_pairs:
    raise ValueError("internal pairing error")
  targets = common.broadcast_texts(targets, pair)
  i = common.resolve_layer(layer, model.cfg.vision.layers)
  siglip = model.cfg.vision.kind == "siglip"
  if siglip:  # no class token: the MAP head's attention is the pooled query's (models/siglip.py)
    from trace_jax.models.siglip import POOL_PATH
    if i != model.cfg.vision.layers - 1:
      raise ValueError(f"GradCAM on a SigLIP model uses the attention-pooling head's probabilities (the "
                       f"pooled query; there is no class token): layer must be -1, got {layer}")
    path = POOL_PATH
  else:
    path = common.attn_path("visual", i)
  emb, aux, vjp_fn = common.encode_image_vjp(model, params, images, [path], pos_interp)
  scores, (G,) = common.pair_grads(emb, vjp_fn, targets, pair)
  F = common.take_pairs(aux["pool"]["attn"] if siglip else aux["blocks"][i]["attn"], pair)
  cam = _cam(F, G, relu_grad, relu, prefix=0 if siglip else 1)
  return common.to_grid(cam, common.grid_shape(model, images)), scores


def gradcam_grid(model, params, images, ids=None, *, query=None, layer: int = -1,
                 relu_grad: bool = True, relu: bool = True, pos_interp=None) -> jax.Array:
  """Differentiable raw GradCAM on the patch grid, [P, gh, gw] (not normalised).

  images [B, H, W, 3] with ids [B, L] (B pairs), or images [1] with ids [P, L] (P prompts, one
  image forward); ``query`` [P, E] replaces ids with arbitrary embedding vectors.
  """
  return gradcam_pairs(model, params, images, ids, query=query, layer=layer, relu_grad=relu_grad,
                       relu=relu, pos_interp=pos_interp)[0]


def explain(model, params, images, ids=None, *, query=None, layer: int = -1, relu_grad: bool = True,
            relu: bool = True, pos_interp=None, normalize: bool = True,
            upsample: str = "bilinear") -> dict:
  """GradCAM maps: {'grid' [P, gh, gw] min-max normalised, 'raw', 'map' [P, H, W], 'score' [P]}.

  Normalisation as the AMC code: per-sample min-max on the grid with +1e-7 in the denominator, then
  bilinear (align_corners=False) upsampling to the image size (notes/amc-and-local-alignment.md §2).
  """
  images = common.as_images(images)
  grid, scores = gradcam_pairs(model, params, images, ids, query=query, layer=layer,
                               relu_grad=relu_grad, relu=relu, pos_interp=pos_interp)
  out = common.finish(grid, images.shape[1:3], normalize=normalize, upsample_method=upsample)
  out["score"] = scores
  return out


def gradcam(model, params, images, ids=None, **kw) -> dict:
  """Alias of ``explain`` (dict with 'grid', 'raw', 'map', 'score')."""
  return explain(model, params, images, ids, **kw)


@functools.partial(jax.jit, static_argnames=("model", "layer", "relu_grad", "relu", "pos_interp",
                                             "normalize", "upsample"))
def explain_jit(model, params, images, ids=None, query=None, *, layer=-1, relu_grad=True, relu=True,
                pos_interp=None, normalize=True, upsample="bilinear"):
  return explain(model, params, images, ids, query=query, layer=layer, relu_grad=relu_grad, relu=relu,
                 pos_interp=pos_interp, normalize=normalize, upsample=upsample)
