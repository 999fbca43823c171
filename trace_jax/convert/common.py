"""Shared helpers of the weight converters: reading state dicts, checking source keys, layout maps.

A *state dict* here is ``{source_key: float32 np.ndarray}``. safetensors files are read with
``safetensors.numpy`` and TorchScript archives with ``torchscript.py`` (no torch, no code from the
file runs); torch is imported lazily and only for pickled ``.pt`` / ``.pth`` / ``.bin`` state dicts,
loaded ``weights_only`` (notes/checkpoint-formats.md).
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Mapping

import numpy as np

from trace_jax.treecheck import check_shapes, shapes_of

# Non-parameter entries that some checkpoints carry (notes/checkpoint-formats.md): OpenAI's
# TorchScript attributes, HF's position_ids buffers, open_clip's (normally non-persistent) masks.
IGNORED_KEYS = re.compile(r"(^|\.)(position_ids|input_resolution|context_length|vocab_size|attn_mask)$")

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _to_f32(a) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype.kind not in "fiub" and a.dtype.name != "bfloat16":
    raise ValueError(f"unsupported tensor dtype {a.dtype}")
  return a.astype(np.float32)


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """{key: float32 array} of a .safetensors file, without torch."""
  from safetensors import SafetensorError, safe_open
  out = {}
  try:
    with safe_open(path, framework="numpy") as f:
      for k in f.keys():
        out[k] = _to_f32(f.get_tensor(k))
  except SafetensorError as e:  # truncated / corrupt file: a ValueError naming it, as the other readers
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
  return out


def _torch_to_numpy(sd) -> dict[str, np.ndarray]:
  import torch
  out = {}
  for k, v in sd.items():
    if isinstance(v, torch.Tensor):
      out[k] = v.detach().to("cpu", torch.float32).numpy().copy()
    elif isinstance(v, (int, float)):
      out[k] = np.asarray(v, np.float32)  # OpenAI archives store input_resolution etc. as ints
  return out


def load_torch(path: str, *, trust_torchscript: bool = False) -> dict[str, np.ndarray]:
  """{key: float32 array} of a TorchScript archive (OpenAI's ``clip.load`` files) or a pickled state
  dict (``{'state_dict': ...}`` wrappers and DataParallel ``module.`` prefixes are unwrapped).
  fp16 / bf16 -> float32.

  Nothing in the file runs: TorchScript archives are read by ``torchscript.read_state_dict``
  (restricted unpickler, no torch needed), pickles by ``torch.load(weights_only=True)``. Only
  ``trust_torchscript=True`` (``--trust-torchscript``) opens an archive with ``torch.jit.load``,
  which runs code from it.
  """
  from trace_jax.convert import torchscript
  if torchscript.is_torchscript(path):
    if not trust_torchscript:
      return {k: _to_f32(v) for k, v in torchscript.read_state_dict(path).items()}
    torch = _import_torch(path)
    try:
      return _torch_to_numpy(torch.jit.load(path, map_location="cpu").state_dict())
    except RuntimeError as e:
      raise ValueError(f"{path}: torch.jit.load failed ({_first_line(e)})") from e
  with open(path, "rb") as f:
    head = f.read(4)
  if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save: a zip, or a legacy pickle
    raise ValueError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
  torch = _import_torch(path)
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - every failure here means the file is bad; said in one line
    raise ValueError(_torch_load_refusal(path, e)) from None
  if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
    sd = sd["state_dict"]
  if not isinstance(sd, Mapping):
    raise ValueError(f"{path}: expected a state dict (mapping of tensors), got {type(sd).__name__}")
  sd = dict(sd)
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return _torch_to_numpy(sd)


def _import_torch(path: str):
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"reading {path} needs torch (only .safetensors files and TorchScript archives "
                      f"load without it)") from e
  return torch


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _torch_load_refusal(path: str, e: BaseException) -> str:
  """The reason ``torch.load(weights_only=True)`` refused a file, without torch's advice to retry
  with ``weights_only=False`` (that would run code from the file)."""
  text = str(e)
  m = re.search(r"GLOBAL ([\w.]+)", text)
  if m:
    return (f"{path}: refusing to load: its pickle asks for the global {m.group(1)}, which is neither a "
            f"tensor nor a plain container (loading it could run code from the file)")
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()
           and not re.search(r"weights_only|weights only|trusted source|documentation", ln, re.I)]
  reason = lines[0] if lines else type(e).__name__
  reason = reason.removeprefix("WeightsUnpickler error: ").split(". ")[0]  # torch's advice follows
  return f"{path}: not a readable torch state dict ({type(e).__name__}: {reason})"


def load_state_dict(path: str, *, trust_torchscript: bool = False) -> dict[str, np.ndarray]:
  """Dispatch on the file name: .safetensors -> numpy reader, torch formats -> ``load_torch``."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  if path.endswith(".safetensors"):
    return load_safetensors(path)
  if path.endswith(TORCH_SUFFIXES):
    return load_torch(path, trust_torchscript=trust_torchscript)
  raise ValueError(f"{path}: unknown checkpoint file type; expected .safetensors, .pt, .pth or .bin")


def drop_ignored(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v for k, v in sd.items() if not IGNORED_KEYS.search(k)}


def check_source(sd: Mapping[str, np.ndarray], want: Mapping[str, tuple[int, ...]], what: str) -> None:
  """Refuse a source state dict whose keys / shapes differ from ``want``; names the source keys.

  A scalar stored as shape [1] (or vice versa) is accepted. Known buffers are ignored.
  """
  check_shapes(want, shapes_of(drop_ignored(sd)), f"{what} does not match the model it describes:",
               same=_same_shape,
               hint="most expected keys are absent: is this the right --from layout / --model-name?")


def _same_shape(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
  return have == want or int(np.prod(have)) == 1 == int(np.prod(want))  # scalar as [] or [1]


# ---------------------------------------------------------------------------------------------
# torch layout -> our Flax layout (trace_jax/models/layers.py)

def linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Dense kernel [in, out]."""
  return np.ascontiguousarray(w.T)


def qkv_kernel(w: np.ndarray, heads: int) -> np.ndarray:
  """torch Linear weight [W, W] of q, k or v -> DenseGeneral kernel [W, heads, hd].

  The output feature index is ``head * hd + d`` (head outer), as torch MHA and HF CLIP reshape it."""
  out, width = w.shape
  return np.ascontiguousarray(w.T.reshape(width, heads, out // heads))


def qkv_bias(b: np.ndarray, heads: int) -> np.ndarray:
  return b.reshape(heads, b.shape[0] // heads)


def out_kernel(w: np.ndarray, heads: int) -> np.ndarray:
  """torch out_proj weight [W, W] (input index head*hd + d) -> DenseGeneral kernel [heads, hd, W]."""
  out, width = w.shape
  return np.ascontiguousarray(w.T.reshape(heads, width // heads, out))


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [W, 3, p, p] (OIHW) -> our patch-embedding kernel [p, p, 3, W] (HWIO)."""
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def ln(weight: np.ndarray, bias: np.ndarray) -> dict:
  """torch LayerNorm -> our LayerNorm wrapper's params (``{'ln': {'scale', 'bias'}}``)."""
  return {"ln": {"scale": weight, "bias": bias}}


def block_params(get, heads: int, names: Mapping[str, str]) -> dict:
  """One transformer block from ``get(name) -> array`` given the source names of its parts.

  ``names`` keys: ln_1, ln_2 (prefixes with .weight/.bias), and either ``in_proj`` (fused q|k|v
  rows, torch MHA) or ``q``, ``k``, ``v`` (separate Linear prefixes), ``out``, ``fc``, ``proj``."""
  p = {"ln_1": ln(get(names["ln_1"] + ".weight"), get(names["ln_1"] + ".bias")),
       "ln_2": ln(get(names["ln_2"] + ".weight"), get(names["ln_2"] + ".bias"))}
  if "in_proj" in names:
    w = get(names["in_proj"] + "_weight")
    b = get(names["in_proj"] + "_bias")
    ws, bs = np.split(w, 3, axis=0), np.split(b, 3, axis=0)  # rows q | k | v
  else:
    ws = [get(names[n] + ".weight") for n in "qkv"]
    bs = [get(names[n] + ".bias") for n in "qkv"]
  attn = {n: {"kernel": qkv_kernel(w, heads), "bias": qkv_bias(b, heads)}
          for n, w, b in zip(("query", "key", "value"), ws, bs)}
  attn["out"] = {"kernel": out_kernel(get(names["out"] + ".weight"), heads), "bias": get(names["out"] + ".bias")}
  p["attn"] = attn
  p["mlp_fc"] = {"kernel": linear(get(names["fc"] + ".weight")), "bias": get(names["fc"] + ".bias")}
  p["mlp_proj"] = {"kernel": linear(get(names["proj"] + ".weight")), "bias": get(names["proj"] + ".bias")}
  return p


def getter(sd: Mapping[str, np.ndarray]):
  def get(k):
    return np.asarray(sd[k], np.float32)
  return get


def count_layers(keys: Iterable[str], prefix: str) -> int:
  """Number of distinct ``prefix{i}.`` indices among the keys."""
  idx = set()
  for k in keys:
    if k.startswith(prefix):
      head = k[len(prefix):].split(".", 1)[0]
      if head.isdigit():
        idx.add(int(head))
  if idx and idx != set(range(len(idx))):
    raise ValueError(f"layer indices under {prefix!r} are not contiguous: {sorted(idx)}")
  return len(idx)


def mlp_ratio(hidden: int, width: int) -> float:
  r = hidden / width
  if int(width * r) != hidden:
    raise ValueError(f"MLP hidden size {hidden} is not representable as width {width} * ratio")
  return r


def finalize(params: dict, cfg, what: str) -> dict:
  """Final check of the converted tree against the tree the config's model expects."""
  from trace_jax.model_dir import check_params
  check_params(params, cfg, f"converted {what}")
  return params


# ---------------------------------------------------------------------------------------------
# tokenizer files shipped with a converted model

def bpe_files(bpe: str | None) -> dict[str, str]:
  """``{'bpe_simple_vocab_16e6.txt.gz': path}`` for OpenAI / open_clip checkpoints: the file given
  with ``--bpe``, else the one packaged with open_clip if it is importable, else {}."""
  if bpe:
    if not os.path.isfile(bpe):
      raise FileNotFoundError(f"--bpe file {bpe} does not exist")
    name = os.path.basename(bpe)
    if not name.endswith(".txt.gz"):
      name = "bpe_simple_vocab_16e6.txt.gz"
    return {name: bpe}
  try:
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
  except (ImportError, ValueError):
    spec = None
  if spec and spec.submodule_search_locations:
    for loc in spec.submodule_search_locations:
      path = os.path.join(loc, "bpe_simple_vocab_16e6.txt.gz")
      if os.path.isfile(path):
        return {"bpe_simple_vocab_16e6.txt.gz": path}
  return {}


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def read_hf_weights(path: str) -> tuple[dict, str]:
  """(state dict, source file) of a Hugging Face ``save_pretrained`` folder: one weights file
  (``HF_WEIGHTS``; .bin needs torch) or the shards named by a sharded checkpoint's index file."""
  import json
  for name in HF_WEIGHTS:
    p = os.path.join(path, name)
    if os.path.isfile(p):
      return load_state_dict(p), p
  for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    p = os.path.join(path, name)
    if os.path.isfile(p):
      with open(p) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      sd = {}
      for s in shards:
        sd.update(load_state_dict(os.path.join(path, s)))
      return sd, p
  raise FileNotFoundError(f"{path}: no weights ({', '.join(HF_WEIGHTS)} or a sharded index)")
