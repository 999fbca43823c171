"""PyTorch reference SigLIP models for the SigLIP tests (open_clip 2.23.0 / HF / big_vision layouts).

The tiny open_clip SigLIP is built with open_clip's own classes (``CustomTextCLIP`` + ``TimmModel``)
around a timm ``VisionTransformer(class_token=False, global_pool='map')`` registered under
``vit_tiny_test_siglip`` (open_clip 2.23.0's TimmModel passes no size kwargs to timm, so a custom
trunk size needs a registered name). Random weights, with LayerNorm affines, biases and the logit
scale / bias randomised (their init values would hide a dropped or swapped parameter).
"""
from __future__ import annotations

import numpy as np

TINY_MODEL_CFG = dict(
    embed_dim=64, init_logit_bias=-10,
    vision_cfg=dict(image_size=32, timm_model_name="vit_tiny_test_siglip", timm_model_pretrained=False,
                    timm_pool="map", timm_proj="none"),
    text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=4, layers=2, no_causal_mask=True,
                  proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6}))


def register_tiny_timm():
  import timm
  from timm.models import register_model
  from timm.models.vision_transformer import VisionTransformer
  if "vit_tiny_test_siglip" in timm.list_models("vit_tiny_test_siglip"):
    return

  @register_model
  def vit_tiny_test_siglip(pretrained=False, **kw):  # noqa: ARG001
    kw.pop("pretrained_cfg", None)
    kw.pop("pretrained_cfg_overlay", None)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, class_token=False,
                             global_pool=kw.pop("global_pool", "map"), num_classes=kw.pop("num_classes", 0),
                             dynamic_img_size=kw.pop("dynamic_img_size", False))


def randomize(model, torch, seed=0, scale=3.1, bias=-2.0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if name.endswith("logit_scale"):
        p.fill_(scale)
      elif name.endswith("logit_bias"):
        p.fill_(bias)
      elif leaf.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1 and ("norm" in name or "ln" in name):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif leaf in ("latent", "probe", "pos_embed", "positional_embedding"):
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
  return model.eval()


def tiny_openclip(torch, seed=0, model_cfg=None):
  import open_clip
  register_tiny_timm()
  torch.manual_seed(seed)
  m = open_clip.CustomTextCLIP(**(model_cfg or TINY_MODEL_CFG))
  return randomize(m, torch, seed)


def openclip_forward(model, torch, pixels_nchw, ids):
  with torch.no_grad():
    img = model.encode_image(torch.as_tensor(pixels_nchw), normalize=True)
    txt = model.encode_text(torch.as_tensor(ids, dtype=torch.long), normalize=True)
    logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
  return {"image_embeds": img.numpy(), "text_embeds": txt.numpy(), "logits_per_image": logits.numpy()}


def tiny_hf(torch, seed=0):
  from transformers import SiglipConfig, SiglipModel
  c = SiglipConfig(
      text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, bos_token_id=None, eos_token_id=1,
                       pad_token_id=1),
      vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8))
  torch.manual_seed(seed)
  return randomize(SiglipModel(c), torch, seed)


def bigvision_npz_arrays(rng, *, width=64, layers=3, heads=4, mlp=256, patch=8, grid=4, vocab=1000, ctx=16,
                         twidth=64, tlayers=2, theads=4, tmlp=256, embed=64, image_head=False):
  """Random arrays under big_vision's flattened SigLIP param names (vit.py, text_transformer.py,
  two_towers.py @ 0127fb6), written from big_vision's module names, not from trace_jax's converter."""
  r = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)
  one = lambda *s: (1 + 0.2 * rng.standard_normal(s)).astype(np.float32)
  w = {}

  def mha(prefix, d, h):
    for n in ("query", "key", "value"):
      w[f"{prefix}{n}/kernel"] = r(d, h, d // h)
      w[f"{prefix}{n}/bias"] = r(h, d // h)
    w[f"{prefix}out/kernel"] = r(h, d // h, d)
    w[f"{prefix}out/bias"] = r(d)

  def block(prefix, d, h, m):
    w[prefix + "LayerNorm_0/scale"], w[prefix + "LayerNorm_0/bias"] = one(d), r(d)
    w[prefix + "LayerNorm_1/scale"], w[prefix + "LayerNorm_1/bias"] = one(d), r(d)
    mha(prefix + "MultiHeadDotProductAttention_0/", d, h)
    w[prefix + "MlpBlock_0/Dense_0/kernel"], w[prefix + "MlpBlock_0/Dense_0/bias"] = r(d, m), r(m)
    w[prefix + "MlpBlock_0/Dense_1/kernel"], w[prefix + "MlpBlock_0/Dense_1/bias"] = r(m, d), r(d)

  i, t = "params/img/", "params/txt/"
  w[i + "embedding/kernel"], w[i + "embedding/bias"] = r(patch, patch, 3, width), r(width)
  w[i + "pos_embedding"] = r(1, grid * grid, width)
  for l in range(layers):
    block(f"{i}Transformer/encoderblock_{l}/", width, heads, mlp)
  w[i + "Transformer/encoder_norm/scale"], w[i + "Transformer/encoder_norm/bias"] = one(width), r(width)
  w[i + "MAPHead_0/probe"] = r(1, 1, width)
  mha(i + "MAPHead_0/MultiHeadDotProductAttention_0/", width, heads)
  w[i + "MAPHead_0/LayerNorm_0/scale"], w[i + "MAPHead_0/LayerNorm_0/bias"] = one(width), r(width)
  w[i + "MAPHead_0/MlpBlock_0/Dense_0/kernel"], w[i + "MAPHead_0/MlpBlock_0/Dense_0/bias"] = r(width, mlp), r(mlp)
  w[i + "MAPHead_0/MlpBlock_0/Dense_1/kernel"], w[i + "MAPHead_0/MlpBlock_0/Dense_1/bias"] = r(mlp, width), r(width)
  if image_head:
    w[i + "head/kernel"], w[i + "head/bias"] = r(width, embed), r(embed)
  w[t + "Embed_0/embedding"] = r(vocab, twidth)
  w[t + "pos_embedding"] = r(1, ctx, twidth)
  for l in range(tlayers):
    block(f"{t}Encoder_0/encoderblock_{l}/", twidth, theads, tmlp)
  w[t + "Encoder_0/encoder_norm/scale"], w[t + "Encoder_0/encoder_norm/bias"] = one(twidth), r(twidth)
  w[t + "head/kernel"], w[t + "head/bias"] = r(twidth, embed), r(embed)
  w["params/t"] = np.asarray([2.3], np.float32)
  w["params/b"] = np.asarray([-1.5], np.float32)
  return w


def gelu_to_tanh(model, torch):
  """Switch every nn.GELU of a torch model to the tanh form (big_vision's ``nn.gelu``)."""
  for m in model.modules():
    if isinstance(m, torch.nn.GELU):
      m.approximate = "tanh"
  return model
