"""Gradient accumulation (``config.train.microbatches``): one optimiser step from M microbatches.

    (loss, metrics), grads = value_and_grad(loss_fn, params, batch, rng, microbatches=M, mesh=mesh)

The global batch [B, ...] is cut into M microbatches of B/M rows and ``lax.scan`` runs the forward +
backward of one microbatch at a time, summing gradients, losses and metrics, then dividing by M:
activation memory is that of B/M rows; the parameters, gradients and optimiser state are unchanged.

Microbatch j holds rows j, M + j, 2M + j, ... (a reshape [B/M, M] + transpose, not [M, B/M]): with the
batch split contiguously over the ('data', 'fsdp') devices, every device then holds its own B/(M·D)
rows of every microbatch, so the split moves no data and every microbatch uses every device.

What it equals: for a loss that is a mean over all B rows of per-row terms, the mean of the M
microbatch losses and gradients IS the full-batch loss and gradient (tests/test_scale.py, to float32
rounding). A loss whose terms couple the rows of a batch is NOT: the CLIP contrastive loss of a
microbatch has B/M - 1 negatives per row instead of B - 1; AMC's margins divide by the rows (or
pixels) that carry a region in the microbatch, equal to the batch's only when every microbatch has
the same count. Accumulation then trains on the mean of the M smaller-batch losses (the same
as M steps' worth of gradient at B/M, applied once), not the big-batch contrastive loss; getting the
full-batch contrastive gradient under a memory limit needs a cached-embedding scheme (GradCache,
Gao et al. 2021), not provided here. docs/scaling.md says this too.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from trace_jax.training import sharding as shd


def check_microbatches(global_batch: int, microbatches: int, mesh) -> None:
  """A config error (before any work): M must divide the batch into per-device-divisible parts."""
  m = int(microbatches)
  if m < 1:
    raise ValueError(f"train.microbatches must be >= 1; got {microbatches}")
  n = int(mesh.shape["data"] * mesh.shape["fsdp"])
  if global_batch % (m * n):
    raise ValueError(f"train.microbatches={m}: the global batch {global_batch} must be divisible by "
                     f"microbatches x data x fsdp = {m} x {n}")


def split(batch: dict, microbatches: int, mesh=None) -> dict:
  """[B, ...] leaves -> [M, B/M, ...]; microbatch j = rows j, M + j, ... (see the module doc)."""
  m = int(microbatches)

  def one(x):
    b = x.shape[0]
    if b % m:
      raise ValueError(f"batch of {b} rows does not split into {m} microbatches")
    y = jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)
    if mesh is not None:
      y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, shd.BATCH_AXES)))
    return y
  return jax.tree.map(one, batch)


def value_and_grad(loss_fn: Callable, params, batch: dict, rng, *, microbatches: int = 1, mesh=None):
  """``jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)``, accumulated over
  ``microbatches`` (1: exactly the plain call). Microbatch j gets ``fold_in(rng, j)``."""
  vg = jax.value_and_grad(loss_fn, has_aux=True)
  if int(microbatches) == 1:
    return vg(params, batch, rng)
  m = int(microbatches)
  micro = split(batch, m, mesh)
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(vg, params, first, rng))

  def body(acc, xs):
    mb, j = xs
    out = vg(params, mb, jax.random.fold_in(rng, j))
    return jax.tree.map(jnp.add, acc, out), None

  total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(m)))
  return jax.tree.map(lambda t: t / m, total)
