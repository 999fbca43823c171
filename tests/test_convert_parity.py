"""Converter parity: PyTorch CLIPs (transformers CLIPModel, open_clip 2.23.0, an OpenAI-style
TorchScript archive) -> on-disk formats -> trace_jax converters -> same numbers.

Compared, all max-abs <= 1e-4 in float32 on CPU (issue 2, "Must show"): L2-normalised image and
text embeddings, scaled logits, and the attention probabilities of EVERY block of both towers.
LayerNorm affines, biases and the logit scale are randomised first (they are 1 / 0 / constant at
init) so that a dropped or swapped parameter cannot hide. The larger-resolution checks compare with
each reference's own interpolation: HF ``interpolate_pos_encoding=True`` (torch bicubic, no
antialias) vs ``pos_interp='torch_bicubic'``, and timm ``resample_abs_pos_embed(antialias=True)``
written into the open_clip model (as legrad does, notes/legrad-maskinversion.md) vs 'antialias'.
"""
from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch_or_skip

TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# helpers

def _randomize(model, torch, seed=0):
  """Random LayerNorm affines / biases / logit scale (defaults would hide swapped or dropped ones)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if leaf.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1 and ("ln" in name or "norm" in name or "layrnorm" in name):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("logit_scale"):
        p.fill_(3.1)
  return model


def _ours(cfg, params, pixels_nchw, ids, pos_interp=None):
  from trace_jax.models import build
  model = build(cfg)
  f = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, pos_interp=pos_interp))
  out, aux = f(params, jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)), jnp.asarray(ids, jnp.int32))
  return {"image_embeds": np.asarray(out["image_embeds"]), "text_embeds": np.asarray(out["text_embeds"]),
          "logits_per_image": np.asarray(out["logits_per_image"]),
          "vision_attn": [np.asarray(b["attn"]) for b in aux["image"]["blocks"]],
          "text_attn": [np.asarray(b["attn"]) for b in aux["text"]["blocks"]]}


def _assert_parity(ref, ours, tol=TOL):
  errs = {}
  for k in ("image_embeds", "text_embeds", "logits_per_image"):
    assert ref[k].shape == ours[k].shape, (k, ref[k].shape, ours[k].shape)
    errs[k] = float(np.abs(ref[k] - ours[k]).max())
  for k in ("vision_attn", "text_attn"):
    assert len(ref[k]) == len(ours[k]) > 0, k
    for i, (a, b) in enumerate(zip(ref[k], ours[k])):
      assert a.shape == b.shape, (k, i, a.shape, b.shape)
      errs[f"{k}[{i}]"] = float(np.abs(a - b).max())
  bad = {k: v for k, v in errs.items() if not v <= tol}
  assert not bad, f"parity errors above {tol}: {bad}"
  # The comparison has teeth: the logits are not all equal and the attention is not uniform.
  assert np.ptp(ref["logits_per_image"]) > 1e-3
  return errs


def _hf_model(torch, text_cfg, vision_cfg, projection_dim, seed=0):
  import transformers
  torch.manual_seed(seed)
  conf = transformers.CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=projection_dim)
  conf._attn_implementation = "eager"  # attention probabilities are only returned by eager attention
  return _randomize(transformers.CLIPModel(conf).eval(), torch, seed)


def _hf_ref(torch, m, pixels, ids, interpolate=False):
  with torch.no_grad():
    o = m(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), output_attentions=True,
          interpolate_pos_encoding=interpolate)
  return {"image_embeds": o.image_embeds.numpy(), "text_embeds": o.text_embeds.numpy(),
          "logits_per_image": o.logits_per_image.numpy(),
          "vision_attn": [a.numpy() for a in o.vision_model_output.attentions],
          "text_attn": [a.numpy() for a in o.text_model_output.attentions]}


def _openclip_ref(torch, model, pixels, ids):
  """open_clip forward + every block's attention probabilities (recomputed in a forward hook by
  calling the same nn.MultiheadAttention with need_weights=True, per head)."""
  store = {"visual": [], "text": []}

  def hook(tower):
    def f(mod, args, kwargs, output):
      w = mod.forward(*args, need_weights=True, average_attn_weights=False, attn_mask=kwargs.get("attn_mask"))[1]
      store[tower].append(w.detach().numpy())
    return f

  handles = [b.attn.register_forward_hook(hook("visual"), with_kwargs=True)
             for b in model.visual.transformer.resblocks]
  handles += [b.attn.register_forward_hook(hook("text"), with_kwargs=True) for b in model.transformer.resblocks]
  try:
    with torch.no_grad():
      img = model.encode_image(torch.tensor(pixels), normalize=True)
      txt = model.encode_text(torch.tensor(ids), normalize=True)
      logits = model.logit_scale.exp() * img @ txt.T
  finally:
    for h in handles:
      h.remove()
  return {"image_embeds": img.numpy(), "text_embeds": txt.numpy(), "logits_per_image": logits.numpy(),
          "vision_attn": store["visual"], "text_attn": store["text"]}


def _pixels(n, size, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def _ids_eos(n, ctx, vocab, eos, seed=1):
  """Ids with the eos at varying positions and larger ids after it (argmax pooling would differ)."""
  r = np.random.default_rng(seed)
  ids = r.integers(0, vocab, size=(n, ctx))
  for i in range(n):
    pos = 2 + (3 * i) % (ctx - 2)
    ids[i, :pos] = r.integers(0, eos, size=pos)
    ids[i, pos] = eos
  return ids


def _ids_argmax(n, ctx, vocab, seed=1):
  """OpenAI convention: the end-of-text token is the highest id (vocab - 1); zeros after it."""
  r = np.random.default_rng(seed)
  ids = np.zeros((n, ctx), np.int64)
  for i in range(n):
    pos = 2 + (3 * i) % (ctx - 2)
    ids[i, :pos] = r.integers(1, vocab - 1, size=pos)
    ids[i, pos] = vocab - 1
  return ids


TINY_HF_TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=12, eos_token_id=50, bos_token_id=49,
                    pad_token_id=0, hidden_act="gelu")
TINY_HF_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8, hidden_act="gelu")

TINY_OC = dict(embed_dim=24, quick_gelu=True,
               vision_cfg=dict(image_size=32, patch_size=8, width=48, layers=2, head_width=16),
               text_cfg=dict(context_length=12, vocab_size=100, width=32, heads=4, layers=2))


# ---------------------------------------------------------------------------------------------
# Hugging Face CLIPModel

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  torch = torch_or_skip()
  m = _hf_model(torch, TINY_HF_TEXT, TINY_HF_VISION, 24)
  d = str(tmp_path_factory.mktemp("hf_tiny"))
  m.save_pretrained(d)  # config.json + model.safetensors
  return torch, m, d


def test_hf_tiny_parity_from_safetensors_dir(tiny_hf):
  torch, m, d = tiny_hf
  from trace_jax.convert import hf
  assert os.path.isfile(os.path.join(d, "model.safetensors"))
  cfg, params = hf.load_hf_dir(d)
  assert cfg.text.pool == "eos" and cfg.text.eos_token_id == 50 and cfg.act == "gelu"
  assert cfg.vision.pos_interp == "torch_bicubic"
  pixels, ids = _pixels(2, 32), _ids_eos(3, 12, 100, 50)
  _assert_parity(_hf_ref(torch, m, pixels, ids), _ours(cfg, params, pixels, ids))


def test_hf_tiny_parity_larger_resolution(tiny_hf):
  """48x48 on a 32x32 model: HF interpolate_pos_encoding (torch bicubic) vs pos_interp='torch_bicubic'."""
  torch, m, d = tiny_hf
  from trace_jax.convert import hf
  cfg, params = hf.load_hf_dir(d)
  pixels, ids = _pixels(2, 48, seed=3), _ids_eos(2, 12, 100, 50)
  ref = _hf_ref(torch, m, pixels, ids, interpolate=True)
  assert ref["vision_attn"][0].shape[-1] == 37  # 6x6 grid + class token: the resolution really changed
  _assert_parity(ref, _ours(cfg, params, pixels, ids, pos_interp="torch_bicubic"))


def test_hf_quick_gelu_argmax_eos2(tmp_path):
  """Old configs (eos_token_id == 2) pool at argmax(ids); QuickGELU; in-memory from_torch_model."""
  torch = torch_or_skip()
  from trace_jax.convert import hf
  text = dict(TINY_HF_TEXT, eos_token_id=2, bos_token_id=1, hidden_act="quick_gelu")
  m = _hf_model(torch, text, dict(TINY_HF_VISION, hidden_act="quick_gelu"), 24, seed=5)
  cfg, params = hf.from_torch_model(m)
  assert cfg.text.pool == "argmax" and cfg.act == "quick_gelu"
  pixels, ids = _pixels(1, 32, seed=4), _ids_argmax(2, 12, 100)
  _assert_parity(_hf_ref(torch, m, pixels, ids), _ours(cfg, params, pixels, ids))


@pytest.mark.slow
def test_hf_vit_b16_layout_parity(tmp_path):
  """Full-size ViT-B/16 layout (random weights): 224x224, 77-token context, 49408 vocab."""
  torch = torch_or_skip()
  from trace_jax.convert import hf
  text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=8, max_position_embeddings=77, eos_token_id=49407, hidden_act="quick_gelu")
  vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16, hidden_act="quick_gelu")
  m = _hf_model(torch, text, vision, 512)
  m.save_pretrained(str(tmp_path))
  cfg, params = hf.load_hf_dir(str(tmp_path))
  assert (cfg.vision.width, cfg.vision.heads, cfg.vision.layers, cfg.vision.patch_size) == (768, 12, 12, 16)
  pixels, ids = _pixels(1, 224), _ids_eos(2, 77, 49408, 49407)
  ids[:, -5:] = 49407  # HF pads with eos: pooling must take the first one
  _assert_parity(_hf_ref(torch, m, pixels, ids), _ours(cfg, params, pixels, ids))


# ---------------------------------------------------------------------------------------------
# open_clip

def _oc_tiny(torch, model_cfg=TINY_OC, seed=0):
  import open_clip
  torch.manual_seed(seed)
  cfg = copy.deepcopy(model_cfg)
  return _randomize(open_clip.model.CLIP(**cfg).eval(), torch, seed)


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_openclip_tiny_hub_folder_parity(tmp_path, weights):
  """Hub folder (open_clip_config.json + weights); heads from head_width (48 / 16 = 3, not 48 // 64)."""
  torch = torch_or_skip()
  from trace_jax.convert.openclip import load_openclip
  m = _oc_tiny(torch)
  sd = {k: v.contiguous() for k, v in m.state_dict().items()}
  if weights.endswith(".safetensors"):
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / weights))
  else:
    torch.save(sd, str(tmp_path / weights))
  with open(tmp_path / "open_clip_config.json", "w") as f:
    json.dump({"model_cfg": TINY_OC, "preprocess_cfg": {}}, f)
  cfg, params = load_openclip(str(tmp_path))
  assert cfg.vision.heads == 3 and cfg.act == "quick_gelu"
  pixels, ids = _pixels(2, 32, seed=7), _ids_argmax(3, 12, 100)
  _assert_parity(_openclip_ref(torch, m, pixels, ids), _ours(cfg, params, pixels, ids))


def test_openclip_tiny_larger_resolution_timm_antialias():
  """48x48: timm resample_abs_pos_embed(antialias=True) written into open_clip (legrad's
  vit_dynamic_size_forward) vs our pos_interp='antialias' (from the in-memory converter)."""
  torch = torch_or_skip()
  from timm.layers import resample_abs_pos_embed
  from trace_jax.convert.openclip import from_torch_model
  m = _oc_tiny(torch, seed=2)
  cfg, params = from_torch_model(m, TINY_OC)
  ref_model = copy.deepcopy(m)
  with torch.no_grad():
    pos = ref_model.visual.positional_embedding
    new = resample_abs_pos_embed(pos[None], new_size=[6, 6], num_prefix_tokens=1, interpolation="bicubic",
                                 antialias=True)[0]
    ref_model.visual.positional_embedding = torch.nn.Parameter(new)
  pixels, ids = _pixels(2, 48, seed=8), _ids_argmax(2, 12, 100)
  ref = _openclip_ref(torch, ref_model, pixels, ids)
  assert ref["vision_attn"][0].shape[-1] == 37
  _assert_parity(ref, _ours(cfg, params, pixels, ids, pos_interp="antialias"))


@pytest.mark.slow
def test_openclip_vit_b16_bare_state_dict_parity(tmp_path):
  """open_clip.create_model('ViT-B-16') (GELU, 12 heads), saved as a bare .safetensors state dict
  and converted with --model-name semantics (config from open_clip's packaged model_configs)."""
  torch = torch_or_skip()
  import open_clip
  from safetensors.torch import save_file
  from trace_jax.convert.openclip import load_openclip
  torch.manual_seed(0)
  m = _randomize(open_clip.create_model("ViT-B-16", pretrained=None).eval(), torch)
  path = str(tmp_path / "vit_b16.safetensors")
  save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)
  cfg, params = load_openclip(path, model_name="ViT-B-16")
  assert cfg.act == "gelu" and cfg.vision.heads == 12 and cfg.text.heads == 8
  pixels, ids = _pixels(1, 224), _ids_argmax(2, 77, 49408)
  _assert_parity(_openclip_ref(torch, m, pixels, ids), _ours(cfg, params, pixels, ids))


# ---------------------------------------------------------------------------------------------
# OpenAI TorchScript archive (fp16 weights, as the clip.load downloads)

OPENAI_TINY = dict(embed_dim=32, quick_gelu=True,
                   vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=2, head_width=64),
                   text_cfg=dict(context_length=12, vocab_size=100, width=64, heads=1, layers=2))


def test_openai_torchscript_fp16_archive_parity(tmp_path):
  """A TorchScript archive of an fp16 CLIP (keys as OpenAI's, plus its input_resolution /
  context_length / vocab_size entries); the architecture is inferred from shapes (heads = width // 64)."""
  torch = torch_or_skip()
  from trace_jax.convert.openai import load_openai
  m = _oc_tiny(torch, OPENAI_TINY, seed=3)
  m.half().float()  # the reference sees exactly the fp16-rounded weights
  sd = {k: v.half() for k, v in m.state_dict().items()}
  sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(12), vocab_size=torch.tensor(100))

  class Holder(torch.nn.Module):
    """Nested modules / parameters named exactly as the state dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return x

  root = Holder()
  for key, val in sd.items():
    *path, leaf = key.split(".")
    node = root
    for part in path:
      if not hasattr(node, part):
        node.add_module(part, Holder())
      node = getattr(node, part)
    if val.is_floating_point():
      node.register_parameter(leaf, torch.nn.Parameter(val, requires_grad=False))
    else:
      node.register_buffer(leaf, val)
  path = str(tmp_path / "ViT-tiny.pt")
  torch.jit.save(torch.jit.script(root), path)
  assert set(torch.jit.load(path).state_dict()) == set(sd)
  assert torch.jit.load(path).state_dict()["visual.proj"].dtype == torch.float16

  cfg, params = load_openai(path)
  assert (cfg.vision.heads, cfg.text.heads, cfg.vision.image_size) == (2, 1, 32)
  assert all(np.asarray(a).dtype == np.float32 for a in jax.tree.leaves(params))
  pixels, ids = _pixels(2, 32, seed=9), _ids_argmax(2, 12, 100)
  _assert_parity(_openclip_ref(torch, m, pixels, ids), _ours(cfg, params, pixels, ids))


# ---------------------------------------------------------------------------------------------
# refusals

def test_renamed_source_key_is_reported_by_source_name(tiny_hf, tmp_path):
  torch_or_skip()
  from safetensors.numpy import load_file, save_file
  from trace_jax.convert import hf
  _, _, d = tiny_hf
  sd = load_file(os.path.join(d, "model.safetensors"))
  sd["vision_model.pre_layernorm.weight"] = sd.pop("vision_model.pre_layrnorm.weight")
  sd["text_model.encoder.layers.1.mlp.fc1.bias"] = sd["text_model.encoder.layers.1.mlp.fc1.bias"][:-1]
  save_file(sd, str(tmp_path / "model.safetensors"))
  with open(os.path.join(d, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
    g.write(f.read())
  with pytest.raises(ValueError) as e:
    hf.load_hf_dir(str(tmp_path))
  msg = str(e.value)
  assert "missing keys (1): vision_model.pre_layrnorm.weight" in msg
  assert "unexpected keys (1): vision_model.pre_layernorm.weight" in msg
  assert "mis-shaped keys (1): text_model.encoder.layers.1.mlp.fc1.bias: (63,) != expected (64,)" in msg


def test_openclip_unsupported_options_refused():
  from trace_jax.convert.openclip import config_from_model_cfg
  bad = copy.deepcopy(TINY_OC)
  bad["vision_cfg"]["ls_init_value"] = 1e-5
  bad["text_cfg"]["pool_type"] = "last"
  with pytest.raises(ValueError, match=r"vision_cfg.ls_init_value=1e-05.*text_cfg.pool_type='last'"):
    config_from_model_cfg(bad)


def test_safetensors_convert_without_torch(tiny_hf, tmp_path):
  """HF dirs and open_clip .safetensors convert (and save) with torch made unimportable."""
  import subprocess
  import sys
  torch = tiny_hf[0]
  from safetensors.torch import save_file
  m = _oc_tiny(torch)
  oc = str(tmp_path / "oc.safetensors")
  save_file({k: v.contiguous() for k, v in m.state_dict().items()}, oc)
  with open(tmp_path / "open_clip_config.json", "w") as f:
    json.dump({"model_cfg": TINY_OC}, f)
  os.rename(oc, tmp_path / "open_clip_model.safetensors")
  code = (
      "import sys; sys.modules['torch'] = None\n"
      "from trace_jax.convert import convert\n"
      f"convert('hf', {tiny_hf[2]!r}, {str(tmp_path / 'a')!r})\n"
      f"convert('openclip', {str(tmp_path)!r}, {str(tmp_path / 'b')!r})\n"
      "assert sys.modules['torch'] is None\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.isfile(tmp_path / "a" / "config.json") and os.path.isfile(tmp_path / "b" / "config.json")


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14",
                                  "ViT-B-16-quickgelu"])
def test_named_config_fallback_equals_open_clip_model_configs(name, monkeypatch):
  """Without open_clip, bare state dicts use our presets; they must equal open_clip's own configs."""
  from trace_jax.convert import openclip
  mc = openclip.packaged_model_cfg(name)
  if mc is None:
    pytest.skip("open_clip is not installed")
  want = openclip.config_from_model_cfg(mc)
  monkeypatch.setattr(openclip, "packaged_model_cfg", lambda n: None)
  assert openclip.named_config(name) == want
