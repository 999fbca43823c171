"""trace_jax/boxes.py: the two box -> mask rules (AMC's int() slices; pixel centres), on hand-made boxes."""
import numpy as np
import pytest

from trace_jax.boxes import as_xyxy, boxes_to_masks


def test_truncate_is_amc_int_slices_and_centre_is_pixel_centres():
  box = [0.6, 1.2, 3.7, 2.9]                                   # x0, y0, x1, y1
  t = boxes_to_masks(box, (4, 5), rule="truncate")[0]
  want = np.zeros((4, 5), bool)
  want[1:2, 0:3] = True                                        # gt_mask[int(y0):int(y1), int(x0):int(x1)]
  np.testing.assert_array_equal(t, want)
  c = boxes_to_masks(box, (4, 5), rule="centre")[0]
  want = np.zeros((4, 5), bool)
  want[1:3, 1:4] = True        # centres: x 1.5..3.5 in [0.6, 3.7), y 1.5, 2.5 in [1.2, 2.9)
  np.testing.assert_array_equal(c, want)


def test_rules_agree_on_integer_boxes_and_clip():
  rng = np.random.default_rng(0)
  for _ in range(200):
    x0, y0 = rng.integers(-3, 8, 2)
    b = [x0, y0, x0 + rng.integers(0, 9), y0 + rng.integers(0, 9)]
    t = boxes_to_masks(b, (6, 7), rule="truncate")
    np.testing.assert_array_equal(t, boxes_to_masks(b, (6, 7), rule="centre"))
    want = np.zeros((6, 7), bool)
    want[max(b[1], 0):max(b[3], 0), max(b[0], 0):max(b[2], 0)] = True
    np.testing.assert_array_equal(t[0], want)


def test_formats_and_errors():
  xyxy = np.array([[1.0, 2.0, 4.0, 5.0]])
  np.testing.assert_array_equal(as_xyxy([1, 2, 3, 3], "xywh"), xyxy)
  np.testing.assert_array_equal(as_xyxy([2, 1, 5, 4], "yxyx"), xyxy)
  with pytest.raises(ValueError, match="rule"):
    boxes_to_masks(xyxy, (4, 4), rule="round")
  with pytest.raises(ValueError, match="box_format"):
    boxes_to_masks(xyxy, (4, 4), rule="centre", box_format="cxcywh")
  with pytest.raises(ValueError, match=r"\[K, 4\]"):
    boxes_to_masks(np.ones((2, 3)), (4, 4), rule="centre")
