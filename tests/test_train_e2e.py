"""End to end: train.py on the demo config for a few steps on a tiny build of the embedded data,
then evaluate.py on its checkpoint (subprocesses, as a user runs them)."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = "train=64,validation=8,test=32,heldout=8,openvocab=8"


def _run(*args, check=True):
  p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=1200)
  if check and p.returncode != 0:
    raise AssertionError(f"{args[0]} failed ({p.returncode}):\n{p.stderr[-4000:]}")
  return p


def test_unknown_config_key_is_an_error(tmp_path):
  p = _run("train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.optim.learning_rate=1",
           check=False)
  assert p.returncode != 0
  assert "learning_rate" in p.stderr


@pytest.mark.slow
def test_demo_train_then_evaluate(tmp_path):
  wd, data = tmp_path / "run", tmp_path / "data"
  common = [f"--config.data.data_dir={data}", f"--config.data.split_sizes={SIZES}"]
  t = _run("train.py", "--config", "configs/demo.py", "--workdir", str(wd), *common, "--config.train.steps=4",
           "--config.data.batch_size=16", "--config.checkpoint.every_steps=2", "--config.train.log_every=1")
  assert "train amc" in t.stderr                      # the tqdm progress bar
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]
  lines = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2, 3, 4]
  assert all(math.isfinite(l["loss"]) and l["amc"] >= 0 for l in lines)
  assert (wd / "model" / "config.json").exists() and (wd / "model" / "tokenizer" / "words.json").exists()
  e = _run("evaluate.py", "--config", "configs/demo.py", "--checkpoint", str(wd), *common,
           "--config.eval.num_examples=32", "--config.eval.batch_size=16", "--config.eval.gallery=4")
  assert "pointing_game" in e.stdout and "gradcam" in e.stdout       # the printed table
  res = json.load(open(wd / "eval" / "eval.json"))
  assert res["num_phrases"] == 32 and set(res["methods"]) == {"gradcam", "patch_similarity"}
  for r in res["methods"].values():
    for k in ("pointing_game", "box_accuracy", "miou", "patch_miou"):
      assert 0.0 <= r[k] <= 1.0, (k, r)
  assert (wd / "eval" / "gallery_gradcam.png").exists()
  # The exported model dir evaluates the same as the checkpoint.
  e2 = _run("evaluate.py", "--config", "configs/demo.py", "--checkpoint", str(wd / "model"), *common,
            "--config.eval.num_examples=32", "--config.eval.batch_size=16", "--config.eval.methods=gradcam",
            f"--out={tmp_path / 'eval2'}")
  res2 = json.load(open(tmp_path / "eval2" / "eval.json"))
  assert res2["methods"]["gradcam"] == res["methods"]["gradcam"]


def test_apply_overrides_types_and_unknown_keys():
  from trace_jax.training.loop import apply_overrides, default_config
  c = apply_overrides(default_config(), {"train.steps": "7", "optim.lr": "0.5", "train.progress": "false",
                                         "loss.name": "amc"})
  assert (c.train.steps, c.optim.lr, c.train.progress, c.loss.name) == (7, 0.5, False, "amc")
  with pytest.raises(KeyError, match="unknown config key 'stepz'"):
    apply_overrides(default_config(), {"train.stepz": "1"})
  with pytest.raises(KeyError, match="unknown config key 'trian'"):
    apply_overrides(default_config(), {"trian.steps": "1"})
  with pytest.raises(ValueError, match="expected a boolean"):
    apply_overrides(default_config(), {"train.progress": "maybe"})


@pytest.mark.slow
def test_compare_py_prints_the_table(tmp_path):
  """The issue-5 comparison command end to end on a tiny budget: three runs, one table, compare.json."""
  data = tmp_path / "data"
  sets = [f"data.data_dir={data}", f"data.split_sizes={SIZES}", "data.batch_size=16", "optim.warmup_steps=1",
          "eval.num_examples=16", "eval.batch_size=16", "eval.gallery=0", "train.progress=false"]
  p = _run("compare.py", "--workdir", str(tmp_path / "cmp"), "--steps", "2", *sum((["--set", s] for s in sets), []))
  lines = p.stdout.strip().splitlines()
  top = lines.index("seed 0, test split")       # after the dataset build's messages
  rows = {l.split()[0]: l for l in lines[top + 3:]}
  assert set(rows) == {"contrastive", "amc", "local_alignment"}
  res = json.load(open(tmp_path / "cmp" / "compare.json"))
  assert res["seed"] == 0 and set(res["results"]) == set(rows)
  assert set(res["results"]["local_alignment"]) == {"gradcam", "patch_similarity", "local_slots"}
  # each printed cell is the JSON value in percent
  pg = res["results"]["amc"]["gradcam"]["pointing_game"]
  assert f"{100 * pg:.1f}%" == rows["amc"].split()[1]
  for name in rows:
    assert sorted(os.listdir(tmp_path / "cmp" / name / "checkpoints")) == ["2"]
