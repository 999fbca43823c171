"""``trace-jax convert --from openai|openclip|hf|crate|bigvision SRC DST [--model-name NAME] [--bpe PATH]
[--tokenizer SPM] [--overwrite]``.

Writes a trace_jax model dir (``trace_jax.model_dir.save_model``): orbax params, config.json and,
when available, tokenizer files (HF CLIP: vocab.json + merges.txt; OpenAI / open_clip CLIP: the BPE
.gz from ``--bpe`` or the one packaged with open_clip; SigLIP: the SentencePiece model from
``--tokenizer`` or the ``spiece.model`` / ``tokenizer.model`` of the source folder, stored as
``tokenizer/spiece.model``). The work is ``trace_jax.convert.convert``: DST is
written next to itself and renamed into place when complete, so a failed conversion leaves it as it
was; an existing non-empty DST is refused unless ``--overwrite``. TorchScript archives are read
without running their code unless ``--trust-torchscript``.
"""
from __future__ import annotations

import argparse
import json
import os

from trace_jax.convert.api import SOURCES


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--from", dest="source", required=True, choices=SOURCES,
                      help="checkpoint layout: openai (.pt TorchScript / state dict), openclip (hub folder or "
                           "state dict + --model-name; SigLIP ones too), hf (save_pretrained folder: CLIPModel or "
                           "SiglipModel), crate, bigvision (SigLIP .npz + --model-name B/16|So400m/14|...)")
  parser.add_argument("src", help="source file or folder")
  parser.add_argument("dst", help="output model directory (refused if it exists and is not empty, "
                      "unless --overwrite)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing model directory DST (swapped in only once the new one is complete)")
  parser.add_argument("--trust-torchscript", action="store_true",
                      help="open TorchScript archives with torch.jit.load, which RUNS CODE FROM THE ARCHIVE; "
                           "only for files from a source you trust that the default reader (tensors only, "
                           "no code) cannot read")
  parser.add_argument("--model-name", default=None,
                      help="open_clip model name (e.g. ViT-B-16) for a bare open_clip state dict; "
                           "--from crate: crate-t|s|b|l; --from bigvision: the variant (B/16, So400m/14)")
  parser.add_argument("--bpe", default=None, help="CLIP BPE merges .txt.gz to ship with the model "
                      "(default for openai/openclip: open_clip's packaged bpe_simple_vocab_16e6.txt.gz)")
  parser.add_argument("--tokenizer", default=None, metavar="SPM",
                      help="SigLIP: the SentencePiece model (.model) to ship with the model (default: the "
                           "spiece.model / tokenizer.model / sentencepiece.model in the source folder; big_vision: "
                           "e.g. the c4_en / cc_en.32000 sentencepiece.model)")
  parser.add_argument("--heads", type=int, default=None, help="--from crate: attention heads (not stored in the weights)")
  parser.add_argument("--pool", default=None, help="--from crate: classifier pooling (default cls)")
  parser.add_argument("--eta", type=float, default=None,
                      help="--from crate: ISTA step size η the checkpoint was trained with (not stored in the "
                           "weights; default 0.1, the official factory value)")
  parser.add_argument("--lambd", type=float, default=None,
                      help="--from crate: ISTA sparsity λ (not stored in the weights; default 0.1)")


def run(args: argparse.Namespace) -> int:
  from trace_jax.convert import convert
  out = convert(args.source, args.src, args.dst, args.model_name, args.bpe, overwrite=args.overwrite,
                trust_torchscript=args.trust_torchscript, heads=args.heads, pool=args.pool, eta=args.eta,
                lambd=args.lambd, tokenizer=args.tokenizer)
  if args.source == "crate":
    with open(os.path.join(out, "config.json")) as f:
      c = json.load(f)
    print(f"wrote {out}: CRATE dim {c['dim']}, depth {c['depth']}, heads {c['heads']}x{c['dim_head']}, "
          f"patch {c['patch_size']}, image {c['image_size']}, {c['num_classes']} classes")
    return 0
  tok = os.path.join(out, "tokenizer")
  with open(os.path.join(out, "config.json")) as f:
    siglip = json.load(f).get("vision", {}).get("kind") == "siglip"
  hint = "--tokenizer (its SentencePiece .model)" if siglip else "--bpe"
  print(f"wrote {out}" + ("" if os.path.isdir(tok) else f" (no tokenizer files: pass {hint} to add one)"))
  return 0
