"""The one copy of the small array helpers (trace_jax/ops.py ``minmax``, trace_jax/resize.py) keeps the
numbers of each former copy: the min-max forms are bit-identical to the formulas they replaced
(written out below), the torch-exact bilinear upsampling equals ``jax.image.resize('linear')`` to
float32 rounding (atol 1e-6)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from trace_jax import ops, resize


def test_minmax_forms_are_bit_identical_to_the_former_copies():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 6)) * 10 ** rng.uniform(-3, 3, size=(3, 1, 1)), jnp.float32)
  x = x.at[1].set(2.5)  # one constant map
  # AMC / attribution.common: (x - min) / (max(x - min) + 1e-7)
  lo = jnp.min(x, axis=(-2, -1), keepdims=True)
  d = x - lo
  np.testing.assert_array_equal(ops.minmax(x, eps=ops.MINMAX_EPS),
                                d / (jnp.max(d, axis=(-2, -1), keepdims=True) + 1e-7))
  # LeGrad: guarded (x - min) / (max - min), constant -> 0
  rng_ = jnp.max(x, axis=(-2, -1), keepdims=True) - lo
  ok = rng_ > 0
  np.testing.assert_array_equal(ops.minmax(x), jnp.where(ok, (x - lo) / jnp.where(ok, rng_, 1.0), 0.0))
  assert float(jnp.abs(ops.minmax(x)[1]).max()) == 0.0
  # TRACE maps: (x - min) / maximum(max - min, 1e-12), along the last axis
  lo1, hi1 = jnp.min(x, -1, keepdims=True), jnp.max(x, -1, keepdims=True)
  np.testing.assert_array_equal(ops.minmax(x, axis=-1, min_range=1e-12),
                                (x - lo1) / jnp.maximum(hi1 - lo1, 1e-12))
  # M2IB: guarded, min / max over the valid entries only, invalid -> 0
  valid = jnp.asarray(rng.random((3, 5, 6)) > 0.3)
  lo2 = jnp.min(jnp.where(valid, x, jnp.inf), -1, keepdims=True)
  hi2 = jnp.max(jnp.where(valid, x, -jnp.inf), -1, keepdims=True)
  ok2 = hi2 - lo2 > 0
  want = jnp.where(valid, jnp.where(ok2, (x - lo2) / jnp.where(ok2, hi2 - lo2, 1.0), 0.0), 0.0)
  np.testing.assert_array_equal(ops.minmax(x, valid, axis=-1), want)


def test_upsample_methods():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 5)), jnp.float32)
  lin = jax.image.resize(x, (2, 32, 40), method="linear")
  np.testing.assert_allclose(resize.upsample(x, (32, 40)), lin, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(resize.upsample(x, (32, 40)), resize.upsample_bilinear(x, (32, 40)))
  np.testing.assert_array_equal(resize.upsample(x, (32, 40), "bicubic"),
                                jax.image.resize(x, (2, 32, 40), method="cubic"))
  np.testing.assert_array_equal(resize.upsample(x, (32, 40), "nearest"),
                                jax.image.resize(x, (2, 32, 40), method="nearest"))
  for n_in, n_out in ((4, 32), (7, 3), (14, 24)):
    np.testing.assert_allclose(resize.torch_bicubic_matrix(n_in, n_out).sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(resize.torch_bilinear_matrix(n_in, n_out).sum(1), 1.0, atol=1e-12)
