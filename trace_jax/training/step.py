"""The jitted, sharded train step of any objective (a ``trace_jax.objectives.Task``'s ``loss_fn``).

Batch: the canonical keys of ``trace_jax.objectives.base.BATCH_KEYS`` (leading axis = batch).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from trace_jax.models.clip import MAX_LOG_SCALE
from trace_jax.training import accumulate
from trace_jax.training import sharding as shd
from trace_jax.training.state import TrainState


def clamp_log_scales(params):
  """CLIP: keep every learnable log-temperature in [0, ln 100] after the update (open_clip clamp)."""
  out = dict(params)
  for k in out:
    if isinstance(out[k], dict) and "logit_scale" in out[k]:
      out[k] = {**out[k], "logit_scale": jnp.clip(out[k]["logit_scale"], 0.0, MAX_LOG_SCALE)}
  return out


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    trainable: Callable | None = None, *, microbatches: int = 1, mesh=None):
  """(state, batch) -> (state, metrics); pure, to be jitted. Differentiates through AMC's inner
  gradient (second order) like any other function.

  ``trainable`` (``Task.trainable``): frozen leaves enter the loss through ``stop_gradient``, so
  their gradients are symbolic zeros that XLA never computes (no weight gradients of a frozen tower,
  and no backward pass through it at all when nothing below it trains); ``tx`` leaves them fixed."""
  def objective(params, batch, rng):
    if trainable is not None:
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable(params))
    return loss_fn(params, batch, rng)

  def train_step(state: TrainState, batch: dict):
    rng, sub = jax.random.split(state.rng)
    # microbatches > 1: gradient accumulation under lax.scan (training/accumulate.py; 1 = the plain call);
    # activation_rules: the model's block-boundary tokens stay split over the batch (sharding.py)
    with shd.activation_rules(mesh):
      (loss, metrics), grads = accumulate.value_and_grad(objective, state.params, batch, sub,
                                                         microbatches=microbatches, mesh=mesh)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = clamp_log_scales(optax.apply_updates(state.params, updates))
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
               "logit_scale": jnp.exp(params["clip"]["logit_scale"])}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics
  return train_step


def jit_train_step(train_step: Callable, state_shardings, mesh, compiler_options: dict | None = None):
  """``jax.jit`` with the state sharded by the logical rules and the batch over ('data', 'fsdp');
  metrics come back replicated. The old state's buffers are donated. ``compiler_options`` go to
  XLA (tests pass ``{'xla_backend_optimization_level': 0}`` to halve CPU compile time)."""
  return jax.jit(train_step, in_shardings=(state_shardings, shd.batch_sharding(mesh)),
                 out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,),
                 compiler_options=compiler_options)
