"""Multilevel anchor boxes, as TF Model Garden ``ops.anchor.Anchor`` lays them out.

Boxes are [ymin, xmin, ymax, xmax] in pixels. Per level the array is [H_l, W_l, A * 4] with the
anchors of one location ordered scale-major, then aspect ratio; flattening gives the order that
``reshape(class_output, [B, -1, num_classes])`` gives the head outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def num_anchors_per_location(num_scales: int, aspect_ratios: Sequence[float]) -> int:
    return num_scales * len(aspect_ratios)


def level_anchors(
    level: int,
    num_scales: int,
    aspect_ratios: Sequence[float],
    anchor_size: float,
    image_size: tuple[int, int],
) -> np.ndarray:
    """Anchors of one level: float32 [H_l, W_l, A * 4]."""
    height, width = image_size
    feat_h, feat_w = math.ceil(height / 2**level), math.ceil(width / 2**level)
    stride_y, stride_x = np.float32(height / feat_h), np.float32(width / feat_w)
    cy = (np.arange(feat_h, dtype=np.float32) * stride_y + stride_y / 2)[:, None]
    cx = (np.arange(feat_w, dtype=np.float32) * stride_x + stride_x / 2)[None, :]
    boxes = []
    for scale in range(num_scales):
        for ratio in aspect_ratios:
            base = anchor_size * 2**level * 2 ** (scale / num_scales)
            half_w = base * ratio**0.5 / 2.0
            half_h = base * ratio**-0.5 / 2.0
            boxes.append(np.stack(np.broadcast_arrays(cy - half_h, cx - half_w, cy + half_h, cx + half_w), -1))
    return np.concatenate(boxes, axis=-1).astype(np.float32)


def multilevel_anchors(
    min_level: int,
    max_level: int,
    num_scales: int,
    aspect_ratios: Sequence[float],
    anchor_size: float,
    image_size: tuple[int, int],
) -> dict[int, np.ndarray]:
    """{level: [H_l, W_l, A * 4]} for levels min..max."""
    return {
        level: level_anchors(level, num_scales, aspect_ratios, anchor_size, image_size)
        for level in range(min_level, max_level + 1)
    }


def flatten_levels(per_level: dict[int, np.ndarray], size: int = 4) -> np.ndarray:
    """Concatenates {level: [..., H, W, A * size]} into [..., N, size] in level order."""
    parts = [v.reshape(v.shape[:-3] + (-1, size)) for _, v in sorted(per_level.items())]
    return np.concatenate(parts, axis=-2)
