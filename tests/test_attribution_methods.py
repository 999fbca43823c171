"""Attribution methods (GradCAM, rollout, Chefer, saliency, RISE) against independent references.

References:
* GradCAM: ``pytorch_grad_cam`` (grad-cam) on a PyTorch ViT built from the same weights, with the
  attention-probability tensor as the "layer" (an ``nn.Identity`` after the softmax) and a
  reshape_transform to the [CLS] row / patch columns. Definitions that coincide:
    - ours ``relu_grad=True``  == grad-cam ``GradCAMElementWise``: relu(G*F) summed over heads; since
      F >= 0 (probabilities) relu(G*F) = F*relu(G), and the head sum vs mean cancels in the min-max;
    - ours ``relu_grad=False, relu=True`` == grad-cam ``HiResCAM``: relu(sum_h G*F).
  Both then min-max (+1e-7) and bilinear-upsample (cv2 INTER_LINEAR) like ours.
  (grad-cam's plain ``GradCAM`` averages gradients spatially per channel — not the AMC definition.)
* saliency: ``captum.attr.Saliency`` (abs=True) on the same PyTorch model.
* rollout, Chefer, RISE: float64 NumPy written from the papers, fed with the model's attention
  probabilities / gradients (exported from JAX) or, for RISE, the same masks and scores.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trace_jax.attribution import common
from trace_jax.attribution import gradcam as gc
from trace_jax.models import build, get_config, init_params
from trace_jax.testing import CosTarget, torch_visual

sys.path.insert(0, os.path.dirname(__file__))
from conftest import torch_or_skip  # noqa: E402


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny():
  cfg = get_config("tiny")
  model = build(cfg)
  params = init_params(cfg, jax.random.PRNGKey(0))
  # Non-zero biases / LN params so the test exercises them (init leaves them at 0 / 1).
  r = np.random.default_rng(7)
  params = jax.tree.map(lambda l: jnp.asarray(np.asarray(l) + 0.05 * r.normal(size=l.shape), jnp.float32),
                        params)
  images = jnp.asarray(r.normal(size=(3, 32, 32, 3)), jnp.float32)
  ids = r.integers(1, 998, size=(3, 16))
  ids[:, 9] = 999  # end-of-text (highest id) -> pooled there
  ids = jnp.asarray(ids, jnp.int32)
  return cfg, model, params, images, ids


# ----------------------------------------------------------------------------- torch reference ViT (trace_jax/testing.py)


def text_embeds_np(model, params, ids):
  return np.asarray(common.text_targets(model, params, ids))


def test_torch_reference_forward_matches(tiny):
  torch = torch_or_skip()
  cfg, model, params, images, _ = tiny
  tv = torch_visual(params, cfg, torch)
  ours, _ = model.apply({"params": params}, images, method="encode_image")
  with torch.no_grad():
    theirs = tv(torch.tensor(np.asarray(images)).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- GradCAM


def _cls_patch_reshape(gh, gw):
  return lambda x: x[:, :, 0, 1:].reshape(x.shape[0], x.shape[1], gh, gw)


@pytest.mark.parametrize("layer", [-1, pytest.param(0, marks=pytest.mark.slow)])
@pytest.mark.parametrize("variant", ["elementwise", "hires"])
def test_gradcam_matches_grad_cam_package(tiny, layer, variant):
  torch = torch_or_skip()
  from pytorch_grad_cam import GradCAMElementWise, HiResCAM
  cfg, model, params, images, ids = tiny
  tv = torch_visual(params, cfg, torch)
  txt = text_embeds_np(model, params, ids)
  klass = {"elementwise": GradCAMElementWise, "hires": HiResCAM}[variant]
  relu_grad = variant == "elementwise"
  cam = klass(tv, [tv.blocks[layer].probs], reshape_transform=_cls_patch_reshape(4, 4))
  x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).contiguous()
  theirs = cam(x, targets=[CosTarget(t, torch) for t in txt])  # [B, 32, 32] min-max, cv2 bilinear
  ours = gc.explain_jit(model, params, images, ids, layer=layer, relu_grad=relu_grad, relu=True)
  # grid level: their hooked F and G ([CLS] row, patch columns), reduced as their get_cam_image does
  F = cam.activations_and_grads.activations[0].numpy().astype(np.float64)
  G = cam.activations_and_grads.gradients[0].numpy().astype(np.float64)
  ref = np.maximum(G * F, 0).sum(1) if relu_grad else np.maximum((G * F).sum(1), 0)
  ref = (ref - ref.min((1, 2), keepdims=True))
  ref = ref / (ref.max((1, 2), keepdims=True) + 1e-7)
  np.testing.assert_allclose(np.asarray(ours["grid"]), ref, atol=1e-4)
  # map level: grad-cam min-maxes, cv2-resizes (bilinear, half-pixel) and min-maxes AGAIN in
  # aggregate_multi_layers; min-max is affine, so that equals one more min-max of our map.
  np.testing.assert_allclose(np.asarray(common.minmax(ours["map"])), theirs, atol=2e-4)


def test_gradcam_grid_matches_jax_grad_reference(tiny):
  """Raw grid vs a direct float32 recomputation with jax.grad over the full perturbation tree, one pair
  at a time (a different code path: full model call, full tree, no vmap)."""
  from trace_jax.models import perturbation_zeros, l2_normalize
  cfg, model, params, images, ids = tiny
  grid = jax.jit(gc.gradcam_grid, static_argnames=("model", "layer"))(model, params, images, ids, layer=1)
  for b in range(images.shape[0]):
    im, tx = images[b:b + 1], ids[b:b + 1]
    z = perturbation_zeros(model, params, im, tx)

    def s(perts):
      out, aux = model.apply({"params": params, "perturbations": perts}, im, tx)
      return jnp.sum(out["image_embeds"] * jax.lax.stop_gradient(out["text_embeds"])), aux

    g, aux = jax.jit(jax.grad(s, has_aux=True))(z)
    F = np.asarray(aux["image"]["blocks"][1]["attn"], np.float64)[0, :, 0, 1:]
    G = np.asarray(g["visual"]["transformer"]["block_1"]["attn"]["attn"], np.float64)[0, :, 0, 1:]
    ref = (F * np.maximum(G, 0)).mean(0).reshape(4, 4)
    np.testing.assert_allclose(np.asarray(grid[b]), ref, rtol=1e-4, atol=1e-8)


def test_gradcam_one_image_many_prompts_equals_pairs(tiny):
  cfg, model, params, images, ids = tiny
  fn = jax.jit(gc.gradcam_grid, static_argnames=("model",))
  many = fn(model, params, images[:1], ids)
  one_by_one = jnp.concatenate([fn(model, params, images[:1], ids[i:i + 1]) for i in range(3)])
  pairs = fn(model, params, jnp.repeat(images[:1], 3, 0), ids)
  np.testing.assert_allclose(np.asarray(many), np.asarray(one_by_one), rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(np.asarray(many), np.asarray(pairs), rtol=1e-5, atol=1e-9)


def _float64_model(cfg):
  """build(cfg) computing in float64 throughout (call under ``jax.enable_x64``)."""
  model = build(cfg.replace(dtype="float64"))
  s = cfg.vision.image_size
  out, aux = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3), jnp.float64), jnp.ones((1, 4), jnp.int32))[0])
  blk = aux["image"]["blocks"][0]
  got = {out["image_embeds"].dtype, out["text_embeds"].dtype, blk["attn"].dtype, blk["tokens"].dtype}
  assert got == {jnp.dtype(jnp.float64)}, f"the float64 model computes parts in {sorted(map(str, got))}"
  return model


@pytest.mark.parametrize("relu_grad", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_gradcam_second_order_grad_matches_finite_differences(tiny, relu_grad):
  """d/dparams of a function of the cam (AMC trains through it) vs central finite differences.

  In float64 (model, params, images, FD), so the check is tight: with a per-element step of 1e-6 the
  central-difference truncation error is O(h^2) ~ 1e-12 relative and rounding ~ 1e-16 / 1e-6;
  measured |fd - dirderiv| / |dirderiv| ~ 2e-9 (relu_grad=True). The step is far too small to cross
  a kink of relu(G) for these fixed seeds. Tolerance rtol 1e-6."""
  cfg, _, params, images, ids = tiny
  w = np.random.default_rng(3).normal(size=(3, 4, 4))
  r = np.random.default_rng(4)
  v = jax.tree.map(lambda l: r.normal(size=l.shape), params)
  with jax.enable_x64(True):
    model = _float64_model(cfg)
    f64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    params, v, images, w = f64(params), f64(v), f64(images), jnp.asarray(w, jnp.float64)

    def f(p):
      cam = gc.gradcam_grid(model, p, images, ids, relu_grad=relu_grad, relu=False)
      return jnp.sum(cam * w) * 100.0

    f = jax.jit(f)
    assert f(params).dtype == jnp.float64
    g = jax.jit(jax.grad(f))(params)
    dirderiv = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    h = 1e-6
    plus = f(jax.tree.map(lambda a, b: a + h * b, params, v))
    minus = f(jax.tree.map(lambda a, b: a - h * b, params, v))
    fd = float(plus - minus) / (2 * h)
  assert abs(dirderiv) > 1e-3  # the test can fail: the gradient is not trivially zero
  np.testing.assert_allclose(dirderiv, fd, rtol=1e-6)
  # both towers receive gradient (through F, G and the text target)
  assert float(jnp.abs(g["text"]["text_projection"]).max()) > 0
  assert float(jnp.abs(g["visual"]["transformer"]["block_0"]["attn"]["query"]["kernel"]).max()) > 0


def test_gradcam_maps_in_unit_interval_and_constant_map(tiny):
  cfg, model, params, images, ids = tiny
  out = gc.explain_jit(model, params, images, ids)
  m = np.asarray(out["map"])
  assert m.shape == (3, 32, 32) and np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1
  # a constant map (e.g. a text that matches nothing -> all-zero cam) min-maxes to 0, not NaN
  z = common.finish(jnp.zeros((2, 4, 4)), (32, 32))
  assert np.isfinite(np.asarray(z["map"])).all() and float(jnp.abs(z["map"]).max()) == 0.0


def test_upsample_matches_torch_bilinear():
  torch = torch_or_skip()
  x = np.random.default_rng(0).normal(size=(2, 4, 5)).astype(np.float32)
  ours = common.upsample(jnp.asarray(x), (32, 40))
  theirs = torch.nn.functional.interpolate(torch.tensor(x)[:, None], size=(32, 40), mode="bilinear",
                                           align_corners=False)[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-6)


# ----------------------------------------------------------------------------- rollout


def np_rollout(attns, start=0):
  """Abnar & Zuidema: Â = (mean_h A + I) / rowsum; rollout = Â_{L-1} ... Â_start (float64)."""
  n = attns[0].shape[-1]
  r = np.eye(n)
  for a in attns[start:]:
    a = a.astype(np.float64).mean(0) + np.eye(n)
    a = a / a.sum(-1, keepdims=True)
    r = a @ r
  return r


@pytest.mark.parametrize("start", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_rollout_matches_numpy(tiny, start):
  from trace_jax.attribution import explain
  cfg, model, params, images, ids = tiny
  out = explain("rollout", model, params, images, ids, start_layer=start, normalize=False, text=True)
  _, aux = model.apply({"params": params}, images, ids)
  for b in range(3):
    attns = [np.asarray(blk["attn"][b]) for blk in aux["image"]["blocks"]]
    ref = np_rollout(attns, start)[0, 1:].reshape(4, 4)
    np.testing.assert_allclose(np.asarray(out["raw"][b]), ref, rtol=1e-5, atol=1e-7)
    tattns = [np.asarray(blk["attn"][b]) for blk in aux["text"]["blocks"]]
    eot = int(np.argmax(np.asarray(ids[b])))
    np.testing.assert_allclose(np.asarray(out["text"][b]), np_rollout(tattns)[eot], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- Chefer


def np_chefer(attns, grads, start=0):
  """Chefer et al. 2021 (CLIP notebook): R = I; R += mean_h(relu(G*A)) @ R (float64)."""
  n = attns[0].shape[-1]
  r = np.eye(n)
  for a, g in list(zip(attns, grads))[start:]:
    cam = np.maximum(g.astype(np.float64) * a, 0).mean(0)
    r = r + cam @ r
  return r


def torch_attn_grads(tv, x, txt, torch):
  """Attention probabilities and d(cos)/d(probs) of every block from the PyTorch reference."""
  store = []

  def hook(module, inputs, output):
    output.retain_grad()
    store.append(output)  # returns None: the output is left unchanged

  hooks = [b.probs.register_forward_hook(hook) for b in tv.blocks]
  emb = tv(x)
  s = (emb / emb.norm(dim=-1, keepdim=True) * torch.tensor(txt)).sum()
  s.backward()
  for h in hooks:
    h.remove()
  return [o.detach().numpy() for o in store], [o.grad.numpy() for o in store]


@pytest.mark.parametrize("target", ["cosine", pytest.param("logit", marks=pytest.mark.slow)])
def test_chefer_image_matches_numpy_on_torch_gradients(tiny, target):
  torch = torch_or_skip()
  from trace_jax.attribution import explain
  cfg, model, params, images, ids = tiny
  tv = torch_visual(params, cfg, torch)
  txt = text_embeds_np(model, params, ids)
  x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).contiguous()
  A, G = torch_attn_grads(tv, x, txt, torch)
  scale = float(np.exp(np.asarray(params["logit_scale"]))) if target == "logit" else 1.0
  out = explain("chefer", model, params, images, ids, target=target, normalize=False)
  for b in range(3):
    ref = np_chefer([a[b] for a in A], [scale * g[b] for g in G])[0, 1:].reshape(4, 4)
    np.testing.assert_allclose(np.asarray(out["raw"][b]), ref, rtol=2e-4, atol=1e-6)


def test_chefer_text_matches_numpy(tiny):
  """Text relevance R[eot, :] vs NumPy on gradients from a plain jax.grad over the full model call."""
  from trace_jax.attribution import explain
  from trace_jax.models import perturbation_zeros
  cfg, model, params, images, ids = tiny
  out = explain("chefer", model, params, images, ids, text=True, normalize=False)
  z = perturbation_zeros(model, params, images, ids)

  def s(perts):
    o, aux = model.apply({"params": params, "perturbations": perts}, images, ids)
    return jnp.sum(jnp.diagonal(o["image_embeds"] @ o["text_embeds"].T)), aux

  g, aux = jax.jit(jax.grad(s, has_aux=True))(z)
  for b in range(3):
    A = [np.asarray(blk["attn"][b]) for blk in aux["text"]["blocks"]]
    G = [np.asarray(g["text"]["transformer"][f"block_{i}"]["attn"]["attn"][b]) for i in range(2)]
    eot = int(np.argmax(np.asarray(ids[b])))
    np.testing.assert_allclose(np.asarray(out["text"][b]), np_chefer(A, G)[eot], rtol=2e-4, atol=1e-6)


# ----------------------------------------------------------------------------- saliency


def test_saliency_matches_captum(tiny):
  torch = torch_or_skip()
  from captum.attr import Saliency
  from trace_jax.attribution import explain
  cfg, model, params, images, ids = tiny
  tv = torch_visual(params, cfg, torch)
  txt = torch.tensor(text_embeds_np(model, params, ids))

  def fwd(x):
    e = tv(x)
    return (e / e.norm(dim=-1, keepdim=True) * txt).sum(-1)  # [B], one scalar per sample

  x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
  theirs = Saliency(fwd).attribute(x, abs=True).detach().numpy().transpose(0, 2, 3, 1)  # NHWC
  out = explain("saliency", model, params, images, ids)
  scale = np.abs(theirs).max()
  np.testing.assert_allclose(np.asarray(out["pixels"]) / scale, theirs / scale, atol=2e-4)
  ref = theirs.max(-1)
  ref = ref - ref.min((1, 2), keepdims=True)
  ref = ref / (ref.max((1, 2), keepdims=True) + 1e-7)
  np.testing.assert_allclose(np.asarray(out["map"]), ref, atol=2e-3)


# ----------------------------------------------------------------------------- RISE


def test_rise_matches_numpy_with_same_masks(tiny):
  torch = torch_or_skip()
  from trace_jax.attribution import explain, rise
  cfg, model, params, images, ids = tiny
  masks = rise.generate_masks(jax.random.PRNGKey(5), 40, (32, 32), s=4, p=0.5)
  m = np.asarray(masks, np.float64)
  assert m.min() >= 0 and m.max() <= 1 and abs(m.mean() - 0.5) < 0.1
  out = explain("rise", model, params, images, ids, masks=masks, p=0.5, batch_size=16, normalize=False)
  tv = torch_visual(params, cfg, torch)
  txt = text_embeds_np(model, params, ids).astype(np.float64)
  for b in range(3):
    x = np.asarray(images[b], np.float64)[None] * m[..., None]  # [N, H, W, 3]
    with torch.no_grad():
      e = tv(torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2)).numpy().astype(np.float64)
    sc = (e / np.linalg.norm(e, axis=-1, keepdims=True)) @ txt[b]
    ref = np.einsum("n,nhw->hw", sc, m) / (len(m) * 0.5)
    np.testing.assert_allclose(np.asarray(out["saliency"][b]), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["raw"][b]), ref.reshape(4, 8, 4, 8).mean((1, 3)),
                               rtol=1e-4, atol=1e-5)


def test_rise_deterministic_for_key(tiny):
  from trace_jax.attribution import explain
  cfg, model, params, images, ids = tiny
  a = explain("rise", model, params, images[:1], ids[:1], key=jax.random.PRNGKey(3), num_masks=32, s=4)
  b = explain("rise", model, params, images[:1], ids[:1], key=jax.random.PRNGKey(3), num_masks=32, s=4)
  c = explain("rise", model, params, images[:1], ids[:1], key=jax.random.PRNGKey(4), num_masks=32, s=4)
  np.testing.assert_array_equal(np.asarray(a["map"]), np.asarray(b["map"]))
  assert not np.allclose(np.asarray(a["map"]), np.asarray(c["map"]))


# ----------------------------------------------------------------------------- API: pairing, batching


METHOD_SETTINGS = {
    "gradcam": {}, "rollout": {"text": True}, "chefer": {"text": True}, "saliency": {},
    "rise": {"num_masks": 32, "s": 4, "key": np.asarray(jax.random.PRNGKey(2))},
}


@pytest.mark.slow  # 3 shapes x 5 methods = 15 compilations
@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_batched_equals_one_by_one(tiny, method):
  from trace_jax.attribution import explain
  cfg, model, params, images, ids = tiny
  kw = METHOD_SETTINGS[method]
  pairs = explain(method, model, params, images, ids, **kw)
  one_img = explain(method, model, params, images[:1], ids, **kw)  # 1 image x 3 prompts
  for b in range(3):
    single = explain(method, model, params, images[b:b + 1], ids[b:b + 1], **kw)
    for k in ("grid", "map", "score") + (("text",) if "text" in single else ()):
      np.testing.assert_allclose(np.asarray(pairs[k][b]), np.asarray(single[k][0]), rtol=1e-4, atol=2e-5,
                                 err_msg=f"{method} {k} pair {b}")
    single0 = explain(method, model, params, images[:1], ids[b:b + 1], **kw)
    np.testing.assert_allclose(np.asarray(one_img["map"][b]), np.asarray(single0["map"][0]), rtol=1e-4,
                               atol=2e-5, err_msg=f"{method} one-image prompt {b}")
  for k in ("grid", "map"):
    v = np.asarray(pairs[k])
    assert np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1, (method, k)
  assert pairs["grid"].shape == (3, 4, 4) and pairs["map"].shape == (3, 32, 32) and pairs["score"].shape == (3,)


def test_pairing_errors(tiny):
  from trace_jax.attribution import explain
  cfg, model, params, images, ids = tiny
  with pytest.raises(ValueError, match="cannot pair 3 images with 2 texts"):
    explain("gradcam", model, params, images, ids[:2])
  with pytest.raises(ValueError, match="unknown attribution method"):
    explain("nope", model, params, images, ids)
  with pytest.raises(ValueError, match="exactly one of"):
    explain("gradcam", model, params, images)


def test_query_vectors_equal_text_embeddings(tiny):
  from trace_jax.attribution import explain
  cfg, model, params, images, ids = tiny
  q, _ = model.apply({"params": params}, ids, method="encode_text")  # un-normalised is fine
  a = explain("gradcam", model, params, images, ids)
  b = explain("gradcam", model, params, images, query=q)
  np.testing.assert_allclose(np.asarray(a["map"]), np.asarray(b["map"]), rtol=1e-5, atol=1e-6)
