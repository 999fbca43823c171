"""One process of a multi-process dataset command (tests/test_dataset_processes.py).

    python tests/_multiprocess_cli_worker.py SPEC_JSON

SPEC: {"process_id", "num_processes", "devices", "runs": [argv, ...]} (the shape of
tests/_multiprocess_worker.py's spec, whose launcher starts this one). Each process sees ``devices``
emulated CPU devices; with num_processes > 1 the CLI joins ``jax.distributed`` from the environment
the launcher sets (coordinator 127.0.0.1, gloo CPU collectives), so ``jax.process_index()`` / ``process_count()`` pick its shards. Each run is one
``trace-jax`` command line; a non-zero exit status ends the process with it.
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
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
# num_processes > 1: the launcher set TRACE_JAX_DISTRIBUTED, JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
# JAX_PROCESS_ID; the trace-jax CLI joins jax.distributed from them (the documented multi-host launch)
from trace_jax.cli import main  # noqa: E402

for argv in spec["runs"]:
  rc = main(argv)   # the first command joins jax.distributed: no JAX call may come before it
  print(f"process {jax.process_index()}/{jax.process_count()}, {len(jax.local_devices())} local devices: "
        f"{' '.join(argv[:1])} exited {rc}", flush=True)
  if rc:
    sys.exit(rc)
