"""TRACE as a training objective of the loop (docs/trace.md §8): a CRATE-tower dual encoder trained with

    L = w_clip L_clip(image, caption) + w_cluster L_cluster + w_anchor L_anchor + w_token L_token   (12)

from image-caption pairs only (the batch keys ``image`` and ``caption_ids``; no boxes, no masks).
The frozen anchors are derived once, before training, from the training captions
(``anchors.corpus_anchors``: no download) and enter the step as constants; the closed vocabulary is
the hierarchy's coarse + fine words minus the open-vocabulary words (they never occur in training
text). ``w_cluster = w_anchor = w_token = 0`` is the CLIP baseline with the same tower.

    task = make_trace_task(config, data_info)      # a trace_jax.training.step.Task
    params = task.init_params(rng)                  # {'clip': ..., 'trace': {'kernel': [D, d]}}
    loss, metrics = task.loss_fn(params, batch, rng)

``config`` is a loop config (``trace_jax.training.loop.default_config()``) with ``loss.name = 'trace'``,
``loss.trace`` = ``default_trace_config()`` and optionally ``model.crate_dim_head``. ``data_info`` may
carry ``train_captions`` (list of str; else they are read from ``config.data``) and ``tokenizer``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trace_jax.losses import trace as tl
from trace_jax.losses.contrastive import clip_contrastive_loss
from trace_jax.models import build
from trace_jax.trace import vocab_arrays
from trace_jax.trace.anchors import Hierarchy, Vocab, build_vocab, corpus_anchors


def default_trace_config() -> ml_collections.ConfigDict:
  """``config.loss.trace``: loss weights and the hyper-parameters of ``losses.trace.TraceConfig``."""
  d = {f.name: f.default for f in dataclasses.fields(tl.TraceConfig)}
  return ml_collections.ConfigDict(dict(
      w_clip=1.0,                  # global caption contrast (weak supervision of the text tower)
      **d,                         # layer, tau_member, beta_*, temp_*, w_cluster, w_anchor, w_token, eps
      anchor_dim=48,               # PPMI-SVD dimension of the derived anchors (docs/trace.md §2.2)
      anchor_captions=ml_collections.config_dict.placeholder(int),  # None: every training caption
      gate=True,                   # heatmaps with the coarse gate (13); False for the token-only ablation
  ))


def trace_config(tc) -> tl.TraceConfig:
  """``config.loss.trace`` -> ``losses.trace.TraceConfig`` (the loss hyper-parameters only)."""
  return tl.TraceConfig(**{f.name: type(f.default)(tc[f.name]) for f in dataclasses.fields(tl.TraceConfig)})


# ------------------------------------------------------------------------------------------- vocabulary

def concepts(concepts_path: str | None = None) -> tuple[Hierarchy, tuple[str, ...]]:
  """(hierarchy, open-vocabulary words) of the embedded dataset's concepts.json."""
  import json
  from trace_jax.data.shapes import render
  path = concepts_path or render.CONCEPTS_PATH
  with open(path) as f:
    raw = json.load(f)
  return Hierarchy.from_dict(raw), tuple(raw.get("open_vocab", ()))


def train_captions(config) -> list[str]:
  """The training split's captions (config.data: trace_shapes only; the anchors need real text)."""
  d = config.data
  if d.name != "trace_shapes":
    raise ValueError(f"TRACE derives its anchors from the training captions; data.name {d.name!r} has "
                     "none (use 'trace_shapes' or pass data_info['train_captions'])")
  from trace_jax.data import pipeline
  from trace_jax.training.loop import builder_kwargs
  src = pipeline.load_split(pipeline.DATASET_NAME, d.data_dir, d.image_size, "train", **builder_kwargs(d))
  out = []
  for lo in range(0, len(src), 256):
    out += [pipeline._str(e["caption"]) for e in pipeline._read(src, range(lo, min(lo + 256, len(src))))]
  return out


@dataclasses.dataclass(frozen=True)
class TraceVocab:
  """The frozen word side of TRACE: closed and open vocabularies over the same anchor table."""
  hierarchy: Hierarchy
  closed: Vocab                   # training words (coarse + fine, open-vocabulary words left out)
  open: Vocab                     # closed + the open-vocabulary words (evaluation only)
  open_words: tuple[str, ...]
  words: tuple[str, ...]          # the anchor table (corpus_anchors)
  vectors: np.ndarray


def make_vocab(captions: Sequence[str], dim: int = 48, concepts_path: str | None = None) -> TraceVocab:
  """Anchors from the captions (docs/trace.md §2.2) and the closed / open vocabularies."""
  from trace_jax.tokenizers.word import split_words
  h, open_words = concepts(concepts_path)
  leaked = sorted({w for c in captions for w in split_words(c)} & set(open_words))
  if leaked:
    raise ValueError(f"open-vocabulary words {leaked} occur in the training captions")
  words, vecs = corpus_anchors([split_words(c) for c in captions], h, dim=dim)
  base = list(h.coarse) + list(h.fine) + [w for _, ws in h.groups for w in ws]
  closed = build_vocab(h, words, vecs, include=[w for w in base if w not in open_words])
  opened = build_vocab(h, words, vecs, include=list(closed.words) + [w for w in open_words if w in words])
  return TraceVocab(h, closed, opened, tuple(open_words), tuple(words), vecs)


def token_to_vocab(tokenizer, vocab: Vocab) -> np.ndarray:
  """int32 [tokenizer.vocab_size]: the TRACE vocabulary id of each token id (-1: not a vocabulary word)."""
  table = np.full(tokenizer.vocab_size, -1, np.int32)
  for i, w in enumerate(vocab.words):
    if w in tokenizer.ids:
      table[tokenizer.ids[w]] = i
  return table


# ------------------------------------------------------------------------------------------- the task

class TraceTask(NamedTuple):
  """Fields of ``trace_jax.training.step.Task`` (cfg, model, compressor, init_params, loss_fn) plus the
  vocabulary, so that evaluation uses exactly the anchors the model was trained against."""
  cfg: Any
  model: Any
  compressor: Any
  init_params: Any
  loss_fn: Any
  vocab: TraceVocab
  arrays: dict                    # vocab_arrays of the closed vocabulary (constants of the step)
  tok2vocab: np.ndarray           # int32 [tokenizer vocab] -> closed vocabulary id
  tokenizer: Any
  trace_cfg: tl.TraceConfig
  gate: bool


def model_config(config, data_info: dict | None = None):
  """step.model_config plus the CRATE head width (``config.model.crate_dim_head``)."""
  from trace_jax.training.step import model_config as base
  cfg = base(config.model, data_info)
  if cfg.vision.kind != "crate":
    raise ValueError(f"TRACE needs a CRATE image tower (model.preset 'crate-clip-*'); "
                     f"{config.model.preset!r} has vision.kind {cfg.vision.kind!r}")
  dh = config.model.get("crate_dim_head")
  if dh is not None:
    cfg = cfg.replace(extra=tuple(sorted({**dict(cfg.extra), "crate_dim_head": int(dh)}.items())))
  return cfg


def make_trace_task(config, data_info: dict | None = None) -> TraceTask:
  """The TRACE objective for ``config`` (see the module docstring)."""
  from trace_jax.data import pipeline
  info = dict(data_info or {})
  tc = config.loss.trace
  tcfg = trace_config(tc)
  tok = info.get("tokenizer") or pipeline.make_tokenizer()
  info.setdefault("vocab_size", tok.vocab_size)
  info.setdefault("context_length", tok.context_length)
  cfg = model_config(config, {k: info[k] for k in ("vocab_size", "context_length")})
  if cfg.text.vocab_size < tok.vocab_size:
    raise ValueError(f"text vocab_size {cfg.text.vocab_size} < tokenizer vocab_size {tok.vocab_size}")
  caps = info.get("train_captions")
  if caps is None:
    caps = train_captions(config)
  if tc.get("anchor_captions") is not None:
    caps = list(caps)[:int(tc.anchor_captions)]
  vocab = make_vocab(caps, dim=int(tc.anchor_dim))
  num_heads = cfg.vision.heads
  arrays = vocab_arrays(vocab.closed, num_subspaces=num_heads)   # raises if heads < coarse concepts
  tok2vocab = token_to_vocab(tok, vocab.closed)
  model = build(cfg)
  s, L = cfg.vision.image_size, cfg.text.context_length
  width, adim = cfg.vision.width, vocab.closed.anchors.shape[1]
  use_trace = bool(tcfg.w_cluster or tcfg.w_anchor or tcfg.w_token)
  w_clip = float(tc.w_clip)
  if not (use_trace or w_clip):
    raise ValueError("every loss weight is 0 (loss.trace.w_clip / w_cluster / w_anchor / w_token)")

  def init_params(rng):
    r1, r2 = jax.random.split(rng)
    clip = model.init(r1, jnp.zeros((1, s, s, 3)), jnp.zeros((1, L), jnp.int32))["params"]
    # W [D, d] is split like the tower's other width axes (logical 'embed' -> fsdp).
    kernel = tl.init_trace_params(r2, width, adim)["kernel"]
    return {"clip": clip, "trace": {"kernel": nn.LogicallyPartitioned(kernel, ("embed", None))}}

  t2v = jnp.asarray(tok2vocab)

  def loss_fn(params, batch, rng):
    del rng  # deterministic objective
    emb, aux = model.apply({"params": params["clip"]}, batch["image"], method="encode_image")
    metrics, total = {}, 0.0
    if w_clip:
      txt, _ = model.apply({"params": params["clip"]}, batch["caption_ids"], method="encode_text")
      metrics["global"] = clip_contrastive_loss(emb, txt, params["clip"]["logit_scale"])
      total = total + w_clip * metrics["global"]
    if use_trace:
      word_ids = t2v[batch["caption_ids"]]                      # [B, L] closed-vocabulary ids, -1 else
      l_trace, m = tl.trace_loss(aux, word_ids, arrays, params["trace"], tcfg)
      metrics.update(m)
      total = total + l_trace
    return total, metrics

  return TraceTask(cfg, model, None, init_params, loss_fn, vocab, arrays, tok2vocab, tok, tcfg,
                   bool(tc.get("gate", True)))
