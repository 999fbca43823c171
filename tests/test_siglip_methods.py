"""Every attribution method on a SigLIP model dir through ``explain`` (and the CLI): runs, gives maps in
[0, 1], the pair's score is SigLIP's sigmoid logit, and a property per method that fails if the
SigLIP path were wrong. LeGrad's parity with the authors' code: tests/test_legrad_siglip.py; M2IB and
MaskInversion: tests/test_siglip_m2ib.py, tests/test_siglip_maskinversion.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trace_jax.attribution import explain


@pytest.fixture(scope="module")
def md(tmp_path_factory):
  from trace_jax import model_dir
  from trace_jax.models import get_config, init_params
  cfg = get_config("siglip-tiny")
  params = init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  # randomise LayerNorm affines / biases so the pooling head is not near-uniform
  params = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32) if a.ndim <= 2 else a,
                        params)
  path = str(tmp_path_factory.mktemp("siglip") / "md")
  model_dir.save(path, params, cfg)
  return model_dir.load(path)


def _inputs():
  rng = np.random.default_rng(1)
  return (jnp.asarray(rng.standard_normal((1, 32, 32, 3)), jnp.float32),
          jnp.asarray(rng.integers(0, 1000, (3, 16)), jnp.int32))


def _cos(md, images, ids):
  from trace_jax.models import l2_normalize
  img, _ = md.model.apply({"params": md.params}, images, method="encode_image")
  txt, _ = md.model.apply({"params": md.params}, ids, method="encode_text")
  return np.asarray(l2_normalize(img) @ l2_normalize(txt).T)[0]


@pytest.mark.parametrize("method,kw", [("gradcam", {}), ("rollout", {}), ("chefer", {}), ("saliency", {}),
                                       ("rise", {"num_masks": 64, "key": jax.random.PRNGKey(0)}),
                                       ("legrad", {"correction": False})])
def test_every_method_runs_and_scores_with_the_sigmoid_logit(md, method, kw):
  images, ids = _inputs()
  out = explain(method, md.model, md.params, images, ids, **kw)
  m = np.asarray(out["map"])
  assert m.shape == (3, 32, 32) and np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 + 1e-6
  assert m.max() > 0.5  # not a constant (all-zero) map
  cos = _cos(md, images, ids)
  want = np.exp(float(md.params["logit_scale"])) * cos + float(md.params["logit_bias"])
  np.testing.assert_allclose(np.asarray(out["score"]), want, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["cosine"]), cos, atol=1e-5)


def test_gradcam_is_the_pooling_heads_grad_weighted_attention(md):
  """GradCAM on SigLIP = mean_h A_pool * relu(dS/dA_pool), checked with jax.grad of the model's own
  forward w.r.t. its MAP-head perturbation (independent of common.pair_grads)."""
  from trace_jax.models import l2_normalize, perturbation_zeros
  images, ids = _inputs()
  txt, _ = md.model.apply({"params": md.params}, ids, method="encode_text")
  t = l2_normalize(txt)
  zeros = perturbation_zeros(md.model, md.params, images, method="encode_image")

  def score(pert, p):
    emb, aux = md.model.apply({"params": md.params, "perturbations": pert}, images, method="encode_image")
    return jnp.sum(l2_normalize(emb)[0] * t[p]), aux
  raw = np.asarray(explain("gradcam", md.model, md.params, images, ids)["raw"])
  for p in range(3):
    g, aux = jax.grad(score, has_aux=True)(zeros, p)
    G = np.asarray(g["visual"]["map_head"]["attn"])[0, :, 0]       # [heads, N]
    A = np.asarray(aux["pool"]["attn"])[0, :, 0]
    np.testing.assert_allclose(raw[p].reshape(-1), np.mean(A * np.maximum(G, 0), 0), atol=1e-6)


def test_rollout_is_the_probe_row_through_the_blocks(md):
  images, ids = _inputs()
  raw = np.asarray(explain("rollout", md.model, md.params, images, ids)["raw"])[0].reshape(-1)
  _, aux = md.model.apply({"params": md.params}, images, method="encode_image")
  r = np.eye(16)
  for b in aux["blocks"]:
    a = np.asarray(b["attn"], np.float64)[0].mean(0) + np.eye(16)
    r = (a / a.sum(-1, keepdims=True)) @ r
  want = np.asarray(aux["pool"]["attn"], np.float64)[0].mean(0)[0] @ r
  np.testing.assert_allclose(raw, want, atol=1e-5)
  np.testing.assert_allclose(raw.sum(), 1.0, atol=1e-5)  # rows of every factor sum to 1


# M2IB and MaskInversion on SigLIP: tests/test_siglip_m2ib.py, tests/test_siglip_maskinversion.py
# (against the official loops on open_clip's SigLIP).
