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

``image_state`` runs the image forward once (keeping its pullback to the read attention),
``prompt_maps`` each prompt's backward: inference/explain.py runs prompt chunks on one state.

Everything is a pure JAX function of ``params``: ``jax.grad`` of any function of the cam w.r.t.
params is a second-order derivative (AMC trains through it with ``create_graph=True``,
notes/amc-and-local-alignment.md §3).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from trace_jax.attribution import common


def _cam(F, G, relu_grad: bool, relu: bool):
  """F, G: [P, heads, Nq, N] -> [P, Nq, N] (mean over heads of F * relu(G); GradCAM's final ReLU)."""
  G = jnp.maximum(G, 0.0) if relu_grad else G  # AMC: grad.clamp(0) (notes §2)
  cam = jnp.mean(F * G, axis=1)
  return jnp.maximum(cam, 0.0) if relu else cam


def _read_attention(model, layer: int):
  """(perturbation path, aux -> probabilities [n, heads, Nq, N]) of the attention GradCAM reads:
  block ``layer`` (CLIP: its class-token row is the query), or on SigLIP the MAP head's (its probe
  is the pooled query, as the class token is CLIP's; models/siglip.py)."""
  i = common.resolve_layer(layer, model.cfg.vision.layers)
  if model.cfg.vision.kind != "siglip":
    return common.attn_path("visual", i), lambda aux: aux["blocks"][i]["attn"]
  from trace_jax.models.siglip import POOL_PATH
  if i != model.cfg.vision.layers - 1:
    raise ValueError(f"GradCAM on a SigLIP model uses the attention-pooling head's probabilities (the "
                     f"pooled query; there is no class token): layer must be -1, got {layer}")
  return POOL_PATH, lambda aux: aux["pool"]["attn"]


def image_state(model, params, images, *, layer: int = -1, pos_interp=None) -> dict:
  """GradCAM's prompt-independent part: ONE forward of images [n, H, W, 3] (or one [H, W, 3]).

  Returns {'emb' [n, E] (un-normalised image embeddings), 'attn' [n, heads, 1, N] (the query row of
  the read attention: the only row GradCAM uses), 'vjp'} where ``vjp(ct [n, E]) -> (dA [n, heads, Nq,
  N],)`` is the pullback to those probabilities, a pytree of the forward's residuals (a jit can
  return the state; each prompt's backward then needs no forward)."""
  images = common.as_images(images)
  path, read = _read_attention(model, layer)
  emb, aux, vjp_fn = common.encode_image_vjp(model, params, images, [path], pos_interp)
  return {"emb": emb, "attn": read(aux)[:, :, :1], "vjp": vjp_fn}


def grid_scores(model, state: dict, targets, grid_hw: tuple[int, int], *, relu_grad: bool = True,
                relu: bool = True):
  """Raw GradCAM grids [P, gh, gw] and scores [P] of an ``image_state`` with L2-normalised targets
  [T, E] (pairing as in ``common``: one image + P targets = P vmapped backwards, no forward)."""
  pair = common.pairing(state["emb"].shape[0], targets.shape[0])
  targets = common.broadcast_texts(targets, pair)
  scores, (G,) = common.pair_grads(state["emb"], state["vjp"], targets, pair)
  cam = _cam(common.take_pairs(state["attn"], pair), G[:, :, :1], relu_grad, relu)  # [P, 1, N]
  return common.to_grid(common.query_row(model, cam), grid_hw), scores


def prompt_maps(model, params, state: dict, targets, image_hw: tuple[int, int], ids=None, *,
                relu_grad: bool = True, relu: bool = True, normalize: bool = True,
                upsample: str = "bilinear") -> dict:
  """GradCAM's per-prompt part: ``explain``'s dict for an ``image_state`` of images [n, H, W, 3]
  (``image_hw`` = (H, W)) and L2-normalised targets [T, E]. ``params`` and ``ids`` are unused (the
  signature every split method shares)."""
  grid, scores = grid_scores(model, state, targets, common.patch_grid(model, image_hw),
                             relu_grad=relu_grad, relu=relu)
  out = common.finish(grid, image_hw, normalize=normalize, upsample_method=upsample)
  out["score"] = scores
  return out


def gradcam_pairs(model, params, images, ids=None, *, query=None, layer: int = -1,
                  relu_grad: bool = True, relu: bool = True, pos_interp=None):
  """Raw GradCAM grids [P, gh, gw] and scores [P] for the pairs of ``images`` and texts/queries.

  Pairing as in ``common`` (one image + P texts = one image forward, P vmapped backwards).
  """
  images = common.as_images(images)
  targets = common.text_targets(model, params, ids, query)
  state = image_state(model, params, images, layer=layer, pos_interp=pos_interp)
  return grid_scores(model, state, targets, common.grid_shape(model, images), relu_grad=relu_grad,
                     relu=relu)


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
  = ``prompt_maps(image_state(images), targets)``.
  """
  images = common.as_images(images)
  targets = common.text_targets(model, params, ids, query)
  state = image_state(model, params, images, layer=layer, pos_interp=pos_interp)
  return prompt_maps(model, params, state, targets, images.shape[1:3], relu_grad=relu_grad, relu=relu,
                     normalize=normalize, upsample=upsample)


def gradcam(model, params, images, ids=None, **kw) -> dict:
  """Alias of ``explain`` (dict with 'grid', 'raw', 'map', 'score')."""
  return explain(model, params, images, ids, **kw)


@functools.partial(jax.jit, static_argnames=("model", "layer", "relu_grad", "relu", "pos_interp",
                                             "normalize", "upsample"))
def explain_jit(model, params, images, ids=None, query=None, *, layer=-1, relu_grad=True, relu=True,
                pos_interp=None, normalize=True, upsample="bilinear"):
  return explain(model, params, images, ids, query=query, layer=layer, relu_grad=relu_grad, relu=relu,
                 pos_interp=pos_interp, normalize=normalize, upsample=upsample)
