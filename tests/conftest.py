"""Test set-up: 8 emulated CPU devices (set before jax is imported anywhere)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
def pytest_collection_modifyitems(config, items):
  """The longest files first (tests/durations.json: seconds per file measured in CI), so that with
  ``-n 2 --dist loadfile --no-loadscope-reorder`` (make test) no long file starts last while the
  other worker idles. A schedule hint only: a stale or missing number costs time, never a result."""
  try:
    with open(os.path.join(HERE, "durations.json")) as f:
      seconds = json.load(f)["seconds_per_file"]
  except (OSError, ValueError, KeyError):
    return
  items.sort(key=lambda item: -seconds.get(os.path.basename(str(item.path)), 0.0))   # stable: in-file order kept


@pytest.fixture(autouse=True)
def _compilation_cache_scoped_to_its_test():
  """A test that trains in-process with ``train.compilation_cache_dir`` sets jax's persistent cache, a
  process-wide setting, for every later test of its worker; one such leak crashed a CI worker (a segfault in
  jax's ``executable.serialize`` while caching an unrelated test's program). Restored after each test, and
  jax's cache object reset, so the cache is only live in the tests that ask for it (those sharing a
  directory still share its entries on disk)."""
  import jax
  before = jax.config.jax_compilation_cache_dir
  yield
  if jax.config.jax_compilation_cache_dir != before:
    from jax.experimental.compilation_cache import compilation_cache
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
  """Seconds per test file (setup + call + teardown), summed where the reports arrive (the controller)."""
  name = os.path.basename(report.nodeid.split("::")[0])
  _FILE_SECONDS[name] = _FILE_SECONDS.get(name, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
  """The files by time (the numbers tests/durations.json holds: copy them there to refresh the order)."""
  if not _FILE_SECONDS:
    return
  top = sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])
  terminalreporter.write_sep("=", f"seconds per test file ({sum(_FILE_SECONDS.values()):.0f} s in all)")
  terminalreporter.write_line(json.dumps({k: round(v, 1) for k, v in top}))


# `make test` installs the peers ('.[peers,test]'), so a missing one is an error naming it; set
# TRACE_JAX_ALLOW_MISSING_PEERS=1 to skip the tests that need it instead (a partial local install).
ALLOW_MISSING_PEERS = "TRACE_JAX_ALLOW_MISSING_PEERS"


def require_peer(module: str, package: str | None = None):
  """Imports and returns `module` (a PyTorch peer or other test-only package, pip name `package`).

  Missing: the test fails, naming the package and the fix, unless TRACE_JAX_ALLOW_MISSING_PEERS=1,
  in which case it is skipped.
  """
  import importlib
  package = package or module.split(".")[0]
  try:
    return importlib.import_module(module)
  except ImportError as e:
    if os.environ.get(ALLOW_MISSING_PEERS) == "1":
      pytest.skip(f"{package} not installed ({ALLOW_MISSING_PEERS}=1)")
    pytest.fail(f"{package} is not installed ({e}); install the peers with pip install -e '.[peers,test]' "
                f"(make test does), or set {ALLOW_MISSING_PEERS}=1 to skip the tests that need it",
                pytrace=False)


def torch_or_skip():
  """Import torch for a parity test (see require_peer: a missing torch fails unless opted out)."""
  torch = require_peer("torch")
  torch.set_num_threads(2)
  return torch


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def save_word_model(root, words=None, *, preset: str = "tiny", seed: int = 0, name: str = "model") -> str:
  """A random-weight ``preset`` model dir with a word tokenizer over ``words`` (default: the embedded
  dataset's), saved as ``root/name``; returns its path."""
  import jax
  from trace_jax.model_dir import save_model
  from trace_jax.models import get_config, init_params
  from trace_jax.tokenizers import WordTokenizer
  cfg = get_config(preset)
  if words is None:
    from trace_jax.data import pipeline
    tok = pipeline.make_tokenizer(cfg.text.context_length)
  else:
    tok = WordTokenizer(list(words), cfg.text.context_length)
  cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "vocab_size": tok.vocab_size}))
  return save_model(str(root / name), init_params(cfg, jax.random.PRNGKey(seed)), cfg, source="test",
                    tokenizer_files={"words.json": tok.save(str(root / f"{name}_words.json"))})


def save_tiny_word_model(root) -> str:
  """The 'tiny' model (32 px) with the embedded dataset's word tokenizer, saved under ``root``/model."""
  return save_word_model(root)


def clip_bpe(context_length: int = 77):
  """The CLIP BPE tokenizer of open_clip 2.23.0's own vocabulary file (49,408 tokens)."""
  open_clip = require_peer("open_clip", "open_clip_torch")
  from trace_jax.tokenizers import CLIPTokenizer
  return CLIPTokenizer.from_bpe_gz(os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz"),
                                   context_length=context_length)


def counted_pair(prepare, chunk):
  """(calls, prepare', chunk'): the two programs wrapped to count their calls in ``calls``
  ({'prepare': n, 'chunk': m}): the image-forward-once tests of inference/explain.py."""
  calls = {"prepare": 0, "chunk": 0}

  def counted(name, f):
    def g(*a):
      calls[name] += 1
      return f(*a)
    return g
  return calls, counted("prepare", prepare), counted("chunk", chunk)
