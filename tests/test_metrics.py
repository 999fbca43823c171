"""Evaluation metrics on hand-made inputs whose scores are known exactly."""
import numpy as np
import pytest
from conftest import torch_or_skip

from trace_jax.evaluation import metrics as M


# ---------------------------------------------------------------- pointing game / box ranking

def test_argmax_tie_break_is_first_in_row_major():
  hm = np.zeros((4, 5))
  hm[2, 1] = hm[1, 3] = hm[3, 0] = 7.0   # three equal maxima; (y=1, x=3) comes first row-major
  assert M.argmax_point(hm) == (3, 1)


def test_point_in_box_is_strict():
  box = [10, 20, 5, 4]                    # xywh: interior x in (10, 15), y in (20, 24)
  assert M.point_in_boxes((11, 21), box)
  assert M.point_in_boxes((14, 23), box)
  for pt in [(10, 21), (15, 21), (11, 20), (11, 24)]:   # on a border -> miss
    assert not M.point_in_boxes(pt, box)
  boxes_xyxy = [[0, 0, 3, 3], [10, 10, 20, 20]]
  assert M.point_in_boxes((15, 11), boxes_xyxy, "xyxy")   # inside the second one only
  assert not M.point_in_boxes((3, 1), boxes_xyxy, "xyxy")
  with pytest.raises(ValueError, match="box_format"):
    M.point_in_boxes((1, 1), box, "cxcywh")


def test_pointing_game_at_image_size_and_several_boxes():
  a = np.zeros((6, 8)); a[2, 5] = 1.0          # point (5, 2)
  b = np.zeros((6, 8)); b[4, 1] = b[0, 7] = 1.0  # tie -> (7, 0)
  c = np.zeros((6, 8)); c[3, 3] = 1.0          # (3, 3): exactly on a border -> miss
  out = M.pointing_game([a, b, c], [[4, 1, 2, 2], [[0, 0, 2, 2], [6, -1, 9, 2]], [3, 0, 5, 5]],
                        [(6, 8)] * 3, box_format="xywh", upsample=False)
  np.testing.assert_array_equal(out["points"], [[5, 2], [7, 0], [3, 3]])
  np.testing.assert_array_equal(out["hits"], [True, True, False])
  assert out["accuracy"] == pytest.approx(2 / 3)


def test_pointing_game_upsamples_like_torch_bicubic():
  torch = torch_or_skip()
  rng = np.random.default_rng(0)
  hm = rng.random((5, 7)).astype(np.float32)
  up_t = torch.nn.functional.interpolate(torch.tensor(hm)[None, None], size=(37, 53), mode="bicubic",
                                         align_corners=False)[0, 0].numpy()
  np.testing.assert_allclose(M.upsample_bicubic(hm, (37, 53)), up_t, atol=1e-5)
  y, x = (up_t == up_t.max()).nonzero()
  out = M.pointing_game([hm], [[x[0] - 1, y[0] - 1, 2, 2]], [(37, 53)])
  assert tuple(out["points"][0]) == (x[0], y[0]) and out["hits"][0]


def test_box_iou_inclusive_pixels():
  assert M.box_iou_inclusive([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
  # overlap x 5..9, y 0..9 (inclusive) -> 5*10 = 50; union 100 + 100 - 50
  assert M.box_iou_inclusive([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
  # touching in one pixel column (ix1 == ix2): the code's strict test gives 0
  assert M.box_iou_inclusive([0, 0, 10, 10], [9, 0, 10, 10]) == 0.0


def test_box_ranking_recall_at_1():
  hm = np.zeros((10, 10)); hm[2:4, 2:4] = 1.0   # mass 4 inside [2,2,2,2]
  dets = [[0, 0, 10, 10],                        # 4 / 10 = 0.4
          [2, 2, 2, 2],                          # 4 / 2  = 2.0  (best)
          [2, 2, 2, 2]]                          # tie: the first one wins
  out = M.box_ranking([hm, hm, np.zeros((10, 10))], [dets, dets, dets],
                      [[2, 2, 2, 2], [2, 2, 4, 4], [2, 2, 2, 2]], [(10, 10)] * 3, upsample=False)
  np.testing.assert_array_equal(out["pred"], [1, 1, -1])     # all-zero map: no score > 0 -> no box
  # IoU([2,2,4,4],[2,2,2,2]) = 4 / 16 = 0.25 < 0.5
  np.testing.assert_allclose(out["iou"], [1.0, 0.25, 0.0])
  np.testing.assert_array_equal(out["hits"], [True, False, False])
  assert out["accuracy"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- threshold scores / localization

def test_threshold_scores_known_counts_and_edges():
  hm = np.array([[[0.5, 0.49], [1.0, 0.0]],     # >= 0.5: (0,0), (1,0)
                 [[0.2, 0.2], [0.2, 0.2]],      # nothing predicted
                 [[0.9, 0.9], [0.9, 0.9]]])     # everything predicted, GT empty
  gt = np.array([[[1, 1], [0, 0]],
                 [[1, 0], [0, 0]],
                 [[0, 0], [0, 0]]], bool)
  s = M.threshold_scores(hm, gt, 0.5)
  np.testing.assert_array_equal(s["tp"], [1, 0, 0])
  np.testing.assert_array_equal(s["fp"], [1, 0, 4])
  np.testing.assert_array_equal(s["fn"], [1, 1, 0])
  np.testing.assert_allclose(s["precision"], [0.5, np.nan, 0.0])     # nothing predicted -> NaN
  np.testing.assert_allclose(s["recall"], [0.5, 0.0, np.nan])        # empty GT -> NaN
  np.testing.assert_allclose(s["iou"], [1 / 3, 0.0, 0.0])
  assert s["macro_precision"] == pytest.approx(0.25)                  # mean of 0.5, 0.0
  assert s["macro_recall"] == pytest.approx(0.25)                     # mean of 0.5, 0.0
  assert s["miou"] == pytest.approx(1 / 9)
  assert s["micro_precision"] == pytest.approx(1 / 6)                 # 1 / (1 + 5)
  assert s["micro_recall"] == pytest.approx(1 / 3)                    # 1 / (1 + 2)
  assert s["micro_iou"] == pytest.approx(1 / 8)
  strict = M.threshold_scores(hm, gt, 0.5, inclusive=False)           # 0.5 itself is not predicted
  np.testing.assert_array_equal(strict["tp"], [0, 0, 0])
  both_empty = M.threshold_scores(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool))
  assert np.isnan(both_empty["iou"][0]) and np.isnan(both_empty["miou"])


def test_boxes_to_mask_and_localization():
  m = M.boxes_to_mask([[1, 0, 2, 1], [3.7, 2.2, 1, 2]], (4, 5))   # int() slices, end-exclusive
  want = np.zeros((4, 5), bool); want[0:1, 1:3] = True; want[2:4, 3:4] = True
  np.testing.assert_array_equal(m, want)
  np.testing.assert_array_equal(M.boxes_to_mask([[1, 0, 3, 1]], (4, 5), "xyxy"), want & (np.arange(4) == 0)[:, None])
  hm = np.zeros((4, 5)); hm[0, 1:3] = 0.8; hm[2, 3] = 0.75; hm[3, 4] = 1.0   # 0.75 is not > 0.75
  out = M.localization(hm[None], want[None])
  # pred = {(0,1),(0,2),(3,4)}, gt = {(0,1),(0,2),(2,3),(3,3)}: I = 2, U = 5
  assert out["localization"] == pytest.approx(2 / 5)
  hm2 = np.arange(20, dtype=float).reshape(4, 5)     # top quarter by percentile: values > 14.25
  out2 = M.localization(hm2[None], np.ones((1, 4, 5), bool), percentile=True)
  assert out2["iou"][0] == pytest.approx(5 / 20)


# ---------------------------------------------------------------- confidence drop / increase

def test_confidence_change_definitions():
  out = M.confidence_change([0.5, 0.2, 0.3, 0.4], [0.3, 0.25, 0.3, 0.1])
  assert out["drop"] == pytest.approx((0.2 + 0 + 0 + 0.3) / 4)
  assert out["increase"] == pytest.approx(1 / 4)   # equal scores are not an increase


def test_image_confidence_uses_pointwise_product():
  images = np.ones((2, 2, 2, 3)); images[1] *= 2.0
  maps = np.array([[[1, 0], [0, 0]], [[1, 1], [1, 1]]], float)
  scorer = lambda x: x.reshape(len(x), -1).sum(1) / 12.0       # a stand-in "cosine"
  out = M.image_confidence(scorer, images, maps)
  np.testing.assert_allclose(out["original"], [1.0, 2.0])
  np.testing.assert_allclose(out["distilled"], [0.25, 2.0])
  assert out["drop"] == pytest.approx(0.75 / 2) and out["increase"] == 0.0


def test_text_confidence_official_protocol():
  seen = []

  def scorer(ids):
    seen.append(ids.copy())
    return (ids > 0).sum(1) / 10.0   # fraction of non-blank tokens, as a stand-in similarity

  ids = [np.array([49406, 11, 12, 13, 14, 49407]), np.array([49406, 21, 22, 49407])]
  scores = [np.array([0.0, 0.9, 0.1, 0.5, 0.7, 1.0]), np.array([0.2, 0.3, 0.3, 1.0])]
  out = M.text_confidence(scorer, ids, scores)
  # words only; kept = score > median: row 0 median of [.9,.1,.5,.7] = .6 -> keep 11, 14; row 1: ties -> none
  np.testing.assert_array_equal(seen[0], [[11, 12, 13, 14], [21, 22, 0, 0]])
  np.testing.assert_array_equal(seen[1], [[11, 0, 0, 14], [0, 0, 0, 0]])
  np.testing.assert_allclose(out["drop"], (0.2 + 0.2) / 2)
  out2 = M.text_confidence(scorer, ids, scores, strip_special=False, blank_id=7)
  np.testing.assert_array_equal(seen[3][0], [49406, 11, 7, 7, 14, 49407])


# ---------------------------------------------------------------- retrieval / referring

def test_retrieval_accuracy_with_ties_and_multiple_targets():
  sim = np.array([[0.9, 0.1, 0.5],
                  [0.2, 0.2, 0.2],     # all tied: stable order 0, 1, 2
                  [0.1, 0.3, 0.2]])
  out = M.retrieval_accuracy(sim, [0, 2, 0], ks=(1, 2, 3))
  np.testing.assert_array_equal(out["rank"], [0, 2, 2])
  assert (out["acc@1"], out["acc@2"], out["acc@3"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3), 1.0)
  multi = np.array([[False, True, True], [False, False, False], [True, False, True]])
  out = M.retrieval_accuracy(sim, multi, ks=(1, 2))
  np.testing.assert_array_equal(out["rank"], [1, 3, 1])   # no correct candidate -> rank C
  assert out["acc@1"] == 0.0 and out["acc@2"] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="targets"):
    M.retrieval_accuracy(sim, [0, 3, 1])


def test_referring_miou_vs_oiou():
  p1 = np.zeros((4, 4), bool); p1[:2, :2] = True           # I = 4, U = 4 -> 1.0
  g1 = p1.copy()
  p2 = np.zeros((4, 4), bool); p2[0, 0] = True             # I = 0, U = 1 + 12 = 13 -> 0.0
  g2 = np.zeros((4, 4), bool); g2[1:, :] = True
  out = M.referring_iou([p1, p2], [g1, g2])
  assert out["miou"] == pytest.approx(0.5)
  assert out["oiou"] == pytest.approx(4 / 17)
  masks = np.stack([p1, p2, g2])
  r = M.referring_retrieval([np.array([0.1, 0.9, 0.5]), np.array([0.7, 0.1, 0.2])], [masks, masks], [2, 0],
                            ks=(1, 2))
  np.testing.assert_array_equal(r["rank"], [1, 0])
  assert r["acc@1"] == 0.5 and r["acc@2"] == 1.0
  # expression 0 picks p2 (IoU with g2 = 0), expression 1 picks p1 (IoU with p1 = 1)
  np.testing.assert_allclose(r["iou"], [0.0, 1.0])
  assert r["oiou"] == pytest.approx(4 / (13 + 4))
