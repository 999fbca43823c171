"""Each tower kind gets the pixels it was trained on: CLIP's mean / std, SigLIP's [-1, 1] (open_clip
2.23.0's ViT-*-SigLIP preprocess cfg uses its INCEPTION_MEAN / INCEPTION_STD), in the CLI loaders and
in the serve page's engine."""
import types

import numpy as np

from conftest import require_peer
from trace_jax.data import preprocess


def test_siglip_and_clip_normalisation_against_open_clip(rng):
  oc = require_peer("open_clip.constants", "open_clip_torch")
  px = rng.random((2, 5, 5, 3)).astype(np.float32)
  for kind, mean, std in (("siglip", oc.INCEPTION_MEAN, oc.INCEPTION_STD),
                          ("vit", oc.OPENAI_DATASET_MEAN, oc.OPENAI_DATASET_STD),
                          ("crate", oc.OPENAI_DATASET_MEAN, oc.OPENAI_DATASET_STD)):
    want = (px.astype(np.float64) - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(preprocess.normalize_unit(px, kind), want, atol=1e-6)


def test_serve_engine_feeds_siglip_its_own_pixels(rng):
  from trace_jax.serve.engine import Engine
  rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  fake = lambda kind: types.SimpleNamespace(size=8, cfg=types.SimpleNamespace(vision=types.SimpleNamespace(kind=kind)))
  np.testing.assert_allclose(Engine.model_input(fake("siglip"), rgb)[0], rgb / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_allclose(Engine.model_input(fake("vit"), rgb)[0], preprocess.normalize(rgb), atol=0)
