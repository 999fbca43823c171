"""Hugging Face ``CLIPModel`` (``save_pretrained`` folder or in-memory model) -> trace_jax params.

Layout (notes/checkpoint-formats.md, "Hugging Face CLIPModel"): separate q/k/v/out projections with
biases, ``pre_layrnorm`` (sic), ``visual_projection.weight`` / ``text_projection.weight`` [E, W]
(Linear, no bias). Text pooling: the first ``eos_token_id`` position, or ``argmax(ids)`` when
``eos_token_id == 2`` (pre-#24773 configs; transformers 5.23 ``CLIPTextTransformer.forward``).
``CLIPVisionEmbeddings.interpolate_pos_encoding`` resamples with ``nn.functional.interpolate(
mode='bicubic', align_corners=False)`` and no antialias (checked in transformers 5.23.0
modeling_clip.py), hence ``pos_interp='torch_bicubic'`` in the converted config.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from trace_jax.convert import common
from trace_jax.models.config import CLIPConfig, TextConfig, VisionConfig
from trace_jax.models.layers import LN_EPS

# transformers 5.23.0 configuration_clip.py defaults (save_pretrained omits values equal to them).
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5, eos_token_id=49407)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)

_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # HF "gelu" is the exact (erf) GELU, as ours


def _square(val, name):
  if isinstance(val, (list, tuple)):
    if len(set(val)) != 1:
      raise ValueError(f"vision_config.{name}={val!r}: only square sizes are supported")
    val = val[0]
  return int(val)


def config_from_hf(config: Mapping[str, Any]) -> CLIPConfig:
  """HF ``CLIPConfig`` dict (config.json) -> CLIPConfig, with HF's defaults for omitted fields."""
  config = dict(config)
  mt = config.get("model_type", "clip")
  if mt != "clip":
    raise ValueError(f"config.json has model_type={mt!r}; only 'clip' (CLIPModel) is supported")
  tc = {**TEXT_DEFAULTS, **(config.get("text_config") or {}), **(config.get("text_config_dict") or {})}
  vc = {**VISION_DEFAULTS, **(config.get("vision_config") or {}), **(config.get("vision_config_dict") or {})}
  cc = {**CLIP_DEFAULTS, **{k: v for k, v in config.items() if k in CLIP_DEFAULTS and v is not None}}
  acts = {tc["hidden_act"], vc["hidden_act"]}
  if len(acts) != 1 or not acts <= set(_ACTS):
    raise ValueError(f"hidden_act text={tc['hidden_act']!r} vision={vc['hidden_act']!r}: need the same "
                     f"activation in both towers, one of {sorted(_ACTS)}")
  for name, c in (("text_config", tc), ("vision_config", vc)):
    if abs(float(c["layer_norm_eps"]) - LN_EPS) > 1e-12:
      raise ValueError(f"{name}.layer_norm_eps={c['layer_norm_eps']} is not supported (trace_jax uses {LN_EPS})")
  if int(vc["num_channels"]) != 3:
    raise ValueError(f"vision_config.num_channels={vc['num_channels']}: only RGB (3) is supported")
  eos = tc["eos_token_id"]
  if isinstance(eos, (list, tuple)):
    if len(eos) != 1:
      raise ValueError(f"text_config.eos_token_id={eos!r}: a single end-of-text id is needed")
    eos = eos[0]
  eos = int(eos)
  vw, tw = int(vc["hidden_size"]), int(tc["hidden_size"])
  vision = VisionConfig(image_size=_square(vc["image_size"], "image_size"),
                        patch_size=_square(vc["patch_size"], "patch_size"), width=vw,
                        layers=int(vc["num_hidden_layers"]), heads=int(vc["num_attention_heads"]),
                        mlp_ratio=common.mlp_ratio(int(vc["intermediate_size"]), vw), pos_interp="torch_bicubic")
  text = TextConfig(context_length=int(tc["max_position_embeddings"]), vocab_size=int(tc["vocab_size"]),
                    width=tw, heads=int(tc["num_attention_heads"]), layers=int(tc["num_hidden_layers"]),
                    mlp_ratio=common.mlp_ratio(int(tc["intermediate_size"]), tw),
                    pool="argmax" if eos == 2 else "eos", eos_token_id=eos)
  return CLIPConfig(vision=vision, text=text, embed_dim=int(cc["projection_dim"]),
                    act=_ACTS[vc["hidden_act"]], logit_scale_init=float(cc["logit_scale_init_value"]))


def _block_shapes(prefix: str, w: int, h: int) -> dict[str, tuple[int, ...]]:
  out = {}
  for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
    out[f"{prefix}.self_attn.{n}.weight"] = (w, w)
    out[f"{prefix}.self_attn.{n}.bias"] = (w,)
  for n in ("layer_norm1", "layer_norm2"):
    out[f"{prefix}.{n}.weight"] = (w,)
    out[f"{prefix}.{n}.bias"] = (w,)
  out.update({f"{prefix}.mlp.fc1.weight": (h, w), f"{prefix}.mlp.fc1.bias": (h,),
              f"{prefix}.mlp.fc2.weight": (w, h), f"{prefix}.mlp.fc2.bias": (w,)})
  return out


def source_shapes(cfg: CLIPConfig) -> dict[str, tuple[int, ...]]:
  """{source key: shape} of a HF CLIPModel state dict for this config."""
  v, t, e = cfg.vision, cfg.text, cfg.embed_dim
  want = {
      "vision_model.embeddings.class_embedding": (v.width,),
      "vision_model.embeddings.patch_embedding.weight": (v.width, 3, v.patch_size, v.patch_size),
      "vision_model.embeddings.position_embedding.weight": (v.grid ** 2 + 1, v.width),
      "vision_model.pre_layrnorm.weight": (v.width,), "vision_model.pre_layrnorm.bias": (v.width,),
      "vision_model.post_layernorm.weight": (v.width,), "vision_model.post_layernorm.bias": (v.width,),
      "visual_projection.weight": (e, v.width),
      "text_model.embeddings.token_embedding.weight": (t.vocab_size, t.width),
      "text_model.embeddings.position_embedding.weight": (t.context_length, t.width),
      "text_model.final_layer_norm.weight": (t.width,), "text_model.final_layer_norm.bias": (t.width,),
      "text_projection.weight": (e, t.width),
      "logit_scale": (),
  }
  for i in range(v.layers):
    want.update(_block_shapes(f"vision_model.encoder.layers.{i}", v.width, int(v.width * v.mlp_ratio)))
  for i in range(t.layers):
    want.update(_block_shapes(f"text_model.encoder.layers.{i}", t.width, int(t.width * t.mlp_ratio)))
  return want


def _blocks(get, prefix: str, layers: int, heads: int) -> dict:
  return {f"block_{i}": common.block_params(get, heads, {
      "ln_1": f"{prefix}{i}.layer_norm1", "ln_2": f"{prefix}{i}.layer_norm2",
      "q": f"{prefix}{i}.self_attn.q_proj", "k": f"{prefix}{i}.self_attn.k_proj",
      "v": f"{prefix}{i}.self_attn.v_proj", "out": f"{prefix}{i}.self_attn.out_proj",
      "fc": f"{prefix}{i}.mlp.fc1", "proj": f"{prefix}{i}.mlp.fc2"}) for i in range(layers)}


def params_from_hf_state_dict(sd: Mapping[str, np.ndarray], cfg: CLIPConfig, what: str = "HF CLIPModel state dict") -> dict:
  """HF CLIPModel state dict -> float32 params; refuses missing / unexpected / mis-shaped source keys."""
  sd = common.drop_ignored(sd)
  common.check_source(sd, source_shapes(cfg), what)
  get = common.getter(sd)
  v, t = cfg.vision, cfg.text
  ve, te = "vision_model.embeddings.", "text_model.embeddings."
  visual = {
      "conv1": common.conv_kernel(get(ve + "patch_embedding.weight")),
      "class_embedding": get(ve + "class_embedding"),
      "positional_embedding": get(ve + "position_embedding.weight"),
      "ln_pre": common.ln(get("vision_model.pre_layrnorm.weight"), get("vision_model.pre_layrnorm.bias")),
      "transformer": _blocks(get, "vision_model.encoder.layers.", v.layers, v.heads),
      "ln_post": common.ln(get("vision_model.post_layernorm.weight"), get("vision_model.post_layernorm.bias")),
      "proj": common.linear(get("visual_projection.weight")),
  }
  text = {
      "token_embedding": {"embedding": get(te + "token_embedding.weight")},
      "positional_embedding": get(te + "position_embedding.weight"),
      "transformer": _blocks(get, "text_model.encoder.layers.", t.layers, t.heads),
      "ln_final": common.ln(get("text_model.final_layer_norm.weight"), get("text_model.final_layer_norm.bias")),
      "text_projection": common.linear(get("text_projection.weight")),
  }
  params = {"visual": visual, "text": text, "logit_scale": get("logit_scale").reshape(())}
  return common.finalize(params, cfg, what)


def from_torch_model(model) -> tuple[CLIPConfig, dict]:
  """(config, params) of an in-memory ``transformers.CLIPModel``."""
  cfg = config_from_hf(model.config.to_dict())
  sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
  return cfg, params_from_hf_state_dict(sd, cfg, "HF CLIPModel")


TOKENIZER_FILES = ("vocab.json", "merges.txt")


def load_hf_dir(path: str) -> tuple[CLIPConfig, dict]:
  """(config, params) of a ``save_pretrained`` folder (config.json + model.safetensors, or
  pytorch_model.bin which needs torch). Sharded checkpoints are read via their index file."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{path} is not a Hugging Face model folder: {cfg_path} is missing")
  with open(cfg_path) as f:
    cfg = config_from_hf(json.load(f))
  sd, src = common.read_hf_weights(path)
  return cfg, params_from_hf_state_dict(sd, cfg, f"HF checkpoint {src}")


def tokenizer_files(path: str) -> dict[str, str]:
  """vocab.json + merges.txt of a HF folder, if both are present."""
  files = {n: os.path.join(path, n) for n in TOKENIZER_FILES}
  return files if all(os.path.isfile(p) for p in files.values()) else {}
