"""Evaluation's image preprocessing in JAX, for artifacts that must run without TensorFlow's input pipeline.

``letterbox`` is ``data.preprocess.preprocess(training=False)`` as jnp ops on one uint8 image of any
(even symbolic, for ``jax.export``) height and width: resize keeping the aspect ratio so that the image fits
``output_size`` (TF's ``ResizeBilinear`` with half-pixel centres, which ``tf.image.resize(method="bilinear")``
runs), normalise, pad with zeros at the bottom and right.

It follows TF's arithmetic step for step (source position ``(i + 0.5) * (in / out) - 0.5``, edge-clamped
neighbours, horizontal then vertical lerp). It is not bit-exact: XLA's CPU compiler contracts the position's
multiply-add into one fused multiply-add, which moves sample positions by an ulp, so resized pixel values
differ from TF's by up to ~2e-3 (of 255) on downscaled images (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jax import Array


def _sample_points(in_size: Array, out_size: Array, count: int) -> tuple[Array, Array, Array]:
    """For output pixels ``0..count-1`` of an ``in_size -> out_size`` resize: lower and upper source indices and
    the weight of the upper one (TF's ``compute_interpolation_weights`` with ``HalfPixelScaler``)."""
    scale = in_size / out_size
    position = (jnp.arange(count, dtype=jnp.float32) + 0.5) * scale - 0.5
    floor = jnp.floor(position)
    lower = jnp.maximum(floor, 0.0).astype(jnp.int32)
    upper = jnp.minimum(jnp.ceil(position), in_size - 1.0).astype(jnp.int32)
    return lower, upper, position - floor


def letterbox(
    image: Array,
    output_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    bgr: bool = False,
) -> tuple[Array, Array]:
    """uint8 ``[H, W, 3]`` RGB -> (normalised ``[S, S, 3]`` float32 input, resize factor), ``S = output_size``.

    Boxes found on the input map back to the image's pixels by dividing by the factor. ``mean``/``std``/``bgr``:
    as ``data.preprocess.normalize_image`` (channels reversed first for BGR-trained weights)."""
    height, width = image.shape[0], image.shape[1]
    size = jnp.array([height, width], jnp.float32)
    factor = jnp.minimum(output_size / size[0], output_size / size[1])
    scaled = jnp.round(size * factor)  # the resized image's extent inside the S x S input
    rows_low, rows_high, row_weight = _sample_points(size[0], scaled[0], output_size)
    cols_low, cols_high, col_weight = _sample_points(size[1], scaled[1], output_size)
    pixels = image.astype(jnp.float32)

    def horizontal(rows: Array) -> Array:
        left, right = rows[:, cols_low], rows[:, cols_high]
        return left + (right - left) * col_weight[None, :, None]

    top, bottom = horizontal(pixels[rows_low]), horizontal(pixels[rows_high])
    resized = top + (bottom - top) * row_weight[:, None, None]
    if bgr:
        resized = resized[..., ::-1]
    normalised = (resized - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    index = jnp.arange(output_size)
    inside = (index[:, None] < scaled[0]) & (index[None, :] < scaled[1])
    return jnp.where(inside[..., None], normalised, 0.0), factor
