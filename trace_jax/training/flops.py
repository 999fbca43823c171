"""Matmul FLOPs of a program, counted from its jaxpr (no compile, no XLA cost model).

    flops = count(jax.make_jaxpr(fn)(*abstract_args))     # global FLOPs of one call

Every ``dot_general`` counts 2 x batch x contracted x lhs-free x rhs-free and every
``conv_general_dilated`` 2 x output elements x kernel window x input features per group (a multiply
and an add per term), summed over the whole jaxpr: a ``scan`` body times its length, the larger
branch of a ``cond``, every nested jaxpr (``pjit``, ``remat``, ``custom_jvp`` / ``custom_vjp``
calls; a ``shard_map`` body times the devices it runs on). Element-wise work (softmax, norms, the optimiser) is not counted: this is the
FLOP count MFU is defined over (PaLM, Chowdhery et al. 2022, appendix B: matmuls, attention included).

Why not XLA's ``cost_analysis``: for the same step it gave 10.61 TFLOP/chip with block remat and
11.93 without (a recompute cannot lower the count), 4.74 with the ``dots`` policy, and it counts a
``while`` body once; a jaxpr count is exact for what the program asks for and testable against the
closed-form counts (tests/test_flops.py). ``training/plan.py`` reports two counts:

  model FLOPs      the step with remat off: the work the step needs (the MFU numerator)
  hardware FLOPs   the step as planned: remat's recomputed forward included (the compute time)

A ``while`` loop (unknown trip count) is refused rather than counted once.
"""
from __future__ import annotations

import math

import jax
import jax.extend.core  # noqa: F401  (Jaxpr, ClosedJaxpr)


def _dot_general(eqn) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  batch = math.prod(lhs[d] for d in lb)
  contracted = math.prod(lhs[d] for d in lc)
  lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
  rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
  return 2.0 * batch * contracted * lhs_free * rhs_free


def _conv(eqn) -> float:
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  # rhs_spec = (out feature dim, in feature dim, spatial dims...) in the kernel's layout
  rhs_spec = dn.rhs_spec
  window = math.prod(rhs[d] for d in rhs_spec[2:])
  in_per_group = rhs[rhs_spec[1]]          # the kernel's input-feature extent is already per group
  return 2.0 * math.prod(out) * window * in_per_group


def _jaxprs(value):
  """The jaxprs inside one eqn parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _jaxprs(v)


def count_jaxpr(jaxpr) -> float:
  """Matmul + convolution FLOPs of a (closed) jaxpr, nested jaxprs included (see the module doc)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general(eqn)
    elif name == "conv_general_dilated":
      total += _conv(eqn)
    elif name == "while":
      raise ValueError("flops.count: a while loop's trip count is unknown to a jaxpr count; plan the "
                       "step with its loops as scans (or unrolled)")
    elif name == "scan":
      total += eqn.params["length"] * count_jaxpr(eqn.params["jaxpr"])
    elif name == "shard_map":   # the body is one device's program on its local shapes: x devices
      mesh, axes = eqn.params["mesh"], eqn.params.get("newly_manual_axes", eqn.params.get("manual_axes"))
      axes = mesh.axis_names if axes is None else axes
      total += math.prod(mesh.shape[a] for a in axes) * count_jaxpr(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(count_jaxpr(b) for b in eqn.params["branches"])
    else:
      for v in eqn.params.values():
        for sub in _jaxprs(v):
          total += count_jaxpr(sub)
  return total


def count(fn, *args, **kwargs) -> float:
  """Global matmul FLOPs of one call ``fn(*args)``; args may be ``jax.ShapeDtypeStruct``s (traced, not run)."""
  return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))
