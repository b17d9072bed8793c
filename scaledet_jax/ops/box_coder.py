"""Box encoding relative to anchors (the Faster R-CNN / RetinaNet coder of TF Model Garden).

Boxes and anchors are [..., 4] as [ymin, xmin, ymax, xmax]; codes are [ty, tx, th, tw], optionally
multiplied by per-coordinate ``weights`` (None for RetinaNet, (10, 10, 5, 5) for Faster R-CNN).
Works on NumPy and jax arrays alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

EPSILON = 1e-8  # added to sizes when encoding, as the TF coder does
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)  # largest log-scale change accepted when decoding


def _center_size(boxes):
    ymin, xmin, ymax, xmax = (boxes[..., i] for i in range(4))
    h, w = ymax - ymin, xmax - xmin
    return ymin + 0.5 * h, xmin + 0.5 * w, h, w


def encode_boxes(boxes, anchors, weights: Sequence[float] | None = None):
    """Encodes ``boxes`` against ``anchors`` (broadcastable) into [ty, tx, th, tw]."""
    yc, xc, h, w = _center_size(boxes)
    yca, xca, ha, wa = _center_size(anchors)
    ha, wa, h, w = ha + EPSILON, wa + EPSILON, h + EPSILON, w + EPSILON
    codes = [(yc - yca) / ha, (xc - xca) / wa, jnp.log(h / ha), jnp.log(w / wa)]
    if weights is not None:
        codes = [c * wt for c, wt in zip(codes, weights, strict=True)]
    return jnp.stack(codes, axis=-1)


LOG_SIZE_CLIPS = ("max", "both", "none")


def decode_boxes(codes, anchors, weights: Sequence[float] | None = None, log_size_clip: str = "max"):
    """Inverse of :func:`encode_boxes`. ``log_size_clip``: how the log-size changes are limited to
    log(1000 / 16): ``max`` from above (Model Garden, torchvision, Detectron), ``both`` to +-log(1000 / 16)
    (mmdetection v1's ``delta2bbox``), ``none`` not at all (automl / effdet)."""
    ty, tx, th, tw = (codes[..., i] for i in range(4))
    if weights is not None:
        ty, tx, th, tw = ty / weights[0], tx / weights[1], th / weights[2], tw / weights[3]
    if log_size_clip == "max":
        th, tw = jnp.minimum(th, BBOX_XFORM_CLIP), jnp.minimum(tw, BBOX_XFORM_CLIP)
    elif log_size_clip == "both":
        th, tw = jnp.clip(th, -BBOX_XFORM_CLIP, BBOX_XFORM_CLIP), jnp.clip(tw, -BBOX_XFORM_CLIP, BBOX_XFORM_CLIP)
    elif log_size_clip != "none":
        raise ValueError(f"log_size_clip must be one of {LOG_SIZE_CLIPS}, got {log_size_clip!r}")
    yca, xca, ha, wa = _center_size(anchors)
    yc, xc = ty * ha + yca, tx * wa + xca
    h, w = jnp.exp(th) * ha, jnp.exp(tw) * wa
    ymin, xmin = yc - 0.5 * h, xc - 0.5 * w
    if log_size_clip == "none":  # automl / effdet: centre +- half size, so an infinite size gives -inf, +inf, not nan
        return jnp.stack([ymin, xmin, yc + 0.5 * h, xc + 0.5 * w], axis=-1)
    return jnp.stack([ymin, xmin, ymin + h, xmin + w], axis=-1)
