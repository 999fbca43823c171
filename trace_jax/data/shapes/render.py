"""Pure-NumPy scene generator of the embedded `trace_shapes` grounding dataset.

One call of `generate_example(seed, split, index, image_size)` returns one example as a dict of NumPy
arrays and strings (exactly the tfds feature dict of builder.py). Everything is a function of
(seed, split, index): the per-example generator is `np.random.default_rng([seed, split_id, index])`.

Ground truth is exact by construction: a pixel belongs to an object iff its centre lies inside the
object's shape (no anti-aliasing), objects are painted back to front, and the instance / semantic masks
are the painter's record of which object (or which background "stuff") owns each pixel. Boxes and
per-word pixel masks are derived from those masks.

Conventions (also in docs/data.md):
- `instance[y, x]` = k + 1 for object k (objects listed back to front), 0 for background stuff.
- `semantic[y, x]` = label id = position in concepts.json `fine` (things first, then stuff).
- boxes are `[y0, x0, y1, x1]` in pixels, end-exclusive, of the *visible* mask.
- caption words: `caption.split(' ')`; for word i, `word_obj[i]` is the object it describes (-1 none),
  `word_stuff[i]` the stuff label id it names (-1 none), `word_kind[i]` one of WORD_KINDS.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import numpy as np

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
# Concepts (the hierarchy, as data)


@dataclasses.dataclass(frozen=True)
class Concepts:
  """concepts.json, with id lookups. Label id = index into `fine_names` (things, then stuff)."""
  coarse_names: tuple[str, ...]
  coarse_kind: tuple[str, ...]  # 'thing' | 'stuff'
  fine_names: tuple[str, ...]
  fine_coarse: tuple[int, ...]  # coarse id of each label
  prepositions: dict
  ground_stuff: tuple[int, ...]  # label ids that may lie under the sky
  color_names: tuple[str, ...]
  color_rgb: np.ndarray  # [C, 3] uint8
  sizes: tuple[str, ...]
  textures: tuple[str, ...]
  function_words: tuple[str, ...]
  heldout: frozenset  # {(color id, label id)}
  open_vocab: frozenset  # {label id}

  @property
  def things(self) -> tuple[int, ...]:
    return tuple(i for i, c in enumerate(self.fine_coarse) if self.coarse_kind[c] == 'thing')

  @property
  def stuff(self) -> tuple[int, ...]:
    return tuple(i for i, c in enumerate(self.fine_coarse) if self.coarse_kind[c] == 'stuff')

  @property
  def num_labels(self) -> int:
    return len(self.fine_names)

  def label(self, name: str) -> int:
    return self.fine_names.index(name)

  def children(self, coarse: str) -> tuple[str, ...]:
    """Fine names under a coarse concept (the hierarchy, coarse -> fine)."""
    c = self.coarse_names.index(coarse)
    return tuple(n for n, p in zip(self.fine_names, self.fine_coarse) if p == c)


CONCEPTS_PATH = os.path.join(os.path.dirname(__file__), 'concepts.json')


@functools.lru_cache(maxsize=8)
def load_concepts(path: str = CONCEPTS_PATH) -> Concepts:
  """Parses and validates concepts.json; raises ValueError naming the problem."""
  with open(path) as f:
    d = json.load(f)
  coarse_names = tuple(c['name'] for c in d['coarse'])
  coarse_kind = tuple(c['kind'] for c in d['coarse'])
  if set(coarse_kind) - {'thing', 'stuff'}:
    raise ValueError(f'{path}: coarse kinds must be "thing" or "stuff", got {set(coarse_kind)}')
  fine_names = tuple(f['name'] for f in d['fine'])
  for f in d['fine']:
    if f['coarse'] not in coarse_names:
      raise ValueError(f'{path}: fine concept {f["name"]!r} has unknown coarse {f["coarse"]!r}')
  fine_coarse = tuple(coarse_names.index(f['coarse']) for f in d['fine'])
  color_names = tuple(c['name'] for c in d['colors'])
  words = list(coarse_names) + list(fine_names) + list(color_names) + d['sizes'] + d['textures']
  if len(set(words)) != len(words):
    raise ValueError(f'{path}: concept / attribute words must be distinct, got duplicates')
  heldout = set()
  for color, fine in d['heldout_combinations']:
    if color not in color_names or fine not in fine_names:
      raise ValueError(f'{path}: heldout combination {(color, fine)} names an unknown color or class')
    heldout.add((color_names.index(color), fine_names.index(fine)))
  for w in d['open_vocab']:
    if w not in fine_names or coarse_kind[fine_coarse[fine_names.index(w)]] != 'thing':
      raise ValueError(f'{path}: open-vocab word {w!r} is not a thing class')
  prepositions = {fine_names.index(f['name']): f['preposition'] for f in d['fine'] if 'preposition' in f}
  c = Concepts(
      coarse_names=coarse_names, coarse_kind=coarse_kind, fine_names=fine_names,
      fine_coarse=fine_coarse, prepositions=prepositions,
      ground_stuff=tuple(fine_names.index(n) for n in d['ground_stuff']),
      color_names=color_names, color_rgb=np.asarray([c['rgb'] for c in d['colors']], np.uint8),
      sizes=tuple(d['sizes']), textures=tuple(d['textures']),
      function_words=tuple(d['function_words']), heldout=frozenset(heldout),
      open_vocab=frozenset(fine_names.index(w) for w in d['open_vocab']))
  if set(c.stuff) != set(prepositions) or 'sky' not in fine_names:
    raise ValueError(f'{path}: every stuff class needs a preposition, and "sky" must exist')
  for f in set(c.things):
    if all((k, f) in c.heldout for k in range(len(color_names))):
      raise ValueError(f'{path}: every color of {fine_names[f]!r} is held out')
  return c


# ----------------------------------------------------------------------------------------------------
# Shapes: inside tests in the object frame (unit circumradius, y down)


def _polygon_inside(px, py, vx, vy):
  """Even-odd point-in-polygon; px, py [...] points, vx, vy [V] vertices. Returns bool [...]."""
  inside = np.zeros(px.shape, bool)
  j = len(vx) - 1
  for i in range(len(vx)):
    xi, yi, xj, yj = vx[i], vy[i], vx[j], vy[j]
    cond = (yi > py) != (yj > py)
    with np.errstate(divide='ignore', invalid='ignore'):
      xcross = (xj - xi) * (py - yi) / (yj - yi) + xi
    inside ^= cond & (px < xcross)
    j = i
  return inside


def _regular(n, radius=1.0, phase=-math.pi / 2):
  a = phase + 2 * math.pi * np.arange(n) / n
  return radius * np.cos(a), radius * np.sin(a)


def _star():
  a = -math.pi / 2 + math.pi * np.arange(10) / 5
  r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
  return r * np.cos(a), r * np.sin(a)


_CROSS = (np.array([-.3, .3, .3, 1, 1, .3, .3, -.3, -.3, -1, -1, -.3]) * 0.95,
          np.array([-1, -1, -.3, -.3, .3, .3, 1, 1, .3, .3, -.3, -.3]) * 0.95)
_ARROW = (np.array([-1, .15, .15, 1, .15, .15, -1]), np.array([-.25, -.25, -.62, 0, .62, .25, .25]))
_POLYGONS = {'triangle': _regular(3), 'square': _regular(4, phase=-math.pi / 4),
             'pentagon': _regular(5), 'hexagon': _regular(6), 'star': _star(), 'cross': _CROSS,
             'arrow': _ARROW}
# Rotation range (radians, symmetric) per shape: hearts and crescents stay upright-ish to stay readable.
_MAX_ROTATION = {'heart': 0.35, 'crescent': 0.6}


def shape_inside(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether points (u, v) (object frame: unit circumradius, v down) are inside shape `name`."""
  if name in _POLYGONS:
    return _polygon_inside(u, v, *_POLYGONS[name])
  rho2 = u * u + v * v
  if name == 'circle':
    return rho2 <= 0.85 ** 2
  if name == 'ellipse':
    return (u / 1.0) ** 2 + (v / 0.55) ** 2 <= 1.0
  if name == 'ring':
    return (rho2 <= 1.0) & (rho2 >= 0.55 ** 2)
  if name == 'crescent':
    return (rho2 <= 1.0) & ((u - 0.5) ** 2 + (v + 0.1) ** 2 > 0.8 ** 2)
  if name == 'heart':
    x, y = u * 1.25, -(v * 1.25 + 0.15)  # y up; the curve spans about [-1.15, 1.25]
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
  raise ValueError(f'no renderer for shape {name!r}')


def shape_mask(name: str, cy: float, cx: float, radius: float, angle: float, size: int) -> np.ndarray:
  """Bool [size, size]: pixels whose centre (y + .5, x + .5) lies inside the rotated, scaled shape."""
  y0, y1 = max(0, int(cy - radius) - 1), min(size, int(cy + radius) + 2)
  x0, x1 = max(0, int(cx - radius) - 1), min(size, int(cx + radius) + 2)
  yy, xx = _grid(size)
  dy, dx = (yy[y0:y1, x0:x1] + 0.5 - cy) / radius, (xx[y0:y1, x0:x1] + 0.5 - cx) / radius
  c, s = math.cos(angle), math.sin(angle)
  u, v = c * dx + s * dy, -s * dx + c * dy  # rotate the points by -angle = the shape by +angle
  out = np.zeros((size, size), bool)
  out[y0:y1, x0:x1] = shape_inside(name, u, v)
  return out


# ----------------------------------------------------------------------------------------------------
# Procedural "stuff" textures: float [S, S, 3] in 0..255


def _smooth_noise(rng, size, cells):
  """Bilinearly upsampled uniform noise in [0, 1] with `cells` cells per side."""
  cells = max(1, int(cells))
  g = rng.random((cells + 1, cells + 1))
  t = np.linspace(0, cells, size, endpoint=False) + cells / size / 2
  i = np.minimum(t.astype(int), cells - 1)
  f = t - i
  rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
  return rows[:, i] * (1 - f)[None] + rows[:, i + 1] * f[None]


def _stretched_noise(rng, size, along_y, stretch):
  n = rng.normal(size=(math.ceil(size / stretch) + 1, size))
  n = np.repeat(n, stretch, axis=0)[:size]
  return n if along_y else n.T


@functools.lru_cache(maxsize=8)
def _grid(s):
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
  yy.flags.writeable = False
  xx.flags.writeable = False
  return yy, xx


def _texture(name, rng, s):
  yy, xx = _grid(s)
  smooth = _smooth_noise(rng, s, 6)[..., None]
  if name == 'grass':
    blades = _stretched_noise(rng, s, True, max(2, s // 20))[..., None]
    return np.array([70, 150, 55]) + blades * [10, 24, 8] + (smooth - .5) * [20, 40, 10]
  if name == 'water':
    ph = rng.random() * 2 * math.pi
    wave = np.sin(2 * math.pi * (yy / (s / 9) + 0.15 * np.sin(2 * math.pi * xx / (s / 2) + ph)))
    streak = _stretched_noise(rng, s, False, max(2, s // 12))
    return np.array([40, 100, 180]) + ((wave * 16 + streak * 6)[..., None]) * [.6, .8, 1] + (
        smooth - .5) * [10, 20, 30]
  if name == 'sky':
    grad = (yy / s)[..., None]
    base = np.array([105, 165, 235]) * (1 - grad) + np.array([170, 205, 245]) * grad
    cloud = np.clip((_smooth_noise(rng, s, 4) - 0.55) * 4, 0, 1)[..., None]
    return base * (1 - 0.85 * cloud) + 0.85 * cloud * 245
  if name == 'sand':
    ripple = np.sin(2 * math.pi * (0.3 * xx + yy) / (s / 10) + rng.random() * 6)[..., None]
    return np.array([222, 196, 140]) + rng.normal(size=(s, s, 1)) * 10 + ripple * 7 + (smooth - .5) * 20
  if name in ('brick', 'tiles'):
    w = max(1, s // 32)  # mortar / grout width
    if name == 'brick':
      bh, bw = s / 8, s / 4
      row = (yy // bh).astype(int)
      xs = xx + (row % 2) * bw / 2
      col = (xs // bw).astype(int)
      joint = ((yy % bh) < w) | ((xs % bw) < w)
      base, joint_rgb, spread = np.array([165, 65, 45]), np.array([200, 195, 185]), 18
    else:
      t = s / 6
      row, col = (yy // t).astype(int), (xx // t).astype(int)
      joint = ((yy % t) < w) | ((xx % t) < w)
      base, joint_rgb, spread = np.array([205, 205, 210]), np.array([115, 115, 120]), 14
    per_cell = rng.normal(size=(row.max() + 1, col.max() + 1))[row, col][..., None] * spread
    img = np.where(joint[..., None], joint_rgb, base + per_cell)
    return img + rng.normal(size=(s, s, 1)) * 5
  raise ValueError(f'no texture for stuff {name!r}')


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
      rot = _MAX_ROTATION.get(name, math.pi)
      angle = rng.uniform(-rot, rot)
      m = shape_mask(name, cy, cx, r, angle, s)
      cand, cz = masks + [m], zs + [zo]
      vis = _visible(cand, cz)
      if all(v.sum() >= MIN_VISIBLE * f.sum() and v.sum() >= min_px for v, f in zip(vis, cand)):
        placed.append(dict(o, cy=cy, cx=cx, radius=r, angle=angle))
        masks.append(m)
        zs.append(zo)
        break
  order = np.argsort(zs, kind='stable')
  return [placed[i] for i in order], [masks[i] for i in order]


def _paint_object(img, mask, o, concepts, rng, s):
  """Paints one object (color, texture pattern, outline) into img float [S, S, 3] where mask."""
  rgb = concepts.color_rgb[o['color']].astype(np.float64)
  lum = rgb @ [0.299, 0.587, 0.114]
  shade = rgb * 0.5 + (110 if lum < 60 else 0)  # darker shade; lighter for black
  w = max(1, s // 64)  # outline width; the outline belongs to the object (it is inside the mask)
  y0, x0, y1, x1 = _box(mask)
  y0, x0, y1, x1 = max(0, y0 - 1), max(0, x0 - 1), min(s, y1 + 1), min(s, x1 + 1)
  m = mask[y0:y1, x0:x1]  # work in the object's window (pattern coordinates stay image-global)
  yy, xx = _grid(s)
  yy, xx = yy[y0:y1, x0:x1] + 0.5, xx[y0:y1, x0:x1] + 0.5
  tex = concepts.textures[o['texture']]
  if tex == 'striped':  # diagonal stripes, period S/16
    period = max(3.0, s / 16)
    pat = np.floor((xx + yy) / math.sqrt(2) / (period / 2) + rng.random() * 2) % 2 == 1
  elif tex == 'dotted':  # dot grid, period S/12
    q = max(4.0, s / 12)
    oy, ox = rng.random(2) * q
    pat = ((yy - oy) % q - q / 2) ** 2 + ((xx - ox) % q - q / 2) ** 2 <= (0.3 * q) ** 2
  else:
    pat = np.zeros(m.shape, bool)
  inner = m.copy()
  for _ in range(w):  # erosion with a 4-neighbourhood (outside the image counts as outside)
    e = inner.copy()
    e[0], e[-1], e[:, 0], e[:, -1] = False, False, False, False
    e[1:] &= inner[:-1]
    e[:-1] &= inner[1:]
    e[:, 1:] &= inner[:, :-1]
    e[:, :-1] &= inner[:, 1:]
    inner = e
  outline = np.array([235, 235, 235] if lum < 60 else [25, 25, 25], np.float64)
  paint = np.where((m & ~inner)[..., None], outline, np.where(pat[..., None], shade, rgb))
  win = img[y0:y1, x0:x1]
  win[m] = paint[m]


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
    img = np.where(top[..., None], _texture('sky', pix, s), _texture(concepts.fine_names[ground], pix, s))
    sem = np.where(top, sky, ground).astype(np.uint8)
    return img, sem, [ground, sky]
  stuff = int(rng.choice(concepts.stuff))
  return _texture(concepts.fine_names[stuff], pix, s), np.full((s, s), stuff, np.uint8), [stuff]


# ----------------------------------------------------------------------------------------------------
# Language


def _box(mask):
  ys, xs = np.nonzero(mask)
  return [int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1]


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
    _paint_object(img, m, o, concepts, pix, s)
    instance[m] = k + 1
    semantic[m] = o['fine']
  img = np.clip(np.rint(img + pix.normal(size=img.shape) * 3), 0, 255).astype(np.uint8)
  for k, o in enumerate(objs):
    vis = instance == k + 1
    o['box'] = _box(vis)
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
