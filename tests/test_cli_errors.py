"""Every command fails the same way on bad input: one line ``trace-jax <command>: error: ...`` on
stderr, exit status 2, no traceback (trace_jax/cli/__init__.py); unexpected errors keep theirs."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from trace_jax.cli import main
from trace_jax.models import get_config, init_params

WORDS = ["a", "red", "cube", "blue", "ball"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny model dir with a word tokenizer, a good image, a file that is no image, masks."""
  from PIL import Image
  from trace_jax.model_dir import save_model
  from trace_jax.tokenizers import WordTokenizer
  root = tmp_path_factory.mktemp("errors")
  cfg = get_config("tiny")
  cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "vocab_size": len(WORDS) + 4}))
  words = WordTokenizer(WORDS, cfg.text.context_length).save(str(root / "words.json"))
  model = save_model(str(root / "model"), init_params(cfg, jax.random.PRNGKey(0)), cfg, source="test",
                     tokenizer_files={"words.json": words})
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "img.png")
  (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image decoder can read")
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "empty_mask.png")
  mask = np.zeros((32, 32), np.float32)
  mask[4:20, 8:24] = 1
  Image.fromarray((mask * 255).astype(np.uint8)).save(root / "mask.png")
  np.save(root / "rank4.npy", mask[None, None])
  return {k: str(v) for k, v in dict(root=root, model=model, img=root / "img.png", broken=root / "broken.png",
                                     empty=root / "empty_mask.png", mask=root / "mask.png",
                                     rank4=root / "rank4.npy").items()}


def _fails_with_one_line(capsys, argv, contains):
  capsys.readouterr()
  assert main(argv) == 2, argv
  err = capsys.readouterr().err
  lines = err.splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(f"trace-jax {argv[0]}: error: "), err
  assert "Traceback" not in err
  assert contains in lines[0], (contains, lines[0])


def test_invert_bad_input(files, capsys):
  m, out = files["model"], os.path.join(files["root"], "inv.npz")
  base = ["invert", "--checkpoint", m, "--image", files["img"], "--out-npz", out, "--no-map-png"]
  _fails_with_one_line(capsys, base + ["--masks", files["empty"]], "is empty (all zero)")
  _fails_with_one_line(capsys, base + ["--masks", files["rank4"]], "must be [H, W] or [K, H, W]")
  _fails_with_one_line(capsys, base + ["--masks"], "--masks")                       # no masks after the flag
  _fails_with_one_line(capsys, base, "the following arguments are required: --masks")
  _fails_with_one_line(capsys, ["invert", "--checkpoint", m, "--image", files["broken"], "--masks", files["mask"],
                                "--no-map-png"], f"cannot read image {files['broken']}")
  assert not os.path.exists(out)


def test_convert_bad_input(files, tmp_path, capsys):
  from test_convert_safety import openai_safetensors
  good = openai_safetensors(str(tmp_path / "w.safetensors"))
  with open(good, "rb") as f:
    data = f.read()
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(data[:len(data) // 2])
  _fails_with_one_line(capsys, ["convert", "--from", "openai", str(truncated), str(tmp_path / "a")],
                       "not a readable safetensors file")
  text = tmp_path / "notes.pt"
  text.write_text("these are my notes, not a checkpoint\n")
  _fails_with_one_line(capsys, ["convert", "--from", "openai", str(text), str(tmp_path / "b")],
                       "not a torch checkpoint")
  _fails_with_one_line(capsys, ["convert", "--from", "caffe", good, str(tmp_path / "c")], "invalid choice")
  assert sorted(os.listdir(tmp_path)) == ["notes.pt", "truncated.safetensors", "w.safetensors"]


def test_explain_bad_input(files, capsys):
  m, out = files["model"], os.path.join(files["root"], "e.png")
  _fails_with_one_line(capsys, ["explain", "--checkpoint", m, "--image", files["broken"], "--text", "a red cube",
                                "--method", "gradcam", "--out", out], f"cannot read image {files['broken']}")
  _fails_with_one_line(capsys, ["explain", "--checkpoint", m, "--image", files["img"], "--text", "a red cube",
                                "--method", "gradcram", "--out", out], "invalid choice: 'gradcram'")
  assert not os.path.exists(out)


def test_embed_missing_model_dir(files, capsys):
  missing = os.path.join(files["root"], "no_such_model")
  _fails_with_one_line(capsys, ["embed", "--checkpoint", missing, "--texts", "a cube",
                                "--out", os.path.join(files["root"], "o.npz")], missing)


def test_embed_missing_model_dir_subprocess(files):
  """The same through a real process (python -m trace_jax.cli): exit status 2, one stderr line."""
  missing = os.path.join(files["root"], "no_such_model")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, "-m", "trace_jax.cli", "embed", "--checkpoint", missing, "--texts", "a",
                      "--out", os.path.join(files["root"], "o.npz")], capture_output=True, text=True, env=env,
                     timeout=300, cwd=ROOT)
  assert r.returncode == 2, r.stderr
  assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("trace-jax embed: error: "), r.stderr
  assert missing in r.stderr


def test_unexpected_errors_keep_their_traceback(files, monkeypatch):
  """Only bad input is turned into one line: a bug of ours (here: a TypeError) propagates."""
  from trace_jax.cli import common

  def bug(*a, **k):
    raise TypeError("an internal bug")

  monkeypatch.setattr(common, "load", bug)
  with pytest.raises(TypeError, match="an internal bug"):
    main(["embed", "--checkpoint", files["model"], "--texts", "a", "--out", os.path.join(files["root"], "x.npz")])


def test_text_changed_behind_the_users_back_is_reported(files, capsys):
  """Truncated prompts, unknown words and small images are warned about (the run goes on); an empty
  prompt is an error. Without the checks (cli/common.py Loaded.tokenize / load_images) no warning
  appears and this fails."""
  from PIL import Image
  m, root = files["model"], files["root"]
  small = os.path.join(root, "small.png")
  Image.fromarray(np.full((8, 10, 3), 128, np.uint8)).save(small)
  long_text = " ".join(["red"] * 40)                       # 40 tokens; the tiny model's context holds 14
  base = ["explain", "--checkpoint", m, "--method", "saliency", "--out-npz", os.path.join(root, "w.npz")]
  capsys.readouterr()
  assert main(base + ["--image", files["img"], "--text", long_text, "--text", "a green cube"]) == 0
  err = capsys.readouterr().err
  assert "text 1 'red red red" in err and "has 40 tokens; the context holds 14: the last 26 were dropped" in err
  assert "text 2: 1 word(s) not in the tokenizer's vocabulary, read as <unk>: green" in err
  assert main(base + ["--image", small, "--text", "a red cube"]) == 0
  assert f"image {small} is 10x8, far smaller than the model input 32x32: upscaled 4.0x" in capsys.readouterr().err
  _fails_with_one_line(capsys, base + ["--image", files["img"], "--text", "  "], "text 1 is empty")


def test_bpe_truncation_is_reported():
  """The CLIP BPE path: a caption past the 77-token context is reported with the dropped count
  (counted independently here from the untruncated encoding)."""
  import glob
  from conftest import torch_or_skip
  torch_or_skip()
  import open_clip
  from trace_jax.tokenizers import text_warnings
  from trace_jax.tokenizers.clip_bpe import CLIPTokenizer
  tok = CLIPTokenizer.from_bpe_gz(glob.glob(os.path.join(os.path.dirname(open_clip.__file__),
                                                         "bpe_simple_vocab_16e6.txt.gz"))[0])
  assert text_warnings(tok, ["a photo of a cat"]) == []
  text = " ".join(["a photo of a very small cat"] * 15)
  n = len(open_clip.tokenizer._tokenizer.encode(text))
  assert n > 75
  (w,) = text_warnings(tok, [text])
  assert f"has {n} tokens; the context holds 75: the last {n - 75} were dropped" in w
