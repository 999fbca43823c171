"""SigLIP model + converters: parity with open_clip 2.23.0, HF SiglipModel and big_vision-layout npz.

Every comparison: our forward (L2-normalised image and text embeddings, sigmoid logits
exp(t) * cos + b) after ``convert`` (files on disk -> model dir -> ``model_dir.load``) against the
PyTorch reference on the same random weights (biases / LayerNorm affines / probe randomised), max-abs
<= 1e-4 in float32 on CPU (issue 20, "Must show"). Also: the MAP head's attention probabilities
equal timm's ``AttentionPoolLatent`` ones, the model dir round trip, and that unknown / mis-shaped
source keys are named.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_peer, torch_or_skip

import siglip_refs as refs

TOL = 1e-4


def _ours(md_path, pixels_nchw, ids, pos_interp=None):
  from trace_jax import model_dir
  md = model_dir.load(md_path)
  out, aux = jax.jit(lambda p, x, t: md.model.apply({"params": p}, x, t, pos_interp=pos_interp))(
      md.params, jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)), jnp.asarray(ids, jnp.int32))
  return {k: np.asarray(out[k]) for k in ("image_embeds", "text_embeds", "logits_per_image")}, aux, md


def _assert_close(ref, ours, tol=TOL):
  for k in ("image_embeds", "text_embeds", "logits_per_image"):
    assert ref[k].shape == ours[k].shape, (k, ref[k].shape, ours[k].shape)
    err = float(np.max(np.abs(ref[k] - ours[k])))
    assert err <= tol, f"{k}: max abs err {err:.3g} > {tol}"


def _inputs(rng, n_img=2, n_txt=3, size=32, ctx=16, vocab=1000):
  pixels = rng.standard_normal((n_img, 3, size, size)).astype(np.float32)
  ids = rng.integers(2, vocab, size=(n_txt, ctx))
  return pixels, ids


# ----------------------------------------------------------------------------- model

def test_model_shapes_config_roundtrip_and_logits(tmp_path):
  from trace_jax import model_dir
  from trace_jax.models import build, get_config, init_params
  from trace_jax.models.config import CLIPConfig
  cfg = get_config("siglip-tiny")
  assert CLIPConfig.from_json(cfg.to_json()) == cfg
  params = init_params(cfg, jax.random.PRNGKey(0))
  model_dir.save(str(tmp_path / "m"), params, cfg)
  md = model_dir.load(str(tmp_path / "m"))
  assert md.config == cfg and type(md.model).__name__ == "SigLIP"
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 1000, (3, 16)), jnp.int32)
  out, aux = build(cfg).apply({"params": md.params}, x, ids)
  # logits = exp(t) cos + b, from the embeddings (float64 NumPy)
  img, txt = np.asarray(out["image_embeds"], np.float64), np.asarray(out["text_embeds"], np.float64)
  want = np.exp(float(md.params["logit_scale"])) * img @ txt.T + float(md.params["logit_bias"])
  np.testing.assert_allclose(np.asarray(out["logits_per_image"]), want, atol=1e-5)
  assert aux["image"]["pool"]["attn"].shape == (2, 4, 1, 16)
  np.testing.assert_allclose(np.asarray(aux["image"]["pool"]["attn"]).sum(-1), 1.0, atol=1e-6)
  assert len(aux["image"]["blocks"]) == 2 and aux["image"]["blocks"][0]["attn"].shape == (2, 4, 16, 16)


def test_config_rejects_unknown_siglip_option():
  from trace_jax.models import get_config, init_params
  cfg = get_config("siglip-tiny").replace(extra=(("ln_eps", 1e-6), ("nonsense", 1)))
  with pytest.raises(ValueError, match="nonsense"):
    init_params(cfg, jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------- open_clip

@pytest.fixture(scope="module")
def oc_tiny():
  torch = torch_or_skip()
  require_peer("open_clip", "open_clip_torch")
  return refs.tiny_openclip(torch)


def _save_hub(model, folder, torch, model_cfg):
  from safetensors.torch import save_file
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": {}}, f)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(folder, "open_clip_model.safetensors"))


def test_openclip_tiny_hub_folder_parity(oc_tiny, tmp_path):
  torch = torch_or_skip()
  from trace_jax.convert import convert
  _save_hub(oc_tiny, str(tmp_path / "hub"), torch, refs.TINY_MODEL_CFG)
  convert("openclip", str(tmp_path / "hub"), str(tmp_path / "md"))
  pixels, ids = _inputs(np.random.default_rng(1))
  ours, aux, md = _ours(str(tmp_path / "md"), pixels, ids)
  assert md.config.vision.kind == "siglip" and md.config.act == "gelu"
  _assert_close(refs.openclip_forward(oc_tiny, torch, pixels, ids), ours)
  # the MAP head's attention probabilities = timm AttentionPoolLatent's (recomputed from its weights)
  trunk = oc_tiny.visual.trunk
  with torch.no_grad():
    x = trunk.norm(trunk.blocks(trunk._pos_embed(trunk.patch_embed(torch.as_tensor(pixels)))))
    ap = trunk.attn_pool
    q = ap.q(ap.latent.expand(2, -1, -1)).reshape(2, 1, ap.num_heads, -1).transpose(1, 2)
    k = ap.kv(x).reshape(2, x.shape[1], 2, ap.num_heads, -1).permute(2, 0, 3, 1, 4)[0]
    probs = ((q * ap.scale) @ k.transpose(-2, -1)).softmax(-1).numpy()
  np.testing.assert_allclose(np.asarray(aux["image"]["pool"]["attn"]), probs, atol=1e-5)


def test_openclip_larger_resolution_parity(oc_tiny, tmp_path):
  """48 px (6x6 grid): timm dynamic_img_size resamples pos_embed bicubic + antialias = 'antialias'."""
  torch = torch_or_skip()
  from trace_jax.convert import convert
  _save_hub(oc_tiny, str(tmp_path / "hub"), torch, refs.TINY_MODEL_CFG)
  convert("openclip", str(tmp_path / "hub"), str(tmp_path / "md"))
  import copy
  ref = copy.deepcopy(oc_tiny)
  ref.visual.trunk.dynamic_img_size = True
  ref.visual.trunk.patch_embed.strict_img_size = False
  ref.visual.trunk.patch_embed.flatten = False
  ref.visual.trunk.patch_embed.output_fmt = "NHWC"
  ref.visual.trunk.patch_embed.dynamic_img_size = True
  pixels, ids = _inputs(np.random.default_rng(2), size=48)
  ours, _, _ = _ours(str(tmp_path / "md"), pixels, ids, pos_interp="antialias")
  _assert_close(refs.openclip_forward(ref, torch, pixels, ids), ours)


def test_openclip_bare_state_dict_b16_layout(tmp_path):
  """``ViT-B-16-SigLIP`` (open_clip's packaged config, timm vit_base_patch16_siglip_224, random weights):
  a bare state dict (.bin) + --model-name through the CLI."""
  torch = torch_or_skip()
  open_clip = require_peer("open_clip", "open_clip_torch")
  from trace_jax.cli import main
  torch.manual_seed(0)
  model = refs.randomize(open_clip.create_model("ViT-B-16-SigLIP", pretrained=None), torch)
  torch.save(model.state_dict(), str(tmp_path / "sd.bin"))
  assert main(["convert", "--from", "openclip", str(tmp_path / "sd.bin"), str(tmp_path / "md"),
               "--model-name", "ViT-B-16-SigLIP"]) == 0
  pixels, ids = _inputs(np.random.default_rng(3), n_img=1, n_txt=2, size=224, ctx=64, vocab=32000)
  ours, _, md = _ours(str(tmp_path / "md"), pixels, ids)
  from trace_jax.models import get_config
  assert md.config == get_config("ViT-B-16-SigLIP")
  _assert_close(refs.openclip_forward(model, torch, pixels, ids), ours)


test_openclip_bare_state_dict_b16_layout = pytest.mark.slow(test_openclip_bare_state_dict_b16_layout)


def test_openclip_mis_shaped_and_unknown_keys_named(oc_tiny, tmp_path):
  torch_or_skip()
  from trace_jax.convert import siglip
  sd = {k: v.detach().numpy() for k, v in oc_tiny.state_dict().items()}
  bad = dict(sd)
  bad["visual.trunk.attn_pool.q.bias"] = np.zeros(7, np.float32)
  bad["visual.trunk.extra_thing"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    siglip.load_openclip(refs.TINY_MODEL_CFG, bad, "sd")
  assert "visual.trunk.attn_pool.q.bias" in str(e.value) and "visual.trunk.extra_thing" in str(e.value)


# ----------------------------------------------------------------------------- Hugging Face

@pytest.fixture(scope="module")
def hf_tiny():
  torch = torch_or_skip()
  require_peer("transformers")
  return refs.tiny_hf(torch)


def test_hf_siglip_folder_parity(hf_tiny, tmp_path):
  torch = torch_or_skip()
  from trace_jax.convert import convert
  hf_tiny.save_pretrained(str(tmp_path / "hf"))
  assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
  convert("hf", str(tmp_path / "hf"), str(tmp_path / "md"))
  pixels, ids = _inputs(np.random.default_rng(4))
  ours, _, md = _ours(str(tmp_path / "md"), pixels, ids)
  assert md.config.act == "gelu_tanh" and md.config.vision.pos_interp == "torch_bicubic"
  with torch.no_grad():
    o = hf_tiny(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels))
  ref = {"image_embeds": o.image_embeds.numpy(), "text_embeds": o.text_embeds.numpy(),
         "logits_per_image": o.logits_per_image.numpy()}
  _assert_close(ref, ours)
  # larger resolution: HF interpolate_pos_encoding (torch bicubic, no antialias)
  pixels, ids = _inputs(np.random.default_rng(5), size=48)
  ours, _, _ = _ours(str(tmp_path / "md"), pixels, ids)
  with torch.no_grad():
    o = hf_tiny(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels), interpolate_pos_encoding=True)
  _assert_close({"image_embeds": o.image_embeds.numpy(), "text_embeds": o.text_embeds.numpy(),
                 "logits_per_image": o.logits_per_image.numpy()}, ours)


def test_hf_mis_shaped_key_named(hf_tiny):
  torch_or_skip()
  from trace_jax.convert import siglip
  cfg = siglip.config_from_hf(hf_tiny.config.to_dict())
  sd = {k: v.detach().numpy() for k, v in hf_tiny.state_dict().items()}
  sd["vision_model.head.probe"] = np.zeros((1, 2, 64), np.float32)
  with pytest.raises(ValueError, match="vision_model.head.probe"):
    siglip.params_from_hf(sd, cfg)


# ----------------------------------------------------------------------------- big_vision

def test_bigvision_npz_parity_against_open_clip_loader(tmp_path):
  """A big_vision-layout npz of random arrays, loaded on the reference side by open_clip 2.23.0's
  ``load_big_vision_weights`` (GELU switched to tanh: big_vision's nn.gelu), vs convert --from bigvision."""
  torch = torch_or_skip()
  require_peer("open_clip", "open_clip_torch")
  from open_clip.big_vision import load_big_vision_weights
  from trace_jax.convert import convert
  w = refs.bigvision_npz_arrays(np.random.default_rng(6))
  np.savez(str(tmp_path / "siglip.npz"), **w)
  ref = refs.gelu_to_tanh(refs.tiny_openclip(torch, seed=9), torch)
  load_big_vision_weights(ref, str(tmp_path / "siglip.npz"))
  convert("bigvision", str(tmp_path / "siglip.npz"), str(tmp_path / "md"), model_name="siglip-tiny")
  pixels, ids = _inputs(np.random.default_rng(7))
  ours, _, md = _ours(str(tmp_path / "md"), pixels, ids)
  assert md.config.act == "gelu_tanh"
  _assert_close(refs.openclip_forward(ref, torch, pixels, ids), ours)


def test_bigvision_errors_named(tmp_path):
  from trace_jax.convert import convert
  w = refs.bigvision_npz_arrays(np.random.default_rng(6))
  np.savez(str(tmp_path / "a.npz"), **w)
  with pytest.raises(ValueError, match="--model-name"):
    convert("bigvision", str(tmp_path / "a.npz"), str(tmp_path / "md"))
  with pytest.raises(ValueError, match="heads"):
    convert("bigvision", str(tmp_path / "a.npz"), str(tmp_path / "md"), model_name="B/8")
  bad = dict(w)
  bad["params/img/MAPHead_0/probe"] = np.zeros((1, 2, 64), np.float32)
  bad["params/img/Transformer/encoderblock_0/Extra/kernel"] = np.zeros(3, np.float32)
  np.savez(str(tmp_path / "b.npz"), **bad)
  with pytest.raises(ValueError) as e:
    convert("bigvision", str(tmp_path / "b.npz"), str(tmp_path / "md"), model_name="siglip-tiny")
  assert "MAPHead_0/probe" in str(e.value) and "Extra/kernel" in str(e.value)
  assert not os.path.exists(tmp_path / "md")
