"""Losses against float64 NumPy references written from the papers / notes, and gradient checks.

AMC: notes/amc-and-local-alignment.md §2 (min-max + 1e-7, bilinear align_corners=False) and §5
(L_mean pooled over the batch, L_max per sample); local alignment: notes §8.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trace_jax.losses.amc import amc_loss, amc_margin_losses, upsample_bilinear
from trace_jax.losses.contrastive import clip_contrastive_loss
from trace_jax.losses.local_alignment import local_alignment_loss


def _np_clip_loss(i, t, log_scale):
  i = i / np.linalg.norm(i, axis=1, keepdims=True)
  t = t / np.linalg.norm(t, axis=1, keepdims=True)
  logits = math.exp(min(max(log_scale, 0.0), math.log(100))) * i @ t.T
  def ce(l):  # rows: softmax over columns, target = diagonal
    l = l - l.max(1, keepdims=True)
    return np.mean(np.log(np.exp(l).sum(1)) - np.diag(l))
  return 0.5 * (ce(logits) + ce(logits.T))


@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), 2.0, 7.0])
def test_contrastive_matches_numpy(rng, log_scale):
  i, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  got = clip_contrastive_loss(jnp.asarray(i, jnp.float32), jnp.asarray(t, jnp.float32), log_scale)
  np.testing.assert_allclose(float(got), _np_clip_loss(i, t, log_scale), rtol=1e-5)


def test_local_loss_matches_numpy(rng):
  p, s = rng.normal(size=(5, 4, 3)), rng.normal(size=(5, 4, 3))  # B=5, M=4 slots, E=3
  want = np.mean([_np_clip_loss(p[:, k], s[:, k], 2.5) for k in range(4)])
  got = local_alignment_loss(jnp.asarray(p, jnp.float32), jnp.asarray(s, jnp.float32), 2.5)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Slot i of image b is only compared with slot i of the texts: permuting slots jointly is invariant,
  # permuting only the text slots is not.
  perm = np.array([2, 0, 3, 1])
  got2 = local_alignment_loss(jnp.asarray(p[:, perm], jnp.float32), jnp.asarray(s[:, perm], jnp.float32), 2.5)
  np.testing.assert_allclose(float(got2), want, rtol=1e-5)
  got3 = local_alignment_loss(jnp.asarray(p, jnp.float32), jnp.asarray(s[:, perm], jnp.float32), 2.5)
  assert abs(float(got3) - want) > 1e-3


def _np_bilinear(x, out):
  """torch F.interpolate(bilinear, align_corners=False), per output pixel, float64."""
  h, w = x.shape
  y = np.zeros((out, out))
  for o in range(out):
    for q in range(out):
      sy = max((o + 0.5) * h / out - 0.5, 0.0)
      sx = max((q + 0.5) * w / out - 0.5, 0.0)
      y0, x0 = min(int(sy), h - 1), min(int(sx), w - 1)
      y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
      ly, lx = sy - y0, sx - x0
      y[o, q] = ((1 - ly) * ((1 - lx) * x[y0, x0] + lx * x[y0, x1]) + ly * ((1 - lx) * x[y1, x0] + lx * x[y1, x1]))
  return y


def _np_amc(cam, masks, ind, d1=0.1, d2=0.5, pooling="batch"):
  sel = [b for b in range(len(cam)) if ind[b] > 0]
  A = []
  for b in sel:
    c = cam[b] - cam[b].min()
    c = c / (c.max() + 1e-7)
    A.append(_np_bilinear(c, masks.shape[-1]))
  A, M = np.array(A), masks[sel]
  if pooling == "batch":
    l_mean = max(0.0, (A * (1 - M)).sum() / (1 - M).sum() - (A * M).sum() / M.sum() + d1)
  else:
    l_mean = np.mean([max(0.0, (a * (1 - m)).sum() / (1 - m).sum() - (a * m).sum() / m.sum() + d1)
                      for a, m in zip(A, M)])
  l_max = np.mean([max(0.0, (a * (1 - m)).max() - (a * m).max() + d2) for a, m in zip(A, M)])
  return l_mean, l_max


def test_amc_tiny_case_hand_computed():
  # 3 samples, 2x2 cam grid, 4x4 masks; sample 1 carries no mask (indicator 0) and must not count.
  cam = np.array([[[0.0, 1.0], [2.0, 3.0]],
                  [[5.0, 5.0], [5.0, 9.0]],
                  [[4.0, 0.5], [0.0, 1.0]]])
  masks = np.zeros((3, 4, 4))
  masks[0, 2:, 2:] = 1          # the region where sample 0's cam is largest
  masks[1, :2, :] = 1
  masks[2, 2:, :2] = 1          # sample 2's cam is small there: large margins
  ind = np.array([1.0, 0.0, 1.0])
  # Worked by hand for sample 0: min-max -> [[0, 1/3], [2/3, 1]] (eps 1e-7 negligible here);
  # bilinear 2->4 rows/cols use weights (1, 0), (.75, .25), (.25, .75), (0, 1).
  a0 = _np_bilinear(np.array([[0, 1 / 3], [2 / 3, 1]]), 4)
  np.testing.assert_allclose(a0[0], [0, 1 / 12, 3 / 12, 1 / 3], atol=1e-12)
  for pooling in ("batch", "sample"):
    want = _np_amc(cam, masks, ind, pooling=pooling)
    got = amc_margin_losses(jnp.asarray(cam, jnp.float32), jnp.asarray(masks, jnp.float32),
                            jnp.asarray(ind, jnp.float32), mean_pooling=pooling)
    np.testing.assert_allclose([float(g) for g in got], want, rtol=1e-5, atol=1e-6)
  # The two poolings differ on this case (the code pools over the batch, the paper per sample).
  assert abs(_np_amc(cam, masks, ind, pooling="batch")[0] - _np_amc(cam, masks, ind, pooling="sample")[0]) > 1e-3
  # No sample with a mask -> zero loss, no NaN.
  z = amc_margin_losses(jnp.asarray(cam, jnp.float32), jnp.asarray(masks, jnp.float32), jnp.zeros(3))
  assert [float(v) for v in z] == [0.0, 0.0]


def test_upsample_matches_torch():
  from conftest import torch_or_skip
  torch = torch_or_skip()
  x = np.random.default_rng(1).normal(size=(2, 3, 5))
  want = torch.nn.functional.interpolate(torch.tensor(x)[:, None], size=(12, 16), mode="bilinear",
                                         align_corners=False)[:, 0].numpy()
  got = upsample_bilinear(jnp.asarray(x, jnp.float32), (12, 16))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_amc_margin_gradient_finite_differences():
  r = np.random.default_rng(2)
  cam = r.random((3, 3, 3))
  masks = np.zeros((3, 6, 6))
  masks[0, :3, :3] = masks[1, 2:, 1:5] = masks[2, 3:, 3:] = 1
  ind = np.array([1.0, 1.0, 1.0])
  with jax.enable_x64(True):
    f = lambda c: sum(w * l for w, l in zip((0.2, 0.8), amc_margin_losses(c, jnp.asarray(masks),
                                                                             jnp.asarray(ind))))
    g = np.asarray(jax.grad(f)(jnp.asarray(cam)))
    eps = 1e-6
    fd = np.zeros_like(cam)
    for idx in np.ndindex(cam.shape):
      e = np.zeros_like(cam)
      e[idx] = eps
      fd[idx] = (float(f(jnp.asarray(cam + e))) - float(f(jnp.asarray(cam - e)))) / (2 * eps)
  assert np.abs(g).max() > 1e-3
  np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-7)


def test_amc_loss_second_order_gradient_finite_differences():
  """d L_amc / d params through the GradCAM's inner gradient (second order) vs central differences
  (float32 model, tolerance 1%)."""
  from trace_jax.models import build, get_config, init_params
  cfg = get_config("tiny")
  import dataclasses
  cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, layers=1), text=dataclasses.replace(cfg.text, layers=1))
  model = build(cfg)
  params = init_params(cfg, jax.random.PRNGKey(0))
  r = np.random.default_rng(3)
  images = jnp.asarray(r.normal(size=(3, 32, 32, 3)), jnp.float32)
  ids = np.zeros((3, 8), np.int32)
  ids[:, :5] = r.integers(1, 998, (3, 5))
  ids[:, 5] = 999
  masks = np.zeros((3, 32, 32), np.float32)
  masks[0, :16, :16] = masks[1, 8:24, 8:] = masks[2, 16:, :20] = 1
  ind = jnp.ones(3)

  def loss(p):
    return amc_loss(model, p, images, jnp.asarray(ids), jnp.asarray(masks), ind, layer=0)[0]

  g = jax.jit(jax.grad(loss))(params)
  # Central differences along the unit gradient direction d = g/|g|: the slope must equal |g|.
  # (The map is strongly curved along parameter directions: eps must be small; at eps = 1e-4 the
  # float32 rounding of the difference is ~1e-3 of the slope.)
  norm = float(jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(g))))
  lf = jax.jit(lambda t: loss(jax.tree.map(lambda p, x: p + t * x / norm, params, g)))
  eps = 1e-4
  fd = (float(lf(eps)) - float(lf(-eps))) / (2 * eps)
  assert norm > 1e-2
  np.testing.assert_allclose(fd, norm, rtol=1e-2)
  # The map's own gradient matters: with the GradCAM held fixed (stop_gradient through the map),
  # the parameter gradient is zero, so everything above is the second-order path.
  from trace_jax.attribution.gradcam import gradcam_grid
  frozen = lambda p: amc_loss(model, p, images, jnp.asarray(ids), jnp.asarray(masks), ind, layer=0,
                              cam_fn=lambda *a, **k: jax.lax.stop_gradient(gradcam_grid(*a, **k)))[0]
  g0 = jax.grad(frozen)(params)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) == 0.0
