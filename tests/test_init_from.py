"""Fine-tuning from a model dir (issue 17): ``config.init_from`` and ``config.freeze``.

A random tiny open_clip 2.23.0 model (its own classes, CLIP BPE vocabulary of 49,408 tokens) is
converted with ``trace-jax convert``'s code path and trained on the embedded set, tokenised with the
dir's BPE tokenizer.
"""
import json
import os

import jax
import numpy as np
import pytest

from configs import common
from conftest import require_peer, torch_or_skip
from test_convert_parity import TINY_OC, _oc_tiny
from trace_jax import model_dir, objectives
from trace_jax.data import sources
from trace_jax.training import loop
from trace_jax.training import state as state_lib

SIZES = "train=32,validation=8,test=8,heldout=8,openvocab=8"
# the converter-parity tiny open_clip with CLIP's BPE vocabulary and room for the embedded captions
TINY_OC_BPE = {**TINY_OC, "text_cfg": {**TINY_OC["text_cfg"], "context_length": 24, "vocab_size": 49408}}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(open_clip model, converted model dir path)."""
  torch = torch_or_skip()
  open_clip = require_peer("open_clip", "open_clip_torch")
  from trace_jax.convert.api import convert
  m = _oc_tiny(torch, TINY_OC_BPE)  # non-default LayerNorm affines and biases: a dropped one would show
  src = tmp_path_factory.mktemp("oc")
  torch.save({k: v.contiguous() for k, v in m.state_dict().items()}, str(src / "open_clip_pytorch_model.bin"))
  with open(src / "open_clip_config.json", "w") as f:
    json.dump({"model_cfg": TINY_OC_BPE, "preprocess_cfg": {}}, f)
  bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
  dst = str(tmp_path_factory.mktemp("md") / "tiny")
  convert("openclip", str(src), dst, bpe=bpe)
  return m, dst


def _config(tmp_path, init_from, steps=3, freeze=""):
  c = common.get_config()
  c.init_from, c.freeze = init_from, freeze
  c.data.data_dir = str(tmp_path.parent / "shapes32")
  c.data.split_sizes, c.data.image_size, c.data.batch_size = SIZES, 32, 8
  c.loss.name = "contrastive"
  c.optim.warmup_steps, c.optim.lr = 1, 1e-3
  c.train.steps, c.train.log_every, c.train.progress = steps, 1, False
  c.checkpoint.async_save = False
  return c


def _make(config):
  init = model_dir.load(config.init_from, dtype=None)
  source = sources.make(config, tokenizer=init.tokenizer)
  return init, source, objectives.make(config, source.info, init)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_layers"])
def test_first_step_embeddings_equal_the_converted_model(converted, tmp_path, scan):
  """The state a run starts from embeds images and BPE-tokenised captions as open_clip does (<= 1e-5),
  also with model.scan_layers (the dir's unrolled blocks stacked into the scanned layout)."""
  import dataclasses
  torch = torch_or_skip()
  m, path = converted
  config = _config(tmp_path, path)
  config.model.scan_layers = scan
  init, source, task = _make(config)
  assert task.cfg.scan_layers == scan
  assert dataclasses.replace(task.cfg, scan_layers=False) == init.config
  assert type(source.info["tokenizer"]).__name__ == "CLIPTokenizer"
  tx, _ = state_lib.make_optimizer(config.optim, 3)
  mesh = loop.mesh_lib.make_mesh(-1, 1, 1)
  state, _ = state_lib.create_state(task.init_params, tx, mesh, config.seed)
  state = state.replace(params=state_lib.place_pretrained(state.params, task.pretrained))
  batch = next(source.batches(0, patch_size=8))
  out, _ = task.model.apply({"params": state.params["clip"]}, batch["image"], batch["caption_ids"])
  with torch.no_grad():
    img = m.encode_image(torch.tensor(batch["image"].transpose(0, 3, 1, 2)), normalize=True).numpy()
    txt = m.encode_text(torch.tensor(batch["caption_ids"].astype(np.int64)), normalize=True).numpy()
  np.testing.assert_allclose(np.asarray(out["image_embeds"]), img, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(out["text_embeds"]), txt, atol=1e-5, rtol=0)
  # the captions really are BPE ids of the 49,408-token vocabulary (a word tokenizer has 52 ids)
  assert batch["caption_ids"].max() == 49407


def test_frozen_visual_tower_is_bit_identical_and_export_loads(converted, tmp_path):
  """freeze=visual (LiT): the image tower and its bytes stay; the text tower moves; the export carries
  the BPE tokenizer and loads."""
  _, path = converted
  config = _config(tmp_path, path, freeze="visual")
  init, source, task = _make(config)
  wd = tmp_path / "run"
  state = loop.train(config, str(wd), task, source, mesh=loop.mesh_lib.single_device_mesh())
  final = jax.device_get(state.params["clip"])
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), final["visual"], init.params["visual"])
  assert all(jax.tree.leaves(same))
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), final["text"], init.params["text"])
  assert max(jax.tree.leaves(moved)) > 1e-5
  # frozen leaves get no Adam moments (optax.set_to_zero keeps no state)
  n_state = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  n_text = sum(np.size(x) for x in jax.tree.leaves(final["text"]))
  assert n_state < 2 * n_text + 2 * sum(np.size(x) for x in jax.tree.leaves(final["visual"]))
  exported = model_dir.load(str(wd / "model"))
  assert type(exported.tokenizer).__name__ == "CLIPTokenizer"
  assert sorted(os.listdir(wd / "model" / "tokenizer")) != ["words.json"]
  for a, b in zip(jax.tree.leaves(exported.params["visual"]), jax.tree.leaves(init.params["visual"])):
    np.testing.assert_array_equal(a, b)


def test_conflicting_config_and_misfit_tree_are_named(converted, tmp_path):
  _, path = converted
  c = _config(tmp_path, path)
  c.model.vision_layers = 3
  with pytest.raises(ValueError, match=r"model.vision_layers: config 3, model dir .* 2"):
    _make(c)
  c = _config(tmp_path, path)
  c.data.image_size = 64
  with pytest.raises(ValueError, match=r"image_size: the data source's images of 64, model dir .* 32"):
    _make(c)
  c = _config(tmp_path, path)
  c.model.preset = "small"
  with pytest.raises(ValueError, match=r"model.preset 'small' is not the architecture"):
    _make(c)
  c = _config(tmp_path, path)
  c.freeze = "vision"
  with pytest.raises(ValueError, match=r"freeze: unknown tower 'vision'"):
    _make(c)
  # a params tree that does not fit the model: missing, unexpected and mis-shaped keys named
  _, _, task = _make(_config(tmp_path, path))
  tx, _ = state_lib.make_optimizer(c.optim, 3)
  state, _ = state_lib.create_state(task.init_params, tx, loop.mesh_lib.single_device_mesh(), 0)
  bad = jax.tree.map(np.asarray, task.pretrained["clip"])
  bad["visual"] = dict(bad["visual"])
  bad["visual"]["extra_token"] = np.zeros(3, np.float32)
  del bad["visual"]["class_embedding"]
  bad["visual"]["conv1"] = {"kernel": np.zeros((8, 8, 3, 47), np.float32)}
  with pytest.raises(ValueError) as e:
    state_lib.place_pretrained(state.params, {"clip": bad})
  msg = str(e.value)
  assert "visual/class_embedding" in msg and "visual/extra_token" in msg and "visual/conv1/kernel" in msg
