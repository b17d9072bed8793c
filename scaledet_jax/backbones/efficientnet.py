"""EfficientNet B0-B7 (Tan & Le, 2019) as a detection backbone, following google/automl's builder.

MBConv blocks (1x1 expansion, depthwise kxk, squeeze-excitation on the block input width, 1x1
projection, identity skip with drop connect), swish, TF-'SAME' padding, width and depth scaling per
variant. The classifier head (1x1 conv to 1280, pooling, FC) is not built: EfficientDet uses the
feature maps only, and automl's parameter counts exclude it.

Returns ``{level: feature}`` for levels 1..5 (strides 2..32): level ``l`` is the output of the last
block before the next stride-2 block, automl's ``reduction_l`` endpoint.

Variables: ``stem_conv``, ``stem_bn``, then ``blocks_{i}`` numbered over the whole network (as
automl's ``blocks_{i}`` and lukemelas' ``_blocks.{i}``) holding ``expand_conv``/``expand_bn`` (absent
when the expansion ratio is 1), ``depthwise_conv``/``depthwise_bn``, ``se_reduce``/``se_expand``,
``project_conv``/``project_bn``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from scaledet_jax import nn as snn

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One row of the B0 table: ``repeats`` blocks of kernel ``kernel``, the first with ``stride``."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    in_filters: int
    out_filters: int
    se_ratio: float = 0.25


# automl efficientnet_builder: r1_k3_s11_e1_i32_o16_se0.25, ... (B0 before scaling).
B0_STAGES = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)

# (width multiplier, depth multiplier, native resolution, classifier dropout) per variant.
VARIANTS = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """automl's channel rounding: scale, round to a multiple of ``divisor``, never drop >10%."""
    if not width:
        return filters
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    kernel: int
    stride: int
    expand_ratio: int
    in_filters: int
    out_filters: int
    se_ratio: float


def plan_blocks(width: float, depth: float, stages=B0_STAGES) -> list[BlockSpec]:
    """Every MBConv block of a scaled network, in order."""
    blocks = []
    for stage in stages:
        in_filters = round_filters(stage.in_filters, width)
        out_filters = round_filters(stage.out_filters, width)
        for i in range(round_repeats(stage.repeats, depth)):
            blocks.append(
                BlockSpec(
                    stage.kernel,
                    stage.stride if i == 0 else 1,
                    stage.expand_ratio,
                    in_filters if i == 0 else out_filters,
                    out_filters,
                    stage.se_ratio,
                )
            )
    return blocks


def conv_init() -> Any:
    """automl's conv initialiser: normal with stddev sqrt(2 / (k * k * out_filters))."""
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def depthwise_init() -> Any:
    """automl's initialiser for a TF depthwise kernel [k, k, C, 1]: fan_out = k * k."""
    return snn.keras_depthwise(nn.initializers.variance_scaling, 2.0, "fan_out", "normal")


class MBConvBlock(nn.Module):
    spec: BlockSpec
    survival_prob: float = 1.0
    activation: str = "swish"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    padding: str = "same"
    dtype: Any = None

    @nn.compact
    def __call__(self, inputs: Array, train: bool = False) -> Array:
        spec = self.spec
        act = snn.get_activation(self.activation)

        def bn(name):
            return snn.batch_norm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name=name)

        x = inputs
        expanded = spec.in_filters * spec.expand_ratio
        if spec.expand_ratio != 1:
            x = snn.conv(
                expanded, 1, padding=self.padding, kernel_init=conv_init(), dtype=self.dtype, name="expand_conv"
            )(x)
            x = act(bn("expand_bn")(x, use_running_average=not train))
        x = snn.DepthwiseConv(
            spec.kernel,
            spec.stride,
            padding=self.padding,
            kernel_init=depthwise_init(),
            dtype=self.dtype,
            name="depthwise_conv",
        )(x)
        x = act(bn("depthwise_bn")(x, use_running_average=not train))
        if spec.se_ratio:
            reduced = max(1, int(spec.in_filters * spec.se_ratio))
            s = jnp.mean(x, axis=(1, 2), keepdims=True)
            s = snn.conv(reduced, 1, use_bias=True, kernel_init=conv_init(), dtype=self.dtype, name="se_reduce")(s)
            s = snn.conv(expanded, 1, use_bias=True, kernel_init=conv_init(), dtype=self.dtype, name="se_expand")(
                act(s)
            )
            x = x * nn.sigmoid(s)
        x = snn.conv(
            spec.out_filters, 1, padding=self.padding, kernel_init=conv_init(), dtype=self.dtype, name="project_conv"
        )(x)
        x = bn("project_bn")(x, use_running_average=not train)
        if spec.stride == 1 and spec.in_filters == spec.out_filters:
            x = snn.StochasticDepth(1.0 - self.survival_prob)(x, train) + inputs
        return x


class EfficientNet(nn.Module):
    """EfficientNet feature extractor; ``EfficientNet.from_model_id('b0')`` for the paper's variants."""

    width: float = 1.0
    depth: float = 1.0
    drop_connect_rate: float = 0.2  # block i keeps its branch with probability 1 - rate * i / num_blocks
    max_level: int = 5
    activation: str = "swish"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    padding: str = "same"
    dtype: Any = None

    @classmethod
    def from_model_id(cls, model_id: str, **kwargs) -> EfficientNet:
        key = model_id.lower().removeprefix("efficientnet-").removeprefix("efficientnet_")
        if key not in VARIANTS:
            raise ValueError(f"unknown EfficientNet {model_id!r}; available: {', '.join(VARIANTS)}")
        width, depth, _, _ = VARIANTS[key]
        return cls(width=width, depth=depth, **kwargs)

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> dict[int, Array]:
        act = snn.get_activation(self.activation)
        x = images.astype(self.dtype) if self.dtype is not None else images
        x = snn.conv(
            round_filters(32, self.width),
            3,
            2,
            padding=self.padding,
            kernel_init=conv_init(),
            dtype=self.dtype,
            name="stem_conv",
        )(x)
        x = snn.batch_norm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name="stem_bn")(
            x, use_running_average=not train
        )
        x = act(x)

        blocks = plan_blocks(self.width, self.depth)
        features: dict[int, Array] = {}
        level = 1
        for i, spec in enumerate(blocks):
            if spec.stride > 1:
                features[level] = x
                level += 1
                if level > self.max_level:
                    return features
            x = MBConvBlock(
                spec,
                survival_prob=1.0 - self.drop_connect_rate * i / len(blocks),
                activation=self.activation,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                padding=self.padding,
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(x, train)
        features[level] = x
        return features
