"""`trace-jax convert` + `trace-jax embed` end to end, against transformers' CLIPModel outputs.

Tolerance: max-abs <= 1e-4 on image_embeds, text_embeds (normalised) and logits_per_image.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import torch_or_skip
from trace_jax.cli import main

TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=12, eos_token_id=50, bos_token_id=49, pad_token_id=0, hidden_act="quick_gelu")
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def hf_converted(tmp_path_factory):
  """A random tiny HF CLIPModel saved with save_pretrained and converted with the CLI."""
  torch = torch_or_skip()
  import transformers
  torch.manual_seed(0)
  m = transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # non-default LayerNorm affines / biases
    for n, p in m.named_parameters():
      if n.endswith("bias") or "norm" in n:
        p.add_(0.2 * torch.randn(p.shape, generator=g))
  root = tmp_path_factory.mktemp("embed")
  src, dst = str(root / "hf"), str(root / "model")
  m.save_pretrained(src)
  assert main(["convert", "--from", "hf", src, dst]) == 0
  return torch, m, root, dst


def _write(root, name, arr):
  p = str(root / name)
  np.save(p, arr)
  return p


def _inputs(n_img=5, n_txt=3, size=32):
  r = np.random.default_rng(0)
  pixels = r.normal(size=(n_img, size, size, 3)).astype(np.float32)
  ids = r.integers(0, 50, size=(n_txt, 12)).astype(np.int32)
  for i in range(n_txt):
    ids[i, 3 + 2 * i] = 50  # first eos; larger ids after it must not matter
    ids[i, 4 + 2 * i:] = r.integers(51, 100, size=12 - 4 - 2 * i)
  return pixels, ids


@pytest.mark.parametrize("batch_size", [2, 32])
def test_embed_matches_transformers(hf_converted, batch_size):
  torch, m, root, dst = hf_converted
  pixels, ids = _inputs()
  out = str(root / f"out{batch_size}.npz")
  rc = main(["embed", "--checkpoint", dst, "--pixels", _write(root, "x.npy", pixels),
             "--token-ids", _write(root, "t.npy", ids), "--out", out, "--batch-size", str(batch_size)])
  assert rc == 0
  got = np.load(out)
  assert sorted(got.files) == ["image_embeds", "logits_per_image", "text_embeds"]
  with torch.no_grad():
    ref = m(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
  for k in got.files:
    want = getattr(ref, k).numpy()
    assert got[k].shape == want.shape and got[k].dtype == np.float32
    np.testing.assert_allclose(got[k], want, atol=1e-4, rtol=0, err_msg=k)
  assert np.ptp(got["logits_per_image"]) > 1e-3


def test_batched_pads_last_batch_without_recompiling():
  import jax
  import jax.numpy as jnp
  from trace_jax.inference.embed import batched
  traces = []

  @jax.jit
  def f(p, x):
    traces.append(x.shape)  # runs only when tracing
    return jnp.sum(x, axis=1) * p

  x = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
  np.testing.assert_array_equal(batched(f, 2.0, x, 3), 2 * x.sum(1))
  assert traces == [(3, 2)]


def test_embed_bad_inputs_name_the_problem(hf_converted, capsys):
  _, _, root, dst = hf_converted
  pixels, ids = _inputs()
  cases = [
      (["--pixels", _write(root, "r3.npy", pixels[0])], "rank 3"),
      (["--pixels", _write(root, "nchw.npy", pixels.transpose(0, 3, 1, 2))], "3 channels last"),
      (["--pixels", _write(root, "p.npy", pixels[:, :30, :30])], "not a positive multiple of the patch size 8"),
      (["--token-ids", _write(root, "long.npy", np.zeros((2, 13), np.int32))], "longer than the context length 12"),
      (["--token-ids", _write(root, "f.npy", ids.astype(np.float32))], "must be integers"),
      (["--token-ids", _write(root, "oov.npy", ids + 60)], "must lie in [0, 100)"),
      (["--texts", "a photo"], "--texts needs a tokenizer in the model dir"),
  ]
  for extra, msg in cases:
    capsys.readouterr()
    assert main(["embed", "--checkpoint", dst, "--out", str(root / "bad.npz")] + extra) == 2, extra
    assert msg in capsys.readouterr().err, (extra, msg)


def test_convert_cli_refuses_renamed_key(hf_converted, tmp_path, capsys):
  from safetensors.numpy import load_file, save_file
  _, _, root, _ = hf_converted
  src = root / "hf"
  sd = load_file(str(src / "model.safetensors"))
  sd["text_projection.kernel"] = sd.pop("text_projection.weight")
  save_file(sd, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((src / "config.json").read_text())
  assert main(["convert", "--from", "hf", str(tmp_path), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "missing keys (1): text_projection.weight" in err and "unexpected keys (1): text_projection.kernel" in err
  assert not os.path.exists(tmp_path / "out" / "config.json")


def _bpe_model(tmp_path):
  """A random tiny-width model with the real CLIP vocabulary (49408) + open_clip's packaged BPE."""
  import dataclasses

  import jax
  from trace_jax.model_dir import save_model
  from trace_jax.convert.common import bpe_files
  from trace_jax.models import get_config, init_params
  files = bpe_files(None)
  if not files:
    pytest.skip("open_clip (its packaged BPE file) is not installed")
  cfg = get_config("tiny")
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=49408, context_length=77, eos_token_id=49407))
  d = str(tmp_path / "bpe_model")
  save_model(d, init_params(cfg, jax.random.PRNGKey(0)), cfg, source="test", tokenizer_files=files)
  return d


def test_embed_texts_and_images(tmp_path):
  """--texts uses the model dir's tokenizer (same as open_clip.tokenize ids via --token-ids);
  --images preprocesses like open_clip's eval transform (same as --pixels of that transform)."""
  torch = torch_or_skip()
  import open_clip
  from PIL import Image
  d = _bpe_model(tmp_path)
  texts = ["a photo of a cat", "Two dogs, playing in the snow!"]
  ids = open_clip.tokenize(texts).numpy().astype(np.int32)
  paths = []
  r = np.random.default_rng(0)
  for i, (w, h) in enumerate([(50, 40), (32, 64)]):
    paths.append(str(tmp_path / f"im{i}.png"))
    Image.fromarray(r.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(paths[-1])
  preprocess = open_clip.image_transform(32, is_train=False)
  pixels = np.stack([preprocess(Image.open(p)).numpy().transpose(1, 2, 0) for p in paths])
  np.save(tmp_path / "t.npy", ids)
  np.save(tmp_path / "x.npy", pixels)
  a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
  assert main(["embed", "--checkpoint", d, "--texts", *texts, "--images", *paths, "--out", a]) == 0
  assert main(["embed", "--checkpoint", d, "--token-ids", str(tmp_path / "t.npy"),
               "--pixels", str(tmp_path / "x.npy"), "--out", b]) == 0
  a, b = np.load(a), np.load(b)
  for k in b.files:
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=k)


def test_preprocess_matches_torchvision(tmp_path):
  """'crop' = open_clip eval transform (Resize shortest side bicubic, CenterCrop, OpenAI mean/std);
  'squash' = LePreprocess (Resize((S, S), BICUBIC))."""
  torch_or_skip()
  import open_clip
  from PIL import Image
  from torchvision import transforms as T
  from trace_jax.data.preprocess import load_images
  r = np.random.default_rng(1)
  paths = []
  for i, (w, h) in enumerate([(61, 47), (40, 90), (24, 24)]):
    paths.append(str(tmp_path / f"im{i}.jpg"))
    Image.fromarray(r.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(paths[-1])
  crop = open_clip.image_transform(32, is_train=False)
  squash = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), *crop.transforms[2:]])
  for mode, tf in (("crop", crop), ("squash", squash)):
    want = np.stack([tf(Image.open(p)).numpy().transpose(1, 2, 0) for p in paths])
    got = load_images(paths, 32, mode)
    assert got.shape == (3, 32, 32, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=mode)
