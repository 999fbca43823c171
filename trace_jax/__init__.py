"""trace_jax: transparent text-region grounding in JAX/Flax."""
__version__ = "0.1.0"
