"""A PyTorch port of M2IB that behaves like the authors' code, for the benchmark (and a parity check).

The authors ship no package (github.com/YingWANGG/M2IB @ ce4d7a0). This port is written from
notes/m2ib.md, not copied from their code. It works on a Hugging Face ``transformers.CLIPModel`` as
their ``scripts/methods.py`` does and reproduces its behaviour and its cost:

* a fresh bottleneck per call on the output of 0-based encoder block ``layer_idx`` (note §1): the
  block is swapped for a wrapper (block, then bottleneck) in ``encoder.layers`` and restored after.
  Unlike the official ``mySequential`` the wrapper forwards keyword arguments, so the causal text
  mask survives on every transformers version (on HF 4.30 the official code also keeps it, note §1);
* alpha [1, L, D] = 5, lam = sigmoid(alpha), t = lam x + (1 - lam) eps, capacity buffer
  ``-0.5 (1 + log((1-lam)^2) - (lam x)^2 - (1-lam)^2)`` (note §3); ``var`` is accepted and ignored
  exactly as officially (note §2);
* ``train_steps`` x (zero_grad -> get_text_features AND get_image_features on the K = ``batch_size``
  copies -> loss = beta * mean(capacity) - mean(cosine, eps 1e-6) -> backward -> Adam(lr) step) with
  ``model.eval()``; the other tower is recomputed every step (note §4, §5);
* model weights keep ``requires_grad=True`` (so every weight gradient is computed and accumulated,
  note §8) unless ``freeze=True`` (the note's "frozen" timing; identical maps);
* read-out: capacity buffer of the LAST forward, mean over the batch; vision: nansum over features,
  CLS dropped, g x g, bilinear to 224 (align_corners False), min-max; text: nansum, min-max, all tokens
  (note §6). Returns float32 numpy arrays ([224, 224] / [L]).

``noise``: None draws ``torch.randn`` like the official ``normal_()`` (one [K, L, D] draw per step);
an array [steps, K, L, D] replays it (note §11) so the result can be compared with trace_jax.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class Bottleneck(torch.nn.Module):
  def __init__(self, shape, noise=None):
    super().__init__()
    self.alpha = torch.nn.Parameter(torch.full((1, *shape), 5.0))
    self.noise = None if noise is None else torch.as_tensor(np.asarray(noise), dtype=torch.float32)
    self.step = 0
    self.buffer_capacity = None

  def forward(self, x):
    lam = torch.sigmoid(self.alpha).expand(x.shape[0], -1, -1)
    mu = x * lam
    var = (1 - lam) ** 2
    self.buffer_capacity = -0.5 * (1 + torch.log(var) - mu ** 2 - var)
    eps = torch.randn_like(mu) if self.noise is None else self.noise[self.step].to(mu.dtype)
    self.step += 1
    return mu + torch.sqrt(var) * eps


class _WithBottleneck(torch.nn.Module):
  def __init__(self, block, bottleneck):
    super().__init__()
    self.block, self.bottleneck = block, bottleneck

  def forward(self, *args, **kwargs):
    out = self.block(*args, **kwargs)
    if isinstance(out, tuple):
      return (self.bottleneck(out[0]),) + tuple(out[1:])
    return self.bottleneck(out)


def _features(out):
  return out.pooler_output if hasattr(out, "pooler_output") else out


def _normalize(x):
  return (x - x.min()) / (x.max() - x.min())


def _run(modality, text_t, image_t, model, layer_idx, beta, lr, train_steps, batch_size, noise, freeze):
  tower = model.vision_model if modality == "image" else model.text_model
  layers = tower.encoder.layers
  block = layers[layer_idx]
  with torch.no_grad():  # only the shape of the block output is needed (extract_feature_map)
    if modality == "image":
      h = model.vision_model(pixel_values=image_t, output_hidden_states=True).hidden_states[layer_idx + 1]
    else:
      h = model.text_model(input_ids=text_t, output_hidden_states=True).hidden_states[layer_idx + 1]
  bottleneck = Bottleneck(h.shape[1:], noise)
  saved = [p.requires_grad for p in model.parameters()]
  if freeze:
    model.requires_grad_(False)
  layers[layer_idx] = _WithBottleneck(block, bottleneck)
  try:
    model.eval()
    opt = torch.optim.Adam(lr=lr, params=bottleneck.parameters())
    ids = text_t.expand(batch_size, -1)
    pix = image_t.expand(batch_size, -1, -1, -1)
    for _ in range(train_steps):
      opt.zero_grad()
      text_f = _features(model.get_text_features(input_ids=ids))
      image_f = _features(model.get_image_features(pixel_values=pix))
      fit = torch.nn.CosineSimilarity(eps=1e-6)(text_f, image_f).mean()
      loss = beta * bottleneck.buffer_capacity.mean() - fit
      loss.backward()
      opt.step()
  finally:
    layers[layer_idx] = block
    for p, r in zip(model.parameters(), saved):
      p.requires_grad_(r)
  cap = bottleneck.buffer_capacity.mean(0).detach()
  scores = torch.nansum(cap, -1)
  if modality == "text":
    return _normalize(scores).numpy().astype(np.float32)
  g = int((scores.shape[0] - 1) ** 0.5)
  up = F.interpolate(scores[1:].reshape(1, 1, g, g), size=224, mode="bilinear", align_corners=False)
  return _normalize(up[0, 0]).numpy().astype(np.float32)


def vision_heatmap_iba(text_t, image_t, model, layer_idx, beta, var, lr=1, train_steps=10,
                       batch_size=10, noise=None, freeze=False):
  """Official signature (``var`` unused, note §2) -> [224, 224] float32 map."""
  del var
  return _run("image", text_t, image_t, model, layer_idx, beta, lr, train_steps, batch_size, noise, freeze)


def text_heatmap_iba(text_t, image_t, model, layer_idx, beta, var, lr=1, train_steps=10,
                     batch_size=10, noise=None, freeze=False):
  """Official signature (``var`` unused, note §2) -> [L] float32 map incl. SOT / EOT."""
  del var
  return _run("text", text_t, image_t, model, layer_idx, beta, lr, train_steps, batch_size, noise, freeze)
