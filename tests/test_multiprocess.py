"""Multi-process training on localhost (docs/scaling.md): 2 processes x 4 emulated CPU devices joined by
``jax.distributed`` (coordinator 127.0.0.1, gloo CPU collectives) against 1 process x 8 devices.

Each process runs tests/_multiprocess_worker.py: the real loop (train.py ``run``), each process
feeding only its rows of every global batch (``make_array_from_process_local_data``). The test starts
and reaps the processes with a deadline: a hang is a failure (every process is killed), not a stuck CI.

* parity: the parameters after 2 AdamW steps of every objective (contrastive, amc, local_alignment,
  trace) on meshes data=2 x fsdp=2 x tensor=2 (its 'data' axis spans the two processes) and
  fsdp=4 x tensor=2 (its 'fsdp' axis does: params all-gathered, gradients reduce-scattered over gloo;
  both asserted from the mesh's devices) equal the 1-process run's to ``TOL`` (rtol 1e-5, atol 2e-6)
  AND to ``SENS_FACTOR`` (2) x the run's own sensitivity to the reduction order (the same 1-process
  run on the two meshes): the cross-process (gloo) reductions sum in another order than the in-process
  ones, not bit-identically. Measured (printed by the test, 2026-12-07): max |2-process - 1-process|
  5.8e-8 .. 1.2e-7 over the 8 (objective, mesh) pairs; sensitivity (mesh 2x2x2 vs 1x4x2) 1.2e-7 for
  every objective (one float32 ulp at 1);
* pre-emption: SIGTERM to ONE of two processes -> both save the same step and exit 0 (jax's
  preemption sync point); the run resumes on 1 process and ends with the parameters of an
  uninterrupted run; and the other way round (SIGTERM to a 1-process run, resumed on 2 processes),
  whose model dir, written once by process 0 from the sharded state, holds those parameters;
* evaluation on the full mesh (``eval.after_train``): a 2-process AMC run on the embedded shapes set
  evaluates on its 2 x 2 x 2 training mesh (each process its rows, maps gathered, process 0 writes);
  its eval.json equals the one-process, one-device ``evaluate`` of the model dir it exported (the same
  params: metrics equal to 1e-6, i.e. no phrase's hit or pixel count differs), over a batch size (5)
  that is not a multiple of the 4 batch devices and leaves a partial last batch.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_multiprocess_worker.py")
OBJECTIVES = ("contrastive", "amc", "local_alignment", "trace")
MESHES = ((2, 2, 2), (1, 4, 2))
# the mesh axis whose devices sit on different processes (jax.make_mesh over process 0's devices, then
# process 1's): 'data' on 2x2x2 (gradients all-reduced over gloo), 'fsdp' on 1x4x2 (params all-gathered
# and gradients reduce-scattered over gloo); 'tensor' = 2 stays inside a process on both
MESH_CROSSES = {(2, 2, 2): 0, (1, 4, 2): 1}
SENS_FACTOR = 2
# float32 tolerance of parameters after a few AdamW steps (eps 1e-4, as tests/test_sharded_step.py):
# gloo's cross-process all-reduce sums in another order than the in-process one; measured here
# max |Δ| ≈ 2e-7 after 12 steps (13 of 32000 elements of one table differ at all).
TOL = dict(rtol=1e-5, atol=2e-6)
DIST_ENV = ("TRACE_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
            "TRACE_JAX_DISTRIBUTED_TIMEOUT")
DEADLINE = 1200  # seconds for one launch (8 compiles of a train step on 2 busy cores); a hang fails


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Launch:
  """``n`` worker processes of one run (own process groups, logs in files)."""

  def __init__(self, tmp, name, n, runs):
    port = _free_port()
    devices = 8 // n
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",) + DIST_ENV}
    self.procs, self.logs = [], []
    for i in range(n):
      # the documented launch (docs/scaling.md): the same command on every host, its ids in the environment
      env = dict(base, **({"TRACE_JAX_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                           "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(i),
                           "TRACE_JAX_DISTRIBUTED_TIMEOUT": "120"} if n > 1 else {}))
      spec = json.dumps({"process_id": i, "num_processes": n, "devices": devices, "runs": runs})
      log = os.path.join(str(tmp), f"{name}.{i}.log")
      self.logs.append(log)
      with open(log, "w") as f:
        self.procs.append(subprocess.Popen([sys.executable, WORKER, spec], stdout=f, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True))

  def text(self, i):
    with open(self.logs[i]) as f:
      return "".join(l for l in f if "[Gloo]" not in l)

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    for p in self.procs:
      p.wait()

  def wait(self, deadline=DEADLINE):
    end = time.monotonic() + deadline
    try:
      for p in self.procs:
        p.wait(timeout=max(1.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"multi-process run hung (> {deadline} s); killed. Logs:\n" +
                  "\n".join(self.text(i)[-3000:] for i in range(len(self.procs))))
    for i, p in enumerate(self.procs):
      assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{self.text(i)[-4000:]}"
    return self


def _load(path, processes=False):
  """The worker's .npz: ``__step__``, the parameters by tree path, and (``processes``) ``__processes__``."""
  with np.load(path) as z:
    return {k: z[k] for k in z.files if processes or k != "__processes__"}


@pytest.fixture(scope="module")
def trace_data(tmp_path_factory):
  """The tiny embedded shapes build of tests/test_trace_training.py (for the TRACE objective)."""
  from trace_jax.data.shapes import builder as shapes_builder
  d = str(tmp_path_factory.mktemp("tfds_mp"))
  shapes_builder.prepare(data_dir=d, image_size=32,
                         split_sizes={"train": 24, "validation": 4, "test": 6, "heldout": 4, "openvocab": 6})
  return d


def _runs(tmp, tag, data_dir):
  return [{"workdir": os.path.join(str(tmp), f"{tag}-{loss}-{'x'.join(map(str, mesh))}"), "loss": loss,
           "mesh": list(mesh), "steps": 2, "data_dir": data_dir,
           "out": os.path.join(str(tmp), f"{tag}-{loss}-{'x'.join(map(str, mesh))}.npz")}
          for mesh in MESHES for loss in OBJECTIVES]


def test_two_processes_equal_one_process_every_objective(tmp_path, trace_data):
  two = Launch(tmp_path, "two", 2, _runs(tmp_path, "p2", trace_data))
  try:
    one = Launch(tmp_path, "one", 1, _runs(tmp_path, "p1", trace_data)).wait()
  finally:
    two.wait()
  # the run's own sensitivity to the reduction order: the same objective on the two meshes (1 process)
  runs = _runs(tmp_path, "p1", trace_data)
  sens = {}
  for r, q in zip(runs[:len(OBJECTIVES)], runs[len(OBJECTIVES):]):
    a, b = _load(r["out"]), _load(q["out"])
    sens[r["loss"]] = max(float(np.max(np.abs(a[k] - b[k]))) for k in a if not k.startswith("__"))
  print(f"max |mesh {MESHES[0]} - mesh {MESHES[1]}| (1 process) per objective:", sens)
  worst = {}
  for r1, r2 in zip(_runs(tmp_path, "p1", trace_data), _runs(tmp_path, "p2", trace_data)):
    a, b = _load(r1["out"], True), _load(r2["out"], True)
    assert int(a.pop("__step__")) == int(b.pop("__step__")) == 2
    # the mesh really spans both processes, along the axis MESH_CROSSES names (its collectives run over gloo)
    procs = b.pop("__processes__")
    assert not np.any(a.pop("__processes__"))
    crossing = [ax for ax in range(3) if np.any(np.diff(procs, axis=ax))]
    assert crossing == [MESH_CROSSES[tuple(r1["mesh"])]], (r1["mesh"], procs)
    assert a.keys() == b.keys()
    key = (r1["loss"], tuple(r1["mesh"]))
    worst[key] = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    for k in a:
      np.testing.assert_allclose(b[k], a[k], **TOL, err_msg=f"{key} {k}")
    # bounded by the run's own sensitivity to the reduction order (a 2-process run is another order)
    assert worst[key] <= SENS_FACTOR * sens[r1["loss"]], (key, worst[key], sens[r1["loss"]])
    # the 2-process run exported its model dir once (process 0) from the sharded state
    assert os.path.exists(os.path.join(r2["workdir"], "model", "config.json"))
  print("max |2-process - 1-process| per (objective, mesh):", worst)


def _wait_rows(workdir, n, launch, timeout=600):
  path = os.path.join(workdir, "metrics.jsonl")
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for _ in f) >= n:
          return
    if any(p.poll() is not None for p in launch.procs):
      break
    time.sleep(0.2)
  launch.kill()
  pytest.fail("the run did not reach the pre-emption point:\n" + launch.text(0)[-3000:])


def _saved_step(text):
  m = re.findall(r"pre-emption: saved step (\d+)", text)
  assert len(m) == 1, text[-3000:]
  return int(m[0])


STEPS = 12


def _pre_run(tmp, tag, sleep=0.0):
  return {"workdir": os.path.join(str(tmp), tag), "loss": "contrastive", "mesh": [2, 4, 1], "steps": STEPS,
          "sleep": sleep, "cache": os.path.join(str(tmp), "jax_cache"),
          # orbax's default: every replicated shard written split across its replicas, the path a pod's
          # large arrays take (a tiny model's are under the 1 MiB default threshold)
          "sets": {"checkpoint.replica_parallel_min_bytes": 0}, "out": os.path.join(str(tmp), tag + ".npz")}


def test_sigterm_on_one_process_all_save_same_step_then_resume_on_other_count(tmp_path):
  ref = Launch(tmp_path, "ref", 1, [_pre_run(tmp_path, "ref")])
  try:
    # 2 processes, SIGTERM to process 1 only
    a = _pre_run(tmp_path, "a", sleep=0.5)
    two = Launch(tmp_path, "a2", 2, [a])
    _wait_rows(a["workdir"], 2, two)
    os.kill(two.procs[1].pid, signal.SIGTERM)
    two.wait()
    k0, k1 = _saved_step(two.text(0)), _saved_step(two.text(1))
    assert k0 == k1 and 2 <= k0 < STEPS, (k0, k1)
    assert sorted(int(s) for s in os.listdir(os.path.join(a["workdir"], "checkpoints"))) == [k0]
    assert not os.path.exists(os.path.join(a["workdir"], "model"))   # a pre-empted run exports nothing
    # resume on ONE process (8 devices): the rest of the steps, from the step both processes saved
    one_a = Launch(tmp_path, "a1", 1, [dict(a, sleep=0.0)]).wait()
    assert f"resumed from {os.path.join(a['workdir'], 'checkpoints')}/{k0}" in one_a.text(0)
  except BaseException:
    ref.kill()   # a failure above must not leave the reference run behind
    raise
  ref.wait()
  want = _load(_pre_run(tmp_path, "ref")["out"])
  got = _load(a["out"])
  assert int(got.pop("__step__")) == int(want.pop("__step__")) == STEPS
  for k in want:
    np.testing.assert_allclose(got[k], want[k], **TOL, err_msg=k)

  # 1 process, SIGTERM -> resume on TWO processes
  b = _pre_run(tmp_path, "b", sleep=0.5)
  one = Launch(tmp_path, "b1", 1, [b])
  _wait_rows(b["workdir"], 2, one)
  os.kill(one.procs[0].pid, signal.SIGTERM)
  one.wait()
  kb = _saved_step(one.text(0))
  assert 2 <= kb < STEPS
  two_b = Launch(tmp_path, "b2", 2, [dict(b, sleep=0.0)]).wait()
  assert f"resumed from {os.path.join(b['workdir'], 'checkpoints')}/{kb}" in two_b.text(0)
  got = _load(b["out"])
  assert int(got.pop("__step__")) == STEPS
  for k in want:
    np.testing.assert_allclose(got[k], want[k], **TOL, err_msg=k)
  # the model dir written once by process 0 of the 2-process run holds the final CLIP params
  from trace_jax import model_dir
  loaded = model_dir.load(os.path.join(b["workdir"], "model"))
  import jax
  for path, v in jax.tree.leaves_with_path(loaded.params):
    np.testing.assert_array_equal(np.asarray(v), got["['clip']" + jax.tree_util.keystr(path)])


EVAL_SETS = {"data.name": "trace_shapes", "data.image_size": 32,
             "data.split_sizes": "train=24,validation=4,test=6,heldout=4,openvocab=6",   # trace_data's build
             "eval.after_train": True, "eval.methods": "gradcam,patch_similarity", "eval.batch_size": 5,
             "eval.gallery": 2}


def test_eval_after_train_on_the_two_process_mesh(tmp_path, trace_data):
  from configs import common
  from trace_jax import model_dir
  from trace_jax.evaluation import embedded
  run = {"workdir": str(tmp_path / "ev"), "loss": "amc", "mesh": [2, 2, 2], "steps": 2,
         "out": str(tmp_path / "ev.npz"), "sets": {**EVAL_SETS, "data.data_dir": trace_data}}
  two = Launch(tmp_path, "ev2", 2, [run]).wait()
  got = json.load(open(tmp_path / "ev" / "eval" / "eval.json"))
  assert (tmp_path / "ev" / "eval" / "gallery_gradcam.png").exists()
  assert not [f for f in os.listdir(tmp_path / "ev" / "eval") if ".tmp" in f]   # renamed into place
  config = common.apply_overrides(common.get_config(), {k: str(v) for k, v in run["sets"].items()})
  want = embedded.evaluate(config, model_dir.load(str(tmp_path / "ev" / "model")), str(tmp_path / "ref"),
                           verbose=False)
  assert got["num_phrases"] == want["num_phrases"] and want["num_phrases"] > 5 and want["num_phrases"] % 5, \
      (want["num_phrases"], two.text(0)[-2000:])
  assert set(got["methods"]) == {"gradcam", "patch_similarity"}
  for m, r in want["methods"].items():
    for k, v in r.items():
      np.testing.assert_allclose(got["methods"][m][k], v, atol=1e-6, err_msg=f"{m} {k}")
