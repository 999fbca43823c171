"""TRACE: language-aligned CRATE subspaces for transparent patch-token grounding (docs/trace.md).

anchors.py    frozen word anchors (GloVe / word2vec files, or derived offline), the concept hierarchy
grounding.py  heatmaps per caption word and the readable trace (subspace -> coarse -> fine)
vocab.py      the closed / open vocabularies over the anchors, and their JSON form (the model dir's head)
head.py       a trained TRACE model read back from its model dir (no training data needed)
evaluate.py   patch-token grounding P / R / mIoU vs the CLIP baseline, closed / open vocabulary, purity
report.py     the interpretability report (PNG per image, subspace -> concept table)
The losses are in trace_jax/losses/trace.py, the training objective in trace_jax/objectives/trace.py,
the comparison with its ablations in compare.py --suite trace.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from trace_jax.trace.anchors import Hierarchy, Vocab, build_vocab  # noqa: F401


def vocab_arrays(vocab: "Vocab", num_subspaces: int, assignment=None) -> dict:
  """The dict of arrays ``trace_loss`` takes: anchors, coarse, group, coarse_anchor_ids, assignment.

  ``assignment`` (int [K], subspace -> coarse id) defaults to the balanced ``assign_subspaces``.
  """
  from trace_jax.losses.trace import assign_subspaces
  c = len(vocab.coarse_names)
  a = assign_subspaces(num_subspaces, c) if assignment is None else np.asarray(assignment, np.int32)
  if a.shape != (num_subspaces,) or a.min() < 0 or a.max() >= c:
    raise ValueError(f"assignment must be {num_subspaces} coarse ids in [0, {c}); got {a}")
  return {"anchors": jnp.asarray(vocab.anchors, jnp.float32), "coarse": jnp.asarray(vocab.coarse),
          "group": jnp.asarray(vocab.group), "coarse_anchor_ids": jnp.asarray(vocab.coarse_anchor_ids),
          "assignment": jnp.asarray(a)}
