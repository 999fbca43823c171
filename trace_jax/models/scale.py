"""Parameter layouts of ``model.scan_layers`` and the inference layout of model dirs.

Unrolled (default, every model dir, every converter, every attribution method):
    params[tower]['transformer'] = {'block_0': {...}, ..., 'block_{L-1}': {...}}
Scanned (``CLIPConfig.scan_layers=True``, ``nn.scan`` in ``layers.Transformer``):
    params[tower]['transformer'] = {'blocks': {...}}   every leaf with a leading [L] axis

``stack_blocks`` / ``unstack_blocks`` convert one into the other (exact: a stack / an index), for
any subtree holding 'transformer' nodes (``params['clip']``, the Adam moments, ...).
``inference_layout`` is what a trained model becomes in a model dir: unrolled params and a config
with the training-only options (remat, scan_layers, fused attention) back at their defaults, so
every command and attribution method reads it as before.

``constrain_batch`` pins the token activations entering / leaving each block to the logical 'batch'
axis (maxtext's logical activation constraints); the training code says what 'batch' means on its
mesh (``activation_rules(rules)`` + a mesh context, trace_jax/training/sharding.py): the model names
no mesh axis and is unchanged (no constraint) outside that context. (Not flax's global
``nn.logical_axis_rules``: under those, flax's ``DenseGeneral`` shape check unboxes its flattened
rank-2 kernel init against the 3 logical names of our q/k/v kernels and fails.)
"""
from __future__ import annotations

import contextlib
import re
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trace_jax.models.config import SCALE_DEFAULTS, CLIPConfig

_BLOCK = re.compile(r"^block_(\d+)$")
_ACTIVATION = threading.local()   # .rules: the logical axis rules of the trace in progress, or None


def _is_unrolled(node: dict) -> bool:
  return bool(node) and all(_BLOCK.match(k) for k in node)


def stack_blocks(tree: Any) -> Any:
  """Every ``transformer: {block_i: ...}`` node -> ``transformer: {blocks: stacked [L, ...]}``."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    if k == "transformer" and isinstance(v, dict) and _is_unrolled(v):
      n = len(v)
      missing = sorted(set(range(n)) - {int(_BLOCK.match(b).group(1)) for b in v})
      if missing:
        raise ValueError(f"cannot stack blocks: block_{missing[0]} is missing of {n}")
      out[k] = {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *[v[f"block_{i}"] for i in range(n)])}
    else:
      out[k] = stack_blocks(v)
  return out


def unstack_blocks(tree: Any) -> Any:
  """Inverse of ``stack_blocks``: ``transformer: {blocks: [L, ...]}`` -> ``{block_i: ...}``."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    if k == "transformer" and isinstance(v, dict) and set(v) == {"blocks"}:
      n = jax.tree.leaves(v["blocks"])[0].shape[0]
      out[k] = {f"block_{i}": jax.tree.map(lambda a, i=i: a[i], v["blocks"]) for i in range(n)}
    else:
      out[k] = unstack_blocks(v)
  return out


@contextlib.contextmanager
def activation_rules(rules):
  """Within: ``constrain_batch`` maps logical names to mesh axes by ``rules`` ((name, mesh axes) pairs,
  flax's format). Entered while a jitted step is traced (trace_jax/training/sharding.py)."""
  old = getattr(_ACTIVATION, "rules", None)
  _ACTIVATION.rules = tuple(rules)
  try:
    yield
  finally:
    _ACTIVATION.rules = old


def constrain_batch(x: jax.Array) -> jax.Array:
  """Tokens x [B, N, W] -> the same values, with axis 0 sharded as the logical 'batch' axis.

  Why: without it GSPMD propagates the fsdp split of the weights' ``embed`` axis into the activations
  and gathers the batch (ViT-B/16 at batch 32k on v5e:16x16 planned 49.7 GiB/chip of temporaries
  with remat=block; docs/scaling.md). A no-op (x returned) unless the caller entered
  ``activation_rules`` with rules that name 'batch', under a mesh context (``jax.set_mesh``); also
  when x is not [B, N, W] (a single example under ``vmap``) or B is not divisible by the batch's mesh
  axes (a constraint is a layout hint: the values never change).
  """
  rules = getattr(_ACTIVATION, "rules", None)
  if not rules or x.ndim != 3:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = nn.logical_to_mesh_axes(("batch", None, None), rules)
  axes = spec[0]
  if axes is None:
    return x
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  if any(a not in mesh.shape for a in names) or x.shape[0] % int(np.prod([mesh.shape[a] for a in names])):
    return x
  return jax.lax.with_sharding_constraint(x, spec)


def inference_layout(cfg: CLIPConfig, params: Any) -> tuple[CLIPConfig, Any]:
  """(config with remat / scan_layers / attention at their defaults, unrolled params)."""
  params = unstack_blocks(params) if cfg.scan_layers else params
  return cfg.replace(**SCALE_DEFAULTS), params
