"""MaskInversion (Bousselham et al., maskinversion.md §3) as ``maskinversion-torch==1.1`` computes it.

Per image (notes/legrad-maskinversion.md, "MaskInversion", steps 1-9):

1. ONE image forward (theirs runs the ViT on K copies): z0 = un-normalised final CLS embedding.
2. LET_k <- z0 for every mask k (a query vector that replaces the text in LeGrad's score).
3. AdamW(lr, betas (0.9, 0.999), eps 1e-8, wd), torch defaults, as torch's single-tensor AdamW
   computes it (``torch_adamw_step``): p <- p (1 - lr wd); m, v updated; p <- p + (-s m) / (sqrt(v) /
   sqrt(1 - b2^t) + eps), with s = lr / (1 - b1^t), 1 - lr wd and sqrt(1 - b2^t) in float64 on the
   host, as torch computes them in Python floats (``adamw_schedule``). ``optax.adamw`` rounds them in
   float32 and divides in another order; against the official run that moved the LETs by up to
   2.5e-4 of max|LET|, the torch order by at most 1.1e-5 (docs/maskinversion.md, "Optimizer").
4. each step: q = normalize(LET); E = LeGrad(q) over blocks >= start (default: last only, layer_index
   -1), i.e. minmax(up_ps(grid)); E -> bilinear (no antialias) to the mask size; loss =
   mean_k dice_k + alpha * mean_k (1 - cos(z0, LET_k)), dice = 1 - (2 sum E m + 1)/(sum E + sum m + 1).
5. returns the un-normalised LETs [K, E] and the map of the RETURNED LET (one extra map after the
   last step); ``return_pre_step_map=True`` gives theirs, the map from before the last step.

Everything (forward, K masks, the steps in ``lax.scan``, the final maps) is one ``jit``. The K masks
are one [K, E] parameter (vmapped maps), padded up to a size bucket so that varying K compiles once
per bucket; padded rows get loss weight 0 and the real rows weight 1/K_real (K_real is traced): the
official mean over the real K puts a 1/K factor on every gradient, which Adam removes except inside
eps, so the mean over the real K is what reproduces their numbers.

The dice loss at mask resolution is evaluated on the patch grid by an identity, not an approximation
(in float32 the loss equals theirs to 1e-5 at each of their iterates, tests/test_maskinversion.py):
resize-to-mask (Mh, Mw)
and upsampling (Uh, Uw) are linear with rows summing to 1, so with up = Uh g Uw^T,
lo/hi = min/max(up), C = M U:  E_m = (Ch g Cw^T - lo) / (hi - lo), hence
sum E_m m = (<g, Ch^T m Cw> - lo sum m)/(hi - lo) and sum E_m = (<g, Ch^T 1 1^T Cw> - lo Hm Wm)/(hi - lo).
The mask is projected to the grid once; each step touches only the grid and the g*ps map (for min/max).

Two modes give the same LETs (docs/maskinversion.md):

* ``'exact'``: the LeGrad gradient is ``jax.vjp`` of the block tail (``legrad.feature_of_attn``, built
  from the functional ViT block pieces of trace_jax/models/blocks.py)
  and the loss is differentiated through it (second order through the vjp; JAX transposes the
  linear backward, so a step costs about two block backwards per mask).
* ``'decomposed'`` (paper §3.3, Eq. 6): what does not depend on the LET is computed once per image.
  The full Jacobian dz/dA (D h N^2 floats: 15 GB at 448 px on ViT-B/16) is never formed. A enters
  block l only through o = A v (o[i,h,e] = sum_j A[h,i,j] v[j,h,e]), so with
  gO[d,i,h,e] = dz_d/do[i,h,e] (D N W floats, one chunked jacrev, 1.2 GB at 448 px):
      G(q)[h,i,j] = sum_e R[i,h,e] v[j,h,e],   R = sum_d q_d gO[d]   (= q . dz/dA, exact).
  Per mask and step that is a [K, D] x [D, N W] GEMM plus a [N, N] product per head.
* ``'auto'``: decomposed if gO fits in a fraction of the device memory and the masks x steps are
  enough to amortise the D backwards of the precompute; else exact.

SigLIP towers (trace_jax/models/siglip.py): maskinversion-torch 1.1 calls ``compute_legrad`` with the
LETs, which dispatches to ``compute_legrad_siglip`` (apply_correction=True) on open_clip's timm SigLIP,
so E is LeGrad-SigLIP (trace_jax/attribution/legrad_siglip.py): z_l = normalize(MAP head(x_l)) of each
hooked block's output, G = q . dz_l/dA_pool (the MAP head's probabilities [h, 1, N]), mean_h relu(G)
summed over the layers, the cells where the empty prompt's ('a photo of a') min-maxed map exceeds 0.8
zeroed (``empty_ids`` / ``empty_query``, or ``correction=False``; LET-independent, so computed once per
image), then min-max BEFORE the x patch upsampling. The dice identity holds with lo / hi of the grid
instead of the upsampled map. z0 is the MAP-pooled embedding (no class token). 'exact': a vjp of the MAP
head per layer (the probe's row only: far cheaper than a ViT block tail); 'decomposed': J_l = dz_l/dA_pool
[E, h, N] by one jacrev per image (E h N floats: 1.8 M at B/16, 224 px), G = J_l . q per step.
Theirs scores ``sum(LETs @ pooled.T)`` over all K masks, so with K > 1 masks every mask gets the map of
the summed LETs; here each mask has its own map, equal to theirs run with that one mask
(tests/test_siglip_maskinversion.py).
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from trace_jax.attribution import legrad as lg
from trace_jax.attribution.m2ib import ADAM_B1, ADAM_B2, ADAM_EPS, adam_tables
from trace_jax.boxes import boxes_to_masks
from trace_jax.attribution import legrad_siglip as lgs
from trace_jax.models import build, l2_normalize, siglip
from trace_jax.models.blocks import attend, pooled_from_o, require_vit, values
from trace_jax.ops import minmax
from trace_jax.placement import put, resolve_devices
from trace_jax.resize import torch_bilinear_matrix

DEFAULT_LAYER_INDEX = -1  # MaskInversion.__init__(layer_index=-1): last block only
DEFAULT_LR = 0.1          # code default; the upstream README / examples use 0.5
DEFAULT_STEPS = 10
MODES = ("auto", "exact", "decomposed")


# ----------------------------------------------------------------------------- resize operators

def _operators(grid_hw, ps, mask_hw):
  """Upsampling U [g*ps, g] and composite grid->mask C = M U [Hm, g] per axis (float32 numpy);
  torch bilinear without antialias, as the official code resizes (trace_jax/resize.py)."""
  (gh, gw), (hm, wm) = grid_hw, mask_hw
  uh, uw = torch_bilinear_matrix(gh, gh * ps), torch_bilinear_matrix(gw, gw * ps)
  mh, mw = torch_bilinear_matrix(gh * ps, hm), torch_bilinear_matrix(gw * ps, wm)
  return uh, uw, mh @ uh, mw @ uw


def project_masks(masks, ch, cw):
  """masks [K, Hm, Wm] -> (m_grid [K, gh, gw] = Ch^T m Cw, sum m [K])."""
  m_grid = jnp.einsum("ag,kab,bh->kgh", ch, masks, cw, precision=jax.lax.Precision.HIGHEST)
  return m_grid, jnp.sum(masks, axis=(-2, -1))


def dice_from_grid(grid, m_grid, m_sum, uh, uw, one_grid, npix, minmax_on_grid: bool = False):
  """Their ``batched_dice_loss`` for one mask, evaluated on the grid (module docstring).

  grid [gh, gw] raw LeGrad relevance; returns (dice, lo, rng) with lo/rng of the min-max, taken over
  the upsampled map (CLIP's LeGrad) or, ``minmax_on_grid``, over the grid itself (LeGrad-SigLIP
  min-maxes before upsampling; the resize rows still sum to 1, so the same identity holds).
  """
  up = grid if minmax_on_grid else uh @ grid @ uw.T  # the map LeGrad min-maxes
  lo, hi = jnp.min(up), jnp.max(up)
  rng = hi - lo
  ok = rng > 0  # a constant map is 0 after our guarded min-max (theirs: NaN)
  inv = jnp.where(ok, 1.0 / jnp.where(ok, rng, 1.0), 0.0)
  inter = (jnp.sum(grid * m_grid) - lo * m_sum) * inv
  esum = (jnp.sum(grid * one_grid) - lo * npix) * inv
  dice = 1.0 - (2.0 * inter + 1.0) / (esum + m_sum + 1.0)
  return dice, lo, rng


def grid_to_mask_map(grid, lo, rng, ch, cw):
  """Final map at mask size: minmax(up_ps(grid)) resized to [Hm, Wm] (= Ch g Cw^T, min-maxed)."""
  m = (ch @ grid @ cw.T - lo)
  ok = rng > 0
  return jnp.where(ok, m / jnp.where(ok, rng, 1.0), 0.0)


# ----------------------------------------------------------------------------- LeGrad per query

def exact_grid_fn(model, params, state, layer_ids, grid_hw):
  """q [E] -> raw LeGrad grid [gh, gw] via vjp of each block tail (residuals shared by all q)."""
  vp = params["visual"]
  vjps = []
  for l in layer_ids:
    x_prev, attn = state[l]
    _, vjp = jax.vjp(functools.partial(lg.feature_of_attn, vp, l, model.cfg.act, x_prev), attn)
    vjps.append(vjp)

  def grid_fn(q):
    return sum(lg.relevance(vjp(q)[0]) for vjp in vjps).reshape(grid_hw)
  return grid_fn


def _siglip_relevance(g):
  """LeGrad-SigLIP relevance of G [h, 1, N]: mean over heads of relu(G), the probe's row [N]."""
  return jnp.mean(jax.nn.relu(g), axis=0)[0]


def siglip_prepare(model, params, image, layer_ids, mode, pos_interp, empty, correction, threshold):
  """One image forward of a SigLIP tower: {'z0' [E], 'parts' per layer (exact: x_l [N, W];
  decomposed: J_l [h, N, E]), 'keep' [gh, gw] (0 where the empty-prompt correction zeroes)}."""
  cfg = model.cfg
  ps = cfg.vision.patch_size
  grid_hw = (image.shape[-3] // ps, image.shape[-2] // ps)
  emb, aux = model.apply({"params": params}, image, method="encode_image", pos_interp=pos_interp)
  xs = tuple(aux["blocks"][l]["tokens"].astype(jnp.float32) for l in layer_ids)
  if mode == "exact":
    parts = xs
  elif mode == "decomposed":
    zeros = jnp.zeros((cfg.vision.heads, 1, grid_hw[0] * grid_hw[1]), jnp.float32)
    jac = lambda x: jax.jacrev(functools.partial(lgs.layer_feature_of_attn, cfg, params, x))(zeros)
    parts = tuple(jnp.moveaxis(jac(x)[:, :, 0], 0, -1) for x in xs)  # [E, h, 1, N] -> [h, N, E]
  else:
    raise ValueError(f"mode must be 'exact' or 'decomposed' here; got {mode!r}")
  keep = jnp.ones(grid_hw, jnp.float32)
  if correction:  # the empty prompt's map, LET-independent: once per image (legrad_siglip.finish)
    raw_empty = _siglip_relevance_fn(cfg, params, parts, grid_hw, mode)(empty).reshape(grid_hw)
    keep = jnp.where(minmax(raw_empty) > threshold, 0.0, 1.0)
  return {"z0": emb.astype(jnp.float32), "parts": parts, "keep": keep}


def _siglip_relevance_fn(cfg, params, parts, grid_hw, mode):
  """q [E] -> summed LeGrad-SigLIP relevance [N] over the layers of ``parts`` (siglip_prepare)."""
  if mode == "exact":  # one vjp of the MAP head per layer, linearised once per image
    zeros = jnp.zeros((cfg.vision.heads, 1, grid_hw[0] * grid_hw[1]), jnp.float32)
    vjps = [jax.vjp(functools.partial(lgs.layer_feature_of_attn, cfg, params, x), zeros)[1] for x in parts]
    return lambda q: sum(_siglip_relevance(vjp(q)[0]) for vjp in vjps)
  if mode == "decomposed":
    return lambda q: sum(jnp.mean(jax.nn.relu(j @ q), axis=0) for j in parts)
  raise ValueError(f"mode must be 'exact' or 'decomposed' here; got {mode!r}")


def siglip_grid_fn(model, params, prepared, grid_hw, mode):
  """q [E] -> corrected raw LeGrad-SigLIP grid [gh, gw] (before its min-max)."""
  rel = _siglip_relevance_fn(model.cfg, params, prepared["parts"], grid_hw, mode)
  return lambda q: rel(q).reshape(grid_hw) * prepared["keep"]


def jacobian_chunk(d: int, n: int, width: int, mlp: int, budget_bytes: float | None = None) -> int:
  """How many of the D rows of gO one vmapped backward computes at once (transient memory).

  Default budget: 128 MiB of transients on CPU, where chunks that stay near the caches ran fastest
  (ViT-B/16 at 224 px: 20 rows per chunk 3.9 s against 4.9 s for 80), 1 GiB on accelerators,
  which want large batches.
  """
  if budget_bytes is None:
    budget_bytes = 2 ** 27 if jax.default_backend() == "cpu" else 2 ** 30
  per_row = 4 * n * (2 * mlp + 3 * width)
  return int(max(1, min(d, budget_bytes // max(per_row, 1))))


def decomposed_parts(model, params, state, layer_ids, chunk: int | None = None):
  """The LET-independent part of the decomposition, per layer: (gO^T [N h e, D], v [N, h, e]).

  Computed once per image (module docstring); :func:`invert` reuses it across all mask chunks."""
  vp = params["visual"]
  act, d = model.cfg.act, model.cfg.embed_dim
  width = model.cfg.vision.width
  mlp = int(width * model.cfg.vision.mlp_ratio)
  parts = []
  for l in layer_ids:
    bp = vp["transformer"][f"block_{l}"]
    x_prev, attn = state[l]
    v = values(bp, x_prev)                       # [N, h, e]
    o = attend(attn, v)                          # [N, h, e]
    f = lambda o_, bp=bp, x_prev=x_prev: lg.layer_feature(vp, pooled_from_o(bp, x_prev, o_, act))
    _, vjp = jax.vjp(f, o)
    c = chunk or jacobian_chunk(d, o.shape[0], width, mlp)
    g_o = jax.lax.map(lambda e: vjp(e)[0], jnp.eye(d, dtype=jnp.float32), batch_size=c)  # [D, N, h, e]
    # Stored D-last, [N h e, D]: the step's two contractions, r = gO q and its transpose
    # dq = gO^T dr, are then both plain GEMMs over a contiguous axis. With D first, XLA:CPU ran
    # the transposed one ~4x slower than reading gO once (measured at ViT-B/16, 224 px).
    parts.append((g_o.reshape(d, -1).T, v))
  return tuple(parts)


def grid_fn_from_parts(parts, grid_hw):
  """q [E] -> raw LeGrad grid [gh, gw] from :func:`decomposed_parts`."""
  def grid_fn(q):
    total = 0.0
    for g_t, v in parts:
      r = (g_t @ q).reshape(v.shape)             # [N, h, e]
      g = jnp.einsum("ihe,jhe->hij", r, v)       # [h, N, N] = q . dz/dA
      total = total + lg.relevance(g)
    return total.reshape(grid_hw)
  return grid_fn


def decomposed_grid_fn(model, params, state, layer_ids, grid_hw, chunk: int | None = None):
  """q [E] -> raw LeGrad grid [gh, gw] from the precomputed gO = dz/do (module docstring)."""
  return grid_fn_from_parts(decomposed_parts(model, params, state, layer_ids, chunk), grid_hw)


def prepare(model, params, image, *, layer_ids, mode, pos_interp="antialias", chunk=None, empty=None,
            correction: bool = False, threshold: float = lgs.CORRECTION_THRESHOLD):
  """Everything of one image that no mask changes: ONE image forward, and in decomposed mode gO.

  image [H, W, 3] -> {'z0': [E] float32, 'parts': per layer in ``layer_ids``: exact ->
  (x_prev [N, W], attn [h, N, N]); decomposed -> (gO^T [N h e, D], v [N, h, e])}. A pytree of
  arrays, so it is computed by one jitted call and handed to every mask chunk's call
  (:func:`invert_prepared`) instead of being recomputed per chunk. SigLIP: :func:`siglip_prepare`
  (``empty`` [E] the normalised empty-prompt embedding, used when ``correction``).
  """
  if siglip.is_siglip(model.cfg):
    return siglip_prepare(model, params, image, layer_ids, mode, pos_interp, empty, correction, threshold)
  z0, state = lg.image_state(model, params, image, layer_ids, pos_interp)
  if mode == "exact":
    parts = tuple(state[l] for l in layer_ids)
  elif mode == "decomposed":
    parts = decomposed_parts(model, params, state, layer_ids, chunk)
  else:
    raise ValueError(f"mode must be 'exact' or 'decomposed' here; got {mode!r}")
  return {"z0": z0.astype(jnp.float32), "parts": parts}


def grid_fn_of(model, params, prepared, layer_ids, grid_hw, mode):
  """q [E] -> raw LeGrad grid from :func:`prepare`'s output. Exact mode re-linearises the block
  tails (a block-tail forward per call, never the image forward) from the stored (x_prev, attn)."""
  if siglip.is_siglip(model.cfg):
    return siglip_grid_fn(model, params, prepared, grid_hw, mode)
  if mode == "exact":
    return exact_grid_fn(model, params, dict(zip(layer_ids, prepared["parts"])), layer_ids, grid_hw)
  if mode == "decomposed":
    return grid_fn_from_parts(prepared["parts"], grid_hw)
  raise ValueError(f"mode must be 'exact' or 'decomposed' here; got {mode!r}")


# ----------------------------------------------------------------------------- the optimisation

def objective(model, params, image, masks, weights, alpha, *, layer_ids, mode,
              pos_interp="antialias", chunk=None, empty=None, correction=False,
              threshold=lgs.CORRECTION_THRESHOLD):
  """The per-image MaskInversion loss (one forward; mode-specific LeGrad gradient).

  Returns (loss_fn, per_mask, z0, (ch, cw), (m_grid, m_sum)): ``loss_fn(lets [K, E]) -> (loss,
  (dice_mean, reg_mean, dice [K], (grid, lo, rng)))``; ``per_mask(let, m_grid_k, m_sum_k)``.
  """
  ps = model.cfg.vision.patch_size
  grid_hw = (image.shape[-3] // ps, image.shape[-2] // ps)
  prepared = prepare(model, params, image, layer_ids=layer_ids, mode=mode, pos_interp=pos_interp,
                     chunk=chunk, empty=empty, correction=correction, threshold=threshold)
  return objective_prepared(model, params, prepared, masks, weights, alpha, layer_ids=layer_ids,
                            mode=mode, grid_hw=grid_hw)


def objective_prepared(model, params, prepared, masks, weights, alpha, *, layer_ids, mode, grid_hw):
  """:func:`objective` from a :func:`prepare`d image (grid_hw = (H, W) // patch, static)."""
  ps = model.cfg.vision.patch_size
  mask_hw = masks.shape[-2:]
  uh, uw, ch, cw = (jnp.asarray(a, jnp.float32) for a in _operators(grid_hw, ps, mask_hw))
  one_grid = jnp.outer(ch.sum(0), cw.sum(0))
  npix = float(mask_hw[0] * mask_hw[1])
  m_grid, m_sum = project_masks(masks, ch, cw)

  z0 = prepared["z0"]
  grid_fn = grid_fn_of(model, params, prepared, layer_ids, grid_hw, mode)
  z0n = l2_normalize(z0)
  on_grid = siglip.is_siglip(model.cfg)       # LeGrad-SigLIP min-maxes before upsampling

  def per_mask(let, mg, ms):
    q = l2_normalize(let)                     # F.normalize(mask_emb)
    grid = grid_fn(q)
    dice, lo, rng = dice_from_grid(grid, mg, ms, uh, uw, one_grid, npix, on_grid)
    reg = 1.0 - jnp.sum(z0n * q)               # 1 - cos(z0, LET)
    return dice, reg, (grid, lo, rng)

  def loss_fn(lets):
    dice, reg, aux = jax.vmap(per_mask)(lets, m_grid, m_sum)
    d, r = jnp.sum(weights * dice), jnp.sum(weights * reg)
    return d + alpha * r, (d, r, dice, aux)

  return loss_fn, per_mask, z0, (ch, cw), (m_grid, m_sum)


def adamw_schedule(lr: float, wd: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """torch AdamW's per-step scalars, in float64 like torch's Python floats, then float32 as torch casts
  them for a float32 parameter: (step sizes lr / (1 - b1^t) [steps], decay factor 1 - lr wd [])."""
  t = np.arange(1, int(steps) + 1, dtype=np.float64)
  return (np.asarray(float(lr) / (1.0 - ADAM_B1 ** t), np.float32),
          np.asarray(1.0 - float(lr) * float(wd), np.float32))


def torch_adamw_step(p, m, v, g, step_size, decay, bc2_sqrt):
  """One ``torch.optim.AdamW`` step (single-tensor path, amsgrad off), same op order and scalars:
  ``p.mul_(decay)``; ``m.lerp_(g, 1 - b1)``; ``v.mul_(b2).addcmul_(g, g, 1 - b2)``;
  ``denom = v.sqrt() / bc2_sqrt + eps``; ``p.addcdiv_(m, denom, value=-step_size)``. Equal to torch's
  step to about 1 ulp, not bit for bit: XLA:CPU divides by a broadcast scalar as a multiplication by
  its reciprocal and fuses multiply-adds (tests/test_maskinversion.py::test_adamw_step_matches_torch)."""
  p = p * decay
  m = m + (1.0 - ADAM_B1) * (g - m)
  v = v * ADAM_B2 + (1.0 - ADAM_B2) * g * g
  denom = jnp.sqrt(v) / bc2_sqrt + ADAM_EPS
  return p + (-step_size * m) / denom, m, v


def invert_one(model, params, image, masks, weights, step_sizes, alpha, decay, empty=None, *, layer_ids,
               steps, mode, pos_interp="antialias", chunk=None, correction=False,
               threshold=lgs.CORRECTION_THRESHOLD):
  """MaskInversion of K (padded) masks on one image; pure and jit-able.

  Args:
    image [H, W, 3]; masks [K, Hm, Wm] in [0, 1]; weights [K] loss weight per mask (1/K_real for
    real masks, 0 for padding); step_sizes [steps], decay [] from ``adamw_schedule(lr, wd, steps)``
    and alpha [] (all traced: no recompilation per lr / wd / alpha). SigLIP: ``empty`` [E] the
    normalised empty-prompt embedding of the correction (``correction``, ``threshold``).
  Returns dict: lets [K, E] (un-normalised), z0 [E], grid [K, gh, gw] / map [K, Hm, Wm] of the
    returned LETs, pre_grid / pre_map of the LETs before the last step (theirs), losses [steps]
    (total), dice [steps] and reg [steps] (weighted means), dice0 [K] / dice_final [K] per mask.
  """
  ps = model.cfg.vision.patch_size
  grid_hw = (image.shape[-3] // ps, image.shape[-2] // ps)
  prepared = prepare(model, params, image, layer_ids=layer_ids, mode=mode, pos_interp=pos_interp,
                     chunk=chunk, empty=empty, correction=correction, threshold=threshold)
  return invert_prepared(model, params, prepared, masks, weights, step_sizes, alpha, decay,
                         layer_ids=layer_ids, steps=steps, mode=mode, grid_hw=grid_hw)


def invert_prepared(model, params, prepared, masks, weights, step_sizes, alpha, decay, *, layer_ids,
                    steps, mode, grid_hw):
  """:func:`invert_one` from a :func:`prepare`d image: the optimisation of one chunk of masks.

  The K masks only interact through the weighted sum of their losses, whose gradient w.r.t. LET_k
  is w_k times mask k's own: chunks of an image's masks with the weights of the whole set (1/K
  over ALL its masks) give the LETs of the all-at-once call, and the chunks' ``losses`` / ``dice``
  / ``reg`` add up to its totals (:func:`invert`).
  """
  loss_fn, per_mask, z0, (ch, cw), (m_grid, m_sum) = objective_prepared(
      model, params, prepared, masks, weights, alpha, layer_ids=layer_ids, mode=mode, grid_hw=grid_hw)

  lets0 = jnp.broadcast_to(z0, (masks.shape[0], z0.shape[-1]))
  # torch.optim.AdamW (single-tensor path): decoupled decay first, then the Adam step with torch's
  # float64 bias corrections (notes/legrad-maskinversion.md, MaskInversion step 3; docs/maskinversion.md).
  bc2_sqrt = jnp.asarray(adam_tables(steps)[1])  # sqrt(1 - b2^t), float64-exact (as M2IB)

  def step(carry, per_step):
    lets, m, v, _ = carry
    (loss, (d, r, _, _)), g = jax.value_and_grad(loss_fn, has_aux=True)(lets)
    new, m, v = torch_adamw_step(lets, m, v, g, per_step[0], decay, per_step[1])
    return (new, m, v, lets), (loss, d, r)

  zeros = jnp.zeros_like(lets0)
  (lets, _, _, prev), (losses, dices, regs) = jax.lax.scan(
      step, (lets0, zeros, zeros, lets0), (step_sizes, bc2_sqrt), length=steps)

  # Maps of the returned LETs, of the LETs before the last step (theirs) and of z0, in one pass.
  k = masks.shape[0]
  tile = lambda a: jnp.concatenate([a, a, a])
  dice, _, (grid, lo, rng) = jax.vmap(per_mask)(jnp.concatenate([lets, prev, lets0]), tile(m_grid),
                                                tile(m_sum))
  m = jax.vmap(grid_to_mask_map, in_axes=(0, 0, 0, None, None))(grid[:2 * k], lo[:2 * k],
                                                                  rng[:2 * k], ch, cw)
  return {"lets": lets, "z0": z0, "grid": grid[:k], "map": m[:k], "pre_grid": grid[k:2 * k],
          "pre_map": m[k:], "losses": losses, "dice": dices, "reg": regs, "dice0": dice[2 * k:],
          "dice_final": dice[:k]}


def hyper_args(lr: float, alpha: float, wd: float, steps: int) -> list:
  """The traced hyper-parameters of the compiled program: [step sizes [steps], alpha, decay]."""
  step_sizes, decay = adamw_schedule(lr, wd, steps)
  return [jnp.asarray(step_sizes), jnp.float32(alpha), jnp.asarray(decay)]


@functools.lru_cache(maxsize=64)
def _compiled(cfg, layer_ids, steps, mode, pos_interp, chunk, correction=False,
              threshold=lgs.CORRECTION_THRESHOLD):
  model = build(cfg)

  def one(params, image, masks, weights, step_sizes, alpha, decay, empty):
    return invert_one(model, params, image, masks, weights, step_sizes, alpha, decay, empty,
                      layer_ids=layer_ids, steps=steps, mode=mode, pos_interp=pos_interp, chunk=chunk,
                      correction=correction, threshold=threshold)

  # (params, images, masks, weights, step_sizes, alpha, decay, empty): ``empty`` [E] is SigLIP's
  # empty-prompt embedding (zeros, unused, without the correction). The jitted function itself is
  # returned so that its compilation cache and ``lower`` (trace-jax plan) are the program invert runs.
  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, None, None, None, None)))


@functools.lru_cache(maxsize=64)
def _compiled_prepare(cfg, layer_ids, mode, pos_interp, chunk, correction=False,
                      threshold=lgs.CORRECTION_THRESHOLD):
  """jit(prepare): one image [H, W, 3] -> its prepared state (computed once, reused by every chunk)."""
  model = build(cfg)
  return jax.jit(lambda params, image, empty: prepare(
      model, params, image, layer_ids=layer_ids, mode=mode, pos_interp=pos_interp, chunk=chunk,
      empty=empty, correction=correction, threshold=threshold))


@functools.lru_cache(maxsize=64)
def _compiled_chunk(cfg, layer_ids, steps, mode, grid_hw):
  """jit(invert_prepared): one chunk of masks of a prepared image (same chunk shape: one program).
  Masks split over devices stay split: XLA propagates their sharding to the per-mask work
  (tests/test_dataset_inference.py compares the compiled per-device sizes)."""
  model = build(cfg)

  def one(params, prepared, masks, weights, step_sizes, alpha, decay):
    return invert_prepared(model, params, prepared, masks, weights, step_sizes, alpha, decay,
                           layer_ids=layer_ids, steps=steps, mode=mode, grid_hw=grid_hw)
  return jax.jit(one)


# ----------------------------------------------------------------------------- inputs, buckets

def bucket_size(k: int) -> int:
  """Padded mask count: exact up to 4, then 4 buckets per octave (5, 6, 7, 8, 10, 12, 14, 16, 20, ...),
  so padding stays under 25 % (padded masks cost as much as real ones) and K up to 128 compiles
  at most 24 programs."""
  if k <= 4:
    return max(k, 1)
  step = 1 << (int(math.floor(math.log2(k))) - 2)
  return -(-k // step) * step


def rasterize_boxes(boxes, hw: tuple[int, int]) -> np.ndarray:
  """Boxes [K, 4] (x0, y0, x1, y1) in pixels of an [H, W] frame -> binary masks [K, H, W] float32:
  a pixel is inside when its centre (c + 0.5, r + 0.5) lies in [x0, x1) x [y0, y1)."""
  b = np.asarray(boxes, np.float64)
  if b.ndim == 1:
    b = b[None]
  if b.ndim != 2 or b.shape[-1] != 4:
    raise ValueError(f"boxes must be [K, 4] (x0, y0, x1, y1); got shape {b.shape}")
  # Pixel-centre rule: ours. maskinversion-torch takes masks only (notes/legrad-maskinversion.md,
  # MaskInversion step 6); AMC's int() slices are the other rule (trace_jax/boxes.py).
  return boxes_to_masks(b, hw, rule="centre").astype(np.float32)


def check_masks(masks, index: int = 0) -> np.ndarray:
  """One image's masks -> float32 [K, Hm, Wm]; ValueError naming the problem."""
  m = np.asarray(masks)
  if m.dtype == bool:
    m = m.astype(np.float32)
  if m.ndim == 2:
    m = m[None]
  if m.ndim != 3:
    raise ValueError(f"masks of image {index} must be [K, H, W] (or one [H, W] mask); got rank "
                     f"{m.ndim} with shape {m.shape}")
  if m.shape[0] == 0:
    raise ValueError(f"image {index} has no masks")
  m = m.astype(np.float32)
  if not np.all(np.isfinite(m)):
    raise ValueError(f"masks of image {index} contain NaN or inf")
  if m.min() < 0 or m.max() > 1:
    raise ValueError(f"masks of image {index} must lie in [0, 1] (binary or soft); got range "
                     f"[{m.min():g}, {m.max():g}] (divide 0-255 masks by 255)")
  empty = np.flatnonzero(m.reshape(m.shape[0], -1).sum(-1) <= 0)
  if empty.size:
    raise ValueError(f"mask(s) {empty.tolist()} of image {index} are empty (all zero)")
  return m


def memory_budget() -> float:
  """Bytes one call may take (the decomposed Jacobians, the per-mask maps): half of the device's
  free memory (available RAM on CPU)."""
  dev = jax.devices()[0]
  try:
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
      return 0.5 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  except Exception:  # CPU backends may not implement memory_stats
    pass
  try:
    return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 4e9


def choose_mode(cfg, image_hw, num_masks: int, steps: int, num_layers: int,
                budget: float | None = None) -> str:
  """'decomposed' when gO (D N W floats per layer) fits the budget and K * steps is large enough
  to amortise its D-row precompute, else 'exact' (docs/maskinversion.md, "Choosing the mode")."""
  ps = cfg.vision.patch_size
  n = (image_hw[0] // ps) * (image_hw[1] // ps) + 1
  w, d = cfg.vision.width, cfg.embed_dim
  mlp = int(w * cfg.vision.mlp_ratio)
  if siglip.is_siglip(cfg):
    # MAP head only (one query row): a vjp ~ N W (the values) + W^2 + 2 W mlp; J is D h N floats.
    n, h = n - 1, cfg.vision.heads
    head = n * w + w * w + 2.0 * w * mlp
    if 4.0 * num_layers * d * h * n > (memory_budget() if budget is None else budget):
      return "exact"
    return "decomposed" if d * head + num_masks * steps * 2.0 * d * h * n <= num_masks * steps * 2.0 * head \
        else "exact"
  jac_bytes = 4.0 * num_layers * d * n * w
  budget = memory_budget() if budget is None else budget
  if jac_bytes > budget:
    return "exact"
  # Work per (mask, step): exact ~ 2 backwards through the block (~2 N W (mlp + w) MACs + N^2 W);
  # decomposed ~ 2 (D N W + N^2 W); precompute D backwards (D N W (mlp + w)).
  exact = 2.0 * n * w * (mlp + w) + 2.0 * n * n * w
  dec = 2.0 * (d * n * w + n * n * w)
  pre = d * n * w * (mlp + w)
  return "decomposed" if pre + num_masks * steps * dec <= num_masks * steps * exact else "exact"


def image_bytes(cfg, image_hw, num_masks: int, num_layers: int, mode: str) -> float:
  """Rough peak float32 bytes one image of a vmapped call holds: the decomposition's gO (D N W per
  layer, twice: it is transposed once) plus, per mask, the step's [heads, N, N] gradient map (value, ReLU mask, cotangent) and
  the block-tail backward's [N, mlp + W] transients."""
  ps = cfg.vision.patch_size
  n = (image_hw[0] // ps) * (image_hw[1] // ps) + 1
  w, d, h = cfg.vision.width, cfg.embed_dim, cfg.vision.heads
  mlp = int(w * cfg.vision.mlp_ratio)
  fixed = 4.0 * num_layers * (h * n * n + 3 * n * (mlp + w))
  if mode == "decomposed":  # gO, and its D-last copy while that is made
    fixed += 2 * 4.0 * num_layers * d * n * w
  per_mask = 4.0 * num_layers * (3 * h * n * n + 3 * n * (mlp + w))
  return fixed + num_masks * per_mask


# Peak memory of a call per byte of :func:`image_bytes`' estimate (XLA's buffers), by backend. On
# XLA:CPU the measured peak RSS of a call is ~1.7-2.5x the estimate per mask (tiny model at 128 px:
# ~10 MB per mask against 4.2 MB estimated; ViT-B/16 at 224 px, benchmarks/RESULTS.md: ~25 MB
# against 14.7 MB), and compiling a larger program takes memory too (~75 MB more for the tiny
# model): 4x keeps a run under its budget (tests/test_dataset_processes.py measures the RSS).
# Accelerators: 1 until benchmarks/device.sh measures otherwise.
RUNTIME_OVERHEAD = {"cpu": 4.0}


def runtime_overhead(backend: str | None = None) -> float:
  """Peak bytes per estimated byte on ``backend`` (default jax's): see ``RUNTIME_OVERHEAD``."""
  return RUNTIME_OVERHEAD.get(backend or jax.default_backend(), 1.0)


def _estimate_budget(budget, overhead) -> float:
  """The bytes :func:`image_bytes` may reach for a peak of ``budget`` (default half the free memory)."""
  budget = memory_budget() if budget is None else float(budget)
  return budget / (runtime_overhead() if overhead is None else float(overhead))


def images_per_call(cfg, image_hw, num_masks: int, num_layers: int, mode: str,
                    budget: float | None = None, overhead: float | None = None) -> int:
  """How many images one vmapped call takes so that their peak (``overhead`` x :func:`image_bytes`,
  default the backend's :func:`runtime_overhead`) fits the budget (default half the free device
  memory): many images never hold all their Jacobians at once."""
  budget = _estimate_budget(budget, overhead)
  return max(1, int(budget // image_bytes(cfg, image_hw, num_masks, num_layers, mode)))


def masks_per_call(cfg, image_hw, num_layers: int, mode: str, budget: float | None = None,
                   overhead: float | None = None) -> int:
  """How many masks of ONE image a call may take so that its peak (``overhead`` x :func:`image_bytes`)
  fits ``budget`` (default half the free device memory): the image's fixed part (forward, gO) once,
  then each mask's share."""
  budget = _estimate_budget(budget, overhead)
  fixed = image_bytes(cfg, image_hw, 0, num_layers, mode)
  per_mask = image_bytes(cfg, image_hw, 1, num_layers, mode) - fixed
  return max(1, int((budget - fixed) // per_mask))


def plan(cfg, image_hw, num_masks: int, num_layers: int, mode: str, budget: float | None = None,
         num_devices: int = 1, max_masks_per_call: int | None = None,
         overhead: float | None = None) -> dict:
  """How :func:`invert` splits ONE image's ``num_masks`` masks into calls.

  Each device holds the image's prepared state (replicated) and its share of the call's masks, so a
  call takes ``masks_per_call`` (per device, by the budget) x ``num_devices`` masks. All masks fit:
  one call of ``bucket_size(K)`` masks (rounded up to the device count). Else calls of
  ``chunk = bucket_size(ceil(K / calls))`` masks (capped by the budget): few distinct shapes (one
  compilation per bucket) and under 25 % padding in the last call.
  ``budget`` bounds the predicted PEAK: ``overhead`` (default the backend's :func:`runtime_overhead`)
  x :func:`image_bytes`.
  Returns {'chunked', 'calls', 'chunk' (masks per call, padding included), 'bytes_per_device'
  (the predicted peak of one device's share), 'budget'}.
  """
  budget = memory_budget() if budget is None else float(budget)
  overhead = runtime_overhead() if overhead is None else float(overhead)
  nd = max(1, int(num_devices))
  cap = masks_per_call(cfg, image_hw, num_layers, mode, budget, overhead) * nd
  if max_masks_per_call is not None:
    if max_masks_per_call < 1:
      raise ValueError(f"max_masks_per_call must be >= 1; got {max_masks_per_call}")
    cap = min(cap, int(max_masks_per_call))
  up = lambda k: -(-k // nd) * nd        # a multiple of the device count (masks on the data axis)
  cap = max(nd, cap - cap % nd)
  whole = up(bucket_size(num_masks))
  if whole <= cap:
    calls, chunk = 1, whole
  else:
    calls = -(-num_masks // cap)
    chunk = min(cap, up(bucket_size(-(-num_masks // calls))))
    calls = -(-num_masks // chunk)
  return {"chunked": calls > 1, "calls": calls, "chunk": chunk, "budget": budget,
          "bytes_per_device": overhead * image_bytes(cfg, image_hw, -(-chunk // nd), num_layers, mode)}


# ----------------------------------------------------------------------------- API

def invert(model, params, images, masks=None, *, boxes=None, mask_size=None, mode: str = "auto",
           layers=DEFAULT_LAYER_INDEX, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
           alpha: float = 0.0, wd: float = 0.0, pos_interp: str = "antialias", bucket: bool = True,
           return_pre_step_map: bool = False, chunk: int | None = None,
           max_images_per_call: int | None = None, max_masks_per_call: int | None = None,
           budget: float | None = None, devices=None, correction: bool = True, empty_ids=None,
           empty_query=None, threshold: float = lgs.CORRECTION_THRESHOLD):
  """MaskInversion: one localized embedding token (LET) per mask. Needs a ViT image tower (LeGrad's
  block recompute, trace_jax/models/blocks.py) or a SigLIP one (LeGrad-SigLIP, module docstring);
  other towers are refused with a ValueError naming them.

  Args:
    images: [B, H, W, 3] (NHWC, normalised) or one [H, W, 3] image (H, W multiples of the patch;
      e.g. 448 px on a 224 model: position embeddings are resampled as theirs).
    masks: one image: [K, Hm, Wm] or [Hm, Wm]; B images: a sequence of B such arrays (K and the
      mask size may differ per image). Binary or soft in [0, 1], any resolution.
    boxes: instead of masks, [K, 4] (x0, y0, x1, y1) per image, rasterised at ``mask_size``
      (default the image size).
    mode: 'exact' | 'decomposed' | 'auto' (same LETs; see the module docstring).
    layers: LeGrad layer_index (-1 = last block, as theirs) or block indices.
    steps, lr, alpha, wd: AdamW steps, learning rate (their default 0.1; README 0.5), weight of
      1 - cos(LET, z0), weight decay.
    bucket: pad K to :func:`bucket_size` (compile once per bucket); False compiles per K.
    return_pre_step_map: the returned map is the one from before the last step (as theirs).
    chunk: rows of the decomposed Jacobian per backward batch (default: sized to a memory budget).
    max_images_per_call: images per vmapped call (default: as many as :func:`images_per_call`
      fits in half the free memory); larger sets run in equal-sized calls (one compilation), the
      last padded with copies of its first image whose results are dropped.
    max_masks_per_call, budget: an image whose masks do not fit one call (by :func:`plan`: the
      ``budget`` in bytes, default half the free device memory, or at most ``max_masks_per_call``)
      runs alone: ONE jitted :func:`prepare` (the image forward, and gO in decomposed mode), then
      its masks in equal-sized chunks that all reuse it, each with the weights of the whole set
      (1/K), so the LETs and maps equal the all-at-once call's and ``losses`` / ``dice`` / ``reg``
      are the sums over the chunks.
    correction, empty_ids, empty_query, threshold: SigLIP only, the authors' empty-prompt correction
      of LeGrad-SigLIP (theirs always applies it): token ids [L] of 'a photo of a' or its embedding
      [E]; ``correction=False`` skips it (attribution/legrad_siglip.py).
    devices: None = one device; 'all' / n / a list: every call is one jit sharded with
      ``NamedSharding`` over a 1-D 'data' mesh of these devices: images on that axis (the calls
      over images), or one image's masks on that axis with its prepared state replicated (the
      chunked calls, and every image of a mask size that has fewer images than devices, e.g. one
      image with many masks); results equal the one-device ones.
  Returns:
    one image: dict with ``lets`` [K, E] (un-normalised, like theirs), ``map`` [K, Hm, Wm] in [0, 1],
    ``grid`` [K, gh, gw] raw LeGrad relevance, ``losses`` [steps] (their per-iteration loss),
    ``dice`` / ``reg`` [steps], ``dice0`` / ``dice_final`` [K], ``z0`` [E], ``mode``; several images:
    a list of such dicts.
  """
  require_vit(model.cfg, "MaskInversion", allow=("siglip",))
  is_sig = siglip.is_siglip(model.cfg)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  if (masks is None) == (boxes is None):
    raise ValueError("give exactly one of `masks` or `boxes`")
  ims = np.asarray(images, np.float32) if not isinstance(images, jax.Array) else images
  single = ims.ndim == 3
  if single:
    ims = ims[None]
  if ims.ndim != 4 or ims.shape[-1] != 3:
    raise ValueError(f"images must be NHWC [B, H, W, 3] or one [H, W, 3] image; got shape {tuple(ims.shape)}")
  b = ims.shape[0]
  given = masks if masks is not None else boxes
  if isinstance(given, (list, tuple)):
    per_image = list(given)
  elif b == 1:
    per_image = [given]
  else:
    arr = np.asarray(given)
    per_image = list(arr)  # [B, K, ...]
  as_list = isinstance(given, (list, tuple)) and not single
  if len(per_image) != b:
    raise ValueError(f"got masks for {len(per_image)} images but {b} images")
  if boxes is not None:
    hw = tuple(mask_size) if mask_size is not None else tuple(ims.shape[1:3])
    per_image = [rasterize_boxes(bx, hw) for bx in per_image]
  per_image = [check_masks(m, i) for i, m in enumerate(per_image)]

  cfg = model.cfg
  layer_ids = lg.resolve_layers(layers, cfg.vision.layers)
  kmax = max(m.shape[0] for m in per_image)
  # read once: the free memory changes as calls run, and a budget that moved between images
  # would give them other chunk sizes, i.e. other programs to compile
  budget = memory_budget() if budget is None else float(budget)
  if mode == "auto":
    mode = choose_mode(cfg, ims.shape[1:3], kmax, steps, len(layer_ids), budget)
  correction = bool(correction) and is_sig
  empty = _empty_query(model, params, correction, empty_ids, empty_query)
  fn = _compiled(cfg, layer_ids, int(steps), mode, pos_interp, chunk, correction, float(threshold))
  hyper = hyper_args(lr, alpha, wd, steps)
  devs = resolve_devices(devices)
  nd = len(devs)
  hyper_d = [put(h, devs, False) for h in hyper] + [put(empty, devs, False)]
  params_d = put(params, devs, False)

  def result(r, k):
    res = {"lets": r["lets"][:k], "z0": r["z0"], "losses": r["losses"], "dice": r["dice"],
           "reg": r["reg"], "dice0": r["dice0"][:k], "dice_final": r["dice_final"][:k], "mode": mode}
    if return_pre_step_map:
      res.update(grid=r["pre_grid"][:k], map=r["pre_map"][:k])
    else:
      res.update(grid=r["grid"][:k], map=r["map"][:k])
    return res

  # Images whose masks share a size run in vmapped calls (K padded to a common bucket), as many
  # images per call as fit the memory budget. An image whose masks do not fit one call runs alone,
  # its masks in chunks (plan()).
  groups: dict[tuple[int, int], list[int]] = {}
  for i, m in enumerate(per_image):
    groups.setdefault(m.shape[1:], []).append(i)
  results: list = [None] * b
  for hw, idx in groups.items():
    big = []
    for i in idx:
      pl = plan(cfg, ims.shape[1:3], per_image[i].shape[0], len(layer_ids), mode, budget, nd,
                max_masks_per_call)
      # Fewer images than devices: a call over images would fill the data axis with copies of them
      # (every device repeating one image's work), so each runs alone with ITS MASKS on that axis.
      if pl["chunked"] or len(idx) < nd:
        big.append(i)
        results[i] = result(_invert_chunked(cfg, params_d, ims[i], per_image[i], pl["chunk"],
                                            layer_ids, steps, mode, pos_interp, chunk, hyper_d,
                                            devs, correction, float(threshold)), per_image[i].shape[0])
    idx = [i for i in idx if i not in big]
    if not idx:
      continue
    kpad = max(per_image[i].shape[0] for i in idx)
    kpad = bucket_size(kpad) if bucket else kpad
    per_call = max_images_per_call or images_per_call(cfg, ims.shape[1:3], kpad, len(layer_ids), mode,
                                                      budget) * nd
    per_call = max(1, min(int(per_call), len(idx)))
    per_call = -(-per_call // nd) * nd  # images on the data axis: a multiple of the device count
    for start in range(0, len(idx), per_call):
      part = idx[start:start + per_call]
      rows = part + [part[0]] * (per_call - len(part))  # equal-sized calls: one compilation
      mk = np.ones((per_call, kpad) + hw, np.float32)  # padding masks: valid (non-empty), weight 0
      wt = np.zeros((per_call, kpad), np.float32)
      for j, i in enumerate(part):
        k = per_image[i].shape[0]
        mk[j, :k] = per_image[i]
        wt[j, :k] = 1.0 / k
      out = fn(params_d, put(np.asarray(ims[np.asarray(rows)]), devs, True), put(mk, devs, True),
               put(wt, devs, True), *hyper_d)
      for j, i in enumerate(part):
        results[i] = result({key: val[j] for key, val in out.items()}, per_image[i].shape[0])
  return results if as_list else results[0] if b == 1 else results


def _empty_query(model, params, correction: bool, empty_ids, empty_query) -> jax.Array:
  """The normalised empty-prompt embedding [E] of LeGrad-SigLIP's correction (zeros when unused)."""
  e = model.cfg.embed_dim
  if not correction:
    return jnp.zeros((e,), jnp.float32)
  if empty_query is None and empty_ids is None:
    raise ValueError(f"MaskInversion on SigLIP applies the authors' empty-prompt correction (their "
                     f"compute_legrad_siglip): pass empty_ids (token ids of {lgs.EMPTY_PROMPT!r}) or "
                     f"empty_query, or correction=False")
  return lgs.empty_query_of(model, params, empty_ids=empty_ids, empty_query=empty_query)


def _invert_chunked(cfg, params, image, masks, size, layer_ids, steps, mode, pos_interp, chunk, hyper,
                    devs, correction=False, threshold=lgs.CORRECTION_THRESHOLD):
  """One image's K masks in calls of ``size`` masks, all reusing ONE prepared image state.

  Every chunk carries the weights of the whole set (1/K; padding 0): the LETs equal the all-at-once
  call's (invert_prepared's docstring) and the chunks' per-step losses sum to its losses."""
  ps = cfg.vision.patch_size
  grid_hw = (image.shape[0] // ps, image.shape[1] // ps)
  *hyper, empty = hyper
  prep = _compiled_prepare(cfg, layer_ids, mode, pos_interp, chunk, correction, threshold)(
      params, put(np.asarray(image, np.float32), devs, False), empty)
  run = _compiled_chunk(cfg, layer_ids, int(steps), mode, grid_hw)
  k = masks.shape[0]
  outs = []
  for start in range(0, k, size):
    part = masks[start:start + size]
    n = part.shape[0]
    mk = np.ones((size,) + masks.shape[1:], np.float32)  # padding: valid masks with weight 0
    mk[:n] = part
    wt = np.zeros((size,), np.float32)
    wt[:n] = 1.0 / k
    out = run(params, prep, put(mk, devs, True), put(wt, devs, True), *hyper)
    outs.append({key: np.asarray(val) for key, val in out.items()} | {"_n": n})
  per_mask = ("lets", "grid", "map", "pre_grid", "pre_map", "dice0", "dice_final")
  res = {key: np.concatenate([o[key][:o["_n"]] for o in outs]) for key in per_mask}
  for key in ("losses", "dice", "reg"):  # weighted sums over disjoint mask sets add up
    res[key] = np.sum([o[key] for o in outs], axis=0, dtype=np.float64).astype(np.float32)
  res["z0"] = np.asarray(prep["z0"])
  return res
