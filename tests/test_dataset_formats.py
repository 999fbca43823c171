"""Dataset SPECs of the dataset commands (issue 19), each read from a tiny fixture written here in its
official layout (trace_jax/data/specs/):

* COCO instances JSON + image folder: polygons, uncompressed RLE (a crowd) and compressed RLE
  strings, decoded by our NumPy port and checked against pycocotools' ``COCO.annToMask`` (the
  reference; in the ``test`` extra);
* segment-anything amg.py ``--convert-to-rle`` outputs (one JSON per image; compressed RLE written
  by pycocotools, as their ``coco_encode_rle``): decoded masks == the masks that were encoded;
* CSV rows (``image,mask`` / ``image,text`` / ``image``);
* a built tfds dataset (the ``trace_voc`` builder on tests/fixtures_real.py's VOC fixture, read with
  ``as_data_source``): masks == ``label_map == c``, prompts == the class names;
* the commands end to end on these specs: ``invert --coco-json`` LETs == ``maskinversion.invert`` on
  the pycocotools-decoded masks (rtol 1e-5: the same program on the same inputs), ``invert
  --sam-dir`` on the same masks == the COCO run, the missing image and the empty mask are skipped
  and listed; ``explain --tfds`` == ``explain`` with the class-name prompts.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import fixtures_real as FX  # noqa: E402
from conftest import require_peer  # noqa: E402

from trace_jax.data import specs  # noqa: E402

H, W = 40, 48


def _rect(y0, y1, x0, x1, h=H, w=W):
  m = np.zeros((h, w), np.uint8)
  m[y0:y1, x0:x1] = 1
  return m


def write_coco(root):
  """images/a.jpg: two polygons (one object), a crowd as uncompressed RLE, a compressed RLE string
  and an all-zero RLE (an empty mask); images/b.png: one polygon; c.jpg listed, no file.
  Returns (instances json path, images folder)."""
  mask_api = require_peer("pycocotools.mask", "pycocotools")
  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True)
  Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "images" / "a.jpg")
  Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "images" / "b.png")
  crowd = _rect(5, 15, 30, 44)
  crowd[8:11, 2:9] = 1
  blob = _rect(20, 36, 4, 18)
  blob[25:30, 8:12] = 0  # a hole
  comp = mask_api.encode(np.asfortranarray(blob))
  anns = [
      dict(id=11, image_id=1, category_id=18, iscrowd=0, bbox=[20, 20, 20, 15], area=1.0,
           segmentation=[[20, 20, 30, 20, 30, 30, 20, 30], [32.5, 22.0, 39.5, 34.5, 33.0, 34.0]]),
      dict(id=12, image_id=1, category_id=1, iscrowd=1, bbox=[2, 5, 42, 10], area=1.0,
           segmentation={"counts": FX.column_major_runs(crowd.astype(bool)), "size": [H, W]}),
      dict(id=13, image_id=1, category_id=47, iscrowd=0, bbox=[4, 20, 14, 16], area=1.0,
           segmentation={"counts": comp["counts"].decode("ascii"), "size": [H, W]}),
      dict(id=14, image_id=1, category_id=1, iscrowd=1, bbox=[0, 0, 0, 0], area=0.0,
           segmentation={"counts": [H * W], "size": [H, W]}),         # an empty mask
      dict(id=21, image_id=2, category_id=1, iscrowd=0, bbox=[2.5, 3.5, 10, 8], area=1.0,
           segmentation=[[2.5, 3.5, 12.5, 3.5, 12.5, 11.5, 2.5, 11.5]]),
      dict(id=31, image_id=3, category_id=18, iscrowd=0, bbox=[0, 0, 5, 5], area=1.0,
           segmentation=[[0, 0, 5, 0, 5, 5, 0, 5]]),
  ]
  images = [dict(id=1, file_name="a.jpg", height=H, width=W), dict(id=2, file_name="b.png", height=H, width=W),
            dict(id=3, file_name="c.jpg", height=H, width=W)]
  path = root / "instances_val.json"
  path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns,
                              "categories": FX.COCO_CATS}))
  return str(path), str(root / "images")


def coco_reference_masks(json_path):
  """{annotation id: [H, W] uint8} by pycocotools' COCO.annToMask (the reference decoder)."""
  coco_mod = require_peer("pycocotools.coco", "pycocotools")
  import contextlib
  import io
  with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its loading steps
    c = coco_mod.COCO(json_path)
  return {a["id"]: c.annToMask(a) for a in c.dataset["annotations"]}


def write_sam(root, masks_of_image):
  """amg.py --convert-to-rle outputs: <stem>.json per image, a list of their mask records."""
  mask_api = require_peer("pycocotools.mask", "pycocotools")
  root.mkdir(parents=True)
  for stem, masks in masks_of_image.items():
    recs = []
    for m in masks:
      rle = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
      rle["counts"] = rle["counts"].decode("utf-8")  # their coco_encode_rle
      ys, xs = np.nonzero(m)
      recs.append({"segmentation": rle, "area": int(m.sum()),
                   "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                   "predicted_iou": 0.9, "point_coords": [[float(xs.mean()), float(ys.mean())]],
                   "stability_score": 0.95, "crop_box": [0, 0, m.shape[1], m.shape[0]]})
    (root / f"{stem}.json").write_text(json.dumps(recs))
  return str(root)


# ----------------------------------------------------------------------------- readers

def test_coco_reader_matches_pycocotools(tmp_path):
  path, images = write_coco(tmp_path)
  items = specs.from_coco(path, images)
  ref = coco_reference_masks(path)
  assert [it.id for it in items] == ["a.jpg", "b.png", "c.jpg"]
  assert [r.id for r in items[0].mask_refs()] == ["11", "12", "13", "14"]
  assert items[0].prompts() == ("dog", "person", "cup")  # category names, first appearance, once
  kinds = 0
  for it in items:
    for r in it.mask_refs():
      got = r.load()
      assert got.dtype == np.float32 and got.shape == (H, W)
      np.testing.assert_array_equal(got, ref[int(r.id)].astype(np.float32), err_msg=r.id)
      kinds += int(got.sum() > 0)
  assert kinds == 5 and items[0].mask_refs()[3].load().sum() == 0  # the all-zero RLE
  assert items[0].image_file() == os.path.join(images, "a.jpg")
  # a malformed segmentation fails its own mask when loaded, naming the file and the field
  js = json.loads(open(path).read())
  js["annotations"][0]["segmentation"] = {"counts": "!!", "size": [H, W]}
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(js))
  r = specs.from_coco(str(bad), images)[0].mask_refs()[0]
  with pytest.raises(ValueError, match=r"bad\.json: field 'annotations\[0\]\.segmentation'"):
    r.load()
  js["annotations"][0]["category_id"] = 999
  bad.write_text(json.dumps(js))
  with pytest.raises(ValueError, match=r"annotations\[0\]\.category_id.*999 is not in categories"):
    specs.from_coco(str(bad), images)


def test_sam_reader_decodes_their_rle(tmp_path):
  rng = np.random.default_rng(1)
  masks = {"a": [rng.random((H, W)) > 0.6, _rect(3, 30, 10, 20).astype(bool)], "zz": [_rect(0, 5, 0, 5).astype(bool)]}
  d = write_sam(tmp_path / "sam", masks)
  (tmp_path / "imgs").mkdir()
  Image.new("RGB", (W, H)).save(tmp_path / "imgs" / "a.png")
  items = specs.from_sam(d, str(tmp_path / "imgs"))
  assert [it.id for it in items] == ["a.png", "zz"]  # zz.json has no image: listed, unreadable later
  assert not os.path.exists(items[1].image)
  for it, stem in zip(items, ("a", "zz")):
    refs = it.mask_refs()
    assert [r.id for r in refs] == [str(k) for k in range(len(masks[stem]))]
    for r, m in zip(refs, masks[stem]):
      np.testing.assert_array_equal(r.load(), m.astype(np.float32))
  (tmp_path / "sam" / "a.json").write_text('{"not": "a list"}')
  with pytest.raises(ValueError, match=r"a\.json: field '<root>': expected a list of masks"):
    specs.from_sam(d, str(tmp_path / "imgs"))[0].mask_refs()


def test_csv_and_folder_readers(tmp_path):
  (tmp_path / "im").mkdir()
  for n in ("x.png", "y.jpg", "notes.txt"):
    (tmp_path / "im" / n).write_bytes(b"")
  np.save(tmp_path / "m.npy", np.ones((2, 4, 4), np.float32))
  (tmp_path / "inv.csv").write_text("image,mask\nim/x.png,m.npy\nim/y.jpg,m.npy\nim/x.png,m2.png\n")
  items = specs.from_csv(str(tmp_path / "inv.csv"), "mask")
  assert [(it.id, [r.id for r in it.mask_refs()]) for it in items] == [("im/x.png", ["m.npy", "m2.png"]),
                                                                       ("im/y.jpg", ["m.npy"])]
  assert items[0].mask_refs()[0].load().shape == (2, 4, 4)
  with pytest.raises(ValueError, match="cannot read mask .*m2.png"):
    items[0].mask_refs()[1].load()
  (tmp_path / "ex.csv").write_text("im/x.png,a cat, on a mat\nim/x.png,a dog\n")  # no header; commas in text
  assert [(it.id, it.prompts()) for it in specs.from_csv(str(tmp_path / "ex.csv"), "text")] == \
      [("im/x.png", ("a cat, on a mat", "a dog"))]
  (tmp_path / "em.csv").write_text("image\nim/y.jpg\n")
  assert [it.image for it in specs.from_csv(str(tmp_path / "em.csv"), None)] == [str(tmp_path / "im" / "y.jpg")]
  assert [(it.id, it.prompts()) for it in specs.from_folder(str(tmp_path / "im"), ["t"])] == \
      [("x.png", ("t",)), ("y.jpg", ("t",))]
  (tmp_path / "short.csv").write_text("image,mask\nim/x.png\n")
  with pytest.raises(ValueError, match=r"short\.csv:2: expected 2 column"):
    specs.from_csv(str(tmp_path / "short.csv"), "mask")


@pytest.fixture(scope="module")
def voc_built(tmp_path_factory):
  from trace_jax.data.real import voc
  root = tmp_path_factory.mktemp("voc")
  truth = FX.write_voc(str(root / "m"))
  voc.prepare(str(root / "m"), str(root / "d"))
  return truth, str(root / "d")


def test_tfds_reader_voc(voc_built):
  from trace_jax.data.real.voc import VOC_CLASSES
  truth, data_dir = voc_built
  items = specs.from_tfds("voc2012:train", data_dir)  # alias of trace_voc/voc2012
  assert [it.id for it in items] == ["train[0]", "train[1]"]
  for it, iid in zip(items, truth["ids"]["train"]):
    lab = truth["labels"][iid]
    present = sorted(set(np.unique(lab).tolist()) - {0, 255})
    refs = it.mask_refs()
    assert [r.id for r in refs] == [str(c) for c in present]
    for r, c in zip(refs, present):
      np.testing.assert_array_equal(r.load(), (lab == c).astype(np.float32))
    assert it.prompts() == tuple(VOC_CLASSES[c] for c in present)
    pix = np.asarray(Image.open(it.image_file()))
    assert pix.shape == lab.shape + (3,)
  assert len(specs.from_tfds("trace_voc/voc2012:val", data_dir)) == 1  # the missing image was skipped
  with pytest.raises(ValueError, match="no split 'test'"):
    specs.from_tfds("voc2012:test", data_dir)
  with pytest.raises(ValueError, match="expects NAME:SPLIT"):
    specs.from_tfds("voc2012", data_dir)
  with pytest.raises(ValueError, match="not built"):
    specs.from_tfds("context59:val", data_dir)


# ----------------------------------------------------------------------------- the commands

WORDS = ["a", "photo", "of", "dog", "person", "cup", "aeroplane", "bicycle", "bird", "boat", "bottle"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """The tiny ViT (32 px, patch 8) with a word tokenizer, saved as a model dir."""
  from conftest import save_word_model
  return save_word_model(tmp_path_factory.mktemp("model"), WORDS, seed=1, name="m")


@pytest.mark.slow
def test_invert_coco_and_sam_specs_end_to_end(tmp_path, model_dir, capsys):
  """`invert --coco-json F --images DIR` == the API on pycocotools' masks; `invert --sam-dir` on the
  same masks (as amg.py writes them) == the COCO run; failures skipped and listed."""
  from trace_jax import model_dir as md_mod
  from trace_jax.cli import common, main
  from trace_jax.inference import dataset as ds
  from trace_jax.inversion import maskinversion as mi
  path, images = write_coco(tmp_path / "coco")
  ref_masks = coco_reference_masks(path)
  base = ["invert", "--checkpoint", model_dir, "--mode", "exact", "--steps", "2", "--lr", "0.5",
          "--no-progress", "--devices", "1", "--shard-size", "2"]
  assert main(base + ["--coco-json", path, "--images", images, "--out", str(tmp_path / "o1")]) == 0
  sh = ds.read_shards(str(tmp_path / "o1"), "lets")
  assert [list(s["ids"]) for s in sh] == [["a.jpg", "b.png"], ["c.jpg"]]
  assert list(sh[0]["mask_ids"]) == ["11", "12", "13", "21"] and list(sh[0]["mask_image"]) == [0, 0, 0, 1]
  assert list(sh[0]["failed_ids"]) == ["a.jpg::14"] and "empty" in sh[0]["failed_reasons"][0]
  assert list(sh[1]["failed_ids"]) == ["c.jpg"] and "c.jpg" in sh[1]["failed_reasons"][0]
  m = md_mod.load(model_dir)
  img = common.load_images([os.path.join(images, "a.jpg")], 32, "squash")[0]
  want = mi.invert(m.model, m.params, img, np.stack([ref_masks[i] for i in (11, 12, 13)]).astype(np.float32),
                   mode="exact", steps=2, lr=0.5)
  np.testing.assert_allclose(sh[0]["lets"][:3], np.asarray(want["lets"]), rtol=1e-5,
                             atol=1e-5 * np.abs(want["lets"]).max())
  # the same masks of a.jpg as segment-anything writes them
  sam = write_sam(tmp_path / "sam", {"a": [ref_masks[i] for i in (11, 12, 13)]})
  assert main(base + ["--sam-dir", sam, "--images", images, "--out", str(tmp_path / "o2")]) == 0
  (s2,) = ds.read_shards(str(tmp_path / "o2"), "lets")
  assert list(s2["ids"]) == ["a.jpg"] and list(s2["mask_ids"]) == ["0", "1", "2"]
  np.testing.assert_array_equal(s2["lets"], sh[0]["lets"][:3])
  # --coco-json without --images is refused, naming the flag
  assert main(base + ["--coco-json", path, "--out", str(tmp_path / "o3")]) == 2
  assert "--coco-json needs --images DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_explain_and_embed_tfds_spec_end_to_end(tmp_path, model_dir, voc_built):
  """`explain --tfds voc2012:train` (prompts: the class names present) == explain on the decoded
  image; `embed --tfds` == embed."""
  from trace_jax import model_dir as md_mod
  from trace_jax.attribution.api import explain
  from trace_jax.cli import main
  from trace_jax.data.preprocess import load_images
  from trace_jax.data.real.voc import VOC_CLASSES
  from trace_jax.inference import dataset as ds
  from trace_jax.inference.embed import embed
  truth, data_dir = voc_built
  common = ["--checkpoint", model_dir, "--tfds", "voc2012:train", "--tfds-data-dir", data_dir, "--no-progress"]
  assert main(["explain", *common, "--method", "legrad", "--out", str(tmp_path / "ex")]) == 0
  (sh,) = ds.read_shards(str(tmp_path / "ex"), "maps")
  items = specs.from_tfds("voc2012:train", data_dir)
  m = md_mod.load(model_dir)
  for j, it in enumerate(items):
    lab = truth["labels"][truth["ids"]["train"][j]]
    names = [VOC_CLASSES[c] for c in sorted(set(np.unique(lab).tolist()) - {0, 255})]
    assert list(sh["texts"][sh["pair_image"] == j]) == names
    x = load_images([it.image_file()], 32, "squash")
    ids = np.asarray(m.tokenizer(names, m.config.text.context_length), np.int32)
    ref = explain("legrad", m.model, m.params, x, ids)
    np.testing.assert_allclose(sh["map"][sh["pair_image"] == j], np.asarray(ref["map"]), atol=2e-4)
  assert main(["embed", *common, "--out", str(tmp_path / "em")]) == 0
  (sh,) = ds.read_shards(str(tmp_path / "em"), "embeds")
  x = load_images([it.image_file() for it in items], 32, "crop")
  np.testing.assert_allclose(sh["image_embeds"], embed(m.config, m.params, x)["image_embeds"], atol=1e-5)
