#!/usr/bin/env python
"""Evaluate the grounding of a trained model with attribution maps on the embedded test split.

    python evaluate.py --config configs/demo.py --checkpoint /tmp/demo [--out /tmp/demo/eval]
    python evaluate.py --config configs/demo.py --checkpoint /tmp/demo --config.eval.methods=gradcam,legrad,patch_similarity
    python evaluate.py --config configs/eval_amc_flickr30k.py [--checkpoint MODEL_DIR] [--out DIR]

Configs with ``config.eval.task`` (configs/eval_*.py: the papers' evaluations on real datasets) go to
``trace_jax.evaluation.real.run`` (checkpoint default ``config.eval.checkpoint``; docs/datasets.md).

``--checkpoint``: a train.py workdir (its latest checkpoint), its ``checkpoints/`` dir, or a model dir.
For each phrase (a unique referring expression of one object) and each method of
``config.eval.methods`` (any of ``trace_jax.attribution.api.METHODS`` plus ``patch_similarity`` and,
for local-alignment models, ``local_slots``), with metrics of ``trace_jax.evaluation.metrics``:

* pointing game (AMC §4.2, the authors' code: bicubic upsampling, first argmax, strictly inside the box);
* box accuracy: the scene's object boxes ranked by the min-max normalised map (AMC box ranking, IoU >= 0.5
  with the phrase's box);
* precision / recall / mIoU of the [0, 1] map binarised at ``eval.threshold`` against the object's pixels;
* patch mIoU: the min-max normalised patch grid at the threshold against the patches the object covers
  at least half of.

Prints a table, writes ``eval.json`` and a gallery ``gallery_<method>.png`` of overlays in ``--out``.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)
_CKPT = flags.DEFINE_string("checkpoint", None, "train.py workdir, its checkpoints/ dir, or a model dir "
                            "(real-dataset configs: default config.eval.checkpoint)")
_OUT = flags.DEFINE_string("out", None, "output dir (default: <checkpoint>/eval)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.mark_flags_as_required(["config"])

def resolve_model_dir(path: str, step: int | None = None) -> str:
  """A model dir for ``--checkpoint``: the path itself if it is one, else a train.py workdir's exported
  ``model/``; with ``--step`` (or no export yet) that checkpoint written as a model dir under
  ``<workdir>/eval/model_step<N>`` first (evaluation reads model dirs only)."""
  import numpy as np
  import jax
  from trace_jax import model_dir
  from trace_jax.models.config import CLIPConfig
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "params")):
    return path
  if step is None and os.path.isdir(os.path.join(path, "model")):
    return os.path.join(path, "model")
  ck_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  if not os.path.isdir(ck_dir) or not os.listdir(ck_dir):
    return path   # not a model dir nor a workdir: the task's loader says what is missing
  from trace_jax.training.checkpointing import restore_params_only
  params, meta, s = restore_params_only(ck_dir, step)
  if "model_config" not in meta:
    raise ValueError(f"checkpoint {ck_dir}/{s} has no model_config in its metadata")
  out = os.path.join(os.path.dirname(ck_dir), "eval", f"model_step{s}")
  if not os.path.isdir(out):
    model_dir.save(out, jax.tree.map(np.asarray, params), CLIPConfig.from_dict(meta["model_config"]),
                   source=f"{ck_dir} step {s}", heads=meta.get("heads", {}))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from trace_jax.evaluation import tasks
  config = _CONFIG.value
  if _CKPT.value is None and tasks.task_of(config) in ("grounding", "trace_embedded"):
    raise app.UsageError("--checkpoint is required")
  path = resolve_model_dir(_CKPT.value, _STEP.value) if _CKPT.value is not None else None
  out = _OUT.value
  if out is None and _CKPT.value is not None and tasks.task_of(config) in ("grounding", "trace_embedded"):
    out = os.path.join(_CKPT.value, "eval")   # beside the run, as before
  tasks.run(config, path, out)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from configs.common import run_main
  run_main(main, "evaluate.py")
