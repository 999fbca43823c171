"""One process of a multi-process training run on localhost (tests/test_multiprocess.py).

    python tests/_multiprocess_worker.py SPEC_JSON

SPEC: {"process_id", "num_processes", "devices", "runs": [{"workdir", "loss", "mesh": [d, f, t], "steps",
"out", "cache": compilation cache root (optional), "sets": {KEY: VALUE} config overrides, ...}]}. Each
process sees ``devices`` emulated CPU devices; with num_processes > 1 it joins ``jax.distributed``
through the documented launch (``maybe_initialize_distributed`` reading TRACE_JAX_DISTRIBUTED,
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, which the test sets) with gloo CPU
collectives, so the mesh spans every process' devices. Each run goes through train.py's ``run`` (the
real loop: this process' rows of each batch, orbax checkpoints, pre-emption, export by process 0);
then the final params are gathered and process 0 writes them to ``out`` (.npz, keys = tree paths).
"""
import json
import os
import sys

spec = json.loads(sys.argv[1])
os.environ["JAX_PLATFORMS"] = "cpu"
# Level 0: the same (unoptimised) CPU code in every run compared, and half the compile time.
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={spec['devices']} "
                           "--xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
from trace_jax.training import mesh as mesh_lib  # noqa: E402

# The documented launch (docs/scaling.md, train.py --distributed): the test's Launch sets
# TRACE_JAX_DISTRIBUTED, JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID per process.
assert mesh_lib.maybe_initialize_distributed() == (spec["num_processes"] > 1)
assert (jax.process_count(), jax.process_index()) == (spec["num_processes"], spec["process_id"])

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

logging.set_verbosity(logging.WARNING)

from configs import common  # noqa: E402
from trace_jax.training import multihost  # noqa: E402

import train as train_py  # noqa: E402  (repo root)


def make_config(run: dict):
  c = common.get_config()
  c.seed = run.get("seed", 0)
  c.data.batch_size = run.get("batch", 8)
  c.loss.name = run["loss"]
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = run["mesh"]
  c.train.steps = run["steps"]
  c.train.log_every = 1
  c.train.progress = False
  c.train.debug_step_sleep = run.get("sleep", 0.0)
  # one cache per process count: a later launch of the same program (the pre-emption test's resumed
  # and reference runs) loads it instead of compiling it again. (Process 1 cannot load process 0's
  # executable through jax_share_binary_between_hosts on CPU: each process' CPU topology fingerprint,
  # part of the cache key, differs.)
  if run.get("cache"):
    c.train.compilation_cache_dir = os.path.join(run["cache"], f"{spec['num_processes']}-processes")
  c.checkpoint.every_steps = run.get("every", 1000)
  c.checkpoint.async_save = False
  c.optim.schedule, c.optim.lr, c.optim.eps = "constant", 1e-3, 1e-4
  if run["loss"] == "trace":     # tests/test_trace_training.py's tiny CRATE config on the tiny shapes build
    from trace_jax.objectives.trace import default_trace_config
    c.data.name, c.data.data_dir, c.data.image_size = "trace_shapes", run["data_dir"], 32
    c.data.split_sizes = "train=24,validation=4,test=6,heldout=4,openvocab=6"
    c.loss.trace = default_trace_config()
    c.loss.trace.anchor_dim = 16
    c.model.preset, c.model.vision_heads, c.model.crate_dim_head, c.model.text_layers = "crate-clip-tiny", 5, 8, 1
  else:
    c.data.name, c.data.image_size, c.data.context_length, c.data.vocab_size = "random", 32, 8, 1000
    c.model.preset, c.model.vision_layers, c.model.text_layers = "tiny", 1, 1
    c.loss.local.layers = 1
  common.apply_overrides(c, {k: str(v) for k, v in run.get("sets", {}).items()})   # e.g. the eval test's
  return c


def main():
  for run in spec["runs"]:
    state = train_py.run(make_config(run), run["workdir"])
    params = multihost.host_params(state.params)          # every process joins the gather
    step = int(np.asarray(multihost.host_params(state.step)))
    if jax.process_index() == 0:
      flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(params)}
      tmp = run["out"] + ".tmp.npz"
      # which process holds each device of the run's mesh (the test checks which axes cross processes)
      mesh = jax.tree.leaves(state.params)[0].sharding.mesh
      procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
      np.savez(tmp, __step__=np.asarray(step), __processes__=procs, **flat)
      os.replace(tmp, run["out"])
    print(f"process {jax.process_index()}: {run['loss']} mesh {run['mesh']} done at step {step}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
