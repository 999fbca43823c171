"""Dataset-scale runs: this process's share of a dataset, in shards written as they are produced,
atomically, and skipped when a run is restarted.

    items = [...]                                         # a list, the same on every process
    summary = run_shards(items, compute, out_dir, shard_size=16, prefix="lets")

``compute(items_of_one_shard) -> (arrays, failed)``: ``arrays`` a dict of numpy arrays (the shard's
results), ``failed`` a list of (item id, reason) for the items it skipped (an unreadable image, an
empty mask): they are listed, never a crash of the whole run.

Layout of ``out_dir`` (docs/inference.md): ``{prefix}-{shard:05d}.npz`` per shard (its arrays plus
``ids`` [n] (the item ids it holds), ``failed_ids`` / ``failed_reasons``), and per process
``index-{process:05d}-of-{count:05d}.json``: every shard of that process with its file, item ids and
failures. Shard j belongs to process ``j % process_count`` (``process_share``): the processes' files
are disjoint and together cover the dataset once.

Why the run is resumable and its files byte-identical to an uninterrupted run's: a shard's content
is a pure function of its items (fixed shapes: the callers pad batches to a fixed size, so XLA runs
the same program), a shard file is written to a hidden temporary, fsync'd and renamed into place
(trace_jax/atomic.py: a killed run leaves no partial shard, at most a hidden ``.{name}.tmp{pid}.npz``),
and ``.npz`` files are written with fixed zip timestamps (``write_npz``; ``numpy.savez`` stamps the current time).
"""
from __future__ import annotations

import io
import os
import time
import zipfile
from typing import Callable, Sequence

import numpy as np

from trace_jax import atomic


def process_share(num_shards: int, process_index: int | None = None,
                  process_count: int | None = None) -> list[int]:
  """The shards process ``process_index`` of ``process_count`` runs (default: jax's): j % count == index."""
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process index {process_index} is not in [0, {process_count})")
  return list(range(process_index, num_shards, process_count))


def npz_bytes(arrays: dict) -> bytes:
  """The bytes of an ``.npz`` (readable by ``np.load``) with fixed zip timestamps: equal arrays give
  equal bytes, unlike ``np.savez``, which stamps the time of writing."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
    for name in sorted(arrays):
      arr = np.asanyarray(arrays[name])
      if arr.dtype == object:
        raise ValueError(f"array {name!r} has dtype object; store strings as a str array")
      info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.external_attr = 0o644 << 16
      b = io.BytesIO()
      np.lib.format.write_array(b, arr, allow_pickle=False)
      z.writestr(info, b.getvalue())
  return buf.getvalue()


def write_npz(path: str, arrays: dict) -> str:
  return atomic.write_bytes(path, npz_bytes(arrays))


def write_json(path: str, obj) -> str:
  return atomic.write_json(path, obj, indent=1, sort_keys=True)


def shard_path(out_dir: str, prefix: str, j: int) -> str:
  return os.path.join(out_dir, f"{prefix}-{j:05d}.npz")


def index_path(out_dir: str, process_index: int, process_count: int) -> str:
  return os.path.join(out_dir, f"index-{process_index:05d}-of-{process_count:05d}.json")


def run_shards(items: Sequence, compute: Callable, out_dir: str, *, shard_size: int, prefix: str,
               item_id: Callable = str, process_index: int | None = None,
               process_count: int | None = None, progress: bool = True,
               count: Callable | None = None, unit: str = "items") -> dict:
  """Run ``compute`` over this process's shards of ``items``, skipping shards already written.

  ``count(arrays) -> int``: work units a shard did (e.g. masks) for the progress bar's rate.
  Returns the summary {'shards', 'done_before', 'written', 'items', 'failed', 'seconds', 'index'};
  the index file is rewritten (atomically) from the shard files after the last shard.
  """
  if shard_size < 1:
    raise ValueError(f"shard size must be >= 1; got {shard_size}")
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  os.makedirs(out_dir, exist_ok=True)
  n_shards = -(-len(items) // shard_size)
  mine = process_share(n_shards, process_index, process_count)
  todo = [j for j in mine if not os.path.exists(shard_path(out_dir, prefix, j))]
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard", dynamic_ncols=True,
               desc=f"{prefix} (process {process_index}/{process_count})")
  t0, n_items, n_units, n_failed = time.perf_counter(), 0, 0, 0
  for j in todo:
    part = items[j * shard_size:(j + 1) * shard_size]
    arrays, failed = compute(part)
    arrays = dict(arrays)
    arrays["ids"] = np.asarray([item_id(it) for it in part], dtype=str)
    arrays["failed_ids"] = np.asarray([str(i) for i, _ in failed], dtype=str)
    arrays["failed_reasons"] = np.asarray([str(r) for _, r in failed], dtype=str)
    write_npz(shard_path(out_dir, prefix, j), arrays)
    whole = {str(i) for i, _ in failed} & {str(i) for i in arrays["ids"]}  # items skipped entirely
    n_items += len(part) - len(whole)
    n_failed += len(failed)
    n_units += int(count(arrays)) if count else len(part) - len(whole)
    if bar is not None:
      dt = max(time.perf_counter() - t0, 1e-9)
      bar.set_postfix_str(f"{n_items / dt:.2f} images/s, {n_units / dt:.2f} {unit}/s, {n_failed} failed")
      bar.update(1)
  if bar is not None:
    bar.close()
  index = []
  for j in mine:
    with np.load(shard_path(out_dir, prefix, j)) as z:
      failed = [{"id": str(i), "reason": str(r)} for i, r in zip(z["failed_ids"], z["failed_reasons"])]
      index.append({"shard": j, "file": os.path.basename(shard_path(out_dir, prefix, j)),
                    "ids": [str(i) for i in z["ids"]], "failed": failed})
  ipath = write_json(index_path(out_dir, process_index, process_count),
                     {"prefix": prefix, "process_index": process_index, "process_count": process_count,
                      "num_items": len(items), "shard_size": shard_size, "shards": index})
  return {"shards": len(mine), "done_before": len(mine) - len(todo), "written": len(todo),
          "items": n_items, "failed": n_failed, "units": n_units,
          "seconds": time.perf_counter() - t0, "index": ipath,
          "failed_total": sum(len(s["failed"]) for s in index)}


def read_shards(out_dir: str, prefix: str) -> list[dict]:
  """Every shard file of every process in ``out_dir`` (shard order), as dicts of numpy arrays."""
  names = sorted(f for f in os.listdir(out_dir) if f.startswith(prefix + "-") and f.endswith(".npz"))
  out = []
  for f in names:
    with np.load(os.path.join(out_dir, f)) as z:
      out.append({k: z[k] for k in z.files})
  return out
