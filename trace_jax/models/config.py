"""Model configurations (frozen dataclasses, JSON round-trip) and the named presets."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  pos_interp: str = "antialias"  # or "torch_bicubic" (HF interpolate_pos_encoding); see posemb.py
  kind: str = "vit"               # "vit" or "crate" (trace_jax.models.crate)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_ratio: float = 4.0
  pool: str = "argmax"            # "argmax" (OpenAI/open_clip) or "eos" (first eos_token_id, HF)
  eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  embed_dim: int = 512
  act: str = "quick_gelu"         # "quick_gelu" (OpenAI-trained) or "gelu"
  dtype: str = "float32"          # compute dtype; parameters always stay float32
  logit_scale_init: float = math.log(1 / 0.07)
  # Extra, model-specific options of other image towers (e.g. CRATE's ISTA step size).
  extra: tuple = ()

  def replace(self, **kw) -> "CLIPConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["extra"] = dict(self.extra)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown model config keys: {sorted(unknown)}")
    vis = d.pop("vision", {})
    txt = d.pop("text", {})
    for name, sub, klass in (("vision", vis, VisionConfig), ("text", txt, TextConfig)):
      bad = set(sub) - {f.name for f in dataclasses.fields(klass)}
      if bad:
        raise ValueError(f"unknown {name} config keys: {sorted(bad)}")
    extra = d.pop("extra", {})
    return cls(vision=VisionConfig(**vis), text=TextConfig(**txt),
               extra=tuple(sorted(dict(extra).items())), **d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> "CLIPConfig":
    return cls.from_dict(json.loads(s))


def _openai(patch, width, layers, heads, image, embed, t_width, t_heads, t_layers=12, act="quick_gelu"):
  return CLIPConfig(
      vision=VisionConfig(image_size=image, patch_size=patch, width=width, layers=layers, heads=heads),
      text=TextConfig(width=t_width, heads=t_heads, layers=t_layers), embed_dim=embed, act=act)


NAMED: dict[str, CLIPConfig] = {
    "ViT-B-32": _openai(32, 768, 12, 12, 224, 512, 512, 8),
    "ViT-B-16": _openai(16, 768, 12, 12, 224, 512, 512, 8),
    "ViT-L-14": _openai(14, 1024, 24, 16, 224, 768, 768, 12),
    "ViT-L-14-336": _openai(14, 1024, 24, 16, 336, 768, 768, 12),
    # OpenCLIP ViT-H/14 (LAION-2B): head_width 80, plain GELU, text width 1024 / 16 heads / 24 layers.
    "ViT-H-14": _openai(14, 1280, 32, 16, 224, 1024, 1024, 16, t_layers=24, act="gelu"),
    # Tiny configs for tests and the embedded default.
    "tiny": CLIPConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4),
        text=TextConfig(context_length=16, vocab_size=1000, width=32, heads=4, layers=2, eos_token_id=999),
        embed_dim=32),
    "small": CLIPConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4),
        text=TextConfig(context_length=32, vocab_size=2048, width=128, heads=4, layers=3, eos_token_id=2047),
        embed_dim=128),
}


def get_config(name: str) -> CLIPConfig:
  if name not in NAMED:
    from trace_jax.models import crate  # the 'crate-clip-*' presets live beside the CRATE model
    if name in crate.NAMED:
      return crate.NAMED[name]
    known = sorted(NAMED) + sorted(crate.NAMED)
    raise ValueError(f"unknown model config {name!r}; known: {known}")
  return NAMED[name]
