"""Pixel-exact painting of the embedded `trace_shapes` scenes (pure NumPy).

Shapes: a pixel belongs to a shape iff its centre (y + .5, x + .5) lies inside it (no anti-aliasing),
so the masks the scene records are exact. Stuff textures are float [S, S, 3] in 0..255; objects are
painted with their colour, texture pattern and outline inside their own mask. Every random number
comes from the pixel generator the caller passes (scene.py's stream 1).
"""
from __future__ import annotations

import functools
import math

import numpy as np


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
MAX_ROTATION = {'heart': 0.35, 'crescent': 0.6}


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


def texture(name, rng, s):
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
# Objects


def mask_box(mask):
  """[y0, x0, y1, x1] (end-exclusive) of a non-empty bool mask."""
  ys, xs = np.nonzero(mask)
  return [int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1]


def paint_object(img, mask, o, concepts, rng, s):
  """Paints one object (color, texture pattern, outline) into img float [S, S, 3] where mask."""
  rgb = concepts.color_rgb[o['color']].astype(np.float64)
  lum = rgb @ [0.299, 0.587, 0.114]
  shade = rgb * 0.5 + (110 if lum < 60 else 0)  # darker shade; lighter for black
  w = max(1, s // 64)  # outline width; the outline belongs to the object (it is inside the mask)
  y0, x0, y1, x1 = mask_box(mask)
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
