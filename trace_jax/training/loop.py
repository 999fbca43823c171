"""The training loop: data -> sharded jitted step -> metrics (tqdm + JSON lines) -> orbax checkpoints.

    state = train(config, workdir)

* resumes automatically from the latest checkpoint in ``workdir/checkpoints`` (state, PRNG key and
  data position = step), restoring onto the current mesh (the mesh may differ from the saving run's);
* saves every ``checkpoint.every_steps``, at the end, and on SIGTERM (pre-emption) or when a
  multi-host pre-emption sync point is reached; keeps the last ``checkpoint.keep``;
* logs every ``train.log_every`` steps to a progress bar (loss, examples/s) and to
  ``workdir/metrics.jsonl``; at the end exports the CLIP params as a model dir ``workdir/model``
  (``trace_jax.model_dir.save_model``, loadable by the CLI and evaluate.py).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Callable, Iterator

import jax
import ml_collections
import numpy as np

from trace_jax.training import checkpointing as ckpt_lib
from trace_jax.training import mesh as mesh_lib
from trace_jax.training import sharding as shd
from trace_jax.training import state as state_lib
from trace_jax.training import step as step_lib


def default_config() -> ml_collections.ConfigDict:
  """Every key an experiment config may set (configs/*.py start from this; unknown keys are errors)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "trace_shapes"        # or "random" (arrays of the right shapes; tests)
  c.data.data_dir = ml_collections.config_dict.placeholder(str)   # tfds data dir (None: tfds default)
  c.data.image_size = 64
  c.data.batch_size = 64              # global batch (all devices, all hosts)
  c.data.phrase_source = "refexp"     # 'refexp' (unique referring expressions) or 'phrase'
  c.data.mask = "box"                 # AMC region: 'box' (as the paper's VG boxes) or 'pixels'
  c.data.split = "train"
  c.data.dataset_seed = 0             # seed of the synthetic dataset build
  c.data.split_sizes = ""             # e.g. "train=2000,test=200" (others: builder defaults); "" = defaults
  c.data.prefetch = 2
  c.data.vocab_size = 1000            # 'random' data only
  c.data.context_length = 16          # 'random' data only

  c.model = ml_collections.ConfigDict()
  c.model.preset = "small"
  c.model.image_size = c.data.get_ref("image_size")
  c.model.dtype = "float32"           # compute dtype ('bfloat16' = mixed precision; params stay float32)
  for k, t in (("patch_size", int), ("vision_width", int), ("vision_layers", int), ("vision_heads", int),
               ("text_width", int), ("text_layers", int), ("text_heads", int), ("embed_dim", int),
               ("vocab_size", int), ("context_length", int), ("eos_token_id", int), ("pool", str),
               ("crate_dim_head", int)):
    setattr(c.model, k, ml_collections.config_dict.placeholder(t))  # None: preset / data value

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "contrastive"         # 'contrastive' | 'amc' | 'local_alignment' | 'trace'
  c.loss.global_texts = "caption"     # texts of the global CLIP loss: 'caption' | 'phrase' | 'caption+phrase'
  c.loss.amc = ml_collections.ConfigDict(dict(
      layer=-1, lambda1=0.2, lambda2=0.8, delta1=0.1, delta2=0.5, mean_pooling="batch", relu_grad=True))
  c.loss.local = ml_collections.ConfigDict(dict(
      width=ml_collections.config_dict.placeholder(int), layers=2, heads=4, mlp_ratio=4.0,
      lambda_global=1.0, lambda_local=1.0))
  from trace_jax.trace.task import default_trace_config  # lazy: trace.task imports this module's siblings
  c.loss.trace = default_trace_config()

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=5e-4, schedule="warmup_cosine", warmup_steps=100, min_lr_ratio=0.0,
      b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, grad_clip=1.0))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, log_every=10, progress=True, compilation_cache_dir=ml_collections.config_dict.placeholder(str),
      debug_step_sleep=0.0))          # debug_step_sleep: seconds slept per step (tests of pre-emption only)

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, keep=3, async_save=True, export_model=True))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.distributed = False               # jax.distributed.initialize() (multi-host); env TRACE_JAX_DISTRIBUTED=1 too

  c.eval = ml_collections.ConfigDict(dict(
      split="test", methods="gradcam", layer=-1, threshold=0.5, batch_size=50,
      num_examples=ml_collections.config_dict.placeholder(int), gallery=8, text="phrase"))
  return c


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
  """Sets ``{'a.b': 'value'}`` string overrides in place (the ``--set a.b=value`` of the comparison
  scripts), parsed as the type of the current value; an unknown key is an error that names it."""
  for k, v in overrides.items():
    node = config
    *path, last = k.split(".")
    for p in path:
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise KeyError(f"--set {k}: unknown config key {p!r}")
      node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or last not in node:
      raise KeyError(f"--set {k}: unknown config key {last!r}")
    old = node[last]
    if isinstance(old, bool):
      if v not in ("True", "False", "true", "false", "1", "0"):
        raise ValueError(f"--set {k}: expected a boolean, got {v!r}")
      node[last] = v in ("True", "true", "1")
    else:
      node[last] = type(old)(v) if old is not None else v
  return config


# ----------------------------------------------------------------------------------------------------
# Data: a factory of iterators of this host's canonical batches (keys of step.BATCH_KEYS)


def _random_batch(config, step: int, rows: slice) -> dict:
  """Deterministic random batch of global step ``step`` (this host's ``rows``)."""
  d = config.data
  b, s, L, v = d.batch_size, d.image_size, d.context_length, d.vocab_size
  r = np.random.default_rng([config.seed, step])
  ids = np.zeros((2, b, L), np.int32)
  lens = r.integers(2, L + 1, (2, b))
  for t in range(2):
    for i in range(b):
      ids[t, i, :lens[t, i] - 1] = r.integers(1, v - 1, lens[t, i] - 1)
      ids[t, i, lens[t, i] - 1] = v - 1          # end-of-text = largest id (argmax pooling)
  y0, x0 = r.integers(0, s // 2, (2, b))
  h, w = r.integers(s // 4, s // 2 + 1, (2, b))
  yy, xx = np.arange(s)[None, :, None], np.arange(s)[None, None, :]
  mask = ((yy >= y0[:, None, None]) & (yy < (y0 + h)[:, None, None]) &
          (xx >= x0[:, None, None]) & (xx < (x0 + w)[:, None, None])).astype(np.float32)
  out = {"image": r.normal(size=(b, s, s, 3)).astype(np.float32), "caption_ids": ids[0],
         "phrase_ids": ids[1], "mask": mask, "mask_indicator": (r.random(b) < 0.75).astype(np.float32)}
  return {k: v[rows] for k, v in out.items()}


def builder_kwargs(d) -> dict:
  """Builder options of the embedded dataset from ``config.data`` (seed, split sizes)."""
  kw = {"seed": d.dataset_seed}
  if d.split_sizes:
    from trace_jax.data.shapes.builder import DEFAULT_SPLIT_SIZES
    sizes = dict(DEFAULT_SPLIT_SIZES)
    for item in str(d.split_sizes).split(","):
      k, _, v = item.partition("=")
      if k.strip() not in sizes or not v.strip().isdigit():
        raise ValueError(f"data.split_sizes: bad entry {item!r}; expected name=count with name in {sorted(sizes)}")
      sizes[k.strip()] = int(v)
    kw["split_sizes"] = sizes
  return kw


def make_data(config, split: str | None = None) -> tuple[Callable[[int], Iterator[dict]], dict]:
  """(batches(start_step) -> iterator of this host's canonical batches, info).

  ``info`` has what the model needs from the data (vocab_size, context_length) and, for the
  embedded dataset, the tokenizer. Batches are a pure function of (seed, step).
  """
  d = config.data
  split = split or d.split
  pc, pi = jax.process_count(), jax.process_index()
  shd_rows = d.batch_size // pc
  rows = slice(pi * shd_rows, (pi + 1) * shd_rows)
  if d.name == "random":
    def batches(start):
      k = start
      while True:
        yield _random_batch(config, k, rows)
        k += 1
    return batches, {"vocab_size": d.vocab_size, "context_length": d.context_length}
  if d.name != "trace_shapes":
    raise ValueError(f"unknown data.name {d.name!r}; expected 'trace_shapes' or 'random'")
  if d.mask not in ("box", "pixels"):
    raise ValueError(f"data.mask must be 'box' or 'pixels'; got {d.mask!r}")
  from trace_jax.data import pipeline
  source = pipeline.load_split(pipeline.DATASET_NAME, d.data_dir, d.image_size, split, **builder_kwargs(d))
  tok = pipeline.make_tokenizer()
  patch = step_lib.model_config(config.model, {"vocab_size": tok.vocab_size,
                                               "context_length": tok.context_length}).vision.patch_size
  mask_key = "phrase_box_mask" if d.mask == "box" else "phrase_mask"

  def canonical(b):
    return {"image": b["image"], "caption_ids": b["caption_ids"], "phrase_ids": b["phrase_ids"],
            "mask": b[mask_key], "mask_indicator": np.ones(len(b["image"]), np.float32)}

  def batches(start):
    it = pipeline.batches(source, batch_size=d.batch_size, start_step=start, prefetch=d.prefetch,
                          seed=config.seed, tokenizer=tok, patch_size=patch, phrase_source=d.phrase_source,
                          process_index=pi, process_count=pc)
    return (canonical(b) for b in it)
  return batches, {"vocab_size": tok.vocab_size, "context_length": tok.context_length, "tokenizer": tok,
                   "source": source}


# ----------------------------------------------------------------------------------------------------


class _Preemption:
  """SIGTERM -> a flag checked between steps (the step in flight finishes, then a save)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    def handler(signum, frame):
      self.requested = True
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler (pre-emption then only via orbax sync)
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _jsonable(m: dict) -> dict:
  return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in m.items()}


def train(config: ml_collections.ConfigDict, workdir: str, *, batches: Callable | None = None,
          data_info: dict | None = None, mesh=None):
  """Train (or resume) the experiment ``config`` in ``workdir``; returns the final ``TrainState``.

  ``batches(start_step) -> iterator of dicts`` overrides the data of ``config.data`` (then
  ``data_info`` gives vocab_size / context_length).
  """
  os.makedirs(workdir, exist_ok=True)
  if config.train.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", config.train.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if batches is None:
    batches, data_info = make_data(config)
  info = {k: v for k, v in (data_info or {}).items() if k in ("vocab_size", "context_length")}
  task = step_lib.make_task(config, info)
  mesh = mesh or mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  shd.check_batch_size(config.data.batch_size, mesh)
  total = int(config.train.steps)
  tx, schedule = state_lib.make_optimizer(config.optim, total)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
                               save_every=config.checkpoint.every_steps,
                               async_save=config.checkpoint.async_save)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
      f.write(task.cfg.to_json())

  shardings = state_lib.state_shardings(task.init_params, tx, mesh, config.seed)
  start = ckpt.latest_step()
  if start is None:
    state, _ = state_lib.create_state(task.init_params, tx, mesh, config.seed)
    start = 0
  else:
    target = state_lib.abstract_with_shardings(task.init_params, tx, shardings, config.seed)
    state, meta = ckpt.restore(target, start)
    if int(meta.get("data_step", start)) != start or int(jax.device_get(state.step)) != start:
      raise RuntimeError(f"checkpoint {start} is inconsistent: meta {meta}, state.step {state.step}")
    print(f"resumed from {ckpt.directory}/{start}", file=sys.stderr)

  train_step = step_lib.jit_train_step(step_lib.make_train_step(task.loss_fn, tx, schedule), shardings, mesh)
  meta_base = {"config": json.loads(config.to_json_best_effort()), "model_config": task.cfg.to_dict()}

  def save(step, reason):
    ckpt.save(step, state, {**meta_base, "data_step": step, "reason": reason})

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  bar = None
  if config.train.progress and is_main:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, desc=f"train {config.loss.name}", unit="step", dynamic_ncols=True)
  step = start
  status = "finished"
  t_last, n_last = time.perf_counter(), start
  with jax.set_mesh(mesh), _Preemption() as pre:
    it = batches(start)
    while step < total:
      local = next(it)
      gb = shd.global_batch({k: local[k] for k in step_lib.BATCH_KEYS}, mesh)
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
    if jax.process_count() == 1:
      export_model(os.path.join(workdir, "model"), state, task, data_info, config)
    elif is_main:  # the params are not fully addressable from one host; evaluate.py reads checkpoints
      print("multi-host run: no model dir exported (use the checkpoint)", file=sys.stderr)
  return state


def export_model(directory: str, state, task, data_info: dict | None, config) -> str:
  """CLIP params -> a trace_jax model dir (plus the word tokenizer and the compressor params if any)."""
  from trace_jax.model_dir import save_model
  params = jax.device_get(state.params)
  files = {}
  tok = (data_info or {}).get("tokenizer")
  if tok is not None and hasattr(tok, "save"):
    os.makedirs(directory, exist_ok=True)
    files["words.json"] = tok.save(os.path.join(directory, "words.json.src"))
  save_model(directory, params["clip"], task.cfg, source=f"train.py {config.loss.name}", tokenizer_files=files)
  if files:
    os.remove(files["words.json"])
  if "text_compression" in params:
    import orbax.checkpoint as ocp
    c = ocp.StandardCheckpointer()
    c.save(os.path.join(os.path.abspath(directory), "text_compression"),
           jax.tree.map(np.asarray, params["text_compression"]), force=True)
    c.wait_until_finished()
  return directory
