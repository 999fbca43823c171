"""``trace-jax convert --from openai|openclip|hf|crate SRC DST [--model-name NAME] [--bpe PATH]``.

Writes a trace_jax model dir (``trace_jax.model_dir.save_model``): orbax params, config.json and,
when available, tokenizer files (HF: vocab.json + merges.txt; OpenAI / open_clip: the BPE .gz from
``--bpe`` or the one packaged with open_clip).
"""
from __future__ import annotations

import argparse
import os
import sys

SOURCES = ("openai", "openclip", "hf", "crate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--from", dest="source", required=True, choices=SOURCES,
                      help="checkpoint layout: openai (.pt TorchScript / state dict), openclip (hub folder or "
                           "state dict + --model-name), hf (save_pretrained folder), crate")
  parser.add_argument("src", help="source file or folder")
  parser.add_argument("dst", help="output model directory")
  parser.add_argument("--model-name", default=None,
                      help="open_clip model name (e.g. ViT-B-16) for a bare open_clip state dict")
  parser.add_argument("--bpe", default=None, help="CLIP BPE merges .txt.gz to ship with the model "
                      "(default for openai/openclip: open_clip's packaged bpe_simple_vocab_16e6.txt.gz)")
  # --from crate only (trace_jax.convert.crate reads them with getattr)
  parser.add_argument("--heads", type=int, default=None, help="--from crate: attention heads (not stored in the weights)")
  parser.add_argument("--pool", default=None, help="--from crate: classifier pooling (default cls)")


def convert(source: str, src: str, dst: str, model_name: str | None = None, bpe: str | None = None) -> str:
  """Convert and save; returns the model dir. Raises ValueError / FileNotFoundError on bad input."""
  from trace_jax.model_dir import save_model
  from trace_jax.convert import common
  if not os.path.exists(src):
    raise FileNotFoundError(f"source {src} does not exist")
  if source == "openai":
    from trace_jax.convert.openai import load_openai
    cfg, params = load_openai(src)
    tok = common.bpe_files(bpe)
  elif source == "openclip":
    from trace_jax.convert.openclip import load_openclip
    cfg, params = load_openclip(src, model_name)
    tok = common.bpe_files(bpe)
  elif source == "hf":
    from trace_jax.convert import hf
    cfg, params = hf.load_hf_dir(src)
    tok = hf.tokenizer_files(src) or (common.bpe_files(bpe) if bpe else {})
  else:
    raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
  return save_model(dst, params, cfg, source=f"{source}:{os.path.abspath(src)}", tokenizer_files=tok)


def run(args: argparse.Namespace) -> int:
  try:
    if args.source == "crate":  # trace_jax/convert/crate.py (issue 6); imported only when asked for
      from trace_jax.convert.crate import convert_cli
      return int(convert_cli(args) or 0)
    out = convert(args.source, args.src, args.dst, args.model_name, args.bpe)
  except (ValueError, FileNotFoundError) as e:
    print(f"trace-jax convert: error: {e}", file=sys.stderr)
    return 2
  tok = os.path.join(out, "tokenizer")
  print(f"wrote {out}" + ("" if os.path.isdir(tok) else " (no tokenizer files: pass --bpe to add one)"))
  return 0
