"""Train state, optimiser and schedule, and sharded initialisation.

Initialisation follows the flax partitioning recipe: ``jax.eval_shape`` of an init that returns
boxed (``nn.LogicallyPartitioned``) params and optax state (optax's ``tree_map`` keeps the boxes, so
Adam's moments inherit the params' logical axes) -> shardings from ``sharding.logical_shardings``
-> ``jax.jit(init, out_shardings=...)`` creates every array directly in its shard (no host copy of
the full model).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from trace_jax.training import sharding as shd


@struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of optimiser steps taken (= data position)
  params: Any              # {'clip': ..., ['text_compression': ...]} float32
  opt_state: Any
  rng: jax.Array           # uint32[2] raw PRNG key, split once per step


def make_schedule(optim, total_steps: int) -> optax.Schedule:
  """'warmup_cosine' (linear warm-up from 0 to lr, cosine to lr * min_lr_ratio) or 'constant'."""
  if optim.schedule == "warmup_cosine":
    warm = min(int(optim.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, warmup_steps=warm, decay_steps=max(total_steps, warm + 1),
        end_value=optim.lr * optim.min_lr_ratio)
  if optim.schedule == "constant":
    return optax.constant_schedule(optim.lr)
  raise ValueError(f"unknown schedule {optim.schedule!r}; expected 'warmup_cosine' or 'constant'")


def _decay_mask(params):
  # open_clip: no weight decay on gains, biases and logit scales (ndim < 2). tree.map descends
  # into logical-partitioning boxes, so the mask has the params' structure boxed or not.
  return jax.tree.map(lambda p: len(p.shape) >= 2, params)


def make_optimizer(optim, total_steps: int, trainable: Callable | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled weight decay on matrices only) after global-norm clipping.

  ``trainable`` (params -> tree of bools, ``Task.trainable``): the False leaves get zero updates and
  no optimiser state (a frozen tower costs no Adam moments and stays bit-identical)."""
  if optim.name != "adamw":
    raise ValueError(f"unknown optimiser {optim.name!r}; only 'adamw' is implemented")
  sched = make_schedule(optim, total_steps)
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(sched, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=_decay_mask))
  tx = optax.chain(*parts)
  if trainable is not None:
    tx = optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params)))
  return tx, sched


def _init_fn(init_params: Callable, tx: optax.GradientTransformation):
  def init(rng):
    p_rng, s_rng = jax.random.split(rng)
    params = init_params(p_rng)          # boxed
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=s_rng)
  return init


def abstract_state(init_params: Callable, tx, seed: int):
  """Boxed ShapeDtypeStruct tree of the state (no compute)."""
  return jax.eval_shape(_init_fn(init_params, tx), jax.random.PRNGKey(seed))


def state_shardings(init_params: Callable, tx, mesh, seed: int = 0):
  return shd.logical_shardings(abstract_state(init_params, tx, seed), mesh)


def create_state(init_params: Callable, tx, mesh, seed: int,
                 compiler_options: dict | None = None) -> tuple[TrainState, Any]:
  """(state with every array already sharded, the state's sharding tree)."""
  shardings = state_shardings(init_params, tx, mesh, seed)
  init = _init_fn(init_params, tx)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings,
                    compiler_options=compiler_options)(jax.random.PRNGKey(seed))
  return state, shardings


def place_pretrained(params, pretrained: dict | None):
  """``params`` (sharded) with the subtrees of ``pretrained`` (NumPy trees, ``Task.pretrained``)
  put in their place, each array created directly in its shards (every host reads only its slices).
  A tree that does not fit is a ValueError naming the missing, unexpected and mis-shaped keys."""
  if not pretrained:
    return params
  from trace_jax.treecheck import check_shapes, flatten, shapes_of
  out = dict(params)
  for name, tree in pretrained.items():
    if name not in params:
      raise ValueError(f"init_from: the model dir has {name!r} parameters the objective does not use")
    check_shapes(shapes_of(flatten(params[name])), shapes_of(flatten(tree)),
                 f"init_from: the model dir's {name!r} parameters do not fit the model:")
    out[name] = jax.tree.map(
        lambda cur, new: jax.make_array_from_callback(
            cur.shape, cur.sharding, lambda idx, new=new, dt=cur.dtype: np.asarray(new[idx], dt)),
        params[name], tree)
  return out


def abstract_with_shardings(init_params: Callable, tx, shardings, seed: int = 0):
  """Unboxed ShapeDtypeStructs carrying the target shardings: the restore target on this mesh."""
  abstract = nn.unbox(abstract_state(init_params, tx, seed))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
