"""trace_jax's CRATE vs the authors' ``model/crate.py`` (Ma-Lab-Berkeley/CRATE), same random weights.

    python benchmarks/crate_official.py [--repo URL_OR_PATH] [--commit SHA] [--keep DIR] [--cases ...]

Needs network access (``git clone`` of the public repository at run time), ``git``, torch and einops
(the official ``model/crate.py`` imports only those; notes/crate.md, "Source"). Nothing of the
official repository is committed here: it is cloned into a temporary directory, checked out at
``--commit`` (default: the commit of notes/crate.md, 674408fa82475fe1f172aa8213e21d4ba608afc4),
``model/crate.py`` is checked against the sha256 the note records and imported from that file alone.
``--repo`` takes any git URL or a local clone / mirror (for machines without network access).

Per case: the official ``CRATE(...)`` is built with ``torch.manual_seed(0)``; every LayerNorm weight is
set to 1 + 0.3·N(0, 1) and every LayerNorm / Linear bias to 0.3·N(0, 1) (at their init, LayerNorms are
identities and biases small, so a converter that swaps or drops them would still pass, notes/crate.md
§8 pitfall 6); the CRATE-S case also multiplies every 2-D weight (the Linear layers and the ISTA
dictionaries) by 3 (strongly perturbed weights, |logits| ~ 7). Its ``state_dict()`` goes through ``trace_jax.convert.crate`` (``config_from_state_dict`` +
``params_from_state_dict``, the converter users run), and ``CrateClassifier`` runs on the same
images (NCHW for theirs, NHWC for ours). Compared: the logits, and per layer the attention
probabilities (hooked on ``Attention.attend``) and the layer output (hooked on the ISTA ``PreNorm``),
each as max |ours - theirs| against float32 torch and against the same torch model in float64; the
float32 torch model's own error against float64 is printed beside it. Exit status 1 if any max
|Δlogits| (ours vs float64 torch) exceeds ``--tol`` (default 1e-3 of max |logits|, or 1e-4 absolute
where the logits are small).

Recorded results: docs/crate.md, "Verification".
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO_URL = "https://github.com/Ma-Lab-Berkeley/CRATE.git"
COMMIT = "674408fa82475fe1f172aa8213e21d4ba608afc4"        # notes/crate.md, "Source"
CRATE_PY_SHA256 = "93c6316386fb0e76a0125c63ab1ee37540d0327cad51c3189d56b94a34d15659"  # note: 93c63163…15659

# name: (official CRATE(...) kwargs, converter kwargs, weight scale, batch)
CASES = {
    # notes/crate.md §3's small config (crate-test: 52,618 parameters), cls pooling
    "crate-test": (dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=3, heads=4, dim_head=16),
                   dict(model_name="crate-test"), 1.0, 4),
    # mean pooling (over all tokens, cls included), inner width != dim, another η (ista)
    "mean-pool": (dict(image_size=24, patch_size=4, num_classes=7, dim=48, depth=2, heads=3, dim_head=24,
                       pool="mean", ista=0.3), dict(heads=3, pool="mean", eta=0.3), 1.0, 4),
    # heads == 1 and dim_head == dim: to_out is nn.Identity (no keys in the state dict)
    "heads=1": (dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=1, dim_head=32),
                dict(), 1.0, 4),
    # the released CRATE-S architecture (CRATE_small), weights scaled up: |logits| in the tens
    "crate-s-perturbed": (dict(image_size=224, patch_size=16, num_classes=1000, dim=576, depth=12, heads=12,
                               dim_head=48), dict(model_name="crate-s"), 3.0, 2),
}


def fetch(repo: str, commit: str, dest: str) -> str:
  """git clone ``repo`` into ``dest`` and check out ``commit``; returns the path of model/crate.py."""
  def git(*args, cwd=None):
    p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if p.returncode:
      raise SystemExit(f"git {' '.join(args)} failed ({p.returncode}):\n{p.stderr.strip()}\n"
                       f"(this script needs network access to {REPO_URL}, or --repo pointing at a "
                       f"local clone)")
    return p.stdout
  if shutil.which("git") is None:
    raise SystemExit("git is not installed")
  git("clone", "--quiet", "--no-checkout", repo, dest)
  git("checkout", "--quiet", commit, cwd=dest)
  path = os.path.join(dest, "model", "crate.py")
  if not os.path.exists(path):
    raise SystemExit(f"{repo} @ {commit} has no model/crate.py")
  digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
  if commit == COMMIT and digest != CRATE_PY_SHA256:
    raise SystemExit(f"model/crate.py sha256 {digest} differs from notes/crate.md's {CRATE_PY_SHA256}")
  return path


def import_official(path: str):
  """Import model/crate.py on its own (it needs only torch and einops)."""
  spec = importlib.util.spec_from_file_location("crate_official_model", path)
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except ImportError as e:
    raise SystemExit(f"the official model/crate.py needs torch and einops: {e}") from e
  return mod


def build_official(mod, torch, kwargs, scale, seed=0):
  """CRATE(**kwargs) with perturbed LayerNorms and biases (and weights scaled by ``scale``), eval mode."""
  torch.manual_seed(seed)
  m = mod.CRATE(**kwargs).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in m.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if isinstance(_owner(m, name), torch.nn.LayerNorm) and name.endswith("weight"):
        p.copy_(1 + 0.3 * noise)
      elif name.endswith("bias"):
        p.copy_(0.3 * noise)
      elif p.ndim == 2 and scale != 1.0:
        p.mul_(scale)
  return m


def _owner(model, param_name):
  mod = model
  for part in param_name.split(".")[:-1]:
    mod = getattr(mod, part) if not part.isdigit() else mod[int(part)]
  return mod


def official_forward(mod, torch, model, images_nchw, double=False):
  """Logits, per-layer attention probabilities [B, h, N, N] and layer outputs [B, N, dim] (numpy)."""
  attn, tokens, hooks = [], [], []
  for layer in model.transformer.layers:
    hooks.append(layer[0].fn.attend.register_forward_hook(lambda _m, _i, o: attn.append(o.detach())))
    hooks.append(layer[1].register_forward_hook(lambda _m, _i, o: tokens.append(o.detach())))
  try:
    m = model.double() if double else model.float()
    x = torch.tensor(images_nchw, dtype=torch.float64 if double else torch.float32)
    with torch.no_grad():
      logits = m(x)
  finally:
    for h in hooks:
      h.remove()
    model.float()
  as_np = lambda t: t.detach().double().numpy()
  return as_np(logits), [as_np(a) for a in attn], [as_np(t) for t in tokens]


def ours(state_dict, conv_kwargs, images_nhwc):
  import jax
  from trace_jax.convert import crate as conv
  from trace_jax.models.crate import CrateClassifier
  cfg = conv.config_from_state_dict(state_dict, **conv_kwargs)
  params = conv.params_from_state_dict(state_dict, cfg)
  logits, aux = jax.jit(lambda p, x: CrateClassifier(cfg).apply({"params": p}, x))(params, images_nhwc)
  return (np.asarray(logits, np.float64), [np.asarray(b["attn"], np.float64) for b in aux["blocks"]],
          [np.asarray(b["tokens"], np.float64) for b in aux["blocks"]])


def compare(mod, torch, name, tol):
  kwargs, conv_kwargs, scale, batch = CASES[name]
  model = build_official(mod, torch, kwargs, scale)
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  s = kwargs["image_size"]
  images = np.random.default_rng(0).standard_normal((batch, 3, s, s)).astype(np.float32)
  t32 = official_forward(mod, torch, model, images)
  t64 = official_forward(mod, torch, model, images, double=True)
  jx = ours(sd, conv_kwargs, np.ascontiguousarray(images.transpose(0, 2, 3, 1)))
  dmax = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(a, b)) if isinstance(a, list) else \
      float(np.abs(a - b).max())
  scale_l = float(np.abs(t64[0]).max())
  row = {"case": name, "params": sum(v.size for v in sd.values()), "max abs logits": scale_l,
         "logits ours-torch32": dmax(jx[0], t32[0]), "logits ours-torch64": dmax(jx[0], t64[0]),
         "logits torch32-torch64": dmax(t32[0], t64[0]),
         "attn ours-torch64": dmax(jx[1], t64[1]), "tokens ours-torch64": dmax(jx[2], t64[2]),
         "tokens torch32-torch64": dmax(t32[2], t64[2])}
  row["ok"] = row["logits ours-torch64"] <= max(tol * scale_l, 1e-4)
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repo", default=REPO_URL, help="git URL or local clone of Ma-Lab-Berkeley/CRATE")
  ap.add_argument("--commit", default=COMMIT)
  ap.add_argument("--keep", default=None, help="clone into this (new) directory and keep it")
  ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
  ap.add_argument("--tol", type=float, default=1e-3,
                  help="max |Δlogits| vs float64 torch, relative to max |logits|")
  args = ap.parse_args(argv)
  try:
    import torch
  except ImportError:
    raise SystemExit("torch is needed to run the official model/crate.py")
  torch.set_num_threads(min(4, os.cpu_count() or 1))
  tmp = None
  if args.keep:
    dest = args.keep
  else:
    tmp = tempfile.mkdtemp(prefix="crate_official_")
    dest = os.path.join(tmp, "CRATE")
  try:
    path = fetch(args.repo, args.commit, dest)
    mod = import_official(path)
    import jax
    print(f"official: {args.repo} @ {args.commit} (model/crate.py sha256 "
          f"{hashlib.sha256(open(path, 'rb').read()).hexdigest()[:12]}…); torch {torch.__version__}, "
          f"jax {jax.__version__} on {jax.default_backend()}")
    rows = [compare(mod, torch, name, args.tol) for name in args.cases]
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  keys = [k for k in rows[0] if k not in ("case", "ok")]
  print("| case | " + " | ".join(keys) + " | ok |")
  print("|---" * (len(keys) + 2) + "|")
  for r in rows:
    cells = [f"{r[k]:,}" if isinstance(r[k], int) else f"{r[k]:.3g}" for k in keys]
    print(f"| {r['case']} | " + " | ".join(cells) + f" | {'yes' if r['ok'] else 'NO'} |")
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
