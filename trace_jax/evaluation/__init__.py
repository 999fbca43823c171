"""Evaluation: metrics for attribution maps and region-text matching (``trace_jax.evaluation.metrics``).

Other modules here (zero-shot, visual prompts) are imported explicitly by their users.
"""
from trace_jax.evaluation.metrics import (  # noqa: F401
    argmax_point, binarize, box_iou_inclusive, box_ranking, boxes_to_mask, confidence_change,
    distill_image, image_confidence, keep_top_tokens, localization, mask_iou, mask_scores,
    point_in_boxes, pointing_game, referring_iou, referring_retrieval, retrieval_accuracy,
    text_confidence, threshold_scores, upsample_bicubic)
