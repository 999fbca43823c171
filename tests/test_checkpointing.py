"""orbax checkpoints of the train state: exact round trip (also onto another mesh), resume after
SIGKILL reaches bit-identical parameters, SIGTERM triggers a save.

The subprocess runs use train.py on random data with a 1-layer tiny model on the 8 emulated
devices (XLA_FLAGS from tests/conftest.py is inherited, with tests/fast_compile.py's optimisation level 0)
and share a compilation cache.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fast_compile

from configs import common
from trace_jax import objectives
from trace_jax.training import checkpointing as ck, mesh as mesh_lib, state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  c = common.get_config()
  c.data.name, c.data.image_size, c.data.batch_size = "random", 32, 8
  c.data.context_length = 8
  c.model.preset, c.model.vision_layers, c.model.text_layers = "tiny", 1, 1
  c.loss.name = "local_alignment"   # the largest state: CLIP + compressor params and Adam moments
  c.loss.local.layers = 1
  return c


def test_save_restore_round_trip_exact(tmp_path):
  c = _config()
  task = objectives.make(c, {"vocab_size": 1000, "context_length": 8})
  tx, _ = state_lib.make_optimizer(c.optim, 10)
  mesh = mesh_lib.make_mesh(2, 4)
  state, sh = state_lib.create_state(task.init_params, tx, mesh, 0)
  state = state.replace(rng=jax.random.PRNGKey(123))
  ckpt = ck.Checkpointer(str(tmp_path / "ck"), max_to_keep=2)
  meta = {"data_step": 7, "note": "x"}
  for s in (3, 5, 7):                         # keep-last-2 drops step 3
    ckpt.save(s, state, meta)
  ckpt.wait()
  assert ckpt.all_steps() == [5, 7] and ckpt.latest_step() == 7
  for target_mesh in (mesh, mesh_lib.make_mesh(8, 1)):   # same mesh, and another mesh
    tsh = state_lib.state_shardings(task.init_params, tx, target_mesh, 0)
    target = state_lib.abstract_with_shardings(task.init_params, tx, tsh, 0)
    restored, m = ckpt.restore(target)
    assert m == meta
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b, s in zip(jax.tree.leaves(state), jax.tree.leaves(restored), jax.tree.leaves(tsh)):
      assert a.dtype == b.dtype and a.shape == b.shape
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
      assert b.sharding == s
  ckpt.close()


def test_replica_parallel_threshold(tmp_path, caplog):
  """checkpoint.replica_parallel_min_bytes: a shard replicated over the data axis (2 replicas) is cut
  into per-replica slices (one compiled slice program per shape) only at or above the threshold;
  either way the checkpoint restores exactly. Shapes of this test only (no other test compiled
  their slices in this process)."""
  import logging
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = mesh_lib.make_mesh(2, 4)
  tree = {f"w{i}": jax.device_put(np.arange(8 * (37 + i), dtype=np.float32).reshape(8, 37 + i) / 7,
                                  NamedSharding(mesh, P("fsdp"))) for i in range(2)}
  slices = {}
  try:
    for min_bytes in (0, 2 ** 20):
      ck.set_replica_parallel_min_bytes(min_bytes)
      ckpt = ck.Checkpointer(str(tmp_path / f"ck{min_bytes}"), async_save=False)
      caplog.clear()
      with jax.log_compiles(), caplog.at_level(logging.WARNING):
        ckpt.save(1, tree)
      slices[min_bytes] = sum("jit(slice)" in r.getMessage() or "Compiling slice" in r.getMessage()
                              for r in caplog.records)
      restored, _ = ckpt.restore(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree))
      for k in tree:
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(tree[k]))
      ckpt.close()
  finally:
    ck.set_replica_parallel_min_bytes(common.get_config().checkpoint.replica_parallel_min_bytes)
  assert slices[0] >= 2 and slices[2 ** 20] == 0, slices


def _cmd(workdir, cache, *extra):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/contrastive.py"),
          "--workdir", str(workdir), "--config.data.name=random", "--config.data.image_size=32",
          "--config.data.batch_size=8", "--config.data.context_length=8", "--config.model.preset=tiny",
          "--config.model.vision_layers=1", "--config.model.text_layers=1", "--config.optim.warmup_steps=3",
          "--config.train.log_every=1", "--config.train.progress=False",
          f"--config.train.compilation_cache_dir={cache}", "--config.checkpoint.export_model=False", *extra]


def _final_params(workdir, step):
  params, meta, s = ck.restore_params_only(os.path.join(workdir, "checkpoints"), step)
  assert s == step
  return jax.tree.map(np.asarray, params), meta


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _wait_for(pred, proc, timeout=300):
  t0 = time.time()
  while not pred():
    if proc.poll() is not None:
      raise AssertionError(f"run ended (rc {proc.returncode}) before the condition: "
                           f"{proc.stderr.read().decode()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_and_resume_reaches_same_params(tmp_path):
  cache = tmp_path / "jax_cache"
  steps = 24
  ref, run = tmp_path / "ref", tmp_path / "run"
  common = [f"--config.train.steps={steps}", "--config.checkpoint.every_steps=4"]
  subprocess.run(_cmd(ref, cache, *common), check=True, capture_output=True, timeout=600,
                 env=fast_compile.env())
  # Killed run: slowed down so that it is killed half way, after at least one checkpoint.
  p = subprocess.Popen(_cmd(run, cache, *common, "--config.train.debug_step_sleep=0.2"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=fast_compile.env())
  _wait_for(lambda: any(s >= 8 for s in _steps(run)), p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL
  killed_at = _steps(run)
  assert killed_at and max(killed_at) < steps, killed_at
  out = subprocess.run(_cmd(run, cache, *common), check=True, capture_output=True, timeout=600,
                 env=fast_compile.env())
  assert f"resumed from {os.path.join(run, 'checkpoints')}/{max(killed_at)}" in out.stderr.decode()
  a, meta_a = _final_params(ref, steps)
  b, meta_b = _final_params(run, steps)
  assert meta_a["reason"] == meta_b["reason"] == "final"
  for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(y, x, err_msg=jax.tree_util.keystr(path))   # bit-identical
  # The metrics log of the resumed run continues where the checkpoint was (no step trained twice
  # before the checkpoint, none skipped after it).
  logged = [json.loads(l)["step"] for l in open(run / "metrics.jsonl")]
  assert logged[-1] == steps and set(range(max(killed_at) + 1, steps + 1)) <= set(logged)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint(tmp_path):
  run = tmp_path / "run"
  p = subprocess.Popen(_cmd(run, tmp_path / "jax_cache", "--config.train.steps=100000",
                            "--config.checkpoint.every_steps=100000", "--config.train.debug_step_sleep=0.05"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=fast_compile.env())
  metrics = run / "metrics.jsonl"
  _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, p)
  assert _steps(run) == []
  p.send_signal(signal.SIGTERM)
  rc = p.wait(timeout=300)
  err = p.stderr.read().decode()
  assert rc == 0, err[-3000:]
  saved = _steps(run)
  assert len(saved) == 1 and 3 <= saved[0] < 100000
  _, meta = _final_params(run, saved[0])
  assert meta["reason"] == "preemption" and meta["data_step"] == saved[0]
  assert "pre-emption: saved step" in err
