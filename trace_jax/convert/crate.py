"""The authors' CRATE PyTorch checkpoints -> ``CrateClassifier`` params + ``CrateConfig``.

    trace-jax convert --from crate SRC.pth DST_DIR --model-name crate-s

SRC is ``{'state_dict': ...}`` (the released CRATE-S, DDP prefix ``module.``) or a bare state dict
(``.pth/.pt/.bin`` via torch, or ``.safetensors`` / ``.npz`` without torch). Key layout and the
conversion rules are in notes/crate.md §3: every ``nn.Linear.weight`` (out, in) becomes a kernel
``W.T``; ``qkv.weight.T`` is reshaped to ``[dim, heads, dim_head]`` (head = outer factor);
``to_out.0.weight.T`` to ``[heads, dim_head, dim]``; LayerNorm weight -> scale; the ISTA dictionary
``fn.weight`` is copied UNCHANGED as ``D`` (the row formula in trace_jax/models/crate.py uses it so).

The number of heads cannot be read from the shapes (``qkv.weight`` is [heads*dim_head, dim]); it
comes from ``--model-name`` (crate-t|s|b|l), ``--heads``, or a unique match of (dim, depth, inner
width) with a named config. Every other size is inferred from the shapes; with ``--model-name`` the
named architecture is used and only ``num_classes`` and ``image_size`` are taken from the checkpoint
(fine-tuned heads / other resolutions), so an architecture mismatch is refused key by key.

DST is a directory: ``config.json`` ({"format": "trace_jax.crate_classifier", "source", CrateConfig
fields}) + ``params/`` (orbax StandardCheckpointer), read back with ``load_classifier``.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from trace_jax.model_dir import read_meta, read_params, write_model_dir
from trace_jax.models.crate import CLASSIFIERS, CrateConfig, classifier_config
from trace_jax.treecheck import check_shapes, flatten, shapes_of

FORMAT = "trace_jax.crate_classifier"


# ----------------------------------------------------------------------------------------------
# Reading.

def unwrap_state_dict(obj) -> dict[str, np.ndarray]:
  """{'state_dict': sd} | {'model': sd} | sd -> sd with numpy values and the DDP 'module.' prefix stripped."""
  if isinstance(obj, dict):
    for key in ("state_dict", "model"):
      if key in obj and isinstance(obj[key], dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict):
    raise ValueError(f"expected a state dict (mapping of names to tensors); got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    k = k[len("module."):] if k.startswith("module.") else k  # vis_utils/crate_hook.py:40-46
    if hasattr(v, "detach"):
      v = v.detach().cpu().float().numpy()
    out[k] = np.asarray(v)
  return out


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Read a checkpoint file into a flat {name: float array} dict (see ``unwrap_state_dict``)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"CRATE checkpoint {path} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return unwrap_state_dict(load_file(path))
  if path.endswith(".npz"):
    with np.load(path) as f:
      return unwrap_state_dict({k: f[k] for k in f.files})
  import argparse
  import torch
  torch.set_num_threads(2)
  # weights_only: no arbitrary code from the pickle; the training scripts also store their argparse
  # Namespace beside the weights, which is allowed explicitly.
  with torch.serialization.safe_globals([argparse.Namespace]):
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with context
      raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({e}); "
                       f"re-save its state_dict with torch.save(model.state_dict(), ...)") from e
  return unwrap_state_dict(obj)


# ----------------------------------------------------------------------------------------------
# Layout.

def torch_shapes(cfg: CrateConfig) -> dict[str, tuple[int, ...]]:
  """The official ``model.state_dict()`` names and shapes for a config (notes/crate.md §3)."""
  d, pd, inner = cfg.dim, cfg.channels * cfg.patch_size ** 2, cfg.heads * cfg.dim_head
  s = {"pos_embedding": (1, cfg.grid ** 2 + 1, d), "cls_token": (1, 1, d),
       "to_patch_embedding.1.weight": (pd,), "to_patch_embedding.1.bias": (pd,),
       "to_patch_embedding.2.weight": (d, pd), "to_patch_embedding.2.bias": (d,),
       "to_patch_embedding.3.weight": (d,), "to_patch_embedding.3.bias": (d,)}
  for i in range(cfg.depth):
    t = f"transformer.layers.{i}."
    s[t + "0.norm.weight"] = s[t + "0.norm.bias"] = (d,)
    s[t + "0.fn.qkv.weight"] = (inner, d)
    if cfg.project_out:
      s[t + "0.fn.to_out.0.weight"] = (d, inner)
      s[t + "0.fn.to_out.0.bias"] = (d,)
    s[t + "1.norm.weight"] = s[t + "1.norm.bias"] = (d,)
    s[t + "1.fn.weight"] = (d, d)
  s.update({"mlp_head.0.weight": (d,), "mlp_head.0.bias": (d,),
            "mlp_head.1.weight": (cfg.num_classes, d), "mlp_head.1.bias": (cfg.num_classes,)})
  return s


def check_state_dict(sd: dict[str, np.ndarray], cfg: CrateConfig, what: str = "CRATE checkpoint") -> None:
  """Raise ValueError listing missing / unexpected / mis-shaped keys."""
  check_shapes(torch_shapes(cfg), shapes_of(sd),
               f"{what} does not match the CRATE config (dim {cfg.dim}, depth {cfg.depth}, heads {cfg.heads}, "
               f"dim_head {cfg.dim_head}, patch {cfg.patch_size}, image {cfg.image_size}):")


def _need(sd, key):
  if key not in sd:
    raise ValueError(f"CRATE checkpoint has no {key!r}; is this an official CRATE (model/crate.py) state dict? "
                     f"keys start with: {sorted(sd)[:8]}")
  return np.shape(sd[key])


def config_from_state_dict(sd: dict[str, np.ndarray], *, model_name: str | None = None, heads: int | None = None,
                           pool: str = "cls", eta: float = 0.1, lambd: float = 0.1,
                           channels: int = 3) -> CrateConfig:
  """The CrateConfig of a state dict (heads from model_name / heads / a unique named match)."""
  dim = _need(sd, "cls_token")[-1]
  pd = _need(sd, "to_patch_embedding.1.weight")[0]
  patch = int(round(math.sqrt(pd / channels)))
  if patch * patch * channels != pd:
    raise ValueError(f"patch LayerNorm size {pd} is not channels*patch^2 with {channels} channels")
  n = _need(sd, "pos_embedding")[1] - 1
  grid = int(round(math.sqrt(n)))
  if grid * grid != n:
    raise ValueError(f"pos_embedding has {n} patch rows, not a square grid")
  num_classes = _need(sd, "mlp_head.1.weight")[0]
  layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
  depth = max(layer_ids) + 1 if layer_ids else 0
  inner = _need(sd, "transformer.layers.0.0.fn.qkv.weight")[0]
  extra = dict(num_classes=num_classes, image_size=grid * patch, pool=pool, eta=eta, lambd=lambd,
               channels=channels)
  if model_name:
    base = classifier_config(model_name)
    return base.replace(**extra)
  if heads is None:
    if "transformer.layers.0.0.fn.to_out.0.weight" not in sd and inner == dim:
      heads = 1  # to_out = Identity only when heads == 1 and dim_head == dim
    else:
      match = [c for c in CLASSIFIERS.values() if (c.dim, c.depth, c.heads * c.dim_head) == (dim, depth, inner)]
      if len(match) != 1:
        raise ValueError(f"cannot infer the number of heads of a CRATE with dim {dim}, depth {depth} and "
                         f"qkv width {inner}; pass --model-name (one of {sorted(CLASSIFIERS)}) or --heads")
      heads = match[0].heads
  if inner % heads:
    raise ValueError(f"qkv width {inner} is not divisible by {heads} heads")
  return CrateConfig(dim=dim, depth=depth, heads=heads, dim_head=inner // heads, patch_size=patch, **extra)


def params_from_state_dict(sd: dict[str, np.ndarray], cfg: CrateConfig) -> dict:
  """Official state dict -> CrateClassifier params (float32 numpy), after ``check_state_dict``."""
  check_state_dict(sd, cfg)
  f = lambda k: np.asarray(sd[k], np.float32)
  ln = lambda prefix: {"ln": {"scale": f(prefix + "weight"), "bias": f(prefix + "bias")}}
  d, h, dh = cfg.dim, cfg.heads, cfg.dim_head
  blocks = {}
  for i in range(cfg.depth):
    t = f"transformer.layers.{i}."
    attn = {"qkv": {"kernel": f(t + "0.fn.qkv.weight").T.reshape(d, h, dh)}}
    if cfg.project_out:
      attn["out"] = {"kernel": f(t + "0.fn.to_out.0.weight").T.reshape(h, dh, d), "bias": f(t + "0.fn.to_out.0.bias")}
    blocks[f"block_{i}"] = {"ln_1": ln(t + "0.norm."), "attn": attn, "ln_2": ln(t + "1.norm."),
                            "ista": {"D": f(t + "1.fn.weight")}}  # D unchanged (row formula)
  return {
      "patch_ln_1": ln("to_patch_embedding.1."),
      "patch_proj": {"kernel": f("to_patch_embedding.2.weight").T, "bias": f("to_patch_embedding.2.bias")},
      "patch_ln_2": ln("to_patch_embedding.3."),
      "cls_token": f("cls_token").reshape(d),
      "pos_embedding": f("pos_embedding")[0],
      "transformer": blocks,
      "head_ln": ln("mlp_head.0."),
      "head": {"kernel": f("mlp_head.1.weight").T, "bias": f("mlp_head.1.bias")},
  }


# ----------------------------------------------------------------------------------------------
# Model directories.

def check_params(params: dict, cfg: CrateConfig, what: str = "params") -> None:
  """Raise ValueError listing missing / unexpected / mis-shaped entries against CrateClassifier(cfg)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from trace_jax.models.crate import CrateClassifier
  shapes = jax.eval_shape(lambda: nn.unbox(CrateClassifier(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels)))["params"]))
  check_shapes(shapes_of(flatten(shapes)), shapes_of(flatten(params)), f"{what} does not match the CRATE config:")


def save_classifier(directory: str, params: dict, cfg: CrateConfig, *, source: str = "") -> str:
  """Write params (orbax) then config.json (last, so a half-written directory fails to load)."""
  check_params(params, cfg, "params to save")
  meta = {**json.loads(cfg.to_json()), "format": FORMAT, "source": source}
  return write_model_dir(directory, params, meta)


def load_classifier(directory: str) -> tuple[CrateConfig, dict]:
  """(CrateConfig, float32 params) of a directory written by ``save_classifier``, validated."""
  cfg = CrateConfig.from_dict(read_meta(directory, FORMAT, "CRATE classifier directory"))
  params = read_params(directory)
  check_params(params, cfg, f"checkpoint {directory}")
  return cfg, params


def convert(src: str, dst: str, *, model_name: str | None = None, heads: int | None = None,
            pool: str = "cls", eta: float = 0.1, lambd: float = 0.1) -> tuple[CrateConfig, dict]:
  """A CRATE classifier checkpoint -> a classifier dir. η (the ISTA step size), λ, the heads and the
  pooling are not stored in the weights (notes/crate.md): give them when they differ from the official
  factory defaults (η = λ = 0.1, cls pooling); a checkpoint trained with ista=0.05 converted with
  η = 0.1 computes different layer outputs."""
  sd = load_state_dict(src)
  cfg = config_from_state_dict(sd, model_name=model_name, heads=heads, pool=pool, eta=eta, lambd=lambd)
  params = params_from_state_dict(sd, cfg)
  save_classifier(dst, params, cfg, source=f"crate:{os.path.basename(src)}")
  return cfg, params
