"""The training loop: data -> sharded jitted step -> metrics (tqdm + JSON lines) -> orbax checkpoints.

    source = trace_jax.data.sources.make(config)
    task = trace_jax.objectives.make(config, source.info)
    state = train(config, workdir, task, source)

The loop knows no objective and no data source by name: it is handed a Task (model config, init,
loss, heads) and a Source (this host's batches as a pure function of the step).

* resumes automatically from the latest checkpoint in ``workdir/checkpoints`` (state, PRNG key and
  data position = step), restoring onto the current mesh (the mesh may differ from the saving run's);
* saves every ``checkpoint.every_steps``, at the end, and on SIGTERM (pre-emption) or when a
  multi-host pre-emption sync point is reached; keeps the last ``checkpoint.keep``;
* logs every ``train.log_every`` steps to a progress bar (loss, examples/s) and to
  ``workdir/metrics.jsonl`` (on resume the rows past the resumed step are dropped first, so the file
  holds each step once, in order); at the end exports a model dir ``workdir/model``
  (``trace_jax.model_dir.save``: CLIP params, tokenizer and the objective's heads);
* takes an exclusive lock on ``workdir`` (``workdir/.lock``, released by the OS when the process
  dies, so a stale lock never blocks): a second trainer on the same workdir is refused, naming the
  holder; a resume whose model config differs from the stored one is refused before anything in the
  workdir is written; a checkpoint that does not restore is skipped (named, never deleted) for the
  newest one that does.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import time

import jax
import ml_collections
import numpy as np

from trace_jax import atomic
from trace_jax.training import checkpointing as ckpt_lib
from trace_jax.training import accumulate
from trace_jax.training import mesh as mesh_lib
from trace_jax.training import multihost
from trace_jax.training import sharding as shd
from trace_jax.training import state as state_lib
from trace_jax.training import step as step_lib



class _Preemption:
  """SIGTERM -> a flag checked between steps (the step in flight finishes, then a save)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    def handler(signum, frame):
      self.requested = True
    if multihost.sigterm_handled_by_jax():  # multi-process: jax's preemption service (training/multihost.py)
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler (pre-emption then only via orbax sync)
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class _closing:
  """``with _closing(it) as it``: ``it.close()`` on the way out when it has one (Grain iterators stop
  their worker processes; a plain generator has nothing to stop)."""

  def __init__(self, it):
    self.it = it

  def __enter__(self):
    return self.it

  def __exit__(self, *exc):
    if hasattr(self.it, "close"):
      self.it.close()


def _jsonable(m: dict) -> dict:
  return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in m.items()}


class WorkdirLocked(RuntimeError):
  pass


class _WorkdirLock:
  """Exclusive ``flock`` on ``workdir/.lock`` for the life of a run (the OS drops it when the
  process dies, so a killed run leaves nothing that blocks the next)."""

  def __init__(self, workdir: str):
    # one lock file per process of a multi-process run (all share the workdir); process 0's is the
    # single-process name, so two runs of any process counts still exclude each other
    i = jax.process_index()
    self.path = os.path.join(workdir, ".lock" if i == 0 else f".lock.{i}")
    self.f = None

  def __enter__(self):
    self.f = open(self.path, "a+")
    try:
      fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.f.seek(0)
      holder = self.f.read().strip() or "another process"
      self.f.close()
      raise WorkdirLocked(f"workdir {os.path.dirname(self.path)} is in use by {holder}; wait for it to "
                          "finish or stop it (two trainers on one workdir would corrupt its checkpoints)") from None
    self.f.seek(0)
    self.f.truncate()
    self.f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    self.f.flush()
    return self

  def __exit__(self, *exc):
    fcntl.flock(self.f, fcntl.LOCK_UN)
    self.f.close()


def validate(config, mesh) -> None:
  """Config errors that must stop a run before its workdir is touched."""
  if int(config.train.steps) <= 0:
    raise ValueError(f"train.steps must be positive; got {config.train.steps}")
  if int(config.data.batch_size) <= 0:
    raise ValueError(f"data.batch_size must be positive; got {config.data.batch_size}")
  shd.check_batch_size(config.data.batch_size, mesh)
  accumulate.check_microbatches(config.data.batch_size, config.train.get("microbatches", 1), mesh)


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _config_diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: stored {a!r}, now {b!r}")
  return out


def _check_resume_config(workdir: str, model_cfg: dict) -> None:
  """A resume must build the same model as the run that wrote the checkpoints."""
  path = os.path.join(workdir, "model_config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    stored = json.load(f)
  diff = _config_diff(stored, json.loads(json.dumps(model_cfg)))
  if diff:
    raise ValueError(f"cannot resume {workdir}: the model config differs from the one its checkpoints were "
                     f"written with ({'; '.join(diff)}); use a new --workdir or restore the old settings")


def _restore_newest(ckpt, target):
  """(state, meta, step) of the newest checkpoint that restores; skipped steps are reported."""
  for step in sorted(ckpt.all_steps(), reverse=True):
    try:
      state, meta = ckpt.restore(target, step)
      return state, meta, step
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to an older one
      msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      print(f"checkpoint {ckpt.directory}/{step} does not restore ({type(e).__name__}: {msg}); "
            "skipped (left in place); trying the previous one", file=sys.stderr)
  return None, None, None


def _truncate_metrics(path: str, step: int) -> None:
  """Drop the rows logged after ``step`` (a resumed run logs them again)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = f.readlines()
  keep = []
  for r in rows:
    try:
      if json.loads(r)["step"] <= step:
        keep.append(r)
    except (ValueError, KeyError):  # a row cut by a kill mid-write
      continue
  if len(keep) != len(rows):
    atomic.write_text(path, "".join(keep))


def train(config: ml_collections.ConfigDict, workdir: str, task, source, *, mesh=None):
  """Train (or resume) the experiment ``config`` in ``workdir`` with ``task`` (trace_jax.objectives)
  on ``source`` (trace_jax.data.sources); returns the final ``TrainState``."""
  if config.train.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", config.train.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  mesh = mesh or mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  validate(config, mesh)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    _check_resume_config(workdir, task.cfg.to_dict())      # read-only: a refused resume touches nothing
  os.makedirs(workdir, exist_ok=True)
  with _WorkdirLock(workdir):
    return _train_locked(config, workdir, task, source, mesh)


def _train_locked(config, workdir, task, source, mesh):
  total = int(config.train.steps)
  tx, schedule = state_lib.make_optimizer(config.optim, total, task.trainable)
  ckpt_lib.set_replica_parallel_min_bytes(config.checkpoint.replica_parallel_min_bytes)
  is_main = jax.process_index() == 0
  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=config.checkpoint.keep,
                               save_every=config.checkpoint.every_steps,
                               async_save=config.checkpoint.async_save)
  shardings = state_lib.state_shardings(task.init_params, tx, mesh, config.seed)
  state, resumed_meta = None, {}
  if ckpt.all_steps():
    target = state_lib.abstract_with_shardings(task.init_params, tx, shardings, config.seed)
    state, meta, start = _restore_newest(ckpt, target)
    if state is not None:
      if int(meta.get("data_step", start)) != start or int(jax.device_get(state.step)) != start:
        raise RuntimeError(f"checkpoint {start} is inconsistent: meta {meta}, state.step {state.step}")
      print(f"resumed from {ckpt.directory}/{start}", file=sys.stderr)
      resumed_meta = meta
  if state is None:
    state, _ = state_lib.create_state(task.init_params, tx, mesh, config.seed)
    if task.pretrained:    # config.init_from: the model dir's params over the fresh init (new heads stay)
      state = state.replace(params=state_lib.place_pretrained(state.params, task.pretrained))
    start = 0
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
      f.write(task.cfg.to_json())
    _truncate_metrics(metrics_path, start)

  train_step = step_lib.jit_train_step(step_lib.make_train_step(
      task.loss_fn, tx, schedule, task.trainable, microbatches=config.train.get("microbatches", 1), mesh=mesh),
      shardings, mesh)
  meta_base = {"config": json.loads(config.to_json_best_effort()), "model_config": task.cfg.to_dict(),
               "heads": task.heads}
  it = None

  def save(step, reason):
    data_state = it.get_state() if hasattr(it, "get_state") else None   # Grain sources (data/grain_pipeline.py)
    ckpt.save(step, state, {**meta_base, "data_step": step, "reason": reason,
                            **({"data_state": data_state} if data_state is not None else {})})

  bar = None
  if config.train.progress and is_main:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, desc=f"train {config.loss.name}", unit="step", dynamic_ncols=True)
  step = start
  status = "finished"
  t_last, n_last = time.perf_counter(), start
  needs = {"patch_size": task.cfg.vision.patch_size, "image_size": task.cfg.vision.image_size}
  with jax.set_mesh(mesh), _Preemption() as pre, _closing(
      source.batches(start, **{k: needs[k] for k in source.needs})) as it:
    if start and resumed_meta.get("data_state") is not None and hasattr(it, "set_state"):
      # the saved iterator state: a source whose records changed since the save is refused, naming
      # what differs, instead of silently reading other examples (BatchIterator.set_state)
      it.set_state({**resumed_meta["data_state"], "step": start})
    while step < total:
      local = next(it)
      gb = shd.global_batch({k: local[k] for k in source.keys}, mesh)
      state, metrics = train_step(state, gb)
      step += 1
      if config.train.debug_step_sleep:
        time.sleep(config.train.debug_step_sleep)
      if bar is not None:
        bar.update(1)
      if step % config.train.log_every == 0 or step == total:
        m = _jsonable(jax.device_get(metrics))    # the only host sync of a logging interval
        now = time.perf_counter()
        m["examples_per_s"] = (step - n_last) * config.data.batch_size / max(now - t_last, 1e-9)
        t_last, n_last = now, step
        if is_main:
          with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **m}) + "\n")
        if bar is not None:
          bar.set_postfix(loss=f"{m['loss']:.4f}", ex_s=f"{m['examples_per_s']:.1f}")
      if step < total and (pre.requested or ckpt.reached_preemption(step)):
        save(step, "preemption")
        status = "preempted"
        print(f"pre-emption: saved step {step} to {ckpt.directory}", file=sys.stderr)
        break
      if ckpt.should_save(step) and step < total:
        save(step, "periodic")
    if status == "finished":
      save(step, "final")
  ckpt.close()
  if bar is not None:
    bar.close()
  if status == "finished" and config.checkpoint.export_model:
    # every process joins the gather of the sharded params; process 0 writes (training/multihost.py)
    export_model(os.path.join(workdir, "model"), state, task, source.info, config)
  return state


def state_model_dir(state, task, data_info: dict | None, path: str):
  """The trained model as a loaded model dir (``model_dir.ModelDir``, as ``model_dir.load`` returns
  it) straight from the train state, without a round trip through disk: the exported tree
  (``scale.inference_layout``: unrolled blocks, training-only tools at their defaults; float32
  compute as ``model_dir.load``) whose params stay where the state keeps them (sharded over the
  mesh, every process holding its shards). ``path``: the dir it names (the export's ``workdir/model``)."""
  from trace_jax import model_dir
  from trace_jax.models import build, scale
  cfg, params = scale.inference_layout(task.cfg, state.params)
  cfg = cfg.replace(dtype="float32")
  heads = {k: model_dir.Head(task.heads[k], v) for k, v in params.items() if k != "clip"}
  return model_dir.ModelDir(os.path.abspath(path), cfg, build(cfg), params["clip"],
                            (data_info or {}).get("tokenizer"), heads)


def export_model(directory: str, state, task, data_info: dict | None, config) -> str:
  """The trained params -> a model dir: CLIP params, the data's tokenizer and the objective's heads."""
  import tempfile
  from trace_jax import model_dir
  params = multihost.host_params(state.params)   # a collective when multi-process: all call it
  if jax.process_index() != 0:
    return directory
  from trace_jax.models import scale
  cfg, params = scale.inference_layout(task.cfg, params)   # unrolled blocks, default model.* tools
  tok = (data_info or {}).get("tokenizer")
  with tempfile.TemporaryDirectory() as tmp:
    files = {}
    if tok is not None and hasattr(tok, "save"):   # word-level (words.json) or CLIP BPE (vocab + merges)
      tok.save(tmp)
      files = {n: os.path.join(tmp, n) for n in sorted(os.listdir(tmp))}
    model_dir.save(directory, params, cfg, source=f"train.py {config.loss.name}", tokenizer_files=files,
                   heads=task.heads)
  return directory
