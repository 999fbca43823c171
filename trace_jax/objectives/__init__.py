"""Training objectives by name: ``make(config, info) -> Task`` (scenic-style registry).

    task = objectives.make(config, source.info)     # config.loss.name picks the objective
    params = task.init_params(rng)                  # {'clip': ..., <heads>...}, logically boxed
    loss, metrics = task.loss_fn(params, batch, rng)

Each objective family lives in its own file and registers itself with :func:`register`, giving its
builder and the config section it adds to ``config.loss`` (``defaults``). The training loop receives a
Task and never names an objective; ``configs/common.py`` asks :func:`add_defaults` for every section.

  contrastive, amc, local_alignment    trace_jax/objectives/clip.py
  trace                                trace_jax/objectives/trace.py
"""
from __future__ import annotations

import ml_collections

from trace_jax.objectives.base import (Task, model_config, parse_freeze, pretrained_tree,  # noqa: F401
                                       trainable_fn)
from trace_jax.objectives.registry import _DEFAULTS, _REGISTRY, register  # noqa: F401

def _load_all():
  # Importing a family registers it; the list is the one place that names the families.
  from trace_jax.objectives import clip, trace  # noqa: F401


def names() -> tuple[str, ...]:
  _load_all()
  return tuple(_REGISTRY)


def add_defaults(loss: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds every registered objective's config section to ``config.loss`` (in place)."""
  _load_all()
  for section, fn in _DEFAULTS.items():
    if section not in loss:
      loss[section] = fn()
  return loss


def make(config, info: dict | None = None, init=None) -> Task:
  """The Task of ``config.loss.name``; ``info`` is the data source's (tokenizer, vocab_size,
  context_length, train_captions, ...); ``init`` the loaded model dir of ``config.init_from``
  (trace_jax.model_dir.ModelDir), whose config the model takes and whose params start the run."""
  _load_all()
  name = config.loss.name
  if name not in _REGISTRY:
    raise ValueError(f"unknown loss.name {name!r}; expected one of {tuple(_REGISTRY)}")
  freeze = parse_freeze(config.get("freeze", ""))
  task = _REGISTRY[name](config, dict(info or {}), init)
  pretrained = pretrained_tree(init, task.heads) if init is not None else None
  if pretrained is not None and task.cfg.scan_layers:
    # model dirs hold unrolled blocks (models/scale.py); a scanned run stacks them ([L, ...] leaves)
    from trace_jax.models.scale import stack_blocks
    pretrained = {**pretrained, "clip": stack_blocks(pretrained["clip"])}
  return task._replace(pretrained=pretrained, trainable=trainable_fn(freeze))
