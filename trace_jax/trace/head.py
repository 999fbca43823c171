"""A trained TRACE model read back from its model dir: the CRATE dual encoder plus the ``trace`` head
(projection W and the vocabulary it was trained against), with no access to the training data.

    md = trace_jax.model_dir.load(path)
    tm = from_model_dir(md)            # .cfg .model .vocab .arrays .tok2vocab .tokenizer .trace_cfg .gate
    params = md.tree()                 # {'clip': ..., 'trace': {'kernel': [D, d]}}
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from trace_jax.losses import trace as tl
from trace_jax.trace import vocab_arrays
from trace_jax.trace.vocab import TraceVocab, token_to_vocab, vocab_from_meta


class TraceModel(NamedTuple):
  """What TRACE's maps need (the same attribute names as the training objective's TraceTask)."""
  cfg: Any
  model: Any
  vocab: TraceVocab
  arrays: dict
  tok2vocab: np.ndarray
  tokenizer: Any
  trace_cfg: tl.TraceConfig
  gate: bool
  gate_power: float = 1.0


def from_model_dir(md) -> TraceModel:
  """TraceModel of a loaded model dir (``trace_jax.model_dir.load``) that has a ``trace`` head."""
  if "trace" not in md.heads:
    raise ValueError(f"{md.path} has no TRACE head (heads: {sorted(md.heads) or 'none'}); it is written by "
                     "train.py with loss.name='trace'")
  if md.tokenizer is None:
    raise ValueError(f"{md.path} has no tokenizer/ folder; TRACE maps caption words through it")
  meta = md.heads["trace"].meta
  vocab = vocab_from_meta(meta)
  tcfg = tl.TraceConfig(**meta["trace_config"])
  arrays = vocab_arrays(vocab.closed, num_subspaces=md.config.vision.heads)
  return TraceModel(md.config, md.model, vocab, arrays, token_to_vocab(md.tokenizer, vocab.closed),
                    md.tokenizer, tcfg, bool(meta["gate"]),
                    float(meta.get("gate_power", 1.0)))   # dirs written before gate_power: eq. (13) as written
