"""The environment of a test's subprocess runs of train.py / compare.py / evaluate.py whose numbers the
test checks only against other runs under the same flags, never against a reference computed
elsewhere: XLA:CPU backend optimisation level 0, half the compile time of these runs. A program
compiled so stays deterministic (a resumed run still ends bit-identical to an uninterrupted one);
its float32 results differ from the optimised code's in the last bits (why the in-process suite,
whose parity tests compare against PyTorch and NumPy at tight tolerances, keeps the default level).
tests/_multiprocess_worker.py sets the same level for its runs."""
import os

O0 = "--xla_backend_optimization_level=0"


def env(**extra: str) -> dict:
  """``os.environ`` (the emulated device count of tests/conftest.py included) with level 0 added."""
  flags = os.environ.get("XLA_FLAGS", "")
  return {**os.environ, "XLA_FLAGS": f"{flags} {O0}".strip(), **extra}
