"""The objective of an experiment and the jitted, sharded train step.

Batch (canonical keys; ``loop.py`` adapts a data source to them), leading axis = batch:
  ``image``          [B, H, W, 3] float32 (normalised)
  ``caption_ids``    [B, L] int32   caption of the whole image (global contrastive, local alignment)
  ``phrase_ids``     [B, L] int32   one phrase per image (AMC)
  ``mask``           [B, H, W] float32 region of the phrase (AMC)
  ``mask_indicator`` [B] float32    1 where the sample carries a region mask

Objectives (``config.loss.name``):
  contrastive      L = L_clip(texts)
  amc              L = L_clip(texts) + λ1·L_mean + λ2·L_max      (trace_jax/losses/amc.py)
  local_alignment  L = λ_global·L_clip(captions) + λ_local·L_local (trace_jax/losses/local_alignment.py)
where ``texts`` is ``config.loss.global_texts``: 'caption', 'phrase' or 'caption+phrase' (mean).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from trace_jax.losses.amc import amc_loss
from trace_jax.losses.contrastive import MAX_LOG_SCALE, clip_contrastive_loss
from trace_jax.losses.local_alignment import local_alignment_forward, local_alignment_total
from trace_jax.models import build, get_config
from trace_jax.models.config import CLIPConfig
from trace_jax.models.text_compression import TextCompression
from trace_jax.training import sharding as shd
from trace_jax.training.state import TrainState

LOSSES = ("contrastive", "amc", "local_alignment", "trace")
GLOBAL_TEXTS = ("caption", "phrase", "caption+phrase")
BATCH_KEYS = ("image", "caption_ids", "phrase_ids", "mask", "mask_indicator")


def model_config(mcfg, data_info: dict | None = None) -> CLIPConfig:
  """CLIPConfig from ``config.model`` (a preset plus overrides); the tokenizer facts (vocab size,
  context length, end-of-text id) come from the data source when it provides them."""
  info = dict(data_info or {})
  cfg = get_config(mcfg.preset)
  vis = {k: v for k, v in dict(image_size=mcfg.get("image_size"), patch_size=mcfg.get("patch_size"),
                               width=mcfg.get("vision_width"), layers=mcfg.get("vision_layers"),
                               heads=mcfg.get("vision_heads")).items() if v is not None}
  txt = {k: v for k, v in dict(width=mcfg.get("text_width"), layers=mcfg.get("text_layers"),
                               heads=mcfg.get("text_heads")).items() if v is not None}
  for key in ("vocab_size", "context_length", "eos_token_id", "pool"):
    v = mcfg.get(key) if mcfg.get(key) is not None else info.get(key)
    if v is not None:
      txt[key] = v
  top = {"dtype": mcfg.get("dtype", "float32")}
  if mcfg.get("embed_dim") is not None:
    top["embed_dim"] = mcfg.embed_dim
  if top["dtype"] not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"model.dtype must be float32, bfloat16 or float16; got {top['dtype']!r}")
  return cfg.replace(vision=dataclasses.replace(cfg.vision, **vis), text=dataclasses.replace(cfg.text, **txt), **top)


class Task(NamedTuple):
  """Everything the loop needs about an experiment's model and objective."""
  cfg: CLIPConfig
  model: Any                      # CLIP linen module
  compressor: Any                 # TextCompression or None
  init_params: Callable           # rng -> boxed params {'clip': ..., ['text_compression': ...]}
  loss_fn: Callable               # (params, batch, rng) -> (loss, metrics)


def _compressor(config, cfg: CLIPConfig):
  lc = config.loss.local
  return TextCompression(num_registers=cfg.vision.grid ** 2, width=lc.width or cfg.text.width,
                         out_dim=cfg.embed_dim, layers=lc.layers, heads=lc.heads, mlp_ratio=lc.mlp_ratio,
                         dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[cfg.dtype])


def make_task(config, data_info: dict | None = None) -> Task:
  name = config.loss.name
  if name == "trace":  # issue 6: CRATE tower + TRACE losses (trace_jax/trace/task.py)
    from trace_jax.trace.task import make_trace_task
    return make_trace_task(config, data_info)
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
  if config.loss.global_texts not in GLOBAL_TEXTS:
    raise ValueError(f"loss.global_texts must be one of {GLOBAL_TEXTS}; got {config.loss.global_texts!r}")
  cfg = model_config(config.model, data_info)
  model = build(cfg)
  compressor = _compressor(config, cfg) if name == "local_alignment" else None
  s, L = cfg.vision.image_size, cfg.text.context_length

  def init_params(rng):
    r1, r2 = jax.random.split(rng)
    params = {"clip": model.init(r1, jnp.zeros((1, s, s, 3)), jnp.zeros((1, L), jnp.int32))["params"]}
    if compressor is not None:
      params["text_compression"] = compressor.init(
          r2, jnp.zeros((1, L, cfg.text.width)), jnp.ones((1, L), bool))["params"]
    return params

  def global_loss(clip_params, batch):
    img, _ = model.apply({"params": clip_params}, batch["image"], method="encode_image")
    losses = []
    for key in {"caption": ["caption_ids"], "phrase": ["phrase_ids"],
                "caption+phrase": ["caption_ids", "phrase_ids"]}[config.loss.global_texts]:
      txt, _ = model.apply({"params": clip_params}, batch[key], method="encode_text")
      losses.append(clip_contrastive_loss(img, txt, clip_params["logit_scale"]))
    return sum(losses) / len(losses)

  def loss_fn(params, batch, rng):
    del rng  # the models have no dropout; kept for objectives that sample
    if name == "contrastive":
      l = global_loss(params["clip"], batch)
      return l, {"global": l}
    if name == "amc":
      a = config.loss.amc
      l_glob = global_loss(params["clip"], batch)
      l_amc, m = amc_loss(model, params["clip"], batch["image"], batch["phrase_ids"], batch["mask"],
                          batch["mask_indicator"], layer=a.layer, lambda1=a.lambda1, lambda2=a.lambda2,
                          delta1=a.delta1, delta2=a.delta2, mean_pooling=a.mean_pooling,
                          relu_grad=a.relu_grad)
      return l_glob + l_amc, {"global": l_glob, "amc": l_amc, **m}
    lc = config.loss.local
    fwd = local_alignment_forward(model, compressor, params, batch["image"], batch["caption_ids"])
    l, m = local_alignment_total(fwd, lambda_global=lc.lambda_global, lambda_local=lc.lambda_local)
    return l, m

  return Task(cfg, model, compressor, init_params, loss_fn)


def clamp_log_scales(params):
  """CLIP: keep every learnable log-temperature in [0, ln 100] after the update (open_clip clamp)."""
  out = dict(params)
  for k in out:
    if isinstance(out[k], dict) and "logit_scale" in out[k]:
      out[k] = {**out[k], "logit_scale": jnp.clip(out[k]["logit_scale"], 0.0, MAX_LOG_SCALE)}
  return out


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule):
  """(state, batch) -> (state, metrics); pure, to be jitted. Differentiates through AMC's inner
  gradient (second order) like any other function."""
  def train_step(state: TrainState, batch: dict):
    rng, sub = jax.random.split(state.rng)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, sub)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = clamp_log_scales(optax.apply_updates(state.params, updates))
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
               "logit_scale": jnp.exp(params["clip"]["logit_scale"])}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics
  return train_step


def jit_train_step(train_step: Callable, state_shardings, mesh, compiler_options: dict | None = None):
  """``jax.jit`` with the state sharded by the logical rules and the batch over ('data', 'fsdp');
  metrics come back replicated. The old state's buffers are donated. ``compiler_options`` go to
  XLA (tests pass ``{'xla_backend_optimization_level': 0}`` to halve CPU compile time)."""
  return jax.jit(train_step, in_shardings=(state_shardings, shd.batch_sharding(mesh)),
                 out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,),
                 compiler_options=compiler_options)
