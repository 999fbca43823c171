"""SigLIP checkpoints (open_clip 2.23.0, Hugging Face ``SiglipModel``, big_vision ``.npz``) -> trace_jax.

Target: trace_jax/models/siglip.py (a ``CLIPConfig`` with ``vision.kind='siglip'``). Layouts:

* open_clip ``CustomTextCLIP`` (``ViT-B-16-SigLIP*``, ``ViT-L-16-SigLIP-*``, ``ViT-SO400M-14-SigLIP*``):
  ``visual.trunk.*`` = timm ``VisionTransformer(class_token=False, global_pool='map')`` (fused ``qkv``,
  ``attn_pool.{latent,q,kv,proj,norm,mlp}``), ``text.*`` = open_clip ``TextTransformer`` (torch MHA
  ``in_proj``; ``text_projection`` a ``Linear`` with bias), ``logit_scale``, ``logit_bias``. timm's
  GELU is the erf form -> ``act='gelu'``.
* Hugging Face ``SiglipModel`` (transformers 5.x ``modeling_siglip.py``): ``vision_model.*`` (separate
  q/k/v, ``head.probe`` + ``head.attention`` = torch MHA), ``text_model.head``; ``logit_scale`` /
  ``logit_bias`` [1]. ``hidden_act='gelu_pytorch_tanh'`` -> ``act='gelu_tanh'``; HF resamples the
  position grid with torch bicubic without antialias -> ``pos_interp='torch_bicubic'``.
* big_vision ``.npz`` (``np.savez`` of the flattened params, keys ``params/img/...``, ``params/txt/...``,
  ``params/t``, ``params/b``; big_vision/models/vit.py, proj/image_text/text_transformer.py and
  two_towers.py @ 0127fb6): flax kernels are already [in, out] / [W, heads, e] / [heads, e, W]; the
  image tower is ``embedding`` (conv HWIO) + ``pos_embedding`` [1, N, W] + ``Transformer/encoderblock_i``
  (``LayerNorm_0``, ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0/Dense_{0,1}``) +
  ``Transformer/encoder_norm`` + ``MAPHead_0`` (+ an optional ``head``); the text tower ``Embed_0``,
  ``pos_embedding``, ``Encoder_0/encoderblock_i``, ``Encoder_0/encoder_norm``, ``head``. Sizes come from
  the arrays, the head counts from ``--model-name`` (a big_vision variant ``B/16``, ``L/16``,
  ``So400m/14``, ... optionally ``@<image size>``, or one of our SigLIP preset names). big_vision's
  ``nn.gelu`` is the tanh form -> ``act='gelu_tanh'``. Stacked (``scan=True``) ``encoderblock/``
  checkpoints are unstacked.

Every loader checks the source keys and shapes first (``common.check_source`` -> treecheck: unknown,
missing and mis-shaped keys are named) and the result against the model (``common.finalize``).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np

from trace_jax.convert import common
from trace_jax.models.config import CLIPConfig
from trace_jax.models.siglip import make_config, options

# ---------------------------------------------------------------------------------------------
# shared pieces

def _mha(q, k, v, o, heads: int, bq, bk, bv, bo) -> dict:
  """Our attention params from torch-layout q/k/v/out Linear weights [W, W] and biases."""
  return {"query": {"kernel": common.qkv_kernel(q, heads), "bias": common.qkv_bias(bq, heads)},
          "key": {"kernel": common.qkv_kernel(k, heads), "bias": common.qkv_bias(bk, heads)},
          "value": {"kernel": common.qkv_kernel(v, heads), "bias": common.qkv_bias(bv, heads)},
          "out": {"kernel": common.out_kernel(o, heads), "bias": bo}}


def _map_head(heads: int, probe, q, k, v, bq, bk, bv, o, bo, ln_w, ln_b, fc1, b1, fc2, b2) -> dict:
  """MAP head params (trace_jax/models/siglip.py ``MAPHead``) from torch-layout pieces."""
  p = _mha(q, k, v, o, heads, bq, bk, bv, bo)
  p.update({"probe": np.asarray(probe, np.float32).reshape(1, -1), "ln": common.ln(ln_w, ln_b),
            "mlp_fc": {"kernel": common.linear(fc1), "bias": b1},
            "mlp_proj": {"kernel": common.linear(fc2), "bias": b2}})
  return p


def _check_options(cfg: CLIPConfig) -> dict:
  o = options(cfg)
  if o["image_head"]:
    raise ValueError("this SigLIP layout has no image head; the config asks for one")
  return o


# ---------------------------------------------------------------------------------------------
# open_clip

# timm SigLIP trunks of open_clip 2.23.0's model_configs -> heads (timm vision_transformer.py).
TIMM_HEADS = {"vit_base_patch16_siglip": 12, "vit_large_patch16_siglip": 16, "vit_so400m_patch14_siglip": 16}


def is_openclip_siglip(model_cfg: Mapping[str, Any]) -> bool:
  vc = model_cfg.get("vision_cfg", {}) or {}
  return model_cfg.get("init_logit_bias") is not None or "siglip" in str(vc.get("timm_model_name") or "")


def _timm_heads(name: str) -> int:
  for prefix, h in TIMM_HEADS.items():
    if name.startswith(prefix):
      return h
  try:  # a timm model registered by the caller (e.g. a tiny test trunk): read it off the module
    import timm
    import torch
    with torch.device("meta"):
      m = timm.create_model(name, pretrained=False, num_classes=0, global_pool="map")
    return int(m.blocks[0].attn.num_heads)
  except Exception as e:  # noqa: BLE001 - any failure: the name is unknown here
    raise ValueError(f"unknown timm SigLIP trunk {name!r}: its head count is not known (known: "
                     f"{sorted(TIMM_HEADS)}; a custom one must be registered with timm)") from e


def config_from_openclip(model_cfg: Mapping[str, Any], sd: Mapping[str, np.ndarray]) -> CLIPConfig:
  """open_clip SigLIP ``model_cfg`` + its state dict -> config (sizes read from the arrays)."""
  mc = dict(model_cfg)
  vc, tc = dict(mc.get("vision_cfg", {}) or {}), dict(mc.get("text_cfg", {}) or {})
  bad = []
  if not vc.get("timm_model_name"):
    bad.append("vision_cfg.timm_model_name (open_clip SigLIP uses a timm trunk)")
  if vc.get("timm_pool", "map") != "map":
    bad.append(f"vision_cfg.timm_pool={vc.get('timm_pool')!r} (need 'map')")
  if vc.get("timm_proj", "none") not in ("none", None):
    bad.append(f"vision_cfg.timm_proj={vc.get('timm_proj')!r} (need 'none')")
  want_text = {"no_causal_mask": True, "pool_type": "last", "proj_bias": True}
  for k, v in want_text.items():
    if tc.get(k) != v:
      bad.append(f"text_cfg.{k}={tc.get(k)!r} (SigLIP: {v!r})")
  if tc.get("hf_model_name") or tc.get("embed_cls") or tc.get("ls_init_value") is not None:
    bad.append("text_cfg hf_model_name / embed_cls / ls_init_value")
  eps = float((tc.get("norm_kwargs") or {}).get("eps", 1e-5))
  if abs(eps - 1e-6) > 1e-12:
    bad.append(f"text_cfg.norm_kwargs.eps={eps} (the timm trunk uses 1e-6; one eps for both towers)")
  if mc.get("quick_gelu"):
    bad.append("quick_gelu=True")
  if bad:
    raise ValueError("open_clip SigLIP config uses options trace_jax's SigLIP does not support: " + ", ".join(bad))
  t = "visual.trunk."
  for k in (t + "patch_embed.proj.weight", t + "pos_embed", "text.token_embedding.weight"):
    if k not in sd:
      raise ValueError(f"open_clip SigLIP state dict lacks {k!r}: not a SigLIP checkpoint?")
  w, _, p, _ = sd[t + "patch_embed.proj.weight"].shape
  n = sd[t + "pos_embed"].shape[1]
  g = int(round(math.sqrt(n)))
  layers = common.count_layers(sd, t + "blocks.")
  hidden = sd[t + "blocks.0.mlp.fc1.weight"].shape[0]
  image_size = vc.get("image_size", g * p)
  image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
  if g * p != image_size:
    raise ValueError(f"pos_embed has a {g}x{g} grid of {p}px patches, but image_size is {image_size}")
  vocab, tw = sd["text.token_embedding.weight"].shape
  return make_config(
      image_size=int(image_size), patch_size=int(p), width=int(w), layers=layers,
      heads=_timm_heads(vc["timm_model_name"]), mlp_dim=int(hidden), embed_dim=int(mc.get("embed_dim", w)),
      context_length=int(sd["text.positional_embedding"].shape[0]), vocab_size=int(vocab), text_width=int(tw),
      text_heads=int(tc.get("heads", 8)), text_layers=common.count_layers(sd, "text.transformer.resblocks."),
      text_mlp_dim=int(sd["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]), act="gelu",
      logit_bias_init=float(mc.get("init_logit_bias") or -10.0))


def openclip_source_shapes(cfg: CLIPConfig) -> dict[str, tuple[int, ...]]:
  v, t, e = cfg.vision, cfg.text, cfg.embed_dim
  w, tw = v.width, t.width
  vh, th = int(round(w * v.mlp_ratio)), int(round(tw * t.mlp_ratio))
  tr = "visual.trunk."
  want = {tr + "pos_embed": (1, v.grid ** 2, w), tr + "patch_embed.proj.weight": (w, 3, v.patch_size, v.patch_size),
          tr + "patch_embed.proj.bias": (w,), tr + "norm.weight": (w,), tr + "norm.bias": (w,),
          tr + "attn_pool.latent": (1, 1, w), tr + "attn_pool.q.weight": (w, w), tr + "attn_pool.q.bias": (w,),
          tr + "attn_pool.kv.weight": (2 * w, w), tr + "attn_pool.kv.bias": (2 * w,),
          tr + "attn_pool.proj.weight": (w, w), tr + "attn_pool.proj.bias": (w,),
          tr + "attn_pool.norm.weight": (w,), tr + "attn_pool.norm.bias": (w,),
          tr + "attn_pool.mlp.fc1.weight": (vh, w), tr + "attn_pool.mlp.fc1.bias": (vh,),
          tr + "attn_pool.mlp.fc2.weight": (w, vh), tr + "attn_pool.mlp.fc2.bias": (w,),
          "text.positional_embedding": (t.context_length, tw), "text.token_embedding.weight": (t.vocab_size, tw),
          "text.ln_final.weight": (tw,), "text.ln_final.bias": (tw,),
          "text.text_projection.weight": (e, tw), "text.text_projection.bias": (e,),
          "logit_scale": (), "logit_bias": ()}
  for i in range(v.layers):
    b = f"{tr}blocks.{i}."
    want.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
                 b + "attn.qkv.bias": (3 * w,), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                 b + "norm2.weight": (w,), b + "norm2.bias": (w,), b + "mlp.fc1.weight": (vh, w),
                 b + "mlp.fc1.bias": (vh,), b + "mlp.fc2.weight": (w, vh), b + "mlp.fc2.bias": (w,)})
  for i in range(t.layers):
    b = f"text.transformer.resblocks.{i}."
    want.update({b + "ln_1.weight": (tw,), b + "ln_1.bias": (tw,), b + "attn.in_proj_weight": (3 * tw, tw),
                 b + "attn.in_proj_bias": (3 * tw,), b + "attn.out_proj.weight": (tw, tw),
                 b + "attn.out_proj.bias": (tw,), b + "ln_2.weight": (tw,), b + "ln_2.bias": (tw,),
                 b + "mlp.c_fc.weight": (th, tw), b + "mlp.c_fc.bias": (th,), b + "mlp.c_proj.weight": (tw, th),
                 b + "mlp.c_proj.bias": (tw,)})
  return want


def params_from_openclip(sd: Mapping[str, np.ndarray], cfg: CLIPConfig,
                         what: str = "open_clip SigLIP state dict") -> dict:
  _check_options(cfg)
  sd = common.drop_ignored(sd)
  common.check_source(sd, openclip_source_shapes(cfg), what)
  get = common.getter(sd)
  v, t = cfg.vision, cfg.text
  tr = "visual.trunk."
  blocks = {}
  for i in range(v.layers):
    b = f"{tr}blocks.{i}."
    q, k, vv = np.split(get(b + "attn.qkv.weight"), 3, 0)
    bq, bk, bv = np.split(get(b + "attn.qkv.bias"), 3, 0)
    blocks[f"block_{i}"] = {
        "ln_1": common.ln(get(b + "norm1.weight"), get(b + "norm1.bias")),
        "ln_2": common.ln(get(b + "norm2.weight"), get(b + "norm2.bias")),
        "attn": _mha(q, k, vv, get(b + "attn.proj.weight"), v.heads, bq, bk, bv, get(b + "attn.proj.bias")),
        "mlp_fc": {"kernel": common.linear(get(b + "mlp.fc1.weight")), "bias": get(b + "mlp.fc1.bias")},
        "mlp_proj": {"kernel": common.linear(get(b + "mlp.fc2.weight")), "bias": get(b + "mlp.fc2.bias")}}
  a = tr + "attn_pool."
  k, vv = np.split(get(a + "kv.weight"), 2, 0)
  bk, bv = np.split(get(a + "kv.bias"), 2, 0)
  head = _map_head(v.heads, get(a + "latent"), get(a + "q.weight"), k, vv, get(a + "q.bias"), bk, bv,
                   get(a + "proj.weight"), get(a + "proj.bias"), get(a + "norm.weight"), get(a + "norm.bias"),
                   get(a + "mlp.fc1.weight"), get(a + "mlp.fc1.bias"), get(a + "mlp.fc2.weight"),
                   get(a + "mlp.fc2.bias"))
  visual = {"conv1": common.conv_kernel(get(tr + "patch_embed.proj.weight")),
            "conv1_bias": get(tr + "patch_embed.proj.bias"),
            "positional_embedding": get(tr + "pos_embed")[0],
            "transformer": blocks, "ln_post": common.ln(get(tr + "norm.weight"), get(tr + "norm.bias")),
            "map_head": head}
  text = {"token_embedding": {"embedding": get("text.token_embedding.weight")},
          "positional_embedding": get("text.positional_embedding"),
          "transformer": {f"block_{i}": common.block_params(get, t.heads, {
              "ln_1": f"text.transformer.resblocks.{i}.ln_1", "ln_2": f"text.transformer.resblocks.{i}.ln_2",
              "in_proj": f"text.transformer.resblocks.{i}.attn.in_proj",
              "out": f"text.transformer.resblocks.{i}.attn.out_proj",
              "fc": f"text.transformer.resblocks.{i}.mlp.c_fc",
              "proj": f"text.transformer.resblocks.{i}.mlp.c_proj"}) for i in range(t.layers)},
          "ln_final": common.ln(get("text.ln_final.weight"), get("text.ln_final.bias")),
          "text_projection": common.linear(get("text.text_projection.weight")),
          "text_projection_bias": get("text.text_projection.bias")}
  params = {"visual": visual, "text": text, "logit_scale": get("logit_scale").reshape(()),
            "logit_bias": get("logit_bias").reshape(())}
  return common.finalize(params, cfg, what)


def load_openclip(model_cfg: Mapping[str, Any], sd: Mapping[str, np.ndarray], what: str) -> tuple[CLIPConfig, dict]:
  sd = common.drop_ignored(sd)
  cfg = config_from_openclip(model_cfg, sd)
  return cfg, params_from_openclip(sd, cfg, what)


def from_openclip_model(model, model_cfg: Mapping[str, Any]) -> tuple[CLIPConfig, dict]:
  """(config, params) of an in-memory open_clip SigLIP ``CustomTextCLIP`` with its ``model_cfg``."""
  sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
  return load_openclip(model_cfg, sd, "open_clip SigLIP model")


# ---------------------------------------------------------------------------------------------
# Hugging Face SiglipModel

HF_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                        layer_norm_eps=1e-6)
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                          layer_norm_eps=1e-6, vision_use_head=True)
_HF_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def config_from_hf(config: Mapping[str, Any]) -> CLIPConfig:
  """HF ``SiglipConfig`` dict (config.json) -> config (transformers 5.x defaults for omitted fields)."""
  config = dict(config)
  if config.get("model_type") != "siglip":
    raise ValueError(f"config.json has model_type={config.get('model_type')!r}; expected 'siglip' (SiglipModel)")
  tc = {**HF_TEXT_DEFAULTS, **(config.get("text_config") or {})}
  vc = {**HF_VISION_DEFAULTS, **(config.get("vision_config") or {})}
  acts = {tc["hidden_act"], vc["hidden_act"]}
  if len(acts) != 1 or not acts <= set(_HF_ACTS):
    raise ValueError(f"hidden_act text={tc['hidden_act']!r} vision={vc['hidden_act']!r}: need the same "
                     f"activation in both towers, one of {sorted(_HF_ACTS)}")
  eps = {float(tc["layer_norm_eps"]), float(vc["layer_norm_eps"])}
  if len(eps) != 1:
    raise ValueError(f"layer_norm_eps differs between the towers ({sorted(eps)}); one eps is supported")
  if not vc.get("vision_use_head", True):
    raise ValueError("vision_config.vision_use_head=False (no MAP head) is not supported")
  if int(vc["num_channels"]) != 3:
    raise ValueError(f"vision_config.num_channels={vc['num_channels']}: only RGB (3) is supported")
  sq = lambda x: int(x[0] if isinstance(x, (list, tuple)) else x)
  vw, tw = int(vc["hidden_size"]), int(tc["hidden_size"])
  cfg = make_config(
      image_size=sq(vc["image_size"]), patch_size=sq(vc["patch_size"]), width=vw,
      layers=int(vc["num_hidden_layers"]), heads=int(vc["num_attention_heads"]), mlp_dim=int(vc["intermediate_size"]),
      embed_dim=int(tc.get("projection_size") or tw), context_length=int(tc["max_position_embeddings"]),
      vocab_size=int(tc["vocab_size"]), text_width=tw, text_heads=int(tc["num_attention_heads"]),
      text_layers=int(tc["num_hidden_layers"]), text_mlp_dim=int(tc["intermediate_size"]),
      act=_HF_ACTS[vc["hidden_act"]], ln_eps=eps.pop())
  if cfg.embed_dim != vw:
    raise ValueError(f"text projection_size {cfg.embed_dim} differs from the image width {vw}: "
                     f"SiglipModel's image embedding is the pooled width")
  return cfg.replace(vision=cfg.vision.__class__(**{**cfg.vision.__dict__, "pos_interp": "torch_bicubic"}))


def hf_source_shapes(cfg: CLIPConfig) -> dict[str, tuple[int, ...]]:
  v, t, e = cfg.vision, cfg.text, cfg.embed_dim
  w, tw = v.width, t.width
  vh, th = int(round(w * v.mlp_ratio)), int(round(tw * t.mlp_ratio))
  vm, tm = "vision_model.", "text_model."
  want = {vm + "embeddings.patch_embedding.weight": (w, 3, v.patch_size, v.patch_size),
          vm + "embeddings.patch_embedding.bias": (w,), vm + "embeddings.position_embedding.weight": (v.grid ** 2, w),
          vm + "post_layernorm.weight": (w,), vm + "post_layernorm.bias": (w,), vm + "head.probe": (1, 1, w),
          vm + "head.attention.in_proj_weight": (3 * w, w), vm + "head.attention.in_proj_bias": (3 * w,),
          vm + "head.attention.out_proj.weight": (w, w), vm + "head.attention.out_proj.bias": (w,),
          vm + "head.layernorm.weight": (w,), vm + "head.layernorm.bias": (w,),
          vm + "head.mlp.fc1.weight": (vh, w), vm + "head.mlp.fc1.bias": (vh,),
          vm + "head.mlp.fc2.weight": (w, vh), vm + "head.mlp.fc2.bias": (w,),
          tm + "embeddings.token_embedding.weight": (t.vocab_size, tw),
          tm + "embeddings.position_embedding.weight": (t.context_length, tw),
          tm + "final_layer_norm.weight": (tw,), tm + "final_layer_norm.bias": (tw,),
          tm + "head.weight": (e, tw), tm + "head.bias": (e,), "logit_scale": (), "logit_bias": ()}
  from trace_jax.convert.hf import _block_shapes
  for i in range(v.layers):
    want.update(_block_shapes(f"{vm}encoder.layers.{i}", w, vh))
  for i in range(t.layers):
    want.update(_block_shapes(f"{tm}encoder.layers.{i}", tw, th))
  return want


def params_from_hf(sd: Mapping[str, np.ndarray], cfg: CLIPConfig, what: str = "HF SiglipModel state dict") -> dict:
  from trace_jax.convert.hf import _blocks
  _check_options(cfg)
  sd = common.drop_ignored(sd)
  common.check_source(sd, hf_source_shapes(cfg), what)
  get = common.getter(sd)
  v, t = cfg.vision, cfg.text
  vm, tm, h = "vision_model.", "text_model.", "vision_model.head."
  q, k, vv = np.split(get(h + "attention.in_proj_weight"), 3, 0)
  bq, bk, bv = np.split(get(h + "attention.in_proj_bias"), 3, 0)
  head = _map_head(v.heads, get(h + "probe"), q, k, vv, bq, bk, bv, get(h + "attention.out_proj.weight"),
                   get(h + "attention.out_proj.bias"), get(h + "layernorm.weight"), get(h + "layernorm.bias"),
                   get(h + "mlp.fc1.weight"), get(h + "mlp.fc1.bias"), get(h + "mlp.fc2.weight"),
                   get(h + "mlp.fc2.bias"))
  visual = {"conv1": common.conv_kernel(get(vm + "embeddings.patch_embedding.weight")),
            "conv1_bias": get(vm + "embeddings.patch_embedding.bias"),
            "positional_embedding": get(vm + "embeddings.position_embedding.weight"),
            "transformer": _blocks(get, vm + "encoder.layers.", v.layers, v.heads),
            "ln_post": common.ln(get(vm + "post_layernorm.weight"), get(vm + "post_layernorm.bias")),
            "map_head": head}
  text = {"token_embedding": {"embedding": get(tm + "embeddings.token_embedding.weight")},
          "positional_embedding": get(tm + "embeddings.position_embedding.weight"),
          "transformer": _blocks(get, tm + "encoder.layers.", t.layers, t.heads),
          "ln_final": common.ln(get(tm + "final_layer_norm.weight"), get(tm + "final_layer_norm.bias")),
          "text_projection": common.linear(get(tm + "head.weight")), "text_projection_bias": get(tm + "head.bias")}
  params = {"visual": visual, "text": text, "logit_scale": get("logit_scale").reshape(()),
            "logit_bias": get("logit_bias").reshape(())}
  return common.finalize(params, cfg, what)


def from_hf_model(model) -> tuple[CLIPConfig, dict]:
  """(config, params) of an in-memory ``transformers.SiglipModel``."""
  cfg = config_from_hf(model.config.to_dict())
  sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
  return cfg, params_from_hf(sd, cfg, "HF SiglipModel")


# ---------------------------------------------------------------------------------------------
# big_vision .npz

# big_vision/models/vit.py decode_variant: width, depth, mlp_dim, num_heads.
VARIANTS = {"mu": (32, 1, 128, 2), "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
            "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "So400m": (1152, 27, 4304, 16),
            "H": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16), "g-opt": (1536, 40, 6144, 16),
            "G": (1664, 48, 8192, 16), "G-opt": (1536, 48, 8192, 16), "e": (1792, 56, 15360, 16)}


def parse_variant(name: str) -> tuple[int, int | None]:
  """'B/16' -> (heads 12, patch 16); 'So400m/14@384' -> (16, 14); a SigLIP preset name -> its heads.

  The image size (``@384``) and every other size are read from the arrays; only the head count is
  not stored in a checkpoint (text tower: the same variant as the image tower, as in SigLIP)."""
  base = name.split("@", 1)[0]
  v, _, patch = base.partition("/")
  if v in VARIANTS:
    return VARIANTS[v][3], (int(patch) if patch else None)
  from trace_jax.models.presets import NAMED
  if name in NAMED and NAMED[name].vision.kind == "siglip":
    return NAMED[name].vision.heads, NAMED[name].vision.patch_size
  raise ValueError(f"unknown big_vision variant {name!r}: expected e.g. 'B/16', 'So400m/14' (variants "
                   f"{sorted(VARIANTS)}) or a SigLIP preset name")


def load_npz(path: str) -> dict[str, np.ndarray]:
  """{key: float32 array} of a big_vision ``.npz`` (keys normalised to start with ``params/``);
  stacked ``encoderblock/`` (``scan=True``) arrays are split into ``encoderblock_{i}/``."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  try:
    with np.load(path, allow_pickle=False) as z:
      raw = {k: np.asarray(z[k]) for k in z.files}
  except (ValueError, OSError) as e:
    raise ValueError(f"{path}: not a readable .npz file ({e})") from None
  out = {}
  for k, a in raw.items():
    key = k if k.startswith("params/") else "params/" + k
    m = re.match(r"(.*/)encoderblock/(.*)$", key)
    if m:  # scan=True: leading layer axis
      for i in range(a.shape[0]):
        out[f"{m.group(1)}encoderblock_{i}/{m.group(2)}"] = common._to_f32(a[i])
    else:
      out[key] = common._to_f32(a)
  return out


def _bv_block_shapes(prefix: str, w: int, heads: int, hidden: int) -> dict:
  want = {}
  for ln in ("LayerNorm_0", "LayerNorm_1"):
    want[f"{prefix}{ln}/scale"] = (w,)
    want[f"{prefix}{ln}/bias"] = (w,)
  want.update(_bv_mha_shapes(prefix + "MultiHeadDotProductAttention_0/", w, heads))
  want.update({f"{prefix}MlpBlock_0/Dense_0/kernel": (w, hidden), f"{prefix}MlpBlock_0/Dense_0/bias": (hidden,),
               f"{prefix}MlpBlock_0/Dense_1/kernel": (hidden, w), f"{prefix}MlpBlock_0/Dense_1/bias": (w,)})
  return want


def _bv_mha_shapes(prefix: str, w: int, heads: int) -> dict:
  e = w // heads
  want = {}
  for n in ("query", "key", "value"):
    want[f"{prefix}{n}/kernel"] = (w, heads, e)
    want[f"{prefix}{n}/bias"] = (heads, e)
  want[f"{prefix}out/kernel"] = (heads, e, w)
  want[f"{prefix}out/bias"] = (w,)
  return want


def config_from_bigvision(w: Mapping[str, np.ndarray], variant: str) -> CLIPConfig:
  """Config from the arrays of a big_vision SigLIP checkpoint and its variant name (head count)."""
  heads, patch = parse_variant(variant)
  i, tx = "params/img/", "params/txt/"
  for k in (i + "embedding/kernel", i + "pos_embedding", i + "MAPHead_0/probe", tx + "Embed_0/embedding",
            tx + "head/kernel", "params/t", "params/b"):
    if k not in w:
      raise ValueError(f"big_vision checkpoint lacks {k!r}: not a SigLIP (two_towers, MAP-pooled ViT, "
                       f"text 'last' pooling, learned bias) checkpoint?")
  p, _, _, width = w[i + "embedding/kernel"].shape
  if patch is not None and patch != p:
    raise ValueError(f"--model-name {variant!r} says patch {patch}, the checkpoint's embedding has {p}")
  n = w[i + "pos_embedding"].shape[1]
  g = int(round(math.sqrt(n)))
  if g * g != n:
    raise ValueError(f"img/pos_embedding has {n} rows: not a square grid")
  if "@" in variant and int(variant.split("@", 1)[1]) != g * p:
    raise ValueError(f"--model-name {variant!r} says image size {variant.split('@', 1)[1]}, the "
                     f"checkpoint's position grid {g}x{g} of {p}px patches gives {g * p}")
  layers = len({k.split("/")[3] for k in w if k.startswith(i + "Transformer/encoderblock_")})
  hidden = w[i + "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]
  vocab, tw = w[tx + "Embed_0/embedding"].shape
  t_layers = len({k.split("/")[3] for k in w if k.startswith(tx + "Encoder_0/encoderblock_")})
  t_hidden = w[tx + "Encoder_0/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]
  t_heads = w[tx + "Encoder_0/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"].shape[1]
  v_heads = w[i + "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"].shape[1]
  if v_heads != heads:
    raise ValueError(f"--model-name {variant!r} has {heads} heads, the checkpoint's kernels have {v_heads}")
  has_head = i + "head/kernel" in w
  embed = w[tx + "head/kernel"].shape[1]
  return make_config(image_size=g * p, patch_size=int(p), width=int(width), layers=layers, heads=heads,
                     mlp_dim=int(hidden), embed_dim=int(embed), context_length=int(w[tx + "pos_embedding"].shape[1]),
                     vocab_size=int(vocab), text_width=int(tw), text_heads=int(t_heads), text_layers=t_layers,
                     text_mlp_dim=int(t_hidden), act="gelu_tanh", image_head=has_head)


def bigvision_source_shapes(cfg: CLIPConfig) -> dict[str, tuple[int, ...]]:
  v, t, e = cfg.vision, cfg.text, cfg.embed_dim
  w, tw = v.width, t.width
  vh, th = int(round(w * v.mlp_ratio)), int(round(tw * t.mlp_ratio))
  i, tx = "params/img/", "params/txt/"
  want = {i + "embedding/kernel": (v.patch_size, v.patch_size, 3, w), i + "embedding/bias": (w,),
          i + "pos_embedding": (1, v.grid ** 2, w),
          i + "Transformer/encoder_norm/scale": (w,), i + "Transformer/encoder_norm/bias": (w,),
          i + "MAPHead_0/probe": (1, 1, w), i + "MAPHead_0/LayerNorm_0/scale": (w,),
          i + "MAPHead_0/LayerNorm_0/bias": (w,),
          i + "MAPHead_0/MlpBlock_0/Dense_0/kernel": (w, vh), i + "MAPHead_0/MlpBlock_0/Dense_0/bias": (vh,),
          i + "MAPHead_0/MlpBlock_0/Dense_1/kernel": (vh, w), i + "MAPHead_0/MlpBlock_0/Dense_1/bias": (w,),
          tx + "Embed_0/embedding": (t.vocab_size, tw), tx + "pos_embedding": (1, t.context_length, tw),
          tx + "Encoder_0/encoder_norm/scale": (tw,), tx + "Encoder_0/encoder_norm/bias": (tw,),
          tx + "head/kernel": (tw, e), tx + "head/bias": (e,), "params/t": (1,), "params/b": (1,)}
  want.update(_bv_mha_shapes(i + "MAPHead_0/MultiHeadDotProductAttention_0/", w, v.heads))
  if options(cfg)["image_head"]:
    want.update({i + "head/kernel": (w, e), i + "head/bias": (e,)})
  for l in range(v.layers):
    want.update(_bv_block_shapes(f"{i}Transformer/encoderblock_{l}/", w, v.heads, vh))
  for l in range(t.layers):
    want.update(_bv_block_shapes(f"{tx}Encoder_0/encoderblock_{l}/", tw, t.heads, th))
  return want


def _bv_block(get, prefix: str) -> dict:
  a = prefix + "MultiHeadDotProductAttention_0/"
  return {"ln_1": common.ln(get(prefix + "LayerNorm_0/scale"), get(prefix + "LayerNorm_0/bias")),
          "ln_2": common.ln(get(prefix + "LayerNorm_1/scale"), get(prefix + "LayerNorm_1/bias")),
          "attn": {n: {"kernel": get(f"{a}{n}/kernel"), "bias": get(f"{a}{n}/bias")}
                   for n in ("query", "key", "value", "out")},
          "mlp_fc": {"kernel": get(prefix + "MlpBlock_0/Dense_0/kernel"), "bias": get(prefix + "MlpBlock_0/Dense_0/bias")},
          "mlp_proj": {"kernel": get(prefix + "MlpBlock_0/Dense_1/kernel"),
                       "bias": get(prefix + "MlpBlock_0/Dense_1/bias")}}


def params_from_bigvision(w: Mapping[str, np.ndarray], cfg: CLIPConfig, what: str = "big_vision checkpoint") -> dict:
  common.check_source(w, bigvision_source_shapes(cfg), what)
  get = common.getter(w)
  v, t = cfg.vision, cfg.text
  i, tx = "params/img/", "params/txt/"
  mh = i + "MAPHead_0/"
  a = mh + "MultiHeadDotProductAttention_0/"
  head = {n: {"kernel": get(f"{a}{n}/kernel"), "bias": get(f"{a}{n}/bias")} for n in ("query", "key", "value", "out")}
  head.update({"probe": get(mh + "probe").reshape(1, -1),
               "ln": common.ln(get(mh + "LayerNorm_0/scale"), get(mh + "LayerNorm_0/bias")),
               "mlp_fc": {"kernel": get(mh + "MlpBlock_0/Dense_0/kernel"), "bias": get(mh + "MlpBlock_0/Dense_0/bias")},
               "mlp_proj": {"kernel": get(mh + "MlpBlock_0/Dense_1/kernel"), "bias": get(mh + "MlpBlock_0/Dense_1/bias")}})
  visual = {"conv1": get(i + "embedding/kernel"), "conv1_bias": get(i + "embedding/bias"),
            "positional_embedding": get(i + "pos_embedding")[0],
            "transformer": {f"block_{l}": _bv_block(get, f"{i}Transformer/encoderblock_{l}/") for l in range(v.layers)},
            "ln_post": common.ln(get(i + "Transformer/encoder_norm/scale"), get(i + "Transformer/encoder_norm/bias")),
            "map_head": head}
  if options(cfg)["image_head"]:
    visual["proj"], visual["proj_bias"] = get(i + "head/kernel"), get(i + "head/bias")
  text = {"token_embedding": {"embedding": get(tx + "Embed_0/embedding")},
          "positional_embedding": get(tx + "pos_embedding")[0],
          "transformer": {f"block_{l}": _bv_block(get, f"{tx}Encoder_0/encoderblock_{l}/") for l in range(t.layers)},
          "ln_final": common.ln(get(tx + "Encoder_0/encoder_norm/scale"), get(tx + "Encoder_0/encoder_norm/bias")),
          "text_projection": get(tx + "head/kernel"), "text_projection_bias": get(tx + "head/bias")}
  # two_towers.py: t is log-temperature (out["t"] = exp(t)), b the bias; both shape (1,).
  params = {"visual": visual, "text": text, "logit_scale": get("params/t").reshape(()),
            "logit_bias": get("params/b").reshape(())}
  return common.finalize(params, cfg, what)


def load_bigvision(path: str, model_name: str | None) -> tuple[CLIPConfig, dict]:
  """(config, params) of a big_vision SigLIP ``.npz`` given its variant (``--model-name B/16``)."""
  if not model_name:
    raise ValueError("--from bigvision needs --model-name with the big_vision variant (e.g. B/16, So400m/14): "
                     "the head count is not stored in the checkpoint")
  w = load_npz(path)
  cfg = config_from_bigvision(w, model_name)
  return cfg, params_from_bigvision(w, cfg, f"big_vision checkpoint {path}")


# ---------------------------------------------------------------------------------------------
# entry points of convert/api.py

def load_hf_dir(path: str, config: Mapping[str, Any]) -> tuple[CLIPConfig, dict]:
  """(config, params) of a ``SiglipModel`` save_pretrained folder (``config``: its config.json)."""
  cfg = config_from_hf(config)
  sd, src = common.read_hf_weights(path)
  return cfg, params_from_hf(sd, cfg, f"HF checkpoint {src}")


def is_hf_siglip_dir(path: str) -> bool:
  """A save_pretrained folder whose config.json says model_type 'siglip'."""
  p = os.path.join(path, "config.json")
  if not os.path.isfile(p):
    return False
  try:
    with open(p) as f:
      return json.load(f).get("model_type") == "siglip"
  except (OSError, ValueError, AttributeError):
    return False


def hf_config(path: str) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def maybe_load_openclip(path: str, model_name: str | None) -> tuple[CLIPConfig, dict] | None:
  """(config, params) if ``path`` (hub folder, or bare state dict + ``model_name``) is an open_clip
  SigLIP checkpoint, else None (the CLIP converter handles it)."""
  from trace_jax.convert import openclip
  if os.path.isdir(path):
    cfg_path = os.path.join(path, "open_clip_config.json")
    if os.path.isfile(cfg_path):
      with open(cfg_path) as f:
        mc = json.load(f).get("model_cfg")
    else:
      mc = openclip.packaged_model_cfg(model_name) if model_name else None
    if not isinstance(mc, dict) or not is_openclip_siglip(mc):
      return None
    weights_path = openclip.hub_weights(path)
  else:
    mc = openclip.packaged_model_cfg(model_name) if model_name else None
    if not isinstance(mc, dict) or not is_openclip_siglip(mc):
      return None
    weights_path = path
  return load_openclip(mc, common.load_state_dict(weights_path), f"open_clip SigLIP checkpoint {weights_path}")


# ---------------------------------------------------------------------------------------------
# the SentencePiece tokenizer shipped with a converted SigLIP

def find_spm(src: str) -> str | None:
  """The SentencePiece model in a checkpoint folder (HF ``spiece.model``, ``tokenizer.model``,
  ``sentencepiece.model``), or None (a file, or a folder without one). Two of them: ValueError."""
  from trace_jax.tokenizers.sentencepiece import SPM_NAMES
  if not os.path.isdir(src):
    return None
  found = [os.path.join(src, n) for n in SPM_NAMES if os.path.isfile(os.path.join(src, n))]
  if len(found) > 1:
    raise ValueError(f"{src}: several SentencePiece models ({', '.join(os.path.basename(f) for f in found)}); "
                     f"choose one with --tokenizer")
  return found[0] if found else None


def tokenizer_files(cfg: CLIPConfig, src: str, tokenizer: str | None, clean: str, out_dir: str) -> dict[str, str]:
  """{name: path} of the SigLIP tokenizer to store in the model dir (written into ``out_dir``).

  ``tokenizer``: a SentencePiece ``.model`` file, else the one in the ``src`` folder (``find_spm``),
  else none ({}: the model dir then takes token ids only). ``clean``: the text cleaning of the source's
  own tokenizer ('openclip' for open_clip checkpoints, 'hf' otherwise; trace_jax/tokenizers/sentencepiece.py).
  The vocabulary must fit the text tower's token embedding (an id past it would index nothing the
  model learned), checked here, before anything is written.
  """
  from trace_jax.tokenizers.sentencepiece import SentencePieceTokenizer
  path = tokenizer or find_spm(src)
  if path is None:
    return {}
  tok = SentencePieceTokenizer.from_file(path, context_length=cfg.text.context_length, clean=clean)
  if tok.vocab_size > cfg.text.vocab_size:
    raise ValueError(f"tokenizer {path} has {tok.vocab_size} pieces, more than the {cfg.text.vocab_size} "
                     f"token embeddings of the model: not this checkpoint's tokenizer")
  tok.save(out_dir)
  return {n: os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir))}
