"""The model side of ``trace-jax serve``: one model dir, explain and invert on uploaded pixels.

    eng = Engine("runs/demo")
    rgb = eng.decode_image(open("cat.jpg", "rb").read())          # uint8 [H, W, 3], the file as it is
    res = eng.explain(rgb, ["a cat", "a dog"], ["legrad", "m2ib"])   # overlays at H x W, scores, tokens
    inv = eng.invert(rgb, boxes=[[10, 20, 200, 180]])              # LETs' maps and top classes per mask

Everything the page shows is computed here and returned as plain Python (numbers, lists, PNG bytes),
so the web layer (``app.py``) only parses forms and writes JSON. The model sees the image squashed to
its input size (``Resize((S, S))``, LeGrad / MaskInversion's ``LePreprocess``,
notes/legrad-maskinversion.md "Other resolutions"); every map is resampled back onto the image as
uploaded (``overlay.map_to_image``), so overlays keep the upload's resolution and aspect.

Compilation is reused across requests: ``attribution.api.explain`` jits once per (method, settings)
and shape; the number of phrases of the one-forward methods is padded to a power of two (rows of a
vmap over prompts are independent, so the padding rows are simply dropped), MaskInversion pads the
mask count to its own buckets and every mask is resampled to the model's S x S (one mask shape).
One lock serialises the JAX calls (requests queue on it; decoding and PNG encoding run outside it).
Bad input raises ValueError with a one-line message for the page.
"""
from __future__ import annotations

import collections
import io
import os
import threading
import uuid
from typing import Sequence

import numpy as np

MAX_UPLOAD_BYTES = 32 << 20      # per uploaded file
MAX_PIXELS = 40_000_000          # an image beyond this is refused (PIL's decompression-bomb guard is 89 MP)
MAX_PHRASES = 16
MAX_MASKS = 32
MAX_CLASSES = 2000
TOP_CLASSES = 5
KEEP_RESULTS = 32                # npz downloads kept (least recently made dropped first)
EXAMPLE_SIZE = 256               # embedded-dataset examples are drawn at this size (the scene is resolution-free)
NUM_EXAMPLES = 12


def _bucket(n: int) -> int:
  """Next power of two >= n: phrase counts 1, 2, 3-4, 5-8, 9-16 compile one program each."""
  return 1 << max(0, int(n) - 1).bit_length()


def png_bytes(rgb: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _decode_upload(data: bytes, what: str, mode: str) -> np.ndarray:
  """Bytes of an uploaded image file -> uint8 pixels in PIL ``mode`` ("RGB": [H, W, 3], "L": [H, W]).

  The one place that applies the upload limits (bytes, then pixels before decoding) and turns every
  PIL failure into a ValueError naming ``what`` (the page shows it as it is).
  """
  from PIL import Image
  if not data:
    raise ValueError(f"{what} is empty: choose an image file (PNG, JPEG, ...)")
  if len(data) > MAX_UPLOAD_BYTES:
    raise ValueError(f"{what} is {len(data) / 2**20:.1f} MiB; the limit is {MAX_UPLOAD_BYTES >> 20} MiB")
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.size[0] * im.size[1] > MAX_PIXELS:
        raise ValueError(f"{what} is {im.size[0]}x{im.size[1]} pixels; the limit is {MAX_PIXELS:,}")
      pixels = np.asarray(im.convert(mode))
  except (OSError, Image.DecompressionBombError, SyntaxError) as e:
    kind = "not an image file (PNG, JPEG, ...)" if isinstance(e, Image.UnidentifiedImageError) else \
        f"an image file that cannot be decoded ({type(e).__name__})"
    raise ValueError(f"{what} is {kind}") from None
  if 0 in pixels.shape:
    raise ValueError(f"{what} has no pixels (shape {pixels.shape})")
  return pixels


def token_scores(tokenizer, text: str, ids_row: np.ndarray, attr: np.ndarray) -> list[tuple[str, float]]:
  """(token string, attribution in [0, 1]) for the text's own tokens of one row (between start and end
  for CLIP BPE / word rows, before the end token for SentencePiece rows), min-max normalised over
  them: the CLI's coloured token strip (``tokenizers.token_strings`` / ``text_scores``)."""
  from trace_jax.tokenizers import text_scores, token_strings
  return [(t, float(x)) for t, x in zip(token_strings(tokenizer, text, ids_row),
                                        text_scores(attr, ids_row, tokenizer))]


class Engine:
  """A loaded model dir plus the caches the page needs (compiled functions live in the library's jit
  caches; class embeddings and npz downloads here)."""

  def __init__(self, checkpoint: str, *, alpha: float = 0.5):
    from trace_jax import model_dir
    from trace_jax.models.blocks import require_vit
    md = model_dir.load(checkpoint, dtype=None)  # the stored compute dtype, as the CLI
    self.name = os.path.basename(os.path.normpath(checkpoint))
    self.cfg, self.model, self.params, self.tokenizer = md.config, md.model, md.params, md.tokenizer
    self.size = int(self.cfg.vision.image_size)
    self.alpha = float(alpha)
    try:
      require_vit(self.cfg, "the explain methods")
      self.tower = "vit"
    except ValueError:
      self.tower = str(getattr(self.cfg.vision, "kind", "other"))
    self.lock = threading.Lock()
    self._classes: dict = {}
    self._results: collections.OrderedDict = collections.OrderedDict()
    self._results_lock = threading.Lock()
    self._examples: dict = {}

  # ------------------------------------------------------------------------------------ inputs

  def info(self) -> dict:
    from trace_jax.attribution.api import METHODS
    return {"model": self.name, "image_size": self.size, "patch_size": int(self.cfg.vision.patch_size),
            "tower": self.tower, "methods": list(METHODS), "tokenizer": self.tokenizer is not None,
            "examples": NUM_EXAMPLES, "default_classes": list(self.default_classes())}

  @staticmethod
  def decode_image(data: bytes, what: str = "the uploaded image") -> np.ndarray:
    """Bytes of an image file -> uint8 RGB [H, W, 3] at its own resolution; ValueError otherwise."""
    return _decode_upload(data, what, "RGB")

  def model_input(self, rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [1, S, S, 3]: squashed to the model's size, normalised for its tower."""
    from PIL import Image
    from trace_jax.data.preprocess import normalize, resize_image
    return normalize(np.asarray(resize_image(Image.fromarray(rgb), self.size, "squash")),
                     getattr(self.cfg.vision, "kind", "vit"))[None]   # SigLIP: [-1, 1]

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """int32 [T, L] ids and the warnings of tokenizing them (unknown words, truncation)."""
    from trace_jax.tokenizers import text_warnings
    if self.tokenizer is None:
      raise ValueError(f"model dir {self.name} has no tokenizer: phrases and class names cannot be read")
    ctx = int(self.cfg.text.context_length)
    warnings = text_warnings(self.tokenizer, list(texts), ctx)
    return np.asarray(self.tokenizer(list(texts), ctx), np.int32), warnings

  def example(self, index: int) -> dict:
    """Example ``index`` of the embedded dataset's test split: uint8 image, caption, phrases."""
    from trace_jax.data.shapes.scene import generate_example
    if not 0 <= int(index) < NUM_EXAMPLES:
      raise ValueError(f"example {index} does not exist; there are {NUM_EXAMPLES} (0..{NUM_EXAMPLES - 1})")
    if index not in self._examples:
      ex = generate_example(0, "test", int(index), image_size=EXAMPLE_SIZE)
      self._examples[index] = {"image": ex["image"], "caption": ex["caption"],
                               "phrases": list(ex["objects"]["phrase"]) + list(ex["refexps"]["text"])[:2]}
    return self._examples[index]

  @staticmethod
  def default_classes() -> tuple[str, ...]:
    """The embedded dataset's concepts (data/shapes/concepts.json ``fine`` names)."""
    from trace_jax.data.shapes.concepts import load_concepts
    return load_concepts().fine_names

  # ------------------------------------------------------------------------------------ explain

  def method_settings(self, method: str) -> dict:
    """Settings the page uses: the library defaults, except where they do not fit every model dir."""
    if method == "m2ib":
      from trace_jax.attribution.m2ib import DEFAULT_LAYER
      # official bottleneck after block 9 of a 12-block ViT-B (notes/m2ib.md §1); smaller towers: their
      # last block. out_size None: the map at the input size (as the CLI), then resampled to the upload.
      layer = min(DEFAULT_LAYER, self.cfg.vision.layers - 1, self.cfg.text.layers - 1)
      return {"layer": layer, "out_size": None}
    return self.siglip_correction() if method == "legrad" else {}

  def siglip_correction(self) -> dict:
    """SigLIP dirs: the ids of the authors' empty prompt for LeGrad-SigLIP's correction (and MaskInversion's,
    which reads the same maps); {} for other towers."""
    if getattr(self.cfg.vision, "kind", "vit") != "siglip":
      return {}
    from trace_jax.attribution.legrad_siglip import empty_prompt_ids
    return {"empty_ids": empty_prompt_ids(self.tokenizer, self.cfg.text.context_length)}

  def explain(self, rgb: np.ndarray, phrases: Sequence[str], methods: Sequence[str]) -> dict:
    """Every phrase x method on one image (one image forward per method for all phrases).

    Returns {"width", "height", "phrases", "methods", "warnings", "scores": {m: [P]},
    "overlays": {m: [P PNG bytes at H x W]}, "tokens": {m: [P lists of (token, score)]} for methods
    with text attributions, "arrays": {"<m>_map": [P, S, S], ...} (for the npz)}.
    """
    from trace_jax.attribution.api import METHODS, ONE_FORWARD, explain
    from trace_jax.utils import overlay as ov
    phrases = [p.strip() for p in phrases if p.strip()]
    if not phrases:
      raise ValueError("type at least one phrase (one per line)")
    if len(phrases) > MAX_PHRASES:
      raise ValueError(f"{len(phrases)} phrases; the page takes at most {MAX_PHRASES}")
    methods = list(dict.fromkeys(methods))
    if not methods:
      raise ValueError("choose at least one method")
    bad = [m for m in methods if m not in METHODS]
    if bad:
      raise ValueError(f"unknown method {bad[0]!r}; expected one of {', '.join(METHODS)}")
    x = self.model_input(rgb)
    ids, warnings = self.tokenize(phrases)
    P = len(phrases)
    res = {"width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "phrases": phrases, "methods": methods,
           "warnings": warnings, "scores": {}, "overlays": {}, "tokens": {}, "arrays": {}}
    for m in methods:
      rows = ids
      if m in ONE_FORWARD and _bucket(P) > P:  # pad with copies of the last phrase: one program per bucket
        rows = np.concatenate([ids, np.repeat(ids[-1:], _bucket(P) - P, 0)])
      with self.lock:
        out = explain(m, self.model, self.params, x, rows, **self.method_settings(m))
        out = {k: np.asarray(v) for k, v in out.items()}
      out = {k: v[:P] if v.ndim and v.shape[0] == rows.shape[0] else v for k, v in out.items()}
      res["scores"][m] = [float(s) for s in out["score"]]
      res["overlays"][m] = [png_bytes(ov.overlay(rgb, ov.map_to_image(out["map"][p], rgb.shape[:2], "squash"),
                                                 alpha=self.alpha)) for p in range(P)]
      if "text" in out and out["text"].ndim == 2:
        res["tokens"][m] = [token_scores(self.tokenizer, phrases[p], ids[p], out["text"][p]) for p in range(P)]
      for k, v in out.items():
        if isinstance(v, np.ndarray) and v.dtype != object:
          res["arrays"][f"{m}_{k}"] = v
    return res

  # ------------------------------------------------------------------------------------ invert

  def masks_from_boxes(self, boxes, hw: tuple[int, int]) -> np.ndarray:
    """Boxes [[x0, y0, x1, y1], ...] in pixels of the uploaded image -> float32 [K, H, W]."""
    from trace_jax.inversion.maskinversion import rasterize_boxes
    b = np.asarray(boxes, np.float64)
    if b.size == 0:
      return np.zeros((0,) + tuple(hw), np.float32)
    if b.ndim != 2 or b.shape[1] != 4 or not np.all(np.isfinite(b)):
      raise ValueError(f"boxes must be a list of [x0, y0, x1, y1]; got shape {b.shape}")
    b = np.stack([np.minimum(b[:, 0], b[:, 2]), np.minimum(b[:, 1], b[:, 3]),
                  np.maximum(b[:, 0], b[:, 2]), np.maximum(b[:, 1], b[:, 3])], 1)
    return rasterize_boxes(b, hw)

  def decode_mask(self, data: bytes, name: str) -> np.ndarray:
    """An uploaded mask file -> float32 [H, W] in [0, 1]: grey value / 255, no threshold (as
    MaskInversion's ``MaskInversionMaskPreprocess``; trace_jax/cli/invert.py reads files the same way)."""
    return _decode_upload(data, f"mask file {name}", "L").astype(np.float32) / 255.0

  def _to_model_grid(self, mask: np.ndarray) -> np.ndarray:
    """A mask over the uploaded image (any size) -> [S, S], area-averaged (a soft mask in [0, 1]).

    Squash maps the whole image onto the input, so the mask's frame is the input's frame; resampling
    every mask to S x S keeps one mask shape (one compiled program) for every upload.
    """
    from PIL import Image
    m = np.asarray(mask, np.float32)
    if m.shape == (self.size, self.size):
      return m
    return np.clip(np.asarray(Image.fromarray(m, mode="F").resize((self.size, self.size), Image.BOX),
                              np.float32), 0.0, 1.0)

  def class_embeddings(self, classes: tuple[str, ...]) -> np.ndarray:
    """Unit [C, E] prompt-ensembled embeddings of ``classes`` (cached per list)."""
    from trace_jax.evaluation.zeroshot import (SHAPES_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES,
                                               class_text_embeddings)
    from trace_jax.tokenizers.word import WordTokenizer
    if self.tokenizer is None:
      raise ValueError(f"model dir {self.name} has no tokenizer: class names cannot be read")
    if classes not in self._classes:
      # word-level tokenizers know only the embedded captions' words: their templates (zeroshot.py)
      templates = SHAPES_TEMPLATES if isinstance(self.tokenizer, WordTokenizer) else SIMPLE_IMAGENET_TEMPLATES
      with self.lock:
        emb = np.asarray(class_text_embeddings(self.model, self.params, self.tokenizer, classes, templates))
      if len(self._classes) > 8:
        self._classes.pop(next(iter(self._classes)))
      self._classes[classes] = emb
    return self._classes[classes]

  def invert(self, rgb: np.ndarray, *, boxes=(), masks: Sequence[np.ndarray] = (),
             classes: Sequence[str] | None = None, top: int = TOP_CLASSES) -> dict:
    """MaskInversion for every box and mask at once, each LET's final LeGrad map and top classes.

    Returns {"width", "height", "masks": [K PNG: the mask on the image], "maps": [K PNG: the final
    map's overlay], "top": [K lists of (class, cosine)], "losses": [first, last], "mode", "arrays"}.
    """
    from trace_jax.inversion.maskinversion import invert
    from trace_jax.models import l2_normalize
    from trace_jax.utils import overlay as ov
    hw = rgb.shape[:2]
    full = [m for m in self.masks_from_boxes(boxes, hw)]
    for i, m in enumerate(masks):
      if m.ndim != 2:
        raise ValueError(f"mask {i + 1} must be one [H, W] mask; got shape {m.shape}")
      full.append(m)
    if not full:
      raise ValueError("draw at least one box on the image or upload a mask file")
    if len(full) > MAX_MASKS:
      raise ValueError(f"{len(full)} masks; the page takes at most {MAX_MASKS}")
    grid = np.stack([self._to_model_grid(m) for m in full])
    empty = [i + 1 for i, m in enumerate(grid) if not m.sum() > 0]
    if empty:
      raise ValueError(f"mask {', '.join(map(str, empty))} is empty (all zero): draw a box with an area "
                       f"or upload a mask with white pixels")
    classes = tuple(c.strip() for c in (classes or self.default_classes()) if c.strip())
    if not classes:
      raise ValueError("the class list is empty: one class name per line")
    if len(classes) > MAX_CLASSES:
      raise ValueError(f"{len(classes)} classes; the page takes at most {MAX_CLASSES}")
    cls = self.class_embeddings(classes)
    x = self.model_input(rgb)[0]
    with self.lock:
      out = invert(self.model, self.params, x, grid, **self.siglip_correction())
      out = {k: (np.asarray(v) if not isinstance(v, str) else v) for k, v in out.items()}
      sims = np.asarray(l2_normalize(out["lets"]) @ cls.T)
    k_top = max(1, min(int(top), len(classes)))
    tops = [[(classes[c], float(s[c])) for c in np.argsort(-s)[:k_top]] for s in sims]
    mask_pics, map_pics = [], []
    for m, mp in zip(full, out["map"]):
      m = np.clip(ov.resize_map(m, hw), 0.0, 1.0)[..., None]
      mask_pics.append(png_bytes(np.round(rgb * (0.25 + 0.75 * m))))  # outside the mask dimmed to 1/4
      map_pics.append(png_bytes(ov.overlay(rgb, ov.map_to_image(mp, hw, "squash"), alpha=self.alpha)))
    return {"width": int(hw[1]), "height": int(hw[0]), "masks": mask_pics, "maps": map_pics, "top": tops,
            "losses": [float(out["losses"][0]), float(out["losses"][-1])], "mode": str(out.get("mode", "")),
            "arrays": {"lets": out["lets"], "map": out["map"], "masks": grid, "sims": sims,
                       "classes": np.asarray(classes, dtype=str)}}

  # ------------------------------------------------------------------------------------ downloads

  def keep(self, arrays: dict) -> str:
    """Store an npz of ``arrays`` for download; returns its id (random, not guessable from others)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    rid = uuid.uuid4().hex
    with self._results_lock:
      self._results[rid] = buf.getvalue()
      while len(self._results) > KEEP_RESULTS:
        self._results.popitem(last=False)
    return rid

  def result(self, rid: str) -> bytes:
    with self._results_lock:
      if rid not in self._results:
        raise KeyError(f"result {rid} is gone (only the last {KEEP_RESULTS} are kept): run it again")
      return self._results[rid]
