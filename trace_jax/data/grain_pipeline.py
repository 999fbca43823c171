"""Grain pipeline of the real training sources: records -> decoded, augmented, batched NumPy rows.

    ds = global_dataset(records, seed=0, image_size=224, augment=True)       # grain.MapDataset
    it = BatchIterator(ds, batch_size=B, start_step=0, tokenizer=tok, shard=ShardOptions(p, P),
                       worker_count=2)
    batch = next(it)            # this host's rows of global batch 0 (dict of NumPy arrays)
    state = it.get_state()      # JSON-able; BatchIterator(..., ).set_state(state) resumes exactly

Order (a pure function of (seed, step)). Global position g = step * B + row. The record at g is
``grain.MapDataset.source(range(N)).shuffle(seed).repeat()[g]`` (grain's index_shuffle, a fresh
permutation per epoch g // N); its augmentation draws from ``np.random.default_rng([seed, g])``.
Host p of P reads rows [p B / P, (p + 1) B / P) of each global batch: the dataset is batched in
B / P rows and sliced ``[p::P]`` (grain's index sharding, ``ShardOptions(p, P)`` =
``grain.sharding.ShardByJaxProcess`` by default), so a host decodes only its own rows. Nothing
depends on how many Grain worker processes run (``worker_count``, 0 = in-process), nor on where a
run was resumed: batch k of a resumed run is ``ds[k]`` as in the uninterrupted one.

Images (open_clip 2.23.0 ``open_clip/transform.py`` ``image_transform``):
  train: ``RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=BICUBIC)`` (torchvision's
         ``get_params``: 10 tries of area * U(scale) and exp(U(log 3/4, log 4/3)), else the central
         fallback; then crop + bicubic resize), ``_convert_to_rgb``, ``ToTensor``, ``Normalize``.
         We convert to RGB before the crop (the same pixels for RGB files).
  eval:  ``Resize(size, BICUBIC)`` (shortest side) + ``CenterCrop(size)`` (preprocess.resize_image).
  Normalisation with the model's mean / std (CLIP's by default).
Region masks (AMC, notes/amc-and-local-alignment.md §4): ``gt_mask[y1:y2, x1:x2] = 1`` on the
ORIGINAL image (int() truncation: trace_jax/boxes.py rule 'truncate'), then the SAME geometric
transform as the image, nearest-neighbour (AMC's albumentations pipeline resizes the mask with
nearest). A record whose image cannot be decoded is replaced by another record drawn with the
rng of (seed, g) (still a pure function of (seed, step)) and counted in the batch key ``skipped``.

Batch (per host, Bh = B / P rows; S = image_size; L = the tokenizer's context length):
  image           float32 [Bh, S, S, 3]   normalised
  caption_ids     int32   [Bh, L]         tokenised caption
  phrase_ids      int32   [Bh, L]         tokenised phrase (the caption where the record has none)
  mask            float32 [Bh, S, S]      1 inside the phrase's box (zeros without a box)
  mask_indicator  float32 [Bh]            1 where the row has a box
  index           int64   [Bh]            the record (item) index
  skipped         int32   [Bh]            unreadable records replaced to fill the row
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
from typing import Any, Callable, Sequence

import numpy as np

from trace_jax.boxes import boxes_to_masks
from trace_jax.data.preprocess import CLIP_MEAN, CLIP_STD, crop_geometry, resize_image

log = logging.getLogger("trace_jax.data")

TRAIN_SCALE = (0.9, 1.0)              # open_clip AugmentationCfg.scale default
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop default ratio
MAX_TRIES = 16                        # unreadable records replaced per row before giving up


class RecordError(ValueError):
  """A record that cannot be used (unreadable image, ...): replaced and counted by the pipeline."""


@dataclasses.dataclass
class Raw:
  """One training item before decoding. ``box``: [x0, y0, x1, y1] original pixels, or None."""
  image: bytes
  caption: str
  phrase: str | None = None
  box: Any = None
  where: str = ""


# ---------------------------------------------------------------------------------------------- geometry

def random_resized_crop_params(rng: np.random.Generator, height: int, width: int,
                               scale=TRAIN_SCALE, ratio=TRAIN_RATIO) -> tuple[int, int, int, int]:
  """(i, j, h, w) of torchvision ``RandomResizedCrop.get_params`` (torchvision 0.29
  transforms.py), drawn from ``rng`` instead of torch's generator."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      i = int(rng.integers(0, height - h + 1))
      j = int(rng.integers(0, width - w + 1))
      return i, j, h, w
  in_ratio = float(width) / float(height)          # fallback: central crop
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def decode(data: bytes, where: str = ""):
  """Encoded bytes -> RGB PIL image (fully loaded); RecordError when unreadable."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(bytes(data))) as im:
      return im.convert("RGB")
  except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
    raise RecordError(f"{where}: unreadable image ({e})") from None


def transform(img, size: int, rng: np.random.Generator | None, box=None):
  """RGB PIL image [+ box] -> (uint8 [S, S, 3], float32 [S, S] mask or None).

  rng None: the eval transform; else open_clip's train RandomResizedCrop drawn from rng."""
  from PIL import Image
  w0, h0 = img.size
  mask_img = None
  if box is not None:
    m = boxes_to_masks(np.asarray(box, np.float64), (h0, w0), rule="truncate")[0]
    mask_img = Image.fromarray(m.astype(np.uint8))
  if rng is None:
    out = resize_image(img, size, "crop")
    if mask_img is not None:
      (nw, nh), crop = crop_geometry(h0, w0, size)
      if (nw, nh) != (w0, h0):
        mask_img = mask_img.resize((nw, nh), Image.NEAREST)
      mask_img = mask_img.crop(crop)
  else:
    i, j, h, w = random_resized_crop_params(rng, h0, w0)
    # torchvision F.resized_crop on a PIL image = crop then resize(BICUBIC) (antialias is PIL's own)
    out = img.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)
    if mask_img is not None:
      mask_img = mask_img.crop((j, i, j + w, i + h)).resize((size, size), Image.NEAREST)
  mask = None if mask_img is None else np.asarray(mask_img, np.float32)
  return np.asarray(out, np.uint8), mask


# ---------------------------------------------------------------------------------------------- elements

class ElementFn:
  """(g, item index) -> one decoded row (module docstring), a pure function of (seed, g).

  ``records`` must be picklable (it travels to the Grain workers) with ``len`` and
  ``load(i, rng) -> Raw``."""

  def __init__(self, records, *, seed: int, image_size: int, augment: bool,
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
    self.records, self.seed, self.size, self.augment = records, int(seed), int(image_size), bool(augment)
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def __call__(self, g: int, i: int) -> dict:
    rng = np.random.default_rng([self.seed, int(g)])
    i = int(i)
    errors = []
    for _ in range(MAX_TRIES):
      try:
        raw = self.records.load(i, rng)
        img = decode(raw.image, raw.where)
        break
      except RecordError as e:
        errors.append(str(e))
        i = int(rng.integers(len(self.records)))    # deterministic stand-in (pure in (seed, g))
    else:
      raise ValueError(f"{MAX_TRIES} records in a row are unusable in {getattr(self.records, 'path', '?')}; "
                       f"last: {errors[-1]}")
    px, mask = transform(img, self.size, rng if self.augment else None, raw.box)
    s = self.size
    return {
        "image": ((px.astype(np.float32) / 255.0 - self.mean) / self.std).astype(np.float32),
        "caption": str(raw.caption),
        "phrase": str(raw.phrase if raw.phrase is not None else raw.caption),
        "mask": mask if mask is not None else np.zeros((s, s), np.float32),
        "mask_indicator": np.float32(mask is not None),
        "index": np.int64(i),
        "skipped": np.int32(len(errors)),
    }


def global_dataset(records, *, seed: int, image_size: int, augment: bool, mean=CLIP_MEAN, std=CLIP_STD):
  """grain.MapDataset of rows: position g -> ElementFn(g, shuffled(seed)[g]) (infinite, epochs
  reshuffled)."""
  import grain
  n = len(records)
  if n == 0:
    raise ValueError(f"no usable record in {getattr(records, 'path', '?')}")
  fn = ElementFn(records, seed=seed, image_size=image_size, augment=augment, mean=mean, std=std)
  return (grain.MapDataset.source(np.arange(n, dtype=np.int64)).shuffle(seed=int(seed) % 2**32)
          .repeat().map_with_index(fn))


def host_dataset(ds, batch_size: int, shard):
  """Batches of this host's rows: batch(B / P) then ``[p::P]`` (``shard``: grain ShardOptions)."""
  p, n = int(shard.shard_index), int(shard.shard_count)
  if batch_size % n:
    raise ValueError(f"data.batch_size {batch_size} is not divisible by the {n} processes")
  return ds.batch(batch_size // n)[p::n]


def _parse_absl_flags():
  # Grain reads absl flags in its workers; outside an absl app (tests, notebooks) they are unparsed.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class BatchIterator:
  """Iterator of this host's batches from ``start_step``; tokenises in the main process (any
  ``tokenize(texts) -> int32 [n, L]`` callable works, picklable or not).

  ``get_state()`` -> {'step', 'seed', 'batch_size', 'shard', 'num_records'} (JSON-able);
  ``set_state(state)`` resumes at that step (exact: batches are a pure function of the step).
  ``skipped``: unreadable records replaced so far; ``close()`` stops the workers.
  """

  def __init__(self, ds, *, batch_size: int, tokenizer: Callable, shard, start_step: int = 0,
               worker_count: int = 0, read_threads: int = 1, prefetch: int = 2, seed: int = 0,
               num_records: int = 0, name: str = ""):
    self._host = host_dataset(ds, batch_size, shard)
    self.tokenizer = tokenizer
    self.batch_size, self.shard, self.seed = int(batch_size), shard, int(seed)
    self.worker_count, self.read_threads, self.prefetch = int(worker_count), int(read_threads), int(prefetch)
    self.num_records, self.name = int(num_records), name
    self.skipped = 0
    self._it = None
    self._start(int(start_step))

  def _start(self, step: int):
    import grain
    self.close()
    if step < 0:
      raise ValueError(f"start step must be >= 0; got {step}")
    self.step = step
    it = self._host[step:].to_iter_dataset(
        grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=max(self.prefetch, 1)))
    if self.worker_count > 0:
      _parse_absl_flags()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                       per_worker_buffer_size=max(self.prefetch, 1)))
    self._it = iter(it)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    b = next(self._it)
    caption_ids = np.asarray(self.tokenizer(list(b["caption"])), np.int32)
    phrase_ids = caption_ids.copy()   # a record without a phrase reuses its caption (no 2nd tokenisation)
    own = [i for i, (c, p) in enumerate(zip(b["caption"], b["phrase"])) if c != p]
    if own:
      phrase_ids[own] = np.asarray(self.tokenizer([b["phrase"][i] for i in own]), np.int32)
    out = {
        "image": b["image"], "caption_ids": caption_ids, "phrase_ids": phrase_ids, "mask": b["mask"],
        "mask_indicator": b["mask_indicator"], "index": b["index"], "skipped": b["skipped"],
        "caption": b["caption"], "phrase": b["phrase"],
    }
    k = int(np.sum(b["skipped"]))
    if k:
      self.skipped += k
      log.warning("%s: step %d: %d unreadable record(s) replaced (%d so far)", self.name, self.step, k,
                  self.skipped)
    self.step += 1
    return out

  def get_state(self) -> dict:
    return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
            "shard": [int(self.shard.shard_index), int(self.shard.shard_count)],
            "num_records": self.num_records}

  def set_state(self, state: dict):
    """Resume at ``state['step']``. The seed, global batch size and record count must be the saved
    ones (else the order differs: refused, naming the key); the shard may differ, since the global
    order does not depend on the process count (a run saved by 2 processes resumes on 1)."""
    mine = self.get_state()
    for k in ("seed", "batch_size", "num_records"):
      if k in state and list(np.atleast_1d(state[k])) != list(np.atleast_1d(mine[k])):
        raise ValueError(f"{self.name}: iterator state {k}={state[k]} does not match this source's {mine[k]}")
    self._start(int(state["step"]))

  def close(self):
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass
