"""SigLIP sigmoid loss: float64 NumPy reference written from the paper (eq. 1, with bias), and the
chunked ppermute-ring form on 8 emulated devices equal to the single-device one (value and gradients)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from trace_jax.losses.sigmoid import sigmoid_loss, sigmoid_loss_chunked


def ref_loss(img, txt, t, b):
  """-1/|B| sum_i sum_j log(1 / (1 + exp(z_ij (-t' x_i.y_j - b)))), t' = exp(t) (paper Algorithm 1)."""
  x = img / np.linalg.norm(img, axis=1, keepdims=True)
  y = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  logits = np.exp(t) * x @ y.T + b
  z = 2 * np.eye(len(x)) - 1
  return float(-np.sum(np.log(1.0 / (1.0 + np.exp(-z * logits)))) / len(x))


def _data(B=16, E=8, seed=0):
  rng = np.random.default_rng(seed)
  img = rng.standard_normal((B, E))
  txt = img + 0.7 * rng.standard_normal((B, E))
  return img, txt


@pytest.mark.parametrize("t,b", [(np.log(10.0), -10.0), (2.0, 0.5)])
def test_matches_float64_reference(t, b):
  img, txt = _data()
  got = float(sigmoid_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), t, b))
  assert abs(got - ref_loss(img, txt, t, b)) <= 1e-5 * max(1.0, abs(ref_loss(img, txt, t, b)))


def test_chunked_on_8_devices_equals_single_device():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8, 1), ("data", "fsdp"))
  img, txt = _data(B=32, E=16, seed=1)
  img, txt = jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32)
  shard = NamedSharding(mesh, P(("data", "fsdp")))
  args = (jax.device_put(img, shard), jax.device_put(txt, shard), jnp.float32(2.3), jnp.float32(-3.0))

  def both(i, t, s, b):
    return sigmoid_loss_chunked(i, t, s, b, mesh=mesh)

  chunked = jax.jit(jax.value_and_grad(both, argnums=(0, 1, 2, 3)))
  single = jax.jit(jax.value_and_grad(sigmoid_loss, argnums=(0, 1, 2, 3)))
  (lc, gc), (ls, gs) = chunked(*args), single(img, txt, jnp.float32(2.3), jnp.float32(-3.0))
  assert abs(float(lc) - ref_loss(np.asarray(img, np.float64), np.asarray(txt, np.float64), 2.3, -3.0)) < 1e-4
  np.testing.assert_allclose(float(lc), float(ls), rtol=1e-6)
  for a, b in zip(gc, gs):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # the lowered program moves texts by collective-permute and never all-gathers them
  hlo = chunked.lower(*args).compile().as_text()
  assert "collective-permute" in hlo and "all-gather" not in hlo


def test_chunked_uses_context_mesh_and_refuses_uneven_batch():
  mesh = jax.make_mesh((8, 1), ("data", "fsdp"))
  img, txt = _data(B=12, E=4)
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match="does not divide"):
      jax.jit(sigmoid_loss_chunked)(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 1.0, 0.0)


def test_contrastive_objective_with_sigmoid_global_loss_on_siglip():
  """loss.global_loss=sigmoid on a SigLIP preset: the Task's loss equals sigmoid_loss of the model's
  embeddings (jitted on the 8-device mesh via the context mesh); a CLIP model is refused by name."""
  from configs.common import get_config
  from trace_jax import objectives
  c = get_config()
  c.model.preset = "siglip-tiny"
  c.loss.global_loss = "sigmoid"
  info = {"vocab_size": 1000, "context_length": 16, "image_size": 32}
  task = objectives.make(c, info)
  params = task.init_params(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.standard_normal((16, 32, 32, 3)), jnp.float32),
           "caption_ids": jnp.asarray(rng.integers(0, 1000, (16, 16)), jnp.int32)}
  from trace_jax.training.mesh import make_mesh
  mesh = make_mesh(data=8)  # the train loop's mesh ('data', 'fsdp', 'tensor')
  with jax.set_mesh(mesh):
    shard = NamedSharding(mesh, P(("data", "fsdp")))
    b = jax.tree.map(lambda x: jax.device_put(x, shard), batch)
    f = jax.jit(task.loss_fn)
    loss, _ = f(params, b, jax.random.PRNGKey(1))
    assert "collective-permute" in f.lower(params, b, jax.random.PRNGKey(1)).compile().as_text()  # the ring
  m = task.model
  img, _ = m.apply({"params": params["clip"]}, batch["image"], method="encode_image")
  txt, _ = m.apply({"params": params["clip"]}, batch["caption_ids"], method="encode_text")
  want = ref_loss(np.asarray(img, np.float64), np.asarray(txt, np.float64),
                  float(params["clip"]["logit_scale"]), float(params["clip"]["logit_bias"]))
  assert abs(float(loss) - want) <= 1e-4 * abs(want)
  c.model.preset = "tiny"
  with pytest.raises(ValueError, match="needs a SigLIP model"):
    objectives.make(c, info)


def test_batch_axes_are_the_training_rule_tables():
  """The chunked loss shards over the mesh axes the train step puts the batch on."""
  from trace_jax.losses import sigmoid
  from trace_jax.training import sharding
  assert sigmoid.BATCH_AXES == sharding.BATCH_AXES
