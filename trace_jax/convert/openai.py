"""OpenAI CLIP (and open_clip ``CLIP``) state dicts -> trace_jax params.

Layout (notes/checkpoint-formats.md, "OpenAI CLIP"): ``visual.conv1.weight`` [W,3,p,p],
``visual.{class_embedding, positional_embedding, ln_pre, ln_post, proj}``,
``[visual.]transformer.resblocks.{i}.{ln_1, attn.in_proj_weight [3W,W] rows q|k|v, attn.in_proj_bias,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``token_embedding.weight``, ``positional_embedding``,
``ln_final``, ``text_projection`` [W,E] (``x @ P``), ``logit_scale``. open_clip's standard ``CLIP``
class uses the same keys, so :func:`params_from_state_dict` serves both.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from trace_jax.convert import common
from trace_jax.models.config import CLIPConfig, TextConfig, VisionConfig


def _block_shapes(prefix: str, width: int, hidden: int) -> dict[str, tuple[int, ...]]:
  w, h = width, hidden
  return {
      f"{prefix}.ln_1.weight": (w,), f"{prefix}.ln_1.bias": (w,),
      f"{prefix}.attn.in_proj_weight": (3 * w, w), f"{prefix}.attn.in_proj_bias": (3 * w,),
      f"{prefix}.attn.out_proj.weight": (w, w), f"{prefix}.attn.out_proj.bias": (w,),
      f"{prefix}.ln_2.weight": (w,), f"{prefix}.ln_2.bias": (w,),
      f"{prefix}.mlp.c_fc.weight": (h, w), f"{prefix}.mlp.c_fc.bias": (h,),
      f"{prefix}.mlp.c_proj.weight": (w, h), f"{prefix}.mlp.c_proj.bias": (w,),
  }


def source_shapes(cfg: CLIPConfig) -> dict[str, tuple[int, ...]]:
  """{source key: shape} of an OpenAI-layout state dict for this config."""
  v, t, e = cfg.vision, cfg.text, cfg.embed_dim
  want = {
      "visual.conv1.weight": (v.width, 3, v.patch_size, v.patch_size),
      "visual.class_embedding": (v.width,),
      "visual.positional_embedding": (v.grid ** 2 + 1, v.width),
      "visual.ln_pre.weight": (v.width,), "visual.ln_pre.bias": (v.width,),
      "visual.ln_post.weight": (v.width,), "visual.ln_post.bias": (v.width,),
      "visual.proj": (v.width, e),
      "token_embedding.weight": (t.vocab_size, t.width),
      "positional_embedding": (t.context_length, t.width),
      "ln_final.weight": (t.width,), "ln_final.bias": (t.width,),
      "text_projection": (t.width, e),
      "logit_scale": (),
  }
  for i in range(v.layers):
    want.update(_block_shapes(f"visual.transformer.resblocks.{i}", v.width, int(v.width * v.mlp_ratio)))
  for i in range(t.layers):
    want.update(_block_shapes(f"transformer.resblocks.{i}", t.width, int(t.width * t.mlp_ratio)))
  return want


def _need(sd, *keys):
  missing = [k for k in keys if k not in sd]
  if missing:
    if any(k.startswith("visual.layer1.") for k in sd):
      raise ValueError("this is a ResNet-based CLIP (visual.layer1.* keys); only ViT image towers are supported")
    raise ValueError(f"not an OpenAI-layout CLIP state dict: missing keys ({len(missing)}): {', '.join(missing)}")


def config_from_state_dict(sd: Mapping[str, np.ndarray], act: str = "quick_gelu") -> CLIPConfig:
  """Infer the architecture from shapes as openai/CLIP ``build_model`` does (heads = width // 64)."""
  _need(sd, "visual.conv1.weight", "visual.positional_embedding", "text_projection",
        "positional_embedding", "token_embedding.weight", "ln_final.weight")
  w, _, p, _ = np.shape(sd["visual.conv1.weight"])
  grid = int(round((np.shape(sd["visual.positional_embedding"])[0] - 1) ** 0.5))
  v_layers = common.count_layers(sd, "visual.transformer.resblocks.")
  t_width = np.shape(sd["ln_final.weight"])[0]
  t_layers = common.count_layers(sd, "transformer.resblocks.")
  v_fc = sd.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
  t_fc = sd.get("transformer.resblocks.0.mlp.c_fc.weight")
  vision = VisionConfig(image_size=p * grid, patch_size=p, width=w, layers=v_layers, heads=max(w // 64, 1),
                        mlp_ratio=common.mlp_ratio(np.shape(v_fc)[0], w) if v_fc is not None else 4.0)
  text = TextConfig(context_length=np.shape(sd["positional_embedding"])[0],
                    vocab_size=np.shape(sd["token_embedding.weight"])[0], width=t_width,
                    heads=max(t_width // 64, 1), layers=t_layers,
                    mlp_ratio=common.mlp_ratio(np.shape(t_fc)[0], t_width) if t_fc is not None else 4.0,
                    pool="argmax", eos_token_id=np.shape(sd["token_embedding.weight"])[0] - 1)
  return CLIPConfig(vision=vision, text=text, embed_dim=np.shape(sd["text_projection"])[1], act=act)


def _tower_blocks(get, prefix: str, layers: int, heads: int) -> dict:
  return {f"block_{i}": common.block_params(get, heads, {
      "ln_1": f"{prefix}{i}.ln_1", "ln_2": f"{prefix}{i}.ln_2", "in_proj": f"{prefix}{i}.attn.in_proj",
      "out": f"{prefix}{i}.attn.out_proj", "fc": f"{prefix}{i}.mlp.c_fc", "proj": f"{prefix}{i}.mlp.c_proj"})
      for i in range(layers)}


def params_from_state_dict(sd: Mapping[str, np.ndarray], cfg: CLIPConfig, what: str = "state dict") -> dict:
  """OpenAI / open_clip ``CLIP`` state dict ({key: array}) -> float32 params for ``build(cfg)``.

  Refuses missing / unexpected / mis-shaped source keys (listed by their source names)."""
  if cfg.vision.kind != "vit":
    raise ValueError(f"OpenAI-layout conversion needs a ViT image tower, got kind={cfg.vision.kind!r}")
  sd = common.drop_ignored(sd)
  common.check_source(sd, source_shapes(cfg), what)
  get = common.getter(sd)
  v, t = cfg.vision, cfg.text
  visual = {
      "conv1": common.conv_kernel(get("visual.conv1.weight")),
      "class_embedding": get("visual.class_embedding"),
      "positional_embedding": get("visual.positional_embedding"),
      "ln_pre": common.ln(get("visual.ln_pre.weight"), get("visual.ln_pre.bias")),
      "transformer": _tower_blocks(get, "visual.transformer.resblocks.", v.layers, v.heads),
      "ln_post": common.ln(get("visual.ln_post.weight"), get("visual.ln_post.bias")),
      "proj": get("visual.proj"),
  }
  text = {
      "token_embedding": {"embedding": get("token_embedding.weight")},
      "positional_embedding": get("positional_embedding"),
      "transformer": _tower_blocks(get, "transformer.resblocks.", t.layers, t.heads),
      "ln_final": common.ln(get("ln_final.weight"), get("ln_final.bias")),
      "text_projection": get("text_projection"),
  }
  params = {"visual": visual, "text": text, "logit_scale": get("logit_scale").reshape(())}
  return common.finalize(params, cfg, what)


def load_openai(path: str, *, trust_torchscript: bool = False) -> tuple[CLIPConfig, dict]:
  """(config, params) of an OpenAI CLIP file: TorchScript ``.pt`` archive (``clip.load`` downloads),
  a pickled state dict, or a ``.safetensors`` state dict. fp16 weights become float32.

  The archive's tensors are read without running its code (``common.load_torch``);
  ``trust_torchscript=True`` uses ``torch.jit.load`` instead, which runs code from the archive."""
  sd = common.load_state_dict(path, trust_torchscript=trust_torchscript)
  cfg = config_from_state_dict(sd)
  return cfg, params_from_state_dict(sd, cfg, what=f"OpenAI CLIP checkpoint {path}")

