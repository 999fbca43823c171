"""What every objective returns (:class:`Task`) and the model config it builds from ``config.model``."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

from trace_jax.models import get_config
from trace_jax.models.config import CLIPConfig

# Canonical batch keys (trace_jax/data/sources.py yields them), leading axis = batch:
#   image [B, H, W, 3] float32 normalised; caption_ids / phrase_ids [B, L] int32;
#   mask [B, H, W] float32 (the phrase's region); mask_indicator [B] float32 (1: the row has a region).
BATCH_KEYS = ("image", "caption_ids", "phrase_ids", "mask", "mask_indicator")


class Task(NamedTuple):
  """Everything the loop needs about an experiment's model and objective.

  ``heads``: name -> JSON metadata of each extra parameter subtree (``params[name]``) the objective
  trains beside ``params['clip']``; ``trace_jax.model_dir.save`` stores them so that a trained model
  dir is evaluable on its own.
  """
  cfg: CLIPConfig
  model: Any                      # CLIP linen module
  compressor: Any                 # TextCompression or None
  init_params: Callable           # rng -> boxed params {'clip': ..., [head]: ...}
  loss_fn: Callable               # (params, batch, rng) -> (loss, metrics)
  heads: dict = {}


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
  cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, **vis), text=dataclasses.replace(cfg.text, **txt), **top)
  dh = mcfg.get("crate_dim_head")
  if dh is not None:
    cfg = cfg.replace(extra=tuple(sorted({**dict(cfg.extra), "crate_dim_head": int(dh)}.items())))
  return cfg
