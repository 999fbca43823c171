#!/usr/bin/env python
"""Train a CLIP-style model on the embedded grounding data (or any data source of the loop).

    python train.py --config configs/demo.py --workdir /tmp/demo
    python train.py --config configs/amc.py --workdir runs/amc --config.train.steps=2000 --config.data.batch_size=128

``--config.key=value`` overrides any key of the config (an unknown key is an error that names it).
Re-running with the same ``--workdir`` resumes from the latest checkpoint. Multi-host: pass
``--distributed`` (or set TRACE_JAX_DISTRIBUTED=1) on every host; the cluster environment (or
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, read by training/mesh.py) tells
``jax.distributed`` the rest.
See docs/training.md.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the exported model")
_DISTRIBUTED = flags.DEFINE_bool("distributed", None, "call jax.distributed.initialize() (multi-host)")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str):
  """The data source and objective of ``config``, trained in ``workdir`` (resumes); the final state.

  ``config.init_from``: a model dir whose config, tokenizer and params (and matching heads) start the
  run (read again on resume, where the checkpoint's params win). ``config.eval.after_train``: a run
  that finished (not pre-empted) is then evaluated on its training mesh (``evaluate_on_mesh``)."""
  from trace_jax import model_dir, objectives
  from trace_jax.data import sources
  from trace_jax.training import mesh as mesh_lib
  from trace_jax.training.loop import train
  from trace_jax.evaluation import tasks
  tasks.check_after_train(config)     # before anything is trained
  init = model_dir.load(config.init_from, dtype=None) if config.init_from else None
  source = sources.make(config, tokenizer=init.tokenizer if init is not None else None)
  task = objectives.make(config, source.info, init)
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  state = train(config, workdir, task, source, mesh=mesh)
  if config.eval.get("after_train"):
    from trace_jax.training import multihost
    if int(multihost.host_params(state.step)) >= int(config.train.steps):   # the same on every process
      evaluate_on_mesh(config, workdir, state, task, source.info, mesh)
  return state


def evaluate_on_mesh(config, workdir: str, state, task, data_info, mesh) -> dict:
  """The embedded grounding evaluation of the trained ``state`` on ``mesh`` (docs/scaling.md): every
  process calls it (the maps are one program on the whole mesh, gathered to every process), the
  model is the exported tree read from the sharded state in memory (not re-read from disk),
  each process reads only its rows of each eval batch (split over the train loop's batch axes), and
  process 0 writes ``<workdir>/eval/eval.json`` and the galleries. Returns the metrics."""
  import os
  from trace_jax.evaluation import embedded
  from trace_jax.training import sharding as shd
  from trace_jax.training.loop import state_model_dir
  md = state_model_dir(state, task, data_info, os.path.join(workdir, "model"))
  return embedded.evaluate(config, md, os.path.join(workdir, "eval"), mesh=mesh, batch_axes=shd.BATCH_AXES)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from trace_jax.training import mesh as mesh_lib
  config = _CONFIG.value
  enabled = _DISTRIBUTED.value if _DISTRIBUTED.value is not None else (config.distributed or None)
  mesh_lib.maybe_initialize_distributed(enabled)   # before any other JAX call
  from trace_jax.training.loop import WorkdirLocked
  try:
    run(config, _WORKDIR.value)
  except (ValueError, KeyError, FileNotFoundError, WorkdirLocked) as e:  # bad config / data: one line
    print(f"train.py: error: {e.args[0] if e.args else e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
  from configs.common import run_main
  run_main(main, "train.py")
