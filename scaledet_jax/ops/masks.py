"""Mask R-CNN mask ops: training targets and loss (JAX), pasting and RLE encoding for evaluation (NumPy).

* :func:`crop_masks_in_target_boxes` makes the mask targets: each ground-truth mask, already cropped to its
  own box and resized to ``K x K``, is resampled inside a RoI. Model Garden's
  ``spatial_transform_ops.crop_mask_in_target_box`` number for number (2-pixel zero border, its
  box transform, clamped bilinear sampling at ``(i + sample_offset) / output_size``).
* :func:`mask_loss` is the per-pixel sigmoid cross-entropy of each RoI's class channel, with
  torchvision's (mean over the valid RoIs' pixels) or Model Garden's (sum / (weighted pixels + 0.01))
  reduction.
* :func:`paste_masks` is torchvision's ``paste_masks_in_image`` (followed by ``> threshold``) on the
  host: masks resized into their (expanded, integer) boxes in original-image pixels.
* :func:`encode_masks` turns binary masks into COCO RLE dicts (pycocotools) that ``json.dump`` accepts.

Boxes are [ymin, xmin, ymax, xmax] pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_EPSILON = 1e-8  # Model Garden's spatial_transform_ops._EPSILON
_MASK_PAD = 2  # Model Garden pads the cropped masks with 2 zero pixels on each side
# torch's CPU bilinear resize takes its "vectorized" kernel (four-term weighted sum) when the output's
# height + width is at most this, and its generic separable kernel otherwise; the two round differently.
_TORCH_SMALL_OUTPUT = 128


def _axis_grid(start: Array, size: Array, boundary: int, output_size: int, sample_offset: float):
    """Model Garden's ``_compute_grid_positions`` along one axis.

    ``start``/``size`` [L] in padded-mask pixels -> (low, high) int32 [L, P] and their weights [L, P]. The
    lower neighbour is ``floor`` clamped to [0, boundary] and the weights are taken from that clamped
    index (so they extrapolate outside the map, onto the zero border, like Model Garden's).
    """
    steps = jnp.arange(output_size, dtype=jnp.float32) + jnp.float32(sample_offset)
    # XLA turns a division by a constant into a multiplication by its (inexact) reciprocal, which moves the
    # samples by an ulp (amplified when a RoI is much larger than its gt box); a full-shaped divisor behind an
    # optimization barrier keeps Model Garden's true division.
    divisor = jax.lax.optimization_barrier(jnp.full((start.shape[0], output_size), output_size, jnp.float32))
    coord = start[:, None] + steps[None, :] * size[:, None] / divisor
    low = jnp.minimum(jnp.maximum(jnp.floor(coord), 0.0), float(boundary))
    high = jnp.minimum(low + 1.0, float(boundary))
    frac = coord - low
    return low.astype(jnp.int32), high.astype(jnp.int32), 1.0 - frac, frac


def crop_masks_in_target_boxes(
    masks: Array,
    mask_boxes: Array,
    target_boxes: Array,
    output_size: int = 28,
    sample_offset: float = 0.5,
) -> Array:
    """Resamples each mask inside its target box: ``[..., N, K, K]`` -> ``[..., N, output_size, output_size]``.

    ``masks`` [..., N, K, K]: each instance mask cropped to ``mask_boxes`` [..., N, 4] and resized to K x K;
    ``target_boxes`` [..., N, 4]: the RoIs (same frame as ``mask_boxes``). Model Garden's
    ``crop_mask_in_target_box``: the masks get a 2-pixel zero border, the RoI is mapped into the padded
    mask's pixels (``(roi_min - box_min) * K / (box_size + 1e-8) + 2``, size ``roi_size * K / (box_size +
    1e-8)``; Model Garden multiplies both offsets by the mask height and both sizes by the mask width, which
    only matters for non-square masks, and so does this), then ``output_size**2`` bilinear samples at
    ``start + (i + sample_offset) * size / output_size``; the lower neighbour is ``floor`` clamped to the
    padded mask and the weights come from that clamped index. Degenerate boxes are not special-cased (a zero-size
    gt box reads one pixel, like Model Garden); mask the invalid rows downstream. Float32; for targets, so no
    care is taken over gradients.
    """
    masks = jnp.asarray(masks, jnp.float32)
    mask_boxes = jnp.asarray(mask_boxes, jnp.float32)
    target_boxes = jnp.asarray(target_boxes, jnp.float32)
    *lead, num, height, width = masks.shape
    if mask_boxes.shape != (*lead, num, 4) or target_boxes.shape != (*lead, num, 4):
        raise ValueError(
            f"masks {masks.shape} need mask_boxes and target_boxes of shape {(*lead, num, 4)}, "
            f"got {mask_boxes.shape} and {target_boxes.shape}."
        )
    count = int(np.prod(lead, dtype=np.int64)) * num
    padded_h, padded_w = height + 2 * _MASK_PAD, width + 2 * _MASK_PAD
    padded = jnp.pad(masks.reshape(count, height, width), ((0, 0), (_MASK_PAD, _MASK_PAD), (_MASK_PAD, _MASK_PAD)))
    gy0, gx0, gy1, gx1 = (mask_boxes.reshape(count, 4)[:, k] for k in range(4))
    by0, bx0, by1, bx1 = (target_boxes.reshape(count, 4)[:, k] for k in range(4))
    # Same expressions (and evaluation order) as Model Garden, including its use of `height` for x.
    y_start = (by0 - gy0) * height / (gy1 - gy0 + _EPSILON) + _MASK_PAD
    x_start = (bx0 - gx0) * height / (gx1 - gx0 + _EPSILON) + _MASK_PAD
    y_size = (by1 - by0) * width / (gy1 - gy0 + _EPSILON)
    x_size = (bx1 - bx0) * width / (gx1 - gx0 + _EPSILON)
    y0, y1, wy0, wy1 = _axis_grid(y_start, y_size, padded_h - 1, output_size, sample_offset)
    x0, x1, wx0, wx1 = _axis_grid(x_start, x_size, padded_w - 1, output_size, sample_offset)

    flat = padded.reshape(count, padded_h * padded_w)

    def gather(rows: Array, cols: Array) -> Array:
        index = (rows[:, :, None] * padded_w + cols[:, None, :]).reshape(count, output_size * output_size)
        return jnp.take_along_axis(flat, index, axis=1).reshape(count, output_size, output_size)

    # Interpolate along y first, then x (the order of Model Garden's einsum gather).
    col0 = wy0[:, :, None] * gather(y0, x0) + wy1[:, :, None] * gather(y1, x0)
    col1 = wy0[:, :, None] * gather(y0, x1) + wy1[:, :, None] * gather(y1, x1)
    out = wx0[:, None, :] * col0 + wx1[:, None, :] * col1
    return out.reshape(*lead, num, output_size, output_size)


def mask_loss(
    mask_logits: Array,
    classes: Array,
    targets: Array,
    valid: Array,
    style: str = "torchvision",
) -> Array:
    """Mask R-CNN mask loss: sigmoid cross-entropy of each RoI's class channel against its target.

    ``mask_logits`` [B, R, S, S, C]; ``classes`` [B, R] int (class of the RoI's matched gt; its channel is
    scored; clipped to [0, C - 1]); ``targets`` [B, R, S, S] in [0, 1]; ``valid`` [B, R] bool (the RoIs that get
    a mask loss). Computed in float32.

    * ``'torchvision'``: mean over the pixels of the valid RoIs (``roi_heads.maskrcnn_loss``); 0 when there
      is none.
    * ``'model_garden'``: ``MaskrcnnLoss``: the sum over the pixels of RoIs that are valid and of class > 0,
      divided by (their pixel count + 0.01).

    Both reduce over the whole (global) batch; a sharded batch gives the global loss.
    """
    if style not in ("torchvision", "model_garden"):
        raise ValueError(f"style must be 'torchvision' or 'model_garden', got {style!r}.")
    mask_logits = jnp.asarray(mask_logits)
    batch, rois, size_y, size_x, num_classes = mask_logits.shape
    classes = jnp.clip(jnp.asarray(classes, jnp.int32), 0, num_classes - 1)
    index = jnp.broadcast_to(classes[:, :, None, None, None], (batch, rois, size_y, size_x, 1))
    logits = jnp.take_along_axis(mask_logits, index, axis=-1)[..., 0].astype(jnp.float32)
    weights = jnp.asarray(valid, bool)
    if style == "model_garden":
        weights = weights & (classes > 0)
    # Ignored RoIs may hold anything (even inf/NaN): they are replaced before the loss, not just masked after
    # it, so that neither the loss nor its gradient sees them.
    keep = weights[:, :, None, None]
    logits = jnp.where(keep, logits, 0.0)
    targets = jnp.where(keep, jnp.asarray(targets, jnp.float32), 0.0)
    cross_entropy = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    total = jnp.sum(jnp.where(keep, cross_entropy, 0.0))
    count = jnp.sum(weights.astype(jnp.float32)) * (size_y * size_x)
    if style == "model_garden":
        return total / (count + 0.01)
    return total / jnp.maximum(count, 1.0)


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add ``a * b + c`` (one rounding), through float64.

    The float32 product is exact in float64; the sum is rounded twice (to float64, then float32), which can
    differ from one rounding only when the first rounding lands exactly halfway between two float32 values.
    """
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _torch_resize_axis(in_size: int, out_size: int, positions: np.ndarray):
    """torch's CPU bilinear (``align_corners=False``, float32) source indices and weights for output ``positions``.

    Returns (index0, index1, lambda0, lambda1): the source is ``in/out * (dst + 0.5) - 0.5`` (one fused
    multiply-add, as torch's x86-64 kernels are compiled) clamped below at 0, ``index0 = min(floor(src), in - 1)``,
    ``index1 = index0 + 1`` unless at the last pixel, ``lambda1 = src - index0``. Equal sizes copy.
    """
    if in_size == out_size:
        return positions, positions, np.ones(positions.shape, np.float32), np.zeros(positions.shape, np.float32)
    scale = np.full(positions.shape, np.float32(in_size) / np.float32(out_size), np.float32)
    src = _fma(scale, positions.astype(np.float32) + np.float32(0.5), np.full(positions.shape, -0.5, np.float32))
    src = np.maximum(src, np.float32(0.0))
    index0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lambda1 = np.clip(src - index0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    index1 = np.where(index0 < in_size - 1, index0 + 1, index0)
    return index0, index1, np.float32(1.0) - lambda1, lambda1


def _resize_bilinear(mask: np.ndarray, out_h: int, out_w: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Rows ``rows`` and columns ``cols`` of ``F.interpolate(mask, (out_h, out_w), 'bilinear', align_corners=False)``.

    ``mask`` [L, L] float32. Bit for bit torch's x86-64 CPU kernels (AVX2/AVX512 builds): for
    ``out_h + out_w <= 128`` its "vectorized" kernel, a weighted sum of the four neighbours with weights h * w,
    summed (as compiled) from the (0, 1) term with fused multiply-adds of the (0, 0), (1, 0) and (1, 1) terms;
    otherwise its generic kernel, which interpolates along x and then combines the two rows, each two-term sum
    ``t0 * w0 + t1 * w1`` compiled as ``fma(t0, w0, t1 * w1)``. torch's portable (no-FMA) kernels can differ
    in the last bit.
    """
    length_h, length_w = mask.shape
    ry0, ry1, ly0, ly1 = _torch_resize_axis(length_h, out_h, rows)
    rx0, rx1, lx0, lx1 = _torch_resize_axis(length_w, out_w, cols)
    if out_h + out_w <= _TORCH_SMALL_OUTPUT:
        wy0, wy1 = ly0[:, None], ly1[:, None]
        value = mask[np.ix_(ry0, rx1)] * (wy0 * lx1)
        value = _fma(mask[np.ix_(ry0, rx0)], wy0 * lx0, value)
        value = _fma(mask[np.ix_(ry1, rx0)], wy1 * lx0, value)
        return _fma(mask[np.ix_(ry1, rx1)], wy1 * lx1, value)
    along_x = _fma(mask[:, rx0], lx0, mask[:, rx1] * lx1)  # [L, len(cols)]
    return _fma(along_x[ry0], ly0[:, None], along_x[ry1] * ly1[:, None])


def _expanded_int_boxes(boxes: np.ndarray, scale: float) -> np.ndarray:
    """torchvision's ``expand_boxes`` in float32, then ``.to(int64)`` (truncation): [N, 4] (x0, y0, x1, y1)."""
    ymin, xmin, ymax, xmax = (boxes[:, k] for k in range(4))
    half = np.float32(0.5)
    scale = np.float32(scale)
    w_half = (xmax - xmin) * half * scale
    h_half = (ymax - ymin) * half * scale
    x_c = (xmax + xmin) * half
    y_c = (ymax + ymin) * half
    expanded = np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)
    return np.trunc(expanded).astype(np.int64)


def paste_masks(
    probabilities: np.ndarray,
    boxes: np.ndarray,
    height: int,
    width: int,
    threshold: float = 0.5,
    padding: int = 1,
) -> np.ndarray:
    """Pastes ``[N, M, M]`` mask probabilities into their boxes of an image: bool ``[N, height, width]``.

    ``boxes`` [N, 4] in original-image pixels. torchvision's ``paste_masks_in_image(...) > threshold``: the
    mask gets a ``padding``-pixel zero border and the box is scaled by ``(M + 2 * padding) / M`` about its
    centre (so the padded mask covers it), truncated to integers; the mask is resized bilinearly
    (``F.interpolate``, ``align_corners=False``) to ``(y1 - y0 + 1) x (x1 - x0 + 1)`` (at least 1) pixels and
    the part inside the image is pasted (only that part is computed). The resized values are bit for bit
    those of torch's x86-64 CPU kernels (see :func:`_resize_bilinear`), so even values at exactly ``threshold``
    are decided the same way.
    """
    probabilities = np.asarray(probabilities, np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if probabilities.ndim != 3:
        raise ValueError(f"expected [N, M, M] mask probabilities, got shape {probabilities.shape}.")
    num = probabilities.shape[0]
    if boxes.shape[0] != num:
        raise ValueError(f"{num} masks but {boxes.shape[0]} boxes.")
    out = np.zeros((num, height, width), bool)
    if num == 0:
        return out
    size = probabilities.shape[-1]
    padded = np.pad(probabilities, ((0, 0), (padding, padding), (padding, padding)))
    length = size + 2 * padding
    int_boxes = _expanded_int_boxes(boxes, float(length) / size)
    threshold = np.float32(threshold)
    for i, (bx0, by0, bx1, by1) in enumerate(int_boxes.tolist()):
        box_w = max(bx1 - bx0 + 1, 1)
        box_h = max(by1 - by0 + 1, 1)
        x_0, x_1 = max(bx0, 0), min(bx1 + 1, width)
        y_0, y_1 = max(by0, 0), min(by1 + 1, height)
        if x_1 <= x_0 or y_1 <= y_0:
            continue
        rows, cols = np.arange(y_0 - by0, y_1 - by0), np.arange(x_0 - bx0, x_1 - bx0)
        value = _resize_bilinear(padded[i], box_h, box_w, rows, cols)
        out[i, y_0:y_1, x_0:x_1] = value > threshold
    return out


def encode_masks(binary: np.ndarray) -> list[dict]:
    """COCO RLE of each ``[N, H, W]`` binary mask: ``{'size': [H, W], 'counts': str}`` (JSON-ready)."""
    from pycocotools import mask as mask_utils

    binary = np.asarray(binary)
    if binary.ndim != 3:
        raise ValueError(f"expected [N, H, W] masks, got shape {binary.shape}.")
    if binary.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def paste_masks_mmdet(probabilities: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float = 0.5):
    """mmdetection v1's ``FCNMaskHead.get_seg_masks`` (``rescale=True``): bool ``[N, height, width]``.

    ``boxes`` [N, 4] (y1, x1, y2, x2) in original pixels, "+1" boxes with exclusive corners (mmdetection's
    inclusive ``x2`` is ``x2 - 1`` here). Each box is truncated to integers (``astype(np.int32)``), its
    probabilities resized with OpenCV bilinear (``mmcv.imresize``) to ``(x2 - x1 + 1) x (y2 - y1 + 1)`` (at
    least 1) pixels, thresholded (> ``threshold``) and placed at the box's corner; what falls outside the image
    is dropped.
    """
    import cv2

    out = np.zeros((len(probabilities), height, width), bool)
    for i, (probability, box) in enumerate(zip(np.asarray(probabilities), np.asarray(boxes, np.float64), strict=True)):
        y1, x1, y2, x2 = (box - np.array([0.0, 0.0, 1.0, 1.0])).astype(np.int32)
        w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        mask = (
            cv2.resize(np.ascontiguousarray(probability), (int(w), int(h)), interpolation=cv2.INTER_LINEAR) > threshold
        )
        top, left = max(y1, 0), max(x1, 0)
        bottom, right = min(y1 + h, height), min(x1 + w, width)
        if bottom > top and right > left:
            out[i, top:bottom, left:right] = mask[top - y1 : bottom - y1, left - x1 : right - x1]
    return out
