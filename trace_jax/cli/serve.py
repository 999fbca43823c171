"""``trace-jax serve``: a local web page over a model dir (explain and invert in the browser).

    trace-jax serve --checkpoint DIR [--host 127.0.0.1] [--port 7860]

Binds to 127.0.0.1 unless told otherwise: the page runs models on uploads and is meant for the
machine it runs on (``--host 0.0.0.0`` exposes it to the network; there is no authentication).
Needs the ``serve`` extra: ``pip install -e '.[serve]'``. docs/serve.md.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True, help="trace_jax model directory")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
  p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
  p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity of the overlays")
  p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args) -> int:
  try:
    import uvicorn
    import starlette  # noqa: F401
    import python_multipart  # noqa: F401  (Starlette's form parser)
  except ImportError as e:
    raise ValueError(f"trace-jax serve needs the 'serve' extra ({e.name} is missing): "
                     "pip install -e '.[serve]'") from None
  if not 0 < args.port < 65536:
    raise ValueError(f"--port must be in 1..65535; got {args.port}")
  if not 0.0 <= args.alpha <= 1.0:
    raise ValueError(f"--alpha must be in [0, 1]; got {args.alpha}")
  from trace_jax.serve.app import make_app
  from trace_jax.serve.engine import Engine
  engine = Engine(args.checkpoint, alpha=args.alpha)
  app = make_app(engine)
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, workers=1)
  server = uvicorn.Server(config)
  print(f"trace-jax serve: {engine.name} ({engine.size} px) on http://{args.host}:{args.port}/ "
        "(Ctrl-C stops)", flush=True)
  server.run()
  return 0
