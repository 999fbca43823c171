"""M2IB (trace_jax/attribution/m2ib.py) against an independent float64 reference.

The reference (``Ref`` / ``ref_m2ib`` below) is a float64 PyTorch re-implementation written from
notes/m2ib.md: a plain functional forward of our CLIP from our parameters (anchored to the model by
``test_reference_forward_matches_model``), the bottleneck hooked on the output of block ``layer`` and
the loop as the official ``_train_bottleneck``: ``steps`` iterations of (forward on K copies -> loss
-> backward -> Adam step) with a hand-written torch Adam; the read-out is the capacity buffer of the
last forward. (The blocks before the bottleneck and the other tower do not depend on alpha; they run
once instead of at every step, which gives the same values.) Noise is replayed (note §11:
"deterministic variants that an independent implementation can match to ~1e-4"). Tolerance on the
normalised maps: 1e-4.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_peer, torch_or_skip

from trace_jax.attribution import m2ib
from trace_jax.models import build, get_config, init_params
from trace_jax.models.layers import ResidualAttentionBlock

TOL = 1e-4


# ----------------------------------------------------------------------------------------------
# float64 torch reference, written from the note (not from trace_jax code).

class Ref:
  """Functional float64 forward of the OpenAI-layout CLIP parameters (our param tree)."""

  def __init__(self, torch, params, cfg):
    self.torch, self.F, self.cfg = torch, torch.nn.functional, cfg
    self.p = jax.tree.map(lambda a: torch.tensor(np.asarray(a, np.float64)), params)

  def ln(self, p, x):
    return self.F.layer_norm(x, x.shape[-1:], p["ln"]["scale"], p["ln"]["bias"], 1e-5)

  def act(self, x):
    if self.cfg.act == "quick_gelu":
      return x * self.torch.sigmoid(1.702 * x)
    return self.F.gelu(x)

  def block(self, p, x, causal):
    torch = self.torch
    n, w = x.shape[-2:]
    a = p["attn"]
    heads, hd = a["query"]["bias"].shape
    h = self.ln(p["ln_1"], x)

    def proj(name):
      y = h @ a[name]["kernel"].reshape(w, heads * hd) + a[name]["bias"].reshape(-1)
      return y.reshape(*h.shape[:-1], heads, hd).transpose(-2, -3)  # [.., H, N, hd]
    q, k, v = proj("query") * hd ** -0.5, proj("key"), proj("value")
    logits = q @ k.transpose(-1, -2)
    if causal:
      mask = torch.ones(n, n, dtype=torch.bool).tril()
      logits = logits.masked_fill(~mask, -math.inf)
    o = (logits.softmax(-1) @ v).transpose(-2, -3).reshape(*x.shape[:-1], heads * hd)
    x = x + o @ a["out"]["kernel"].reshape(heads * hd, w) + a["out"]["bias"]
    h = self.ln(p["ln_2"], x)
    h = self.act(h @ p["mlp_fc"]["kernel"] + p["mlp_fc"]["bias"]) @ p["mlp_proj"]["kernel"] + p["mlp_proj"]["bias"]
    return x + h

  def run(self, tower, x, start=0, stop=None):
    """Blocks start..stop-1 of ``tower`` ('visual' | 'text', causal) on x [B, N, W] -> (x, block outputs)."""
    cfg = self.cfg.vision if tower == "visual" else self.cfg.text
    outs = []
    for i in range(start, cfg.layers if stop is None else stop):
      x = self.block(self.p[tower]["transformer"][f"block_{i}"], x, tower == "text")
      outs.append(x)
    return x, outs

  def image_in(self, images):
    """images NHWC numpy -> ln_pre(cls + patches + pos) [B, N, W]."""
    v = self.p["visual"]
    x = self.torch.tensor(np.asarray(images, np.float64)).permute(0, 3, 1, 2)
    ps = self.cfg.vision.patch_size
    x = self.F.conv2d(x, v["conv1"].permute(3, 2, 0, 1), stride=ps).flatten(2).transpose(1, 2)
    cls = v["class_embedding"].expand(x.shape[0], 1, -1)
    return self.ln(v["ln_pre"], self.torch.cat([cls, x], 1) + v["positional_embedding"])

  def image_out(self, x):
    v = self.p["visual"]
    return self.ln(v["ln_post"], x[:, 0]) @ v["proj"]

  def text_in(self, ids):
    t = self.p["text"]
    ids = self.torch.tensor(np.asarray(ids))
    return t["token_embedding"]["embedding"][ids] + t["positional_embedding"][: ids.shape[1]]

  def text_out(self, x, ids):
    t = self.p["text"]
    x = self.ln(t["ln_final"], x)
    eot = self.torch.tensor(np.asarray(ids)).argmax(-1)  # EOT = highest id (HF / OpenAI)
    return x[self.torch.arange(x.shape[0]), eot] @ t["text_projection"]

  def image(self, images):
    """images NHWC numpy -> (projected CLS embedding [B, E], block outputs)."""
    x, outs = self.run("visual", self.image_in(images))
    return self.image_out(x), outs

  def text(self, ids):
    x, outs = self.run("text", self.text_in(ids))
    return self.text_out(x, ids), outs


def ref_m2ib(ref, modality, image, ids, *, layer, beta=0.1, steps=10, lr=1.0, samples=10, noise,
             sigma=1.0, out_size=224):
  """Official M2IB loop for ONE pair (image [1,H,W,3], ids [1,L]) in float64; noise [steps,K,L,D].

  The official code runs both towers in full on K copies at every step; the blocks up to the
  bottleneck and the other tower do not depend on alpha, so they run once here (same values).
  """
  torch = ref.torch
  other = (ref.text(ids)[0] if modality == "image" else ref.image(image)[0]).detach()
  if modality == "image":
    x = ref.run("visual", ref.image_in(image), 0, layer + 1)[0]          # [1, N, D] block `layer` out
    head = lambda t: ref.image_out(ref.run("visual", t, layer + 1)[0])
  else:
    x = ref.run("text", ref.text_in(ids), 0, layer + 1)[0]
    head = lambda t: ref.text_out(ref.run("text", t, layer + 1)[0], np.repeat(np.asarray(ids), samples, 0))
  noise = torch.tensor(np.asarray(noise, np.float64))
  shape = noise.shape[2:]
  alpha = torch.full(shape, 5.0, dtype=torch.float64, requires_grad=True)
  m = torch.zeros(shape, dtype=torch.float64)
  v = torch.zeros(shape, dtype=torch.float64)
  b1, b2, eps = 0.9, 0.999, 1e-8
  for s in range(steps):
    lam = torch.sigmoid(alpha)
    mu = x[0] * lam
    var = (sigma * (1 - lam)) ** 2
    cap = -0.5 * (1 + torch.log(var) - mu ** 2 - var)          # note §3; the same for the K copies
    emb = head(mu + torch.sqrt(var) * noise[s])                 # [K, E]
    fit = torch.nn.functional.cosine_similarity(emb, other.expand_as(emb), eps=1e-6).mean()
    loss = beta * cap.mean() - fit                              # note §4
    (g,) = torch.autograd.grad(loss, alpha)
    with torch.no_grad():                                      # torch.optim.Adam, written out
      t = s + 1
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
      alpha -= lr * mhat / (vhat.sqrt() + eps)
  scores = torch.nansum(cap.detach(), -1)                       # capacity of the last forward
  if modality == "text":
    return ((scores - scores.min()) / (scores.max() - scores.min())).numpy()
  g = int(round((scores.shape[0] - 1) ** 0.5))
  grid = scores[1:].reshape(1, 1, g, g)
  up = torch.nn.functional.interpolate(grid, size=out_size, mode="bilinear", align_corners=False)[0, 0]
  return ((up - up.min()) / (up.max() - up.min())).numpy(), grid[0, 0].numpy()


# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
  """'small' (4 vision / 3 text blocks, 8x8 patch grid) at width 64 instead of 128: the same
  structure for every bottleneck position, a quarter of the float64 reference's matmul cost."""
  cfg = get_config("small")
  cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, width=64), embed_dim=64,
                    text=dataclasses.replace(cfg.text, width=64))
  return cfg, build(cfg), init_params(cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def tiny():
  cfg = get_config("tiny")
  return cfg, build(cfg), init_params(cfg, jax.random.PRNGKey(1))


def _inputs(cfg, n_img, seed=0):
  rng = np.random.default_rng(seed)
  s = cfg.vision.image_size
  images = rng.normal(size=(n_img, s, s, 3)).astype(np.float32)
  eos = cfg.text.eos_token_id
  # three texts of 4, 7 and 5 tokens (SOT .. EOT), padded with 0 to 8
  rows = [[1, 17, 23, eos], [1, 5, 9, 44, 31, 8, eos], [1, 300, 2, 71, eos]]
  ids = np.zeros((3, 8), np.int32)
  for i, r in enumerate(rows):
    ids[i, : len(r)] = r
  return images, ids, [len(r) for r in rows]


def _noise(seed, steps, k, n, d, pairs=None):
  rng = np.random.default_rng(seed)
  shape = (steps, k, n, d) if pairs is None else (pairs, steps, k, n, d)
  return rng.standard_normal(shape).astype(np.float32)


def test_reference_forward_matches_model(small):
  """The float64 reference IS our model (embeddings and block outputs), so the M2IB comparison is fair."""
  torch = torch_or_skip()
  cfg, model, params = small
  images, ids, _ = _inputs(cfg, 3)
  ref = Ref(torch, params, cfg)
  (out, aux) = model.apply({"params": params}, jnp.asarray(images), jnp.asarray(ids))
  e_img, outs_img = ref.image(images)
  e_txt, outs_txt = ref.text(ids)
  np.testing.assert_allclose(out["image_embeds"], (e_img / e_img.norm(dim=-1, keepdim=True)).numpy(), atol=2e-5)
  np.testing.assert_allclose(out["text_embeds"], (e_txt / e_txt.norm(dim=-1, keepdim=True)).numpy(), atol=2e-5)
  for i in range(cfg.vision.layers):
    np.testing.assert_allclose(aux["image"]["blocks"][i]["tokens"], outs_img[i].numpy(), atol=1e-4, rtol=1e-4)
  for i in range(cfg.text.layers):
    np.testing.assert_allclose(aux["text"]["blocks"][i]["tokens"], outs_txt[i].numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vlayer,tlayer,beta,lr,steps,samples,sigma", [
    (1, 0, 0.1, 1.0, 10, 10, None),   # official defaults; 1 full block + the last (one-row) block
    pytest.param(2, 1, 1.0, 0.5, 5, 3, None, marks=pytest.mark.slow),  # other settings; one-row block
    (3, 2, 0.1, 1.0, 4, 4, 0.5),      # bottleneck after the last block; paper's sigma
])
def test_matches_float64_reference(small, vlayer, tlayer, beta, lr, steps, samples, sigma):
  torch = torch_or_skip()
  cfg, model, params = small
  images, ids, lens = _inputs(cfg, 1)
  ref = Ref(torch, params, cfg)
  n_v, d_v = 1 + cfg.vision.grid ** 2, cfg.vision.width
  P = ids.shape[0]
  nv = _noise(1, steps, samples, n_v, d_v, pairs=P)
  nt = _noise(2, steps, samples, ids.shape[1], cfg.text.width, pairs=P)
  out = m2ib.explain(model, params, images, ids, layer=vlayer, text_layer=tlayer, beta=beta, lr=lr,
                     steps=steps, samples=samples, sigma=sigma, image_noise=nv, text_noise=nt)
  assert out["map"].shape == (P, 224, 224) and out["grid"].shape == (P, 8, 8) and out["text"].shape == (P, 8)
  kw = dict(beta=beta, steps=steps, lr=lr, samples=samples, sigma=1.0 if sigma is None else sigma)
  for p in range(P):
    l = lens[p]
    vmap_ref, grid_ref = ref_m2ib(ref, "image", images, ids[p:p + 1, :l], layer=vlayer, noise=nv[p], **kw)
    np.testing.assert_allclose(out["map"][p], vmap_ref, atol=TOL)
    np.testing.assert_allclose(out["grid_raw"][p], grid_ref, rtol=TOL, atol=TOL)
    # unpadded reference (the official usage) vs our padded ids with the default lengths
    t_ref = ref_m2ib(ref, "text", images, ids[p:p + 1, :l], layer=tlayer, noise=nt[p][:, :, :l], **kw)
    np.testing.assert_allclose(out["text"][p, :l], t_ref, atol=TOL)
    np.testing.assert_array_equal(out["text"][p, l:], 0.0)
    assert out["text_valid"][p].sum() == l


def test_padded_official_variant_and_zero_noise(tiny):
  """``lengths = L`` reproduces the official run on ids padded to L (note §7); zero noise (note §11)."""
  torch = torch_or_skip()
  cfg, model, params = tiny
  images, ids, lens = _inputs(cfg, 1)
  ref = Ref(torch, params, cfg)
  ids = ids[1:2]
  L = ids.shape[1]
  nt = np.zeros((10, 10, L, cfg.text.width), np.float32)
  nv = np.zeros((10, 10, 1 + cfg.vision.grid ** 2, cfg.vision.width), np.float32)
  out = m2ib.explain(model, params, images, ids, layer=0, lengths=L, image_noise=nv, text_noise=nt,
                     out_size=32)
  t_ref = ref_m2ib(ref, "text", images, ids, layer=0, noise=nt)
  np.testing.assert_allclose(out["text"][0], t_ref, atol=TOL)
  v_ref, _ = ref_m2ib(ref, "image", images, ids, layer=0, noise=nv, out_size=32)
  np.testing.assert_allclose(out["map"][0], v_ref, atol=TOL)
  # padded positions change the official text map (note §7): the default (unpadded) run differs
  # (same static arguments and shapes as the one-by-one calls of the batched test: one compilation)
  out_u = m2ib.explain(model, params, images, ids, layer=0, image_noise=nv, text_noise=nt, out_size=32)
  assert np.max(np.abs(out_u["text"][0, : lens[1]] - out["text"][0, : lens[1]])) > 1e-3


def test_last_block_one_row_equals_full_block(small):
  cfg, model, params = small
  rng = np.random.default_rng(3)
  for tower, c, causal in (("visual", cfg.vision, False), ("text", cfg.text, True)):
    p = params[tower]["transformer"]["block_0"]
    x = jnp.asarray(rng.normal(size=(3, 9, c.width)), jnp.float32)
    mask = jnp.tril(jnp.ones((9, 9), bool)) if causal else None
    full, _ = ResidualAttentionBlock(c.heads, c.mlp_ratio, cfg.act).apply({"params": p}, x, mask)
    for q in (0, 4, 8):
      row = m2ib.block_one_query(p, x, q, heads=c.heads, act=cfg.act, dtype=jnp.float32, causal=causal)
      np.testing.assert_allclose(row, full[:, q], atol=2e-6)


def test_batched_equals_one_by_one_and_shared_image(tiny):
  cfg, model, params = tiny
  images, ids, _ = _inputs(cfg, 3)
  P = 3
  nv = _noise(5, 10, 10, 1 + cfg.vision.grid ** 2, cfg.vision.width, pairs=P)
  nt = _noise(6, 10, 10, 8, cfg.text.width, pairs=P)
  kw = dict(layer=0, text_layer=0, out_size=32)
  out = m2ib.explain(model, params, images, ids, image_noise=nv, text_noise=nt, **kw)
  for p in range(P):
    one = m2ib.explain(model, params, images[p:p + 1], ids[p:p + 1], image_noise=nv[p], text_noise=nt[p], **kw)
    for k in ("map", "grid", "text", "text_raw", "image_loss", "text_loss"):
      np.testing.assert_allclose(out[k][p], one[k][0], atol=1e-5, rtol=1e-5, err_msg=k)
  # one image, three texts: the image prefix runs once, results equal the repeated-image batch
  shared = m2ib.explain(model, params, images[:1], ids, image_noise=nv, text_noise=nt, **kw)
  rep = m2ib.explain(model, params, np.repeat(images[:1], 3, 0), ids, image_noise=nv, text_noise=nt, **kw)
  for k in ("map", "text"):
    np.testing.assert_allclose(shared[k], rep[k], atol=1e-5)


def test_deterministic_for_a_key_and_valid_maps(tiny):
  cfg, model, params = tiny
  images, ids, _ = _inputs(cfg, 1)
  a = m2ib.explain(model, params, images, ids, layer=0, key=jax.random.PRNGKey(7), out_size=32)
  b = m2ib.explain(model, params, images, ids, layer=0, key=jax.random.PRNGKey(7), out_size=32)
  c = m2ib.explain(model, params, images, ids, layer=0, key=jax.random.PRNGKey(8), out_size=32)
  for k in ("map", "grid", "text"):
    np.testing.assert_array_equal(a[k], b[k])
    assert np.all(np.isfinite(a[k])) and a[k].min() >= 0 and a[k].max() <= 1
  assert np.max(np.abs(a["map"] - c["map"])) > 1e-3
  np.testing.assert_allclose(a["map"].reshape(3, -1).max(-1), 1.0)
  np.testing.assert_allclose(a["map"].reshape(3, -1).min(-1), 0.0)


def test_larger_beta_shrinks_the_attribution(tiny):
  """Built case: 8 tokens x 4 features read out linearly with weights 1, 1/2, 1/4, 1/8, 1/16, 0, 0, 0
  (tokens 5-7 carry nothing), the target shifted off the clean embedding. The compression gradient is
  the same for every element, the fit gradient falls with the weight, so a larger beta keeps fewer
  tokens (paper Fig. 8: "the highlighted areas increase when beta decreases"). Area = tokens that keep
  more than 1 nat; with beta = 0 the unused tokens get no gradient at all and keep their initial
  capacity. On the real model (explain) the total retained capacity falls strictly with beta."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  w = jnp.asarray([1, .5, .25, .125, .0625, 0, 0, 0], jnp.float32)
  suffix = lambda t: jnp.einsum("l,kld->kd", w, t)
  target = jnp.einsum("l,ld->d", w, x) + 0.3
  area, area_norm = [], []
  opt = jax.jit(lambda beta: m2ib._optimise(x, target, jnp.ones(8, bool), jax.random.PRNGKey(0), None,
                                             suffix=suffix, beta=beta, lr=1.0, sigma=None, steps=10,
                                             samples=10)[0])  # one compilation for the four betas
  for beta in (0.0, 0.003, 0.3, 3.0):
    c = np.asarray(opt(jnp.float32(beta)).sum(-1))
    area.append(int(np.sum(c > 1.0)))
    area_norm.append(int(np.sum(np.asarray(m2ib.minmax(jnp.asarray(c))) >= 0.5)))
    if beta > 0:
      assert np.all(c[5:] < 0.05), c   # the tokens that carry nothing are squeezed out (init: ~19)
  assert area == sorted(area, reverse=True) and len(set(area)) == 4, area
  assert area_norm == sorted(area_norm, reverse=True) and area_norm[0] > area_norm[-1], area_norm
  cfg, model, params = tiny
  images, ids, _ = _inputs(cfg, 1)
  total = []
  for beta in (0.0, 0.1, 1.0, 10.0):
    # both modalities at out_size 32: the compilation of test_deterministic_for_a_key_and_valid_maps
    out = m2ib.explain(model, params, images, ids, layer=0, beta=beta, key=jax.random.PRNGKey(0),
                       out_size=32)
    total.append(np.asarray(out["grid_raw"]).sum(axis=(1, 2)))
  assert np.all(np.diff(np.stack(total), axis=0) < 0), total


def test_minmax_constant_is_zero_not_nan():
  x = jnp.full((2, 5), 3.0)
  np.testing.assert_array_equal(m2ib.minmax(x), 0.0)
  v = jnp.array([[True, True, False, False, False]] * 2)
  y = m2ib.minmax(jnp.array([[1.0, 3.0, 9.0, -4.0, 0.0]] * 2), v)
  np.testing.assert_allclose(y, [[0, 1, 0, 0, 0]] * 2)


def test_bilinear_matches_torch():
  torch = torch_or_skip()
  rng = np.random.default_rng(0)
  for h, w, out in ((4, 4, (32, 32)), (7, 5, (224, 100)), (14, 14, (224, 224)), (6, 6, (4, 9))):
    g = rng.normal(size=(2, h, w)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.tensor(g)[:, None], size=out, mode="bilinear",
                                           align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(m2ib.upsample_bilinear(jnp.asarray(g), out), want, atol=1e-5)


def test_adam_step_equals_torch_adam():
  """Note §5: torch.optim.Adam(lr) defaults, including its float64 bias corrections."""
  torch = torch_or_skip()
  rng = np.random.default_rng(0)
  n = 9
  grads = (rng.normal(size=(n, 5)) * np.logspace(-6, 1, 5)).astype(np.float32)
  for lr in (1.0, 0.3):
    p_t = torch.nn.Parameter(torch.zeros(5, dtype=torch.float32))
    opt_t = torch.optim.Adam([p_t], lr=lr)
    p = m = v = jnp.zeros(5, jnp.float32)
    bc1, bc2 = m2ib.adam_tables(n)
    for t, g in enumerate(grads):
      p_t.grad = torch.tensor(g)
      opt_t.step()
      p, m, v = m2ib.adam_step(p, m, v, jnp.asarray(g), lr, bc1[t], bc2[t])
      np.testing.assert_allclose(np.asarray(p), p_t.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise(tiny):
  cfg, model, params = tiny
  images, ids, _ = _inputs(cfg, 1)
  with pytest.raises(ValueError, match="layer=9 is out of range"):
    m2ib.explain(model, params, images, ids)  # official default 9 on a 2-block tower
  with pytest.raises(ValueError, match="text_layer=2 is out of range"):
    m2ib.explain(model, params, images, ids, layer=0, text_layer=2)
  with pytest.raises(ValueError, match="layer=-1"):
    m2ib.explain(model, params, images, ids, layer=-1)
  with pytest.raises(ValueError, match="cannot pair 2 images with 3 texts"):
    m2ib.explain(model, params, np.repeat(images, 2, 0), ids, layer=0)
  with pytest.raises(ValueError, match="image_noise must have shape"):
    m2ib.explain(model, params, images, ids, layer=0, image_noise=np.zeros((10, 10, 3, 3)))
  with pytest.raises(ValueError, match="lengths"):
    m2ib.explain(model, params, images, ids, layer=0, lengths=2)
  with pytest.raises(ValueError, match="steps"):
    m2ib.explain(model, params, images, ids, layer=0, steps=1)
  with pytest.raises(ValueError, match="query"):
    m2ib.explain(model, params, images, ids, layer=0, query=np.zeros((3, cfg.embed_dim)))


@pytest.mark.slow
def test_matches_hf_port_of_the_official_code():
  """Optional extra: benchmarks/m2ib_torch_port.py (the authors' behaviour on a HF CLIPModel, hooks
  and torch.optim.Adam, float32) on a small random HF model converted with convert.hf, replayed noise."""
  torch = torch_or_skip()
  import importlib.util
  import pathlib
  transformers = require_peer("transformers")
  from trace_jax.convert.hf import from_torch_model
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "m2ib_torch_port.py"
  spec = importlib.util.spec_from_file_location("m2ib_torch_port", path)
  port = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(port)
  hcfg = transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                       max_position_embeddings=16, vocab_size=1000, eos_token_id=999, bos_token_id=998,
                       pad_token_id=0),
      vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
                         image_size=48, patch_size=8),
      projection_dim=32)
  torch.manual_seed(0)
  hf = transformers.CLIPModel(hcfg).eval()
  cfg, params = from_torch_model(hf)
  model = build(cfg)
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(1, 3, 48, 48)).astype(np.float32)
  ids = np.array([[998, 17, 250, 31, 999]])
  nv = _noise(11, 10, 10, 37, 64)
  nt = _noise(12, 10, 10, 5, 32)
  out = m2ib.explain(model, params, pixels.transpose(0, 2, 3, 1), ids, layer=1, text_layer=1,
                     image_noise=nv, text_noise=nt)
  t_ids, t_pix = torch.tensor(ids), torch.tensor(pixels)
  vm = port.vision_heatmap_iba(t_ids, t_pix, hf, 1, 0.1, 1, noise=nv)
  tm = port.text_heatmap_iba(t_ids, t_pix, hf, 1, 0.1, 1, noise=nt)
  np.testing.assert_allclose(out["map"][0], vm, atol=TOL)
  np.testing.assert_allclose(out["text"][0], tm, atol=TOL)
