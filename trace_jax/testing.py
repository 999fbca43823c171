"""PyTorch twins of trace_jax models built from trace_jax params, for parity tests and the benchmarks.

They are written with plain torch ops (no open_clip), expose the attention probabilities as hookable
modules, and import torch lazily (the caller passes the module), so importing this file needs no torch.
"""
from __future__ import annotations

import numpy as np


def torch_visual(params, cfg, torch):
  """A PyTorch image tower equal to ours (OpenAI layout, quick_gelu) with the attention
  probabilities exposed as ``blocks[i].probs`` (nn.Identity modules, hookable)."""
  nn = torch.nn
  t = lambda a: torch.tensor(np.asarray(a, np.float32))
  v = params["visual"]
  W, H = cfg.vision.width, cfg.vision.heads
  hd = W // H

  def ln(d):
    m = nn.LayerNorm(W, eps=1e-5)
    m.weight.data, m.bias.data = t(d["ln"]["scale"]), t(d["ln"]["bias"])
    return m

  class Block(nn.Module):
    def __init__(self, b):
      super().__init__()
      self.ln_1, self.ln_2 = ln(b["ln_1"]), ln(b["ln_2"])
      a = b["attn"]
      self.wq, self.wk, self.wv = (t(a[n]["kernel"]).reshape(W, W) for n in ("query", "key", "value"))
      self.bq, self.bk, self.bv = (t(a[n]["bias"]).reshape(W) for n in ("query", "key", "value"))
      self.wo, self.bo = t(a["out"]["kernel"]).reshape(W, W), t(a["out"]["bias"])
      self.fc_w, self.fc_b = t(b["mlp_fc"]["kernel"]), t(b["mlp_fc"]["bias"])
      self.pr_w, self.pr_b = t(b["mlp_proj"]["kernel"]), t(b["mlp_proj"]["bias"])
      self.probs = nn.Identity()

    def forward(self, x):
      B, N, _ = x.shape
      h = self.ln_1(x)
      split = lambda y: y.reshape(B, N, H, hd).transpose(1, 2)
      q = split(h @ self.wq + self.bq) * hd ** -0.5
      k, vv = split(h @ self.wk + self.bk), split(h @ self.wv + self.bv)
      p = self.probs(torch.softmax(q @ k.transpose(-1, -2), -1))
      o = (p @ vv).transpose(1, 2).reshape(B, N, W)
      x = x + o @ self.wo + self.bo
      h = self.ln_2(x) @ self.fc_w + self.fc_b
      h = h * torch.sigmoid(1.702 * h)
      return x + h @ self.pr_w + self.pr_b

  class Visual(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = nn.Conv2d(3, W, cfg.vision.patch_size, cfg.vision.patch_size, bias=False)
      self.conv.weight.data = t(v["conv1"]).permute(3, 2, 0, 1).contiguous()
      self.cls, self.pos = nn.Parameter(t(v["class_embedding"])), nn.Parameter(t(v["positional_embedding"]))
      self.ln_pre, self.ln_post = ln(v["ln_pre"]), ln(v["ln_post"])
      self.blocks = nn.ModuleList(Block(v["transformer"][f"block_{i}"]) for i in range(cfg.vision.layers))
      self.proj = nn.Parameter(t(v["proj"]))

    def forward(self, x):  # NCHW
      x = self.conv(x).flatten(2).transpose(1, 2)
      x = torch.cat([self.cls.expand(x.shape[0], 1, W), x], 1) + self.pos
      x = self.ln_pre(x)
      for b in self.blocks:
        x = b(x)
      return self.ln_post(x[:, 0]) @ self.proj

  return Visual().eval()


class CosTarget:
  """grad-cam / captum target: cosine of the image embedding with a fixed normalised text embedding."""

  def __init__(self, t, torch):
    self.t, self.torch = torch.tensor(t), torch

  def __call__(self, emb):
    return (emb / emb.norm(dim=-1, keepdim=True) * self.t).sum(-1)
