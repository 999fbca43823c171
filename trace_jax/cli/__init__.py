"""`trace-jax` command line: embed | explain | invert | convert | ...

Every command is a module of this package exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only dispatches (imports are lazy so ``--help`` is fast) and owns the one way a command
fails on bad input: a single line ``trace-jax <command>: error: ...`` on stderr and exit status 2,
with no traceback. Bad input means the exception types the library raises for it (``BAD_INPUT``:
ValueError, OSError, KeyError, and the decode errors of the file formats we read); anything else is
a bug of ours and keeps its traceback. ``TRACE_JAX_TRACEBACK=1`` shows the traceback of bad input
too. The loaders the commands share (model dir, tokenizer, images, arrays) are in ``common.py``.
No library module imports this package.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    # name: (module, one-line help)
    "convert": ("trace_jax.cli.convert", "convert PyTorch / safetensors weights to a trace_jax model dir"),
    "embed": ("trace_jax.cli.embed", "image / text embeddings and logits of a model dir (npz)"),
    "explain": ("trace_jax.cli.explain", "attribution heatmaps (legrad, gradcam, rollout, chefer, saliency, rise, m2ib)"),
    "invert": ("trace_jax.cli.invert", "MaskInversion: localized embeddings for masks"),
    "plan": ("trace_jax.cli.plan", "compile the train step for a TPU topology: memory, FLOPs, step time per chip"),
    "serve": ("trace_jax.cli.serve", "a local web page: explain and invert in the browser (needs the 'serve' extra)"),
}


class UsageError(Exception):
  """Bad command-line input found by a command itself (argparse's own errors become one, too)."""


class _Parser(argparse.ArgumentParser):
  """argparse, but an error is a UsageError (one line, printed by ``main``) instead of usage + exit."""

  def error(self, message):
    raise UsageError(message, self.prog)


def _bad_input_types() -> tuple[type[BaseException], ...]:
  """Exception types that mean "the input is bad", including those of the decoders we use.

  Looked up lazily (and only from modules already imported) so that the dispatcher imports neither
  safetensors nor PIL nor torch itself. OSError covers FileNotFoundError and PIL's
  UnidentifiedImageError; ValueError covers json's JSONDecodeError.
  """
  import pickle
  import zipfile
  types: list[type[BaseException]] = [UsageError, ValueError, OSError, KeyError, EOFError,
                                      pickle.UnpicklingError, zipfile.BadZipFile]
  st = sys.modules.get("safetensors")
  if st is not None and isinstance(getattr(st, "SafetensorError", None), type):
    types.append(st.SafetensorError)
  return tuple(types)


def _message(e: BaseException) -> str:
  """One line: a KeyError's key without repr quotes doubled, multi-line messages joined with '; '."""
  text = str(e.args[0]) if isinstance(e, (KeyError, UsageError)) and e.args else str(e)
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  text = "; ".join(lines) or type(e).__name__
  return f"missing key {text}" if isinstance(e, KeyError) else text


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = _Parser(prog="trace-jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (module, help_) in COMMANDS.items():
    p = sub.add_parser(name, help=help_)
    p.set_defaults(_module=module)
    if argv and argv[0] == name:  # only import the chosen command's module
      importlib.import_module(module).add_arguments(p)
  prog = "trace-jax" + (f" {argv[0]}" if argv and argv[0] in COMMANDS else "")
  try:
    args = parser.parse_args(argv)
    # TRACE_JAX_DISTRIBUTED=1: a multi-host dataset command, every host runs the same line
    # (docs/scaling.md, docs/inference.md); the env var is read in one place, mesh.distributed_requested
    from trace_jax.training import mesh as mesh_lib
    mesh_lib.maybe_initialize_distributed()
    return int(importlib.import_module(args._module).run(args) or 0)
  except _bad_input_types() as e:
    if os.environ.get("TRACE_JAX_TRACEBACK"):
      raise
    if isinstance(e, UsageError) and len(e.args) > 1:
      prog = e.args[1]  # the (sub)parser that refused the arguments
    print(f"{prog}: error: {_message(e)}", file=sys.stderr)
    return 2
