"""Models: CLIP-style dual encoder (ViT or CRATE image tower)."""
from trace_jax.models.clip import CLIP, TextTransformer, VisionTransformer, l2_normalize
from trace_jax.models.config import CLIPConfig, TextConfig, VisionConfig
from trace_jax.models.presets import get_config
from trace_jax.models.perturbations import perturbation_zeros

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "TextTransformer", "VisionTransformer",
           "get_config", "l2_normalize", "perturbation_zeros", "init_params", "build"]


def build(cfg: "CLIPConfig"):
  """The linen module for a config (ViT or CRATE image tower; SigLIP for vision kind 'siglip')."""
  if cfg.vision.kind == "siglip":  # trace_jax/models/siglip.py
    from trace_jax.models.siglip import SigLIP
    return SigLIP(cfg)
  return CLIP(cfg)


def init_params(cfg: "CLIPConfig", rng, *, unbox: bool = True):
  """Random float32 parameters at the config's native resolution."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  model = build(cfg)
  s = cfg.vision.image_size
  images = jnp.zeros((1, s, s, 3), jnp.float32)
  ids = jnp.zeros((1, cfg.text.context_length), jnp.int32)
  variables = jax.jit(lambda r: model.init(r, images, ids))(rng)
  params = variables["params"]
  return nn.unbox(params) if unbox else params
