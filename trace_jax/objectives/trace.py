"""TRACE as a training objective (docs/trace.md §8): a CRATE-tower dual encoder trained with

    L = w_clip L_clip(image, caption) + w_cluster L_cluster + w_anchor L_anchor + w_token L_token   (12)

from image-caption pairs only (the batch keys ``image`` and ``caption_ids``; no boxes, no masks).
The frozen anchors are derived once, before training, from the training captions the data source
gives (``info['train_captions']``; ``anchors.corpus_anchors``: no download) and enter the step as
constants; the closed vocabulary is the hierarchy's coarse + fine words minus the open-vocabulary
words (they never occur in training text). ``w_cluster = w_anchor = w_token = 0`` is the CLIP baseline
with the same tower.

    task = make_trace_task(config, info)           # info: train_captions (list of str), tokenizer
    params = task.init_params(rng)                  # {'clip': ..., 'trace': {'kernel': [D, d]}}
    loss, metrics = task.loss_fn(params, batch, rng)
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trace_jax.losses import trace as tl
from trace_jax.losses.contrastive import clip_contrastive_loss
from trace_jax.models import build
from trace_jax.objectives.registry import register
from trace_jax.objectives.base import model_config
from trace_jax.trace import vocab_arrays
from trace_jax.trace.vocab import TraceVocab, make_vocab, token_to_vocab, vocab_to_meta, word_spans


def default_trace_config() -> ml_collections.ConfigDict:
  """``config.loss.trace``: loss weights and the hyper-parameters of ``losses.trace.TraceConfig``."""
  d = {f.name: f.default for f in dataclasses.fields(tl.TraceConfig)}
  return ml_collections.ConfigDict(dict(
      w_clip=1.0,                  # global caption contrast (weak supervision of the text tower)
      **d,                         # layer, tau_member, beta_*, temp_*, w_cluster, w_anchor, w_token, eps
      anchor_dim=48,               # PPMI-SVD dimension of the derived anchors (docs/trace.md §2.2)
      anchor_captions=ml_collections.config_dict.placeholder(int),  # None: every training caption
      # real vocabularies (docs/training.md): a GloVe / word2vec file for the anchors instead of the
      # corpus-derived ones, and a hierarchy JSON (coarse -> fine; e.g. trace_jax/trace/
      # cocostuff_hierarchy.json) instead of the embedded set's concepts.json
      anchors_path="",
      hierarchy_path="",
      gate=True,                   # heatmaps with the coarse gate (13); False for the token-only ablation
      # readout only (no effect on training): the gate as M^gate_power (grounding.heatmaps); 0.1 was
      # chosen on the embedded set's validation split by mIoU (docs/trace.md §12); 1.0 is eq. (13)
      gate_power=0.1,
  ))


def trace_config(tc) -> tl.TraceConfig:
  """``config.loss.trace`` -> ``losses.trace.TraceConfig`` (the loss hyper-parameters only)."""
  return tl.TraceConfig(**{f.name: type(f.default)(tc[f.name]) for f in dataclasses.fields(tl.TraceConfig)})


class TraceTask(NamedTuple):
  """The fields of ``objectives.Task`` plus the vocabulary, so that evaluation uses the anchors the
  model was trained against (``trace_jax.trace.evaluate.make_maps_fn`` reads them; their JSON round
  trip is tested in tests/test_trace_training.py)."""
  cfg: Any
  model: Any
  compressor: Any
  init_params: Any
  loss_fn: Any
  heads: dict
  vocab: TraceVocab
  arrays: dict                    # vocab_arrays of the closed vocabulary (constants of the step)
  tok2vocab: np.ndarray           # int32 [tokenizer vocab] -> closed vocabulary id
  tokenizer: Any
  trace_cfg: tl.TraceConfig
  gate: bool
  pretrained: dict | None = None
  trainable: Any = None
  gate_power: float = 1.0         # readout: the coarse gate as M^gate_power (grounding.heatmaps)


def trace_model_config(config, data_info: dict | None = None, init=None):
  """base.model_config, refusing a tower that is not CRATE (TRACE reads the MSSA subspaces)."""
  cfg = model_config(config.model, data_info, init.config if init is not None else None,
                     init.desc if init is not None else "")
  if cfg.vision.kind != "crate":
    what = init.desc if init is not None else f"model.preset {config.model.preset!r}"
    raise ValueError(f"TRACE needs a CRATE image tower (model.preset 'crate-clip-*'); "
                     f"{what} has vision.kind {cfg.vision.kind!r}")
  return cfg


def head_meta(vocab: TraceVocab, tcfg: tl.TraceConfig, gate: bool, gate_power: float = 1.0) -> dict:
  """The ``trace`` head of a model dir: loss hyper-parameters, gate (and its power) and the vocabulary (JSON)."""
  return {"kind": "trace", "trace_config": dataclasses.asdict(tcfg), "gate": bool(gate),
          "gate_power": float(gate_power), **vocab_to_meta(vocab)}


@register("trace", defaults={"trace": default_trace_config})
def make_trace_task(config, info: dict | None = None, init=None) -> TraceTask:
  """The TRACE objective for ``config`` (see the module docstring)."""
  info = dict(info or {})
  tc = config.loss.trace
  tcfg = trace_config(tc)
  tok = info.get("tokenizer")
  if tok is None:
    raise ValueError("TRACE needs the data source's tokenizer (info['tokenizer'])")
  info.setdefault("vocab_size", tok.vocab_size)
  info.setdefault("context_length", tok.context_length)
  cfg = trace_model_config(config, {k: info[k] for k in ("vocab_size", "context_length", "image_size")
                                    if k in info}, init)
  if cfg.text.vocab_size < tok.vocab_size:
    raise ValueError(f"text vocab_size {cfg.text.vocab_size} < tokenizer vocab_size {tok.vocab_size}")
  anchors_path, hierarchy_path = str(tc.get("anchors_path") or ""), str(tc.get("hierarchy_path") or "")
  caps = None
  if not anchors_path:              # corpus anchors: derived from the training captions
    caps = info.get("train_captions")
    if callable(caps):              # sources read their captions only when an objective asks
      caps = caps()
    if caps is None:
      raise ValueError(f"TRACE derives its anchors from the training captions; data.name "
                       f"{config.data.name!r} gives none (info['train_captions']); or set "
                       "loss.trace.anchors_path to a GloVe / word2vec file")
    if tc.get("anchor_captions") is not None:
      caps = list(caps)[:int(tc.anchor_captions)]
  vocab = make_vocab(caps, dim=int(tc.anchor_dim), anchors_path=anchors_path or None,
                     hierarchy_path=hierarchy_path or None)
  arrays = vocab_arrays(vocab.closed, num_subspaces=cfg.vision.heads)   # raises if heads < coarse concepts
  spans = word_spans(tok, vocab.closed)                                # caption word -> its token span
  tok2vocab = token_to_vocab(tok, vocab.closed, spans)
  spans = tuple(jnp.asarray(a) for a in spans)
  model = build(cfg)
  s, L = cfg.vision.image_size, cfg.text.context_length
  width, adim = cfg.vision.width, vocab.closed.anchors.shape[1]
  use_trace = bool(tcfg.w_cluster or tcfg.w_anchor or tcfg.w_token)
  w_clip = float(tc.w_clip)
  if not (use_trace or w_clip):
    raise ValueError("every loss weight is 0 (loss.trace.w_clip / w_cluster / w_anchor / w_token)")
  gate = bool(tc.get("gate", True))
  gate_power = float(tc.get("gate_power", 1.0))
  if not gate_power > 0:
    raise ValueError(f"loss.trace.gate_power must be > 0; got {gate_power}")

  def init_params(rng):
    r1, r2 = jax.random.split(rng)
    clip = model.init(r1, jnp.zeros((1, s, s, 3)), jnp.zeros((1, L), jnp.int32))["params"]
    # W [D, d] is split like the tower's other width axes (logical 'embed' -> fsdp).
    kernel = tl.init_trace_params(r2, width, adim)["kernel"]
    return {"clip": clip, "trace": {"kernel": nn.LogicallyPartitioned(kernel, ("embed", None))}}

  def loss_fn(params, batch, rng):
    del rng  # deterministic objective
    emb, aux = model.apply({"params": params["clip"]}, batch["image"], method="encode_image")
    metrics, total = {}, 0.0
    if w_clip:
      txt, _ = model.apply({"params": params["clip"]}, batch["caption_ids"], method="encode_text")
      metrics["global"] = clip_contrastive_loss(emb, txt, params["clip"]["logit_scale"])
      total = total + w_clip * metrics["global"]
    if use_trace:
      word_ids = tl.match_words(batch["caption_ids"], *spans)   # [B, L] closed-vocabulary ids, -1 else
      l_trace, m = tl.trace_loss(aux, word_ids, arrays, params["trace"], tcfg)
      metrics.update(m)
      total = total + l_trace
    return total, metrics

  return TraceTask(cfg, model, None, init_params, loss_fn, {"trace": head_meta(vocab, tcfg, gate, gate_power)}, vocab, arrays,
                   tok2vocab, tok, tcfg, gate, gate_power=gate_power)

