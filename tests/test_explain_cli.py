"""End-to-end `trace-jax explain` on a tiny saved model with a word-level tokenizer."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from trace_jax.cli import main

WORDS = ["a", "red", "cube", "blue", "ball", "on", "the", "left"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  from conftest import save_word_model
  root = tmp_path_factory.mktemp("explain")
  d = save_word_model(root, WORDS)
  from PIL import Image
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"img{i}.png")
  return root, d


def test_explain_single_image_png_and_npz(model_dir):
  root, d = model_dir
  out, npz = root / "one.png", root / "one.npz"
  rc = main(["explain", "--checkpoint", d, "--image", str(root / "img0.png"), "--text", "a red cube",
             "--method", "gradcam", "--out", str(out), "--out-npz", str(npz)])
  assert rc == 0
  from PIL import Image
  im = np.asarray(Image.open(out))
  assert im.shape == (40, 48, 3) and im.dtype == np.uint8  # the 40x48 file's own size (issue 23)
  z = np.load(npz)
  assert z["grid"].shape == (1, 4, 4) and z["map"].shape == (1, 32, 32) and z["score"].shape == (1,)
  assert 0 <= z["map"].min() and z["map"].max() <= 1 and np.isfinite(z["map"]).all()
  assert str(z["method"]) == "gradcam" and list(z["texts"]) == ["a red cube"]
  # the saved maps are the API's maps for the same inputs
  from trace_jax.attribution import explain
  from trace_jax.model_dir import load_model
  from trace_jax.data.preprocess import load_images
  from trace_jax.models import build
  from trace_jax.tokenizers import load_tokenizer
  cfg, params = load_model(d)
  x = load_images([str(root / "img0.png")], 32, "squash")
  ref = explain("gradcam", build(cfg), params, x, load_tokenizer(d)(["a red cube"]))
  np.testing.assert_allclose(z["map"], np.asarray(ref["map"]), atol=1e-6)
  np.testing.assert_allclose(z["score"], np.asarray(ref["score"]), atol=1e-6)


def test_explain_pixels_token_ids_several_prompts(model_dir):
  root, d = model_dir
  x = np.random.default_rng(1).normal(size=(32, 32, 3)).astype(np.float32)
  ids = np.zeros((2, 16), np.int32)
  ids[0, :4] = [10, 2, 3, 11]
  ids[1, :3] = [10, 5, 11]
  np.save(root / "x.npy", x)
  np.save(root / "t.npy", ids)
  out, npz = root / "many.png", root / "many.npz"
  rc = main(["explain", "--checkpoint", d, "--pixels", str(root / "x.npy"), "--token-ids", str(root / "t.npy"),
             "--method", "rollout", "--set", "text=true", "--out", str(out), "--out-npz", str(npz)])
  assert rc == 0 and out.exists()
  z = np.load(npz)
  assert z["map"].shape == (2, 32, 32) and z["text"].shape == (2, 16) and z["raw"].shape == (2, 4, 4)
  # rollout is text-independent on the image side: both prompts give the same image map
  np.testing.assert_allclose(z["map"][0], z["map"][1], atol=1e-6)


def test_explain_csv_batch_writes_overlays_and_sheet(model_dir):
  root, d = model_dir
  csv = root / "pairs.csv"
  csv.write_text("image,text\nimg0.png,a red cube\nimg1.png,a blue ball\nimg2.png,the cube on the left\n")
  out_dir = root / "batch"
  rc = main(["explain", "--checkpoint", d, "--csv", str(csv), "--method", "gradcam", "--out-dir", str(out_dir),
             "--batch-size", "2"])
  assert rc == 0
  pngs = sorted(p for p in os.listdir(out_dir) if p.endswith(".png") and p[0].isdigit())
  assert pngs == ["0000_img0.png", "0001_img1.png", "0002_img2.png"]
  assert (out_dir / "contact_sheet.png").exists()
  z = np.load(out_dir / "maps.npz")
  assert z["map"].shape == (3, 32, 32) and list(z["texts"]) == ["a red cube", "a blue ball", "the cube on the left"]


def test_explain_folder_mode(model_dir):
  root, d = model_dir
  folder = root / "imgs"
  folder.mkdir(exist_ok=True)
  for i in range(2):
    (folder / f"im{i}.png").write_bytes((root / f"img{i}.png").read_bytes())
  sheet = root / "sheet.png"
  rc = main(["explain", "--checkpoint", d, "--folder", str(folder), "--text", "a cube", "--text", "a ball",
             "--method", "gradcam", "--out", str(sheet)])
  assert rc == 0 and sheet.exists()
  z = np.load(root / "sheet_pairs" / "maps.npz")
  assert z["map"].shape == (4, 32, 32)


def test_explain_cli_errors(model_dir, capsys):
  root, d = model_dir
  assert main(["explain", "--checkpoint", d, "--image", str(root / "img0.png"), "--method", "gradcam",
               "--out", str(root / "e.png")]) == 2
  assert "give --text or --token-ids" in capsys.readouterr().err


def _token_boxes(strip: np.ndarray) -> list[tuple[int, int, int, int]]:
  """(x0, x1, y0, y1) of the coloured token boxes of a text strip, left to right: runs of non-white
  pixels along the boxes' top row (above the glyphs), each box as tall as its colour runs down x0."""
  rows = np.flatnonzero((strip != 255).any(axis=(1, 2)))
  assert rows.size, "the text strip is blank"
  y0 = int(rows[0])
  ink = (strip[y0] != 255).any(-1)
  edges = np.flatnonzero(np.diff(np.concatenate([[0], ink.astype(np.int8), [0]])))
  boxes = []
  for x0, x1 in zip(edges[::2], edges[1::2]):
    col = (strip[y0:, x0] == strip[y0, x0]).all(-1)
    boxes.append((int(x0), int(x1), y0, y0 + int(np.argmin(col)) if not col.all() else strip.shape[0]))
  return boxes


@pytest.mark.slow
def test_explain_m2ib_colours_text_tokens(model_dir):
  """M2IB: under the overlay (at the image file's 40x48), one box per word of the text, left to right in the text's order,
  each coloured by the word's attribution from the npz (min-max over the words, the 'Reds' colormap:
  darker = higher) and carrying its glyphs (black ink, white above 0.6).

  Fails on these broken variants (checked by editing trace_jax/utils/overlay.py
  ``text_tokens_image``): colours assigned in reverse order; colours from ``1 - score``; one colour
  for every token; the token text not drawn.
  """
  import matplotlib
  root, d = model_dir
  out, npz = root / "m2ib.png", root / "m2ib.npz"
  text = "a red cube"
  rc = main(["explain", "--checkpoint", d, "--image", str(root / "img0.png"), "--text", text,
             "--method", "m2ib", "--set", "layer=0", "--set", "steps=2", "--set", "samples=2",
             "--out", str(out), "--out-npz", str(npz)])
  assert rc == 0
  from PIL import Image
  im = np.asarray(Image.open(out).convert("RGB"))
  z = np.load(npz)
  assert z["map"].shape == (1, 32, 32) and z["text"].ndim == 2 and np.isfinite(z["text"]).all()
  assert im.shape[0] > 40 and im.shape[1] >= 48  # the 40x48 overlay + token strip below it
  # the words' attributions: valid positions are start, the words, end
  pos = np.flatnonzero(z["text_valid"][0])[1:-1]
  words = text.split()
  assert len(pos) == len(words)
  s = z["text"][0][pos].astype(np.float64)
  assert s.max() - s.min() > 0.1, s  # distinct enough for the colours to tell them apart
  s = (s - s.min()) / (s.max() - s.min())
  boxes = _token_boxes(im[40:])
  assert len(boxes) == len(words), boxes
  widths = [x1 - x0 for x0, x1, _, _ in boxes]
  assert widths == sorted(widths) and len(set(widths)) == 3, widths  # 'a' < 'red' < 'cube'
  want = np.round(matplotlib.colormaps["Reds"](s)[:, :3] * 255)
  strip = im[40:].astype(np.int32)
  colours = np.asarray([strip[y0, x0] for x0, _, y0, _ in boxes])
  np.testing.assert_allclose(colours, want, atol=1)
  # darker box = higher attribution, in the text's order
  darkness = -colours.sum(-1)
  assert list(np.argsort(darkness)) == list(np.argsort(s)), (darkness, s)
  for (x0, x1, y0, y1), c, v in zip(boxes, colours, s):
    box = strip[y0:y1, x0:x1]
    glyph = np.abs(box - c).sum(-1) > 150
    assert glyph.sum() >= 5, "no text drawn in a token box"
    lum = box[glyph].sum(-1)
    assert (lum.max() > c.sum()) if v > 0.6 else (lum.min() < c.sum()), "ink colour"


def test_overlay_helpers():
  from trace_jax.utils import overlay as ov
  img = np.zeros((20, 30, 3), np.uint8)
  heat = np.linspace(0, 1, 6 * 5).reshape(5, 6)
  o = ov.overlay(img, heat, alpha=1.0)
  assert o.shape == (20, 30, 3)
  np.testing.assert_array_equal(o[0, 0], ov.colorize(np.zeros((1, 1)))[0, 0])  # 0 -> colormap's low end
  sheet = ov.contact_sheet([o, o, o], ["a", "b", "c"], cols=2, gap=4)
  assert sheet.shape[1] == 2 * 30 + 3 * 4 and sheet.shape[0] > 2 * 20
  strip = ov.text_tokens_image(["a", "red", "cube"], [0.0, 1.0, 0.5], width=200)
  assert strip.shape[1] == 200 and strip.dtype == np.uint8
  with pytest.raises(ValueError, match="3 tokens but 2 scores"):
    ov.text_tokens_image(["a", "b", "c"], [0.1, 0.2])
  px = (np.asarray([255, 0, 128], np.float32) / 255 - ov.MEAN) / ov.STD
  np.testing.assert_array_equal(ov.denormalize(px), [255, 0, 128])
