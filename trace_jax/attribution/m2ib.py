"""M2IB: multi-modal information bottleneck attribution, as the authors' code behaves.

Wang, Rudner, Wilson, "Visual Explanations of Image-Text Representations via Multi-Modal
Information Bottleneck Attribution", NeurIPS 2023. Every choice below follows the official code
(github.com/YingWANGG/M2IB @ ce4d7a0), as recorded in notes/m2ib.md (cited as "note §n"):

* the bottleneck sits on the OUTPUT of 0-based block ``layer`` (residual stream after it), before
  block ``layer + 1`` (note §1); defaults 9 (vision) / 9 (text);
* one parameter per token x feature, ``alpha [L, D]`` initialised to 5.0, ``lam = sigmoid(alpha)``,
  ``t = lam * x + (1 - lam) * eps`` on every token (CLS / SOT / EOT too) with ``eps ~ N(0, 1)`` drawn
  independently for each of the K = ``samples`` copies and each step (note §3, §5). The official
  ``var`` argument (paper's sigma^2) has no effect, i.e. sigma = 1 (note §2); ``sigma=None`` is that
  behaviour, ``sigma=s`` gives the paper's eq. (5) ``t = lam x + s (1 - lam) eps`` with the capacity
  ``KL(N(lam x, s^2 (1-lam)^2) || N(0, 1))`` (the code's prior; ``s = 1`` equals ``sigma=None``);
* capacity ``-0.5 (1 + log((1-lam)^2) - (lam x)^2 - (1-lam)^2)`` elementwise, compression = its MEAN
  over all K*L*D elements (identical over the K copies, so the mean over L*D) (note §3, §4);
* fit = mean over the K copies of the cosine between the noisy tower's projected embedding and the
  other modality's CLEAN projected embedding (computed once here: it does not change, note §4, §8);
  loss = beta * compression - fit, beta 0.1 (note §4);
* Adam with torch defaults (b1 0.9, b2 0.999, eps 1e-8 added outside the square root, bias-corrected
  moments) with lr 1 on alpha only, ``steps`` = 10 (note §5). ``optax.adam`` has the same formula but
  evaluates ``1 - b**t`` in float32 with b rounded to float32 (1.3e-5 relative error in the second-
  moment correction); torch uses Python floats, so ``adam_step`` below takes float64-exact tables;
* read-out = the capacity of the LAST forward pass, i.e. with alpha after ``steps - 1`` updates; the
  last update is never used (note §6), so it is not computed here. The capacity depends on alpha and
  x only, so no extra forward is needed for it;
* vision map: capacity summed over features, CLS dropped, reshaped to the patch grid (row-major),
  bilinear upsampling (align_corners=False, no antialias) to 224 x 224 (hard-coded in the official
  code; ``out_size`` changes it), min-max AFTER upsampling (note §6);
* text map: capacity summed over features for all tokens (SOT and EOT included), min-max (note §6).
  The official usage feeds UNPADDED ids (note §0, §7). Padded ids with ``lengths`` (default: the pooled
  EOT position + 1) give the unpadded result (to 1e-4 against the unpadded reference run and exact
  zeros at the padded positions, tests/test_m2ib.py): the causal mask keeps padding out of the EOT,
  and padded positions are excluded from the compression mean and the min-max (they read 0).

Differences from the official code, all deliberate and documented:
* the layers before the bottleneck run once (they do not change during the optimisation), and the
  clean embedding of the other modality is computed once, not at every step (note §8);
* ``1 - sigmoid(alpha)`` is computed as ``sigmoid(-alpha)`` and ``log((1-lam)^2)`` as
  ``2 log_sigmoid(-alpha)`` (identical in exact arithmetic; no float32 cancellation for large alpha);
* a constant map (e.g. a text whose bottleneck ends where it started) min-max normalises to zeros
  instead of the official NaN;
* the noise comes from ``jax.random`` (or is replayed from ``image_noise`` / ``text_noise``), so the
  maps equal the official ones only for replayed noise; seed-to-seed spread is large (note §11).

Vision and text attributions are two independent optimisations (note §0); both run in one jit,
batched over image-text pairs with ``vmap``, the steps in ``lax.scan``.

SigLIP towers (trace_jax/models/siglip.py; not in the official code, which is HF-CLIP only): the same
bottleneck on the output of block ``layer``; the tower tail after it is the model's own
(``siglip.image_from_block``: the remaining blocks, ln_post on every token and the MAP head, which
attends over all tokens; ``siglip.text_from_block``: the remaining blocks WITHOUT a causal mask, the
LAST position pooled). There is no class token, so the vision map keeps every token; the text tower is
not causal and pools the last position, so every position of the padded row (the padding is the end
id, part of what the model reads) is a real input: ``lengths`` must be the row length, and the text
map covers the whole row. ``fit``: 'cosine' (default, the official term, for SigLIP too: the
official code fits CLIP's cosine without its temperature, and beta = 0.1 is calibrated to that scale)
or 'logit', the pair's logit ``exp(logit_scale) cos (+ logit_bias)`` (SigLIP's sigmoid logit; CLIP has
no bias), which rescales the fit by exp(t): with Adam that is the cosine fit with beta / exp(t)
(tests/test_siglip_m2ib.py). The reported ``score`` of a SigLIP pair is its sigmoid logit either way
(attribution/api.py).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.models import CLIPConfig, build, siglip
from trace_jax.models.blocks import block_one_query  # noqa: F401  (re-exported: tests/test_m2ib.py)
from trace_jax.models.blocks import require_vit, text_head, tower_row, vision_head
from trace_jax.models.layers import dtype_of
from trace_jax.ops import minmax as _minmax
from trace_jax.resize import upsample_bilinear

DEFAULT_LAYER = 9     # eval.py --vlayer 9 --tlayer 9, paper Table 2 (note §1)
ALPHA_INIT = 5.0      # iba.py initial_value (note §3)
JIT = False           # attribution.api: explain() validates on the host and jits its own core
OFFICIAL_SIZE = 224   # methods.py vision_heatmap: F.interpolate(size=224) (note §6)
COS_EPS = 1e-6        # nn.CosineSimilarity(eps=1e-6) (note §4)
FITS = ("cosine", "logit")


# --------------------------------------------------------------------------------------------
# Small numerical helpers (pure, shape-documented).

# grid -> 224 upsampling is torch bilinear, align_corners=False (notes/m2ib.md §6): trace_jax/resize.py


# (x - min) / (max - min) over ``axis`` (official ``utils.normalize``, note §6), constant -> zeros instead
# of NaN; ``minmax(x, valid)`` restricts min / max to the valid entries, invalid ones read 0
# (trace_jax/ops.py, the guarded form). Default axis -1: rows of flattened grids / tokens.
minmax = functools.partial(_minmax, axis=-1)


def cosine(a: jax.Array, b: jax.Array, eps: float = COS_EPS) -> jax.Array:
  """torch ``nn.CosineSimilarity(eps)`` over the last axis: a.b / (max(|a|, eps) max(|b|, eps))."""
  na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
  return jnp.sum(a * b, axis=-1) / (na * nb)


ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults (note §5)


def adam_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Bias corrections of updates 1..n as torch computes them (Python floats): (1-b1^t, sqrt(1-b2^t))."""
  t = np.arange(1, n + 1, dtype=np.float64)
  return (1.0 - ADAM_B1 ** t).astype(np.float32), np.sqrt(1.0 - ADAM_B2 ** t).astype(np.float32)


def adam_step(p, m, v, g, lr, bc1, bc2_sqrt):
  """One ``torch.optim.Adam`` step (single-tensor path, amsgrad off, no weight decay), same op order."""
  m = m + (1.0 - ADAM_B1) * (g - m)              # exp_avg.lerp_(grad, 1 - beta1)
  v = v * ADAM_B2 + (1.0 - ADAM_B2) * g * g      # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
  denom = jnp.sqrt(v) / bc2_sqrt + ADAM_EPS
  return p - (lr / bc1) * (m / denom), m, v


def capacity(alpha: jax.Array, x: jax.Array, sigma=None) -> jax.Array:
  """Elementwise KL(N(lam x, s^2 (1-lam)^2) || N(0, 1)), lam = sigmoid(alpha); [L, D] -> [L, D].

  ``sigma=None`` (official, note §2-3): s = 1, i.e. ``-0.5 (1 + log((1-lam)^2) - (lam x)^2 - (1-lam)^2)``.
  """
  lam = jax.nn.sigmoid(alpha)
  one_m = jax.nn.sigmoid(-alpha)              # = 1 - lam without cancellation
  log_var = 2.0 * jax.nn.log_sigmoid(-alpha)  # = log((1 - lam)^2)
  var = one_m * one_m
  if sigma is not None:
    log_var = log_var + 2.0 * jnp.log(sigma)
    var = var * sigma * sigma
  return -0.5 * (1.0 + log_var - (lam * x) ** 2 - var)


# --------------------------------------------------------------------------------------------
# Tower suffixes: the blocks after the bottleneck and the head, on K noisy copies.

# The blocks after the bottleneck run as the linen block; the last one only for the pooled row
# (``tower_row`` / ``block_one_query``, the functional block pieces of trace_jax/models/blocks.py).

def _vision_suffix(params, cfg: CLIPConfig, layer: int, t):
  """t [K, N, W] (output of block ``layer``) -> projected CLS embedding [K, E] (un-normalised);
  SigLIP: the MAP-pooled embedding (module docstring)."""
  if siglip.is_siglip(cfg):
    return siglip.image_from_block(params, cfg, layer, t)
  dt = _dtype(cfg)
  cls = tower_row(params["visual"], cfg.vision, cfg.act, dt, layer, t, 0, False)
  return vision_head(params["visual"], cls, dt)


def _text_suffix(params, cfg: CLIPConfig, layer: int, t, eot):
  """t [K, L, W] (output of block ``layer``), eot [] -> projected pooled embedding [K, E];
  SigLIP: the last position, no causal mask (``eot`` is L - 1)."""
  if siglip.is_siglip(cfg):
    return siglip.text_from_block(params, cfg, layer, t)
  dt = _dtype(cfg)
  # ln_final is per token: pool first, then normalise (same numbers as the model's order).
  pooled = tower_row(params["text"], cfg.text, cfg.act, dt, layer, t, eot, True)
  return text_head(params["text"], pooled, dt)


def _dtype(cfg):
  return dtype_of(cfg.dtype)


# --------------------------------------------------------------------------------------------
# One bottleneck optimisation (one pair, one modality); vmapped over pairs by the caller.

def _optimise(x, target, valid, key, noise, *, suffix, beta, lr, sigma, steps, samples, fit=(1.0, 0.0)):
  """Train the bottleneck on x [L, D] against the clean target embedding [E].

  valid [L] bool (padded text positions False). noise: None (drawn from ``key``) or
  [>= steps-1, K, L, D] replayed. ``fit`` (scale, bias): the fit term is ``scale * cos + bias``; (1, 0)
  is the official cosine (exactly: x * 1 + 0 = x), (exp(t), b) the pair's logit. Returns (capacity
  [L, D] of the last forward, losses [steps-1]).
  """
  x = x.astype(jnp.float32)
  L, D = x.shape
  w = valid.astype(jnp.float32)[:, None]
  n_el = jnp.maximum(jnp.sum(w), 1.0) * D
  s = 1.0 if sigma is None else sigma

  def loss_fn(alpha, eps):
    lam = jax.nn.sigmoid(alpha)
    t = lam * x + (s * jax.nn.sigmoid(-alpha)) * eps       # [K, L, D], note §3
    emb = suffix(t)                                         # [K, E]
    f = fit[0] * jnp.mean(cosine(emb, target[None])) + fit[1]  # note §4 (scale 1, bias 0: the cosine)
    comp = jnp.sum(capacity(alpha, x, sigma) * w) / n_el    # mean over (valid) L*D, = over K*L*D
    return beta * comp - f

  def step(carry, xs):
    alpha, m, v = carry
    i, bc1, bc2, eps = xs
    if eps is None:
      eps = jax.random.normal(jax.random.fold_in(key, i), (samples, L, D), jnp.float32)
    loss, g = jax.value_and_grad(loss_fn)(alpha, eps.astype(jnp.float32))
    alpha, m, v = adam_step(alpha, m, v, g, lr, bc1, bc2)
    return (alpha, m, v), loss

  alpha0 = jnp.full((L, D), ALPHA_INIT, jnp.float32)
  zeros = jnp.zeros((L, D), jnp.float32)
  n_upd = steps - 1  # the official last update is never read out (note §6)
  bc1, bc2 = adam_tables(n_upd)
  xs = (jnp.arange(n_upd), jnp.asarray(bc1), jnp.asarray(bc2), None if noise is None else noise[:n_upd])
  (alpha, _, _), losses = jax.lax.scan(step, (alpha0, zeros, zeros), xs, length=n_upd)
  return capacity(alpha, x, sigma), losses


# --------------------------------------------------------------------------------------------
# The jitted core.

@functools.partial(jax.jit, static_argnames=(
    "cfg", "vlayer", "tlayer", "steps", "samples", "out_hw", "modality", "use_sigma"))
def _core(params, images, ids, lengths, img_idx, txt_idx, beta_v, beta_t, lr, sigma, key_v, key_t,
          noise_v, noise_t, fit_ab=(1.0, 0.0), *, cfg, vlayer, tlayer, steps, samples, out_hw, modality,
          use_sigma):
  model = build(cfg)
  sig = sigma if use_sigma else None
  out = {}
  P = img_idx.shape[0]
  # Each tower runs once on its distinct inputs: the prefix up to the bottleneck and the clean
  # embedding (the other modality's fit target) come from that single forward.
  img_emb, img_aux = model.apply({"params": params}, images, method="encode_image")
  txt_emb, txt_aux = model.apply({"params": params}, ids, method="encode_text")
  if lengths is None:  # real tokens = SOT .. pooled EOT (the official unpadded ids, note §0)
    lengths = txt_aux["eot"] + 1

  if modality in ("both", "image"):
    xv = img_aux["blocks"][vlayer]["tokens"][img_idx]          # [P, N, W]
    tgt = txt_emb[txt_idx]                                      # [P, E]
    valid = jnp.ones(xv.shape[:2], bool)
    suffix = functools.partial(_vision_suffix, params, cfg, vlayer)
    run = functools.partial(_optimise, suffix=suffix, beta=beta_v, lr=lr, sigma=sig,
                            steps=steps, samples=samples, fit=fit_ab)
    keys = key_v if key_v.ndim == 2 else jax.random.split(key_v, P)  # [P, 2]: given per pair
    cap, losses = jax.vmap(run, in_axes=(0, 0, 0, 0, None if noise_v is None or noise_v.ndim == 4 else 0))(
        xv, tgt, valid, keys, noise_v)
    n_cls = 0 if siglip.is_siglip(cfg) else 1                   # SigLIP has no class token
    raw = jnp.sum(cap, -1)[:, n_cls:]                           # nansum over features, drop CLS
    gh, gw = images.shape[1] // cfg.vision.patch_size, images.shape[2] // cfg.vision.patch_size
    grid = raw.reshape(P, gh, gw)                               # row-major patches (note §6)
    out["grid_raw"] = grid
    out["grid"] = minmax(grid.reshape(P, -1)).reshape(P, gh, gw)
    up = upsample_bilinear(grid, out_hw)
    out["map"] = minmax(up.reshape(P, -1)).reshape(P, *out_hw)  # min-max AFTER upsampling (note §6)
    out["image_capacity"] = jnp.sum(cap, -1)                    # [P, N] incl. CLS
    out["image_loss"] = losses

  if modality in ("both", "text"):
    xt = txt_aux["blocks"][tlayer]["tokens"][txt_idx]          # [P, L, W]
    tgt = img_emb[img_idx]
    eot = txt_aux["eot"][txt_idx]
    n = xt.shape[1]
    valid = jnp.arange(n)[None, :] < lengths[txt_idx][:, None]  # [P, L]

    def run_t(x, t, v, e, k, nz):
      suffix = functools.partial(_text_suffix, params, cfg, tlayer, eot=e)
      return _optimise(x, t, v, k, nz, suffix=suffix, beta=beta_t, lr=lr, sigma=sig, steps=steps,
                       samples=samples, fit=fit_ab)
    keys = key_t if key_t.ndim == 2 else jax.random.split(key_t, P)
    cap, losses = jax.vmap(run_t, in_axes=(0, 0, 0, 0, 0, None if noise_t is None or noise_t.ndim == 4 else 0))(
        xt, tgt, valid, eot, keys, noise_t)
    raw = jnp.where(valid, jnp.sum(cap, -1), 0.0)
    out["text_raw"] = raw
    out["text"] = minmax(raw, valid)
    out["text_valid"] = valid
    out["text_loss"] = losses
  return out


# --------------------------------------------------------------------------------------------
# Public API.

def _check_layer(name, layer, n_layers):
  if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
    raise ValueError(f"{name} must be an int block index; got {layer!r}")
  if not 0 <= layer < n_layers:
    raise ValueError(f"{name}={layer} is out of range: the bottleneck goes on the output of a 0-based "
                     f"block, so it must be in [0, {n_layers - 1}] for a tower with {n_layers} blocks "
                     f"(the official default 9 needs >= 10 blocks)")


def _eot_positions(ids: np.ndarray, cfg: CLIPConfig) -> np.ndarray:
  if cfg.text.pool == "last":  # SigLIP: the last position of the row
    return np.full(ids.shape[:-1], ids.shape[-1] - 1)
  if cfg.text.pool == "argmax":
    return np.argmax(ids, axis=-1)
  return np.argmax(ids == cfg.text.eos_token_id, axis=-1)


def _pairing(n_img: int, n_txt: int):
  if n_img == n_txt:
    return np.arange(n_img), np.arange(n_txt)
  if n_img == 1:
    return np.zeros(n_txt, np.int32), np.arange(n_txt)
  if n_txt == 1:
    return np.arange(n_img), np.zeros(n_img, np.int32)
  raise ValueError(f"cannot pair {n_img} images with {n_txt} texts: give equal numbers (one pair "
                   f"each), one image and many texts, or many images and one text")


def _check_noise(name, noise, P, steps, samples, L, D):
  if noise is None:
    return None
  noise = jnp.asarray(noise, jnp.float32)
  want = (steps - 1, samples, L, D)
  if noise.ndim == 4 and noise.shape[0] >= steps - 1 and noise.shape[1:] == want[1:]:
    return noise[: steps - 1]
  if noise.ndim == 5 and noise.shape[0] == P and noise.shape[1] >= steps - 1 and noise.shape[2:] == want[1:]:
    return noise[:, : steps - 1]
  raise ValueError(f"{name} must have shape [steps, samples, L, D] = [{steps}, {samples}, {L}, {D}] "
                   f"(only the first steps-1 are used) or [pairs, steps, samples, L, D] with pairs={P}; "
                   f"got {tuple(noise.shape)}")


def pair_keys_of(key, num_pairs: int) -> jax.Array:
  """[2, P, 2]: the per-pair (image, text) noise keys ``explain`` derives from ``key`` for P pairs."""
  key = jax.random.PRNGKey(0) if key is None else key
  key_v, key_t = jax.random.split(key)
  return jnp.stack([jax.random.split(key_v, num_pairs), jax.random.split(key_t, num_pairs)])


def explain(model, params, images, ids, *, layer: int = DEFAULT_LAYER, text_layer: int | None = None,
            beta: float = 0.1, text_beta: float | None = None, steps: int = 10, lr: float = 1.0,
            samples: int = 10, sigma: float | None = None, key=None, image_noise=None,
            text_noise=None, lengths=None, out_size: Any = OFFICIAL_SIZE,
            modality: str = "both", query=None, pair_keys=None, fit: str = "cosine") -> dict[str, jax.Array]:
  """M2IB image and text attributions for image-text pairs (official-code behaviour, see module doc).

  Args:
    model: the CLIP or SigLIP linen module (``trace_jax.models.build(cfg)``); only ``model.cfg`` is used.
    params: its parameters.
    images: [B, H, W, 3] NHWC normalised pixels (or one [H, W, 3]).
    ids: int token ids [T, L] (or one [L]); unpadded as the official usage, or padded (see ``lengths``).
      Pairing: B == T -> B pairs; B == 1 -> T pairs sharing one image forward; T == 1 -> B pairs.
    layer: 0-based vision block whose output gets the bottleneck (official 9); ``text_layer``: same for
      the text tower (default: ``layer``).
    beta, text_beta: weight of the compression term (official 0.1; ``text_beta`` defaults to ``beta``).
    steps: official ``train_steps`` (10); ``steps - 1`` Adam updates are computed (note §6).
    lr: Adam learning rate (official 1). samples: K copies per step (official 10).
    sigma: None = the official code (sigma = 1, its ``var`` is unused); a float = paper eq. (5).
    key: ``jax.random`` key for the noise (default ``PRNGKey(0)``); deterministic for a fixed key.
      Pair p draws from ``split(key_modality, P)[p]``.
    image_noise / text_noise: replay eps instead: [steps, K, L, D] (shared by all pairs) or
      [P, steps, K, L, D]; eps[s] is used at step s (the last one is unused, as officially).
    lengths: [T] number of real text tokens per row (SOT..EOT); default: pooled EOT position + 1.
      Pass ``L`` to reproduce the official run on ids padded to L (note §7). SigLIP: the row length
      (its pooled position is the last one).
    out_size: size of ``map`` (official 224); an int (square), (H, W), or None = the image size.
    modality: 'both', 'image' or 'text' (skip the other optimisation).
    query: not supported (M2IB needs token ids); present for the ``attribution.explain`` API.
    pair_keys: [2, P, 2] the (image, text) noise key of each pair instead of splitting ``key``: a
      caller that runs the P pairs of one call in chunks passes each chunk its rows of
      :func:`pair_keys_of` (key, P) and gets the all-at-once result (trace_jax/inference/explain.py).
    fit: 'cosine' (official) or 'logit' (the pair's logit exp(t) cos + b; module docstring).

  Returns a dict (P = number of pairs):
    ``grid`` [P, gh, gw] min-max of the patch-grid capacity; ``grid_raw`` the capacity sums;
    ``map`` [P, S, S] the official vision heatmap (bilinear upsampling, then min-max);
    ``image_capacity`` [P, N] per-token capacity sums incl. CLS; ``image_loss`` [P, steps-1];
    ``text`` [P, L] official text map (min-max over the real tokens incl. SOT/EOT; padding 0);
    ``text_raw`` [P, L]; ``text_valid`` [P, L] bool; ``text_loss`` [P, steps-1].
  """
  if query is not None:
    raise ValueError("M2IB needs text token ids (it attributes the text tokens and puts a bottleneck "
                     "in the text tower); it cannot take query embedding vectors")
  cfg = model.cfg if hasattr(model, "cfg") else model
  if modality not in ("both", "image", "text"):
    raise ValueError(f"modality must be 'both', 'image' or 'text'; got {modality!r}")
  if fit not in FITS:
    raise ValueError(f"fit must be one of {FITS}; got {fit!r}")
  # the text bottleneck needs only the image embedding: any image tower; SigLIP has its own tails
  if modality != "text":
    require_vit(cfg, "M2IB", "modality='text' (the text map alone) works with any image tower",
                allow=("siglip",))
  text_layer = layer if text_layer is None else text_layer
  _check_layer("layer", layer, cfg.vision.layers)
  _check_layer("text_layer", text_layer, cfg.text.layers)
  for name, v in (("steps", steps), ("samples", samples)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive int; got {v!r}")
  if steps < 2:
    raise ValueError(f"steps={steps}: the official read-out uses alpha after steps-1 updates, so "
                     f"steps must be >= 2 (steps=1 reads the untrained alpha = 5 everywhere)")
  images = jnp.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be NHWC [B, H, W, 3]; got shape {tuple(images.shape)}")
  ids = jnp.asarray(ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"ids must be integer token ids [T, L]; got {ids.dtype} {tuple(ids.shape)}")
  img_idx, txt_idx = _pairing(images.shape[0], ids.shape[0])
  P = len(img_idx)
  L = ids.shape[1]
  if L > cfg.text.context_length:
    raise ValueError(f"text of {L} tokens is longer than the context length {cfg.text.context_length}")
  if lengths is not None:
    lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (ids.shape[0],))
    if not isinstance(ids, jax.core.Tracer) and not isinstance(lengths, jax.core.Tracer):
      eot = _eot_positions(np.asarray(ids), cfg)
      ln = np.asarray(lengths)
      if np.any(ln < eot + 1) or np.any(ln > L):
        raise ValueError(f"lengths {ln.tolist()} must cover the pooled EOT token (>= "
                         f"{(eot + 1).tolist()}) and be <= the id length {L}")
  if out_size is None:
    out_hw = tuple(images.shape[1:3])
  elif isinstance(out_size, (int, np.integer)):
    out_hw = (int(out_size), int(out_size))
  else:
    out_hw = tuple(int(s) for s in out_size)
  gh, gw = images.shape[1] // cfg.vision.patch_size, images.shape[2] // cfg.vision.patch_size
  n_cls = 0 if siglip.is_siglip(cfg) else 1
  image_noise = _check_noise("image_noise", image_noise, P, steps, samples, n_cls + gh * gw, cfg.vision.width)
  text_noise = _check_noise("text_noise", text_noise, P, steps, samples, L, cfg.text.width)
  if sigma is not None and not sigma > 0:
    raise ValueError(f"sigma must be > 0 (or None for the official code); got {sigma}")
  if pair_keys is not None:
    pair_keys = jnp.asarray(pair_keys)
    if pair_keys.shape != (2, P, 2):
      raise ValueError(f"pair_keys must have shape [2, pairs, 2] = [2, {P}, 2]; got {tuple(pair_keys.shape)}")
    key_v, key_t = pair_keys[0], pair_keys[1]
  else:
    key = jax.random.PRNGKey(0) if key is None else key
    key_v, key_t = jax.random.split(key)
  text_beta = beta if text_beta is None else text_beta
  # traced, so both fits share one compiled program: (1, 0) is the cosine exactly
  fit_ab = (jnp.float32(1.0), jnp.float32(0.0))
  if fit == "logit":  # the pair's logit: exp(t) cos + b (SigLIP), exp(t) cos (CLIP: no bias)
    fit_ab = (jnp.exp(jnp.asarray(params["logit_scale"], jnp.float32)),
              jnp.asarray(params.get("logit_bias", 0.0), jnp.float32))
  return _core(params, images, ids.astype(jnp.int32), lengths,
               jnp.asarray(img_idx, jnp.int32), jnp.asarray(txt_idx, jnp.int32),
               jnp.float32(beta), jnp.float32(text_beta), jnp.float32(lr),
               jnp.float32(1.0 if sigma is None else sigma), key_v, key_t, image_noise, text_noise, fit_ab,
               cfg=cfg, vlayer=int(layer), tlayer=int(text_layer), steps=int(steps),
               samples=int(samples), out_hw=out_hw, modality=modality, use_sigma=sigma is not None)
