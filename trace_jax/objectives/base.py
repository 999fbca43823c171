"""What every objective returns (:class:`Task`) and the model config it builds from ``config.model``."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

from trace_jax.models import get_config
from trace_jax.models.config import CLIPConfig

# Canonical batch keys (trace_jax/data/sources.py yields them), leading axis = batch:
#   image [B, H, W, 3] float32 normalised; caption_ids / phrase_ids [B, L] int32;
#   mask [B, H, W] float32 (the phrase's region); mask_indicator [B] float32 (1: the row has a region).
BATCH_KEYS = ("image", "caption_ids", "phrase_ids", "mask", "mask_indicator")


class Task(NamedTuple):
  """Everything the loop needs about an experiment's model and objective.

  ``pretrained`` (``config.init_from``) replaces the matching subtrees of a new run's params;
  ``trainable`` (``config.freeze``) marks the leaves the optimiser must leave unchanged.
  ``heads``: name -> JSON metadata of each extra parameter subtree (``params[name]``) the objective
  trains beside ``params['clip']``; ``trace_jax.model_dir.save`` stores them so that a trained model
  dir is evaluable on its own.
  """
  cfg: CLIPConfig
  model: Any                      # CLIP linen module
  compressor: Any                 # TextCompression or None
  init_params: Callable           # rng -> boxed params {'clip': ..., [head]: ...}
  loss_fn: Callable               # (params, batch, rng) -> (loss, metrics)
  heads: dict = {}
  pretrained: dict | None = None  # {'clip': NumPy tree[, head: tree]} placed over a new run's init
  trainable: Callable | None = None  # params -> tree of bools (False: frozen), None: all train


DEFAULT_PRESET = "small"

# config.model key -> (section, field) of CLIPConfig: the keys a model dir fixes (init_from).
_MODEL_KEYS = {
    "image_size": ("vision", "image_size"), "patch_size": ("vision", "patch_size"),
    "vision_width": ("vision", "width"), "vision_layers": ("vision", "layers"),
    "vision_heads": ("vision", "heads"), "text_width": ("text", "width"), "text_layers": ("text", "layers"),
    "text_heads": ("text", "heads"), "embed_dim": (None, "embed_dim"), "vocab_size": ("text", "vocab_size"),
    "context_length": ("text", "context_length"), "eos_token_id": ("text", "eos_token_id"),
    "pool": ("text", "pool")}
# Keys a data source fixes (its tokenizer's; 'image_size' only for a source of fixed-size images).
_INFO_KEYS = ("vocab_size", "context_length", "eos_token_id", "image_size")


def _field(cfg: CLIPConfig, path):
  section, name = path
  return getattr(cfg if section is None else getattr(cfg, section), name)


def _architecture(cfg: CLIPConfig) -> dict:
  return {k: _field(cfg, p) for k, p in _MODEL_KEYS.items()
          if k not in ("vocab_size", "context_length", "eos_token_id", "pool", "image_size")} | {
              "vision_kind": cfg.vision.kind}


def _scale_options(mcfg) -> dict:
  """model.remat / scan_layers / attention: training-time memory tools, free like the dtype
  (they change no parameter; docs/scaling.md)."""
  return {k: mcfg.get(k, d) for k, d in (("remat", "none"), ("scan_layers", False), ("attention", "explicit"))}


def _check_dtype(dtype: str) -> str:
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"model.dtype must be float32, bfloat16 or float16; got {dtype!r}")
  return dtype


def model_config(mcfg, data_info: dict | None = None, base: CLIPConfig | None = None,
                 base_desc: str = "the model dir") -> CLIPConfig:
  """CLIPConfig from ``config.model`` (a preset plus overrides).

  New model (``base`` None): ``model.preset`` (default 'small') with every set key applied; the
  tokenizer facts (vocab size, context length, end-of-text id) and the image size of a fixed-size
  source come from the data source's ``data_info`` where ``config.model`` leaves them unset.

  From a model dir (``base``, ``config.init_from``): the dir's config, which every set key of
  ``config.model`` and every fact of the data source must agree with; a conflict is a ValueError that
  names each key and both values. Only the compute dtype is free.
  """
  info = {k: v for k, v in dict(data_info or {}).items() if k in _INFO_KEYS and v is not None}
  dtype = _check_dtype(mcfg.get("dtype", "float32"))
  dh = mcfg.get("crate_dim_head")
  if base is not None:
    conflicts = []
    preset = mcfg.get("preset")
    if preset:
      want, have = _architecture(get_config(preset)), _architecture(base)
      diff = [f"{k} {want[k]!r} vs {have[k]!r}" for k in want if want[k] != have[k]]
      if diff:
        conflicts.append(f"model.preset {preset!r} is not the architecture of {base_desc} ({', '.join(diff)}); "
                         "leave model.preset unset with init_from")
    for key, path in _MODEL_KEYS.items():
      v = mcfg.get(key)
      if v is not None and v != _field(base, path):
        conflicts.append(f"model.{key}: config {v!r}, {base_desc} {_field(base, path)!r}")
    for key, v in info.items():
      if v != _field(base, _MODEL_KEYS[key]):
        what = "images of" if key == "image_size" else "tokenizer's"
        conflicts.append(f"{key}: the data source's {what} {v!r}, {base_desc} {_field(base, _MODEL_KEYS[key])!r}"
                         + (" (set data.image_size to match)" if key == "image_size" else ""))
    stored_dh = dict(base.extra).get("crate_dim_head")
    if dh is not None and stored_dh is not None and int(dh) != int(stored_dh):
      conflicts.append(f"model.crate_dim_head: config {dh!r}, {base_desc} {stored_dh!r}")
    if conflicts:
      raise ValueError("init_from: the config disagrees with the model dir: " + "; ".join(conflicts))
    return base.replace(dtype=dtype, **_scale_options(mcfg))

  cfg = get_config(mcfg.get("preset") or DEFAULT_PRESET)
  vis, txt, top = {}, {}, {"dtype": dtype, **_scale_options(mcfg)}
  for key, (section, name) in _MODEL_KEYS.items():
    v = mcfg.get(key)
    if v is None:
      v = info.get(key)
    if v is not None:
      {"vision": vis, "text": txt, None: top}[section][name] = v
  cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, **vis), text=dataclasses.replace(cfg.text, **txt), **top)
  if dh is not None:
    cfg = cfg.replace(extra=tuple(sorted({**dict(cfg.extra), "crate_dim_head": int(dh)}.items())))
  return cfg


FREEZABLE = ("visual", "text")


def parse_freeze(spec: str) -> tuple[str, ...]:
  """``config.freeze`` ('', 'visual', 'text' or 'visual,text') -> the towers to keep fixed."""
  towers = tuple(t.strip() for t in str(spec or "").split(",") if t.strip())
  bad = [t for t in towers if t not in FREEZABLE]
  if bad:
    raise ValueError(f"freeze: unknown tower {bad[0]!r}; expected a comma-separated subset of {FREEZABLE}")
  return towers


def trainable_fn(freeze: tuple[str, ...]):
  """params -> the same tree of bools (False: kept fixed), or None when nothing is frozen.

  The CLIP tree is {'visual', 'text', 'logit_scale'}; a frozen tower is its subtree (LiT locks the
  image tower and trains the text tower and the temperature). Heads always train."""
  if not freeze:
    return None
  import jax

  def trainable(params):
    out = {}
    for k, v in params.items():
      if k == "clip":
        out[k] = {t: jax.tree.map(lambda _, t=t: t not in freeze, sub) for t, sub in v.items()}
      else:
        out[k] = jax.tree.map(lambda _: True, v)
    return out
  return trainable


def pretrained_tree(init, heads: dict) -> dict:
  """What a model dir (``init``: trace_jax.model_dir.ModelDir) gives a new run: its CLIP params, and
  each stored head whose metadata equals the objective's (others start fresh, with a note)."""
  import sys
  tree = {"clip": init.params}
  for name, meta in heads.items():
    stored = init.heads.get(name)
    if stored is None:
      continue
    if stored.meta == meta:
      tree[name] = stored.params
    else:
      print(f"init_from: {init.path} has a {name!r} head built with other settings; it starts fresh",
            file=sys.stderr)
  return tree
