"""`trace-jax convert` (issue 21): no code from a checkpoint runs, and no conversion destroys data.

* TorchScript archives are read through a restricted unpickler: a code payload in ``data.pkl`` is
  refused with an error naming the global, and its side effect (a marker file) never happens; a real
  (traced, fp16) OpenAI-layout archive still converts, without ``torch.jit.load``, with the parity of
  tests/test_convert_parity.py (max-abs <= 1e-4).
* The output is written into a temporary sibling and renamed into place: an existing non-empty DST is
  refused unless ``--overwrite`` (which only replaces a trace_jax model dir), and a conversion that
  fails midway leaves DST as it was, with no temporary directory left behind.
* A tokenizer folder holding two kinds of tokenizer files is refused, naming the files.
"""
from __future__ import annotations

import builtins
import copy
import json
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from conftest import torch_or_skip
from trace_jax.cli import main
from trace_jax.models.config import CLIPConfig, TextConfig, VisionConfig

# An OpenAI-layout CLIP small enough to convert in a second; heads = width // 64 as the converter infers.
TINY_OPENAI = CLIPConfig(
    vision=VisionConfig(image_size=16, patch_size=8, width=64, layers=1, heads=1),
    text=TextConfig(context_length=8, vocab_size=50, width=64, heads=1, layers=1, pool="argmax",
                    eos_token_id=49),
    embed_dim=32, act="quick_gelu")


def openai_safetensors(path: str, seed: int = 0) -> str:
  """A random OpenAI-layout state dict of TINY_OPENAI as .safetensors (numpy only: no torch)."""
  from safetensors.numpy import save_file
  from trace_jax.convert.openai import source_shapes
  r = np.random.default_rng(seed)
  save_file({k: r.normal(0, 0.05, s).astype(np.float32) for k, s in source_shapes(TINY_OPENAI).items()}, path)
  return path


def _tree(d) -> dict:
  """{relative path: bytes} of every file under d (to compare a directory before / after)."""
  out = {}
  for root, _, files in os.walk(d):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, d)] = fh.read()
  return out


def _leftovers(parent, name) -> list[str]:
  return [f for f in os.listdir(parent) if f.startswith(f".{name}.")]


def _one_error_line(capsys, command: str) -> str:
  err = capsys.readouterr().err
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"trace-jax {command}: error: "), err
  assert "Traceback" not in err
  return lines[0]


# ---------------------------------------------------------------------------------------------
# code in a TorchScript archive never runs

class _System:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


class _Exec:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _torchscript_zip(path, data_pkl: bytes, prefix="archive") -> str:
  """A zip laid out as torch.jit.save writes one (data.pkl, constants.pkl, code/, version)."""
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{prefix}/data.pkl", data_pkl)
    z.writestr(f"{prefix}/constants.pkl", pickle.dumps((), protocol=2))
    z.writestr(f"{prefix}/code/__torch__.py", "class Holder(Module):\n  __parameters__ = [\"weight\", ]\n"
                                              "  __buffers__ = []\n  weight : Tensor\n")
    z.writestr(f"{prefix}/version", "3\n")
    z.writestr(f"{prefix}/byteorder", "little")
  return str(path)


@pytest.mark.parametrize("payload, name", [(_System, "posix.system"), (_Exec, "__builtin__.exec")])
@pytest.mark.parametrize("hidden", [False, True])
def test_torchscript_code_payload_is_refused(tmp_path, monkeypatch, capsys, payload, name, hidden):
  """The payload as the whole pickle, or hidden in a ``__torch__`` module's attributes (as TorchScript
  pickles a module: NEWOBJ of the class, then BUILD with its attribute dict)."""
  marker = tmp_path / "marker"
  obj = payload(marker)
  if hidden:
    mod = types.ModuleType("__torch__")
    holder = type("Holder", (), {"__module__": "__torch__"})
    mod.Holder = holder
    monkeypatch.setitem(sys.modules, "__torch__", mod)
    obj, inner = holder(), obj
    obj.__dict__.update(training=True, weight=inner)
  data = pickle.dumps(obj, protocol=2)
  assert name.split(".")[-1].encode() in data  # (protocol 2 names builtins __builtin__)
  src = _torchscript_zip(tmp_path / "evil.pt", data)
  dst = tmp_path / "out"
  assert main(["convert", "--from", "openai", src, str(dst)]) == 2
  line = _one_error_line(capsys, "convert")
  assert f"the global {name}" in line and "weights_only" not in line and "trust" not in line
  assert not marker.exists()
  assert not dst.exists() and _leftovers(tmp_path, "out") == []
  from trace_jax.convert.torchscript import UnsafeArchiveError, read_state_dict
  with pytest.raises(UnsafeArchiveError, match=name.replace(".", r"\.")):
    read_state_dict(src)
  assert not marker.exists()


def test_pickled_state_dict_payload_is_refused_without_torch_advice(tmp_path, capsys):
  """A torch.save pickle (not TorchScript) goes through torch.load(weights_only=True); its refusal
  names the global but does not pass on torch's advice to retry with weights_only=False."""
  torch = torch_or_skip()
  marker = tmp_path / "marker"
  torch.save({"visual.proj": torch.zeros(2), "x": _System(marker)}, tmp_path / "evil.pt")
  assert main(["convert", "--from", "openai", str(tmp_path / "evil.pt"), str(tmp_path / "out")]) == 2
  line = _one_error_line(capsys, "convert")
  assert "the global posix.system" in line and "weights_only" not in line.lower()
  assert not marker.exists()


def test_traced_openai_archive_converts_without_running_it(tmp_path, monkeypatch):
  """A torch.jit.trace of a tiny open_clip CLIP (the OpenAI key layout), fp16 like the clip.load
  files: the tensors read without torch.jit.load are its state_dict(), and the converted model
  matches open_clip to 1e-4 (embeddings, logits, every block's attention)."""
  torch = torch_or_skip()
  from test_convert_parity import (OPENAI_TINY, TOL, _assert_parity, _ids_argmax, _oc_tiny, _openclip_ref,
                                   _ours, _pixels)
  from trace_jax.convert.torchscript import read_state_dict
  from trace_jax.model_dir import load_model
  m = _oc_tiny(torch, OPENAI_TINY, seed=4)
  m.half().float()  # the reference sees exactly the fp16-rounded weights
  x, t = torch.zeros(1, 3, 32, 32), torch.zeros(1, 12, dtype=torch.long)
  # a copy: the traced module shares its parameters with the one it traced, and .half() is in place
  traced = torch.jit.trace_module(copy.deepcopy(m), {"encode_image": x, "encode_text": t}, strict=False)
  traced.half()
  path = str(tmp_path / "ViT-tiny.pt")
  traced.save(path)
  with zipfile.ZipFile(path) as z:
    assert any("/code/" in n for n in z.namelist())
    assert b"HalfStorage" in z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
  ref_sd = torch.jit.load(path).state_dict()
  sd = read_state_dict(path)
  assert set(sd) == set(ref_sd)
  for k, v in ref_sd.items():
    assert sd[k].dtype == v.numpy().dtype, k
    np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)

  def no_jit_load(*a, **k):
    raise AssertionError("torch.jit.load must not be called without --trust-torchscript")

  monkeypatch.setattr(torch.jit, "load", no_jit_load)
  dst = str(tmp_path / "model")
  assert main(["convert", "--from", "openai", path, dst]) == 0
  cfg, params = load_model(dst)
  pixels, ids = _pixels(2, 32, seed=9), _ids_argmax(2, 12, 100)
  _assert_parity(_openclip_ref(torch, m, pixels, ids), _ours(cfg, params, pixels, ids), tol=TOL)


def test_trust_torchscript_flag_says_it_runs_code(capsys):
  with pytest.raises(SystemExit):
    main(["convert", "--help"])
  out = " ".join(capsys.readouterr().out.split())
  assert "--trust-torchscript" in out and "RUNS CODE FROM THE ARCHIVE" in out


# ---------------------------------------------------------------------------------------------
# the destination: refused when in use, replaced only whole

def test_nonempty_destination_needs_overwrite(tmp_path, capsys):
  src = openai_safetensors(str(tmp_path / "w.safetensors"))
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "notes.txt").write_text("mine")
  assert main(["convert", "--from", "openai", src, str(dst)]) == 2
  assert "--overwrite" in _one_error_line(capsys, "convert")
  # --overwrite replaces only a trace_jax model dir, never some other folder
  assert main(["convert", "--from", "openai", src, str(dst), "--overwrite"]) == 2
  assert "not a trace_jax model directory" in _one_error_line(capsys, "convert")
  assert _tree(dst) == {"notes.txt": b"mine"} and _leftovers(tmp_path, "out") == []
  # an empty directory is fine
  empty = tmp_path / "empty"
  empty.mkdir()
  assert main(["convert", "--from", "openai", src, str(empty)]) == 0
  assert (empty / "config.json").is_file()


def test_overwrite_swaps_in_the_new_model_dir(tmp_path):
  from trace_jax.model_dir import load_model
  dst = str(tmp_path / "out")
  assert main(["convert", "--from", "openai", openai_safetensors(str(tmp_path / "a.safetensors"), 0), dst]) == 0
  assert main(["convert", "--from", "openai", openai_safetensors(str(tmp_path / "b.safetensors"), 1), dst,
               "--overwrite"]) == 0
  _, params = load_model(dst)
  from safetensors.numpy import load_file
  want = load_file(str(tmp_path / "b.safetensors"))["visual.proj"]
  np.testing.assert_array_equal(params["visual"]["proj"], want)
  assert _leftovers(tmp_path, "out") == []
  with open(os.path.join(dst, "config.json")) as f:
    assert json.load(f)["source"].endswith("b.safetensors")
  mask = os.umask(0)
  os.umask(mask)
  assert os.stat(dst).st_mode & 0o777 == 0o777 & ~mask  # as os.makedirs, not mkdtemp's 0700


def test_source_inside_destination_is_not_deleted(tmp_path, capsys):
  dst = tmp_path / "out"
  assert main(["convert", "--from", "openai", openai_safetensors(str(tmp_path / "a.safetensors")), str(dst)]) == 0
  src = openai_safetensors(str(dst / "w.safetensors"))
  assert main(["convert", "--from", "openai", src, str(dst), "--overwrite"]) == 2
  assert "the source" in _one_error_line(capsys, "convert") and os.path.isfile(src)


@pytest.mark.parametrize("existing", [False, True])
def test_failed_conversion_leaves_destination_as_it_was(tmp_path, monkeypatch, existing):
  """The writer dies after writing part of the model dir (params, a half config.json)."""
  from trace_jax import model_dir
  from trace_jax.convert import convert
  dst = str(tmp_path / "out")
  if existing:
    convert("openai", openai_safetensors(str(tmp_path / "a.safetensors"), 0), dst)
  before = _tree(dst) if existing else None
  real_write = model_dir.write_model_dir

  def dies_midway(directory, params, meta, **kw):
    real_write(directory, params, meta, **kw)
    with open(os.path.join(directory, "config.json"), "w") as f:
      f.write('{"format": "trace_jax.mo')  # torn write
    raise RuntimeError("simulated crash while writing")

  monkeypatch.setattr(model_dir, "write_model_dir", dies_midway)
  with pytest.raises(RuntimeError, match="simulated crash"):
    convert("openai", openai_safetensors(str(tmp_path / "b.safetensors"), 1), dst, overwrite=True)
  if existing:
    assert _tree(dst) == before
  else:
    assert not os.path.exists(dst)
  assert _leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------------------------------------
# tokenizer folders of two kinds

def test_tokenizer_folder_of_two_kinds_is_refused(tmp_path):
  from trace_jax.model_dir import tokenizer_dir
  from trace_jax.tokenizers import WordTokenizer, load_tokenizer
  d = tmp_path / "m" / "tokenizer"
  d.mkdir(parents=True)
  WordTokenizer(["a", "cat"], 8).save(str(d))
  assert tokenizer_dir(str(tmp_path / "m")) == str(d)
  (d / "vocab.json").write_text("{}")
  (d / "merges.txt").write_text("#version: 0.2\n")
  for f in (lambda: load_tokenizer(str(tmp_path / "m")), lambda: tokenizer_dir(str(tmp_path / "m"))):
    with pytest.raises(ValueError, match=r"words\.json.*vocab\.json, merges\.txt"):
      f()
