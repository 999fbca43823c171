"""Every model preset by name, in one file: ``get_config(name) -> CLIPConfig``.

ViT CLIP sizes (OpenAI / OpenCLIP names), the tiny / small sizes of the tests and the embedded default,
and the CRATE-tower dual encoders ('crate-clip-*', trace_jax/models/crate.py).
"""
from __future__ import annotations

from trace_jax.models.config import CLIPConfig, TextConfig, VisionConfig


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



def _crate_clip(image, patch, dim, depth, heads, dim_head, text: TextConfig, embed):
  extra = {"crate_dim_head": dim_head, "crate_eta": 0.1, "crate_lambda": 0.1}
  return CLIPConfig(
      vision=VisionConfig(image_size=image, patch_size=patch, width=dim, layers=depth, heads=heads,
                          kind="crate"),
      text=text, embed_dim=embed, extra=tuple(sorted(extra.items())))  # sorted: JSON round trip


_TINY_TEXT = TextConfig(context_length=16, vocab_size=1000, width=32, heads=4, layers=2, eos_token_id=999)
_SMALL_TEXT = TextConfig(context_length=32, vocab_size=2048, width=128, heads=4, layers=3, eos_token_id=2047)
_B_TEXT = TextConfig(width=512, heads=8, layers=12)
_L_TEXT = TextConfig(width=768, heads=12, layers=12)

CRATE_CLIP: dict[str, CLIPConfig] = {
    # Same sizes as the ViT 'tiny' / 'small' presets (tests, the embedded default).
    "crate-clip-tiny": _crate_clip(32, 8, 64, 2, 4, 16, _TINY_TEXT, 32),
    "crate-clip-small": _crate_clip(64, 8, 128, 4, 4, 32, _SMALL_TEXT, 128),
    # Official CRATE sizes at 224/16 with OpenAI-B (or -L) sized text towers.
    "crate-clip-T-16": _crate_clip(224, 16, 384, 12, 6, 64, _B_TEXT, 512),
    "crate-clip-S-16": _crate_clip(224, 16, 576, 12, 12, 48, _B_TEXT, 512),
    "crate-clip-B-16": _crate_clip(224, 16, 768, 12, 12, 64, _B_TEXT, 512),
    "crate-clip-L-16": _crate_clip(224, 16, 1024, 24, 16, 64, _L_TEXT, 768),
}


NAMED.update(CRATE_CLIP)


def _siglip():
  from trace_jax.models.siglip import make_config as s
  # open_clip 2.23.0 model_configs/ViT-*-SigLIP*.json (timm vit_*_siglip_*: erf GELU, LN eps 1e-6,
  # text context 64, vocab 32000 (i18n: 250000), embed = width, no image head). A Hugging Face /
  # big_vision conversion sets act='gelu_tanh' (trace_jax/convert/siglip.py).
  b = dict(patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072)
  l = dict(patch_size=16, width=1024, layers=24, heads=16, mlp_dim=4096)
  so = dict(patch_size=14, width=1152, layers=27, heads=16, mlp_dim=4304)
  return {
      "ViT-B-16-SigLIP": s(image_size=224, **b),
      "ViT-B-16-SigLIP-256": s(image_size=256, **b),
      "ViT-B-16-SigLIP-384": s(image_size=384, **b),
      "ViT-B-16-SigLIP-512": s(image_size=512, **b),
      "ViT-B-16-SigLIP-i18n-256": s(image_size=256, vocab_size=250000, **b),
      "ViT-L-16-SigLIP-256": s(image_size=256, **l),
      "ViT-L-16-SigLIP-384": s(image_size=384, **l),
      # So400m: text tower width 1152, 27 layers, 16 heads, mlp 4304, as the image tower.
      "ViT-SO400M-14-SigLIP": s(image_size=224, context_length=16, **so),
      "ViT-SO400M-14-SigLIP-384": s(image_size=384, context_length=64, **so),
      # tiny SigLIP for tests (sizes of the ViT 'tiny' preset, text width = image width).
      "siglip-tiny": s(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=256,
                       context_length=16, vocab_size=1000),
  }


SIGLIP: dict[str, CLIPConfig] = _siglip()
NAMED.update(SIGLIP)


def get_config(name: str) -> CLIPConfig:
  """The preset ``name`` (``NAMED``: ViT CLIP sizes and the 'crate-clip-*' CRATE-tower sizes)."""
  if name not in NAMED:
    raise ValueError(f"unknown model config {name!r}; known: {sorted(NAMED)}")
  return NAMED[name]
