"""Test set-up: 8 emulated CPU devices (set before jax is imported anywhere)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def torch_or_skip():
  """Import torch for a parity test; in CI the peers are installed, so a missing torch fails loudly."""
  try:
    import torch  # noqa: F401
    torch.set_num_threads(2)
    return torch
  except ImportError:
    if os.environ.get("CI"):
      raise
    pytest.skip("torch (the peers) not installed")


@pytest.fixture
def rng():
  return np.random.default_rng(0)
