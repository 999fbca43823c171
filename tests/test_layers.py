"""The import directions of docs/architecture.md hold, read from the package's own imports (AST, no
execution; imports inside functions count too): no import cycle between modules, and no import that
points up a layer. A deliberate ``from trace_jax.objectives import clip`` in training/loop.py, or
``from trace_jax.cli import common`` anywhere in the library, makes this fail (checked in
test_rules_catch_an_upward_import)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "trace_jax")

# (importing layer, imported layer): never. A layer is the first component below trace_jax.
NEVER = {
    "models": {"attribution", "inversion", "losses", "objectives", "training", "data", "evaluation",
               "inference", "trace", "convert", "cli", "model_dir"},
    "tokenizers": {"models", "attribution", "inversion", "losses", "objectives", "training", "data",
                   "evaluation", "cli"},
    "attribution": {"data", "training", "evaluation", "objectives", "losses", "inversion", "cli"},
    "inversion": {"data", "training", "evaluation", "objectives", "cli"},
    "losses": {"training", "data", "objectives", "evaluation", "cli"},
    "objectives": {"training", "data", "evaluation", "cli"},
    "training": {"objectives", "trace", "data", "evaluation", "losses", "attribution", "inversion", "cli"},
    "data": {"models", "training", "objectives", "losses", "attribution", "inversion", "evaluation", "cli"},
    "evaluation": {"training", "objectives", "cli"},
    "trace": {"training", "objectives", "cli"},
    "convert": {"training", "objectives", "evaluation", "cli"},
    "model_dir": {"training", "objectives", "evaluation", "data", "cli"},
}


def modules(pkg=PKG):
  out = {}
  for d, _, files in os.walk(pkg):
    for f in files:
      if f.endswith(".py"):
        p = os.path.join(d, f)
        name = os.path.relpath(p, os.path.dirname(pkg))[:-3].replace(os.sep, ".")
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
  return out


def imports_of(path, modname, mods, source=None):
  tree = ast.parse(source if source is not None else open(path).read())
  out = set()
  for n in ast.walk(tree):
    if isinstance(n, ast.Import):
      out |= {a.name for a in n.names}
    elif isinstance(n, ast.ImportFrom):
      if n.level:
        base = modname.split(".")
        base = base[: len(base) - n.level + (1 if path.endswith("__init__.py") else 0)]
        m = ".".join(base + ([n.module] if n.module else []))
      else:
        m = n.module or ""
      for a in n.names:
        out.add(f"{m}.{a.name}" if f"{m}.{a.name}" in mods else m)
  deps = set()
  for m in out:
    if not m.startswith("trace_jax"):
      continue
    while m and m not in mods:
      m = m.rpartition(".")[0]
    if m and m != modname and m != "trace_jax":
      deps.add(m)
  return deps


def layer(m):
  parts = m.split(".")
  return parts[1] if len(parts) > 1 else ""


def violations(graph):
  bad = []
  for m, deps in sorted(graph.items()):
    for d in sorted(deps):
      a, b = layer(m), layer(d)
      if a != b and b in NEVER.get(a, ()):
        bad.append(f"{m} -> {d}")
      if b == "cli" and a != "cli":
        bad.append(f"{m} -> {d} (a library layer imports a command)")
      if b == "serve" and a not in ("cli", "serve"):  # the web app is a top layer beside cli
        bad.append(f"{m} -> {d} (a library layer imports the web app)")
  return bad


def cycles(graph):
  index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in graph:
        continue
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))
  for v in graph:
    if v not in index:
      strong(v)
  return out


def graph_of(overrides=None):
  mods = modules()
  g = {}
  for m, p in mods.items():
    g[m] = imports_of(p, m, mods, (overrides or {}).get(m))
  return g


def test_no_upward_import_and_no_cycle():
  g = graph_of()
  assert len(g) > 50
  assert violations(g) == []
  assert cycles(g) == []


@pytest.mark.parametrize("module,line", [
    ("trace_jax.training.loop", "from trace_jax.objectives import clip"),
    ("trace_jax.training.step", "from trace_jax.trace import vocab"),
    ("trace_jax.evaluation.embedded", "from trace_jax.training import checkpointing"),
    ("trace_jax.models.clip", "from trace_jax.attribution import legrad"),
    ("trace_jax.model_dir", "from trace_jax.cli import common"),
    ("trace_jax.data.sources", "from trace_jax.models import build"),
    ("trace_jax.attribution.api", "from trace_jax.serve import engine"),
    ("trace_jax.serve.engine", "from trace_jax.cli import common"),
])
def test_rules_catch_an_upward_import(module, line):
  mods = modules()
  src = open(mods[module]).read() + "\n" + line + "\n"
  assert violations(graph_of({module: src}))


def test_cycle_is_caught():
  mods = modules()
  src = open(mods["trace_jax.models.layers"]).read() + "\nfrom trace_jax.models import clip\n"
  assert cycles(graph_of({"trace_jax.models.layers": src}))
