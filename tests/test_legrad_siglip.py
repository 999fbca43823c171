"""LeGrad on SigLIP vs the authors' ``legrad-torch==1.1`` ``LeWrapper.compute_legrad_siglip`` on a tiny
random open_clip 2.23.0 SigLIP (timm MAP trunk, 3 blocks) converted with trace_jax.convert.siglip.

Theirs sums the score over all prompts (one map per image); ours gives one map per (image, prompt)
pair, so each of our maps is compared with theirs called on that one image and that one prompt.
The empty-prompt correction needs ``wrapper.empty_embedding``; theirs would tokenise 'a photo of a'
with a downloaded HF tokenizer, so the test sets it to the normalised embedding of fixed random ids
and passes the same ids to ours. Tolerance: maps <= 1e-4 (notes/legrad-maskinversion.md, fp32 atol).
Every official call gets a freshly built model (the wrapper mutates the model it wraps).
"""
import contextlib
import io

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_peer, torch_or_skip

import siglip_refs as refs

TOL = 1e-4


class Peer:
  def __init__(self):
    self.torch = torch = torch_or_skip()
    require_peer("legrad", "legrad-torch")
    from trace_jax.convert.siglip import from_openclip_model
    from trace_jax.models import build
    m = refs.tiny_openclip(torch, seed=3)
    self.sd = m.state_dict()
    self.cfg, self.params = from_openclip_model(m, refs.TINY_MODEL_CFG)
    self.model = build(self.cfg)
    self.empty_ids = np.random.default_rng(11).integers(2, 1000, (1, 16))

  def fresh(self):
    import open_clip
    refs.register_tiny_timm()
    m = open_clip.CustomTextCLIP(**refs.TINY_MODEL_CFG)
    m.load_state_dict(self.sd)
    return m.eval().float()

  def official(self, image_nchw, text_emb, layer_index, correction):
    from legrad import LeWrapper
    torch = self.torch
    with contextlib.redirect_stdout(io.StringIO()):
      w = LeWrapper(self.fresh(), layer_index=layer_index)
    with torch.no_grad():
      e = torch.nn.functional.normalize(w.encode_text(torch.as_tensor(self.empty_ids)), dim=-1)
    w.empty_embedding = e.t()
    out = w.compute_legrad_siglip(torch.as_tensor(text_emb), torch.as_tensor(image_nchw),
                                  apply_correction=correction)
    return out.detach().numpy()[:, 0]  # [1, H, W]


@pytest.fixture(scope="module")
def peer():
  return Peer()


def _text_embs(peer, ids):
  from trace_jax.models import l2_normalize
  emb, _ = peer.model.apply({"params": peer.params}, jnp.asarray(ids, jnp.int32), method="encode_text")
  return np.asarray(l2_normalize(emb))


@pytest.mark.parametrize("size", [32, 48])          # native 4x4 grid; 6x6 (pos_embed resampled)
@pytest.mark.parametrize("layer_index", [-2, 0])    # LeGrad's default (last two blocks); all blocks
def test_parity_one_image_many_prompts(peer, size, layer_index):
  from trace_jax.attribution import explain
  rng = np.random.default_rng(size + layer_index)
  image = rng.standard_normal((1, 3, size, size)).astype(np.float32)
  ids = rng.integers(2, 1000, (3, 16))
  out = explain("legrad", peer.model, peer.params, jnp.asarray(image.transpose(0, 2, 3, 1)), ids,
                layers=layer_index, empty_ids=peer.empty_ids[0])
  ours = np.asarray(out["map"])
  assert ours.shape == (3, size, size)
  t = _text_embs(peer, ids)
  for p in range(3):
    theirs = peer.official(image, t[p:p + 1], layer_index, True)[0]
    err = float(np.max(np.abs(theirs - ours[p])))
    assert err <= TOL, f"prompt {p}: max abs err {err:.3g}"
  # the score reported is SigLIP's sigmoid logit of the pair: exp(t) cos + b
  assert np.asarray(out["score"]).shape == (3,)


def test_parity_pairs_without_correction(peer):
  from trace_jax.attribution import explain
  rng = np.random.default_rng(5)
  images = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  ids = rng.integers(2, 1000, (2, 16))
  ours = np.asarray(explain("legrad", peer.model, peer.params, jnp.asarray(images.transpose(0, 2, 3, 1)), ids,
                            correction=False)["map"])
  t = _text_embs(peer, ids)
  for b in range(2):
    theirs = peer.official(images[b:b + 1], t[b:b + 1], -2, False)[0]
    assert float(np.max(np.abs(theirs - ours[b]))) <= TOL


def test_correction_needs_the_empty_prompt(peer):
  from trace_jax.attribution import explain
  with pytest.raises(ValueError, match="empty-prompt correction"):
    explain("legrad", peer.model, peer.params, jnp.zeros((1, 32, 32, 3)), np.ones((1, 16), np.int32))
