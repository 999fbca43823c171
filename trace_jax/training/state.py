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


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled weight decay on matrices only) after global-norm clipping."""
  if optim.name != "adamw":
    raise ValueError(f"unknown optimiser {optim.name!r}; only 'adamw' is implemented")
  sched = make_schedule(optim, total_steps)
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(sched, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), sched


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


def abstract_with_shardings(init_params: Callable, tx, shardings, seed: int = 0):
  """Unboxed ShapeDtypeStructs carrying the target shardings: the restore target on this mesh."""
  abstract = nn.unbox(abstract_state(init_params, tx, seed))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
