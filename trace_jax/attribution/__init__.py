"""Attribution maps for CLIP-style models: one module per method, one ``explain`` API.

    from trace_jax.attribution import explain
    out = explain('gradcam', model, params, images, ids)   # {'grid', 'map', 'score', ...}

Methods: legrad, gradcam, rollout, chefer, saliency, rise, m2ib (modules are imported lazily).
"""
from trace_jax.attribution.api import METHODS, explain, explain_fn

__all__ = ["METHODS", "explain", "explain_fn"]
