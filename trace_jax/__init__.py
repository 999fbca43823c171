"""trace_jax: transparent text-region grounding in JAX/Flax."""
__version__ = "0.1.0"


def explain(*args, **kwargs):
  """``trace_jax.attribution.explain`` (lazy import keeps ``import trace_jax`` light)."""
  from trace_jax.attribution import explain as _explain
  return _explain(*args, **kwargs)
