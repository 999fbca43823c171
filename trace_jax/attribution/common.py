"""Shared helpers of the attribution methods: pairing, targets, gradients w.r.t. attention, maps.

Pairing rules (docs/attribution.md, "Pairing"):

* ``images [B]`` + ``B`` texts (or query vectors)  -> B pairs, pair b = (image b, text b);
* ``images [1]`` + ``P`` texts                      -> P pairs on the one image. Methods that allow it
  (GradCAM, rollout, Chefer, saliency, LeGrad) run ONE image forward and ``vmap`` only the per-prompt
  part (the backward from each prompt's score). GradCAM, rollout, Chefer and saliency split the two
  parts into ``image_state(model, params, images, ...)`` (the forward and its pullback) and
  ``prompt_maps(model, params, state, targets, image_hw, ...)``, so prompt chunks can share one
  state (inference/explain.py);
* ``images [B]`` + ``1`` text                      -> B pairs, the text repeated;
* anything else is a ValueError.

The score of a pair is the cosine similarity of the L2-normalised image and text (or query)
embeddings. CLIP has no ITM head, so this is the "itc" target of AMC's evaluation code
(notes/amc-and-local-alignment.md §2, "itc" mode) and the cosine MaskInversion §3.1 names.

Shapes: images ``[n_img, H, W, 3]`` (NHWC, already normalised), token ids ``[P, L]``, query
vectors ``[P, E]``; maps ``[P, gh, gw]`` on the patch grid, ``[P, H, W]`` at image size.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from trace_jax import ops, resize
from trace_jax.models import l2_normalize, perturbation_zeros
from trace_jax.models.perturbations import block_path

MINMAX_EPS = ops.MINMAX_EPS  # AMC code: (cam - min) / (max(cam - min) + 1e-7)


class Pairing(NamedTuple):
  """How pairs map to images: ``single_image`` True = one image forward for all P pairs."""
  num_pairs: int
  single_image: bool


def explicit_attention(model):
  """``model`` with ``attention='explicit'`` where it was built fused (a training-only option).

  A fused block returns no attention probabilities from a plain forward (models/layers.uses_fused),
  and rollout, LeGrad and MaskInversion's LeGrad read them from one: they take the explicit blocks
  (same params, same numerics to float32 rounding: tests/test_scale.py). A flax clone with equal
  fields hashes equal, so a jitted caller is not retraced."""
  cfg = getattr(model, "cfg", None)
  if getattr(cfg, "attention", "explicit") == "explicit":
    return model
  return model.clone(cfg=cfg.replace(attention="explicit"))


def as_images(images) -> jax.Array:
  images = jnp.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be NHWC [batch, height, width, 3] (or one HWC image); "
                     f"got shape {tuple(images.shape)}")
  return images.astype(jnp.float32) if not jnp.issubdtype(images.dtype, jnp.floating) else images


def as_ids(ids) -> jax.Array:
  ids = jnp.asarray(ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"token ids must be an integer array [num_texts, length]; got shape "
                     f"{tuple(ids.shape)} dtype {ids.dtype}")
  return ids


def as_query(query) -> jax.Array:
  query = jnp.asarray(query, jnp.float32)
  if query.ndim == 1:
    query = query[None]
  if query.ndim != 2:
    raise ValueError(f"query embeddings must be [num_queries, embed_dim]; got shape {tuple(query.shape)}")
  return query


def pairing(num_images: int, num_texts: int) -> Pairing:
  """The pairing rule (module docstring) for ``num_images`` images and ``num_texts`` texts."""
  if num_images == num_texts and num_images != 1:
    return Pairing(num_images, False)
  if num_images == 1:
    return Pairing(num_texts, True)
  if num_texts == 1:
    return Pairing(num_images, False)
  raise ValueError(f"cannot pair {num_images} images with {num_texts} texts: give as many texts as "
                   f"images (pairs), one image and many texts, or many images and one text")


def text_targets(model, params, ids=None, query=None) -> jax.Array:
  """L2-normalised targets [T, E] from token ids [T, L] (text tower) or query vectors [T, E].

  Differentiable w.r.t. params (AMC back-propagates through both towers).
  """
  if (ids is None) == (query is None):
    raise ValueError("give exactly one of `ids` (token ids) or `query` (embedding vectors)")
  if query is not None:
    q = as_query(query)
    if q.shape[-1] != model.cfg.embed_dim:
      raise ValueError(f"query vectors have dim {q.shape[-1]}, the model embeds to {model.cfg.embed_dim}")
    return l2_normalize(q)
  emb, _ = model.apply({"params": params}, as_ids(ids), method="encode_text")
  return l2_normalize(emb)


def broadcast_texts(targets: jax.Array, pair: Pairing) -> jax.Array:
  """[T, ...] -> [P, ...] (a single text is repeated over the pairs)."""
  if targets.shape[0] == pair.num_pairs:
    return targets
  return jnp.broadcast_to(targets, (pair.num_pairs,) + targets.shape[1:])


def cosine(emb: jax.Array, target_n: jax.Array) -> jax.Array:
  """cos(emb, target) for un-normalised image embeddings and normalised targets, [..., E] -> [...]."""
  return jnp.sum(l2_normalize(emb) * target_n, axis=-1)


def resolve_layer(layer: int, num_layers: int) -> int:
  i = layer + num_layers if layer < 0 else layer
  if not 0 <= i < num_layers:
    raise ValueError(f"layer {layer} out of range for a tower with {num_layers} blocks")
  return i


def attn_path(tower: str, i: int) -> tuple[str, ...]:
  """Path of block i's attention-probability perturbation ('visual' or 'text' tower)."""
  return block_path(tower, i) + ("attn", "attn")


def get_in(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def set_in(tree, path, value):
  """Functional update of a nested dict at ``path``."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = set_in(tree[path[0]], path[1:], value)
  return out


def encode_vjp(model, params, x, paths: Sequence[tuple[str, ...]], method: str = "encode_image",
               **kwargs):
  """One forward of a tower (``method`` 'encode_image' or 'encode_text'), differentiable w.r.t. the
  perturbations at ``paths`` only.

  Returns ``(emb [n, E], aux, vjp_fn)``; ``vjp_fn(ct [n, E]) -> tuple`` of gradients, one per path,
  with the shapes of those intermediates (e.g. [n, heads, N, N] for attention); ``vjp_fn`` is a
  ``jax.tree_util.Partial`` (a pytree of the forward's residuals: jit may return it). Differentiating
  only the named leaves keeps the backward to the blocks at or above the lowest named one.
  """
  zeros = perturbation_zeros(model, params, x, method=method, **kwargs)

  def f(leaves):
    perts = zeros
    for path, leaf in zip(paths, leaves):
      perts = set_in(perts, path, leaf)
    return model.apply({"params": params, "perturbations": perts}, x, method=method, **kwargs)

  leaves = tuple(get_in(zeros, p) for p in paths)
  emb, vjp_fn, aux = jax.vjp(f, leaves, has_aux=True)
  # a Partial over jax's pullback (a pytree whose leaves are the residuals), not a closure: an image
  # state holding it can leave one jit and enter another (inference/explain.py's prompt chunks)
  return emb, aux, jax.tree_util.Partial(_leaf_grads, vjp_fn)


def _leaf_grads(vjp_fn, ct):
  """The pullback's gradients w.r.t. ``encode_vjp``'s leaves (its only primal argument)."""
  return vjp_fn(ct)[0]


def encode_image_vjp(model, params, images, paths: Sequence[tuple[str, ...]], pos_interp=None):
  """``encode_vjp`` of the image tower (paths rooted at 'visual')."""
  return encode_vjp(model, params, images, paths, "encode_image", pos_interp=pos_interp)


def encode_text_vjp(model, params, ids, paths: Sequence[tuple[str, ...]]):
  """``encode_vjp`` of the text tower (paths rooted at 'text')."""
  return encode_vjp(model, params, as_ids(ids), paths, "encode_text")


def pair_grads(emb: jax.Array, vjp_fn: Callable, targets_n: jax.Array, pair: Pairing):
  """Scores [P] and per-pair gradients of each pair's cosine w.r.t. the vjp's leaves.

  ``single_image``: emb [1, E]; the P cotangents are ``vmap``-ed through one backward function
  (one forward, P backwards). Otherwise emb [P, E]; pair p's score depends on image p only, so ONE
  backward of the summed score gives every pair's gradient. Leaves come back as [P, ...].
  """
  if pair.single_image:
    e = emb[0]
    scores, ct = jax.vmap(jax.value_and_grad(cosine), in_axes=(None, 0))(e, targets_n)  # [P], [P, E]
    grads = jax.vmap(lambda c: vjp_fn(c[None]))(ct)
    grads = jax.tree.map(lambda g: g[:, 0], grads)
  else:
    scores, ct = jax.vmap(jax.value_and_grad(cosine))(emb, targets_n)
    grads = vjp_fn(ct)
  return scores, grads


def query_row(model, r: jax.Array, probe: jax.Array | None = None) -> jax.Array:
  """The image map's row [..., n_patches]: the image query's row of ``r``, patch columns.

  ``r`` [..., Nq, N]: a head-reduced token matrix whose rows are queries (a block's attention,
  blocks' rollout / relevance [..., N, N], or the MAP head's [..., 1, N]).

  * CLIP (ViT / CRATE): the query is the class token, row 0; its own column is dropped:
    ``r[..., 0, 1:]``. ``probe`` must be None.
  * SigLIP (no class token, models/siglip.py): the query is the MAP head's pooling probe. Given
    ``probe`` [..., N] (its head-reduced attention over the final tokens, reduced the method's
    way), the row is the probe carried through the blocks ``r`` [..., N, N]: ``probe @ r``; without
    it, ``r`` is the head's own [..., 1, N] and the row is ``r[..., 0, :]`` (no column to drop).
  """
  if model.cfg.vision.kind != "siglip":
    if probe is not None:
      raise ValueError("a class-token tower has no pooling probe")
    return r[..., 0, 1:]
  if probe is None:
    return r[..., 0, :]
  return jnp.einsum("...j,...jk->...k", probe, r, precision=jax.lax.Precision.HIGHEST)


def sigmoid_scores(model, params, out: dict) -> dict:
  """A SigLIP model scores a pair by its sigmoid logit ``exp(t) cos + b``: ``out['score']`` (the
  cosine) moves to ``out['cosine']`` and the logit takes its place (api.explain's rule). CLIP: ``out``
  unchanged."""
  if model.cfg.vision.kind != "siglip":
    return out
  from trace_jax.models.siglip import pair_logit
  return {**out, "cosine": out["score"], "score": pair_logit(params, out["score"])}


def take_pairs(x: jax.Array, pair: Pairing) -> jax.Array:
  """Per-image quantity [n_img, ...] -> per-pair [P, ...]."""
  if pair.single_image:
    return jnp.broadcast_to(x, (pair.num_pairs,) + x.shape[1:])
  return x


def grid_shape(model, images) -> tuple[int, int]:
  """The patch grid (gh, gw) of images [..., H, W, 3]."""
  return patch_grid(model, images.shape[-3:-1])


def patch_grid(model, image_hw: tuple[int, int]) -> tuple[int, int]:
  """The patch grid (gh, gw) of an image of size ``image_hw`` (H, W)."""
  p = model.cfg.vision.patch_size
  return image_hw[0] // p, image_hw[1] // p


def to_grid(patch_values: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """[..., gh*gw] (row-major patch order, as the ViT flattens them) -> [..., gh, gw]."""
  if patch_values.shape[-1] != hw[0] * hw[1]:
    raise ValueError(f"{patch_values.shape[-1]} patch values do not fill a {hw[0]}x{hw[1]} grid")
  return patch_values.reshape(patch_values.shape[:-1] + tuple(hw))


def minmax(x: jax.Array, axes=(-2, -1), eps: float = MINMAX_EPS) -> jax.Array:
  """Per-sample ``(x - min) / (max - min + eps)`` over ``axes``; a constant map gives 0, not NaN.

  The eps sits in the denominator as in the AMC / LeGrad code, so the result lies in [0, 1)
  (trace_jax/ops.py ``minmax`` with ``eps``).
  """
  return ops.minmax(x, axis=axes, eps=eps)


def upsample(grid: jax.Array, hw: tuple[int, int], method: str = "bilinear") -> jax.Array:
  """[..., gh, gw] -> [..., H, W]; 'bilinear' = torch ``F.interpolate(bilinear, align_corners=False)``
  (exact matrices), 'bicubic' / 'nearest' = ``jax.image.resize``'s: trace_jax/resize.py ``upsample``.
  """
  return resize.upsample(grid.astype(jnp.float32), hw, method)


def finish(grid: jax.Array, image_hw: tuple[int, int], *, normalize: bool = True,
           upsample_method: str = "bilinear", order: str = "minmax_then_upsample") -> dict:
  """Raw grid -> {'raw': grid, 'grid': normalised grid, 'map': [P, H, W] in [0, 1]}.

  ``order='minmax_then_upsample'`` (AMC / GradCAM / Chefer notebooks normalise after upsampling;
  for bilinear upsampling min-max and upsampling commute up to the eps since bilinear weights are
  convex, so both orders agree); ``'upsample_then_minmax'`` is LeGrad's order.
  """
  if order == "minmax_then_upsample":
    g = minmax(grid) if normalize else grid
    m = upsample(g, image_hw, upsample_method)
    if normalize and upsample_method == "bicubic":  # cubic overshoots [0, 1]
      m = jnp.clip(m, 0.0, 1.0)
  elif order == "upsample_then_minmax":
    m = upsample(grid, image_hw, upsample_method)
    m = minmax(m) if normalize else m
    g = minmax(grid) if normalize else grid
  else:
    raise ValueError(f"unknown order {order!r}")
  return {"raw": grid, "grid": g, "map": m}
