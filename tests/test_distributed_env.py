"""The multi-host launch's environment (training/mesh.py, docs/scaling.md): jax 0.10's
``jax.distributed.initialize`` reads JAX_COORDINATOR_ADDRESS itself but not the process count or id,
so ``distributed_args`` reads JAX_NUM_PROCESSES / JAX_PROCESS_ID; a bad value is refused by name before
jax waits on a coordinator. (The launch itself, 2 real processes joined through these variables, is
tests/test_multiprocess.py and tests/test_dataset_processes.py.)"""
import pytest

from trace_jax.training import mesh as mesh_lib

VARS = ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TRACE_JAX_DISTRIBUTED_TIMEOUT", "TRACE_JAX_DISTRIBUTED")


@pytest.fixture
def env(monkeypatch):
  for v in VARS:
    monkeypatch.delenv(v, raising=False)
  return monkeypatch


def test_process_ids_from_env(env):
  assert mesh_lib.distributed_args() == {}   # left to jax's cluster detection (Cloud TPU, SLURM, GKE)
  env.setenv("JAX_NUM_PROCESSES", "4")
  env.setenv("JAX_PROCESS_ID", "3")
  env.setenv("TRACE_JAX_DISTRIBUTED_TIMEOUT", "60")
  assert mesh_lib.distributed_args() == {"num_processes": 4, "process_id": 3, "initialization_timeout": 60}


@pytest.mark.parametrize("values,match", [
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"JAX_NUM_PROCESSES": "2"}, "set both JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 must be < JAX_NUM_PROCESSES=2"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID='-1' must be >= 0"),
    ({"JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"}, "at least one process"),
])
def test_bad_process_env_named(env, values, match):
  for k, v in values.items():
    env.setenv(k, v)
  with pytest.raises(ValueError, match=match):
    mesh_lib.distributed_args()


def test_off_unless_asked(env):
  env.setenv("TRACE_JAX_DISTRIBUTED", "0")
  env.setenv("JAX_NUM_PROCESSES", "bad")   # never read: the run is single-process
  assert mesh_lib.maybe_initialize_distributed() is False
  assert mesh_lib.maybe_initialize_distributed(False) is False
