"""TRACE losses (docs/trace.md): cluster-level and token-level alignment of a CRATE image tower with
frozen word anchors, from image-caption pairs only.

All functions are pure JAX on arrays (jit / vmap / sharding friendly); equation numbers refer to
docs/trace.md. Shapes: B images, N patches (cls excluded), K subspaces (heads of the chosen CRATE
layer), dh = dim_head, D = CRATE width, V vocabulary words, d = anchor dim, C coarse concepts.

Typical use in a train step (see ``trace_loss``):

    emb, aux = model.apply({'params': p}, images, method='encode_image')   # CrateVision aux
    loss, metrics = trace_loss(aux, word_ids, vocab_arrays, p_trace, cfg)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TraceConfig:
  """Hyper-parameters (defaults used for the embedded dataset; docs/trace.md §4)."""
  layer: int = -1            # CRATE layer whose subspaces are aligned (the last one, as CRATE's segmentation)
  tau_member: float = 0.5    # (2) membership temperature on log-energies (1 = energy fractions)
  beta_cluster: float = 10.0  # (4) smooth-max sharpness over patches, cluster level
  beta_token: float = 10.0   # (10) smooth-max sharpness over patches, token level
  temp_anchor: float = 0.1   # (9) temperature of the coarse-anchor contrast
  temp_token: float = 0.1    # (11) temperature of the word-patch MIL contrast
  w_cluster: float = 1.0     # weights of (6), (9), (11) in (12)
  w_anchor: float = 1.0
  w_token: float = 1.0
  eps: float = 1e-6


# ---------------------------------------------------------------------------------------------- pieces

def _at_least_f32(x):
  """bf16 / f16 activations -> float32 (energies, norms); float64 stays float64 (gradient checks)."""
  return x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x


def assign_subspaces(num_subspaces: int, num_coarse: int) -> np.ndarray:
  """Fixed balanced assignment g(k) = floor(k C / K) (contiguous blocks of heads), int32 [K]. (§3.1)"""
  if num_subspaces < num_coarse:
    raise ValueError(f"TRACE needs at least one subspace (head) per coarse concept: {num_subspaces} heads "
                     f"< {num_coarse} coarse concepts; use a CRATE with more heads")
  return (np.arange(num_subspaces) * num_coarse // num_subspaces).astype(np.int32)


def subspace_energy(proj):
  """(1) e_ik = ||U_kᵀ z_i||²: proj [.., N, K, dh] (CRATE aux 'proj') -> [.., N, K]."""
  x = _at_least_f32(proj)
  return jnp.sum(x * x, axis=-1)


def memberships(proj, tau: float = 0.5, eps: float = 1e-6):
  """(2) m_ik = softmax_k(log(e_ik + eps) / tau) = e_ik^{1/tau} / Σ_k' e_ik'^{1/tau}: [.., N, K, dh] -> [.., N, K].

  Invariant to the scale of U (and of z); tau = 1 gives each subspace's fraction of the patch's energy.
  """
  return jax.nn.softmax(jnp.log(subspace_energy(proj) + eps) / tau, axis=-1)


def coarse_memberships(m, assignment, num_coarse: int):
  """(3) M_ic = Σ_{k: g(k) = c} m_ik: m [.., N, K], assignment int [K] -> [.., N, C]."""
  return m @ jax.nn.one_hot(assignment, num_coarse, dtype=m.dtype)


def smooth_max(x, beta: float, axis: int = -1):
  """(4) (1/beta) log mean exp(beta x) along ``axis``: between the mean (beta -> 0) and the max."""
  n = x.shape[axis]
  return (jax.nn.logsumexp(beta * x, axis=axis) - jnp.log(n)) / beta


def project_patches(tokens, kernel):
  """(7) q_i = normalize(z_i W): tokens [.., N, D] (last CRATE output, patches), kernel [D, d] -> [.., N, d]."""
  q = tokens @ kernel.astype(tokens.dtype)
  return q / jnp.sqrt(jnp.sum(q * q, axis=-1, keepdims=True) + 1e-12)


def match_words(ids, seqs, lens, starts, ends):
  """Caption words in token ids -> vocabulary ids: int32 [B, L], the vocabulary id at the first token
  of each whole-word occurrence, -1 elsewhere (a caption word maps to its span of subword tokens).

  ids int [B, L] token ids; seqs int [V, T] each vocabulary word's tokens (-1 padded), lens int [V]
  (0: never matches); starts / ends bool [N] per token id (``trace.vocab.word_spans``). An occurrence
  needs a word boundary before its first token and after its last (boundary before position t:
  ``ends[ids[t-1]] | starts[ids[t]]``; the row's ends are boundaries). Where several words match at
  one position the longest wins, and a word inside a longer match ('light' in 'traffic light') is
  not counted. With a word-level tokenizer (one token per word, every token a boundary) this is the
  token -> word lookup ``tok2vocab[ids]``.
  """
  b, l = ids.shape
  v, t = seqs.shape
  ext = jnp.pad(ids, ((0, 0), (0, t)), constant_values=-1)                   # [B, L + T]
  eq = jnp.ones((b, l, v), bool)
  for j in range(t):                                                         # T: static, small
    eq &= (ext[:, j:j + l, None] == seqs[None, None, :, j]) | (j >= lens)[None, None, :]
  safe = jnp.clip(ids, 0, starts.shape[0] - 1)
  inner = ends[safe[:, :-1]] | starts[safe[:, 1:]]                           # boundary before t = 1..L-1
  edge = jnp.ones((b, 1), bool)
  bnd = jnp.concatenate([edge, inner, edge, jnp.ones((b, t), bool)], axis=1)  # [B, L + 1 + T]
  end_at = jnp.arange(l)[:, None] + lens[None, :]                            # [L, V]
  match = eq & bnd[:, :l, None] & bnd[:, end_at] & (lens > 0)[None, None, :]
  score = jnp.where(match, lens[None, None, :], 0)
  best, longest = jnp.argmax(score, axis=-1), jnp.max(score, axis=-1)         # [B, L]
  covered = jnp.zeros((b, l), bool)
  for k in range(1, t):                                                      # inside an earlier, longer match
    covered |= jnp.pad(longest > k, ((0, 0), (k, 0)))[:, :l]
  return jnp.where((longest > 0) & ~covered, best, -1).astype(jnp.int32)


def caption_targets(word_ids, vocab_size: int):
  """Y [B, V] in {0, 1}: word v occurs in caption b. word_ids int [B, L], -1 = no vocabulary word."""
  return jnp.max(jax.nn.one_hot(word_ids, vocab_size, dtype=jnp.float32), axis=-2)


def coarse_targets(y_words, word_coarse, num_coarse: int):
  """(5) y [B, C]: caption b names coarse concept c or one of its children. word_coarse int [V] (-1 none)."""
  return jnp.minimum(y_words @ jax.nn.one_hot(word_coarse, num_coarse, dtype=y_words.dtype), 1.0)


def patch_word_scores(q, anchors):
  """(10) s_ivw = <q_i, a_v>: q [.., N, d], anchors [V, d] (unit rows) -> [.., N, V]."""
  return q @ anchors.astype(q.dtype).T


# ---------------------------------------------------------------------------------------------- losses

def cluster_loss(M, y_coarse, beta: float = 10.0, eps: float = 1e-6):
  """(6) Multiple-instance BCE of coarse presence. M [B, N, C] coarse memberships, y_coarse [B, C].

  p_bc = smooth_max_i(M_bic) (4); L = mean_{b,c} -[y log p + (1 - y) log(1 - p)].
  """
  p = jnp.clip(smooth_max(jnp.swapaxes(M, -1, -2), beta), eps, 1 - eps)      # [B, C]
  return -jnp.mean(y_coarse * jnp.log(p) + (1 - y_coarse) * jnp.log1p(-p))


def anchor_loss(M, q, y_coarse, coarse_anchors, temp: float = 0.1):
  """(9) Coarse prototypes vs coarse anchors. M [B, N, C], q [B, N, d], y_coarse [B, C], coarse_anchors [C, d].

  μ_bc = normalize(Σ_i M_bic q_bi) (8); L = mean over present (b, c) of -log softmax_c'(<μ_bc, a_c'>/T)[c].
  """
  mu = jnp.einsum("bnc,bnd->bcd", M, q)
  mu = mu / jnp.sqrt(jnp.sum(mu * mu, axis=-1, keepdims=True) + 1e-12)
  logits = jnp.einsum("bcd,ed->bce", mu, coarse_anchors.astype(mu.dtype)) / temp   # [B, C, C]
  nll = -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1), axis1=-2, axis2=-1)   # [B, C]
  return jnp.sum(nll * y_coarse) / jnp.maximum(jnp.sum(y_coarse), 1.0)


def token_loss(s, y_words, word_group, beta: float = 10.0, temp: float = 0.1):
  """(11) Word-patch multiple-instance contrast. s [B, N, V] patch-word cosines, y_words [B, V], word_group int [V].

  S_bv = smooth_max_i(s_biv) (10). For every caption word (y_bv = 1) the positive S_bv competes with
  (a) siblings v' (same group >= 0, v' != v) absent from caption b, on the same image, and
  (b) the same word on the other images b' whose captions lack it:
  L = mean over positives of -S_bv/T + log(exp(S_bv/T) + Σ_(a) exp(S_bv'/T) + Σ_(b) exp(S_b'v/T)).
  """
  S = smooth_max(jnp.swapaxes(s, -1, -2), beta) / temp                            # [B, V]
  sib = (word_group[:, None] == word_group[None, :]) & (word_group[:, None] >= 0)
  sib = sib & ~jnp.eye(word_group.shape[0], dtype=bool)                          # [V, V]
  absent = 1.0 - y_words
  # (a) Σ_{v'} sib[v, v'] absent[b, v'] exp(S[b, v']) ; (b) Σ_{b'} absent[b', v] exp(S[b', v])
  m = jax.lax.stop_gradient(jnp.max(S))                                          # stabiliser
  e = jnp.exp(S - m)
  neg_row = (e * absent) @ sib.astype(e.dtype).T                                 # [B, V]
  neg_col = jnp.sum(e * absent, axis=0, keepdims=True)                           # [1, V]
  nll = -(S - m) + jnp.log(e + neg_row + neg_col)
  return jnp.sum(nll * y_words) / jnp.maximum(jnp.sum(y_words), 1.0)


# ---------------------------------------------------------------------------------------------- all

def init_trace_params(rng, width: int, anchor_dim: int) -> dict:
  """The learnable projection into anchor space: {'kernel': [D, d]} (normal, std D**-0.5)."""
  return {"kernel": jax.random.normal(rng, (width, anchor_dim), jnp.float32) * width ** -0.5}


def trace_features(aux, p_trace, assignment, num_coarse: int, cfg: TraceConfig = TraceConfig()):
  """From a CrateVision aux: m [B, N, K], M [B, N, C], q [B, N, d] (patches only, cls dropped)."""
  proj = aux["blocks"][cfg.layer]["proj"][..., 1:, :, :]
  m = memberships(proj, cfg.tau_member, cfg.eps)
  M = coarse_memberships(m, assignment, num_coarse)
  q = project_patches(_at_least_f32(aux["tokens"][..., 1:, :]), p_trace["kernel"])
  return m, M, q


def trace_loss(aux, word_ids, vocab: dict, p_trace: dict, cfg: TraceConfig = TraceConfig()):
  """(12) L = w_cluster L_cluster + w_anchor L_anchor + w_token L_token; returns (loss, metrics).

  aux: CrateVision aux of a batch (``aux['blocks'][l]['proj']`` [B, 1+N, K, dh], ``aux['tokens']``
  [B, 1+N, D]); word_ids int [B, L]: each caption word's vocabulary id (-1 = not in the vocabulary);
  vocab: arrays {'anchors' [V, d], 'coarse' int [V], 'group' int [V], 'coarse_anchor_ids' int [C],
  'assignment' int [K]} (``trace_jax.trace.vocab_arrays``); p_trace: {'kernel' [D, d]}.
  A loss whose weight is 0 is not computed (ablations).
  """
  anchors = vocab["anchors"]
  num_coarse = vocab["coarse_anchor_ids"].shape[0]
  m, M, q = trace_features(aux, p_trace, vocab["assignment"], num_coarse, cfg)
  y = caption_targets(word_ids, anchors.shape[0])
  yc = coarse_targets(y, vocab["coarse"], num_coarse)
  metrics, total = {}, 0.0
  if cfg.w_cluster:
    metrics["trace_cluster"] = cluster_loss(M, yc, cfg.beta_cluster, cfg.eps)
    total = total + cfg.w_cluster * metrics["trace_cluster"]
  if cfg.w_anchor:
    metrics["trace_anchor"] = anchor_loss(M, q, yc, anchors[vocab["coarse_anchor_ids"]], cfg.temp_anchor)
    total = total + cfg.w_anchor * metrics["trace_anchor"]
  if cfg.w_token:
    s = patch_word_scores(q, anchors)
    metrics["trace_token"] = token_loss(s, y, vocab["group"], cfg.beta_token, cfg.temp_token)
    total = total + cfg.w_token * metrics["trace_token"]
  metrics["trace"] = total
  return total, metrics
