"""Scene sampling of the embedded `trace_shapes` grounding dataset (pure NumPy).

One call of `generate_example(seed, split, index, image_size)` returns one example as a dict of NumPy
arrays and strings: builder.py yields it unchanged as the tfds example. Everything is a function of
(seed, split, index): the per-example generator is `np.random.default_rng([seed, split_id, index])`.

Ground truth is exact by construction: a pixel belongs to an object iff its centre lies inside the
object's shape (no anti-aliasing; paint.py draws), objects are painted back to front, and the
instance / semantic masks are the painter's record of which object (or which background "stuff") owns
each pixel. Boxes and per-word pixel masks are derived from those masks. The concept hierarchy is
concepts.py (concepts.json).

Conventions (also in docs/data.md):
- `instance[y, x]` = k + 1 for object k (objects listed back to front), 0 for background stuff.
- `semantic[y, x]` = label id = position in concepts.json `fine` (things first, then stuff).
- boxes are `[y0, x0, y1, x1]` in pixels, end-exclusive, of the *visible* mask.
- caption words: `caption.split(' ')`; for word i, `word_obj[i]` is the object it describes (-1 none),
  `word_stuff[i]` the stuff label id it names (-1 none), `word_kind[i]` one of WORD_KINDS.
"""
from __future__ import annotations

import math

import numpy as np

from trace_jax.data.shapes import paint
from trace_jax.data.shapes.concepts import Concepts, load_concepts

SPLITS = ('train', 'validation', 'test', 'heldout', 'openvocab')
SPLIT_IDS = {s: i for i, s in enumerate(SPLITS)}

# Word kinds of caption words (word_kind). 0 names nothing visible.
WORD_KINDS = ('function', 'fine', 'coarse', 'color', 'size', 'texture', 'stuff')
KIND = {k: i for i, k in enumerate(WORD_KINDS)}

# Scene statistics, in fractions of the image size S: different sizes draw nearly the same scenes
# (they differ only where the pixel-exact visibility test accepts a placement at one size only).
MAX_OBJECTS = 5
SMALL_RADIUS = (0.10, 0.125)  # circumradius / S
LARGE_RADIUS = (0.17, 0.21)
MIN_VISIBLE = 0.7  # every object keeps >= 70% of its own pixels visible
P_LOOKALIKE = 0.4  # an object copies the class (and maybe attributes) of an earlier one
P_COPY_ATTR = 0.6  # ... and each of color / size / texture with this probability
P_TWO_STUFF = 0.5  # sky above a ground stuff (grass / water / sand) instead of one stuff
P_SIZE_WORD = 0.6  # caption names the size
P_TEXTURE_WORD = 0.7  # caption names a non-plain texture
P_COARSE_NOUN = 0.15  # caption names a (non open-vocab) object by its coarse word
SPATIAL_MARGIN = 0.12  # a spatial word needs a gap of at least this * S between box centres
MAX_CAPTION_WORDS = MAX_OBJECTS * 5 + (MAX_OBJECTS - 1) + 4  # 33


# ----------------------------------------------------------------------------------------------------
# Scene sampling


def _sample_objects(rng, concepts, split):
  """Attributes of 1..MAX_OBJECTS objects (dicts), before placement; the first is the forced one."""
  things = concepts.things
  n_colors = len(concepts.color_names)
  n = int(rng.integers(1, MAX_OBJECTS + 1))
  objs = []
  for i in range(n):
    if i > 0 and rng.random() < P_LOOKALIKE:  # a look-alike group, so that spatial words are needed
      src = objs[int(rng.integers(i))]
      o = dict(fine=src['fine'])
      for k, m in (('color', n_colors), ('size', 2), ('texture', len(concepts.textures))):
        o[k] = src[k] if rng.random() < P_COPY_ATTR else int(rng.integers(m))
    else:
      o = dict(fine=int(rng.choice(things)), color=int(rng.integers(n_colors)), size=int(rng.integers(2)),
               texture=int(rng.integers(len(concepts.textures))))
    objs.append(o)
  forced = None
  if split == 'heldout':  # at least one object carries a held-out (color, class) combination
    combos = sorted(concepts.heldout)
    forced = combos[int(rng.integers(len(combos)))]
    objs[0]['color'], objs[0]['fine'] = forced
  elif split == 'openvocab':  # at least one object of an open-vocabulary class
    objs[0]['fine'] = int(rng.choice(sorted(concepts.open_vocab)))
  for j, o in enumerate(objs):
    o['heldout'] = (o['color'], o['fine']) in concepts.heldout
    if o['heldout'] and not (split == 'heldout'):  # never outside the heldout split
      allowed = [c for c in range(n_colors) if (c, o['fine']) not in concepts.heldout]
      o['color'], o['heldout'] = int(rng.choice(allowed)), False
  return objs


def _visible(masks, order):
  """Visible masks given full masks and z-order (higher draws later, on top)."""
  out = []
  for j, m in enumerate(masks):
    cover = np.zeros_like(m)
    for k, mk in enumerate(masks):
      if order[k] > order[j]:
        cover |= mk
    out.append(m & ~cover)
  return out


def _place(rng, objs, concepts, s, max_tries=40):
  """Samples geometry and z-order so that every object keeps MIN_VISIBLE of its pixels.

  Objects that cannot be placed are dropped, except the first (forced) one, which goes on an empty
  canvas first. Returns the placed objects in back-to-front order, each with its full mask.
  """
  z = rng.permutation(len(objs))  # z-order independent of placement order (forced one not always behind)
  min_px = max(6, int(0.004 * s * s))
  placed, masks, zs = [], [], []
  for o, zo in zip(objs, z):
    name = concepts.fine_names[o['fine']]
    lo, hi = LARGE_RADIUS if o['size'] else SMALL_RADIUS
    for _ in range(max_tries):
      r = rng.uniform(lo, hi) * s
      cy, cx = rng.uniform(r + 1, s - 1 - r, size=2)
      rot = paint.MAX_ROTATION.get(name, math.pi)
      angle = rng.uniform(-rot, rot)
      m = paint.shape_mask(name, cy, cx, r, angle, s)
      cand, cz = masks + [m], zs + [zo]
      vis = _visible(cand, cz)
      if all(v.sum() >= MIN_VISIBLE * f.sum() and v.sum() >= min_px for v, f in zip(vis, cand)):
        placed.append(dict(o, cy=cy, cx=cx, radius=r, angle=angle))
        masks.append(m)
        zs.append(zo)
        break
  order = np.argsort(zs, kind='stable')
  return [placed[i] for i in order], [masks[i] for i in order]


def _background(rng, pix, concepts, s):
  """Stuff layout (from rng) and textures (from pix): (image float [S,S,3], semantic uint8 [S,S],
  stuff label ids present)."""
  sky = concepts.label('sky')
  if rng.random() < P_TWO_STUFF:
    ground = int(rng.choice(concepts.ground_stuff))
    xx = np.arange(s) + 0.5
    horizon = s * rng.uniform(0.3, 0.55) + 0.03 * s * np.sin(2 * math.pi * xx / (s * rng.uniform(0.6, 1.2))
                                                             + rng.random() * 6)
    top = (np.arange(s)[:, None] + 0.5) < horizon[None, :]
    img = np.where(top[..., None], paint.texture('sky', pix, s),
                   paint.texture(concepts.fine_names[ground], pix, s))
    sem = np.where(top, sky, ground).astype(np.uint8)
    return img, sem, [ground, sky]
  stuff = int(rng.choice(concepts.stuff))
  return paint.texture(concepts.fine_names[stuff], pix, s), np.full((s, s), stuff, np.uint8), [stuff]


# ----------------------------------------------------------------------------------------------------
# Language


def _noun(o, concepts, split, rng=None):
  """Caption noun of an object: open-vocab classes are named by their coarse word outside the
  openvocab split (so those fine words never occur in train/validation/test/heldout text)."""
  f = o['fine']
  coarse = concepts.coarse_names[concepts.fine_coarse[f]]
  if f in concepts.open_vocab:
    return (concepts.fine_names[f], 'fine') if split == 'openvocab' else (coarse, 'coarse')
  if rng is not None and rng.random() < P_COARSE_NOUN:
    return coarse, 'coarse'
  return concepts.fine_names[f], 'fine'


def _matches(o, noun, attrs, t, concepts):
  names = (concepts.fine_names[o['fine']], concepts.coarse_names[concepts.fine_coarse[o['fine']]])
  return noun in names and all(o[a] == t[a] for a in attrs)


def _describe(t, noun, attrs, concepts):
  words = []
  if 'size' in attrs:
    words.append(concepts.sizes[t['size']])
  words.append(concepts.color_names[t['color']])
  if 'texture' in attrs:
    words.append(concepts.textures[t['texture']])
  return ' '.join(words + [noun])


def _refexp(k, objs, concepts, split, rng, s):
  """A referring expression that singles out objs[k], or None. Returns (text, uses_spatial).

  Attributes first (color, then + size / texture); if no attribute set is unique among the objects
  with the same noun, spatial words among the look-alikes M (AMC §4.1): with |M| = 2 'the D on the
  left/right', 'the top/bottom D'; with |M| >= 3 'the leftmost/rightmost/topmost/bottommost D'; and
  'the D in the top left (...) corner' when the referent is in that corner third and no other member of
  M is in the same quadrant. A spatial word requires a gap >= SPATIAL_MARGIN * S between box centres.
  """
  t = objs[k]
  noun, _ = _noun(t, concepts, split)
  for attrs in (('color',), ('size', 'color'), ('color', 'texture'), ('size', 'color', 'texture')):
    if sum(_matches(o, noun, attrs, t, concepts) for o in objs) == 1:
      return 'the ' + _describe(t, noun, attrs, concepts), False
  d = SPATIAL_MARGIN * s
  for attrs in (('color',), ('size', 'color', 'texture')):
    desc = _describe(t, noun, attrs, concepts)
    others = [o for j, o in enumerate(objs) if j != k and _matches(o, noun, attrs, t, concepts)]
    oy, ox = np.array([o['by'] for o in others]), np.array([o['bx'] for o in others])
    opts = []
    if len(others) == 1:
      if t['bx'] + d <= ox.min(): opts.append(f'the {desc} on the left')
      if t['bx'] - d >= ox.max(): opts.append(f'the {desc} on the right')
      if t['by'] + d <= oy.min(): opts.append(f'the top {desc}')
      if t['by'] - d >= oy.max(): opts.append(f'the bottom {desc}')
    else:
      if t['bx'] + d <= ox.min(): opts.append(f'the leftmost {desc}')
      if t['bx'] - d >= ox.max(): opts.append(f'the rightmost {desc}')
      if t['by'] + d <= oy.min(): opts.append(f'the topmost {desc}')
      if t['by'] - d >= oy.max(): opts.append(f'the bottommost {desc}')
    for vert, top in (('top', True), ('bottom', False)):
      for horiz, left in (('left', True), ('right', False)):
        in_corner = (t['by'] < s / 3 if top else t['by'] > 2 * s / 3) and (
            t['bx'] < s / 3 if left else t['bx'] > 2 * s / 3)
        in_quadrant = ((oy < s / 2) if top else (oy > s / 2)) & ((ox < s / 2) if left else (ox > s / 2))
        if in_corner and not in_quadrant.any():
          opts.append(f'the {desc} in the {vert} {horiz} corner')
    if opts:
      return opts[int(rng.integers(len(opts)))], True
  return None, False


# ----------------------------------------------------------------------------------------------------
# The example


def example_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
  """The per-example generators, functions of (seed, split, index) only: stream 0 draws the scene
  (stuff layout, objects, geometry in units of S, words), stream 1 the pixels (textures, patterns,
  noise), so that the scene does not depend on how many random numbers a resolution consumes."""
  if split not in SPLIT_IDS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
  return np.random.default_rng([int(seed), SPLIT_IDS[split], int(index), int(stream)])


def generate_example(seed: int, split: str, index: int, image_size: int = 64,
                     concepts: Concepts | None = None) -> dict:
  """One scene with its exact ground truth (the tfds feature dict of builder.py).

  Returns:
    id: int; image: uint8 [S, S, 3]; semantic: uint8 [S, S] (label ids); instance: uint8 [S, S]
    (0 stuff, k + 1 object k); stuff: int32 [n_stuff] stuff label ids present; caption: str;
    word_obj / word_stuff / word_kind: int32 [W] per caption word (W = len(caption.split(' ')));
    objects: dict of n-vectors fine, coarse, color, size, texture (int32), box int32 [n, 4]
      (y0, x0, y1, x1 end-exclusive, visible pixels), area (visible px), full_area (px before
      occlusion), heldout (bool), phrase (list of n str: the object's noun phrase in the caption);
    refexps: dict with text (list of m str), object (int32 [m]), spatial (bool [m]).
  """
  concepts = concepts or load_concepts()
  s = int(image_size)
  if s < 32:
    raise ValueError(f'image_size must be >= 32 (smaller shapes are unreadable), got {s}')
  rng, pix = example_rng(seed, split, index, 0), example_rng(seed, split, index, 1)
  img, semantic, stuff = _background(rng, pix, concepts, s)
  objs, masks = _place(rng, _sample_objects(rng, concepts, split), concepts, s)
  instance = np.zeros((s, s), np.uint8)
  for k, (o, m) in enumerate(zip(objs, masks)):  # back to front
    paint.paint_object(img, m, o, concepts, pix, s)
    instance[m] = k + 1
    semantic[m] = o['fine']
  img = np.clip(np.rint(img + pix.normal(size=img.shape) * 3), 0, 255).astype(np.uint8)
  for k, o in enumerate(objs):
    vis = instance == k + 1
    o['box'] = paint.mask_box(vis)
    o['area'], o['full_area'] = int(vis.sum()), int(masks[k].sum())
    o['by'], o['bx'] = (o['box'][0] + o['box'][2]) / 2, (o['box'][1] + o['box'][3]) / 2

  # Caption: the objects' noun phrases in random order, joined by 'and', then the stuff clause.
  words, w_obj, w_stuff, w_kind, phrases = [], [], [], [], []
  for k, o in enumerate(objs):
    noun, noun_kind = _noun(o, concepts, split, rng)
    ph = []
    if rng.random() < P_SIZE_WORD:
      ph.append((concepts.sizes[o['size']], KIND['size']))
    ph.append((concepts.color_names[o['color']], KIND['color']))
    if concepts.textures[o['texture']] != 'plain' and rng.random() < P_TEXTURE_WORD:
      ph.append((concepts.textures[o['texture']], KIND['texture']))
    ph.append((noun, KIND[noun_kind]))
    article = 'an' if ph[0][0][0] in 'aeiou' else 'a'
    phrases.append([(article, KIND['function'])] + ph)
  for i, k in enumerate(rng.permutation(len(objs))):
    if i:
      words.append('and'); w_obj.append(-1); w_stuff.append(-1); w_kind.append(KIND['function'])
    for w, kind in phrases[k]:
      words.append(w); w_kind.append(kind); w_stuff.append(-1)
      w_obj.append(int(k) if kind != KIND['function'] else -1)
  if len(stuff) == 2:
    clause = [('on', -1), (concepts.fine_names[stuff[0]], stuff[0]), ('under', -1), ('sky', stuff[1])]
  else:
    clause = [(concepts.prepositions[stuff[0]], -1), (concepts.fine_names[stuff[0]], stuff[0])]
  for w, st in clause:
    words.append(w); w_obj.append(-1); w_stuff.append(st)
    w_kind.append(KIND['stuff'] if st >= 0 else KIND['function'])

  refs = [(_refexp(k, objs, concepts, split, rng, s), k) for k in range(len(objs))]
  refs = [(text, sp, k) for (text, sp), k in refs if text is not None]
  n = len(objs)
  return {
      'id': int(index),
      'image': img,
      'semantic': semantic,
      'instance': instance,
      'stuff': np.asarray(stuff, np.int32),
      'caption': ' '.join(words),
      'word_obj': np.asarray(w_obj, np.int32),
      'word_stuff': np.asarray(w_stuff, np.int32),
      'word_kind': np.asarray(w_kind, np.int32),
      'objects': {
          'fine': np.asarray([o['fine'] for o in objs], np.int32),
          'coarse': np.asarray([concepts.fine_coarse[o['fine']] for o in objs], np.int32),
          'color': np.asarray([o['color'] for o in objs], np.int32),
          'size': np.asarray([o['size'] for o in objs], np.int32),
          'texture': np.asarray([o['texture'] for o in objs], np.int32),
          'box': np.asarray([o['box'] for o in objs], np.int32).reshape(n, 4),
          'area': np.asarray([o['area'] for o in objs], np.int32),
          'full_area': np.asarray([o['full_area'] for o in objs], np.int32),
          'heldout': np.asarray([o['heldout'] for o in objs], bool),
          'phrase': [' '.join(w for w, _ in ph) for ph in phrases],
      },
      'refexps': {
          'text': [t for t, _, _ in refs],
          'object': np.asarray([k for _, _, k in refs], np.int32),
          'spatial': np.asarray([sp for _, sp, _ in refs], bool),
      },
  }


def word_masks(example: dict) -> np.ndarray:
  """Bool [W, S, S]: the pixels each caption word refers to (empty for function words).

  Derived exactly from the instance / semantic masks: an object word -> instance == obj + 1; a stuff
  word -> semantic == its label (the stuff's visible pixels).
  """
  inst, sem = np.asarray(example['instance']), np.asarray(example['semantic'])
  obj, st = np.asarray(example['word_obj']), np.asarray(example['word_stuff'])
  by_obj = inst[None] == (obj[:, None, None] + 1)
  by_stuff = sem[None] == st[:, None, None]
  return np.where((obj >= 0)[:, None, None], by_obj, by_stuff & (st >= 0)[:, None, None])
