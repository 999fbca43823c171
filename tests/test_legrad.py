"""LeGrad vs the authors' ``legrad-torch==1.1`` (``LeWrapper.compute_legrad_clip``) on random
open_clip 2.23.0 weights converted with trace_jax.convert.openclip; plus batching and edge cases.

Tolerance: maps to <= 1e-4 (notes/legrad-maskinversion.md, "Numerical agreement": fp32 atol ~1e-4).
The wrapper mutates the model it wraps (hooks, and a persistent position-embedding resample at
other sizes), so every official call gets a freshly built model.
"""
import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch_or_skip
from trace_jax.attribution import legrad as lg

TOL = 1e-4


def tiny_model_cfg(image=96, patch=16, width=64, layers=4, head_width=16, embed=32):
  return dict(embed_dim=embed, quick_gelu=True,
              vision_cfg=dict(image_size=image, patch_size=patch, width=width, layers=layers,
                              head_width=head_width),
              text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=4, layers=2))


class Peer:
  """An open_clip model (random weights, LayerNorms perturbed so they are not identities), its
  converted trace_jax twin, and factories for fresh torch copies."""

  def __init__(self, model_cfg, seed=0):
    torch = torch_or_skip()
    import open_clip
    from trace_jax.convert.openclip import from_torch_model
    from trace_jax.models import build
    self.torch, self.open_clip, self.mc = torch, open_clip, model_cfg
    torch.manual_seed(seed)
    m = open_clip.model.CLIP(**model_cfg)
    with torch.no_grad():
      for name, p in m.named_parameters():
        if "ln" in name:
          p.add_(0.1 * torch.randn_like(p))
    self.sd = m.state_dict()
    self.cfg, self.params = from_torch_model(m, model_cfg)
    self.model = build(self.cfg)

  def fresh(self):
    m = self.open_clip.model.CLIP(**self.mc)
    m.load_state_dict(self.sd)
    return m.eval().float()

  def wrapper(self, cls=None, **kw):
    if cls is None:
      from legrad import LeWrapper as cls
    with contextlib.redirect_stdout(io.StringIO()):  # the wrapper prints on construction
      return cls(self.fresh(), **kw)


@pytest.fixture(scope="module")
def tiny():
  return Peer(tiny_model_cfg())


def official_legrad(peer, images_nchw, text, layer_index, pairs):
  torch = peer.torch
  w = peer.wrapper(layer_index=layer_index)
  t = torch.tensor(text)
  if pairs:  # B distinct images, then image=None: pair b = (image b, text b) (notes step 1)
    w.encode_image(torch.tensor(images_nchw))
    out = w.compute_legrad_clip(t, None)
  else:
    out = w.compute_legrad_clip(t, torch.tensor(images_nchw))
  return out.detach().numpy()[0]  # [P, H, W]


@pytest.mark.parametrize("size", [96, 128])       # native, and larger (position embedding resampled)
@pytest.mark.parametrize("layer_index", [-2, 0])  # LeGrad's default (last two blocks), all blocks
def test_parity_tiny(tiny, size, layer_index):
  rng = np.random.default_rng(size + layer_index)
  imgs = rng.standard_normal((3, 3, size, size)).astype(np.float32)
  text = rng.standard_normal((3, tiny.cfg.embed_dim)).astype(np.float32)  # any query, as given
  cases = {
      "one prompt": (imgs[:1], text[:1], False),
      "prompts on one image": (imgs[:1], text, False),
      "pairs": (imgs, text, True),
  }
  for name, (im, tx, pairs) in cases.items():
    ref = official_legrad(tiny, im, tx, layer_index, pairs)
    out = lg.legrad(tiny.model, tiny.params, im.transpose(0, 2, 3, 1), tx, layers=layer_index)
    got = np.asarray(out["map"])
    assert got.shape == ref.shape, name
    assert np.all(np.isfinite(got)) and got.min() >= 0 and got.max() <= 1, name
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0, err_msg=name)


def test_text_ids_match_official(tiny):
  """explain(ids=...) encodes and L2-normalises the text (LeGrad README) -> same as official."""
  torch = tiny.torch
  rng = np.random.default_rng(1)
  img = rng.standard_normal((1, 3, 96, 96)).astype(np.float32)
  ids = rng.integers(1, 998, size=(2, 16)).astype(np.int64)
  ids[:, -1] = 999  # EOT = highest id (argmax pooling)
  w = tiny.wrapper()
  temb = w.encode_text(torch.tensor(ids), normalize=True)
  ref = w.compute_legrad_clip(temb, torch.tensor(img)).detach().numpy()[0]
  out = lg.explain(tiny.model, tiny.params, img.transpose(0, 2, 3, 1), jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(np.asarray(out["map"]), ref, atol=TOL, rtol=0)


def test_block_recompute_matches_model_tokens(tiny):
  """The block-level recompute used for the gradients reproduces the model's block output mean."""
  x = jnp.asarray(np.random.default_rng(2).standard_normal((128, 96, 3)), jnp.float32)
  vp = tiny.params["visual"]
  _, aux = tiny.model.apply({"params": tiny.params}, x, method="encode_image")
  for l in (0, 3):
    _, state = lg.image_state(tiny.model, tiny.params, x, (l,))
    x_prev, attn = state[l]
    bp = vp["transformer"][f"block_{l}"]
    o = jnp.einsum("hij,jhe->ihe", attn, lg.values(bp, x_prev))
    pooled = lg.pooled_from_o(bp, x_prev, o, tiny.cfg.act)
    np.testing.assert_allclose(pooled, aux["blocks"][l]["tokens"].mean(0), atol=1e-5, rtol=1e-5)


def test_batched_equals_one_by_one(tiny):
  rng = np.random.default_rng(3)
  imgs = rng.standard_normal((3, 96, 96, 3)).astype(np.float32)
  q = rng.standard_normal((3, tiny.cfg.embed_dim)).astype(np.float32)
  pairs = lg.legrad(tiny.model, tiny.params, imgs, q)
  many = lg.legrad(tiny.model, tiny.params, imgs[:1], q)  # one image, 3 prompts
  for b in range(3):
    one = lg.legrad(tiny.model, tiny.params, imgs[b:b + 1], q[b:b + 1])
    np.testing.assert_allclose(pairs["map"][b], one["map"][0], atol=1e-6)
    np.testing.assert_allclose(pairs["grid"][b], one["grid"][0], atol=1e-6, rtol=1e-5)
    one0 = lg.legrad(tiny.model, tiny.params, imgs[0], q[b])  # HWC image, [E] query
    np.testing.assert_allclose(many["map"][b], one0["map"][0], atol=1e-6)
  broadcast = lg.legrad(tiny.model, tiny.params, imgs, q[:1])  # many images, one query
  np.testing.assert_allclose(broadcast["map"][2], lg.legrad(tiny.model, tiny.params, imgs[2:], q[:1])["map"][0],
                             atol=1e-6)


def test_constant_map_is_valid(tiny):
  """A zero query gives zero gradients: LeGrad's min-max gives NaN; ours gives a valid 0 map."""
  img = np.random.default_rng(4).standard_normal((1, 96, 96, 3)).astype(np.float32)
  out = lg.legrad(tiny.model, tiny.params, img, np.zeros((2, tiny.cfg.embed_dim), np.float32))
  assert np.all(np.asarray(out["map"]) == 0) and np.all(np.asarray(out["grid"]) == 0)
  m = np.asarray(lg.minmax(jnp.full((2, 4, 4), 3.0)))
  assert np.all(m == 0)


def test_rectangular_and_bad_inputs(tiny):
  img = np.random.default_rng(5).standard_normal((1, 64, 112, 3)).astype(np.float32)
  out = lg.legrad(tiny.model, tiny.params, img, np.ones((1, tiny.cfg.embed_dim), np.float32))
  assert out["grid"].shape == (1, 4, 7) and out["map"].shape == (1, 64, 112)
  assert np.all(np.isfinite(np.asarray(out["map"])))
  with pytest.raises(ValueError, match="dim"):
    lg.legrad(tiny.model, tiny.params, img, np.ones((1, 5), np.float32))
  with pytest.raises(ValueError, match="pair"):
    lg.legrad(tiny.model, tiny.params, np.zeros((2, 96, 96, 3)), np.ones((3, 32)))
  with pytest.raises(ValueError, match="out of range"):
    lg.legrad(tiny.model, tiny.params, img, np.ones((1, 32)), layers=-9)
  with pytest.raises(ValueError, match="exactly one"):
    lg.explain(tiny.model, tiny.params, img)


@pytest.mark.slow
def test_parity_vit_b16():
  """ViT-B/16 layout (12 x 768, 12 heads, embed 512): pairs at 224, one image x 2 prompts at 448."""
  peer = Peer(dict(embed_dim=512, quick_gelu=True,
                   vision_cfg=dict(image_size=224, patch_size=16, width=768, layers=12, head_width=64),
                   text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=1)))
  rng = np.random.default_rng(6)
  imgs = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
  text = rng.standard_normal((2, 512)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  ref = official_legrad(peer, imgs, text, -2, pairs=True)
  got = lg.legrad(peer.model, peer.params, imgs.transpose(0, 2, 3, 1), text)["map"]
  np.testing.assert_allclose(np.asarray(got), ref, atol=TOL, rtol=0)
  big = rng.standard_normal((1, 3, 448, 448)).astype(np.float32)
  ref = official_legrad(peer, big, text, 0, pairs=False)
  got = lg.legrad(peer.model, peer.params, big.transpose(0, 2, 3, 1), text, layers=0)["map"]
  np.testing.assert_allclose(np.asarray(got), ref, atol=TOL, rtol=0)
