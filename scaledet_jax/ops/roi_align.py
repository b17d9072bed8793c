"""RoIAlign (Mask R-CNN) and its multilevel FPN form, with torchvision's semantics.

``roi_align`` follows ``torchvision.ops.roi_align`` (its C++/CUDA kernel) number for number: the box
is scaled by ``spatial_scale`` (and shifted by -0.5 when ``aligned``), its size is clamped to >= 1
when not ``aligned``, each of the ``output_size**2`` bins averages ``sampling_ratio**2`` bilinear
samples at ``start + (p + (i + 0.5) / s) * bin``; a sample with y < -1 or y > H (or the same in x)
contributes 0, coordinates <= 0 read row/column 0 and coordinates past the last pixel read the last
one. ``multilevel_roi_align`` is torchvision's ``MultiScaleRoIAlign``: each RoI is pooled from the
FPN level given by the FPN paper's eq. 1 (``assign_levels``, torchvision's ``LevelMapper``).

Sampling is separable: per RoI we compute the sample rows and columns, their two bilinear neighbours
and weights (``[P, 2s]`` per axis, validity folded in). Each output value is then a weighted sum of
``(2s)**2`` neighbour pixels, computed as ``(2s)**2`` gathers of ``[N, P, P, C]`` (all C channels of a
pixel at once) times their weights; XLA fuses the sum into one loop, so the forward pass materialises
nothing bigger than its output. The multilevel version flattens all levels into one
``[B * sum(H_l * W_l), C]`` table and gathers each RoI from its own level with per-RoI offsets and
strides, so the same gathers serve all levels (no pass per level). Gradients w.r.t. the features
come from JAX autodiff (a scatter-add with the same weights, i.e. torchvision's backward); the
scatter's updates are ``(2s)**2`` times the output, so RoIs are processed in chunks
(``jax.lax.map``) to bound them. Boxes get the derivative of the bilinear weights (torchvision gives
none: stop the gradient of proposals, as torchvision and Model Garden do).

``style='model_garden'`` gives TF Model Garden's ``multilevel_crop_and_resize`` instead (Mask R-CNN
SpineNet / ResNet-FPN there): level ``floor(log(sqrt(wh) / 224) / log 2) + 4`` (no epsilon), no
minimum RoI size, one bilinear sample per bin at ``start + (p + 0.5) * size / P``, and its border
rule: the lower neighbour index is clamped to ``[0, H_l - 1]`` and the weights are taken from the
clamped index, so samples above/left of the map extrapolate linearly from its first two rows and
samples past its end read the last row with weight ``1 + d`` (no zero region).

``style='mmdet'`` gives mmdetection v1's ``SingleRoIExtractor`` + RoIAlign (the SpineNet seed's Mask
R-CNN): level ``floor(log2(sqrt((w + 1)(h + 1)) / finest + 1e-6))`` above the lowest level (``finest``
= ``canonical_size``, 56 there), the RoI end at ``(x2 + 1) * scale`` and its size clamped at 0 instead
of 1; sampling as torchvision's.

``style='maskrcnn_benchmark'`` gives maskrcnn-benchmark's ``Pooler`` (Detectron's FPN RoI levels): level
``floor(canonical_level + log2(sqrt((w + 1)(h + 1)) / canonical_size + 1e-6))`` (``BoxList.area()`` counts
inclusive pixels, and the epsilon sits inside the log); sampling as torchvision's (its legacy ROIAlign kernel
is ``aligned=False``).

``style='jwyang_avg'`` gives ``RoIAlignAvg`` of jwyang/faster-rcnn.pytorch (``lib/model/roi_align``), which
guoruoqian/DetNet_pytorch (POOLING_MODE 'align') and jwyang/fpn.pytorch pool with: a ``(P + 1) x (P + 1)``
grid of single bilinear samples, then a 2x2 stride-1 average pool -> ``P x P``. Its CUDA kernel
(``roi_align_kernel.cu``, the only implementation it has): start ``x1 * scale``, extent ``max(x2 * scale -
x1 * scale + 1, 0)`` (the +1 in feature pixels, after scaling), grid point ``i`` at ``start + i * extent / P``
(so the grid spans ``[x1 * scale, x2 * scale + 1]``); a point with y < 0 or y >= H (or the same in x) reads
0; the lower neighbour index is ``min(floor(y), H - 2)``, so points in ``[H - 1, H)`` extrapolate linearly
from the last two rows. Level (``jwyang_levels``, DetNet_pytorch's ``_PyramidRoI_Feat``): ``floor(4 +
log2(sqrt((w + 1)(h + 1)) / 224))`` clamped to the levels (no epsilon). Its spatial scale is the map height
over the (padded) input height, ``H_l / S``, which is not ``1 / stride`` when ``S`` is not a multiple of the
stride: pass ``spatial_scales``. ``sampling_ratio`` and ``aligned`` are unused. (The kernel reads outside its
map when H or W is 1; here both neighbours are then the single row.)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

STYLES = ("torchvision", "model_garden", "mmdet", "maskrcnn_benchmark", "jwyang_avg")  # module docstring

# Default bound on one chunk's gradient updates ((2s)**2 terms per output value). On CPU small chunks keep
# them in cache: at the benchmark load (1024 RoIs, C=256, P=7, s=2) 2..32 RoIs per chunk were equally fast,
# and no chunking was 4x slower with 1.2 GiB of temporaries. Accelerators need large chunks to fill them.
CHUNK_BYTES_CPU = 16 * 2**20
CHUNK_BYTES_ACCELERATOR = 512 * 2**20


def assign_levels(
    boxes: Array,
    min_level: int,
    max_level: int,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> Array:
    """FPN level of each box (``[..., 4]`` [ymin, xmin, ymax, xmax] pixels) as int32 ``[...]``.

    ``floor(canonical_level + log2(sqrt(h * w) / canonical_size) + eps)`` clamped to
    ``[min_level, max_level]`` (torchvision's ``LevelMapper``, FPN paper eq. 1). Boxes with a
    negative area (inverted) count as area 0, i.e. ``min_level`` (torchvision would produce NaN).
    """
    boxes = jnp.asarray(boxes)
    boxes = boxes.astype(coordinate_dtype(boxes))
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    scale = jnp.sqrt(jnp.maximum(area, 0.0))
    level = jnp.floor(canonical_level + jnp.log2(scale / canonical_size) + jnp.asarray(eps, boxes.dtype))
    return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def model_garden_levels(boxes: Array, min_level: int, max_level: int) -> Array:
    """Model Garden's level rule: ``floor(log(sqrt(h * w) / 224) / log(2)) + 4`` clamped (area 0: ``min_level``)."""
    boxes = boxes.astype(coordinate_dtype(boxes))
    root = jnp.sqrt((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))
    level = jnp.floor(jnp.log(root / 224.0) / jnp.log(jnp.asarray(2.0, boxes.dtype))) + 4.0
    level = jnp.where(root > 0, level, min_level)  # log(0) = -inf; divide_no_nan gives 0 -> -inf too
    return jnp.clip(jnp.nan_to_num(level, nan=min_level), min_level, max_level).astype(jnp.int32)


def mmdet_levels(boxes: Array, num_levels: int, finest_scale: float = 56.0) -> Array:
    """mmdetection v1's ``SingleRoIExtractor.map_roi_levels``: index ``floor(log2(sqrt((w + 1)(h + 1)) /
    finest_scale + 1e-6))`` into the levels, clamped to ``[0, num_levels - 1]``."""
    boxes = boxes.astype(coordinate_dtype(boxes))
    scale = jnp.sqrt((boxes[..., 2] - boxes[..., 0] + 1.0) * (boxes[..., 3] - boxes[..., 1] + 1.0))
    level = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
    return jnp.clip(jnp.nan_to_num(level, nan=0.0), 0, num_levels - 1).astype(jnp.int32)


def maskrcnn_benchmark_levels(
    boxes: Array, min_level: int, max_level: int, canonical_size: float = 224.0, canonical_level: int = 4
) -> Array:
    """maskrcnn-benchmark's ``LevelMapper``: ``floor(canonical_level + log2(sqrt((w + 1)(h + 1)) / canonical_size
    + 1e-6))`` clamped to ``[min_level, max_level]``."""
    boxes = boxes.astype(coordinate_dtype(boxes))
    area = (boxes[..., 2] - boxes[..., 0] + 1.0) * (boxes[..., 3] - boxes[..., 1] + 1.0)
    scale = jnp.sqrt(jnp.maximum(area, 0.0))
    level = jnp.floor(canonical_level + jnp.log2(scale / canonical_size + jnp.asarray(1e-6, boxes.dtype)))
    return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def jwyang_levels(
    boxes: Array, min_level: int, max_level: int, canonical_size: float = 224.0, canonical_level: int = 4
) -> Array:
    """DetNet_pytorch's ``_PyramidRoI_Feat`` level: ``floor(log(sqrt((h + 1)(w + 1)) / canonical_size) / log(2) +
    canonical_level)`` clamped to ``[min_level, max_level]``, in its operation order; inverted boxes (NaN) get
    ``min_level``."""
    boxes = boxes.astype(coordinate_dtype(boxes))
    dtype = boxes.dtype
    root = jnp.sqrt((boxes[..., 2] - boxes[..., 0] + 1.0) * (boxes[..., 3] - boxes[..., 1] + 1.0))
    # True divisions, as the seed's: XLA would turn a division by a constant into an (inexact) reciprocal multiply.
    size, log2 = jax.lax.optimization_barrier(
        (jnp.full(root.shape, canonical_size, dtype), jnp.full(root.shape, math.log(2.0), dtype))
    )
    level = jnp.floor(jnp.log(root / size) / log2 + canonical_level)
    return jnp.clip(jnp.nan_to_num(level, nan=min_level), min_level, max_level).astype(jnp.int32)


def coordinate_dtype(boxes: Array) -> jnp.dtype:
    """Sample coordinates and bilinear weights are computed in float32 (torchvision's float32 kernel,
    rounding for rounding), or in float64 for float64 boxes (x64 parity checks against a double model)."""
    return jnp.dtype(jnp.float64) if boxes.dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _rounded(product: Array) -> Array:
    """``product`` rounded on its own before it is added to anything (torchvision's two roundings).

    XLA's CPU and GPU code generators contract a multiplication feeding an addition into a fused multiply-add
    (one rounding), which moves sample coordinates by an ulp; an identity select in between prevents that
    (an optimization barrier does not: it is removed before fusion).
    """
    return jnp.where(jnp.isnan(product), jnp.nan, product)


def _axis_samples(start: Array, size: Array, length: Array, output_size: int, sampling_ratio: int):
    """Neighbour indices and weights along one axis: both ``[N, P, s, 2]`` (int32, coordinate dtype).

    ``start``/``size``: ``[N]`` RoI start and extent in feature pixels; ``length``: ``[N]`` feature
    size along the axis. Weights include the validity of the sample along this axis; the product of
    the y and x validities is the torchvision "sample inside [-1, H] x [-1, W]" rule.
    """
    # torchvision divides by the bin count and the sampling ratio. XLA turns a division by a constant or a
    # broadcast scalar into a multiplication by its (inexact) reciprocal, moving samples by an ulp, so the
    # divisors are full-shaped arrays hidden behind an optimization barrier.
    dtype = start.dtype
    p = jnp.arange(output_size, dtype=dtype)[:, None]
    i = jnp.arange(sampling_ratio, dtype=dtype)[None, :]
    shape = (start.shape[0], output_size, sampling_ratio)
    bin_count, ratio = jax.lax.optimization_barrier(
        (jnp.full(start.shape, output_size, dtype), jnp.full(shape, sampling_ratio, dtype))
    )
    bin_size = (size / bin_count)[:, None, None]
    start, length = start[:, None, None], length[:, None, None]
    # Same operation order and roundings as torchvision's kernel: start + p * bin + (i + .5) * bin / s.
    coord = start + _rounded(p * bin_size) + (i + 0.5) * bin_size / ratio
    lengthf = length.astype(dtype)
    valid = (coord >= -1.0) & (coord <= lengthf)
    # Clamp to [0, length - 1]: below 0 reads pixel 0; at or past the last pixel reads the last one with
    # weight 1 (torchvision's y_low = y_high = H - 1). Invalid (or NaN) samples point at pixel 0.
    coord = jnp.where(valid, jnp.clip(coord, 0.0, lengthf - 1.0), 0.0)
    low = jnp.floor(coord).astype(jnp.int32)
    high = jnp.minimum(low + 1, length - 1)
    frac = coord - low.astype(dtype)
    weights = jnp.stack([1.0 - frac, frac], axis=-1) * valid[..., None]
    return jnp.stack([low, high], axis=-1), weights


def _model_garden_axis_samples(start: Array, size: Array, length: Array, output_size: int):
    """Model Garden's ``_compute_grid_positions`` along one axis: ``[N, P, 1, 2]`` indices and weights."""
    dtype = start.dtype
    p = jnp.arange(output_size, dtype=dtype)
    divisor = jax.lax.optimization_barrier(jnp.full((start.shape[0], output_size), output_size, dtype))
    grid = start[:, None] + (p + 0.5) * size[:, None] / divisor
    last = (length - 1).astype(dtype)[:, None]
    low = jnp.minimum(jnp.maximum(jnp.floor(grid), 0.0), last)
    high = jnp.minimum(low + 1.0, last)
    frac = grid - low
    indices = jnp.stack([low, high], axis=-1).astype(jnp.int32)[:, :, None, :]
    return indices, jnp.stack([1.0 - frac, frac], axis=-1)[:, :, None, :]


def _jwyang_axis_samples(start: Array, size: Array, length: Array, output_size: int):
    """RoIAlignAvg's ``P + 1`` grid points along one axis: ``[N, P + 1, 1, 2]`` neighbour indices and weights.

    ``start``/``size``: ``[N]`` the kernel's ``roi_start`` and ``roi_width`` (feature pixels); weights include
    the point's validity (0 <= y < length) along this axis.
    """
    dtype = start.dtype
    divisor = jax.lax.optimization_barrier(jnp.full(start.shape, output_size, dtype))  # a true division
    bin_size = (size / divisor)[:, None]
    i = jnp.arange(output_size + 1, dtype=dtype)[None, :]
    coord = start[:, None] + i * bin_size  # the kernel's ph * bin + start (nvcc contracts it into an FMA, as XLA)
    lengthf = length.astype(dtype)[:, None]
    valid = (coord >= 0.0) & (coord < lengthf)  # NaN: invalid
    coord = jnp.where(valid, coord, 0.0)
    # The kernel's min(floor(y), H - 2): points in [H - 1, H) get a weight > 1 on the last row (extrapolation).
    low = jnp.minimum(jnp.floor(coord), jnp.maximum(lengthf - 2.0, 0.0))
    high = jnp.minimum(low + 1.0, lengthf - 1.0)
    frac = coord - low
    weights = jnp.stack([1.0 - frac, frac], axis=-1) * valid[..., None]
    indices = jnp.stack([low, high], axis=-1).astype(jnp.int32)
    return indices[:, :, None, :], weights[:, :, None, :]


def _pool_chunk(table, boxes, base, height, width, scale, output_size, sampling_ratio, aligned, style="torchvision"):
    """RoIAlign of ``N`` RoIs gathered from ``table`` [M, C] -> ``[N, P, P, C]``.

    ``boxes`` [N, 4] pixels (ymin, xmin, ymax, xmax); ``base`` [N] int32 row of the RoI's (image,
    level) map in ``table``; ``height``/``width`` [N] int32 map size; ``scale`` [N] spatial scale.
    """
    if style == "jwyang_avg":
        sampling_ratio = 1
        starts = _rounded(boxes[:, :2] * scale[:, None])
        sizes = jnp.maximum((_rounded(boxes[:, 2:] * scale[:, None]) - starts) + 1.0, 0.0)
        y_idx, y_w = _jwyang_axis_samples(starts[:, 0], sizes[:, 0], height, output_size)
        x_idx, x_w = _jwyang_axis_samples(starts[:, 1], sizes[:, 1], width, output_size)
    elif style == "mmdet":
        starts = _rounded(boxes[:, :2] * scale[:, None])
        sizes = jnp.maximum(_rounded((boxes[:, 2:] + 1.0) * scale[:, None]) - starts, 0.0)
        y_idx, y_w = _axis_samples(starts[:, 0], sizes[:, 0], height, output_size, sampling_ratio)
        x_idx, x_w = _axis_samples(starts[:, 1], sizes[:, 1], width, output_size, sampling_ratio)
    elif style == "model_garden":
        sampling_ratio = 1
        scaled = boxes * scale[:, None]  # a power of two: exact, as Model Garden's division by 2**level
        starts, sizes = scaled[:, :2], scaled[:, 2:] - scaled[:, :2]
        y_idx, y_w = _model_garden_axis_samples(starts[:, 0], sizes[:, 0], height, output_size)
        x_idx, x_w = _model_garden_axis_samples(starts[:, 1], sizes[:, 1], width, output_size)
    else:
        offset = 0.5 if aligned else 0.0
        scaled = _rounded(boxes * scale[:, None])
        starts = scaled[:, :2] - offset
        sizes = scaled[:, 2:] - offset - starts
        if not aligned:
            sizes = jnp.maximum(sizes, 1.0)
        y_idx, y_w = _axis_samples(starts[:, 0], sizes[:, 0], height, output_size, sampling_ratio)
        x_idx, x_w = _axis_samples(starts[:, 1], sizes[:, 1], width, output_size, sampling_ratio)
    y_w = y_w / (sampling_ratio * sampling_ratio)  # the average over the s * s samples of a bin
    n, size, k = boxes.shape[0], y_idx.shape[1], 2 * sampling_ratio  # size: P, or P + 1 grid points (jwyang_avg)
    rows = (base[:, None, None, None] + y_idx * width[:, None, None, None]).reshape(n, size, k)
    cols = x_idx.reshape(n, size, k)
    y_w = y_w.reshape(n, size, k).astype(table.dtype)
    x_w = x_w.reshape(n, size, k).astype(table.dtype)
    # One term per (row neighbour, column neighbour) of each bin: k * k gathers of [N, P, P, C], each
    # multiplied by its weight and summed; XLA fuses them into one loop, so nothing bigger than the
    # output is materialised.
    out = None
    for a in range(k):
        for b in range(k):
            index = rows[:, :, a, None] + cols[:, None, :, b]  # [N, P, P]
            weight = y_w[:, :, a, None] * x_w[:, None, :, b]
            term = table.at[index].get(mode="promise_in_bounds") * weight[..., None]
            out = term if out is None else out + term
    if style == "jwyang_avg":  # avg_pool2d(kernel 2, stride 1) of the (P + 1) x (P + 1) grid, in its summation order
        out = (out[:, :-1, :-1] + out[:, :-1, 1:] + out[:, 1:, :-1] + out[:, 1:, 1:]) * 0.25
    return out


def _check_sizes(output_size: int, sampling_ratio: int) -> tuple[int, int]:
    if not isinstance(sampling_ratio, numbers.Integral) or sampling_ratio <= 0:
        raise ValueError(
            f"sampling_ratio must be a positive int, got {sampling_ratio!r}: torchvision's adaptive "
            "sampling (<= 0, ceil(roi_size / output_size) samples per RoI) needs dynamic shapes."
        )
    if not isinstance(output_size, numbers.Integral) or output_size <= 0:
        raise ValueError(f"output_size must be a positive int, got {output_size!r}.")
    return int(output_size), int(sampling_ratio)


def _pool(
    table: Array,
    boxes: Array,
    base: Array,
    height: Array,
    width: Array,
    scale: Array,
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
    chunk_size: int | None,
    style: str = "torchvision",
) -> Array:
    """Runs :func:`_pool_chunk` over all RoIs ``[N, ...]`` in chunks of ``chunk_size``."""
    n, channels = boxes.shape[0], table.shape[-1]
    if chunk_size is None:
        terms = 4 * (output_size + 1) ** 2 if style == "jwyang_avg" else (2 * output_size * sampling_ratio) ** 2
        per_roi = terms * channels * table.dtype.itemsize
        budget = CHUNK_BYTES_CPU if jax.default_backend() == "cpu" else CHUNK_BYTES_ACCELERATOR
        chunk_size = max(1, budget // per_roi)
    chunk_size = max(1, min(chunk_size, n))
    dtype = coordinate_dtype(boxes)
    args = (boxes.astype(dtype), base, height, width, scale.astype(dtype))

    def run(chunk):
        return _pool_chunk(table, *chunk, output_size, sampling_ratio, aligned, style)

    if chunk_size >= n:
        return run(args)
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    # Padded RoIs read pixel 0 of the first map (base 0, in bounds) and are sliced away.
    chunks = [
        jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(num_chunks, chunk_size, *a.shape[1:]) for a in args
    ]
    out = jax.lax.map(run, tuple(chunks))
    return out.reshape(num_chunks * chunk_size, *out.shape[2:])[:n]


def roi_align(
    features: Array,
    boxes: Array,
    spatial_scale: float,
    output_size: int,
    sampling_ratio: int = 2,
    aligned: bool = False,
    chunk_size: int | None = None,
) -> Array:
    """RoIAlign of ``boxes`` [B, R, 4] (input-image pixels) on ``features`` [B, H, W, C].

    Returns ``[B, R, output_size, output_size, C]`` with ``torchvision.ops.roi_align`` semantics
    (see the module docstring). ``sampling_ratio`` must be a positive int (static shapes).
    ``chunk_size`` RoIs (over the whole batch) are pooled at a time; the default bounds the per-chunk
    gradient updates to ``CHUNK_BYTES_CPU`` on CPU and ``CHUNK_BYTES_ACCELERATOR`` elsewhere.
    """
    output_size, sampling_ratio = _check_sizes(output_size, sampling_ratio)
    batch, height, width, channels = features.shape
    num_rois = boxes.shape[1]
    n = batch * num_rois
    table = features.reshape(batch * height * width, channels)
    base = jnp.repeat(jnp.arange(batch, dtype=jnp.int32) * (height * width), num_rois)
    out = _pool(
        table,
        boxes.reshape(n, 4),
        base,
        jnp.full((n,), height, jnp.int32),
        jnp.full((n,), width, jnp.int32),
        jnp.full((n,), spatial_scale, jnp.float32),
        output_size,
        sampling_ratio,
        aligned,
        chunk_size,
    )
    return out.reshape(batch, num_rois, output_size, output_size, channels)


def multilevel_roi_align(
    features: Mapping[int, Array],
    boxes: Array,
    output_size: int,
    sampling_ratio: int = 2,
    aligned: bool = False,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
    chunk_size: int | None = None,
    style: str = "torchvision",
    strides: Mapping[int, int] | None = None,
    spatial_scales: Mapping[int, float] | None = None,
) -> Array:
    """Multilevel RoIAlign (torchvision's ``MultiScaleRoIAlign``) -> ``[B, R, P, P, C]``.

    ``features`` maps consecutive levels ``l`` to ``[B, H_l, W_l, C]`` maps of stride ``2**l``
    (spatial scale ``2**-l``), or ``strides[l]`` when given (DetNet: levels 4 and 5 both at stride 16;
    the level rule still picks by ``l``); ``boxes`` [B, R, 4] are input-image pixels. Each RoI is pooled from
    ``assign_levels(box, min(levels), max(levels), canonical_size, canonical_level)`` with
    :func:`roi_align` semantics, gathering from all levels at once. ``chunk_size`` as in :func:`roi_align`.
    ``style='model_garden'``: Model Garden's level rule and sampling (module docstring; ``sampling_ratio``
    and ``aligned`` unused); ``'mmdet'`` / ``'maskrcnn_benchmark'``: those sources' level rules (module docstring);
    ``'jwyang_avg'``: RoIAlignAvg of DetNet_pytorch (module docstring: its level rule and grid; ``sampling_ratio``
    and ``aligned`` unused). ``spatial_scales[l]`` (feature pixels per input pixel) replaces ``1 / stride`` when
    given: DetNet_pytorch's ``H_l / S``.
    """
    if style not in STYLES:
        raise ValueError(f"RoIAlign style must be one of {', '.join(map(repr, STYLES))}, got {style!r}")
    output_size, sampling_ratio = _check_sizes(output_size, sampling_ratio)
    levels = sorted(features)
    if levels != list(range(levels[0], levels[-1] + 1)):
        raise ValueError(f"multilevel_roi_align needs consecutive levels, got {levels}.")
    maps = [features[level] for level in levels]
    batch, channels = maps[0].shape[0], maps[0].shape[-1]
    for level, fmap in zip(levels, maps, strict=True):
        if fmap.ndim != 4 or fmap.shape[0] != batch or fmap.shape[-1] != channels:
            raise ValueError(f"level {level}: expected [{batch}, H, W, {channels}], got {fmap.shape}.")
    sizes = [fmap.shape[1] * fmap.shape[2] for fmap in maps]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    per_image = sum(sizes)
    table = jnp.concatenate([fmap.reshape(batch, -1, channels) for fmap in maps], axis=1)
    table = table.reshape(batch * per_image, channels)

    num_rois = boxes.shape[1]
    n = batch * num_rois
    flat_boxes = boxes.reshape(n, 4)
    flat_boxes = flat_boxes.astype(coordinate_dtype(flat_boxes))
    if style == "model_garden":
        which = model_garden_levels(flat_boxes, levels[0], levels[-1]) - levels[0]
    elif style == "mmdet":
        which = mmdet_levels(flat_boxes, len(levels), canonical_size)
    elif style == "jwyang_avg":
        which = jwyang_levels(flat_boxes, levels[0], levels[-1], canonical_size, canonical_level) - levels[0]
    elif style == "maskrcnn_benchmark":
        first, last = levels[0], levels[-1]
        which = maskrcnn_benchmark_levels(flat_boxes, first, last, canonical_size, canonical_level) - first
        style = "torchvision"  # the same sampling
    else:
        which = assign_levels(flat_boxes, levels[0], levels[-1], canonical_size, canonical_level) - levels[0]
    image = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), num_rois)
    base = image * per_image + jnp.asarray(offsets, jnp.int32)[which]
    height = jnp.asarray([fmap.shape[1] for fmap in maps], jnp.int32)[which]
    width = jnp.asarray([fmap.shape[2] for fmap in maps], jnp.int32)[which]
    if spatial_scales is None:
        level_strides = [2**level if strides is None else strides[level] for level in levels]
        spatial_scales = {level: 1.0 / stride for level, stride in zip(levels, level_strides, strict=True)}
    scale = jnp.asarray([float(spatial_scales[level]) for level in levels], jnp.float32)[which]
    out = _pool(table, flat_boxes, base, height, width, scale, output_size, sampling_ratio, aligned, chunk_size, style)
    return out.reshape(batch, num_rois, output_size, output_size, channels)
