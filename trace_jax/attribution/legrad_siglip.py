"""LeGrad on SigLIP towers, as ``legrad-torch==1.1`` ``LeWrapper.compute_legrad_siglip`` computes it.

The authors' code (legrad/wrapper.py ``compute_legrad_siglip`` + utils.py
``hooked_attentional_pooler_timm_forward``, on open_clip 2.23.0's timm SigLIP trunk), per image and
for every hooked block l >= start (``layer_index``: -2 default = the last two blocks, 0 = all):

    x_l  = block l's output (``feat_post_mlp``; NOT the trunk's final norm)            [N, W]
    z_l  = normalize(attn_pool(x_l))        the MAP head applied to x_l                 [W]
    G_l  = d(t . z_l) / dA_pool             A_pool: the MAP head's probabilities        [heads, 1, N]
    E   += mean_h relu(G_l)[h, 0, :]   -> [g, g] (row-major patches; no class token)
    (correction) E_0 += the same with t_0 = normalize(encode_text('a photo of a'))
    E[minmax(E_0) > 0.8] = 0            the "empty prompt" correction (apply_correction=True)
    map = up_ps(minmax(E))              min-max BEFORE the bilinear x patch upsampling

Differences from theirs:
* pairs: theirs sums ``text_embedding @ pooled.T`` over ALL prompts and images, so P prompts on one
  image give ONE map (of the summed prompts) and B images with B prompts mix the cross terms. Here
  every (image, prompt) pair gets its own map, equal to theirs called with that one image and that
  one prompt (tests/test_legrad_siglip.py checks exactly that).
* the empty prompt: theirs tokenises 'a photo of a' with the ``ViT-B-16-SigLIP`` HF tokenizer (a
  download); here its token ids (``empty_ids``) or its embedding (``empty_query``) are passed in, or
  ``correction=False``.
* a model with an image head (big_vision checkpoints that have ``img/head``) applies it after the MAP
  head, so that z_l lives in the text embedding space; the open_clip SigLIPs have none.
* min-max is guarded (a constant map gives 0, not NaN).

One image forward gives every x_l; per layer one ``jax.vjp`` of the MAP head w.r.t. its probabilities
(through the model's ``perturb('attn')``), vmapped over the prompts (and the empty prompt).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.models import l2_normalize
from trace_jax.models.layers import dtype_of
from trace_jax.models.siglip import MAPHead, options
from trace_jax.ops import minmax
from trace_jax.resize import upsample_bilinear

CORRECTION_THRESHOLD = 0.8  # compute_legrad_siglip(correction_threshold=0.8)
EMPTY_PROMPT = "a photo of a"  # wrapper.py _init_empty_embedding


def layer_feature_of_attn(cfg, params, x, attn_pert):
  """z_l [E] = normalize(MAP head(x_l)) with ``attn_pert`` [heads, 1, N] added to its probabilities."""
  o = options(cfg)
  head = MAPHead(cfg.vision.heads, cfg.vision.mlp_ratio, cfg.act, dtype_of(cfg.dtype), o["ln_eps"])
  pooled, _ = head.apply({"params": params["visual"]["map_head"], "perturbations": {"attn": attn_pert}}, x)
  if o["image_head"]:
    pooled = pooled @ params["visual"]["proj"] + params["visual"]["proj_bias"]
  return l2_normalize(pooled.astype(jnp.float32))


def raw_grids_one_image(model, params, image, queries, layer_ids, pos_interp="antialias"):
  """Summed relevance [P, gh, gw] (before correction / min-max) of P queries on ONE image [H, W, 3]."""
  cfg = model.cfg
  ps = cfg.vision.patch_size
  gh, gw = image.shape[-3] // ps, image.shape[-2] // ps
  _, aux = model.apply({"params": params}, image, method="encode_image", pos_interp=pos_interp)
  heads, n = cfg.vision.heads, gh * gw
  total = 0.0
  for l in layer_ids:
    x = aux["blocks"][l]["tokens"]
    f = functools.partial(layer_feature_of_attn, cfg, params, x)
    _, vjp = jax.vjp(f, jnp.zeros((heads, 1, n), jnp.float32))
    g = jax.vmap(lambda q: vjp(q)[0])(queries)                 # [P, heads, 1, N]
    total = total + jnp.mean(jax.nn.relu(g), axis=1)[:, 0]     # relu, mean over heads, the probe's row
  return total.reshape(queries.shape[0], gh, gw)


def finish(raw, raw_empty, ps: int, threshold: float = CORRECTION_THRESHOLD):
  """raw [P, gh, gw] (+ the empty prompt's [gh, gw] or None) -> (grid [P, gh, gw], map [P, H, W])."""
  if raw_empty is not None:
    raw = jnp.where(minmax(raw_empty)[None] > threshold, 0.0, raw)
  grid = minmax(raw)
  return grid, upsample_bilinear(grid, (grid.shape[-2] * ps, grid.shape[-1] * ps))


@functools.lru_cache(maxsize=64)
def _compiled(cfg, layer_ids: tuple, pos_interp: str, single_image: bool, correction: bool, threshold: float):
  from trace_jax.models import build
  model = build(cfg)
  ps = cfg.vision.patch_size

  def one(params, image, queries, empty):
    qs = jnp.concatenate([queries, empty[None]], 0) if correction else queries
    raw = raw_grids_one_image(model, params, image, qs, layer_ids, pos_interp)
    if correction:
      return raw[:-1], raw[-1]
    return raw, None

  def fn(params, images, queries, empty):
    if single_image:
      raw, raw_e = one(params, images[0], queries, empty)
      grid, m = finish(raw, raw_e, ps, threshold)
      return raw, grid, m
    def pair(im, q):
      raw, raw_e = one(params, im, q[None], empty)
      grid, m = finish(raw, raw_e, ps, threshold)
      return raw[0], grid[0], m[0]
    return jax.vmap(pair)(images, queries)
  return jax.jit(fn)


def legrad_siglip(model, params, images, queries, *, layers=-2, pos_interp: str = "antialias",
                  correction: bool = True, empty_query=None, threshold: float = CORRECTION_THRESHOLD):
  """LeGrad maps of a SigLIP model for query vectors (used as given, as theirs).

  images [B, H, W, 3] or [H, W, 3]; queries [P, E]; pairing as ``attribution.common``. ``empty_query``
  [E]: the normalised embedding of the empty prompt (needed when ``correction``). Returns ``raw``
  [P, gh, gw] summed relevance (before the correction), ``grid`` [P, gh, gw] (corrected, min-maxed)
  and ``map`` [P, gh*ps, gw*ps].
  """
  from trace_jax.attribution.common import as_images, as_query, pairing
  from trace_jax.attribution.legrad import resolve_layers
  cfg = model.cfg
  images = as_images(images)
  queries = as_query(queries)
  if queries.shape[-1] != cfg.embed_dim:
    raise ValueError(f"query vectors have dim {queries.shape[-1]}, the model embeds to {cfg.embed_dim}")
  if correction:
    if empty_query is None:
      raise ValueError(f"LeGrad on SigLIP applies the authors' empty-prompt correction: pass empty_ids (token "
                       f"ids of {EMPTY_PROMPT!r}) or empty_query, or correction=False")
    empty_query = jnp.asarray(empty_query, jnp.float32).reshape(-1)
    if empty_query.shape[0] != cfg.embed_dim:
      raise ValueError(f"empty_query has dim {empty_query.shape[0]}, the model embeds to {cfg.embed_dim}")
  else:
    empty_query = jnp.zeros((cfg.embed_dim,), jnp.float32)
  layer_ids = resolve_layers(layers, cfg.vision.layers)
  pair = pairing(images.shape[0], queries.shape[0])
  if not pair.single_image and queries.shape[0] != pair.num_pairs:
    queries = jnp.broadcast_to(queries, (pair.num_pairs, queries.shape[-1]))
  raw, grid, m = _compiled(cfg, layer_ids, pos_interp, pair.single_image, bool(correction), float(threshold))(
      params, images, queries, empty_query)
  return {"raw": raw, "grid": grid, "map": m}


def empty_prompt_ids(tokenizer, context_length: int) -> np.ndarray:
  """int32 [L]: the token ids of ``EMPTY_PROMPT`` ('a photo of a'), the text of the authors' correction."""
  return np.asarray(tokenizer([EMPTY_PROMPT], context_length)[0])


def empty_query_of(model, params, *, empty_ids=None, empty_query=None):
  """The L2-normalised empty-prompt embedding [E] of the correction from ``empty_ids`` [L] or
  ``empty_query`` [E] (None when neither is given); a vector of the wrong dimension is named."""
  if empty_query is None and empty_ids is None:
    return None
  if empty_query is None:
    from trace_jax.attribution.common import as_ids
    empty_query = model.apply({"params": params}, as_ids(empty_ids)[:1], method="encode_text")[0][0]
  q = jnp.asarray(empty_query, jnp.float32).reshape(-1)
  if q.shape[0] != model.cfg.embed_dim:
    raise ValueError(f"empty_query has dim {q.shape[0]}, the model embeds to {model.cfg.embed_dim}")
  return l2_normalize(q)


def explain(model, params, images, ids=None, *, query=None, layers=-2, pos_interp: str = "antialias",
            correction: bool = True, empty_ids=None, empty_query=None, threshold: float = CORRECTION_THRESHOLD):
  """``explain('legrad')`` on a SigLIP model: token ids [T, L] are encoded and L2-normalised (theirs
  gets ``encode_text(..., normalize=True)``), query vectors [T, E] used as given. ``empty_ids`` [L]
  (token ids of 'a photo of a') or ``empty_query`` [E] for the correction."""
  from trace_jax.attribution.common import as_ids
  if (ids is None) == (query is None):
    raise ValueError("give exactly one of `ids` (token ids) or `query` (embedding vectors)")
  if ids is not None:
    emb, _ = model.apply({"params": params}, as_ids(ids), method="encode_text")
    query = l2_normalize(emb)
  if correction:
    empty_query = empty_query_of(model, params, empty_ids=empty_ids, empty_query=empty_query)
  return legrad_siglip(model, params, images, query, layers=layers, pos_interp=pos_interp,
                       correction=correction, empty_query=empty_query, threshold=threshold)
