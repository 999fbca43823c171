"""`trace-jax` command line: embed | explain | invert | convert | ...

Each subcommand lives beside the code it drives and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches (imports are lazy so ``--help`` is fast).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    # name: (module, one-line help)
    "convert": ("trace_jax.convert.cli", "convert PyTorch / safetensors weights to a trace_jax model dir"),
    "embed": ("trace_jax.embed", "image / text embeddings and logits of a model dir (npz)"),
    "explain": ("trace_jax.attribution.cli", "attribution heatmaps (legrad, gradcam, rollout, chefer, saliency, rise, m2ib)"),
    "invert": ("trace_jax.inversion.cli", "MaskInversion: localized embeddings for masks"),
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="trace-jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (module, help_) in COMMANDS.items():
    p = sub.add_parser(name, help=help_)
    p.set_defaults(_module=module)
    if argv and argv[0] == name:  # only import the chosen command's module
      importlib.import_module(module).add_arguments(p)
  args = parser.parse_args(argv)
  return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
