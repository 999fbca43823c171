"""Small array helpers shared by every layer (models, attribution, inversion, losses, evaluation).

Imports nothing of trace_jax, so any layer may use it (../shared/design.md). Resizing lives next door
in ``trace_jax/resize.py``.

Min-max normalisation comes in three flavours in the authors' code; ``minmax`` offers each through a
parameter, so every caller keeps its exact numbers:

* ``eps > 0``: ``(x - min) / (max(x - min) + eps)`` (AMC's GradCAM, +1e-7: notes/amc-and-local-alignment.md
  §2; also the attribution maps of GradCAM / rollout / Chefer / saliency / RISE). A constant map gives 0,
  the result lies in [0, 1);
* ``min_range > 0``: ``(x - min) / maximum(max - min, min_range)`` (the TRACE patch-word maps);
* neither (default): ``(x - min) / (max - min)`` with a constant map giving 0 instead of the NaN of
  LeGrad's ``min_max`` (notes/legrad-maskinversion.md, LeGrad step 10) and M2IB's ``utils.normalize``
  (notes/m2ib.md §6).

``valid`` restricts min and max to the valid entries (M2IB's padded text); invalid entries read 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MINMAX_EPS = 1e-7  # AMC code: (cam - min) / (max(cam - min) + 1e-7), notes/amc-and-local-alignment.md §2


def minmax(x: jax.Array, valid: jax.Array | None = None, *, axis=(-2, -1), eps: float = 0.0,
           min_range: float = 0.0) -> jax.Array:
  """Min-max normalisation of ``x`` over ``axis`` (int or tuple), per remaining index; same shape as x.

  Args:
    x: [..] values (e.g. maps [P, H, W] with ``axis=(-2, -1)``, token rows [P, L] with ``axis=-1``).
    valid: optional bool mask broadcastable to x; min / max over valid entries only, invalid -> 0.
    eps: added to the range in the denominator (AMC: 1e-7); a constant map then gives 0.
    min_range: lower bound of the denominator (TRACE maps: 1e-12).
    With ``eps == min_range == 0`` the division is guarded: a constant map gives 0, not NaN.
  """
  if valid is None:
    lo = jnp.min(x, axis=axis, keepdims=True)
    d = x - lo
    rng = jnp.max(d, axis=axis, keepdims=True)  # = fl(max - min): rounding is monotone (tests/test_ops.py)
  else:
    lo = jnp.min(jnp.where(valid, x, jnp.inf), axis=axis, keepdims=True)
    d = x - lo
    rng = jnp.max(jnp.where(valid, d, -jnp.inf), axis=axis, keepdims=True)
  if eps:
    y = d / (rng + eps)
  elif min_range:
    y = d / jnp.maximum(rng, min_range)
  else:
    ok = rng > 0
    y = jnp.where(ok, d / jnp.where(ok, rng, 1.0), 0.0)
  return y if valid is None else jnp.where(valid, y, 0.0)
