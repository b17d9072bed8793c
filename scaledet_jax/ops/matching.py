"""IoU and anchor labeling (TF Model Garden's ``AnchorLabeler`` + ``BoxMatcher``), in jnp.

Works on fixed shapes: ground truth is padded to ``max_instances`` with a ``valid`` mask, so the
labeler runs inside the jit-compiled train step. Semantics (thresholds as in Model Garden's
RetinaNet: anchors with best IoU >= ``match_threshold`` are positive, < ``unmatched_threshold``
negative, in between ignored; every ground-truth box is force-matched to its best anchor):

* ``cls_targets``: class id for positives, -1 otherwise (-1 one-hot encodes to all zeros);
* ``box_targets``: encoded boxes of the matched ground truth (zeros where not positive);
* ``cls_weights``: 1 for positives and negatives, 0 for ignored anchors;
* ``box_weights``: 1 for positives only.

Crowd boxes (COCO ``iscrowd``) never make positives; anchors overlapping one by at least
``match_threshold`` IoU that are not positive are ignored instead of being negatives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scaledet_jax.ops import box_coder

Array = jax.Array


def box_area(boxes: Array) -> Array:
    return jnp.clip(boxes[..., 2] - boxes[..., 0], 0) * jnp.clip(boxes[..., 3] - boxes[..., 1], 0)


def box_iou(a: Array, b: Array) -> Array:
    """Pairwise IoU of [N, 4] and [M, 4] boxes ([ymin, xmin, ymax, xmax]) -> [N, M]."""
    top_left = jnp.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = jnp.prod(jnp.clip(bottom_right - top_left, 0), axis=-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def match_anchors(
    iou: Array, valid: Array, match_threshold: float, unmatched_threshold: float, force_match: bool = True
) -> tuple[Array, Array]:
    """Matches anchors (rows) to ground truth (columns).

    Returns (matched gt index [N], indicator [N]): 1 positive, -1 negative, -2 ignored.
    """
    iou = jnp.where(valid[None, :], iou, -1.0)
    matched = jnp.argmax(iou, axis=1)
    best = jnp.max(iou, axis=1)
    indicator = jnp.where(best >= match_threshold, 1, jnp.where(best < unmatched_threshold, -1, -2))
    if force_match:
        best_anchor = jnp.argmax(iou, axis=0)  # [M]
        # one_hot[j, i] = 1 when gt j's best anchor is i (padded gts excluded).
        one_hot = (best_anchor[:, None] == jnp.arange(iou.shape[0])[None, :]) & valid[:, None]
        forced = jnp.any(one_hot, axis=0)
        matched = jnp.where(forced, jnp.argmax(one_hot, axis=0), matched)
        indicator = jnp.where(forced, 1, indicator)
    no_gt = ~jnp.any(valid)
    return jnp.where(no_gt, 0, matched), jnp.where(no_gt, -1, indicator)


def label_anchors(
    anchors: Array,
    gt_boxes: Array,
    gt_classes: Array,
    gt_valid: Array,
    gt_crowd: Array | None = None,
    match_threshold: float = 0.5,
    unmatched_threshold: float = 0.5,
    box_weights_coder=None,
) -> dict[str, Array]:
    """Targets for one image: anchors [N, 4], ground truth [M, 4] / [M] padded with ``gt_valid``."""
    crowd = jnp.zeros_like(gt_valid) if gt_crowd is None else gt_crowd.astype(bool)
    iou = box_iou(anchors, gt_boxes)
    matched, indicator = match_anchors(iou, gt_valid & ~crowd, match_threshold, unmatched_threshold)
    positive = indicator == 1
    crowd_iou = jnp.max(jnp.where((gt_valid & crowd)[None, :], iou, 0.0), axis=1, initial=0.0)
    ignored = (indicator == -2) | (~positive & (crowd_iou >= match_threshold))
    cls_targets = jnp.where(positive, gt_classes[matched], -1)
    encoded = box_coder.encode_boxes(gt_boxes[matched], anchors, box_weights_coder)
    box_targets = jnp.where(positive[:, None], encoded, 0.0)
    return {
        "cls_targets": cls_targets.astype(jnp.int32),
        "box_targets": box_targets,
        "cls_weights": (~ignored).astype(jnp.float32),
        "box_weights": positive.astype(jnp.float32),
    }
