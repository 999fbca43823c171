"""Nothing lost, every mistake named (issue 21, training side), and the model dir's heads (issue 16).

Tiny models on the 'random' source, trained in-process with a persistent compilation cache (each
case recompiles a fresh closure; the cache keeps that to seconds).
"""
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from trace_jax import model_dir, objectives
from trace_jax.data import sources
from trace_jax.training import checkpointing as ck
from trace_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tmp_path, loss="contrastive", steps=4, every=2):
  c = common.get_config()
  c.data.name, c.data.image_size, c.data.batch_size = "random", 32, 8
  c.data.context_length = 8
  c.model.preset, c.model.vision_layers, c.model.text_layers = "tiny", 1, 1
  c.loss.name = loss
  c.loss.local.layers = 1
  c.optim.warmup_steps = 1
  c.train.steps, c.train.log_every, c.train.progress = steps, 1, False
  c.train.compilation_cache_dir = str(tmp_path.parent / "jax_cache_safety")
  c.checkpoint.every_steps, c.checkpoint.async_save = every, False
  return c


def _train(config, workdir):
  """train.py's run(), on one device (these cases are about files, not sharding)."""
  source = sources.make(config)
  task = objectives.make(config, source.info)
  return loop.train(config, str(workdir), task, source, mesh=loop.mesh_lib.single_device_mesh())


def _tree_hash(d):
  h = {}
  for root, _, files in os.walk(d):
    for f in files:
      p = os.path.join(root, f)
      h[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return h


def _params(workdir, step):
  p, _, s = ck.restore_params_only(os.path.join(workdir, "checkpoints"), step)
  assert s == step
  return jax.tree.map(np.asarray, p)


def _assert_same(a, b):
  for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(y, x, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("key,value,msg", [("train.steps", 0, "train.steps must be positive"),
                                           ("train.steps", -3, "train.steps must be positive"),
                                           ("data.batch_size", 0, "data.batch_size must be positive")])
def test_bad_config_refused_before_the_workdir_exists(tmp_path, key, value, msg):
  c = _config(tmp_path)
  sec, k = key.split(".")
  c[sec][k] = value
  wd = tmp_path / "run"
  with pytest.raises(ValueError, match=msg):
    _train(c, wd)
  assert not wd.exists()


def test_second_trainer_refused_and_stale_lock_ignored(tmp_path):
  wd = tmp_path / "run"
  wd.mkdir()
  # A live holder: another process keeps the lock while we try.
  holder = subprocess.Popen([sys.executable, "-c", (
      "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
      "f.write('pid 4242 on testhost'); f.flush(); print('locked', flush=True); time.sleep(120)"),
      str(wd / ".lock")], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(loop.WorkdirLocked, match="in use by pid 4242 on testhost"):
      _train(_config(tmp_path, steps=2), wd)
    assert not (wd / "checkpoints").exists()
  finally:
    holder.kill()
    holder.wait()
  # The holder died: its lock file stays but no longer blocks.
  assert (wd / ".lock").exists()
  _train(_config(tmp_path, steps=2), wd)
  assert (wd / "checkpoints" / "2").exists()


def test_changed_model_config_resume_touches_nothing(tmp_path):
  wd = tmp_path / "run"
  _train(_config(tmp_path, steps=2), wd)
  before = _tree_hash(wd)
  c = _config(tmp_path, steps=4)
  c.model.vision_width = 96
  with pytest.raises(ValueError, match=r"vision\.width: stored 64, now 96"):
    _train(c, wd)
  assert _tree_hash(wd) == before


def test_corrupt_newest_checkpoint_falls_back_and_is_kept(tmp_path, capsys):
  ref, run = tmp_path / "ref", tmp_path / "run"
  _train(_config(tmp_path, steps=6), ref)
  _train(_config(tmp_path, steps=4), run)
  # Truncate every data file of the newest step (as a disk-full or a kill inside a copy would).
  state4 = run / "checkpoints" / "4" / "state"
  n = 0
  for root, _, files in os.walk(state4):
    for f in files:
      if f != "_METADATA" and os.path.getsize(os.path.join(root, f)) > 0 and "ocdbt" not in root.split(os.sep)[-1]:
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(os.path.getsize(os.path.join(root, f)) // 2)
        n += 1
  assert n > 0
  capsys.readouterr()
  _train(_config(tmp_path, steps=6), run)
  err = capsys.readouterr().err
  assert f"checkpoint {run / 'checkpoints'}/4 does not restore" in err and "skipped (left in place)" in err
  assert f"resumed from {run / 'checkpoints'}/2" in err
  assert (run / "checkpoints" / "4").exists()                 # never deleted
  _assert_same(_params(ref, 6), _params(run, 6))               # continued from 2: the same run


def test_metrics_monotonic_after_two_resumes(tmp_path):
  wd = tmp_path / "run"
  for steps in (4, 6, 8):
    _train(_config(tmp_path, steps=steps), wd)
    # A kill after logging the last rows but before their checkpoint: the newest step is lost.
    if steps < 8:
      last = max(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())
      import shutil
      shutil.rmtree(wd / "checkpoints" / str(last))
  logged = [json.loads(l)["step"] for l in open(wd / "metrics.jsonl")]
  assert logged == list(range(1, 9)), logged


def test_local_alignment_model_dir_keeps_its_head(tmp_path):
  """The exported model dir holds the text-compression head with its config: the slot readout of the
  loaded dir equals the one computed from the training state (no training config needed)."""
  import jax.numpy as jnp
  from trace_jax.evaluation.embedded import map_fn
  from trace_jax.losses import local_alignment as la
  c = _config(tmp_path, loss="local_alignment", steps=2)
  wd = tmp_path / "run"
  state = _train(c, wd)
  md = model_dir.load(str(wd / "model"))
  assert set(md.heads) == {"text_compression"}
  assert md.heads["text_compression"].meta["num_registers"] == md.config.vision.grid ** 2
  task = objectives.make(c, sources.make(c).info)
  b = sources.random_batch(c, 0, slice(None))
  want = la.slot_similarity_grid(task.model, task.compressor, jax.device_get(state.params),
                                 jnp.asarray(b["image"]), jnp.asarray(b["caption_ids"]))
  got, _ = map_fn("local_slots", md.model, md.tree(), c, md.heads)(jnp.asarray(b["image"]),
                                                                     jnp.asarray(b["caption_ids"]))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_model_dir_save_refuses_a_head_without_metadata(tmp_path):
  c = _config(tmp_path, loss="local_alignment")
  task = objectives.make(c, sources.make(c).info)
  import flax.linen as nn
  params = jax.tree.map(np.asarray, nn.unbox(task.init_params(jax.random.PRNGKey(0))))
  with pytest.raises(ValueError, match=r"params have \['text_compression'\], metadata has \[\]"):
    model_dir.save(str(tmp_path / "m"), params, task.cfg)


@pytest.mark.parametrize("script,args,msg", [
    ("train.py", ["--config.train.stepz=1"], "train.py: error: unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    ("train.py", ["--config.trian.steps=1"], "train.py: error: unknown config key 'trian.steps' (did you mean 'train.steps'?)"),
    ("train.py", ["--config.data.name=random", "--config.data.batch_size=6"], "train.py: error: "),
    ("evaluate.py", ["--config.eval.methodz=x", "--checkpoint=nowhere"],
     "evaluate.py: error: unknown config key 'eval.methodz' (did you mean 'eval.methods'?)"),
])
def test_entry_points_bad_input_is_one_line(tmp_path, script, args, msg):
  """Bad overrides and a batch the devices cannot split: one line on stderr, exit 2, no traceback."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, os.path.join(ROOT, script), "--config", os.path.join(ROOT, "configs/demo.py"),
                      *([] if script == "evaluate.py" else ["--workdir", str(tmp_path / "run")]), *args],
                     capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
  lines = [l for l in p.stderr.splitlines() if l.strip() and "WARNING" not in l and not l.startswith("W")]
  assert p.returncode == 2, p.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith(msg), p.stderr[-2000:]
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "run").exists()
