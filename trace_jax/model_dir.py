"""The model directory: the one owner of its format (``save`` / ``load``; every caller uses them).

    DIR/
      config.json          CLIPConfig.to_json() plus {"format": "trace_jax.model", "source": ...}
      params/              orbax StandardCheckpointer checkpoint of the float32 CLIP params tree
      tokenizer/           optional: vocab.json + merges.txt (CLIP BPE) or words.json (word-level)
      heads.json           optional: {name: JSON metadata} of the extra heads a trained run needs
      heads/<name>/        orbax params of each head (text compression; TRACE projection W)

    md = load(DIR)         # ModelDir: .config .model .params .tokenizer .heads {name: Head(meta, params)}
    md.tree()              # {'clip': params, <head name>: head params, ...}

A head's metadata is whatever its objective needs to rebuild it without the training data (the
text-compression module's sizes; TRACE's loss hyper-parameters and vocabulary with its anchors).
Loading checks the stored tree against the tree the config's model expects and refuses any
missing, unexpected or mis-shaped entry with a message that lists them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from trace_jax import atomic
from trace_jax.models.config import CLIPConfig
from trace_jax.treecheck import check_shapes, flatten, shapes_of  # noqa: F401 - flatten re-exported

FORMAT = "trace_jax.model"


def unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def expected_shapes(cfg: CLIPConfig) -> dict[str, tuple[int, ...]]:
  """{'visual/conv1': shape, ...} for the model this config builds (no compute)."""
  import flax.linen as nn
  import jax.numpy as jnp
  from trace_jax.models import build
  model = build(cfg)
  s = cfg.vision.image_size
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1, cfg.text.context_length), jnp.int32))["params"]))
  return {k: tuple(v.shape) for k, v in flatten(shapes).items()}


def check_params(params: dict, cfg: CLIPConfig, what: str = "checkpoint") -> None:
  """Raise ValueError listing missing / unexpected / mis-shaped parameters."""
  check_shapes(expected_shapes(cfg), shapes_of(flatten(params)), f"{what} does not match the model config:")


def _writer():
  """An orbax checkpointer that this process runs alone (no barrier with the other processes): a
  multi-process training run writes its model dir from process 0 only (training/loop.export_model)."""
  import orbax.checkpoint as ocp
  i = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=i, active_processes={i}))


def write_model_dir(directory: str, params: dict, meta: dict, *,
                    tokenizer_files: dict[str, str] | None = None) -> str:
  """DIR/params (orbax, float32) [+ DIR/tokenizer/*] then DIR/config.json = ``meta``.

  config.json is written last (through a rename), so a half-written directory fails to load.
  Shared by ``save_model`` and the CRATE classifier directories (trace_jax/convert/crate.py).
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  ckpt = _writer()
  ckpt.save(os.path.join(directory, "params"), params, force=True)
  ckpt.wait_until_finished()
  if tokenizer_files:
    tok_dir = os.path.join(directory, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    for name, content_path in tokenizer_files.items():
      with open(content_path, "rb") as src, open(os.path.join(tok_dir, name), "wb") as dst:
        dst.write(src.read())
  atomic.write_json(os.path.join(directory, "config.json"), meta, indent=2, sort_keys=True)
  return directory


def read_meta(directory: str, fmt: str, what: str, hint: str = "") -> dict:
  """config.json of a model directory without its "format" / "source" entries; refuses another format."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not a {what}: {path} is missing{hint}")
  with open(path) as f:
    meta = json.load(f)
  if meta.pop("format", None) != fmt:
    raise ValueError(f"{path}: not a {fmt} config")
  meta.pop("source", None)
  return meta


def read_params(directory: str) -> dict:
  """The params tree (NumPy arrays) of DIR/params, unchecked."""
  import orbax.checkpoint as ocp
  params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(directory), "params"))
  return jax.tree.map(np.asarray, params)


def save_model(directory: str, params: dict, cfg: CLIPConfig, *, source: str = "",
               tokenizer_files: dict[str, str] | None = None) -> str:
  """Write params (orbax) + config.json atomically enough: config last, so a half-written dir fails to load."""
  check_params(params, cfg, "params to save")
  meta = {**cfg.to_dict(), "format": FORMAT, "source": source}
  return write_model_dir(directory, params, meta, tokenizer_files=tokenizer_files)


def load_config(directory: str) -> CLIPConfig:
  return CLIPConfig.from_dict(read_meta(directory, FORMAT, "trace_jax model directory",
                                        " (create one with `trace-jax convert`)"))


def load_model(directory: str) -> tuple[CLIPConfig, dict]:
  """(config, float32 params) from a model directory, validated against the config."""
  cfg = load_config(directory)
  params = read_params(directory)
  check_params(params, cfg, f"checkpoint {directory}")
  return cfg, params


def tokenizer_dir(directory: str) -> str | None:
  """DIR/tokenizer if present (None otherwise); refuses one holding two kinds of tokenizer files."""
  from trace_jax.tokenizers import check_one_kind
  d = os.path.join(directory, "tokenizer")
  if not os.path.isdir(d):
    return None
  check_one_kind(d)
  return d


HEADS_JSON = "heads.json"


@dataclasses.dataclass
class Head:
  """An extra parameter subtree of a trained model (``meta``: JSON; ``params``: NumPy tree)."""
  meta: dict
  params: dict


@dataclasses.dataclass
class ModelDir:
  """A loaded model dir: config, the linen module, float32 CLIP params, tokenizer (or None), heads."""
  path: str
  config: CLIPConfig
  model: Any
  params: dict
  tokenizer: Any
  heads: dict[str, Head]

  @property
  def desc(self) -> str:
    return f"model dir {self.path}"

  def tree(self) -> dict:
    """{'clip': params, <head>: params, ...}: the params tree of the objective that trained it."""
    return {"clip": self.params, **{k: h.params for k, h in self.heads.items()}}


def save(directory: str, params: dict, cfg: CLIPConfig, *, source: str = "",
         tokenizer_files: dict[str, str] | None = None, heads: dict[str, dict] | None = None) -> str:
  """Writes a model dir. ``params``: the CLIP tree, or a training tree ``{'clip': ..., <head>: ...}``
  whose heads are stored under ``heads/`` with ``heads[name]`` as their metadata (a training-tree
  subtree without metadata is an error: it could not be rebuilt)."""
  heads = dict(heads or {})
  if "clip" in params and isinstance(params["clip"], dict) and "visual" in params["clip"]:
    extra = {k: v for k, v in params.items() if k != "clip"}
    params = params["clip"]
  else:
    extra = {}
  if set(extra) != set(heads):
    raise ValueError(f"heads to save: params have {sorted(extra)}, metadata has {sorted(heads)}")
  save_model(directory, params, cfg, source=source, tokenizer_files=tokenizer_files)
  if heads:
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    c = _writer()
    for name, tree in extra.items():
      c.save(os.path.join(directory, "heads", name), jax.tree.map(lambda a: np.asarray(a, np.float32), tree),
             force=True)
    c.wait_until_finished()
    atomic.write_json(os.path.join(directory, HEADS_JSON), heads, indent=1, sort_keys=True)
  return directory


def read_heads(directory: str) -> dict[str, Head]:
  """The heads of a model dir (empty when it has none)."""
  path = os.path.join(directory, HEADS_JSON)
  if not os.path.exists(path):
    return {}
  import orbax.checkpoint as ocp
  with open(path) as f:
    metas = json.load(f)
  out = {}
  for name, meta in metas.items():
    hdir = os.path.join(os.path.abspath(directory), "heads", name)
    if not os.path.isdir(hdir):
      raise FileNotFoundError(f"{path} lists head {name!r} but {hdir} is missing")
    out[name] = Head(meta, jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(hdir)))
  return out


def load(path: str, *, dtype: str | None = "float32") -> ModelDir:
  """Everything in a model dir, validated: config (compute dtype ``dtype``; None keeps the stored one),
  model, params, tokenizer (None if the dir has none) and heads."""
  from trace_jax.models import build
  from trace_jax.tokenizers import load_tokenizer
  path = os.path.abspath(os.path.expanduser(path))
  cfg, params = load_model(path)
  if dtype is not None:
    cfg = cfg.replace(dtype=dtype)
  tok = load_tokenizer(path) if tokenizer_dir(path) else None
  return ModelDir(path, cfg, build(cfg), params, tok, read_heads(path))
