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
