"""``config.freeze='visual'`` on a sharded mesh (issue 18 x 17): the frozen tower's params are split
over fsdp (the rule table) and stay bit-identical through the loop's jitted train step, while the text
tower trains (tests/test_init_from.py checks the same on one device, from a converted model)."""
import flax.linen as nn
import jax
import numpy as np

from configs import common
from trace_jax import objectives
from trace_jax.data import sources
from trace_jax.training import mesh as mesh_lib
from trace_jax.training import sharding as shd
from trace_jax.training import state as state_lib
from trace_jax.training import step as step_lib

FAST = {"xla_backend_optimization_level": 0}


def test_frozen_visual_tower_bit_identical_on_data2_fsdp4():
  c = common.get_config()
  c.data.name, c.data.image_size, c.data.batch_size = "random", 32, 8
  c.data.context_length, c.data.vocab_size = 8, 1000
  c.model.preset, c.loss.name, c.freeze = "tiny", "contrastive", "visual"
  c.optim.warmup_steps, c.optim.lr = 1, 1e-2
  task = objectives.make(c, {"vocab_size": 1000, "context_length": 8})
  mesh = mesh_lib.make_mesh(2, 4, 1)
  tx, schedule = state_lib.make_optimizer(c.optim, 3, task.trainable)
  state, shardings = state_lib.create_state(task.init_params, tx, mesh, c.seed, compiler_options=FAST)
  visual0 = jax.device_get(state.params["clip"]["visual"])
  text0 = jax.device_get(state.params["clip"]["text"])
  # the frozen tower really is split over fsdp (its embed axes), not replicated
  specs = [x.sharding.spec for x in jax.tree.leaves(state.params["clip"]["visual"])]
  assert sum("fsdp" in jax.tree.leaves(tuple(s)) for s in specs) >= 10, specs
  step = step_lib.jit_train_step(step_lib.make_train_step(task.loss_fn, tx, schedule, task.trainable, mesh=mesh),
                                 shardings, mesh, compiler_options=FAST)
  with jax.set_mesh(mesh):
    for i in range(2):
      state, metrics = step(state, shd.global_batch(sources.random_batch(c, i, slice(None)), mesh))
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
  visual = jax.device_get(state.params["clip"]["visual"])
  for (path, a), b in zip(jax.tree.leaves_with_path(visual0), jax.tree.leaves(visual)):
    np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))   # bit-identical
  moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(text0),
                                                      jax.tree.leaves(jax.device_get(state.params["clip"]["text"])))]
  assert max(moved) > 1e-4, moved
  # no Adam moments for the frozen leaves: mu + nu cover the trainable leaves only
  n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  n_vis = sum(np.size(x) for x in jax.tree.leaves(visual0))
  n_all = sum(np.size(x) for x in jax.tree.leaves(nn.unbox(state.params)))
  assert n_opt <= 2 * (n_all - n_vis) + 16, (n_opt, n_all, n_vis)
