"""TRACE grounding output (docs/trace.md §5): per caption word a patch heatmap and a readable trace.

``heatmaps`` is pure JAX (jit / vmap over images); ``trace_word`` turns one image's arrays into a
``Trace`` a person can read: which subspace, which coarse concept, which fine concept.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.losses.trace import patch_word_scores


def heatmaps(M, q, anchors, word_coarse, word_group, temp: float = 0.1, gate: bool = True,
             gate_power: float = 1.0):
  """(13) Heatmaps of every vocabulary word: M [.., N, C], q [.., N, d], anchors [V, d] -> [.., V, N] in [0, 1].

  h_iv = M_i,c(v) · softmax_{v' in group(v)}(<q_i, a_v'>/T)[v]  = P(c | i) P(v | c, i) for a fine word;
  h_iv = M_i,v for a coarse word (its own coarse membership); for a word with a group but no coarse
  concept (e.g. colours) the group softmax alone; for a word with neither, max(0, <q_i, a_v>).
  ``gate=False`` drops the coarse factor (token-level-only ablation). ``gate_power`` γ tempers the
  gate, M^γ in place of M (γ = 1: eq. (13) as written). Why: M spreads each patch's mass over the C
  coarse concepts, so M · P(v | c, i) rarely passes a 0.5 threshold on an object's patches and the
  maps cover less than the words do (docs/trace.md §12: 16.5 % of the patches against 23.6 %);
  a γ < 1 keeps the gate's ranking and lifts its scale.
  """
  s = patch_word_scores(q, anchors)                                            # [.., N, V]
  same = (word_group[:, None] == word_group[None, :]) & (word_group[:, None] >= 0)  # [V, V]
  # group softmax without a [V, V] per patch: exp(s_v/T) / Σ_{v' ~ v} exp(s_v'/T) (|s| <= 1, stabilised)
  e = jnp.exp((s - jnp.max(s, axis=-1, keepdims=True)) / temp)
  within = e / jnp.maximum(e @ same.astype(e.dtype).T, 1e-30)
  num_coarse = M.shape[-1]
  has_c = word_coarse >= 0
  gate_v = jnp.take(M if gate_power == 1.0 else M ** gate_power,
                    jnp.clip(word_coarse, 0, num_coarse - 1), axis=-1)        # [.., N, V]
  is_coarse_word = has_c & (word_group == num_coarse)
  h = jnp.where(word_group >= 0, within, jnp.maximum(s, 0.0))
  if gate:
    h = jnp.where(is_coarse_word, gate_v, jnp.where(has_c, gate_v * h, h))
  return jnp.swapaxes(h, -1, -2)


@dataclasses.dataclass
class Trace:
  """Why a word is grounded where it is, for one image (all numbers are probabilities in [0, 1])."""
  word: str
  heatmap: np.ndarray            # [gh, gw]
  peak: tuple[int, int]          # (row, col) of the heatmap maximum
  subspace: int                  # argmax_k m_k at the peak patch
  subspace_share: float          # m_k* at the peak
  coarse: str                    # g(k*): the coarse concept that subspace is assigned to
  coarse_membership: float       # M_c at the peak, for that coarse concept
  fine: str | None               # argmax over that coarse concept's fine words of <q_peak, a_f>
  fine_prob: float               # P(fine | coarse, peak patch)
  word_coarse: str | None        # the coarse concept of the word itself (hierarchy)
  consistent: bool               # the word's coarse concept == the peak subspace's coarse concept
  region_subspaces: np.ndarray   # [K] heatmap-weighted subspace shares (which subspaces carry the region)

  def __str__(self) -> str:
    fine = f" -> fine {self.fine!r} ({self.fine_prob:.2f})" if self.fine else ""
    return (f"{self.word!r}: peak patch {self.peak} -> subspace {self.subspace} ({self.subspace_share:.2f}) "
            f"-> coarse {self.coarse!r} ({self.coarse_membership:.2f}){fine}"
            + ("" if self.consistent else f"  [word's coarse is {self.word_coarse!r}]"))


def trace_word(word: str, vocab, assignment, m, M, q, grid: tuple[int, int], temp: float = 0.1,
               gate: bool = True, gate_power: float = 1.0) -> Trace:
  """The trace of one vocabulary word on one image. m [N, K], M [N, C], q [N, d] (``trace_features``
  of one image); vocab: ``trace_jax.trace.anchors.Vocab``; assignment int [K]; grid (gh, gw)."""
  v = vocab.index(word)
  anchors = jnp.asarray(vocab.anchors)
  h = np.asarray(heatmaps(M, q, anchors, jnp.asarray(vocab.coarse), jnp.asarray(vocab.group), temp, gate,
                          gate_power)[v])
  m, M, q = np.asarray(m), np.asarray(M), np.asarray(q)
  i = int(np.argmax(h))
  k = int(np.argmax(m[i]))
  c = int(assignment[k])
  kids = [j for j in range(len(vocab.words)) if vocab.coarse[j] == c and vocab.group[j] == c]
  fine, fine_prob = None, 0.0
  if kids:
    s = q[i] @ np.asarray(vocab.anchors)[kids].T / temp
    p = np.exp(s - s.max())
    p /= p.sum()
    fine, fine_prob = vocab.words[kids[int(np.argmax(p))]], float(p.max())
  wc = int(vocab.coarse[v])
  share = (h[:, None] * m).sum(0) / max(float(h.sum()), 1e-12)
  return Trace(word=word, heatmap=h.reshape(grid), peak=divmod(i, grid[1]), subspace=k,
               subspace_share=float(m[i, k]), coarse=vocab.coarse_names[c], coarse_membership=float(M[i, c]),
               fine=fine, fine_prob=fine_prob, word_coarse=vocab.coarse_names[wc] if wc >= 0 else None,
               consistent=(wc == c) if wc >= 0 else True, region_subspaces=share)
