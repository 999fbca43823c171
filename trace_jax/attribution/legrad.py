"""LeGrad (Bousselham et al. 2024) as ``legrad-torch==1.1`` computes it for open_clip ViTs.

Closed form (notes/legrad-maskinversion.md, "LeGrad", steps 1-11):

    z_l = normalize(ln_post(mean over ALL N tokens of x_l) @ proj)         (step 2)
    G_l = d(t . z_l) / dA_l          A_l = block l's post-softmax probs    (steps 3-4)
    E   = minmax(up_ps(sum_{l >= start} mean_h mean_i relu(G_l)[h, i, 1:]))  (steps 5-10)

* ``t`` is used as given (LeGrad never normalises it, step 1); text ids are encoded and
  L2-normalised first, as the README does.
* ``layers``: LeGrad's ``layer_index`` (start = layer_index if >= 0 else L + layer_index):
  default -2 = the last two blocks, 0 = all blocks; an explicit tuple of block indices also works.
* ``up_ps`` is torch ``F.interpolate(scale_factor=ps, mode='bilinear')``: the exact matrices of
  trace_jax/resize.py (note, "Resize equivalences"). Upsampling is linear, so the layer grids are
  summed first and upsampled once (same result up to rounding).
* min-max runs AFTER upsampling (step 10). Difference from theirs: a constant map (e.g. a query
  orthogonal to everything, or all gradients <= 0) gives 0 everywhere instead of NaN.
* other input sizes: the position embedding is resampled with the model's ``pos_interp='antialias'``
  (= timm bicubic antialias, what LeGrad's ``vit_dynamic_size_forward`` does), without mutating
  anything. Non-square grids work here (LeGrad itself assumes a square grid).

Gradient w.r.t. the attention probabilities -- block-level recompute, not the model's
perturbations: LeGrad differentiates each layer's OWN score ``t . z_l`` w.r.t. that layer's
``A_l`` only (no contribution of ``z_{l'>l}``), and between ``A_l`` and ``z_l`` lies only block l's
post-attention path (A.v -> out -> residual -> MLP -> mean -> ln_post -> proj; step 4). So one
model forward gives each block's input ``x_{l-1}`` and ``A_l``; :func:`feature_of_attn` re-evaluates
block l's tail as a function of ``A`` (a block-sized forward, from the functional block pieces of
trace_jax/models/blocks.py) and ``jax.vjp`` of it is vmapped over the queries: one image forward
for any number of prompts, P cheap backwards through one block. Hence LeGrad needs a ViT image tower
(a CRATE tower is refused with a ValueError naming it).
The same explicit tail lets MaskInversion precompute the query-independent Jacobian
(trace_jax/inversion/maskinversion.py, 'decomposed' mode).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from trace_jax.attribution import common
from trace_jax.models import l2_normalize
from trace_jax.models.blocks import attend, pooled_from_o, require_vit, values, vision_head
from trace_jax.ops import minmax  # guarded: a constant map gives 0, not NaN
from trace_jax.resize import upsample_bilinear


def resolve_layers(layers, num_layers: int) -> tuple[int, ...]:
  """LeGrad's ``layer_index`` (int) or explicit block indices -> sorted tuple of block indices."""
  if isinstance(layers, (int,)) and not isinstance(layers, bool):
    start = layers if layers >= 0 else num_layers + layers  # wrapper.py:45
    if not 0 <= start < num_layers:
      raise ValueError(f"layer_index {layers} out of range for a ViT with {num_layers} blocks")
    return tuple(range(start, num_layers))
  idx = sorted({int(i) + num_layers if int(i) < 0 else int(i) for i in layers})
  if not idx or idx[0] < 0 or idx[-1] >= num_layers:
    raise ValueError(f"layers {tuple(layers)} out of range for a ViT with {num_layers} blocks")
  return tuple(idx)


# ----------------------------------------------------------------------------- layer feature
# The block pieces (values, attend, pooled_from_o, vision_head) are the model's functional forms,
# trace_jax/models/blocks.py; ``values`` / ``pooled_from_o`` are re-exported here.

def layer_feature(vp, pooled):
  """z_l = normalize(ln_post(pooled) @ proj) [E] (notes step 2)."""
  return l2_normalize(vision_head(vp, pooled))


def feature_of_attn(vp, l: int, act: str, x_prev, attn):
  """z_l [E] as a function of block l's attention probabilities ``attn`` [heads, N, N] (notes step 4):
  A.v -> out -> residual -> MLP -> token mean -> ln_post -> proj, from the block input x_prev [N, W]."""
  bp = vp["transformer"][f"block_{l}"]
  o = attend(attn, values(bp, x_prev))
  return layer_feature(vp, pooled_from_o(bp, x_prev, o, act))


# ----------------------------------------------------------------------------- forward state

def image_state(model, params, image, layer_ids: Sequence[int], pos_interp: str = "antialias"):
  """One image forward. image [H, W, 3] -> (emb [E] un-normalised CLS embedding,
  {l: (x_prev [N, W], attn [heads, N, N])} for l in layer_ids)."""
  model = common.explicit_attention(model)
  emb, aux = model.apply({"params": params}, image, method="encode_image", pos_interp=pos_interp)
  blocks = aux["blocks"]
  state = {}
  for l in layer_ids:
    if l == 0:  # block 0's input is ln_pre(patch + position embedding), not in aux
      x_prev = model.apply({"params": params}, image, pos_interp,
                           method=lambda m, x, pi: m.visual.ln_pre(m.visual.embed_patches(x, pi)))
    else:
      x_prev = blocks[l - 1]["tokens"]
    state[l] = (x_prev.astype(jnp.float32), blocks[l]["attn"].astype(jnp.float32))
  return emb, state


def relevance(g):
  """relu(G) [.., heads, N, N] -> mean over heads and ALL query rows, CLS column dropped [.., N-1]
  (notes steps 5-6: ReLU first)."""
  return jnp.mean(jax.nn.relu(g), axis=(-3, -2))[..., 1:]


def grids_one_image(model, params, image, queries, layer_ids, pos_interp="antialias"):
  """Raw LeGrad grids of P queries on ONE image: image [H, W, 3], queries [P, E] -> [P, gh, gw].

  One forward; per layer one vjp of the block tail, vmapped over the queries.
  """
  vp = params["visual"]
  ps = model.cfg.vision.patch_size
  gh, gw = image.shape[-3] // ps, image.shape[-2] // ps
  _, state = image_state(model, params, image, layer_ids, pos_interp)
  total = 0.0
  for l in layer_ids:
    x_prev, attn = state[l]
    _, vjp = jax.vjp(functools.partial(feature_of_attn, vp, l, model.cfg.act, x_prev), attn)
    g = jax.vmap(lambda q: vjp(q)[0])(queries)  # [P, heads, N, N]
    total = total + relevance(g)
  return total.reshape(queries.shape[0], gh, gw)


# ----------------------------------------------------------------------------- maps

def grid_to_map(grid, ps: int):
  """Raw summed grid [.., gh, gw] -> LeGrad map [.., gh*ps, gw*ps] in [0, 1] (steps 8-10): torch
  bilinear upsampling by ps (trace_jax/resize.py), then the guarded min-max (trace_jax/ops.py)."""
  return minmax(upsample_bilinear(grid, (grid.shape[-2] * ps, grid.shape[-1] * ps)))


@functools.lru_cache(maxsize=64)
def _compiled(cfg, layer_ids: tuple, pos_interp: str, single_image: bool):
  from trace_jax.models import build
  model = build(cfg)
  ps = cfg.vision.patch_size

  if single_image:
    def fn(params, images, queries):
      grid = grids_one_image(model, params, images[0], queries, layer_ids, pos_interp)
      return grid, grid_to_map(grid, ps)
  else:
    def fn(params, images, queries):
      one = lambda im, q: grids_one_image(model, params, im, q[None], layer_ids, pos_interp)[0]
      grid = jax.vmap(one)(images, queries)
      return grid, grid_to_map(grid, ps)
  return jax.jit(fn)


def legrad(model, params, images, queries, *, layers=-2, pos_interp: str = "antialias"):
  """LeGrad maps for query vectors (used as given).

  Args:
    images: [B, H, W, 3] (NHWC, normalised) or one [H, W, 3] image; H, W multiples of the patch.
    queries: [P, E] (or [E]). Pairing: B == P -> pairs (image b, query b); B == 1 -> one image
      forward, P maps; P == 1 -> the query is used for every image.
    layers: LeGrad ``layer_index`` (-2 default = last two blocks; 0 = all) or block indices.
  Returns:
    dict ``grid`` [P, gh, gw] raw summed relevance, ``map`` [P, gh*ps, gw*ps] min-maxed in [0, 1].
  """
  from trace_jax.attribution.common import as_images, as_query, pairing
  cfg = model.cfg
  require_vit(cfg, "LeGrad")
  images = as_images(images)
  queries = as_query(queries)
  if queries.shape[-1] != cfg.embed_dim:
    raise ValueError(f"query vectors have dim {queries.shape[-1]}, the model embeds to {cfg.embed_dim}")
  layer_ids = resolve_layers(layers, cfg.vision.layers)
  pair = pairing(images.shape[0], queries.shape[0])
  if not pair.single_image and queries.shape[0] != pair.num_pairs:
    queries = jnp.broadcast_to(queries, (pair.num_pairs, queries.shape[-1]))
  grid, m = _compiled(cfg, layer_ids, pos_interp, pair.single_image)(params, images, queries)
  return {"grid": grid, "map": m}


def explain(model, params, images, ids=None, *, query=None, layers=-2, pos_interp: str = "antialias",
            **kw):
  """``explain(method='legrad')`` entry: token ids [T, L] (encoded, L2-normalised as LeGrad's
  README) or query vectors [T, E] (used as given). See :func:`legrad` for shapes and pairing.
  (``api.explain('legrad', ...)`` sends a SigLIP model to trace_jax/attribution/legrad_siglip.py.)"""
  if kw:
    raise ValueError(f"legrad: unknown options {sorted(kw)}")
  require_vit(model.cfg, "LeGrad")
  if (ids is None) == (query is None):
    raise ValueError("give exactly one of `ids` (token ids) or `query` (embedding vectors)")
  if ids is not None:
    from trace_jax.attribution.common import as_ids
    emb, _ = model.apply({"params": params}, as_ids(ids), method="encode_text")
    query = l2_normalize(emb)
  return legrad(model, params, images, query, layers=layers, pos_interp=pos_interp)
