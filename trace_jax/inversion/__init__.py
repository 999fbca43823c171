"""MaskInversion: localized embedding tokens (LETs) for masks (maskinversion.md §3).

    from trace_jax.inversion import invert
    out = invert(model, params, image, masks)   # {'lets' [K, E], 'map' [K, Hm, Wm], 'losses', ...}
"""
from trace_jax.inversion.maskinversion import bucket_size, choose_mode, invert, rasterize_boxes

__all__ = ["invert", "bucket_size", "choose_mode", "rasterize_boxes"]
