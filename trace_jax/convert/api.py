"""``convert(source, src, dst)``: a checkpoint -> a model directory, written all at once or not at all.

The model dir is written into a temporary sibling of ``dst`` (same filesystem, so renames are
atomic) and renamed into place only when complete, so a failed conversion leaves ``dst`` as it was:

* ``dst`` absent (or an empty directory): the finished sibling is renamed to ``dst``.
* ``dst`` a non-empty directory: refused unless ``overwrite=True``; then ``dst`` must be a trace_jax
  model directory (its ``config.json`` says so: ``--overwrite`` never deletes some other folder) not
  holding the source, and it is renamed aside, the new one renamed in, and only then the old one
  deleted (renamed back if the swap fails).

Used by ``trace-jax convert`` (trace_jax/cli/convert.py) and by code that converts in-process.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

SOURCES = ("openai", "openclip", "hf", "crate", "bigvision")


def convert(source: str, src: str, dst: str, model_name: str | None = None, bpe: str | None = None, *,
            overwrite: bool = False, trust_torchscript: bool = False, heads: int | None = None,
            pool: str | None = None, eta: float | None = None, lambd: float | None = None,
            tokenizer: str | None = None) -> str:
  """Convert ``src`` (layout ``source``) to the model dir ``dst``; returns its absolute path.

  ``bpe``: the CLIP BPE file to ship with a CLIP model; ``tokenizer``: the SentencePiece model to
  ship with a SigLIP one (default: the ``spiece.model`` / ``tokenizer.model`` of a source folder,
  trace_jax/convert/siglip.py ``tokenizer_files``).

  ``heads`` / ``pool`` / ``eta`` / ``lambd``: ``source='crate'`` only (trace_jax/convert/crate.py). ``trust_torchscript``:
  open TorchScript archives with ``torch.jit.load`` (runs code from the archive) instead of reading
  their tensors only. Raises ValueError / FileNotFoundError on bad input, before touching ``dst``.
  """
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
  if not os.path.exists(src):
    raise FileNotFoundError(f"source {src} does not exist")
  if tokenizer is not None and not os.path.isfile(tokenizer):
    raise FileNotFoundError(f"tokenizer {tokenizer} does not exist")
  dst = os.path.abspath(dst)
  check_destination(dst, overwrite, src)
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.converting-", dir=parent)
  try:
    _default_mode(staging)
    _convert_into(source, src, staging, model_name, bpe, trust_torchscript, heads, pool, eta, lambd, tokenizer)
    _move_into_place(staging, dst)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return dst


def check_destination(dst: str, overwrite: bool, src: str | None = None) -> None:
  """Refuse a ``dst`` that converting would clobber (module doc); ValueError says why and what to do."""
  if not os.path.lexists(dst):
    return
  if not os.path.isdir(dst) or os.path.islink(dst):
    raise ValueError(f"output {dst} exists and is not a directory")
  if not os.listdir(dst):
    return
  if not overwrite:
    raise ValueError(f"output directory {dst} exists and is not empty; pass --overwrite to replace it")
  if not _is_model_dir(dst):
    raise ValueError(f"refusing to overwrite {dst}: it is not a trace_jax model directory (no config.json "
                     f"with a trace_jax format); remove it yourself or choose another output")
  if src is not None:
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_src == real_dst or real_src.startswith(real_dst + os.sep):
      raise ValueError(f"refusing to overwrite {dst}: the source {src} is inside it")


def _is_model_dir(path: str) -> bool:
  try:
    with open(os.path.join(path, "config.json")) as f:
      fmt = json.load(f).get("format")
  except (OSError, ValueError, AttributeError):
    return False
  return isinstance(fmt, str) and fmt.startswith("trace_jax.")


def _default_mode(path: str) -> None:
  """mkdtemp makes 0700 directories; the model dir gets what os.makedirs would have given it."""
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(path, 0o777 & ~mask)


def _move_into_place(new: str, dst: str) -> None:
  """Rename the finished ``new`` to ``dst``; an existing ``dst`` goes aside first and is deleted last."""
  if not os.path.lexists(dst) or (os.path.isdir(dst) and not os.listdir(dst)):
    os.replace(new, dst)  # onto nothing or an empty directory: one atomic rename
    return
  old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.replaced-", dir=os.path.dirname(dst))
  os.rmdir(old)  # only its unique name is wanted
  os.replace(dst, old)
  try:
    os.replace(new, dst)
  except BaseException:
    os.replace(old, dst)  # put the previous model dir back
    raise
  shutil.rmtree(old, ignore_errors=True)


def _is_hf_siglip(src: str) -> bool:
  from trace_jax.convert.siglip import is_hf_siglip_dir
  return is_hf_siglip_dir(src)


def _convert_into(source, src, out, model_name, bpe, trust_torchscript, heads, pool, eta=None, lambd=None,
                  tokenizer=None) -> None:
  """Write the model dir of ``src`` into the (empty, temporary) directory ``out``."""
  if source == "crate" and tokenizer is not None:
    raise ValueError("--tokenizer is the SentencePiece model of a SigLIP checkpoint; a CRATE classifier has none")
  loaded = _load_into(source, src, out, model_name, bpe, trust_torchscript, heads, pool, eta, lambd)
  if loaded is None:
    return
  cfg, params, tok, siglip_clean = loaded
  with tempfile.TemporaryDirectory() as tmp:
    if siglip_clean is not None:  # a SigLIP checkpoint: its SentencePiece model, not a CLIP BPE
      if bpe is not None:
        raise ValueError("--bpe is a CLIP BPE file; this is a SigLIP checkpoint (SentencePiece): use --tokenizer")
      from trace_jax.convert.siglip import tokenizer_files
      tok = tokenizer_files(cfg, src, tokenizer, siglip_clean, tmp)
    elif tokenizer is not None:
      raise ValueError("--tokenizer is the SentencePiece model of a SigLIP checkpoint; this is a CLIP "
                       "checkpoint: use --bpe")
    from trace_jax.model_dir import save_model
    save_model(out, params, cfg, source=f"{source}:{os.path.abspath(src)}", tokenizer_files=tok)


def _load_into(source, src, out, model_name, bpe, trust_torchscript, heads, pool, eta, lambd):
  """(cfg, params, CLIP tokenizer files, SigLIP text cleaning or None) of ``src``; a CRATE classifier
  dir (its own format) is written into ``out`` directly (returns None)."""
  from trace_jax.convert import common
  if source == "crate":  # a CRATE classifier dir (trace_jax/convert/crate.py), its own format
    from trace_jax.convert import crate
    crate.convert(src, out, model_name=model_name, heads=heads, pool=pool or "cls",
                  eta=0.1 if eta is None else float(eta), lambd=0.1 if lambd is None else float(lambd))
    return None
  if source == "openai":
    from trace_jax.convert.openai import load_openai
    cfg, params = load_openai(src, trust_torchscript=trust_torchscript)
    tok = common.bpe_files(bpe)
  elif source == "bigvision":  # SigLIP .npz (trace_jax/convert/siglip.py); tokenizer from --tokenizer
    from trace_jax.convert.siglip import load_bigvision
    return (*load_bigvision(src, model_name), {}, "hf")
  elif source == "openclip":
    from trace_jax.convert import siglip
    loaded = siglip.maybe_load_openclip(src, model_name)  # None unless a SigLIP (CustomTextCLIP) one
    if loaded is not None:  # open_clip tokenizes SigLIP text with clean='canonicalize'
      return (*loaded, {}, "openclip")
    from trace_jax.convert.openclip import load_openclip
    cfg, params = load_openclip(src, model_name)
    tok = common.bpe_files(bpe)
  elif os.path.isdir(src) and _is_hf_siglip(src):
    from trace_jax.convert import siglip
    return (*siglip.load_hf_dir(src, siglip.hf_config(src)), {}, "hf")
  else:
    from trace_jax.convert import hf
    cfg, params = hf.load_hf_dir(src)
    tok = hf.tokenizer_files(src) or (common.bpe_files(bpe) if bpe else {})
  return cfg, params, tok, None
