"""Pictures of attribution maps: heatmap overlays, contact sheets, text tokens coloured by attribution.

All functions take / return NumPy uint8 RGB arrays [H, W, 3] (or PIL images where stated) so they
can be used without JAX. Colours come from a matplotlib colormap ('jet' as grad-cam's
``show_cam_on_image`` and LeGrad's visualisation).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from trace_jax.data.preprocess import MEAN, STD, crop_geometry


def denormalize(pixels: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
  """Normalised float [.., H, W, 3] (CLIP mean/std) -> uint8 RGB."""
  x = np.asarray(pixels, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def colorize(heat: np.ndarray, cmap: str = "jet") -> np.ndarray:
  """[H, W] values in [0, 1] -> uint8 RGB [H, W, 3] through a matplotlib colormap (NaN -> 0)."""
  import matplotlib
  heat = np.nan_to_num(np.asarray(heat, np.float32), nan=0.0)
  rgba = matplotlib.colormaps[cmap](np.clip(heat, 0.0, 1.0))
  return np.round(rgba[..., :3] * 255).astype(np.uint8)


def resize_map(heat: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a float map to (H, W) with PIL (for maps of another size than the image)."""
  from PIL import Image
  heat = np.asarray(heat, np.float32)
  if heat.shape == tuple(hw):
    return heat
  return np.asarray(Image.fromarray(heat, mode="F").resize((hw[1], hw[0]), Image.BILINEAR), np.float32)


def map_to_image(heat: np.ndarray, image_hw: tuple[int, int], resize: str = "squash") -> np.ndarray:
  """A map over the model's input [h, w] -> float32 [H, W] over the ORIGINAL image the input came from.

  As grad-cam's ``show_cam_on_image`` is used (the CAM resized to the image it is drawn on, then
  blended; pytorch_grad_cam/utils/image.py), the map is resampled, not the image: the overlay keeps the
  image's own resolution and aspect. ``resize`` is how the input was made from the image
  (trace_jax/data/preprocess.py ``resize_image``): 'squash' stretched the whole image, so the map is
  stretched back over it; 'crop' saw only the centre square, so the map covers that square and the
  pixels the model never saw are NaN (left uncoloured by :func:`overlay`).
  """
  heat = np.asarray(heat, np.float32)
  H, W = int(image_hw[0]), int(image_hw[1])
  if heat.ndim != 2:
    raise ValueError(f"map must be [h, w]; got shape {heat.shape}")
  if resize == "squash":
    return resize_map(heat, (H, W))
  if resize != "crop":
    raise ValueError(f"unknown resize mode {resize!r}; expected 'squash' or 'crop'")
  # preprocess.resize_image('crop') saw the square ``box`` of the image resized to (nw, nh)
  (nw, nh), (left, top, right, bottom) = crop_geometry(H, W, heat.shape[0])
  x0, x1 = int(round(left * W / nw)), int(round(right * W / nw))
  y0, y1 = int(round(top * H / nh)), int(round(bottom * H / nh))
  out = np.full((H, W), np.nan, np.float32)
  out[y0:y1, x0:x1] = resize_map(heat, (y1 - y0, x1 - x0))
  return out


def overlay(image_rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
  """Blend ``(1 - alpha) * image + alpha * colormap(heat)``; heat [h, w] in [0, 1] (resized to the image).

  NaN pixels of ``heat`` (outside what the model saw, :func:`map_to_image`) keep the image unblended.
  """
  image_rgb = np.asarray(image_rgb)
  if image_rgb.ndim != 3 or image_rgb.shape[-1] != 3:
    raise ValueError(f"image must be RGB [H, W, 3]; got shape {image_rgb.shape}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
  heat = resize_map(heat, image_rgb.shape[:2])
  out = (1 - alpha) * image_rgb.astype(np.float32) + alpha * colorize(heat, cmap).astype(np.float32)
  out = np.where(np.isfinite(heat)[..., None], out, image_rgb.astype(np.float32))
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _font(size: int):
  from PIL import ImageFont
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1
    return ImageFont.load_default()


def wrap_text(text: str, width: int, font) -> list[str]:
  """``text`` broken into lines no wider than ``width`` pixels in ``font``: at spaces, and inside a word
  only when the word alone is wider than the line. Nothing is dropped: joining the lines (with the
  spaces they were broken at) gives the text back."""
  from PIL import Image, ImageDraw
  draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  fits = lambda t: draw.textlength(t, font=font) <= width
  lines: list[str] = []
  for para in str(text).split("\n"):
    line = ""
    for word in para.split(" "):
      cand = f"{line} {word}" if line else word
      if fits(cand):
        line = cand
        continue
      if line:
        lines.append(line)
      while word and not fits(word):  # a word wider than the line: break it where it overflows
        k = max(1, max(i for i in range(1, len(word) + 1) if i == 1 or fits(word[:i])))
        lines.append(word[:k])
        word = word[k:]
      line = word
    lines.append(line)
  return lines


def caption_below(image_rgb: np.ndarray, caption: str, height: int = 18) -> np.ndarray:
  """Append a white strip with ``caption`` under the image, wrapped to the image width (never cut):
  ``height`` pixels for one line, ``height - 2`` more per extra line."""
  from PIL import Image, ImageDraw
  h, w, _ = image_rgb.shape
  font = _font(max(8, height - 6))
  lines = wrap_text(caption, max(w - 4, 1), font)
  line_h = max(height - 2, 1)
  canvas = Image.new("RGB", (w, h + height + (len(lines) - 1) * line_h), "white")
  canvas.paste(Image.fromarray(np.asarray(image_rgb, np.uint8)), (0, 0))
  draw = ImageDraw.Draw(canvas)
  for i, ln in enumerate(lines):
    draw.text((2, h + 2 + i * line_h), ln, fill="black", font=font)
  return np.asarray(canvas)


def text_tokens_image(tokens: Sequence[str], scores: Sequence[float], width: int = 480, font_size: int = 16,
                      cmap: str = "Reds") -> np.ndarray:
  """Tokens laid out left to right (wrapping), each on a background coloured by its score in [0, 1]."""
  from PIL import Image, ImageDraw
  if len(tokens) != len(scores):
    raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
  font = _font(font_size)
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  pad, line_h = 4, font_size + 8
  x, y, boxes = pad, pad, []
  for tok in tokens:
    l, t, r, b = probe.textbbox((0, 0), tok, font=font)
    tw = r - l + 6
    if x + tw > width - pad and x > pad:
      x, y = pad, y + line_h
    boxes.append((x, y, tw))
    x += tw + 4
  img = Image.new("RGB", (width, y + line_h + pad), "white")
  draw = ImageDraw.Draw(img)
  colors = colorize(np.asarray(scores, np.float32)[None], cmap)[0] if len(tokens) else []
  for tok, (bx, by, tw), c, s in zip(tokens, boxes, colors, scores):
    draw.rectangle((bx, by, bx + tw, by + line_h - 4), fill=tuple(int(v) for v in c))
    draw.text((bx + 3, by + 2), tok, fill="white" if s > 0.6 else "black", font=font)
  return np.asarray(img)


def stack_vertical(parts: Sequence[np.ndarray]) -> np.ndarray:
  """Stack RGB images vertically (left-aligned, white padding to the widest)."""
  w = max(p.shape[1] for p in parts)
  padded = [np.pad(p, ((0, 0), (0, w - p.shape[1]), (0, 0)), constant_values=255) for p in parts]
  return np.concatenate(padded, axis=0)


def contact_sheet(tiles: Sequence[np.ndarray], captions: Sequence[str] | None = None, cols: int = 4,
                  tile_size: int | None = None, gap: int = 4) -> np.ndarray:
  """Grid of RGB tiles with optional captions (wrapped to the tile width, never cut). ``tile_size``:
  shrink / enlarge each tile to fit a ``tile_size`` square, keeping its aspect."""
  from PIL import Image
  if not tiles:
    raise ValueError("contact_sheet needs at least one tile")
  if captions is not None and len(captions) != len(tiles):
    raise ValueError(f"{len(tiles)} tiles but {len(captions)} captions")
  prepared = []
  for i, t in enumerate(tiles):
    t = np.asarray(t, np.uint8)
    if tile_size:
      scale = tile_size / max(t.shape[:2])
      size = (max(1, round(t.shape[1] * scale)), max(1, round(t.shape[0] * scale)))
      t = np.asarray(Image.fromarray(t).resize(size, Image.BILINEAR))
    if captions is not None:
      t = caption_below(t, captions[i])
    prepared.append(t)
  th = max(t.shape[0] for t in prepared)
  tw = max(t.shape[1] for t in prepared)
  cols = max(1, min(cols, len(prepared)))
  rows = -(-len(prepared) // cols)
  sheet = np.full((rows * th + (rows + 1) * gap, cols * tw + (cols + 1) * gap, 3), 255, np.uint8)
  for i, t in enumerate(prepared):
    r, c = divmod(i, cols)
    y, x = gap + r * (th + gap), gap + c * (tw + gap)
    sheet[y:y + t.shape[0], x:x + t.shape[1]] = t
  return sheet


def save_png(image_rgb: np.ndarray, path: str) -> str:
  from PIL import Image
  import os
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(np.asarray(image_rgb, np.uint8)).save(path)
  return path
