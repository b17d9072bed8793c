"""Feature Pyramid Network (Lin et al., 2017): {level: C} -> {level: P} with ``num_filters`` channels.

One module for TF Model Garden's ``decoders/fpn.py`` and torchvision's ``FeaturePyramidNetwork``
(+ ``LastLevelMaxPool`` / ``LastLevelP6P7``); their differences are fields:

* Backbone levels ``min_level .. top`` (top = min(backbone_max_level, max_level)) get a 1x1
  lateral conv; the top-down path adds the nearest-upsampled coarser sum to each lateral (x2, or
  torchvision's ``interpolate(size=...)`` index rule when the sizes are not exactly 2x); every sum
  gets a 3x3 output conv. Backbone levels below ``min_level`` are ignored, as in Model Garden.
* Levels above ``top`` (``extra_levels``):
  'conv' (Model Garden): a 3x3/2 conv on the previous level's output, with ``activation`` on the
  input from the second extra level on; 'p6p7' (torchvision RetinaNet ``LastLevelP6P7``): the same
  with relu, exactly two levels; 'maxpool' (torchvision ``LastLevelMaxPool``): the previous output
  subsampled by 2 (``max_pool2d(kernel 1, stride 2)``). ``extra_input='backbone'`` feeds the first
  extra conv the top backbone feature instead (``LastLevelP6P7`` with in_channels != out_channels).
* ``norm='batch'`` (Model Garden): a batch norm on every output level, extra levels included,
  applied last: the extra levels are computed from the un-normalised outputs. Model Garden's convs
  keep their bias before the norm (Keras' default ``use_bias=True``); so do torchvision's (no norm).
* DetNet_pytorch's ``_FPN`` (backbone levels 2..6, strides 4, 8, 16, 16, 16): ``upsample=
  'bilinear_align_corners'`` (its ``F.upsample(mode='bilinear')`` under PyTorch <= 0.3.1, whose
  bilinear resize aligned corners), ``output_levels=(2, 3)`` (only P3 and P2 get a 3x3 conv) and
  ``top_down_input='output'`` (P2's top-down input is the smoothed P3). Equal-size levels are added
  without resizing in every mode.

Variables: ``lateral_{level}`` (1x1), ``output_{level}`` (3x3), ``extra_{level}`` (3x3/2),
``norm_{level}``; all called in Model Garden's creation order (laterals, outputs, extras, norms).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scaledet_jax import nn as snn

Array = jax.Array

EXTRA_LEVELS = ("conv", "p6p7", "maxpool")
EXTRA_INPUTS = ("output", "backbone")
UPSAMPLE_MODES = ("nearest", "bilinear", "bilinear_align_corners")
TOP_DOWN_INPUTS = ("merged", "output")


def upsample_nearest_to(x: Array, size: tuple[int, int]) -> Array:
    """Nearest-neighbour resize of NHWC ``x`` to ``size``: x2 repeat when exact, otherwise
    PyTorch's ``interpolate(mode='nearest')`` rule ``src = min(floor(dst * in / out), in - 1)``."""
    if tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
        return snn.nearest_upsample(x, 2)
    for axis, out in zip((1, 2), size, strict=True):
        size_in = x.shape[axis]
        scale = np.float32(size_in) / np.float32(out)
        index = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)
        x = jnp.take(x, jnp.asarray(index), axis=axis)
    return x


def upsample_bilinear_to(x: Array, size: tuple[int, int], align_corners: bool = False) -> Array:
    """Bilinear resize of NHWC ``x`` to ``size`` with PyTorch's ``interpolate(mode='bilinear', size=...)``
    rule: source ``dst * (in - 1) / (out - 1)`` with ``align_corners`` (PyTorch <= 0.3.1's only
    behaviour), else ``max((dst + 0.5) * in / out - 0.5, 0)``; the upper neighbour is clamped to the edge."""
    for axis, out in zip((1, 2), size, strict=True):
        size_in = x.shape[axis]
        if size_in == out:
            continue
        # A float32 scale, then scale * (dst + 0.5) - 0.5 rounded once (an FMA): PyTorch's CPU weights, bit for bit.
        dst = np.arange(out, dtype=np.float64)
        if align_corners:
            scale = np.float32(size_in - 1) / np.float32(out - 1) if out > 1 else np.float32(0)
            src = (np.float64(scale) * dst).astype(np.float32)
        else:
            scale = np.float32(size_in) / np.float32(out)
            src = np.maximum(np.float64(scale) * (dst + 0.5) - 0.5, 0.0).astype(np.float32)
        lower = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
        upper = np.minimum(lower + 1, size_in - 1)
        weight_shape = [1] * x.ndim
        weight_shape[axis] = out
        upper_weight = (src - lower.astype(np.float32)).reshape(weight_shape)
        lower_weight = jnp.asarray(np.float32(1) - upper_weight, x.dtype)
        upper_weight = jnp.asarray(upper_weight, x.dtype)
        x = (
            jnp.take(x, jnp.asarray(lower), axis=axis) * lower_weight
            + jnp.take(x, jnp.asarray(upper), axis=axis) * upper_weight
        )
    return x


def upsample_to(x: Array, size: tuple[int, int], mode: str = "nearest") -> Array:
    """Resize NHWC ``x`` to ``size`` (no-op when equal) with one of ``UPSAMPLE_MODES``."""
    if tuple(size) == tuple(x.shape[1:3]):
        return x
    if mode == "nearest":
        return upsample_nearest_to(x, size)
    if mode in ("bilinear", "bilinear_align_corners"):
        return upsample_bilinear_to(x, size, align_corners=mode == "bilinear_align_corners")
    raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")


class FPN(nn.Module):
    """FPN neck: {level: [B, H_l, W_l, C_l]} -> {level: [B, H_l, W_l, num_filters]}, min_level..max_level.

    torchvision Faster R-CNN: levels 2..6, ``extra_levels='maxpool'``, ``norm=None``,
    ``conv_padding='symmetric'``. torchvision RetinaNet: 3..7, 'p6p7'. Model Garden: 3..7, 'conv',
    ``norm='batch'``, 'same' padding.
    """

    min_level: int = 3
    max_level: int = 7
    backbone_min_level: int | None = None  # lowest backbone level used; default (and at most) min_level
    backbone_max_level: int = 5
    num_filters: int = 256
    extra_levels: str = "conv"
    extra_input: str = "output"
    norm: str | None = None  # None (torchvision) or 'batch' (Model Garden)
    conv_bias: bool = True
    activation: str = "relu"  # input activation of the second and later 'conv' extra levels
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    conv_padding: str = "same"  # 'symmetric' for PyTorch-trained weights
    kernel_init: Callable = snn.keras_variance_scaling  # torchvision's kaiming_uniform(a=1) has the same variance
    dtype: Any = None
    upsample: str = "nearest"  # top-down resize: one of UPSAMPLE_MODES (DetNet_pytorch: 'bilinear_align_corners')
    output_levels: tuple[int, ...] | None = None  # backbone levels with a 3x3 output conv; None: all (DetNet: 2, 3)
    top_down_input: str = "merged"  # 'output': a level's top-down input is the coarser level's output (DetNet)

    @nn.compact
    def __call__(self, features: Mapping[int, Array], train: bool = False) -> dict[int, Array]:
        if self.extra_levels not in EXTRA_LEVELS:
            raise ValueError(f"extra_levels must be one of {EXTRA_LEVELS}, got {self.extra_levels!r}")
        if self.extra_input not in EXTRA_INPUTS:
            raise ValueError(f"extra_input must be one of {EXTRA_INPUTS}, got {self.extra_input!r}")
        if self.norm not in (None, "batch"):
            raise ValueError(f"norm must be None or 'batch', got {self.norm!r}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.top_down_input not in TOP_DOWN_INPUTS:
            raise ValueError(f"top_down_input must be one of {TOP_DOWN_INPUTS}, got {self.top_down_input!r}")
        backbone_min = self.min_level if self.backbone_min_level is None else self.backbone_min_level
        if backbone_min > self.min_level:
            raise ValueError(f"backbone_min_level {backbone_min} is above min_level {self.min_level}")
        top = min(self.backbone_max_level, self.max_level)
        missing = [level for level in range(self.min_level, top + 1) if level not in features]
        if missing:
            raise ValueError(f"FPN needs backbone levels {self.min_level}..{top}; missing {missing}")
        num_extra = self.max_level - top
        if self.extra_levels == "p6p7" and num_extra not in (0, 2):
            raise ValueError(f"'p6p7' makes exactly two extra levels; max_level {self.max_level} asks for {num_extra}")

        def conv(kernel: int, strides: int, name: str) -> nn.Conv:
            return snn.conv(
                self.num_filters, kernel, strides, use_bias=self.conv_bias, padding=self.conv_padding,
                kernel_init=self.kernel_init, dtype=self.dtype, name=name,
            )  # fmt: skip

        levels = range(self.min_level, top + 1)
        output_levels = set(levels if self.output_levels is None else self.output_levels)
        if not output_levels <= set(levels):
            raise ValueError(f"output_levels {sorted(output_levels)} must be backbone levels {self.min_level}..{top}")

        def output(level: int, merged: Array) -> Array:
            return conv(3, 1, f"output_{level}")(merged) if level in output_levels else merged

        laterals = {level: conv(1, 1, f"lateral_{level}")(features[level]) for level in levels}
        merged = {top: laterals[top]}
        outputs = {}
        for level in range(top - 1, self.min_level - 1, -1):
            coarser = merged[level + 1]
            if self.top_down_input == "output":
                coarser = outputs[level + 1] = output(level + 1, coarser)
            merged[level] = upsample_to(coarser, laterals[level].shape[1:3], self.upsample) + laterals[level]
        for level in levels:  # Model Garden's creation order: every output conv after the laterals
            if level not in outputs:
                outputs[level] = output(level, merged[level])

        for level in range(top + 1, self.max_level + 1):
            previous = outputs[level - 1]
            if self.extra_levels == "maxpool":
                outputs[level] = previous[:, ::2, ::2, :]
                continue
            if level == top + 1:
                x = features[top] if self.extra_input == "backbone" else previous
            else:
                x = snn.get_activation("relu" if self.extra_levels == "p6p7" else self.activation)(previous)
            outputs[level] = conv(3, 2, f"extra_{level}")(x)

        if self.norm == "batch":
            for level in range(self.min_level, self.max_level + 1):
                outputs[level] = snn.batch_norm(
                    self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name=f"norm_{level}"
                )(outputs[level], use_running_average=not train)
        return {level: outputs[level] for level in range(self.min_level, self.max_level + 1)}


def build_fpn(model_config: ml_collections.ConfigDict) -> FPN:
    """The FPN described by ``config.model``: ``decoder.{num_filters, extra_levels, norm}`` (norm 'batch',
    or None / '' / 'none'), the output levels, the backbone's top level (``decoder.backbone_max_level``,
    default 5), ``decoder.{upsample, output_levels, top_down_input}`` (DetNet_pytorch: 'bilinear_align_corners',
    (2, 3), 'output'), paddings, activation, batch-norm settings and dtype."""
    d = model_config.decoder
    norm = d.get("norm")
    output_levels = d.get("output_levels")
    return FPN(
        min_level=model_config.min_level,
        max_level=model_config.max_level,
        backbone_max_level=d.get("backbone_max_level", 5),
        num_filters=d.num_filters,
        extra_levels=d.get("extra_levels", "conv"),
        extra_input=d.get("extra_input", "output"),
        norm=None if norm in (None, "", "none") else norm,
        conv_bias=d.get("conv_bias", True),
        activation=model_config.get("activation", "relu"),
        bn_momentum=model_config.norm.momentum,
        bn_epsilon=model_config.norm.epsilon,
        conv_padding=model_config.get("conv_padding", "same"),
        dtype={"float32": None, "bfloat16": "bfloat16"}[model_config.get("dtype", "float32")],
        upsample=d.get("upsample", "nearest"),
        output_levels=None if output_levels is None else tuple(output_levels),
        top_down_input=d.get("top_down_input", "merged"),
    )
