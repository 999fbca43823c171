"""`trace-jax convert` ships SigLIP's SentencePiece tokenizer; `trace-jax explain --text` on the converted
SigLIP model dir equals the PyTorch pipeline end to end.

A tiny random open_clip 2.23.0 SigLIP (tests/siglip_refs.py) is saved as a hub folder together with a
SentencePiece model trained in the test (T5 layout). The reference side is entirely theirs: the image
squashed with PIL bicubic and scaled to [-1, 1] (SigLIP's mean = std = 0.5), the prompts tokenized by
open_clip's ``HFTokenizer(clean='canonicalize')`` (the tokenizer of open_clip's SigLIP configs) over
transformers' ``SiglipTokenizer``, the open_clip model's sigmoid logits and legrad-torch's
``compute_legrad_siglip`` with its empty prompt 'a photo of a' tokenized the same way. Tolerance 1e-4
(float32; notes/legrad-maskinversion.md).
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest

from conftest import require_peer, torch_or_skip

import siglip_refs as refs

TOL = 1e-4
CORPUS = ["a photo of a cat", "two dogs running on the grass", "a red car parked in the street",
          "the quick brown fox jumps over the lazy dog", "people sitting at a table with food",
          "a small bird on a branch", "three blue cups and a green plate", "an old building under the sky"]
PROMPTS = ["A photo of a CAT!", "two dogs, running on grass"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  torch = torch_or_skip()
  spm = require_peer("sentencepiece")
  require_peer("open_clip", "open_clip_torch")
  from PIL import Image
  from safetensors.torch import save_file
  root = tmp_path_factory.mktemp("siglip_cli")
  (root / "corpus.txt").write_text("\n".join(CORPUS * 4))
  spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=50,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  model = refs.tiny_openclip(torch, seed=4)
  hub = root / "hub"
  hub.mkdir()
  (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": refs.TINY_MODEL_CFG, "preprocess_cfg": {}}))
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(hub / "open_clip_model.safetensors"))
  os.replace(root / "sp.model", hub / "tokenizer.model")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "img.png")
  return root, model


def _openclip_tokenizer(root, spm_file):
  import transformers
  from open_clip.tokenizer import HFTokenizer
  d = root / "hf_tok"
  if not d.is_dir():
    transformers.SiglipTokenizer(vocab_file=str(spm_file)).save_pretrained(str(d))
  return HFTokenizer(str(d), context_length=refs.TINY_MODEL_CFG["text_cfg"]["context_length"], clean="canonicalize")


@pytest.fixture(scope="module")
def md(setup):
  from trace_jax.cli import main
  root, _ = setup
  with contextlib.redirect_stdout(io.StringIO()):
    assert main(["convert", "--from", "openclip", str(root / "hub"), str(root / "md")]) == 0
  return str(root / "md")


@pytest.mark.slow
def test_convert_ships_the_tokenizer_and_explain_text_matches_torch(setup, md):
  torch = torch_or_skip()
  require_peer("legrad", "legrad-torch")
  from PIL import Image
  from trace_jax.cli import main
  root, model = setup
  assert sorted(os.listdir(os.path.join(md, "tokenizer"))) == ["spiece.model", "trace_jax_tokenizer.json"]
  with open(os.path.join(md, "tokenizer", "trace_jax_tokenizer.json")) as f:
    assert json.load(f) == {"type": "sentencepiece", "context_length": 16, "pad_id": 1, "clean": "openclip"}

  npz = root / "maps.npz"
  with contextlib.redirect_stdout(io.StringIO()):
    rc = main(["explain", "--checkpoint", md, "--image", str(root / "img.png"), "--text", PROMPTS[0],
               "--text", PROMPTS[1], "--method", "legrad", "--out", str(root / "sheet.png"),
               "--out-npz", str(npz)])
  assert rc == 0 and os.path.isfile(root / "sheet.png")
  z = np.load(npz)

  # theirs: PIL squash to 32 px, [-1, 1]; open_clip tokenizer; open_clip model; legrad-torch
  tok = _openclip_tokenizer(root, root / "hub" / "tokenizer.model")
  with Image.open(root / "img.png") as im:
    px = np.asarray(im.convert("RGB").resize((32, 32), Image.BICUBIC), np.float32) / 255.0
  pixels = torch.as_tensor(((px - 0.5) / 0.5).transpose(2, 0, 1)[None])
  ids = tok(PROMPTS)
  with torch.no_grad():
    img = model.encode_image(pixels, normalize=True)
    txt = model.encode_text(ids, normalize=True)
    logits = (model.logit_scale.exp() * img @ txt.T + model.logit_bias)[0].numpy()
  np.testing.assert_allclose(z["score"], logits, atol=TOL)

  from legrad import LeWrapper
  for p in range(2):
    fresh = refs.tiny_openclip(torch, seed=4)  # the wrapper mutates the model it wraps
    with contextlib.redirect_stdout(io.StringIO()):
      w = LeWrapper(fresh)
    with torch.no_grad():
      w.empty_embedding = torch.nn.functional.normalize(w.encode_text(tok(["a photo of a"])), dim=-1).t()
    theirs = w.compute_legrad_siglip(txt[p:p + 1], pixels).detach().numpy()[0, 0]
    assert float(np.max(np.abs(theirs - z["map"][p]))) <= TOL, p


def test_hf_folder_tokenizer_and_convert_errors(setup, tmp_path):
  torch = torch_or_skip()
  transformers = require_peer("transformers")
  from trace_jax.convert import convert
  from trace_jax.tokenizers import load_tokenizer
  root, _ = setup
  spm_file = str(root / "hub" / "tokenizer.model")
  hf = tmp_path / "hf"
  refs.tiny_hf(torch).save_pretrained(str(hf))
  hf_tok = transformers.SiglipTokenizer(vocab_file=spm_file)
  hf_tok.save_pretrained(str(hf))                         # spiece.model next to the weights
  md = convert("hf", str(hf), str(tmp_path / "md"))
  ours = load_tokenizer(md)
  assert ours.clean == "hf" and ours.context_length == 16
  np.testing.assert_array_equal(
      ours(PROMPTS + ["hello </s> world"]),
      hf_tok(PROMPTS + ["hello </s> world"], padding="max_length", max_length=16, truncation=True).input_ids)

  with pytest.raises(ValueError, match="--bpe is a CLIP BPE file; this is a SigLIP checkpoint"):
    convert("hf", str(hf), str(tmp_path / "md2"), bpe=spm_file)
  with pytest.raises(ValueError, match="--tokenizer is the SentencePiece model of a SigLIP checkpoint"):
    convert("crate", str(hf), str(tmp_path / "md3"), tokenizer=spm_file)
  with pytest.raises(FileNotFoundError, match="tokenizer .*missing.model does not exist"):
    convert("hf", str(hf), str(tmp_path / "md4"), tokenizer=str(tmp_path / "missing.model"))
  spm = require_peer("sentencepiece")  # a vocabulary larger than the model's 1000 token embeddings
  (tmp_path / "big.txt").write_text("\n".join(f"w{i} x{i * 7} y{i * 13}" for i in range(3000)))
  spm.SentencePieceTrainer.train(input=str(tmp_path / "big.txt"), model_prefix=str(tmp_path / "big"),
                                 vocab_size=1200, model_type="word", eos_id=1, unk_id=2, pad_id=0, bos_id=-1,
                                 minloglevel=2)
  with pytest.raises(ValueError, match="1200 pieces, more than the 1000 token embeddings"):
    convert("hf", str(hf), str(tmp_path / "md5"), tokenizer=str(tmp_path / "big.model"))
  assert not os.path.exists(tmp_path / "md2") and not os.path.exists(tmp_path / "md5")


@pytest.mark.slow
def test_m2ib_and_invert_commands_on_the_siglip_dir(setup, md):
  """`explain --method m2ib` (token strip of SentencePiece rows: no start token) and `invert` (the
  empty prompt tokenized with the model dir's tokenizer) run on the SigLIP dir and equal the API."""
  from PIL import Image
  from trace_jax import model_dir
  from trace_jax.attribution import explain
  from trace_jax.cli import main, common
  from trace_jax.inversion.maskinversion import invert
  root, _ = setup
  with contextlib.redirect_stdout(io.StringIO()):
    rc = main(["explain", "--checkpoint", md, "--image", str(root / "img.png"), "--text", PROMPTS[1],
               "--method", "m2ib", "--set", "layer=1", "--set", "text_layer=0", "--set", "steps=3",
               "--set", "samples=2", "--out", str(root / "m2ib.png"), "--out-npz", str(root / "m2ib.npz")])
  assert rc == 0
  z = np.load(root / "m2ib.npz")
  loaded = common.load(md, tokenizer_for="--text")
  x = loaded.images([str(root / "img.png")], None, "squash")
  ids = loaded.tokenize([PROMPTS[1]])
  want = explain("m2ib", loaded.model, loaded.params, x, ids, layer=1, text_layer=0, steps=3, samples=2,
                 out_size=None)
  for k in ("map", "text", "score"):
    np.testing.assert_allclose(z[k], np.asarray(want[k]), atol=1e-5)
  with Image.open(root / "m2ib.png") as im:     # the overlay has the token strip below the image
    assert im.size[1] > 40

  mask = np.zeros((40, 48), np.uint8)
  mask[8:30, 10:40] = 255
  Image.fromarray(mask).save(root / "mask.png")
  with contextlib.redirect_stdout(io.StringIO()):
    rc = main(["invert", "--checkpoint", md, "--image", str(root / "img.png"), "--masks", str(root / "mask.png"),
               "--steps", "3", "--lr", "0.5", "--out-npz", str(root / "inv.npz")])
  assert rc == 0 and os.path.isfile(root / "mask_map.png")
  inv = np.load(root / "inv.npz")
  tok = model_dir.load(md).tokenizer
  want = invert(loaded.model, loaded.params, loaded.images([str(root / "img.png")], None, "squash")[0],
                (mask / 255.0).astype(np.float32), steps=3, lr=0.5, empty_ids=tok(["a photo of a"])[0])
  np.testing.assert_allclose(inv["lets"], np.asarray(want["lets"]), atol=1e-5)


@pytest.mark.slow
def test_serve_engine_on_the_siglip_dir(setup, md):
  """The serve page's engine on a SigLIP dir: LeGrad with the authors' empty-prompt correction (ids of
  'a photo of a' from the dir's tokenizer) equals the API, and invert runs with the same correction."""
  from PIL import Image
  from trace_jax import model_dir
  from trace_jax.attribution import explain
  from trace_jax.serve.engine import Engine
  root, _ = setup
  eng = Engine(md)
  with Image.open(root / "img.png") as im:
    rgb = np.asarray(im.convert("RGB"))
  res = eng.explain(rgb, [PROMPTS[1]], ["legrad"])
  tok = model_dir.load(md).tokenizer
  want = explain("legrad", eng.model, eng.params, eng.model_input(rgb), eng.tokenize([PROMPTS[1]])[0],
                 empty_ids=tok(["a photo of a"])[0])
  np.testing.assert_allclose(res["arrays"]["legrad_map"], np.asarray(want["map"]), atol=1e-5)
  inv = eng.invert(rgb, boxes=[[4, 4, 30, 30]])
  assert len(inv["masks"]) == 1
