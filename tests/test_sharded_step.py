"""The sharded train step (meshes data=2 x fsdp=4 and data=2 x fsdp=2 x tensor=2 over 8 emulated CPU
devices, tests/conftest.py) gives the same losses and updated parameters as the same step on one
device, for every objective.

Tolerance: losses rtol 1e-5; parameters after two AdamW steps atol 2e-6 + rtol 1e-5 (the sharded
reductions sum in a different order, ~1e-7 relative in the gradients; Adam's eps is raised to 1e-4
here so that a near-zero gradient component cannot flip the sign of its normalised update).
"""
import functools

import jax
import numpy as np
import pytest

from configs import common
from trace_jax import objectives
from trace_jax.data import sources
from trace_jax.training import mesh as mesh_lib, sharding as shd, state as state_lib, step as step_lib

B, S = 8, 32
# Both sides compile with LLVM optimisation level 0 (the same numerics on both; half the CPU
# compile time of this file).
FAST = {"xla_backend_optimization_level": 0}


def _config(loss):
  c = common.get_config()
  c.data.name, c.data.image_size, c.data.batch_size = "random", S, B
  c.data.context_length, c.data.vocab_size = 8, 1000
  c.model.preset, c.model.vision_layers, c.model.text_layers = "tiny", 1, 1
  c.loss.name = loss
  c.loss.local.layers = 1
  c.optim.schedule, c.optim.lr, c.optim.eps = "constant", 1e-3, 1e-4
  return c


def _run(config, mesh, steps=2, loss_fn=None, microbatches=1):
  task = objectives.make(config, {"vocab_size": 1000, "context_length": 8})
  tx, sched = state_lib.make_optimizer(config.optim, 10)
  state, sh = state_lib.create_state(task.init_params, tx, mesh, config.seed, FAST)
  loss_fn = loss_fn(task) if loss_fn else task.loss_fn
  f = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, tx, sched, microbatches=microbatches, mesh=mesh),
                              sh, mesh, FAST)
  losses = []
  with jax.set_mesh(mesh):
    for k in range(steps):
      batch = shd.global_batch(sources.random_batch(config, k, slice(None)), mesh)
      state, m = f(state, batch)
      losses.append(float(m["loss"]))
  return losses, jax.device_get(state.params), state


@pytest.mark.parametrize("loss", ["contrastive", "amc", "local_alignment"])
def test_sharded_step_matches_single_device(loss):
  assert jax.device_count() == 8, "tests/conftest.py should give 8 emulated CPU devices"
  config = _config(loss)
  mesh = mesh_lib.make_mesh(2, 4)
  l1, p1 = _single_device(loss)
  l8, p8, st8 = _run(config, mesh)
  # The step really ran sharded: batch over 8 devices, a weight matrix split over fsdp.
  kernel = st8.params["clip"]["visual"]["transformer"]["block_0"]["mlp_fc"]["kernel"]
  assert kernel.sharding.spec[0] == "fsdp" and len(kernel.addressable_shards) == 8
  assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // 4
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert l1[0] != l1[1]  # the first update changed the model
  flat1, flat8 = jax.tree.leaves_with_path(p1), jax.tree.leaves(p8)
  for (path, a), b in zip(flat1, flat8):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))


@functools.lru_cache(maxsize=None)
def _single_device(loss):
  """(losses, params) of the single-device reference run, once per objective."""
  l1, p1, _ = _run(_config(loss), mesh_lib.single_device_mesh())
  return l1, p1


@pytest.mark.parametrize("loss", ["contrastive", "amc", "local_alignment"])
def test_sharded_step_with_tensor_axis_matches_single_device(loss):
  """Mesh data=2 x fsdp=2 x tensor=2: weights split over fsdp AND tensor (MLP hidden, heads, vocab),
  and the same losses / parameters as one device, at the tolerances of the test above.

  Fails on these broken variants (checked by editing trace_jax/training/sharding.py): the rules
  mapping mlp / heads / vocab to None instead of 'tensor' (nothing is split over tensor); the batch
  split over ('data', 'fsdp', 'tensor') instead of replicated over tensor. Under GSPMD a sharding
  choice cannot change the numbers (only the summation order), so the value checks guard explicit
  collectives; the layout checks guard the rules.
  """
  assert jax.device_count() == 8, "tests/conftest.py should give 8 emulated CPU devices"
  mesh = mesh_lib.make_mesh(2, 2, 2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  l1, p1 = _single_device(loss)
  l8, p8, st8 = _run(_config(loss), mesh)
  blk = st8.params["clip"]["visual"]["transformer"]["block_0"]
  fc, q = blk["mlp_fc"]["kernel"], blk["attn"]["query"]["kernel"]          # [embed, mlp], [embed, heads, kv]
  assert tuple(fc.sharding.spec) == ("fsdp", "tensor") and len(fc.addressable_shards) == 8
  assert fc.addressable_shards[0].data.shape == (fc.shape[0] // 2, fc.shape[1] // 2)
  assert tuple(q.sharding.spec)[:2] == ("fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (q.shape[0] // 2, q.shape[1] // 2, q.shape[2])
  # 4 distinct blocks of the MLP kernel, each held by the 2 devices that differ only in 'data'
  assert len({tuple((s.start, s.stop) for s in sh.index) for sh in fc.addressable_shards}) == 4
  # the batch is split over data x fsdp (4 ways) and replicated over tensor
  batch = shd.global_batch(sources.random_batch(_config(loss), 0, slice(None)), mesh)
  img = batch["image"]
  assert len({sh.index[0].start for sh in img.addressable_shards}) == 4
  assert img.addressable_shards[0].data.shape[0] == B // 4
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert l1[0] != l1[1]  # the first update changed the model
  flat1, flat8 = jax.tree.leaves_with_path(p1), jax.tree.leaves(p8)
  for (path, a), b in zip(flat1, flat8):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def _row_mean_loss(task):
  """A mean over rows of per-row terms of the real towers: accumulation over microbatches is exact."""
  def loss(params, batch, rng):
    del rng
    img, _ = task.model.apply({"params": params["clip"]}, batch["image"], method="encode_image")
    txt, _ = task.model.apply({"params": params["clip"]}, batch["caption_ids"], method="encode_text")
    per_row = jax.numpy.sum((img - txt) ** 2, axis=-1)
    return jax.numpy.mean(per_row), {}
  return loss


def test_sharded_step_microbatches_same_update():
  """``train.microbatches=2`` through the real jitted train step (make_train_step(microbatches=, mesh=),
  as training/loop.py builds it) on data 2 x fsdp 2 x tensor 2: each microbatch keeps the batch split
  over data x fsdp (training/accumulate.split) and the accumulated update equals the full batch's
  for a row-mean loss: losses rtol 1e-5, parameters after two AdamW steps atol 2e-6 + rtol 1e-5 (the
  sums run in another order), and the accumulated program really loops (one more while in its HLO)."""
  config = _config("contrastive")
  mesh = mesh_lib.make_mesh(2, 2, 2)
  l1, p1, state = _run(config, mesh, loss_fn=_row_mean_loss)
  l2, p2, _ = _run(config, mesh, loss_fn=_row_mean_loss, microbatches=2)
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  assert l1[0] != l1[1]  # the first update changed the model
  for (path, a), b in zip(jax.tree.leaves_with_path(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  task = objectives.make(config, {"vocab_size": 1000, "context_length": 8})
  tx, sched = state_lib.make_optimizer(config.optim, 10)
  batch = shd.global_batch(sources.random_batch(config, 0, slice(None)), mesh)
  whiles = {}
  for m in (1, 2):
    step = step_lib.make_train_step(_row_mean_loss(task), tx, sched, microbatches=m, mesh=mesh)
    with jax.set_mesh(mesh):
      whiles[m] = jax.jit(step).lower(state, batch).as_text().count("stablehlo.while")
  assert whiles[2] == whiles[1] + 1, whiles   # the microbatch scan
