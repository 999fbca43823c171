"""M2IB on SigLIP towers against an independent float64 reference on the open_clip 2.23.0 model.

The reference runs the official M2IB loop (notes/m2ib.md §3-§6) on a tiny random open_clip SigLIP
(tests/siglip_refs.py: timm MAP trunk, 3 blocks; text tower with 2 blocks, no causal mask, 'last'
pooling), cast to float64: a torch forward hook replaces the output of block ``layer``
(``visual.trunk.blocks[l]``, NLD; ``text.transformer.resblocks[l]``, LND in open_clip 2.23.0) by
``lam x + (1 - lam) eps``, the WHOLE model runs on the K copies at every step (as the official code),
the fit is the cosine between the noisy tower's embedding and the other modality's clean one (or the
pair's sigmoid logit ``exp(t) cos + b`` with ``fit='logit'``), ``torch.optim.Adam(lr=1)`` on alpha,
the read-out is the capacity of the last forward. Noise is replayed (note §11). No trace_jax code is
used on the reference side except the converter that gives our parameters. Tolerance on the
normalised maps: 1e-4.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import require_peer, torch_or_skip

import siglip_refs as refs

TOL = 1e-4
STEPS, K = 4, 3


@pytest.fixture(scope="module")
def peer():
  torch = torch_or_skip()
  require_peer("open_clip", "open_clip_torch")
  from trace_jax.convert.siglip import from_openclip_model
  from trace_jax.models import build
  m = refs.tiny_openclip(torch, seed=6)
  cfg, params = from_openclip_model(m, refs.TINY_MODEL_CFG)
  return torch, m.double(), build(cfg), params


def ref_m2ib(torch, model, modality, pixels, ids, layer, noise, *, beta, fit, out_size):
  """Official M2IB loop on the open_clip model (float64) for one pair; returns the normalised map."""
  F = torch.nn.functional
  pix = torch.as_tensor(pixels, dtype=torch.float64)           # [1, 3, H, W]
  tid = torch.as_tensor(ids, dtype=torch.long)                  # [1, L]
  if modality == "image":
    block, perm = model.visual.trunk.blocks[layer], (lambda t: t)              # timm: NLD
  else:
    block, perm = model.text.transformer.resblocks[layer], (lambda t: t.permute(1, 0, 2))  # LND
  state = {}

  def hook(_mod, _inp, out):
    if "t" in state:
      return perm(state["t"])
    state["x"] = perm(out).detach()
  handle = block.register_forward_hook(hook)
  try:
    with torch.no_grad():
      other = model.encode_text(tid) if modality == "image" else model.encode_image(pix)
      model.encode_image(pix) if modality == "image" else model.encode_text(tid)
    x = state["x"][0]                                            # block `layer` output [N, D]
    noise = torch.as_tensor(np.asarray(noise), dtype=torch.float64)
    alpha = torch.nn.Parameter(torch.full(x.shape, 5.0, dtype=torch.float64))
    opt = torch.optim.Adam([alpha], lr=1.0)
    for s in range(STEPS):
      opt.zero_grad()
      lam = torch.sigmoid(alpha)
      mu, var = x * lam, (1 - lam) ** 2
      cap = -0.5 * (1 + torch.log(var) - mu ** 2 - var)
      state["t"] = mu + torch.sqrt(var) * noise[s]              # [K, N, D]
      emb = model.encode_image(pix.repeat(K, 1, 1, 1)) if modality == "image" else model.encode_text(tid.repeat(K, 1))
      cos = F.cosine_similarity(emb, other.expand_as(emb), eps=1e-6)
      if fit == "logit":
        cos = model.logit_scale.exp() * cos + model.logit_bias
      loss = beta * cap.mean() - cos.mean()
      loss.backward()
      opt.step()
  finally:
    handle.remove()
  scores = torch.nansum(cap.detach(), -1)                       # capacity of the last forward
  if modality == "text":
    return ((scores - scores.min()) / (scores.max() - scores.min())).numpy()
  g = int(round(scores.shape[0] ** 0.5))                        # no class token: every token is a patch
  up = F.interpolate(scores.reshape(1, 1, g, g), size=out_size, mode="bilinear", align_corners=False)[0, 0]
  return ((up - up.min()) / (up.max() - up.min())).numpy()


@pytest.mark.slow  # the M2IB program's compilation (~15 s on a shared 2-core CPU) is paid here
@pytest.mark.parametrize("fit,beta", [("logit", 1.0), ("cosine", 0.1)])  # one compiled program for both
def test_m2ib_on_siglip_matches_the_official_loop_on_open_clip(peer, fit, beta):
  import jax.numpy as jnp
  from trace_jax.attribution import explain
  torch, model, ours_model, params = peer
  vlayer, tlayer = 1, 0
  rng = np.random.default_rng(len(fit))
  pixels = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
  ids = rng.integers(2, 1000, (2, 16))
  ids[:, 9:] = 1                                                # 'tokens, </s>, pad = </s>' rows
  nv = rng.standard_normal((2, STEPS, K, 16, 64)).astype(np.float32)
  nt = rng.standard_normal((2, STEPS, K, 16, 64)).astype(np.float32)
  out = explain("m2ib", ours_model, params, jnp.asarray(pixels.transpose(0, 2, 3, 1)), ids, layer=vlayer,
                text_layer=tlayer, steps=STEPS, samples=K, beta=beta, fit=fit, image_noise=nv,
                text_noise=nt, out_size=40)
  assert out["map"].shape == (2, 40, 40) and out["text"].shape == (2, 16)
  for p in range(2):
    want_v = ref_m2ib(torch, model, "image", pixels, ids[p:p + 1], vlayer, nv[p], beta=beta, fit=fit, out_size=40)
    want_t = ref_m2ib(torch, model, "text", pixels, ids[p:p + 1], tlayer, nt[p], beta=beta, fit=fit, out_size=40)
    assert float(np.max(np.abs(np.asarray(out["map"][p]) - want_v))) <= TOL, p
    assert float(np.max(np.abs(np.asarray(out["text"][p]) - want_t))) <= TOL, p
  assert bool(np.all(np.asarray(out["text_valid"])))           # every position of a SigLIP row is read
  with torch.no_grad():                                         # the score: the pair's sigmoid logit
    img = torch.nn.functional.normalize(model.encode_image(torch.as_tensor(pixels, dtype=torch.float64)), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(torch.as_tensor(ids)), dim=-1)
    logit = (model.logit_scale.exp() * img @ txt.T + model.logit_bias)[0].numpy()
  np.testing.assert_allclose(np.asarray(out["score"]), logit, atol=TOL)


def test_logit_fit_is_the_cosine_fit_with_beta_over_exp_t(peer):
  """fit='logit' scales the fit by exp(t) (the bias has no gradient): Adam is scale-invariant up to
  its eps, so its maps equal the cosine fit's with beta / exp(t)."""
  import jax.numpy as jnp
  from trace_jax.attribution import m2ib
  _, _, model, params = peer
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.standard_normal((1, 32, 32, 3)), jnp.float32)
  ids = rng.integers(2, 1000, (2, 16))
  et = float(np.exp(params["logit_scale"]))
  noise = rng.standard_normal((2, 2, STEPS, K, 16, 64)).astype(np.float32)
  kw = dict(layer=1, text_layer=0, steps=STEPS, samples=K, out_size=40,  # the parity test's program
            image_noise=noise[0], text_noise=noise[1])
  a = m2ib.explain(model, params, images, ids, beta=10.0, fit="logit", **kw)
  b = m2ib.explain(model, params, images, ids, beta=10.0 / et, fit="cosine", **kw)
  c = m2ib.explain(model, params, images, ids, beta=10.0, fit="cosine", **kw)
  same = max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in ("map", "text"))
  other = max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(c[k])))) for k in ("map", "text"))
  assert same <= 5e-4 and other > 20 * same, (same, other)  # Adam's eps: ~1e-4 apart, not 0
  with pytest.raises(ValueError, match="fit must be one of"):
    m2ib.explain(model, params, images, ids, fit="prob")
  with pytest.raises(ValueError, match=r"lengths \[9\] must cover the pooled EOT token \(>= \[16\]\)"):
    m2ib.explain(model, params, images, ids[:1], layer=1, text_layer=0, lengths=9)
