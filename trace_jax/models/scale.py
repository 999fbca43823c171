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
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from trace_jax.models.config import SCALE_DEFAULTS, CLIPConfig

_BLOCK = re.compile(r"^block_(\d+)$")


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


def inference_layout(cfg: CLIPConfig, params: Any) -> tuple[CLIPConfig, Any]:
  """(config with remat / scan_layers / attention at their defaults, unrolled params)."""
  params = unstack_blocks(params) if cfg.scan_layers else params
  return cfg.replace(**SCALE_DEFAULTS), params
