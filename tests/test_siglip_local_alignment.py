"""Local alignment on a SigLIP model with the sigmoid global term (``loss.global_loss=sigmoid``).

* the Task's loss on a batch sharded over 8 emulated devices (the chunked sigmoid ring) equals a
  float64 NumPy reference: SigLIP's sigmoid loss from the paper (tests/test_sigmoid_loss.ref_loss,
  with bias) + lambda_local x the mean over slots of the symmetric InfoNCE (tests/test_losses.
  _np_clip_loss), on the model's embeddings;
* SigLIP's patch features (``SigLIPVision.project``: the MAP head on each token alone) equal a float64
  NumPy computation from the parameters;
* one train step (training/step.py) runs and gives finite loss and parameters that changed;
* every CLIP-family objective refuses an unknown global loss by name.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy.special import erf

from test_losses import _np_clip_loss
from test_sigmoid_loss import ref_loss

B = 8
FAST = {"xla_backend_optimization_level": 0}


def _config(name="local_alignment", global_loss="sigmoid"):
  from configs.common import get_config
  c = get_config()
  c.model.preset, c.model.vision_layers, c.model.text_layers = "siglip-tiny", 1, 1
  c.loss.name, c.loss.global_loss = name, global_loss
  c.loss.local.layers, c.loss.local.lambda_global, c.loss.local.lambda_local = 1, 1.0, 0.7
  c.optim.schedule, c.optim.lr = "constant", 1e-3
  return c


INFO = {"vocab_size": 1000, "context_length": 16, "image_size": 32}


@pytest.fixture(scope="module")
def task():
  from trace_jax import objectives
  t = objectives.make(_config(), INFO)
  import flax.linen as nn
  params = nn.unbox(t.init_params(jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  # non-trivial logit scale / bias and LayerNorm affines (their init values hide mistakes)
  params["clip"]["logit_scale"], params["clip"]["logit_bias"] = jnp.float32(2.1), jnp.float32(-1.3)
  params["text_compression"]["logit_scale"] = jnp.float32(1.7)
  batch = {"image": jnp.asarray(rng.standard_normal((B, 32, 32, 3)), jnp.float32),
           "caption_ids": jnp.asarray(rng.integers(2, 1000, (B, 16)), jnp.int32)}
  return t, params, batch


def _np_project(hp, x):
  """MAP head on ONE token (softmax over one key = 1): y = out(v(x)); y + mlp(ln(y)), float64."""
  f = lambda a: np.asarray(a, np.float64)
  v = np.einsum("nw,whe->nhe", x, f(hp["value"]["kernel"])) + f(hp["value"]["bias"])
  y = np.einsum("nhe,hew->nw", v, f(hp["out"]["kernel"])) + f(hp["out"]["bias"])
  mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
  h = (y - mu) / np.sqrt(var + 1e-6) * f(hp["ln"]["ln"]["scale"]) + f(hp["ln"]["ln"]["bias"])
  h = h @ f(hp["mlp_fc"]["kernel"]) + f(hp["mlp_fc"]["bias"])
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))                      # GELU (erf), the preset's act
  return y + h @ f(hp["mlp_proj"]["kernel"]) + f(hp["mlp_proj"]["bias"])


@pytest.mark.slow  # compiles the local-alignment loss for 8 devices (~15-30 s on a shared 2-core CPU)
def test_loss_with_sigmoid_global_term_equals_numpy_reference(task):
  from trace_jax.losses.local_alignment import local_alignment_forward
  from trace_jax.training.mesh import make_mesh
  t, params, batch = task
  assert t.cfg.act == "gelu"
  mesh = make_mesh(data=8)
  with jax.set_mesh(mesh):
    b = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))), batch)
    f = jax.jit(t.loss_fn).lower(params, b, jax.random.PRNGKey(1)).compile()
    assert "collective-permute" in f.as_text()                      # the sigmoid ring over the 8 shards
    loss, m = f(params, b, jax.random.PRNGKey(1))
  fwd = jax.tree.map(lambda a: np.asarray(a, np.float64),
                     local_alignment_forward(t.model, t.compressor, params, batch["image"], batch["caption_ids"]))
  want_g = ref_loss(fwd["image_embeds"], fwd["text_embeds"], 2.1, -1.3)
  want_l = np.mean([_np_clip_loss(fwd["patch_embeds"][:, k], fwd["slot_embeds"][:, k], 1.7)
                    for k in range(fwd["patch_embeds"].shape[1])])
  np.testing.assert_allclose(float(m["global"]), want_g, rtol=1e-5)
  np.testing.assert_allclose(float(m["local"]), want_l, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want_g + 0.7 * want_l, rtol=1e-5)

  # SigLIP's patch features: the MAP head on each ln_post'ed token alone, from the parameters
  _, aux = t.model.apply({"params": params["clip"]}, batch["image"][:2], method="encode_image")
  tokens = np.asarray(aux["tokens"], np.float64)                   # [2, 16, 64]: no class token
  want = np.stack([_np_project(params["clip"]["visual"]["map_head"], x) for x in tokens])
  np.testing.assert_allclose(fwd["patch_embeds"][:2], want, atol=1e-4)


@pytest.mark.slow
def test_one_train_step_is_finite(task):
  from trace_jax.training import mesh as mesh_lib, sharding as shd, state as state_lib, step as step_lib
  t, _, batch = task
  config = _config()
  mesh = mesh_lib.single_device_mesh()   # the 8-device ring is checked above; one device compiles faster
  tx, sched = state_lib.make_optimizer(config.optim, 10)
  state, sh = state_lib.create_state(t.init_params, tx, mesh, 0, FAST)
  before = jax.device_get(state.params["clip"]["logit_bias"])
  f = step_lib.jit_train_step(step_lib.make_train_step(t.loss_fn, tx, sched), sh, mesh, FAST)
  with jax.set_mesh(mesh):
    state, m = f(state, shd.global_batch(jax.tree.map(np.asarray, batch), mesh))
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["global"])) and np.isfinite(float(m["local"]))
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(jax.device_get(state.params)))
  assert float(jax.device_get(state.params["clip"]["logit_bias"])) != float(before)  # the bias trains


@pytest.mark.parametrize("name", ["contrastive", "amc", "local_alignment"])
def test_every_objective_refuses_an_unknown_global_loss(name):
  from trace_jax import objectives
  with pytest.raises(ValueError, match=r"loss.global_loss must be one of \('softmax', 'sigmoid'\); got 'hinge'"):
    objectives.make(_config(name, "hinge"), INFO)
  c = _config(name)
  c.model.preset = "tiny"
  with pytest.raises(ValueError, match="needs a SigLIP model"):
    objectives.make(c, INFO)
