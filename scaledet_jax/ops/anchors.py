"""Multilevel anchor boxes, as TF Model Garden ``ops.anchor.Anchor`` lays them out.

Boxes are [ymin, xmin, ymax, xmax] in pixels. Per level the array is [H_l, W_l, A * 4] with the
anchors of one location ordered scale-major, then aspect ratio; flattening gives the order that
``reshape(class_output, [B, -1, num_classes])`` gives the head outputs.

Aspect ratios are width / height. torchvision's ``AnchorGenerator`` takes height / width, so its
``(0.5, 1.0, 2.0)`` is our ``(2.0, 1.0, 0.5)`` in the same order; it also orders several sizes per
level ratio-major (ours is scale-major), which only matters with more than one size per level.
torchvision's layout is ``center_offset=0.0, round_base=True, integer_stride=True`` with
``anchor_size = size / 2**level`` (sizes ((32,), (64,), ...) on P2.. give ``anchor_size=8``).
torchvision's RetinaNet sizes are ``(x, int(x * 2**(1/3)), int(x * 2**(2/3)))`` for x = 32 .. 512:
``anchor_size=4, num_scales=3, truncate_sizes=True``.
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
    *,
    center_offset: float = 0.5,
    round_base: bool = False,
    integer_stride: bool = False,
    truncate_sizes: bool = False,
    plus_one_rounding: bool = False,
    aspect_multipliers: Sequence[Sequence[float]] = (),
    stride: int | None = None,
) -> np.ndarray:
    """Anchors of one level: float32 [H_l, W_l, A * 4] on a ceil(size / stride) grid.

    ``stride``: the level's feature stride, ``2**level`` unless given (DetNet's levels 4..6 all have
    stride 16). The anchor size stays ``anchor_size * 2**level``: the level names the anchor scale.

    ``center_offset``: where centres sit, as a fraction of the stride (0.5 Model Garden, 0.0
    torchvision). ``round_base``: round the zero-centred anchor [-w/2, -h/2, w/2, h/2] to integers
    before shifting it (torchvision). ``integer_stride``: stride = image size // grid size
    (torchvision) instead of image size / grid size (Model Garden); equal when the size divides.
    ``truncate_sizes``: the anchor size ``anchor_size * 2**level * 2**(scale / num_scales)`` is
    truncated to an integer before the aspect ratio applies (torchvision RetinaNet's ``int()``).
    ``plus_one_rounding``: mmdetection v1's ``AnchorGenerator`` (Detectron's "+1" pixel boxes): the base anchor
    of a ``w x h`` box is ``ctr -/+ (w - 1) / 2`` around ``ctr = (stride - 1) / 2``, rounded to integers (in
    float32, half to even, as torch), shifted by whole strides; its inclusive corner ``x2`` is our exclusive
    ``x2 + 1``. So a 33.94 x 16.97 anchor becomes 34 x 17 (or 33 x 16) px, centred at stride / 2 or a half pixel
    off. ``center_offset``, ``round_base`` and ``integer_stride`` do not apply (the image size must divide).
    ``aspect_multipliers``: per aspect ratio, the (x, y) factors of the anchor's width and height instead of
    (sqrt(r), 1 / sqrt(r)): effdet's (and early automl's) ((1, 1), (1.4, 0.7), (0.7, 1.4)) for w/h 1, 2, 1/2,
    whose 2:1 anchors are 1% narrower and 1% shorter than sqrt(2) gives.
    """
    if aspect_multipliers and len(aspect_multipliers) != len(aspect_ratios):
        raise ValueError(f"{len(aspect_multipliers)} aspect_multipliers for {len(aspect_ratios)} aspect_ratios")
    if plus_one_rounding:
        return _plus_one_level_anchors(level, num_scales, aspect_ratios, anchor_size, image_size, stride)
    height, width = image_size
    stride = 2**level if stride is None else stride
    feat_h, feat_w = math.ceil(height / stride), math.ceil(width / stride)
    if integer_stride:
        stride_y, stride_x = np.float32(height // feat_h), np.float32(width // feat_w)
    else:
        stride_y, stride_x = np.float32(height / feat_h), np.float32(width / feat_w)
    cy = (np.arange(feat_h, dtype=np.float32) * stride_y + np.float32(center_offset) * stride_y)[:, None]
    cx = (np.arange(feat_w, dtype=np.float32) * stride_x + np.float32(center_offset) * stride_x)[None, :]
    boxes = []
    for scale in range(num_scales):
        for index, ratio in enumerate(aspect_ratios):
            base = anchor_size * 2**level * 2 ** (scale / num_scales)
            if truncate_sizes:
                base = float(math.floor(base))
            multiplier_x, multiplier_y = aspect_multipliers[index] if aspect_multipliers else (ratio**0.5, ratio**-0.5)
            half_w = base * multiplier_x / 2.0
            half_h = base * multiplier_y / 2.0
            if round_base:  # torchvision rounds its float32 base anchor (half to even, as np.round)
                half_w, half_h = float(np.round(np.float32(half_w))), float(np.round(np.float32(half_h)))
            boxes.append(np.stack(np.broadcast_arrays(cy - half_h, cx - half_w, cy + half_h, cx + half_w), -1))
    return np.concatenate(boxes, axis=-1).astype(np.float32)


def _plus_one_level_anchors(
    level: int,
    num_scales: int,
    aspect_ratios: Sequence[float],
    anchor_size: float,
    image_size: tuple[int, int],
    stride: int | None,
) -> np.ndarray:
    """mmdetection v1 ``AnchorGenerator(base_size=stride, scales, ratios).grid_anchors`` in our order and frame."""
    height, width = image_size
    stride = 2**level if stride is None else stride
    feat_h, feat_w = math.ceil(height / stride), math.ceil(width / stride)
    f32 = np.float32
    # mmdetection's arithmetic, in its order and in float32: ratios are h / w there (ours w / h).
    scales = np.array([anchor_size * 2 ** (scale / num_scales) for scale in range(num_scales)], f32)
    h_ratios = np.sqrt(np.array([1.0 / ratio for ratio in aspect_ratios], f32))
    w_ratios = f32(1.0) / h_ratios
    center = f32(0.5) * (f32(stride) - f32(1.0))
    shift_y = (np.arange(feat_h, dtype=f32) * f32(stride))[:, None]
    shift_x = (np.arange(feat_w, dtype=f32) * f32(stride))[None, :]
    boxes = []
    for scale in scales:  # our order: scale-major, then aspect ratio
        for w_ratio, h_ratio in zip(w_ratios, h_ratios, strict=True):
            w, h = f32(stride) * w_ratio * scale, f32(stride) * h_ratio * scale
            x1, x2 = np.round(center - f32(0.5) * (w - f32(1.0))), np.round(center + f32(0.5) * (w - f32(1.0)))
            y1, y2 = np.round(center - f32(0.5) * (h - f32(1.0))), np.round(center + f32(0.5) * (h - f32(1.0)))
            corners = (shift_y + y1, shift_x + x1, shift_y + y2 + f32(1.0), shift_x + x2 + f32(1.0))
            boxes.append(np.stack(np.broadcast_arrays(*corners), -1))
    return np.concatenate(boxes, axis=-1).astype(np.float32)


def multilevel_anchors(
    min_level: int,
    max_level: int,
    num_scales: int,
    aspect_ratios: Sequence[float],
    anchor_size: float,
    image_size: tuple[int, int],
    *,
    center_offset: float = 0.5,
    round_base: bool = False,
    integer_stride: bool = False,
    truncate_sizes: bool = False,
    plus_one_rounding: bool = False,
    aspect_multipliers: Sequence[Sequence[float]] = (),
) -> dict[int, np.ndarray]:
    """{level: [H_l, W_l, A * 4]} for levels min..max (options as in :func:`level_anchors`)."""
    options = {
        "center_offset": center_offset,
        "round_base": round_base,
        "integer_stride": integer_stride,
        "truncate_sizes": truncate_sizes,
        "plus_one_rounding": plus_one_rounding,
        "aspect_multipliers": aspect_multipliers,
    }
    return {
        level: level_anchors(level, num_scales, aspect_ratios, anchor_size, image_size, **options)
        for level in range(min_level, max_level + 1)
    }


def flatten_levels(per_level: dict[int, np.ndarray], size: int = 4) -> np.ndarray:
    """Concatenates {level: [..., H, W, A * size]} into [..., N, size] in level order."""
    parts = [v.reshape(v.shape[:-3] + (-1, size)) for _, v in sorted(per_level.items())]
    return np.concatenate(parts, axis=-2)
