"""OpenCLIP (open_clip 2.23.0 ``CLIP`` / ``CustomTextCLIP`` with a standard text tower) -> trace_jax.

Sources (notes/checkpoint-formats.md, "OpenCLIP"): a hub folder with ``open_clip_config.json``
(``{"model_cfg": ..., "preprocess_cfg": ...}``) and ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``; or a bare state dict plus a model name (``ViT-B-16``, ...), whose
``model_cfg`` comes from open_clip's packaged ``model_configs/*.json`` when open_clip is
importable, else from our named configs. Keys equal the OpenAI layout (``convert.openai``) except
that ``CustomTextCLIP`` puts the text tower under ``text.``; heads come from the config
(``vision width // head_width``, ``text_cfg.heads``), not from width // 64.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from trace_jax.convert import common, openai
from trace_jax.models.config import CLIPConfig, TextConfig, VisionConfig

# open_clip 2.23.0 CLIPVisionCfg / CLIPTextCfg options that our ViT supports only at these values.
_VISION_DEFAULTS = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                    "pos_embed_type": "learnable", "pool_type": "tok", "timm_model_name": None,
                    "act_kwargs": None, "norm_kwargs": None, "input_patchnorm": False,
                    "global_average_pool": False}
_TEXT_DEFAULTS = {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
                  "pool_type": "argmax", "proj_bias": False, "hf_model_name": None,
                  "act_kwargs": None, "norm_kwargs": None}


def _unsupported(sub: dict, defaults: dict, where: str) -> list[str]:
  return [f"{where}.{k}={sub[k]!r}" for k, d in defaults.items() if k in sub and sub[k] != d
          and not (d is None and sub[k] in ({}, None))]


def config_from_model_cfg(model_cfg: Mapping[str, Any]) -> CLIPConfig:
  """open_clip ``model_cfg`` dict -> CLIPConfig (heads = width // head_width; quick_gelu flag,
  else exact GELU). Options our ViT cannot represent are refused by name."""
  mc = dict(model_cfg)
  vc, tc = dict(mc.get("vision_cfg", {})), dict(mc.get("text_cfg", {}))
  bad = _unsupported(vc, _VISION_DEFAULTS, "vision_cfg") + _unsupported(tc, _TEXT_DEFAULTS, "text_cfg")
  if mc.get("init_logit_bias") is not None:
    bad.append(f"init_logit_bias={mc['init_logit_bias']!r} (SigLIP)")
  if "multimodal_cfg" in mc:
    bad.append("multimodal_cfg (CoCa)")
  if bad:
    raise ValueError("open_clip model config uses options trace_jax's CLIP does not support: " + ", ".join(bad))
  image_size, patch = vc.get("image_size", 224), vc.get("patch_size", 16)
  for name, val in (("image_size", image_size), ("patch_size", patch)):
    if isinstance(val, (list, tuple)):
      if len(set(val)) != 1:
        raise ValueError(f"vision_cfg.{name}={val!r}: only square sizes are supported")
      if name == "image_size":
        image_size = val[0]
      else:
        patch = val[0]
  layers = vc.get("layers", 12)
  if not isinstance(layers, int):
    raise ValueError(f"vision_cfg.layers={layers!r}: ResNet image towers are not supported")
  width = vc.get("width", 768)
  head_width = vc.get("head_width", 64)
  vision = VisionConfig(image_size=int(image_size), patch_size=int(patch), width=width, layers=layers,
                        heads=width // head_width, mlp_ratio=float(vc.get("mlp_ratio", 4.0)))
  vocab = tc.get("vocab_size", 49408)
  text = TextConfig(context_length=tc.get("context_length", 77), vocab_size=vocab,
                    width=tc.get("width", 512), heads=tc.get("heads", 8), layers=tc.get("layers", 12),
                    mlp_ratio=float(tc.get("mlp_ratio", 4.0)), pool="argmax", eos_token_id=vocab - 1)
  kw = {}
  if mc.get("init_logit_scale") is not None:
    kw["logit_scale_init"] = float(mc["init_logit_scale"])
  return CLIPConfig(vision=vision, text=text, embed_dim=mc.get("embed_dim", 512),
                    act="quick_gelu" if mc.get("quick_gelu", False) else "gelu", **kw)


def _strip_text_prefix(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``CustomTextCLIP`` with open_clip's own TextTransformer keeps its text keys under ``text.``."""
  if any(k.startswith("text.transformer.") for k in sd) and not any(k.startswith("transformer.") for k in sd):
    return {(k[len("text."):] if k.startswith("text.") else k): v for k, v in sd.items()}
  return dict(sd)


def params_from_state_dict(sd: Mapping[str, np.ndarray], cfg: CLIPConfig, what: str = "open_clip state dict") -> dict:
  return openai.params_from_state_dict(_strip_text_prefix(sd), cfg, what)


def from_torch_model(model, model_cfg: Mapping[str, Any]) -> tuple[CLIPConfig, dict]:
  """(config, params) of an in-memory open_clip model with its ``model_cfg`` dict."""
  cfg = config_from_model_cfg(model_cfg)
  sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
  return cfg, params_from_state_dict(sd, cfg, "open_clip model")


def packaged_model_cfg(name: str) -> dict | None:
  """open_clip's packaged ``model_configs/{name}.json`` if open_clip is installed (read as a file,
  so torch is not imported)."""
  import importlib.util
  try:
    spec = importlib.util.find_spec("open_clip")
  except (ImportError, ValueError):
    return None
  for loc in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(loc, "model_configs", f"{name}.json")
    if os.path.isfile(path):
      with open(path) as f:
        return json.load(f)
  return None


def named_config(name: str) -> CLIPConfig:
  """Config for an open_clip model name: packaged model_cfg, else our presets. open_clip names use
  exact GELU unless they end in ``-quickgelu`` (as open_clip's own configs do)."""
  mc = packaged_model_cfg(name)
  if mc is not None:
    return config_from_model_cfg(mc)
  from trace_jax.models.presets import NAMED
  base = name[:-len("-quickgelu")] if name.endswith("-quickgelu") else name
  if base not in NAMED:
    raise ValueError(f"unknown open_clip model name {name!r} (open_clip is not installed, so only "
                     f"{sorted(k for k in NAMED if k.startswith('ViT'))} [+ '-quickgelu'] are known)")
  return NAMED[base].replace(act="quick_gelu" if name.endswith("-quickgelu") else "gelu")


_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def hub_weights(path: str) -> str:
  """The weights file of an open_clip hub folder (``_HUB_WEIGHTS``, safetensors first)."""
  weights = [os.path.join(path, f) for f in _HUB_WEIGHTS if os.path.isfile(os.path.join(path, f))]
  if not weights:
    raise FileNotFoundError(f"{path}: no open_clip weights ({' or '.join(_HUB_WEIGHTS)})")
  return weights[0]


def load_openclip(path: str, model_name: str | None = None) -> tuple[CLIPConfig, dict]:
  """(config, params) of a hub folder (``open_clip_config.json`` + weights) or of a bare state dict
  file (``.safetensors`` / ``.pt`` / ``.bin``) given with ``model_name``."""
  if os.path.isdir(path):
    cfg_path = os.path.join(path, "open_clip_config.json")
    weights_path = hub_weights(path)
    if os.path.isfile(cfg_path):
      with open(cfg_path) as f:
        meta = json.load(f)
      if "model_cfg" not in meta:
        raise ValueError(f"{cfg_path}: no 'model_cfg' entry")
      cfg = config_from_model_cfg(meta["model_cfg"])
    elif model_name:
      cfg = named_config(model_name)
    else:
      raise FileNotFoundError(f"{path}: open_clip_config.json is missing; pass --model-name")
  else:
    if not model_name:
      raise ValueError(f"{path} is a bare state dict: pass the open_clip model name (--model-name ViT-B-16)")
    cfg = named_config(model_name)
    weights_path = path
  sd = common.load_state_dict(weights_path)
  return cfg, params_from_state_dict(sd, cfg, f"open_clip checkpoint {weights_path}")

