"""Large-model tools (docs/scaling.md): model.remat, model.scan_layers, model.attention='fused',
train.microbatches and model.dtype=bfloat16, each against the default path on a tiny model.

Tolerances (float32, measured on this CPU): remat changes nothing in the forward, and its
recomputed backward is bit-identical here (asserted to 1e-6 relative to the largest gradient, to
leave room for a compiler that fuses the recomputation differently); scan and fused attention
reorder float32 sums (max |Δgrad| ≈ 5e-7 of the largest gradient): asserted to 1e-5 of it, losses
to rtol 1e-5. Gradient accumulation of a per-row-mean loss: the same gradient to 1e-5 of the
largest. bfloat16 vs float32 on the same step: loss rtol 2e-2, gradients 5e-2 of the largest
(bf16 has 8 mantissa bits; attention logits, softmax and LayerNorm stay float32; measured and printed:
loss 1.7e-3 relative, gradients 2.0e-2 of the largest).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from trace_jax import objectives
from trace_jax.data import sources
from trace_jax.models import config as config_lib
from trace_jax.models import scale
from trace_jax.training import accumulate, mesh as mesh_lib, sharding as shd

B, S, L = 8, 32, 8
INFO = {"vocab_size": 1000, "context_length": L}
FAST = {"xla_backend_optimization_level": 0}  # same numerics on both sides; half the CPU compile time


def _config(loss="contrastive", **model):
  c = common.get_config()
  c.data.name, c.data.image_size, c.data.batch_size = "random", S, B
  c.data.context_length, c.data.vocab_size = L, 1000
  c.model.preset, c.model.vision_layers, c.model.text_layers = "tiny", 2, 2
  c.loss.name = loss
  c.loss.local.layers = 1
  for k, v in model.items():
    c.model[k] = v
  return c


def _batch(config, step=0):
  return {k: jnp.asarray(v) for k, v in sources.random_batch(config, step, slice(None)).items()}


def _loss_and_grads(config, params=None):
  task = objectives.make(config, INFO)
  if params is None:
    params = nn.unbox(task.init_params(jax.random.PRNGKey(0)))
  if task.cfg.scan_layers:
    params = scale.stack_blocks(params)
  f = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True), compiler_options=FAST)
  (loss, _), grads = f(params, _batch(config), jax.random.PRNGKey(1))
  if task.cfg.scan_layers:
    grads = scale.unstack_blocks(grads)
  return float(loss), jax.device_get(grads), params


def _assert_grads_close(g, g0, rel):
  top = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g0))
  assert jax.tree.structure(g) == jax.tree.structure(g0)
  for (path, a), b in zip(jax.tree.leaves_with_path(g0), jax.tree.leaves(g)):
    np.testing.assert_allclose(b, a, rtol=0, atol=rel * top, err_msg=jax.tree_util.keystr(path))


_REF = {}


def _reference(loss):
  if loss not in _REF:
    _REF[loss] = _loss_and_grads(_config(loss))
  return _REF[loss]


@pytest.mark.parametrize("loss,model,rel", [
    ("contrastive", dict(remat="block"), 1e-6),
    ("contrastive", dict(remat="dots_saveable"), 1e-6),
    ("contrastive", dict(attention="fused"), 1e-5),
    ("contrastive", dict(scan_layers=True), 1e-5),
    ("contrastive", dict(scan_layers=True, remat="block", attention="fused"), 1e-5),
    ("local_alignment", dict(scan_layers=True, remat="dots_with_no_batch_dims_saveable"), 1e-5),
    # AMC differentiates through GradCAM (second order): remat'd blocks, and fused attention in every
    # forward except GradCAM's (which applies the model with perturbations -> explicit attention).
    ("amc", dict(remat="block"), 1e-6),
    ("amc", dict(attention="fused"), 1e-5),
])
def test_memory_tool_same_loss_and_grads(loss, model, rel):
  l0, g0, p0 = _reference(loss)
  l, g, _ = _loss_and_grads(_config(loss, **model), p0)
  np.testing.assert_allclose(l, l0, rtol=1e-5)
  _assert_grads_close(g, g0, rel)


def test_scan_layers_refuses_attribution_and_amc():
  with pytest.raises(ValueError, match="scan_layers does not expose per-block attention"):
    _loss_and_grads(_config("amc", scan_layers=True))


def test_fused_attention_keeps_attribution_explicit():
  """A model built with attention='fused' gives the same GradCAM and rollout maps (attribution applies
  the image tower with perturbations, which always takes the explicit path) and the same plain
  embeddings.

  Rollout reads the attention probabilities of every block: a fused image pass would have none.
  Its maps are bit-identical (the same explicit program). GradCAM's text target comes from the plain
  text forward, which is fused in m1, so its maps agree to float32 rounding, not bit for bit (measured
  2.4e-5 relative at most on an AVX2 host, bit-identical on AVX-512 ones)."""
  from trace_jax.attribution import gradcam, rollout
  from trace_jax.models import build
  cfg = objectives.make(_config(), INFO).cfg
  m0, m1 = build(cfg), build(cfg.replace(attention="fused"))
  params = nn.unbox(m0.init(jax.random.PRNGKey(0), jnp.zeros((1, S, S, 3)),
                                                   jnp.zeros((1, L), jnp.int32))["params"])
  b = _batch(_config())
  c0 = gradcam.gradcam_grid(m0, params, b["image"], b["phrase_ids"])
  c1 = gradcam.gradcam_grid(m1, params, b["image"], b["phrase_ids"])
  np.testing.assert_allclose(np.asarray(c1), np.asarray(c0), rtol=1e-4, atol=1e-6 * float(np.abs(c0).max()))
  r0 = rollout.explain(m0, params, b["image"], b["phrase_ids"], normalize=False)["grid"]
  r1 = rollout.explain(m1, params, b["image"], b["phrase_ids"], normalize=False)["grid"]
  np.testing.assert_array_equal(np.asarray(r1), np.asarray(r0))
  from trace_jax.attribution import legrad   # reads the probabilities from a plain forward too
  l0 = legrad.explain(m0, params, b["image"][0], b["phrase_ids"][:2])["map"]
  l1 = legrad.explain(m1, params, b["image"][0], b["phrase_ids"][:2])["map"]
  np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), atol=1e-5)
  e0, a0 = m0.apply({"params": params}, b["image"], method="encode_image")
  e1, a1 = m1.apply({"params": params}, b["image"], method="encode_image")
  np.testing.assert_allclose(e1, e0, rtol=1e-5, atol=1e-6)
  assert a0["blocks"][0]["attn"] is not None and a1["blocks"][0]["attn"] is None  # fused: no probs


def test_stack_unstack_roundtrip_and_inference_layout():
  cfg = objectives.make(_config(scan_layers=True, remat="block", attention="fused"), INFO).cfg
  task0 = objectives.make(_config(), INFO)
  p = nn.unbox(task0.init_params(jax.random.PRNGKey(0)))
  st = scale.stack_blocks(p)
  assert st["clip"]["visual"]["transformer"]["blocks"]["mlp_fc"]["kernel"].shape[0] == 2
  back = scale.unstack_blocks(st)
  assert jax.tree.structure(back) == jax.tree.structure(p)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
  cfg2, p2 = scale.inference_layout(cfg, st)
  assert (cfg2.remat, cfg2.scan_layers, cfg2.attention) == ("none", False, "explicit")
  assert jax.tree.structure(p2) == jax.tree.structure(p)
  # The scanned model's own init has the stacked layout (and a 'layers' logical axis).
  task1 = objectives.make(_config(scan_layers=True), INFO)
  shapes = jax.eval_shape(lambda r: nn.unbox(task1.init_params(r)), jax.random.PRNGKey(0))
  assert shapes["clip"]["visual"]["transformer"]["blocks"]["mlp_fc"]["kernel"].shape[0] == 2
  assert jax.tree.structure(jax.eval_shape(scale.unstack_blocks, shapes)) == jax.tree.structure(p)


def test_config_json_unchanged_when_off():
  cfg = objectives.make(_config(), INFO).cfg
  assert not {"remat", "scan_layers", "attention"} & set(cfg.to_dict())
  on = cfg.replace(remat="block", scan_layers=True, attention="fused")
  assert config_lib.CLIPConfig.from_json(on.to_json()) == on
  assert config_lib.CLIPConfig.from_json(cfg.to_json()) == cfg
  with pytest.raises(ValueError, match="model.remat must be one of"):
    _loss_and_grads(_config(remat="everything"))


def _row_mean_loss(params, batch, rng):
  """A loss that is a mean over rows of per-row terms (so accumulation must be exact)."""
  from trace_jax.models import build
  del rng
  emb, _ = _MODEL.apply({"params": params["clip"]}, batch["image"], method="encode_image")
  txt, _ = _MODEL.apply({"params": params["clip"]}, batch["caption_ids"], method="encode_text")
  per_row = jnp.sum((emb - txt) ** 2, axis=-1)
  return jnp.mean(per_row), {"rows": jnp.mean(per_row)}


_MODEL = None


@pytest.mark.parametrize("m", [2, 4])
def test_microbatches_equal_full_batch_for_row_mean_loss(m):
  global _MODEL
  task = objectives.make(_config(), INFO)
  _MODEL = task.model
  params = nn.unbox(task.init_params(jax.random.PRNGKey(0)))
  batch, rng = _batch(_config()), jax.random.PRNGKey(1)
  (l0, _), g0 = jax.jit(jax.value_and_grad(_row_mean_loss, has_aux=True), compiler_options=FAST)(params, batch, rng)
  (l1, mets), g1 = jax.jit(lambda p, b, r: accumulate.value_and_grad(_row_mean_loss, p, b, r, microbatches=m), compiler_options=FAST)(
      params, batch, rng)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  np.testing.assert_allclose(float(mets["rows"]), float(l0), rtol=1e-5)
  _assert_grads_close(g1, g0, 1e-5)


def test_microbatches_contrastive_is_mean_of_microbatch_losses():
  """The contrastive loss couples rows, so accumulation is the mean of the M microbatch losses
  (rows j, M + j, ...), not the full-batch loss (documented in training/accumulate.py)."""
  task = objectives.make(_config(), INFO)
  params = nn.unbox(task.init_params(jax.random.PRNGKey(0)))
  batch, rng = _batch(_config()), jax.random.PRNGKey(1)
  vg = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True), compiler_options=FAST)
  (lfull, _), _ = vg(params, batch, rng)
  parts = [vg(params, {k: v[j::2] for k, v in batch.items()}, rng) for j in range(2)]
  lmean = np.mean([float(p[0][0]) for p in parts])
  gmean = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
  (lacc, _), gacc = jax.jit(lambda p, b, r: accumulate.value_and_grad(task.loss_fn, p, b, r, microbatches=2), compiler_options=FAST)(
      params, batch, rng)
  np.testing.assert_allclose(float(lacc), lmean, rtol=1e-5)
  _assert_grads_close(gacc, gmean, 1e-5)
  assert abs(float(lacc) - float(lfull)) > 1e-3  # fewer negatives: a different (documented) objective


def test_microbatches_sharded_split_and_config_check():
  mesh = mesh_lib.make_mesh(2, 4)
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  with jax.set_mesh(mesh):
    g = shd.global_batch({"x": x}, mesh)
    y = jax.jit(lambda b: accumulate.split(b, 2, mesh))(g)["x"]
  np.testing.assert_array_equal(np.asarray(y), np.stack([x[0::2], x[1::2]]))
  assert y.sharding.spec[1] == ("data", "fsdp")
  with pytest.raises(ValueError, match="microbatches x data x fsdp"):
    accumulate.check_microbatches(16, 4, mesh)


def test_bfloat16_step_close_to_float32():
  l0, g0, p0 = _reference("contrastive")
  l, g, _ = _loss_and_grads(_config(dtype="bfloat16"), p0)
  top = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g0))
  err = max(float(np.max(np.abs(np.asarray(a, np.float32) - b))) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)))
  print(f"bf16 vs f32: loss rel {abs(l - l0) / abs(l0):.2e}, max |dgrad| {err / top:.2e} of the largest")
  np.testing.assert_allclose(l, l0, rtol=2e-2)
  _assert_grads_close(jax.tree.map(lambda x: np.asarray(x, np.float32), g), g0, 5e-2)


@pytest.mark.parametrize("loss,mesh", [("contrastive", (2, 4, 1)),
                                       pytest.param("amc", (2, 2, 2), marks=pytest.mark.slow)])
def test_block_activation_constraint_same_loss_and_grads(loss, mesh):
  """The batch constraint on the tokens at every block boundary (models/scale.constrain_batch, entered
  by the train step through sharding.activation_rules) changes only the layout: on 8 emulated devices
  with params sharded by the rule table, loss and gradients equal the unconstrained program's to float32
  reduction order (the gradient sums over the batch run in another order: measured max |dgrad| 1.1e-6
  (contrastive) and 7e-7 (AMC) of the largest gradient, as scan / fused attention; asserted to 1e-5 of it, loss rtol 1e-5), and the
  constrained program really carries the constraints: 2 per block x (2 image + 2 text blocks),
  per text encoding (AMC encodes the image twice: its GradCAM forward too)."""
  config = _config(loss)
  task = objectives.make(config, INFO)
  m = mesh_lib.make_mesh(*mesh)
  boxed = task.init_params(jax.random.PRNGKey(0))
  params = jax.device_put(nn.unbox(boxed), shd.logical_shardings(boxed, m))
  vg = jax.value_and_grad(task.loss_fn, has_aux=True)
  rng = jax.random.PRNGKey(1)
  with jax.set_mesh(m):
    batch = shd.global_batch(sources.random_batch(config, 0, slice(None)), m)
    plain = jax.jit(lambda p, b, r: vg(p, b, r), compiler_options=FAST)   # its own jit: traced without rules
    (l0, _), g0 = plain(params, batch, rng)
    with shd.activation_rules(m):
      on = jax.jit(lambda p, b, r: vg(p, b, r), compiler_options=FAST)
      text = on.lower(params, batch, rng).as_text()
      (l1, _), g1 = on(params, batch, rng)
  n0 = plain.lower(params, batch, rng).as_text().count("sharding_constraint")
  n1 = text.count("sharding_constraint")
  # forward constraints: 2 per block of every tower application (the backward adds its transposes)
  applications = {"contrastive": 2 * 2 + 2 * 2, "amc": 3 * (2 * 2) + 2 * 2}[loss]
  assert n1 - n0 >= applications, (n0, n1)
  assert "fsdp" in text
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  g0, g1 = jax.device_get(g0), jax.device_get(g1)
  top = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g0))
  print("max |dgrad| / max |grad|:", max(float(np.max(np.abs(a - b))) for a, b in
                                         zip(jax.tree.leaves(g0), jax.tree.leaves(g1))) / top, "constraints", n0, n1)
  _assert_grads_close(g1, g0, 1e-5)


def test_constrain_batch_is_a_noop_without_rules_or_mesh():
  x = jnp.ones((8, 5, 4))
  assert scale.constrain_batch(x) is x                       # no rules
  with scale.activation_rules(shd.LOGICAL_AXIS_RULES):
    assert scale.constrain_batch(x) is x                     # rules but no mesh context
    m = mesh_lib.make_mesh(2, 4, 1)
    with jax.set_mesh(m):
      y = jnp.ones((6, 5, 4))                                # 6 rows: not divisible by data x fsdp = 8
      assert scale.constrain_batch(y) is y
      v = jnp.ones((5, 4))                                   # one example (under vmap): another rank
      assert scale.constrain_batch(v) is v
      z = jax.jit(scale.constrain_batch)(x)
  assert z.sharding.spec[0] == ("data", "fsdp")
