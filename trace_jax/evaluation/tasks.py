"""Every evaluation by name, one table: ``run(config, model_dir_path, out_dir)``.

The task is ``config.eval.task`` when the config names one (the papers' evaluations on real datasets,
configs/eval_*.py), else the embedded set's: ``trace_embedded`` for a TRACE config, ``grounding``
for the others. Every runner reads a model dir (``trace_jax.model_dir.load``), never a train loop.

  grounding            attribution maps vs phrase boxes / masks, embedded set (evaluation/embedded.py)
  trace_embedded       TRACE patch-token grounding and subspace purity, embedded set (trace/evaluate.py)
  class_retrieval, referring_retrieval, pointing_game, m2ib_localization, trace_grounding
                       the real-dataset tasks (evaluation/real/; docs/datasets.md)
"""
from __future__ import annotations

import os
from typing import Callable


def _grounding(config, path, out_dir, verbose):
  from trace_jax import model_dir
  from trace_jax.evaluation import embedded
  return embedded.evaluate(config, model_dir.load(path), out_dir or os.path.join(path, "eval"), verbose)


def _trace_embedded(config, path, out_dir, verbose):
  from trace_jax import model_dir
  from trace_jax.trace import evaluate as te
  e = config.eval
  out = os.path.join(out_dir or os.path.join(path, "eval"), "trace_eval.json")
  return te.run(config, model_dir.load(path), out, num_examples=e.get("num_examples"), verbose=verbose)


def _real(config, path, out_dir, verbose):
  from trace_jax.evaluation import real
  return real.run(config, path, out_dir, verbose)


TASKS: dict[str, Callable] = {"grounding": _grounding, "trace_embedded": _trace_embedded}
for _name in ("class_retrieval", "referring_retrieval", "pointing_game", "m2ib_localization", "trace_grounding"):
  TASKS[_name] = _real


def task_of(config) -> str:
  """The evaluation a config asks for (module docstring)."""
  task = config.get("eval", {}).get("task")
  if task is not None:
    return task
  return "trace_embedded" if config.get("loss", {}).get("name") == "trace" else "grounding"


def check_after_train(config) -> None:
  """Refuses ``eval.after_train`` (train.py evaluates the finished run on its training mesh) for a
  config whose evaluation is not the embedded grounding one: that is the only evaluation that runs
  on a sharded state in memory; the others read an exported model dir through evaluate.py."""
  if not config.eval.get("after_train"):
    return
  task = task_of(config)
  if task != "grounding" or config.data.name != "trace_shapes":
    raise ValueError(f"eval.after_train runs the embedded set's grounding evaluation (evaluation/embedded.py) "
                     f"on the training mesh; this config's evaluation is {task!r} on data.name "
                     f"{config.data.name!r} (it needs 'grounding' on 'trace_shapes'): leave it off and run "
                     "evaluate.py on the exported model dir")


def run(config, path: str | None, out_dir: str | None = None, verbose: bool = True) -> dict:
  """Runs the config's evaluation on the model dir ``path`` (None: ``config.eval.checkpoint``)."""
  task = task_of(config)
  if task not in TASKS:
    raise ValueError(f"unknown eval task {task!r}; expected one of {tuple(TASKS)}")
  if path is None:
    path = config.eval.get("checkpoint")
    if path is None:
      raise ValueError("no model dir: pass --checkpoint (a model dir or a train.py workdir)")
  return TASKS[task](config, os.path.abspath(os.path.expanduser(path)), out_dir, verbose)
