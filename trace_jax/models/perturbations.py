"""Gradients with respect to attention probabilities and block outputs.

Every block calls ``self.perturb('attn', probs)`` and ``self.perturb('tokens', x)``. Passing a
``'perturbations'`` collection of zeros adds x + 0 = x to those intermediates (tests/test_model.py:
with zero perturbations the score equals the float64 NumPy reference forward to 1e-5) but
makes those intermediates inputs of the function, so ``jax.grad`` / ``jax.vjp`` w.r.t. the
perturbation equals the gradient w.r.t. the intermediate itself. It works under ``jit`` and
``vmap``. Without the collection ``perturb`` is the identity.

    zeros = perturbation_zeros(model, params, images, method='encode_image')
    def score(perts):
      emb, aux = model.apply({'params': params, 'perturbations': perts}, images, method='encode_image')
      return emb @ text
    g = jax.grad(score)(zeros)   # g['visual']['transformer']['block_3']['attn']['attn'] ~ dscore/dA_3
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def perturbation_zeros(model, params, *args, method=None, **kwargs):
  """Zeros with the shapes of every perturbed intermediate for these inputs (no compute)."""
  def f(p):
    _, state = model.apply({"params": p}, *args, method=method, mutable=["perturbations"], **kwargs)
    return state["perturbations"]
  shapes = jax.eval_shape(f, params)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def block_path(tower: str, i: int) -> tuple[str, ...]:
  """Path of block i of ``tower`` ('visual' or 'text') inside params / perturbations of CLIP."""
  return (tower, "transformer", f"block_{i}")


def get_path(tree, path):
  for k in path:
    tree = tree[k]
  return tree
