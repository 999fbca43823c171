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
  # Large-model memory / speed options of the ViT and text towers (docs/scaling.md): rematerialisation
  # policy, nn.scan over the blocks, fused attention. Training-time only: model dirs are saved with
  # the defaults (trace_jax.models.scale.inference_layout), and to_dict omits them when default.
  remat: str = "none"
  scan_layers: bool = False
  attention: str = "explicit"

  def replace(self, **kw) -> "CLIPConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["extra"] = dict(self.extra)
    for k, default in SCALE_DEFAULTS.items():  # unchanged JSON (and resume checks) when off
      if d[k] == default:
        del d[k]
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


SCALE_DEFAULTS = {"remat": "none", "scan_layers": False, "attention": "explicit"}
