"""Training objectives, each a pure function of arrays (and, for AMC, of a model and its params).

* ``contrastive``: symmetric CLIP InfoNCE with a learnable temperature;
* ``amc``: Attention Mask Consistency margins on GradCAM maps (second order);
* ``local_alignment``: patch-wise InfoNCE against register-token text slots.
"""
from trace_jax.losses.amc import amc_loss, amc_margin_losses
from trace_jax.losses.contrastive import clip_contrastive_loss, clip_logits
from trace_jax.losses.local_alignment import local_alignment_loss, local_alignment_total

__all__ = ["amc_loss", "amc_margin_losses", "clip_contrastive_loss", "clip_logits",
           "local_alignment_loss", "local_alignment_total"]
