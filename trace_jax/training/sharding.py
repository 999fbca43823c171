"""THE mapping from logical axis names to mesh axes (the only place that knows it).

Model parameters carry logical names through ``nn.with_logical_partitioning`` (trace_jax/models/
layers.py): ``embed`` (model width), ``mlp`` (MLP hidden), ``heads``, ``kv`` (head dim), ``vocab``.
FSDP: ``embed`` is split over 'fsdp' (every large matrix has one embed axis); 'tensor' splits the
MLP hidden, heads and vocabulary axes when it is > 1 (Megatron-style). Activations' batch axis is
split over ('data', 'fsdp'): the batch of the jitted step's arguments (``batch_sharding``) and, inside
the model, the tokens at every block boundary (``models/scale.constrain_batch`` reads the 'batch'
rule while ``activation_rules`` is entered, as the train step does).

A dimension not divisible by its mesh axes is replicated instead (e.g. a width-3 axis on fsdp=4),
and a mesh axis is used at most once per array.
"""
from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from trace_jax.models import scale as model_scale

BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),   # the stacked-blocks axis of model.scan_layers (models/layers.Transformer)
)


def _axes_size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([mesh.shape[a] for a in axes]))


def _fit(spec: P, shape: tuple[int, ...], mesh) -> P:
  """Drop mesh axes that do not divide their dimension or repeat an earlier one."""
  used: set[str] = set()
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    if not names or any(a in used for a in names) or dim % _axes_size(mesh, names):
      out.append(None)
      continue
    used.update(names)
    out.append(axes)
  return P(*out)


def logical_shardings(abstract_boxed: Any, mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """Tree of ``NamedSharding`` for a tree whose leaves may be ``nn.LogicallyPartitioned`` boxes
  (e.g. ``jax.eval_shape`` of an init that returns boxed params and optax state).

  Each box's logical axis names -> mesh axes by the rules (``nn.logical_to_mesh_axes``), fitted to its
  array's shape (``_fit``). Unboxed leaves are replicated. The result has the structure of
  ``nn.unbox(abstract_boxed)``; a box around a leaf-less node (optax's ``MaskedNode`` standing for a
  frozen leaf's Adam moment) stays that node.
  """
  def one(x):
    if isinstance(x, nn.Partitioned) and not jax.tree.leaves(x.value):
      return x.value       # a box around a leaf-less node (optax masks a frozen leaf's moments so)
    if isinstance(x, nn.LogicallyPartitioned):
      spec, shape = nn.logical_to_mesh_axes(x.names, list(rules)), x.value.shape
    elif isinstance(x, nn.Partitioned):
      spec, shape = P(*x.names), x.value.shape
    else:
      spec, shape = P(), x.shape
    return NamedSharding(mesh, _fit(spec, tuple(shape), mesh))
  return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@contextlib.contextmanager
def activation_rules(mesh=None):
  """Trace a model under the rule table: its activation constraints (``models/scale.constrain_batch``)
  then pin the batch axis to ('data', 'fsdp'). ``mesh``: used when no mesh context is set (a jitted
  step traced outside ``jax.set_mesh``); without either the constraints stay no-ops."""
  with model_scale.activation_rules(LOGICAL_AXIS_RULES):
    if mesh is not None and jax.sharding.get_abstract_mesh().empty:
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield
    else:
      yield


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(global_batch: int, mesh) -> None:
  n = _axes_size(mesh, BATCH_AXES)
  if global_batch % n:
    raise ValueError(f"global batch size {global_batch} is not divisible by data x fsdp = {n} devices")
  if global_batch % jax.process_count():
    raise ValueError(f"global batch size {global_batch} is not divisible by {jax.process_count()} processes")


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Process-local numpy batch (this host's slice of the global batch) -> global sharded arrays.

  Each process passes its own ``global_batch / process_count`` rows; ``jax.make_array_from_process_local_data``
  assembles the global array (single host: the whole batch).
  """
  sh = batch_sharding(mesh)
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    gshape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sh, v, gshape)
  return out
