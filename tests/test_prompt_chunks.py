"""Prompt chunks of one image reuse ONE image forward for GradCAM, rollout, Chefer and saliency
(issue 19; inference/explain.py ``method_programs``), on a CLIP and a SigLIP tower.

Reference: the all-at-once ``explain(method, ...)`` of the same library (itself checked against the
peers in test_attribution_methods.py / test_siglip_methods.py). Each test would fail if the split
were wrong: a chunk that dropped or re-ordered a prompt, a state that held the wrong attention row
or pullback, or a chunk program that re-ran the image tower (poisoning every image-tower parameter
given to the chunk program changes nothing, while it does poison ``prepare``).
Tolerance: maps and grids 1e-5 absolute (maps are in [0, 1]; the same float32 ops, only the jit
boundary differs), scores 1e-5 relative.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import counted_pair

from trace_jax.models import build, get_config, init_params

METHODS = [("gradcam", {}), ("rollout", dict(text=True)), ("chefer", dict(text=True)),
           ("saliency", {}), ("rollout", dict(head_fusion="max", start_layer=1)),
           ("chefer", dict(start_layer=-1, target="logit"))]


def _model(name: str):
  cfg = get_config(name)
  params = init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  # random LayerNorm affines / biases: a near-uniform attention would hide a wrong row
  params = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32) if a.ndim <= 2 else a,
                        params)
  return cfg, params, build(cfg)


@pytest.fixture(scope="module", params=["tiny", "siglip-tiny"])
def tower(request):
  return _model(request.param)


def _inputs(seed: int, p: int = 11):
  rng = np.random.default_rng(seed)
  img = rng.standard_normal((32, 32, 3)).astype(np.float32)
  ids = rng.integers(1, 900, (p, 16)).astype(np.int32)
  ids[:, 0], ids[:, 7:] = 1, 0
  ids[:, 6] = 999  # EOT (argmax pooling on CLIP)
  return img, ids


def _check(got, ref, tag):
  assert set(got) == set(ref), (tag, set(got) ^ set(ref))
  for k in ref:
    if k == "score" or k == "cosine":
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{tag} {k}")
    else:
      np.testing.assert_allclose(got[k], ref[k], atol=1e-5 * max(1.0, np.abs(ref[k]).max()), err_msg=f"{tag} {k}")


@pytest.mark.parametrize("method,kw", METHODS)
def test_chunks_equal_one_call_and_run_the_image_tower_once(tower, method, kw, monkeypatch):
  """11 prompts in chunks of 4 (3 calls, the last padded): ONE prepare call and 3 chunk calls, equal
  to the all-at-once explain(); chunks of 8 split over the 8 devices equal it too."""
  from trace_jax.attribution.api import explain
  from trace_jax.inference import explain as ie
  cfg, params, model = tower
  img, ids = _inputs(21)
  ref = {k: np.asarray(v) for k, v in explain(method, model, params, img[None], ids, **kw).items()}
  progs = ie.programs(method, model, kw)
  assert progs is not None, "a split method must take the one-forward path"
  prepare, chunk = progs
  calls, *wrapped = counted_pair(prepare, chunk)
  monkeypatch.setattr(ie, "programs", lambda *a: tuple(wrapped))
  got = ie.explain_prompts(method, model, params, img, ids, max_prompts=4, **kw)
  assert calls == {"prepare": 1, "chunk": 3}
  _check(got, ref, f"{method} {kw} chunks of 4")
  monkeypatch.undo()
  got = ie.explain_prompts(method, model, params, img, ids, max_prompts=8, devices="all", **kw)
  _check(got, ref, f"{method} {kw} 8 devices")


@pytest.mark.parametrize("method,kw", METHODS[:4])
def test_chunk_program_reads_no_image_tower(tower, method, kw):
  """The chunk program's output does not depend on any image-tower parameter (all NaN: identical
  output), while the prepare program's does: the image forward is in the state, not re-run."""
  from trace_jax.inference import explain as ie
  cfg, params, model = tower
  img, ids = _inputs(22, p=4)
  prepare, chunk = ie.programs(method, model, kw)
  bad = {**params, "visual": jax.tree.map(lambda x: np.full_like(x, np.nan), params["visual"])}
  state = prepare(params, img)
  a, b = chunk(params, state, ids, (32, 32)), chunk(bad, state, ids, (32, 32))
  for k in a:
    np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
  assert not np.isfinite(np.asarray(prepare(bad, img)["emb"])).any()


def test_array_settings_and_unknown_settings():
  """RISE (its forwards are of the masked images) takes the per-chunk path (``programs`` is None); a
  setting neither part of a split method takes is the TypeError explain's own would be."""
  from trace_jax.inference import explain as ie
  cfg, params, model = _model("tiny")
  assert ie.programs("rise", model, {}) is None
  with pytest.raises(TypeError, match="unexpected settings.*bogus"):
    ie.programs("gradcam", model, {"bogus": 1})
