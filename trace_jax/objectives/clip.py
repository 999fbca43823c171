"""The CLIP-tower objectives (``config.loss.name``):

  contrastive      L = L_clip(texts)
  amc              L = L_clip(texts) + λ1·L_mean + λ2·L_max      (trace_jax/losses/amc.py)
  local_alignment  L = λ_global·L_clip(captions) + λ_local·L_local (trace_jax/losses/local_alignment.py)

where ``texts`` is ``config.loss.global_texts``: 'caption', 'phrase' or 'caption+phrase' (mean).
Batch keys: ``trace_jax.objectives.base.BATCH_KEYS``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from trace_jax.losses.amc import amc_loss
from trace_jax.losses.local_alignment import (GLOBAL_LOSSES, global_term, local_alignment_forward,
                                              local_alignment_total)
from trace_jax.models import build
from trace_jax.models import text_compression as tc_lib
from trace_jax.models.layers import dtype_of
from trace_jax.objectives.registry import register
from trace_jax.objectives.base import Task, model_config

# config.loss.global_texts (default 'caption', configs/common.py). The AMC authors train ITC/ITM on the
# phrase-box batch itself (notes/amc-and-local-alignment.md §6): --config.loss.global_texts=phrase
# reproduces that (docs/training.md, "AMC: deviations").
GLOBAL_TEXTS = ("caption", "phrase", "caption+phrase")
# config.loss.global_loss: CLIP's softmax InfoNCE or SigLIP's sigmoid loss (trace_jax/losses/sigmoid.py),
# the global term of all three objectives (losses/local_alignment.global_term).


def amc_defaults() -> ml_collections.ConfigDict:
  """``config.loss.amc``: AMC eq. 4-9 (notes/amc-and-local-alignment.md §2): Δ1, Δ2, λ1, λ2, the
  GradCAM block (-1: the last vision block) and the L_mean pooling ('batch' as the authors' code)."""
  # layer=-1 deviates: the authors take BERT layer 8 of ALBEF's fusion encoder (block_num = 8, a text-side
  # cross-attention; notes/amc-and-local-alignment.md §1-2), which a dual encoder lacks; the last vision
  # block is its analogue here (docs/training.md, "AMC: deviations").
  return ml_collections.ConfigDict(dict(
      layer=-1, lambda1=0.2, lambda2=0.8, delta1=0.1, delta2=0.5, mean_pooling="batch", relu_grad=True))


def local_defaults() -> ml_collections.ConfigDict:
  """``config.loss.local``: the text-compression head and the two loss weights."""
  # λ_global = λ_local = 1: the paper gives no values; the prototype's `--loss_weights` default "0.6,0.4"
  # breaks its own 3-way unpack and its launch.sh runs 1,0,0 (notes/amc-and-local-alignment.md §8;
  # docs/training.md, "Local alignment: loss weights").
  return ml_collections.ConfigDict(dict(
      width=ml_collections.config_dict.placeholder(int), layers=2, heads=4, mlp_ratio=4.0,
      lambda_global=1.0, lambda_local=1.0))


def make_compressor(config, cfg) -> tc_lib.TextCompression:
  """The local-alignment head: one register per image patch (``config.loss.local``)."""
  lc = config.loss.local
  return tc_lib.TextCompression(num_registers=cfg.vision.grid ** 2, width=lc.width or cfg.text.width,
                                out_dim=cfg.embed_dim, layers=lc.layers, heads=lc.heads, mlp_ratio=lc.mlp_ratio,
                                dtype=dtype_of(cfg.dtype))


@register("contrastive", "amc", "local_alignment",
                     defaults={"amc": amc_defaults, "local": local_defaults})
def make_clip_task(config, info: dict, init=None) -> Task:
  name = config.loss.name
  if config.loss.global_texts not in GLOBAL_TEXTS:
    raise ValueError(f"loss.global_texts must be one of {GLOBAL_TEXTS}; got {config.loss.global_texts!r}")
  cfg = model_config(config.model, info, init.config if init is not None else None,
                     init.desc if init is not None else "")
  model = build(cfg)
  global_kind = config.loss.get("global_loss", "softmax")
  if global_kind not in GLOBAL_LOSSES:
    raise ValueError(f"loss.global_loss must be one of {GLOBAL_LOSSES}; got {global_kind!r}")
  if global_kind == "sigmoid" and cfg.vision.kind != "siglip":
    raise ValueError("loss.global_loss=sigmoid needs a SigLIP model (a learnable logit bias): "
                     f"this model's image tower is {cfg.vision.kind!r}; use a 'ViT-*-SigLIP*' / 'siglip-*' preset")
  compressor = make_compressor(config, cfg) if name == "local_alignment" else None
  heads = {"text_compression": tc_lib.to_meta(compressor, cfg.dtype)} if compressor is not None else {}
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
      # SigLIP's sigmoid loss is chunked over the batch shards (trace_jax/losses/sigmoid.py)
      losses.append(global_term(global_kind, img, txt, clip_params["logit_scale"], clip_params.get("logit_bias")))
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
    l, m = local_alignment_total(fwd, lambda_global=lc.lambda_global, lambda_local=lc.lambda_local,
                                 global_loss=global_kind)
    return l, m

  return Task(cfg, model, compressor, init_params, loss_fn, heads)
