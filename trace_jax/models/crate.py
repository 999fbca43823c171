"""CRATE white-box transformer (Yu et al. 2023) as linen modules: classifier and CLIP image tower.

Exactly the official forward (``Ma-Lab-Berkeley/CRATE`` ``model/crate.py``, notes/crate.md §1), in the
row-vector convention (tokens are rows ``z [N, dim]``):

    patches = flatten each p x p patch in (p1, p2, c) order              # crate.py:121
    t       = LN(Linear(LN(patches)))                                   # crate.py:122-124
    z0      = [cls; t] + pos                                            # crate.py:144-147
    layer l:  w    = LN1(z) @ U            U = [U_1 .. U_K] (qkv kernel [dim, heads, dim_head])
              A_k  = softmax(w_k w_kᵀ * dim_head**-0.5)   (Q = K = V = w_k, one shared projection per head)
              half = z + Linear_out(concat_k A_k w_k)      (to_out has a bias; MSSA, crate.py:46-76)
              u    = LN2(half)
              z    = ReLU(u + η (u D - (u Dᵀ) D) - η λ)  (ISTA, NO residual, crate.py:24-43)
    pooled  = z[0] ('cls') | mean over all N tokens incl. cls ('mean')
    logits  = Linear(LN(pooled))                                        # crate.py:136-139

η = ``eta`` (the authors' ``ista`` argument, 0.1) and λ = ``lambd`` (hard-coded 0.1 in crate.py:31);
both are configurable here. Every LayerNorm uses eps 1e-5 (torch default, notes/crate.md pitfall 3).

Outputs for transparency (``aux['blocks'][l]``, all per image):
  ``attn``   [.., heads, N, N]        MSSA attention probabilities (``perturb``-ed, like the ViT),
  ``proj``   [.., N, heads, dim_head] per-head subspace coordinates ``U_kᵀ LN1(z)`` (the shared q=k=v),
  ``half``   [.., N, dim]             Z^{l+1/2} = z + MSSA(LN1(z)),
  ``codes``  [.., N, dim]             the ISTA sparse codes (non-negative),
  ``tokens`` [.., N, dim]             the layer output (= codes, since ISTA has no residual; ``perturb``-ed).
The subspace bases U_k are parameters, not activations: ``subspace_bases(params)`` returns them
(``[..]['transformer'][f'block_{l}']['attn']['qkv']['kernel']`` is U, shape [dim, heads, dim_head]).

Position embeddings are resampled to other grids with ``trace_jax.models.posemb`` (the official
code has no interpolation: its ``pos_embedding[:, :n+1]`` slice silently truncates, notes/crate.md §1);
at the native resolution the embedding is used unchanged, so the official numbers are reproduced.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trace_jax.models import posemb
from trace_jax.models.config import CLIPConfig
from trace_jax.models.layers import LayerNorm, acc_dtype, part
from trace_jax.models.layers import check_images as _check_images

Dtype = Any

# torch nn.Linear's default init, kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class CrateConfig:
  """One CRATE trunk (+ classifier head). Defaults are the authors' constructor defaults."""
  image_size: int = 224
  patch_size: int = 16
  dim: int = 768
  depth: int = 12
  heads: int = 12
  dim_head: int = 64
  num_classes: int = 1000
  pool: str = "cls"           # 'cls' or 'mean' (mean over ALL tokens incl. cls, notes/crate.md pitfall 7)
  eta: float = 0.1            # ISTA step size η (the authors' ``ista`` argument)
  lambd: float = 0.1          # ISTA threshold λ (hard-coded 0.1 in crate.py:31)
  channels: int = 3
  pos_interp: str = "antialias"  # posemb resampling for other resolutions (not in the official code)

  def __post_init__(self):
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"CRATE pool must be 'cls' or 'mean'; got {self.pool!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}")
    if self.pos_interp not in posemb.METHODS:
      raise ValueError(f"unknown pos_interp {self.pos_interp!r}; expected one of {posemb.METHODS}")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def project_out(self) -> bool:
    # crate.py:57: to_out is Identity (no parameters) iff heads == 1 and dim_head == dim.
    return not (self.heads == 1 and self.dim_head == self.dim)

  def replace(self, **kw) -> "CrateConfig":
    return dataclasses.replace(self, **kw)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> "CrateConfig":
    bad = set(d) - {f.name for f in dataclasses.fields(cls)}
    if bad:
      raise ValueError(f"unknown CRATE config keys: {sorted(bad)}")
    return cls(**d)


def _crate(dim, depth, heads, dim_head, **kw):
  return CrateConfig(dim=dim, depth=depth, heads=heads, dim_head=dim_head, **kw)


# notes/crate.md §2 (factories crate.py:159-214): image 224, patch 16, 1000 classes.
CLASSIFIERS: dict[str, CrateConfig] = {
    "crate-t": _crate(384, 12, 6, 64),
    "crate-s": _crate(576, 12, 12, 48),
    "crate-b": _crate(768, 12, 12, 64),
    "crate-l": _crate(1024, 24, 16, 64),
    # The small config of notes/crate.md §3 (52,618 parameters), for tests.
    "crate-test": _crate(64, 3, 4, 16, image_size=32, patch_size=8, num_classes=10),
}
_ALIASES = {"crate_tiny": "crate-t", "crate_small": "crate-s", "crate_base": "crate-b",
            "crate_large": "crate-l", "crate-tiny": "crate-t", "crate-small": "crate-s",
            "crate-base": "crate-b", "crate-large": "crate-l"}


def classifier_config(name: str) -> CrateConfig:
  """'crate-t|s|b|l' (also the factory names 'CRATE_small', ...; case-insensitive) or 'crate-test'."""
  key = name.lower()
  key = _ALIASES.get(key, key)
  if key not in CLASSIFIERS:
    raise ValueError(f"unknown CRATE model name {name!r}; known: {sorted(CLASSIFIERS)} "
                     f"(aliases {sorted(_ALIASES)})")
  return CLASSIFIERS[key]


# ----------------------------------------------------------------------------------------------
# CLIP dual encoders with a CRATE image tower (cfg.vision.kind == 'crate'; options in cfg.extra).

EXTRA_KEYS = ("crate_dim_head", "crate_eta", "crate_lambda", "crate_pool")


def crate_config_from_clip(cfg: CLIPConfig) -> CrateConfig:
  """The CrateConfig of a CLIP config's image tower.

  ``cfg.vision``: image_size, patch_size, width (= dim), layers (= depth), heads, pos_interp
  (``mlp_ratio`` is unused: CRATE has no MLP). ``cfg.extra``: crate_dim_head (default width // heads,
  which equals every official factory), crate_eta (0.1), crate_lambda (0.1), crate_pool ('cls').
  """
  v = cfg.vision
  extra = dict(cfg.extra)
  bad = [k for k in extra if k.startswith("crate_") and k not in EXTRA_KEYS]
  if bad:
    raise ValueError(f"unknown CRATE options in cfg.extra: {bad}; known: {list(EXTRA_KEYS)}")
  if v.width % v.heads and "crate_dim_head" not in extra:
    raise ValueError(f"width {v.width} is not divisible by {v.heads} heads; set cfg.extra crate_dim_head")
  return CrateConfig(image_size=v.image_size, patch_size=v.patch_size, dim=v.width, depth=v.layers,
                     heads=v.heads, dim_head=int(extra.get("crate_dim_head", v.width // v.heads)),
                     num_classes=0, pool=str(extra.get("crate_pool", "cls")),
                     eta=float(extra.get("crate_eta", 0.1)), lambd=float(extra.get("crate_lambda", 0.1)),
                     pos_interp=v.pos_interp)


# ----------------------------------------------------------------------------------------------
# Layers.

def ista_step(u, d, eta: float, lambd: float):
  """One ISTA step of CRATE from z0 = u, row form (notes/crate.md §1, checked by running the official code).

  u: [.., N, dim] (the LayerNormed Z^{l+1/2}); d: [dim, dim] the dictionary D (the torch ``weight``
  unchanged). Column form: ReLU(u + η Dᵀ(u − D u) − η λ). Returns [.., N, dim], >= 0.
  """
  d = d.astype(u.dtype)
  grad_1 = (u @ d.T) @ d   # crate.py: x1 = F.linear(x, D); grad_1 = F.linear(x1, D.t())
  grad_2 = u @ d           # crate.py: grad_2 = F.linear(x, D.t())
  return jax.nn.relu(u + eta * (grad_2 - grad_1) - eta * lambd)


class ISTA(nn.Module):
  """CRATE's sparse-coding block (``FeedForward``, crate.py:24-43): square tied dictionary D [dim, dim]."""
  eta: float = 0.1
  lambd: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, u):
    dim = u.shape[-1]
    # torch kaiming_uniform_(a=0) on a (dim, dim) weight = he_uniform: U(+-sqrt(6 / dim)).
    # Logical axes: D's columns are the dictionary atoms, which play the role of an MLP hidden axis.
    d = self.param("D", part(nn.initializers.he_uniform(), ("embed", "mlp")), (dim, dim), jnp.float32)
    return ista_step(u.astype(self.dtype), d, self.eta, self.lambd)


class MSSA(nn.Module):
  """Multi-head subspace self-attention (``Attention``, crate.py:46-76): Q = K = V = x U_k.

  Returns (out [.., N, dim], probs [.., heads, N, N], proj [.., N, heads, dim_head]).
  """
  heads: int
  dim_head: int
  project_out: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    # qkv = Linear(dim, heads*dim_head, bias=False); the head index is the OUTER factor (notes pitfall 5).
    w = nn.DenseGeneral((self.heads, self.dim_head), use_bias=False, dtype=self.dtype,
                        param_dtype=jnp.float32, name="qkv",
                        kernel_init=part(_torch_linear_init, ("embed", "heads", "kv")))(x)
    dots = jnp.einsum("...qhd,...khd->...hqk", w, w).astype(acc_dtype(self.dtype)) * (self.dim_head ** -0.5)
    probs = jax.nn.softmax(dots, axis=-1)
    probs = self.perturb("attn", probs)
    out = jnp.einsum("...hqk,...khd->...qhd", probs.astype(self.dtype), w)
    if self.project_out:
      out = nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32, name="out",
                            kernel_init=part(_torch_linear_init, ("heads", "kv", "embed")),
                            bias_init=part(nn.initializers.zeros, ("embed",)))(out)
    else:  # to_out = Identity when heads == 1 and dim_head == dim
      out = out.reshape(*out.shape[:-2], dim)
    return out, probs, w


class CrateBlock(nn.Module):
  """z -> ISTA(LN2(z + MSSA(LN1(z)))); returns (z_out, aux)."""
  heads: int
  dim_head: int
  eta: float = 0.1
  lambd: float = 0.1
  project_out: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    y, probs, w = MSSA(self.heads, self.dim_head, self.project_out, self.dtype, name="attn")(
        LayerNorm(self.dtype, name="ln_1")(z))
    half = z + y                                               # "grad_x = attn(x) + x"
    codes = ISTA(self.eta, self.lambd, self.dtype, name="ista")(LayerNorm(self.dtype, name="ln_2")(half))
    tokens = self.perturb("tokens", codes)                     # "x = ff(grad_x)": no residual
    return tokens, {"attn": probs, "proj": w, "half": half, "codes": codes, "tokens": tokens}


class CrateEncoder(nn.Module):
  """``depth`` CRATE blocks named ``block_{l}``; returns (z, [aux_0, .., aux_{L-1}])."""
  depth: int
  heads: int
  dim_head: int
  eta: float = 0.1
  lambd: float = 0.1
  project_out: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    auxes = []
    for i in range(self.depth):
      z, aux = CrateBlock(self.heads, self.dim_head, self.eta, self.lambd, self.project_out, self.dtype,
                          name=f"block_{i}")(z)
      auxes.append(aux)
    return z, auxes


def check_images(images, cfg: CrateConfig) -> None:
  _check_images(images, cfg.patch_size, cfg.image_size, cfg.channels)


class CrateTrunk(nn.Module):
  """Patch embedding + cls/pos + CRATE encoder (shared by the classifier and the CLIP tower)."""
  cfg: CrateConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.cfg
    # to_patch_embedding = [Rearrange, LayerNorm(patch_dim), Linear(patch_dim, dim), LayerNorm(dim)],
    # patch_dim = channels * patch_size**2 (flax infers it from the input).
    self.patch_ln_1 = LayerNorm(self.dtype, axis_name=None)
    self.patch_proj = nn.Dense(c.dim, dtype=self.dtype, param_dtype=jnp.float32,
                               kernel_init=part(_torch_linear_init, (None, "embed")),
                               bias_init=part(nn.initializers.zeros, ("embed",)))
    self.patch_ln_2 = LayerNorm(self.dtype)
    self.cls_token = self.param("cls_token", part(nn.initializers.normal(1.0), ("embed",)), (c.dim,),
                                jnp.float32)  # torch.randn
    self.pos_embedding = self.param("pos_embedding", part(nn.initializers.normal(1.0), (None, "embed")),
                                    (c.grid ** 2 + 1, c.dim), jnp.float32)
    self.transformer = CrateEncoder(c.depth, c.heads, c.dim_head, c.eta, c.lambd, c.project_out, self.dtype)

  def embed_patches(self, images, pos_interp: str | None = None):
    """[.., H, W, C] -> z0 [.., 1 + gh*gw, dim] (cls first, position added)."""
    check_images(images, self.cfg)
    p = self.cfg.patch_size
    *lead, h, w, ch = images.shape
    gh, gw = h // p, w // p
    # (p1, p2, c) flatten order (notes/crate.md §1; pitfall 4): NHWC -> [.., gh, gw, p, p, c].
    x = images.astype(self.dtype).reshape(*lead, gh, p, gw, p, ch)
    x = jnp.moveaxis(x, -4, -3).reshape(*lead, gh * gw, p * p * ch)
    x = self.patch_ln_2(self.patch_proj(self.patch_ln_1(x)))
    cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (*lead, 1, self.cfg.dim))
    x = jnp.concatenate([cls, x], axis=-2)
    pos = posemb.resample_pos_embed(self.pos_embedding, (gh, gw), 1, pos_interp or self.cfg.pos_interp)
    return x + pos.astype(self.dtype)

  def pool(self, z):
    return z[..., 0, :] if self.cfg.pool == "cls" else jnp.mean(z, axis=-2)

  def __call__(self, images, pos_interp: str | None = None):
    return self.transformer(self.embed_patches(images, pos_interp))


class CrateClassifier(CrateTrunk):
  """The authors' ImageNet classifier: ``__call__(images) -> (logits [.., classes], aux)``."""

  def setup(self):
    super().setup()
    self.head_ln = LayerNorm(self.dtype)
    self.head = nn.Dense(self.cfg.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                         kernel_init=part(_torch_linear_init, ("embed", None)),
                         bias_init=part(nn.initializers.zeros, (None,)))

  def __call__(self, images, pos_interp: str | None = None):
    z, blocks = self.transformer(self.embed_patches(images, pos_interp))
    logits = self.head(self.head_ln(self.pool(z))).astype(jnp.float32)
    return logits, {"blocks": blocks, "tokens": z}


class CrateVision(CrateTrunk):
  """CRATE image tower with ``VisionTransformer``'s interface (trace_jax/models/clip.py).

  ``__call__(images, pos_interp=None) -> (emb [.., embed_dim], aux)``; ``project(pooled)`` = ln_post
  then @ proj (un-normalised). ``aux['tokens']`` is the last layer's output (before ln_post).
  """
  embed_dim: int = 512

  def setup(self):
    super().setup()
    self.ln_post = LayerNorm(self.dtype)
    self.proj = self.param("proj", part(nn.initializers.normal(self.cfg.dim ** -0.5), ("embed", None)),
                           (self.cfg.dim, self.embed_dim), jnp.float32)

  def project(self, pooled):
    """[.., dim] -> [.., embed_dim] (LayerNorm then projection)."""
    return (self.ln_post(pooled) @ self.proj.astype(self.dtype)).astype(jnp.float32)

  def __call__(self, images, pos_interp: str | None = None):
    z, blocks = self.transformer(self.embed_patches(images, pos_interp))
    return self.project(self.pool(z)), {"blocks": blocks, "tokens": z}


def subspace_bases(trunk_params: dict, layer: int = -1, depth: int | None = None) -> jax.Array:
  """U of one layer, [dim, heads, dim_head] (U_k = [:, k, :]), from a CrateTrunk/CrateVision params tree.

  For a CLIP params tree pass ``params['visual']``. Negative ``layer`` counts from the end.
  """
  blocks = trunk_params["transformer"]
  n = depth if depth is not None else len([k for k in blocks if k.startswith("block_")])
  layer = layer % n
  return blocks[f"block_{layer}"]["attn"]["qkv"]["kernel"]


def init_classifier(cfg: CrateConfig, rng, *, unbox: bool = True):
  """Random float32 CrateClassifier parameters at the native resolution."""
  model = CrateClassifier(cfg)
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
  params = jax.jit(lambda r: model.init(r, images))(rng)["params"]
  return nn.unbox(params) if unbox else params
