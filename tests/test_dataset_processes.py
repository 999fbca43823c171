"""Dataset commands as real processes (issue 19): the peak memory of `invert --memory-gb`, and a
2-process `jax.distributed` run whose shards cover the dataset once.

* Peak RSS (each subprocess's own ``VmHWM``, one emulated device): 96 masks of one 128 px image on
  the tiny model, three runs of the same command started together: with ``--memory-gb 0.004`` (the
  planner's smallest call: one mask per call; the baseline), with ``--memory-gb 0.25`` (7 calls of
  14 masks), and without a budget (all 96 in one call). The baseline holds everything the
  budgeted run holds except its larger calls (interpreter, JAX runtime, compiled programs, the 96
  masks, the outputs), so peak(budget) - peak(baseline) is what the budget governs: asserted
  <= 256 MiB, with no further margin. The margin is in the planner: on CPU it gives itself a
  quarter of ``--memory-gb`` in its estimate (maskinversion.py ``RUNTIME_OVERHEAD``), because XLA:CPU's
  measured peak is ~2.5x the planner's per-mask estimate here (plus ~75 MB more compile memory
  for the larger program); measured +103 / +139 MiB. The unbudgeted run must exceed the baseline
  by more than the budget (measured +879 / +909 MiB), so the check can fail, and all three give the same LETs
  (rtol 1e-3, notes/legrad-maskinversion.md).
* 2 processes x 4 CPU devices under ``jax.distributed`` (the launcher of tests/test_multiprocess.py:
  coordinator 127.0.0.1, gloo; worker tests/_multiprocess_cli_worker.py) run ``invert --dataset``
  and ``embed --dataset`` into one folder: each writes its own shards (j % 2 == its index) and
  index, disjoint, covering every item exactly once, with the shard files of a 1-process x 8-device
  run of the same commands (LETs rtol 1e-3, embeddings atol 1e-5).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_multiprocess as MP  # noqa: E402  (the multi-process launcher)

pytestmark = pytest.mark.slow
CLI_WORKER = os.path.join(HERE, "_multiprocess_cli_worker.py")
LET_RTOL = 1e-3
WORDS = ["a", "red", "cube"]


def _model_dir(root) -> str:
  from conftest import save_word_model
  return save_word_model(root, WORDS)


def _boxes(k, hw, rng):
  m = np.zeros((k,) + hw, np.float32)
  for i in range(k):
    y, x = rng.integers(0, hw[0] // 2), rng.integers(0, hw[1] // 2)
    m[i, y:y + rng.integers(4, hw[0] // 2), x:x + rng.integers(4, hw[1] // 2)] = 1
  return m


def _lets(out):
  from trace_jax.inference.dataset import read_shards
  return np.concatenate([s["lets"] for s in read_shards(str(out), "lets")])


def test_invert_peak_rss_within_memory_budget(tmp_path):
  rng = np.random.default_rng(0)
  model = _model_dir(tmp_path)
  Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "im.png")
  np.save(tmp_path / "masks.npy", _boxes(96, (128, 128), rng))
  (tmp_path / "masks.csv").write_text("im.png,masks.npy\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  runs = {"base": ["--memory-gb", "0.004"], "budget": ["--memory-gb", "0.25"], "whole": []}
  procs = {}
  for name, extra in runs.items():
    argv = ["invert", "--checkpoint", model, "--dataset", str(tmp_path / "masks.csv"), "--image-size", "128",
            "--mode", "exact", "--steps", "1", "--no-progress", "--devices", "1",
            "--out", str(tmp_path / name), *extra]
    log = open(tmp_path / f"{name}.log", "w")
    # VmHWM of the process's own address space (reset by exec): wait4's ru_maxrss would keep the
    # high-water mark of the forked pytest worker, whatever earlier tests made it
    procs[name] = (subprocess.Popen([sys.executable, "-c", "import sys; from trace_jax.cli import main; "
                                     "rc = main(sys.argv[1:]); hwm = open('/proc/self/status').read()"
                                     ".split('VmHWM:')[1].split()[0]; print('VMHWM_KB', hwm); raise SystemExit(rc)",
                                     *argv],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(HERE)), log)
  peak = {}
  for name, (p, log) in procs.items():
    p.wait()
    log.close()
    text = (tmp_path / f"{name}.log").read_text()
    assert p.returncode == 0, text[-3000:]
    peak[name] = int(text.rsplit("VMHWM_KB", 1)[1].split()[0]) / 1024  # kB -> MiB
  budget = 0.25 * 1024
  print(f"peak RSS MiB: {peak}; over the baseline: budget run {peak['budget'] - peak['base']:.0f}, "
        f"unbudgeted {peak['whole'] - peak['base']:.0f} (budget {budget:.0f})")
  assert peak["budget"] - peak["base"] <= budget
  assert peak["whole"] - peak["base"] > budget  # the same masks at once do not fit it
  base = _lets(tmp_path / "base")
  assert base.shape == (96, 32)
  for name in ("budget", "whole"):
    got = _lets(tmp_path / name)
    assert np.abs(got - base).max() <= LET_RTOL * np.abs(base).max(), name


def _files(d):
  return sorted(f for f in os.listdir(d) if f.endswith(".npz"))


def test_two_processes_shard_a_dataset_exactly_once(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  model = _model_dir(tmp_path)
  (tmp_path / "imgs").mkdir()
  rows = []
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"im{i}.png")
    for k in range(1 + i % 2):
      Image.fromarray((_boxes(1, (20, 24), rng)[0] * 255).astype(np.uint8)).save(tmp_path / f"m{i}_{k}.png")
      rows.append(f"imgs/im{i}.png,m{i}_{k}.png")
  (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
  rows.append("imgs/broken.png,m0_0.png")
  (tmp_path / "inv.csv").write_text("image,mask\n" + "\n".join(rows) + "\n")

  def runs(out):
    return [["invert", "--checkpoint", model, "--dataset", str(tmp_path / "inv.csv"), "--out", str(out / "inv"),
             "--mode", "exact", "--steps", "2", "--lr", "0.5", "--no-progress"],
            ["embed", "--checkpoint", model, "--dataset", str(tmp_path / "imgs"), "--out", str(out / "em"),
             "--shard-size", "2", "--no-progress"]]
  monkeypatch.setattr(MP, "WORKER", CLI_WORKER)
  two = MP.Launch(tmp_path, "two", 2, runs(tmp_path / "p2"))
  try:
    one = MP.Launch(tmp_path, "one", 1, runs(tmp_path / "p1")).wait()
  finally:
    two.wait()
  assert "process 1/2, 4 local devices" in two.text(1) and "process 0/1, 8 local devices" in one.text(0)
  from trace_jax.inference.dataset import read_shards
  for sub, items, prefix in (("inv", 6, "lets"), ("em", 6, "embeds")):
    d2, d1 = tmp_path / "p2" / sub, tmp_path / "p1" / sub
    idx = [json.loads((d2 / f"index-0000{i}-of-00002.json").read_text()) for i in range(2)]
    mine = [{s["shard"] for s in x["shards"]} for x in idx]
    assert all(j % 2 == i for i, m in enumerate(mine) for j in m) and not mine[0] & mine[1]
    one_idx = json.loads((d1 / "index-00000-of-00001.json").read_text())
    assert mine[0] | mine[1] == {s["shard"] for s in one_idx["shards"]}
    ids = [x for i in idx for s in i["shards"] for x in s["ids"]]
    assert len(ids) == len(set(ids)) == items  # every item exactly once
    assert sorted(ids) == sorted(x for s in one_idx["shards"] for x in s["ids"])
    assert _files(d2) == _files(d1)
    for a, b in zip(read_shards(str(d2), prefix), read_shards(str(d1), prefix)):
      for k in a:
        if a[k].dtype.kind in "US" or k.startswith("image_index") or k == "mask_image":
          np.testing.assert_array_equal(a[k], b[k], err_msg=k)
      if prefix == "lets":
        assert a["lets"].shape == b["lets"].shape
        if b["lets"].size:  # (the broken image's shard holds none)
          assert np.abs(a["lets"] - b["lets"]).max() <= LET_RTOL * np.abs(b["lets"]).max()
      else:
        np.testing.assert_allclose(a["image_embeds"], b["image_embeds"], atol=1e-5)
  failed = [f["id"] for i in idx for s in i["shards"] for f in s["failed"]]
  assert failed == ["broken.png"]  # (embed's index; invert's lists imgs/broken.png)
