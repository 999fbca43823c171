"""The base config every experiment starts from: every key a config may set (unknown keys are errors).

    from configs import common
    c = common.get_config()              # data / model / loss / optim / train / checkpoint / mesh / eval
    c.loss.name = "amc"

The objectives add their own sections (``config.loss.amc``, ``.local``, ``.trace``) through
``trace_jax.objectives.add_defaults``; this file holds what is not an objective's.
"""
from __future__ import annotations

import difflib

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  from trace_jax import objectives
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = placeholder(str)      # a model dir (trace-jax convert output or a run's export): initial params,
  #                                     tokenizer and model config (model.* keys must agree or stay unset)
  c.freeze = ""                       # towers kept fixed: '', 'visual', 'text' or 'visual,text' (LiT: 'visual')

  c.data = ml_collections.ConfigDict()
  c.data.name = "trace_shapes"        # a trace_jax.data.sources name: 'trace_shapes' or 'random' (tests)
  c.data.data_dir = placeholder(str)  # tfds data dir (None: tfds default)
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
  # Real sources (trace_jax/data/train_sources.py; docs/training.md)
  c.data.path = ""                    # image_text: a CSV / TSV, or WebDataset shards 'DIR/s-{000000..000127}.tar'
  c.data.image_key = "filepath"       # image_text CSV columns (open_clip's csv_img_key / csv_caption_key)
  c.data.caption_key = "title"
  c.data.csv_separator = ""           # "" = tab for .tsv, else comma
  c.data.manual_dir = placeholder(str)      # tfds sources: official files, to prepare the builder if needed
  c.data.builder_config = placeholder(str)  # tfds builder config (default per source, e.g. refcoco_unc)
  c.data.tokenizer_dir = placeholder(str)   # tokenizer when init_from is unset (a model dir or tokenizer dir)
  c.data.augment = "auto"             # 'auto' (train split: open_clip train crop, else centre crop) | 'train' | 'eval'
  c.data.worker_count = 0             # Grain worker processes (0 = decode in the training process)
  c.data.read_threads = 1             # Grain reader threads per process

  c.model = ml_collections.ConfigDict()
  c.model.preset = placeholder(str)   # None: 'small' (a new model) or the init_from dir's architecture
  c.model.dtype = "float32"           # compute dtype ('bfloat16' = mixed precision; params stay float32)
  # Large-model tools (docs/scaling.md), default off: remat 'none' | 'block' | a jax.checkpoint_policies
  # name; scan_layers: nn.scan over the blocks; attention 'explicit' | 'fused' (jax.nn.dot_product_attention)
  c.model.remat = "none"
  c.model.scan_layers = False
  c.model.attention = "explicit"
  for k, t in (("image_size", int), ("patch_size", int), ("vision_width", int), ("vision_layers", int), ("vision_heads", int),
               ("text_width", int), ("text_layers", int), ("text_heads", int), ("embed_dim", int),
               ("vocab_size", int), ("context_length", int), ("eos_token_id", int), ("pool", str),
               ("crate_dim_head", int)):
    setattr(c.model, k, placeholder(t))  # None: preset / data value (image_size: the data's, for a new model)

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "contrastive"         # a trace_jax.objectives name: contrastive | amc | local_alignment | trace
  c.loss.global_texts = "caption"     # texts of the global CLIP loss: 'caption' | 'phrase' | 'caption+phrase'
  c.loss.global_loss = "softmax"      # 'softmax' (CLIP InfoNCE) | 'sigmoid' (SigLIP, needs a SigLIP model)
  objectives.add_defaults(c.loss)     # loss.amc, loss.local, loss.trace

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=5e-4, schedule="warmup_cosine", warmup_steps=100, min_lr_ratio=0.0,
      b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, grad_clip=1.0))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, log_every=10, progress=True, compilation_cache_dir=placeholder(str),
      debug_step_sleep=0.0,           # debug_step_sleep: seconds slept per step (tests of pre-emption only)
      microbatches=1))                # gradient accumulation over this many microbatches (docs/scaling.md)

  # replica_parallel_min_bytes: a replicated shard is written split across its replicas only where each
  # replica's slice has at least this many bytes (trace_jax/training/checkpointing.py; 0: orbax's default)
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, keep=3, async_save=True, export_model=True,
                                                replica_parallel_min_bytes=2**20))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.distributed = False               # jax.distributed.initialize() (multi-host); env TRACE_JAX_DISTRIBUTED=1 too

  c.eval = ml_collections.ConfigDict(dict(
      split="test", methods="gradcam", layer=-1, threshold=0.5, batch_size=50,
      num_examples=placeholder(int), gallery=8, text="phrase",
      # after_train: train.py evaluates the finished run on its training mesh, every process taking
      # part (the embedded grounding evaluation, evaluation/embedded.py); process 0 writes
      # <workdir>/eval/eval.json. Off: evaluate.py on the exported model dir, as before.
      after_train=False))
  return c


def _keys(node: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in node.items():
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out += _keys(v, prefix + k + ".")
  return out


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str:
  """'unknown config key X (did you mean Y?)': the closest known key, by spelling."""
  close = difflib.get_close_matches(key, _keys(config), n=1, cutoff=0.6)
  return f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
  """Sets ``{'a.b': 'value'}`` string overrides in place (``--set a.b=value``), parsed as the type of the
  current value (an unset None placeholder: as a Python literal, else kept as the string); an unknown
  key is an error that names it and the closest known key."""
  for k, v in overrides.items():
    node = config
    *path, last = k.split(".")
    for p in path + [last]:
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise KeyError(f"--set {k}: {unknown_key_message(config, k)}")
      if p != last:
        node = node[p]
    old = node[last]
    if isinstance(old, bool):
      if v not in ("True", "False", "true", "false", "1", "0"):
        raise ValueError(f"--set {k}: expected a boolean, got {v!r}")
      node[last] = v in ("True", "true", "1")
    elif old is None:   # an unset placeholder: a Python literal (8, 0.5, None, (1, 2)) or else the string
      import ast
      try:
        node[last] = ast.literal_eval(v)
      except (ValueError, SyntaxError, TypeError):
        node[last] = v
    else:
      node[last] = type(old)(v)
  return config


def run_main(main, prog: str) -> None:
  """``absl.app.run(main)`` where a bad ``--config.KEY=VALUE`` override is one line on stderr and exit 2
  (ml_collections raises from inside flag parsing, which absl would print as a traceback)."""
  import re
  import sys
  from absl import app
  try:
    app.run(main)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    msg = " ".join(str(e.args[0] if e.args else e).replace("\\n", " ").split())
    overrides = [a.split("=", 1)[0][len("--config."):] for a in sys.argv[1:] if a.startswith("--config.")]
    bad = re.search(r"(\w+)", msg)
    hint = re.search(r'Did you mean "(\w+)"', msg)
    key = next((k for k in overrides if bad and bad.group(1) in k.split(".")), None)
    if isinstance(e, (AttributeError, KeyError)) and key:
      msg = f"unknown config key {key!r}"
      if hint:
        msg += f" (did you mean {'.'.join(hint.group(1) if p == bad.group(1) else p for p in key.split('.'))!r}?)"
    else:
      msg = f"bad config override: {msg}"
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)
