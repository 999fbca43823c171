"""trace_jax/treecheck.py: the one missing / unexpected / mis-shaped message of all checkpoint checks."""
import numpy as np
import pytest

from trace_jax import treecheck


def test_flatten_and_shapes():
  tree = {"a": {"b": np.zeros((2, 3)), "c": {"d": np.float32(1.0)}}, "e": [1, 2]}
  flat = treecheck.flatten(tree)
  assert sorted(flat) == ["a/b", "a/c/d", "e"]
  assert treecheck.shapes_of(flat) == {"a/b": (2, 3), "a/c/d": (), "e": (2,)}


def test_message_lists_each_kind_sorted():
  want = {"x/a": (2,), "x/b": (3,), "x/c": (4, 4), "x/d": ()}
  have = {"x/a": (2,), "x/c": (4, 5), "x/z": (1,), "x/y": (1,), "x/d": ()}
  msg = treecheck.mismatch_message(want, have, "thing does not match:")
  assert msg.splitlines() == [
      "thing does not match:",
      "  missing keys (1): x/b",
      "  unexpected keys (2): x/y, x/z",
      "  mis-shaped keys (1): x/c: (4, 5) != expected (4, 4)",
  ]
  assert treecheck.mismatch_message(want, dict(want), "h") is None
  with pytest.raises(ValueError, match=r"(?s)^thing does not match:\n  missing keys \(1\): x/b\n"):
    treecheck.check_shapes(want, have, "thing does not match:")
  treecheck.check_shapes(want, dict(want), "never raised")


def test_limit_hint_and_custom_equality():
  want = {f"k{i:02d}": (1,) for i in range(50)}
  msg = treecheck.mismatch_message(want, {}, "h", limit=3, hint="wrong layout?")
  assert "  missing keys (50): k00, k01, k02, ... and 47 more" in msg
  assert msg.endswith("\n  (wrong layout?)")
  # the hint only when most keys are absent
  msg = treecheck.mismatch_message(want, {**want, "extra": (1,)}, "h", hint="wrong layout?")
  assert "wrong layout" not in msg and "unexpected keys (1): extra" in msg
  assert len(treecheck.mismatch_message(want, {}, "h", limit=None).split(", ")) == 50
  # a scalar stored as [] vs [1]: equal under a custom rule, mis-shaped under the default one
  same = lambda a, b: a == b or int(np.prod(a)) == 1 == int(np.prod(b))
  assert treecheck.mismatch_message({"s": (1,)}, {"s": ()}, "h", same=same) is None
  msg = treecheck.mismatch_message({"s": (1,)}, {"s": ()}, "h")
  assert "mis-shaped keys (1): s: () != expected (1,)" in msg
