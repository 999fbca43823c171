"""TRACE training, evaluation and report on a tiny real trace_shapes build (docs/trace.md §8-10).

* a few train steps of the TRACE objective (CRATE tower, L_clip + cluster + anchor + token) lower the
  loss on a fixed batch;
* the step sharded over 8 emulated CPU devices (mesh data=2 x fsdp=4) gives the same losses and updated
  parameters as on one device (losses rtol 1e-5; parameters after two AdamW steps rtol 1e-5 + atol 2e-6,
  Adam eps 1e-4 as in tests/test_sharded_step.py: summation order differs, ~1e-7 relative in gradients);
* evaluation with oracle maps (each word's map = the union of its GT patch masks in the caption, one-hot
  memberships from the GT) against an independent loop over the raw examples (scene.word_masks):
  recall 1, precision / IoU = |GT| / |union| per token, purity 1;
* the closed vocabulary leaves out the open-vocabulary words; the report writes PNGs and the table.
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trace_jax.data import pipeline
from trace_jax.data.shapes import builder as shapes_builder
from trace_jax.data.shapes import scene
from trace_jax.data.shapes.concepts import load_concepts
from trace_jax.trace import evaluate as ev
from configs import common
from trace_jax.objectives.trace import default_trace_config, make_trace_task
from trace_jax.trace.vocab import token_to_vocab
from trace_jax.training import mesh as mesh_lib, sharding as shd, state as state_lib, step as step_lib

TINY = dict(image_size=32, split_sizes={'train': 24, 'validation': 4, 'test': 6, 'heldout': 4, 'openvocab': 6})
FAST = {"xla_backend_optimization_level": 0}
B = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds_trace"))
  shapes_builder.prepare(data_dir=d, **TINY)
  load = lambda split: pipeline.load_split(data_dir=d, split=split, build=False, **TINY)
  train = load("train")
  caps = [pipeline._str(train[i]["caption"]) for i in range(len(train))]
  return {"train": train, "test": load("test"), "openvocab": load("openvocab"), "captions": caps,
          "tok": pipeline.make_tokenizer()}


def _config(**trace):
  c = common.get_config()
  c.data.image_size, c.data.batch_size = 32, B
  c.loss.name = "trace"
  c.loss.trace = default_trace_config()
  c.loss.trace.anchor_dim = 16
  for k, v in trace.items():
    c.loss.trace[k] = v
  c.model.preset = "crate-clip-tiny"       # 32 px, patch 8, width 64, 2 layers
  c.model.vision_heads = 5                 # one subspace per coarse concept (5)
  c.model.crate_dim_head = 8
  c.model.text_layers = 1
  c.optim.schedule, c.optim.lr, c.optim.eps = "constant", 3e-3, 1e-4
  return c


@pytest.fixture(scope="module")
def task(data):
  return make_trace_task(_config(), {"train_captions": data["captions"], "tokenizer": data["tok"]})


def _batch(data, step=0):
  b = pipeline.get_batch(data["train"], step, batch_size=B, seed=1, tokenizer=data["tok"], patch_size=8,
                         process_index=0, process_count=1)
  return {k: b[k] for k in ("image", "caption_ids")}


def test_vocab_closed_and_token_map(task, data):
  closed, opened = task.vocab.closed, task.vocab.open
  assert not set(closed.words) & {"hexagon", "crescent", "arrow"}
  assert {"hexagon", "crescent", "arrow"} <= set(opened.words)
  assert closed.words == opened.words[:len(closed.words)]                       # same ids for shared words
  t2v = token_to_vocab(data["tok"], closed)
  ids = data["tok"](["a red triangle and a hexagon on grass"])[0]
  words = [None, "a", "red", "triangle", "and", "a", "hexagon", "on", "grass", None]
  for i, w in zip(ids, words):
    want = closed.words.index(w) if w in closed.words else -1
    assert t2v[i] == want, w
  np.testing.assert_array_equal(np.asarray(task.arrays["assignment"]), [0, 1, 2, 3, 4])


def test_train_steps_decrease_loss(task, data):
  tx, sched = state_lib.make_optimizer(_config().optim, 10)
  mesh = mesh_lib.single_device_mesh()
  state, sh = state_lib.create_state(task.init_params, tx, mesh, 0, FAST)
  f = step_lib.jit_train_step(step_lib.make_train_step(task.loss_fn, tx, sched), sh, mesh, FAST)
  batch = shd.global_batch(_batch(data), mesh)
  losses, comps = [], []
  with jax.set_mesh(mesh):
    for _ in range(8):
      state, m = f(state, batch)
      losses.append(float(m["loss"]))
      comps.append({k: float(m[k]) for k in ("global", "trace_cluster", "trace_anchor", "trace_token")})
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses
  # every TRACE term is trained (the total is their weighted sum plus L_clip)
  np.testing.assert_allclose(losses[0], sum(comps[0].values()), rtol=1e-5)
  assert set(state.params) == {"clip", "trace"}


@pytest.mark.slow
def test_sharded_trace_step_matches_single_device(task, data):
  assert jax.device_count() == 8, "tests/conftest.py should give 8 emulated CPU devices"
  tx, sched = state_lib.make_optimizer(_config().optim, 10)

  def run(mesh):
    state, sh = state_lib.create_state(task.init_params, tx, mesh, 0, FAST)
    f = step_lib.jit_train_step(step_lib.make_train_step(task.loss_fn, tx, sched), sh, mesh, FAST)
    out = []
    with jax.set_mesh(mesh):
      for k in range(2):
        state, m = f(state, shd.global_batch(_batch(data, k), mesh))
        out.append(float(m["loss"]))
    return out, jax.device_get(state.params), state

  l1, p1, _ = run(mesh_lib.single_device_mesh())
  l8, p8, st8 = run(mesh_lib.make_mesh(2, 4))
  w = st8.params["trace"]["kernel"]                        # [64, 16]: embed axis split over fsdp
  assert w.sharding.spec[0] == "fsdp" and w.addressable_shards[0].data.shape[0] == 64 // 4
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert l1[0] != l1[1]
  for (path, a), b in zip(jax.tree.leaves_with_path(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def _oracle(task, vocab):
  """maps_fn: word v's map in row b = union of the GT patch masks of the tokens of v in caption b;
  memberships one-hot on the first subspace assigned to the patch's GT coarse concept."""
  t2v = token_to_vocab(task.tokenizer, vocab)
  assignment = np.asarray(task.arrays["assignment"])
  label_coarse = np.asarray(load_concepts().fine_coarse)

  def f(params, b):
    bsz, L, g, _ = b["token_masks"].shape
    h = np.zeros((bsz, len(vocab.words), g * g))
    vid = t2v[b["caption_ids"]]
    for r in range(bsz):
      for l in range(L):
        if vid[r, l] >= 0:
          h[r, vid[r, l]] = np.maximum(h[r, vid[r, l]], (b["token_masks"][r, l] >= 0.5).reshape(-1))
    gc = ev.patch_coarse_labels(b["semantic"], 8, label_coarse)
    first = np.asarray([int(np.nonzero(assignment == c)[0][0]) for c in range(len(vocab.coarse_names))])
    m = np.eye(len(assignment))[first[np.maximum(gc, 0)]]
    return h, m
  return f


def _reference(source, vocab, words_only=None):
  """Independent per-token precision / recall / IoU of the union oracle, from the raw examples."""
  kinds = {scene.KIND[k] for k in ev.KINDS}
  P, R, I = [], [], []
  for i in range(len(source)):
    e = source[i]
    words = pipeline._str(e["caption"]).split(" ")
    wm = scene.word_masks(e)                                                  # [W, S, S] bool
    s = wm.shape[-1]
    gt = wm.reshape(len(words), s // 8, 8, s // 8, 8).mean(axis=(2, 4)) >= 0.5
    sel = [j for j, w in enumerate(words) if int(e["word_kind"][j]) in kinds and w in vocab.words
           and gt[j].any() and (words_only is None or w in words_only)]
    for j in sel:
      union = np.any([gt[k] for k, w in enumerate(words) if w == words[j]], axis=0)
      tp = (gt[j] & union).sum()
      P.append(tp / union.sum())
      R.append(tp / gt[j].sum())
      I.append(tp / (gt[j] | union).sum())
  return len(P), np.mean(P), np.mean(R), np.mean(I)


@pytest.mark.parametrize("setting", ["closed", "open"])
def test_evaluate_oracle_known_answer(task, data, setting):
  vocab = task.vocab.closed if setting == "closed" else task.vocab.open
  src = data["test" if setting == "closed" else "openvocab"]
  r = ev.evaluate(task, None, src, setting=setting, batch_size=4, maps_fn=_oracle(task, vocab))
  n, p, rec, iou = _reference(src, vocab, None if setting == "closed" else task.vocab.open_words)
  assert r["tokens"] == n > 0
  np.testing.assert_allclose([r["precision"], r["recall"], r["miou"]], [p, rec, iou], rtol=1e-12)
  assert r["recall"] == 1.0
  assert r["purity"] == 1.0 and r["purity_balanced"] == 1.0
  assert sum(x["tokens"] for x in r["by_kind"].values()) == n


def test_evaluate_and_report_run_on_a_model(task, data, tmp_path):
  from trace_jax.trace.report import make_report
  params = jax.jit(lambda k: nn.unbox(task.init_params(k)))(jax.random.PRNGKey(0))
  res = {}
  for method in ev.METHODS:
    res[method] = r = ev.evaluate(task, params, data["test"], method=method, batch_size=4)
    assert r["tokens"] > 0 and 0 <= r["recall"] <= 1 and 0 <= r["miou"] <= 1
    assert r["subspaces"]["patches"] > 0
  out = make_report(task, params, data["test"], str(tmp_path / "rep"), indices=[0, 1],
                    table=res["trace"]["subspaces"])
  assert len(out["images"]) == 2
  for p in out["images"]:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.exists(tmp_path / "rep" / "subspaces.md")
  assert "| subspace | assigned g(k)" in (tmp_path / "rep" / "subspaces.md").read_text()


def test_training_beats_the_untrained_start(task, data):
  """120 steps (seed 0, batches rotating over the 24 training images, ~15 s): the trained model's
  subspace purity and grounding beat its own untrained start, on the training split (24 images)
  and on the held-out test split (6 images; noisier, so smaller margins).
  Measured (seed 0): train purity 0.17 -> 0.49, recall 0.003 -> 0.23, mIoU 0.003 -> 0.20; test
  purity 0.15 -> 0.26, recall 0 -> 0.09, mIoU 0 -> 0.08 (AVX2 host: train +0.31 / +0.23 / +0.21,
  test +0.16 / -0.007 / +0.065).

  Broken variants this catches (checked): the TRACE terms' gradient sign flipped in
  trace_jax/losses/trace.py (``trace_loss`` returning ``2 * stop_gradient(total) - total``: same logged
  loss); the token term's gradient sign flipped alone (``token_loss``).
  """
  steps = 120
  tx, sched = state_lib.make_optimizer(_config().optim, steps)
  mesh = mesh_lib.single_device_mesh()
  state, sh = state_lib.create_state(task.init_params, tx, mesh, 0, FAST)

  def scores(params):
    return {split: ev.evaluate(task, params, data[split], batch_size=24) for split in ("train", "test")}

  before = scores(jax.device_get(state.params))
  f = step_lib.jit_train_step(step_lib.make_train_step(task.loss_fn, tx, sched), sh, mesh, FAST)
  with jax.set_mesh(mesh):
    for k in range(steps):
      state, _ = f(state, shd.global_batch(_batch(data, k), mesh))
  after = scores(jax.device_get(state.params))
  gains = {s: {k: after[s][k] - before[s][k] for k in ("purity", "recall", "miou")} for s in after}
  assert gains["train"]["purity"] > 0.15, gains
  assert gains["train"]["recall"] > 0.1 and gains["train"]["miou"] > 0.1, gains
  assert gains["test"]["purity"] > 0.05, gains
  # held out (6 images) the trade between recall and precision moves with the CPU's rounding:
  # on an AVX2-only host (2026-12-07) test recall -0.007 while mIoU +0.065 and purity +0.16, so the
  # held-out check is on mIoU (both together) and purity; recall is checked on the training split
  assert gains["test"]["miou"] > 0.03, gains


def test_vocab_round_trips_through_its_json_form(task):
  """The ``trace`` head's JSON form (trace/vocab.py ``vocab_to_meta``) gives back the same words and
  bit-identical anchors, so evaluation from a model dir uses the anchors the model was trained against."""
  import json
  from trace_jax.trace.vocab import vocab_from_meta, vocab_to_meta
  back = vocab_from_meta(json.loads(json.dumps(vocab_to_meta(task.vocab))))
  for a, b in ((task.vocab.closed, back.closed), (task.vocab.open, back.open)):
    assert a.words == b.words and a.coarse_names == b.coarse_names
    for key in ("anchors", "coarse", "group"):
      np.testing.assert_array_equal(np.asarray(getattr(b, key)), np.asarray(getattr(a, key)), err_msg=key)
