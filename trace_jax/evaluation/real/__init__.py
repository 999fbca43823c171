"""The papers' evaluations on the real datasets (configs/eval_*.py; `python evaluate.py --config ...`).

    results = run(config, checkpoint=None, out_dir=None)   # reads config.eval, writes results.json

``config.eval`` (fields: trace_jax/evaluation/real_config.py) names a tfds builder of trace_jax/data/real, read with
``as_data_source(split)`` (built from ``dataset.manual_dir`` first when ``dataset.data_dir`` holds no
prepared copy), a converted model dir, a task, and the method's settings. Tasks:

* ``class_retrieval``, ``referring_retrieval``: real/retrieval.py
* ``pointing_game``: real/pointing.py
* ``m2ib_localization``: real/m2ib.py
* ``trace_grounding``: real/trace.py

(each module's docstring says what its task computes). Loading and the shared helpers (images, boxes,
tokens): real/common.py.
"""
from __future__ import annotations

import json
import os

from trace_jax.evaluation.real.common import (  # noqa: F401
    Loaded, frame_transform, image_pixels, load_model_dir, load_source, pad_rows, tokenize)
from trace_jax.evaluation.real.m2ib import box_masks, run_m2ib_localization  # noqa: F401
from trace_jax.evaluation.real.pointing import gradcam_fn, pointing_queries, run_pointing_game  # noqa: F401
from trace_jax.evaluation.real.retrieval import (  # noqa: F401
    class_names, class_queries, region_embeddings, run_class_retrieval, run_referring_retrieval, templates)
from trace_jax.evaluation.real.trace import grounded_words, run_trace_grounding, trace_maps_fn  # noqa: F401

TASKS = ('class_retrieval', 'referring_retrieval', 'pointing_game', 'm2ib_localization', 'trace_grounding')


# ---------------------------------------------------------------------------------------------- driver

RUNNERS = {'class_retrieval': run_class_retrieval, 'referring_retrieval': run_referring_retrieval,
           'pointing_game': run_pointing_game, 'm2ib_localization': run_m2ib_localization}


def format_table(results: dict) -> str:
  """Methods x metrics (percent), plus the per-category rows of the pointing game."""
  rows = dict(results['methods'])
  rows.update({f'  {c}': r for c, r in results.get('per_category', {}).items()})
  cols = [k for k in next(iter(results['methods'].values())) if k not in ('n', 'skipped_words')]
  head = f"{'method':<22}" + ''.join(f'{c:>22}' for c in cols) + f"{'n':>8}"
  lines = [f"{results['paper']}", f"{results['dataset']} split {results['split']}, {results['checkpoint']}",
           head, '-' * len(head)]
  for name, r in rows.items():
    lines.append(f'{name:<22}' + ''.join(f'{100 * r[c]:>21.2f}%' if c in r else f"{'':>22}" for c in cols)
                 + f"{r.get('n', ''):>8}")
  return '\n'.join(lines)


def run(config, checkpoint: str | None = None, out_dir: str | None = None, verbose: bool = True) -> dict:
  """Runs ``config.eval`` (see the module docstring); returns the results and writes
  ``<out_dir>/results.json`` (default out_dir: ``<checkpoint>/eval/<task>_<dataset config>_<split>``)."""
  e = config.eval
  task = e.get('task')
  if task not in TASKS:
    raise ValueError(f'unknown eval task {task!r}; expected one of {TASKS}')
  ckpt = os.path.expanduser(checkpoint or e.checkpoint)
  d = e.dataset
  builder, source = load_source(d, verbose)
  if task == 'trace_grounding':
    res = run_trace_grounding(e, ckpt, builder, source, verbose)
  else:
    loaded = load_model_dir(ckpt)
    res = RUNNERS[task](e, loaded, builder, source, verbose)
    res['checkpoint'] = loaded.desc
  res = {'task': task, 'paper': e.get('paper', ''), 'dataset': f'{d.name}/{d.config}', 'split': d.split,
         'skipped_annotations': builder.stats, **res}
  out_dir = out_dir or os.path.join(ckpt, 'eval', f'{task}_{d.config}_{d.split}')
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'results.json')
  with open(path, 'w') as f:
    json.dump(res, f, indent=2, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o))
  if verbose:
    print(format_table(res))
    print(f'wrote {path}')
  return res
