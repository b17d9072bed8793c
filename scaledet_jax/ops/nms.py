"""Greedy non-maximum suppression with fixed output size (jit-friendly), and per-class NMS.

Per-class NMS uses the class-offset trick (as torchvision's ``batched_nms``): boxes of different
classes are moved apart so they can never overlap, then one greedy pass runs over all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scaledet_jax.ops.matching import box_iou

Array = jax.Array


def nms(boxes: Array, scores: Array, iou_threshold: float, max_outputs: int) -> tuple[Array, Array]:
    """Indices of kept boxes in descending score order, and a validity mask, both [max_outputs].

    A box is suppressed when its IoU with an already kept box is > ``iou_threshold``. Boxes with
    score -inf are never kept (use it to mask candidates out).
    """
    num = boxes.shape[0]
    iou = box_iou(boxes, boxes) if num * num <= 2**26 else None

    def body(i, state):
        remaining, keep, valid = state
        best = jnp.argmax(remaining).astype(jnp.int32)
        ok = remaining[best] > -jnp.inf
        overlaps = iou[best] if iou is not None else box_iou(boxes[best][None], boxes)[0]
        suppressed = (overlaps > iou_threshold) | (jnp.arange(num) == best)
        remaining = jnp.where(ok & suppressed, -jnp.inf, remaining)
        return remaining, keep.at[i].set(jnp.where(ok, best, 0)), valid.at[i].set(ok)

    init = (
        scores.astype(jnp.promote_types(scores.dtype, jnp.float32)),
        jnp.zeros(max_outputs, jnp.int32),
        jnp.zeros(max_outputs, bool),
    )
    _, keep, valid = jax.lax.fori_loop(0, max_outputs, body, init)
    return keep, valid


def batched_nms(
    boxes: Array, scores: Array, classes: Array, iou_threshold: float, max_outputs: int
) -> tuple[Array, Array]:
    """NMS applied independently per class (boxes [N, 4], scores [N], classes [N] int)."""
    span = jnp.max(jnp.where(jnp.isfinite(scores)[:, None], jnp.abs(boxes), 0.0)) + 1.0
    offset = classes.astype(boxes.dtype)[:, None] * 2.0 * span
    return nms(boxes + offset, scores, iou_threshold, max_outputs)
