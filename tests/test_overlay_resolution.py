"""Overlays at the image's own resolution and aspect, captions wrapped not cut (issue 23).

``trace-jax explain --image photo.jpg`` on a 512x384 photo: the overlay (and each panel of the contact
sheet) is 512x384, equal to an independent float64 NumPy reference (tests/_overlay_reference.py:
bilinear resample of the map onto the photo, half-pixel centres as cv2.resize / grad-cam's
scale_cam_image, then the 'jet' blend), and the caption under each panel is the whole text, wrapped
over several lines.
"""
from __future__ import annotations

import numpy as np
import pytest

from _overlay_reference import assert_overlay_close, bilinear64, reference_overlay
from conftest import save_tiny_word_model
from trace_jax.cli import main

LONG = ("the small red circle on the left of the big blue square under the bright sky next to the green "
        "triangle on the grass by the water")


def ink_bands(strip: np.ndarray) -> list[tuple[int, int]]:
  """Row ranges [r0, r1) of a white strip that hold ink (text lines), top to bottom."""
  ink = (strip < 200).any(axis=(1, 2)).astype(np.int8)
  edges = np.flatnonzero(np.diff(np.concatenate([[0], ink, [0]])))
  return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from PIL import Image
  root = tmp_path_factory.mktemp("overlay_res")
  d = save_tiny_word_model(root)
  # a 512x384 "photo": smooth colours plus a red disc and a blue square, saved as JPEG
  yy, xx = np.mgrid[0:384, 0:512]
  img = np.stack([xx / 2, yy / 1.5, 255 - xx / 2], -1)
  img[(yy - 200) ** 2 + (xx - 130) ** 2 < 70 ** 2] = [230, 30, 30]
  img[100:250, 300:450] = [30, 40, 220]
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "photo.jpg", quality=95)
  return root, d


@pytest.mark.slow
def test_explain_overlay_at_photo_resolution(setup):
  from PIL import Image
  root, d = setup
  out, npz = root / "one.png", root / "one.npz"
  assert main(["explain", "--checkpoint", d, "--image", str(root / "photo.jpg"), "--text", LONG,
               "--method", "legrad", "--out", str(out), "--out-npz", str(npz)]) == 0
  pic = np.asarray(Image.open(out).convert("RGB"))
  assert pic.shape == (384, 512, 3)  # not the model's 32x32
  photo = np.asarray(Image.open(root / "photo.jpg").convert("RGB"))
  z = np.load(npz)
  assert z["map"].shape == (1, 32, 32)
  ref = reference_overlay(photo, z["map"][0])
  assert_overlay_close(pic, ref)
  # and it is not the squashed / model-size picture blown up: the photo's edges survive in it
  assert np.abs(pic.astype(float) - photo).mean() > 5


@pytest.mark.slow
def test_explain_contact_sheet_panels_and_full_captions(setup):
  from PIL import Image
  from trace_jax.utils import overlay as ov
  root, d = setup
  out, npz = root / "two.png", root / "two.npz"
  texts = [LONG, "a blue square"]
  assert main(["explain", "--checkpoint", d, "--image", str(root / "photo.jpg"), "--text", texts[0],
               "--text", texts[1], "--method", "legrad", "--out", str(out), "--out-npz", str(npz)]) == 0
  sheet = np.asarray(Image.open(out).convert("RGB"))
  z = np.load(npz)
  photo = np.asarray(Image.open(root / "photo.jpg").convert("RGB"))
  gap = 4
  for p in range(2):  # panel p at (gap, gap + p * (512 + gap)): the photo's size, the reference overlay
    x = gap + p * (512 + gap)
    assert_overlay_close(sheet[gap:gap + 384, x:x + 512], reference_overlay(photo, z["map"][p]))
  # the captions: "<text> (<score>)", whole, wrapped to the panel width
  font = ov._font(12)
  for p, text in enumerate(texts):
    label = f"{text} ({z['score'][p]:.3f})"
    lines = ov.wrap_text(label, 512 - 4, font)
    assert " ".join(lines) == label  # nothing dropped
    x = gap + p * (512 + gap)
    strip = sheet[gap + 384:, x:x + 512]
    bands = ink_bands(strip)
    assert len(bands) == len(lines), (bands, lines)
  # the long caption needs more than one line at 512 px in the 12 px font: wrapped, not cut
  long_lines = ov.wrap_text(f"{LONG} ({z['score'][0]:.3f})", 508, font)
  assert len(long_lines) >= 2 and long_lines[-1].endswith(f"({z['score'][0]:.3f})"), long_lines
  narrow = ov.caption_below(np.zeros((20, 60, 3), np.uint8), LONG)
  assert len(ink_bands(narrow[20:])) == len(ov.wrap_text(LONG, 56, font)) >= 5


def test_wrap_text_never_drops_and_fits():
  from PIL import Image, ImageDraw
  from trace_jax.utils import overlay as ov
  font = ov._font(12)
  draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  for width in (20, 60, 200):
    text = LONG + " supercalifragilisticexpialidocious"
    lines = ov.wrap_text(text, width, font)
    assert all(draw.textlength(ln, font=font) <= width or len(ln) == 1 for ln in lines), lines
    # joined back: at spaces, or inside a word broken because the word alone is wider than the line
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
  assert ov.wrap_text("short", 200, font) == ["short"]


def test_map_to_image_squash_and_crop():
  from trace_jax.utils import overlay as ov
  heat = np.random.default_rng(0).random((48, 48)).astype(np.float32)
  sq = ov.map_to_image(heat, (384, 512), "squash")
  np.testing.assert_allclose(sq, bilinear64(heat, 384, 512), atol=1e-5)
  # crop at 48 px: CLIP's resize-shorter-side (512x384 -> 64x48) + centre crop (columns 8..56) saw
  # columns 64..448 of the 512x384 image
  cr = ov.map_to_image(heat, (384, 512), "crop")
  assert np.isnan(cr[:, :64]).all() and np.isnan(cr[:, 448:]).all() and np.isfinite(cr[:, 64:448]).all()
  np.testing.assert_allclose(cr[:, 64:448], bilinear64(heat, 384, 384), atol=1e-5)
  img = np.full((384, 512, 3), 100, np.uint8)
  o = ov.overlay(img, cr)
  assert (o[:, :64] == 100).all() and (o[:, 64:448] != 100).any()  # outside the crop: the image as is
  with pytest.raises(ValueError, match="unknown resize mode"):
    ov.map_to_image(heat, (10, 10), "stretch")
