"""trace_jax/atomic.py, the one atomic-write helper: the new file or the old one, never half of one."""
import json
import os

import numpy as np
import pytest

from trace_jax import atomic


def test_writes_and_replaces(tmp_path):
  p = str(tmp_path / "r.json")
  atomic.write_json(p, {"a": 1}, indent=1)
  assert json.load(open(p)) == {"a": 1}
  atomic.write_json(p, {"a": 2})
  assert json.load(open(p)) == {"a": 2} and os.listdir(tmp_path) == ["r.json"]
  # a writer that takes a path (np.savez appends .npz to a name without it: the extension is kept)
  q = str(tmp_path / "x.npz")
  atomic.write_with(q, lambda tmp: np.savez(tmp, v=np.arange(3)))
  np.testing.assert_array_equal(np.load(q)["v"], np.arange(3))
  assert sorted(os.listdir(tmp_path)) == ["r.json", "x.npz"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
  p = str(tmp_path / "eval.json")
  atomic.write_text(p, "old\n")

  def half(tmp):
    with open(tmp, "w") as f:
      f.write("ne")                       # half of the new file, then the writer dies
    raise RuntimeError("killed mid-write")
  with pytest.raises(RuntimeError, match="killed mid-write"):
    atomic.write_with(p, half)
  assert open(p).read() == "old\n" and os.listdir(tmp_path) == ["eval.json"]
