"""tests/conftest.py: a missing PyTorch peer fails the test that needs it, naming the package, unless
TRACE_JAX_ALLOW_MISSING_PEERS=1 opts in to skipping (`make test` installs the peers)."""
import sys

import pytest

from conftest import ALLOW_MISSING_PEERS, require_peer, torch_or_skip


def _outcome(fn):
  """'fail: <message>' / 'skip: <message>' / 'ok' for calling fn()."""
  try:
    fn()
  except pytest.fail.Exception as e:
    return f"fail: {e}"
  except pytest.skip.Exception as e:
    return f"skip: {e}"
  return "ok"


def test_missing_peer_fails_unless_skipping_is_opted_in(monkeypatch):
  """Fails on these broken variants (checked by editing tests/conftest.py): the old behaviour (skip
  unless CI is set); skipping whenever the variable is set to anything (e.g. 0)."""
  monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` raises ImportError
  for env in ({}, {"CI": "1"}, {ALLOW_MISSING_PEERS: "0"}):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(ALLOW_MISSING_PEERS, raising=False)
    for k, v in env.items():
      monkeypatch.setenv(k, v)
    out = _outcome(torch_or_skip)
    assert out.startswith("fail: torch is not installed") and ALLOW_MISSING_PEERS in out, (env, out)
  monkeypatch.setenv(ALLOW_MISSING_PEERS, "1")
  assert _outcome(torch_or_skip).startswith("skip: torch not installed")
  assert _outcome(lambda: require_peer("numpy.linalg")) == "ok"
  monkeypatch.delenv(ALLOW_MISSING_PEERS)
  # the pip name is the one reported (here not the module's)
  assert _outcome(lambda: require_peer("no_such_peer_module.sub", "no-such-peer")).startswith(
      "fail: no-such-peer is not installed")
