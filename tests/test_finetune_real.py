"""Fine-tuning a converted model on the real training sources end to end (issue 17): a random tiny
open_clip 2.23.0 model converted to a model dir (tests/test_init_from.py ``converted``) is trained a
few steps through ``training.loop.train`` on each real fixture in its official format (an open_clip
CSV, two WebDataset shards, the Visual Genome / Flickr30k Entities / RefCOCO / COCO fixtures of
tests/fixtures_real.py), and its export is explained by ``trace-jax explain``.

What would fail if the code were wrong: a source whose batches do not fit the converted model (shapes,
BPE ids beyond its vocabulary), a loss that is not finite, parameters that do not move, an export that
does not load or that carries the wrong tokenizer; and for the resume test, a run resumed from its
step-2 checkpoint (Grain workers on, iterator state read back from the orbax meta) that ends with
parameters other than the uninterrupted run's.
"""
import io
import json
import os
import shutil
import sys
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import fixtures_real as FX  # noqa: E402
from test_init_from import converted  # noqa: E402,F401  (the module-scoped fixture)

from configs import common  # noqa: E402
from trace_jax import model_dir, objectives  # noqa: E402
from trace_jax.data import sources  # noqa: E402
from trace_jax.training import loop  # noqa: E402

S = 32


def _jpeg(path, h, w, seed):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, "JPEG")


def _csv(root):
  for i in range(8):
    _jpeg(str(root / "img" / f"{i}.jpg"), 40 + 3 * i, 36 + 2 * i, i)
  with open(root / "captions.csv", "w") as f:
    f.write("filepath,title\n" + "".join(f'img/{i}.jpg,"a photo of thing {i}"\n' for i in range(8)))
  return str(root / "captions.csv")


def _shards(root):
  for s in range(2):
    with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tf:
      for k in range(3):
        for name, data in ((f"s{s}k{k}.jpg", None), (f"s{s}k{k}.txt", f"sample {s} {k} of a shard".encode())):
          if data is None:
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(10 * s + k).integers(0, 255, (30, 44, 3), np.uint8)).save(buf, "JPEG")
            data = buf.getvalue()
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tf.addfile(info, io.BytesIO(data))
  return str(root / "shard-{000000..000001}.tar")


def _config(init_from, name, loss, workdir_root, steps=2, batch_size=2, **data):
  c = common.get_config()
  c.init_from = init_from
  c.data.name, c.data.image_size, c.data.batch_size = name, S, batch_size
  for k, v in data.items():
    c.data[k] = v
  c.loss.name = loss
  c.optim.warmup_steps, c.optim.lr = 1, 1e-3
  c.train.steps, c.train.log_every, c.train.progress = steps, 1, False
  c.train.compilation_cache_dir = str(workdir_root / "jax_cache")   # same program, compiled once
  c.checkpoint.async_save = False
  return c


def _run(c, wd):
  init = model_dir.load(c.init_from, dtype=None)
  source = sources.make(c, tokenizer=init.tokenizer)
  task = objectives.make(c, source.info, init)
  state = loop.train(c, str(wd), task, source, mesh=loop.mesh_lib.single_device_mesh())
  return init, state


def _fixture(kind, root):
  """(data.name, data keys, split) of each real fixture written under ``root``."""
  if kind == "csv":
    return "image_text", {"path": _csv(root)}, "train"
  if kind == "webdataset":
    return "image_text", {"path": _shards(root)}, "train"
  if kind == "visual_genome":
    FX.write_visual_genome(str(root / "vg"))
    return "visual_genome", {"manual_dir": str(root / "vg"), "data_dir": str(root / "tfds")}, "train"
  if kind == "flickr30k_entities":
    FX.write_flickr30k_entities(str(root / "f"))
    return "flickr30k_entities", {"manual_dir": str(root / "f"), "data_dir": str(root / "tfds")}, "val"
  if kind == "refcoco":
    FX.write_refcoco(str(root / "r"))
    return "refcoco", {"manual_dir": str(root / "r"), "data_dir": str(root / "tfds")}, "testA"
  if kind == "coco_captions":
    FX.write_coco(str(root / "c"))
    return ("coco_captions", {"manual_dir": str(root / "c"), "data_dir": str(root / "tfds"),
                              "builder_config": "instances_val2017"}, "val")
  raise AssertionError(kind)


# each fixture with the objective its paper trains on that kind of data (docs/training.md)
CASES = [("csv", "contrastive"), ("webdataset", "local_alignment"), ("visual_genome", "amc"),
         ("flickr30k_entities", "amc"), ("refcoco", "amc"), ("coco_captions", "contrastive")]


@pytest.mark.slow
@pytest.mark.parametrize("kind,loss", CASES, ids=[k for k, _ in CASES])
def test_finetune_on_real_fixture_and_explain_the_export(converted, tmp_path, kind, loss):  # noqa: F811
  from trace_jax.cli import main
  _, path = converted
  name, data, split = _fixture(kind, tmp_path)
  c = _config(path, name, loss, tmp_path.parent, split=split, **data)
  wd = tmp_path / "run"
  init, state = _run(c, wd)
  rows = [json.loads(r) for r in open(wd / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  if loss == "amc" and kind != "csv":
    assert all(r["amc"] > 0 for r in rows)        # boxes reached the attention-mask term
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       jax.device_get(state.params["clip"]), init.params)
  assert max(jax.tree.leaves(moved)) > 1e-6
  exported = model_dir.load(str(wd / "model"))
  assert type(exported.tokenizer).__name__ == "CLIPTokenizer" and exported.config == init.config
  img = tmp_path / "probe.jpg"
  _jpeg(str(img), 40, 48, 99)
  out = tmp_path / "explain.png"
  assert main(["explain", "--checkpoint", str(wd / "model"), "--image", str(img), "--text", "a photo of a thing",
               "--out", str(out), "--out-npz", str(tmp_path / "explain.npz")]) == 0
  maps = np.load(tmp_path / "explain.npz")
  heat = [maps[k] for k in maps.files if np.issubdtype(maps[k].dtype, np.floating)]
  assert heat and all(np.isfinite(h).all() for h in heat) and out.stat().st_size > 0


@pytest.mark.slow
def test_resumed_run_with_grain_workers_ends_with_the_uninterrupted_parameters(converted, tmp_path):  # noqa: F811
  """Uninterrupted: 4 steps, in-process reading. Resumed: the same run cut after its step-2 checkpoint
  (the later checkpoint and the export removed, as a kill would leave it), resumed with 2 Grain
  worker processes: the same examples, bit-identical final parameters."""
  _, path = converted
  csv = _csv(tmp_path)
  c = _config(path, "image_text", "contrastive", tmp_path.parent, steps=4, path=csv)
  c.checkpoint.every_steps = 2
  ref = tmp_path / "ref"
  _, want = _run(c, ref)
  meta = json.load(open(ref / "checkpoints" / "2" / "meta" / "metadata"))
  assert meta["data_state"]["step"] == 2 and meta["data_state"]["num_records"] == 8
  cut = tmp_path / "cut"
  shutil.copytree(ref, cut)
  shutil.rmtree(cut / "checkpoints" / "4")
  shutil.rmtree(cut / "model")
  c.data.worker_count = 2
  _, got = _run(c, cut)
  for a, b in zip(jax.tree.leaves(jax.device_get(want.params)), jax.tree.leaves(jax.device_get(got.params))):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(r)["step"] for r in open(cut / "metrics.jsonl")]
  assert rows == [1, 2, 3, 4]
  # the records changed under the run: the resume is refused, naming what differs
  shutil.rmtree(cut / "checkpoints" / "4")
  with open(csv, "a") as f:
    f.write('img/0.jpg,"one more row"\n')
  with pytest.raises(ValueError, match=r"num_records=8 does not match this source's 9"):
    _run(c, cut)
