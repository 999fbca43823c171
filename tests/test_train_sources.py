"""Real training sources through Grain (trace_jax/data/train_sources.py, grain_pipeline.py), on tiny
files in the official formats written here: an open_clip CSV, two WebDataset shards, and the
VG / Flickr30k Entities / RefCOCO / COCO fixtures of tests/fixtures_real.py.

References: open_clip 2.23.0's own ``image_transform`` (eval) and torchvision's ``resized_crop``
(train crop) on the same PIL images; the CLIP BPE tokenizer called directly; masks from the fixture
boxes by AMC's int() slices then torchvision's NEAREST resize / crop.
"""
import io
import os
import sys
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import fixtures_real as FX  # noqa: E402
from conftest import clip_bpe, require_peer, torch_or_skip  # noqa: E402

from configs import common  # noqa: E402
from trace_jax.data import grain_pipeline as gp  # noqa: E402
from trace_jax.data import sources, train_sources  # noqa: E402
from trace_jax.data.preprocess import CLIP_MEAN, CLIP_STD  # noqa: E402

S = 32          # image size of every test
CTX = 16


@pytest.fixture(scope="module")
def tok():
  return clip_bpe(CTX)


def _jpeg(path, h, w, seed, fmt="JPEG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)


def _config(name, batch_size=4, **data):
  c = common.get_config()
  c.data.name, c.data.batch_size, c.data.image_size = name, batch_size, S
  for k, v in data.items():
    c.data[k] = v
  return c


def _make(c, tok, pi=0, pc=1, split=None):
  return sources.make(c, split, process_index=pi, process_count=pc, tokenizer=tok)


def _take(src, start, n):
  it = src.batches(start)
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory):
  """12 JPEGs of assorted sizes (landscape, portrait, square) in a subfolder; captions.csv in open_clip's
  columns with paths relative to the file."""
  root = tmp_path_factory.mktemp("csv")
  rows = []
  for i in range(12):
    h, w = [(40, 56), (50, 36), (33, 33), (64, 48)][i % 4]
    _jpeg(str(root / "img" / f"{i}.jpg"), h + i, w, i)
    rows.append((f"img/{i}.jpg", f"photo number {i} of a thing"))
  with open(root / "captions.csv", "w") as f:
    f.write("filepath,title\n" + "".join(f'{p},"{t}"\n' for p, t in rows))
  return root, rows


def _oc_eval(path):
  """open_clip 2.23.0 eval transform -> HWC float32."""
  open_clip = require_peer("open_clip", "open_clip_torch")
  torch_or_skip()
  t = open_clip.transform.image_transform(S, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
  with Image.open(path) as im:
    return t(im).numpy().transpose(1, 2, 0)


def test_csv_batches_keys_and_eval_pixels(csv_dir, tok):
  root, rows = csv_dir
  c = _config("image_text", path=str(root / "captions.csv"), augment="eval")
  src = _make(c, tok)
  assert src.extras["skipped"] == {"empty_caption": 0} and len(src.extras["records"]) == 12
  assert src.info["context_length"] == CTX and src.info["vocab_size"] == 49408
  batches = _take(src, 0, 3)
  seen = []
  for b in batches:
    assert b["image"].shape == (4, S, S, 3) and b["image"].dtype == np.float32
    assert b["caption_ids"].shape == (4, CTX) and b["caption_ids"].dtype == np.int32
    assert b["phrase_ids"].dtype == np.int32 and b["mask"].shape == (4, S, S) and b["mask"].dtype == np.float32
    np.testing.assert_array_equal(b["mask_indicator"], np.zeros(4, np.float32))
    for r, i in enumerate(b["index"]):
      path, cap = rows[int(i)]
      np.testing.assert_allclose(b["image"][r], _oc_eval(str(root / path)), atol=2e-6, rtol=0)
      np.testing.assert_array_equal(b["caption_ids"][r], tok([cap])[0])
      np.testing.assert_array_equal(b["phrase_ids"][r], tok([cap])[0])
    seen += [int(i) for i in b["index"]]
  assert sorted(seen) == list(range(12))         # 3 batches of 4 = one epoch, each record once
  assert src.info["train_captions"]() == [t for _, t in rows]


def test_train_crop_matches_torchvision(rng):
  """Our RandomResizedCrop (params from torchvision's get_params, drawn from NumPy) + crop/resize
  equals torchvision's resized_crop with the same params, for the image (bicubic) and the box mask
  (nearest); the params respect open_clip's scale (0.9, 1.0) and ratio (3/4, 4/3)."""
  torch_or_skip()
  import torchvision.transforms.functional as TF
  from torchvision.transforms import InterpolationMode
  areas = []
  for t in range(40):
    h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    box = [rng.uniform(-5, w / 2), rng.uniform(-5, h / 2), rng.uniform(w / 2, w + 5), rng.uniform(h / 2, h + 5)]
    r1, r2 = np.random.default_rng(t), np.random.default_rng(t)
    i, j, ch, cw = gp.random_resized_crop_params(r1, h, w)
    px, mask = gp.transform(img, S, r2, box)
    want = np.asarray(TF.resized_crop(img, i, j, ch, cw, [S, S], InterpolationMode.BICUBIC))
    np.testing.assert_array_equal(px, want)
    m = np.zeros((h, w), np.uint8)
    x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
    m[y0:int(box[3]), x0:int(box[2])] = 1                   # AMC: gt_mask[y1:y2, x1:x2] = 1
    want_m = np.asarray(TF.resized_crop(Image.fromarray(m), i, j, ch, cw, [S, S], InterpolationMode.NEAREST))
    np.testing.assert_array_equal(mask, want_m.astype(np.float32))
    assert 0 <= i and 0 <= j and i + ch <= h and j + cw <= w
    if 0.9 <= w / h <= 1.1:
      areas.append(ch * cw / (h * w))
  assert areas and min(areas) > 0.8 and max(areas) <= 1.0 + 1e-9
  # the distribution of (area, aspect) matches torchvision's get_params (open_clip's scale, default ratio)
  import torch
  from torchvision.transforms import RandomResizedCrop
  torch.manual_seed(0)
  img = Image.new("RGB", (80, 60))
  tv = np.asarray([RandomResizedCrop.get_params(img, [0.9, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)], float)
  r = np.random.default_rng(0)
  ours = np.asarray([gp.random_resized_crop_params(r, 60, 80) for _ in range(3000)], float)
  for a in (tv, ours):
    a[:, 0] = a[:, 2] * a[:, 3] / 4800.0          # area fraction
    a[:, 1] = a[:, 3] / a[:, 2]                   # aspect w / h
  np.testing.assert_allclose(ours[:, :2].mean(0), tv[:, :2].mean(0), atol=0.01)
  np.testing.assert_allclose(ours[:, :2].std(0), tv[:, :2].std(0), atol=0.01)


def test_order_is_a_function_of_seed_and_step(csv_dir, tok):
  root, _ = csv_dir
  c = _config("image_text", path=str(root / "captions.csv"))           # train augmentation
  src = _make(c, tok)
  full = _take(src, 0, 6)                                               # 2 epochs
  resumed = _take(src, 4, 2)
  for a, b in zip(full[4:], resumed):
    for k in ("image", "caption_ids", "index"):
      np.testing.assert_array_equal(a[k], b[k])
  # get_state / set_state
  it = src.batches(0)
  next(it), next(it)
  state = it.get_state()
  assert state["step"] == 2
  it2 = src.batches(0)
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)["image"], full[2]["image"])
  it.close(), it2.close()
  # a new epoch is a new permutation, augmentation differs between epochs; another seed another order
  assert sorted(np.concatenate([b["index"] for b in full[3:]]).tolist()) == list(range(12))
  assert not all(np.array_equal(a["index"], b["index"]) for a, b in zip(full[:3], full[3:]))
  c.seed = 1
  other = _take(_make(c, tok), 0, 3)
  assert not all(np.array_equal(a["index"], b["index"]) for a, b in zip(full[:3], other))


def test_two_processes_read_disjoint_shares_of_the_global_batch(csv_dir, tok):
  root, _ = csv_dir
  c = _config("image_text", path=str(root / "captions.csv"), batch_size=6)
  whole = _take(_make(c, tok), 0, 3)
  parts = [_take(_make(c, tok, pi=p, pc=2), 0, 3) for p in (0, 1)]
  for k in range(3):
    a, b = parts[0][k], parts[1][k]
    assert a["image"].shape[0] == 3 and not set(a["index"].tolist()) & set(b["index"].tolist())
    for key in ("image", "caption_ids", "mask", "index"):
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[k][key])


@pytest.mark.slow
def test_resume_with_grain_workers(csv_dir, tok):
  """Worker processes (2, then 1 on resume) read exactly what the in-process pipeline reads."""
  root, _ = csv_dir
  c = _config("image_text", path=str(root / "captions.csv"))
  ref = _take(_make(c, tok), 0, 5)
  c.data.worker_count = 2
  full = _take(_make(c, tok), 0, 5)
  c.data.worker_count = 1
  resumed = _take(_make(c, tok), 3, 2)
  for a, b in zip(ref, full):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["caption_ids"], b["caption_ids"])
  for a, b in zip(ref[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["index"], b["index"])


def test_bad_records_skipped_and_counted(tmp_path, tok):
  """An empty caption is skipped when the source is made; a missing and a corrupt image are replaced
  in the pipeline and counted; neither ever reaches a batch."""
  rows = []
  for i in range(8):
    _jpeg(str(tmp_path / f"{i}.jpg"), 30, 30, i)
    rows.append((f"{i}.jpg", f"caption {i}"))
  (tmp_path / "3.jpg").write_bytes(b"not an image at all")
  os.remove(tmp_path / "5.jpg")
  rows.append(("6.jpg", "   "))
  with open(tmp_path / "d.tsv", "w") as f:
    f.write("path\ttext\n" + "".join(f"{p}\t{t}\n" for p, t in rows))
  c = _config("image_text", path=str(tmp_path / "d.tsv"), image_key="path", caption_key="text")
  src = _make(c, tok)
  assert src.extras["skipped"] == {"empty_caption": 1}
  recs = src.extras["records"]
  assert len(recs) == 8
  batches = _take(src, 0, 2)                                  # epoch 0: every position once
  idx = np.concatenate([b["index"] for b in batches]).tolist()
  assert 3 not in idx and 5 not in idx
  assert sum(int(b["skipped"].sum()) for b in batches) >= 2
  with pytest.raises(ValueError, match="columns"):
    _make(_config("image_text", path=str(tmp_path / "d.tsv")), tok)


def test_no_usable_record_is_an_error_naming_the_path(tmp_path, tok):
  with open(tmp_path / "e.csv", "w") as f:
    f.write('filepath,title\na.jpg,""\nb.jpg,  \n')
  with pytest.raises(ValueError, match=r"no usable record in .*e\.csv"):
    _make(_config("image_text", path=str(tmp_path / "e.csv")), tok)
  with pytest.raises(FileNotFoundError, match=r"2 of 2 shards missing, e\.g\. .*s-000\.tar"):
    _make(_config("image_text", path=str(tmp_path / "s-{000..001}.tar")), tok)
  with tarfile.open(tmp_path / "t-0.tar", "w") as tf:
    _tar_add(tf, "a.txt", b"a caption without its image")
  with pytest.raises(ValueError, match=r"no usable record in .*t-\{0\.\.0\}\.tar"):
    _make(_config("image_text", path=str(tmp_path / "t-{0..0}.tar")), tok)
  with pytest.raises(ValueError, match="tokenizer"):
    sources.make(_config("image_text", path=str(tmp_path / "e.csv")), process_index=0, process_count=1)


def test_expand_braces():
  assert train_sources.expand_braces("d/s-{000008..000011}.tar") == [f"d/s-0000{i:02d}.tar" for i in range(8, 12)]
  assert train_sources.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


def _tar_add(tf, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tf.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path, tok):
  """Two shards (jpg, png and webp members, one sample without a txt, one with an empty txt): each
  row's pixels and caption come from the same sample."""
  truth = {}
  for s in range(2):
    with tarfile.open(tmp_path / f"shard-{s:06d}.tar", "w") as tf:
      for k in range(4):
        key = f"s{s}k{k}"
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("JPEG", "jpg")][k]
        buf = io.BytesIO()
        arr = np.random.default_rng(10 * s + k).integers(0, 255, (24 + k, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        _tar_add(tf, f"{key}.{ext}", buf.getvalue())
        if (s, k) == (1, 3):
          continue                                  # no caption: incomplete sample
        text = "" if (s, k) == (0, 3) else f"a sample {key}"
        _tar_add(tf, f"{key}.txt", text.encode())
        if text:
          truth[key] = (buf.getvalue(), text)
  c = _config("image_text", path=str(tmp_path / "shard-{000000..000001}.tar"), batch_size=3, augment="eval")
  src = _make(c, tok)
  assert src.extras["skipped"] == {"empty_caption": 1, "missing_image": 0, "missing_caption": 1}
  recs = src.extras["records"]
  assert len(recs) == 6
  for b in _take(src, 0, 2):
    for r, i in enumerate(b["index"]):
      key = recs.keys[int(i)]
      data, text = truth[key]
      np.testing.assert_array_equal(b["caption_ids"][r], tok([text])[0])
      p = tmp_path / f"{key}.img"
      p.write_bytes(data)
      np.testing.assert_allclose(b["image"][r], _oc_eval(str(p)), atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- tfds sources

def _mask_ref(img_hw, box):
  """AMC box mask (int() slices, caption_dataset.py) through open_clip's eval geometry via torchvision."""
  torch_or_skip()
  import torchvision.transforms.functional as TF
  from torchvision.transforms import InterpolationMode
  h, w = img_hw
  m = np.zeros((h, w), np.uint8)
  x0, y0, x1, y1 = box
  m[int(max(y0, 0)):int(min(y1, h)), int(max(x0, 0)):int(min(x1, w))] = 1
  im = TF.center_crop(TF.resize(Image.fromarray(m), S, InterpolationMode.NEAREST), [S, S])
  return np.asarray(im).astype(np.float32)


def _tfds_config(name, manual, data_dir, batch_size=2, **kw):
  kw.setdefault("augment", "eval")
  return _config(name, batch_size=batch_size, manual_dir=str(manual), data_dir=str(data_dir), **kw)


def _rows_by_index(src, n_steps):
  out = {}
  for b in _take(src, 0, n_steps):
    for r, i in enumerate(b["index"]):
      out[int(i)] = {k: b[k][r] for k in ("image", "caption", "phrase", "mask", "mask_indicator", "caption_ids")}
  return out


def test_visual_genome_rows_and_amc_masks(tmp_path, tok):
  FX.write_visual_genome(str(tmp_path / "vg"))
  c = _tfds_config("visual_genome", tmp_path / "vg", tmp_path / "tfds")
  src = _make(c, tok)
  recs = src.extras["records"]
  ds = recs._source()
  n = len(recs)
  assert n == sum(len(ds[i]["prompts"]) for i in range(len(ds)))   # VG boxes are clipped by the builder
  rows = _rows_by_index(src, n // 2 + 1)
  assert set(rows) == set(range(n))
  for i, row in rows.items():
    r, k = recs.items[i]
    e = ds[int(r)]
    prompt = e["prompts"][k].decode() if isinstance(e["prompts"][k], bytes) else e["prompts"][k]
    assert row["caption"] == row["phrase"] == prompt
    np.testing.assert_array_equal(row["caption_ids"], tok([prompt])[0])
    assert row["mask_indicator"] == 1
    np.testing.assert_array_equal(row["mask"], _mask_ref((int(e["height"]), int(e["width"])), e["boxes"][k]))
    p = tmp_path / "x.jpg"
    p.write_bytes(e["image"])
    np.testing.assert_allclose(row["image"], _oc_eval(str(p)), atol=2e-6, rtol=0)


def test_flickr30k_entities_rows(tmp_path, tok):
  FX.write_flickr30k_entities(str(tmp_path / "f"))
  src = _make(_tfds_config("flickr30k_entities", tmp_path / "f", tmp_path / "tfds"), tok, split="val")
  # val = image 1000092795: phrases with a box: 'Two young guys', 'shaggy hair', 'their hands',
  # 'Two friends' (entity 1 again); 'the yard' (scene) and 'time' (notvisual) have none.
  assert src.extras["skipped"] == {"no_box": 2}
  rows = _rows_by_index(src, 2)
  assert sorted(r["phrase"] for r in rows.values()) == ["Two friends", "Two young guys", "shaggy hair",
                                                        "their hands"]
  boxes = {"1": [[3, 5, 20, 30], [22, 4, 40, 31]], "2": [[5, 6, 12, 10]], "3": [[10, 20, 18, 26], [25, 20, 30, 27]]}
  ent = {"Two friends": "1", "Two young guys": "1", "shaggy hair": "2", "their hands": "3"}
  for row in rows.values():
    assert row["caption"].startswith("Two")                 # the phrase's own sentence
    # the mask is one of the entity's boxes (XML 1-based inclusive -> [xmin - 1, ymin - 1, xmax, ymax])
    cands = [_mask_ref((34, 44), [b[0] - 1, b[1] - 1, b[2], b[3]]) for b in boxes[ent[row["phrase"]]]]
    assert any(np.array_equal(row["mask"], m) for m in cands)


def test_refcoco_box_outside_the_image_is_skipped(tmp_path, tok):
  import json
  import pickle
  root = tmp_path / "r"
  FX.write_refcoco(str(root))
  inst = json.load(open(root / "refcoco" / "instances.json"))
  inst["annotations"].append(dict(id=103, image_id=9, category_id=1, bbox=[45, 2, 5, 5], area=25.0,
                                  iscrowd=0, segmentation=[[45, 2, 50, 2, 50, 7, 45, 7]]))
  json.dump(inst, open(root / "refcoco" / "instances.json", "w"))
  refs = pickle.load(open(root / "refcoco" / "refs(unc).p", "rb"))
  refs.append({**refs[1], "ref_id": 9, "ann_id": 103, "sent_ids": [9, 10],
               "sentences": [{"tokens": ["far"], "raw": "far", "sent_id": 9, "sent": "far away"},
                             {"tokens": ["x"], "raw": "x", "sent_id": 10, "sent": "out there"}]})
  pickle.dump(refs, open(root / "refcoco" / "refs(unc).p", "wb"), protocol=2)
  src = _make(_tfds_config("refcoco", root, tmp_path / "tfds"), tok, split="testA")
  assert src.extras["skipped"] == {"box_outside_image": 2}     # image 9 is 40 px wide; the box starts at 45
  rows = _rows_by_index(src, 2)
  want = {"man on the left": [2, 3, 12, 15], "left guy": [2, 3, 12, 15], "right man": [20, 4, 35, 24]}
  assert sorted(r["phrase"] for r in rows.values()) == sorted(want)
  for row in rows.values():
    np.testing.assert_array_equal(row["mask"], _mask_ref((30, 40), want[row["phrase"]]))


def test_coco_captions_rows(tmp_path, tok):
  FX.write_coco(str(tmp_path / "c"))
  src = _make(_tfds_config("coco_captions", tmp_path / "c", tmp_path / "tfds", builder_config="instances_val2017",
                           batch_size=3), tok, split="val")
  rows = _rows_by_index(src, 1)
  assert sorted(r["caption"] for r in rows.values()) == sorted(
      ["A man and his dog sit near a brick wall.", "Two people in a room under the sky", "A cup on a table."])
  assert all(r["mask_indicator"] == 0 for r in rows.values())


def test_one_process_prepares_the_others_wait(tmp_path, tok, monkeypatch):
  """Two concurrent makers of an unprepared builder: one prepares (under the file lock), the other
  waits and reads the prepared dataset and the cached row list."""
  from trace_jax.data import real
  FX.write_visual_genome(str(tmp_path / "vg"))
  calls = []
  orig = real.prepare

  def counting(*a, **k):
    calls.append(a)
    return orig(*a, **k)
  monkeypatch.setattr(real, "prepare", counting)
  c = _tfds_config("visual_genome", tmp_path / "vg", tmp_path / "tfds")
  out, errs = [None, None], []

  def run(p):
    try:
      out[p] = _make(c, tok, pi=p, pc=2)
    except Exception as e:  # surfaced below
      errs.append(e)
  ts = [threading.Thread(target=run, args=(p,)) for p in (0, 1)]
  [t.start() for t in ts]
  [t.join() for t in ts]
  assert not errs, errs
  assert len(calls) == 1
  np.testing.assert_array_equal(out[0].extras["records"].items, out[1].extras["records"].items)
  with pytest.raises(ValueError, match="not prepared .*data.manual_dir"):
    _make(_tfds_config("refcoco", "", tmp_path / "tfds2"), tok, split="testA")


@pytest.mark.slow
def test_tfds_source_in_a_grain_worker(tmp_path, tok):
  """The tfds records travel to a worker process (the data source reopened there) and give the same
  batches as in-process."""
  FX.write_visual_genome(str(tmp_path / "vg"))
  c = _tfds_config("visual_genome", tmp_path / "vg", tmp_path / "tfds", augment="train")
  ref = _take(_make(c, tok), 1, 2)
  c.data.worker_count = 1
  got = _take(_make(c, tok), 1, 2)
  for a, b in zip(ref, got):
    for k in ("image", "mask", "phrase_ids", "index"):
      np.testing.assert_array_equal(a[k], b[k])
