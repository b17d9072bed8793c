"""SpineNet, the scale-permuted backbone (Du et al., 2020), as built by TF Model Garden.

Follows ``official/vision/modeling/backbones/spinenet.py``: the NAS block specs, the scaling map
(49S/49/96/143/143L/190), resampling with alpha, the stem, the 1x1 endpoints, BN 0.99/1e-3 and the
stochastic-depth schedule. Semantic differences of the PyTorch ports (symmetric max-pool padding,
endpoints without activation, relu) are options of this one module.

Input sizes must be multiples of 2**7 (the deepest block level) so that every level has an exact
integer size, as in the Model Garden recipes (640, 1024, 1280).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from scaledet_jax import nn as snn

Array = jax.Array

FILTER_SIZE_MAP = {1: 32, 2: 64, 3: 128, 4: 256, 5: 256, 6: 256, 7: 256}


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    level: int
    block_fn: str  # 'bottleneck' or 'residual'
    input_offsets: tuple[int, int]
    is_output: bool


# The architecture found by NAS: (level, block, (input offset a, input offset b), is_output).
# Offsets index the list [stem block 1, stem block 2, block 0, block 1, ...].
SPINENET_BLOCK_SPECS: tuple[BlockSpec, ...] = tuple(
    BlockSpec(*spec)
    for spec in [
        (2, "bottleneck", (0, 1), False),
        (4, "residual", (0, 1), False),
        (3, "bottleneck", (2, 3), False),
        (4, "bottleneck", (2, 4), False),
        (6, "residual", (3, 5), False),
        (4, "bottleneck", (3, 5), False),
        (5, "residual", (6, 7), False),
        (7, "residual", (6, 8), False),
        (5, "bottleneck", (8, 9), False),
        (5, "bottleneck", (8, 10), False),
        (4, "bottleneck", (5, 10), True),
        (3, "bottleneck", (4, 10), True),
        (5, "bottleneck", (7, 12), True),
        (7, "bottleneck", (5, 14), True),
        (6, "bottleneck", (12, 14), True),
        # Model Garden appends this level-2 output; with min_level 3 nothing consumes it, so it
        # is not built, but it still counts in the stochastic-depth schedule (rate * i / 16).
        (2, "bottleneck", (2, 13), True),
    ]
)

# endpoints_num_filters, filter_size_scale, resample_alpha, block_repeats
SCALING_MAP: dict[str, dict[str, Any]] = {
    "49S": dict(endpoints_num_filters=128, filter_size_scale=0.65, resample_alpha=0.5, block_repeats=1),
    "49": dict(endpoints_num_filters=256, filter_size_scale=1.0, resample_alpha=0.5, block_repeats=1),
    "96": dict(endpoints_num_filters=256, filter_size_scale=1.0, resample_alpha=0.5, block_repeats=2),
    "143": dict(endpoints_num_filters=256, filter_size_scale=1.0, resample_alpha=1.0, block_repeats=3),
    "143L": dict(endpoints_num_filters=256, filter_size_scale=1.3, resample_alpha=1.0, block_repeats=3),
    "190": dict(endpoints_num_filters=512, filter_size_scale=1.3, resample_alpha=1.0, block_repeats=4),
}

NUM_STEM_BLOCKS = 2


def _out_channels(block_fn: str, filters: int) -> int:
    return filters * 4 if block_fn == "bottleneck" else filters


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """One scale-permuted block after resolving the graph."""

    index: int  # position in the block specs (0-based)
    spec: BlockSpec
    filters: int  # bottleneck width (output has 4x for bottleneck blocks)
    resampled_parents: tuple[int, int]  # net indices resampled then summed
    direct_parents: tuple[int, ...]  # unconsumed same-shape blocks added to an output block
    built: bool  # False when no endpoint depends on it


def plan_network(
    block_specs: Sequence[BlockSpec], filter_size_scale: float, min_level: int, max_level: int
) -> list[BlockPlan]:
    """Resolves the block graph exactly as Model Garden builds it.

    Net index k < 2 are the stem blocks; net index k >= 2 is block k - 2. An output block also
    sums every earlier block of the same level and width that no block consumed yet.
    """
    stem_filters = int(FILTER_SIZE_MAP[2] * filter_size_scale)
    levels = [2] * NUM_STEM_BLOCKS
    channels = [_out_channels("bottleneck", stem_filters)] * NUM_STEM_BLOCKS
    outgoing = [0] * NUM_STEM_BLOCKS
    plans = []
    for i, spec in enumerate(block_specs):
        filters = int(FILTER_SIZE_MAP[spec.level] * filter_size_scale)
        target_channels = _out_channels(spec.block_fn, filters)
        a, b = spec.input_offsets
        outgoing[a] += 1
        outgoing[b] += 1
        direct = []
        if spec.is_output:
            for j in range(len(levels)):
                if outgoing[j] == 0 and levels[j] == spec.level and channels[j] == target_channels:
                    direct.append(j)
                    outgoing[j] += 1
        plans.append(BlockPlan(i, spec, filters, (a, b), tuple(direct), built=False))
        levels.append(spec.level)
        channels.append(target_channels)
        outgoing.append(0)

    # Keep only blocks that some endpoint in [min_level, max_level] depends on.
    needed = set()
    for level in range(min_level, max_level + 1):
        outputs = [p for p in plans if p.spec.is_output and p.spec.level == level]
        if len(outputs) != 1:
            raise ValueError(f"SpineNet block specs need exactly one output at level {level}")
        needed.add(outputs[0].index + NUM_STEM_BLOCKS)
    for plan in reversed(plans):
        if plan.index + NUM_STEM_BLOCKS in needed:
            needed.update(plan.resampled_parents)
            needed.update(plan.direct_parents)
    return [dataclasses.replace(p, built=p.index + NUM_STEM_BLOCKS in needed) for p in plans]


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 (4x filters) residual block; projection shortcut when shapes change."""

    filters: int
    strides: int = 1
    use_projection: bool = False
    stochastic_depth_rate: float = 0.0
    activation: str = "relu"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    padding: str = "same"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        kw = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, padding=self.padding, dtype=self.dtype)
        shortcut = x
        if self.use_projection:
            shortcut = snn.ConvBN(self.filters * 4, 1, self.strides, name="shortcut", **kw)(x, train)
        x = snn.ConvBN(self.filters, 1, activation=self.activation, name="conv1", **kw)(x, train)
        x = snn.ConvBN(self.filters, 3, self.strides, activation=self.activation, name="conv2", **kw)(x, train)
        x = snn.ConvBN(self.filters * 4, 1, name="conv3", **kw)(x, train)
        x = snn.StochasticDepth(self.stochastic_depth_rate)(x, train)
        return snn.get_activation(self.activation)(x + shortcut)


class ResidualBlock(nn.Module):
    """3x3 -> 3x3 residual block; projection shortcut when shapes change."""

    filters: int
    strides: int = 1
    use_projection: bool = False
    stochastic_depth_rate: float = 0.0
    activation: str = "relu"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    padding: str = "same"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        kw = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, padding=self.padding, dtype=self.dtype)
        shortcut = x
        if self.use_projection:
            shortcut = snn.ConvBN(self.filters, 1, self.strides, name="shortcut", **kw)(x, train)
        x = snn.ConvBN(self.filters, 3, self.strides, activation=self.activation, name="conv1", **kw)(x, train)
        x = snn.ConvBN(self.filters, 3, name="conv2", **kw)(x, train)
        x = snn.StochasticDepth(self.stochastic_depth_rate)(x, train)
        return snn.get_activation(self.activation)(x + shortcut)


BLOCK_FNS = {"bottleneck": BottleneckBlock, "residual": ResidualBlock}


class BlockGroup(nn.Module):
    """``repeats`` blocks of one type; the first projects when the input shape differs."""

    block_fn: str
    filters: int
    repeats: int = 1
    stochastic_depth_rate: float = 0.0
    activation: str = "relu"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    padding: str = "same"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        block = BLOCK_FNS[self.block_fn]
        kw = dict(
            stochastic_depth_rate=self.stochastic_depth_rate,
            activation=self.activation,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            padding=self.padding,
            dtype=self.dtype,
        )
        use_projection = x.shape[-1] != _out_channels(self.block_fn, self.filters)
        for r in range(self.repeats):
            x = block(self.filters, use_projection=use_projection and r == 0, name=f"block_{r}", **kw)(x, train)
        return x


RESAMPLE_POOLINGS = ("repeated", "single")


class Resample(nn.Module):
    """Matches a parent to a target block's level and width (Model Garden ``_resample_with_alpha``).

    1x1 squeeze to int(parent filters * alpha), then a 3x3/2 conv plus max pools down, or nearest
    upsampling up, then a 1x1 expand (no activation) to the target channels.

    Down by n > 1 levels, ``pooling='repeated'`` (Model Garden) applies n - 1 max pools 3x3/2;
    ``'single'`` (the mmdetection port) one max pool of stride 2**(n-1), kernel 3 for n = 2 and
    5 beyond (level 4 -> 7: one 5x5/4 pool; not the same function as two 3x3/2 pools).
    """

    parent_level: int
    parent_channels: int
    parent_block_fn: str
    target_level: int
    target_channels: int
    alpha: float
    activation: str = "relu"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    padding: str = "same"
    pool_padding: str = "same"
    pooling: str = "repeated"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.pooling not in RESAMPLE_POOLINGS:
            raise ValueError(f"resample pooling must be one of {RESAMPLE_POOLINGS}, got {self.pooling!r}")
        kw = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, padding=self.padding, dtype=self.dtype)
        parent_filters = self.parent_channels
        if self.parent_block_fn == "bottleneck":
            parent_filters /= 4  # the alpha applies to the filters before the 4x expansion
        squeezed = int(parent_filters * self.alpha)
        x = snn.ConvBN(squeezed, 1, activation=self.activation, name="squeeze", **kw)(x, train)
        if self.parent_level < self.target_level:
            x = snn.ConvBN(squeezed, 3, 2, activation=self.activation, name="downsample", **kw)(x, train)
            extra = self.target_level - self.parent_level - 1
            if self.pooling == "single" and extra > 0:
                x = snn.max_pool(x, 3 if extra == 1 else 5, 2**extra, self.pool_padding)
            else:
                for _ in range(extra):
                    x = snn.max_pool(x, 3, 2, self.pool_padding)
        elif self.parent_level > self.target_level:
            x = snn.nearest_upsample(x, 2 ** (self.parent_level - self.target_level))
        return snn.ConvBN(self.target_channels, 1, name="expand", **kw)(x, train)


class SpineNet(nn.Module):
    """SpineNet backbone: images [B, H, W, 3] -> {level: features [B, H/2^l, W/2^l, C]}.

    Build a published variant with ``SpineNet.from_model_id('49')``.
    """

    endpoints_num_filters: int = 256
    filter_size_scale: float = 1.0
    resample_alpha: float = 0.5
    block_repeats: int = 1
    min_level: int = 3
    max_level: int = 7
    block_specs: tuple[BlockSpec, ...] = SPINENET_BLOCK_SPECS
    activation: str = "swish"
    stochastic_depth_rate: float = 0.0
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    conv_padding: str = "same"  # 'symmetric' for PyTorch-trained weights
    pool_padding: str = "same"  # mmdetection's port pads max pools symmetrically
    endpoint_activation: bool = True  # the mmdetection port has none
    resample_pooling: str = "repeated"  # 'single': the mmdetection port's one pool per resample
    dtype: Any = None

    @classmethod
    def from_model_id(cls, model_id: str, **kwargs: Any) -> SpineNet:
        if model_id not in SCALING_MAP:
            raise ValueError(f"unknown SpineNet variant {model_id!r}; choose from {sorted(SCALING_MAP)}")
        return cls(**{**SCALING_MAP[model_id], **kwargs})

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> dict[int, Array]:
        deepest = max(s.level for s in self.block_specs)
        if images.shape[1] % 2**deepest or images.shape[2] % 2**deepest:
            raise ValueError(
                f"SpineNet input height and width must be multiples of {2**deepest}, got {images.shape[1:3]}"
            )
        kw = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, padding=self.conv_padding, dtype=self.dtype)
        group_kw = dict(activation=self.activation, **kw)
        act = snn.get_activation(self.activation)

        # Stem: 7x7/2 conv, 3x3/2 max pool, then two level-2 bottleneck groups.
        x = snn.ConvBN(64, 7, 2, activation=self.activation, name="stem", **kw)(images, train)
        x = snn.max_pool(x, 3, 2, self.pool_padding)
        stem_filters = int(FILTER_SIZE_MAP[2] * self.filter_size_scale)
        net = []
        for i in range(NUM_STEM_BLOCKS):
            x = BlockGroup("bottleneck", stem_filters, self.block_repeats, name=f"stem_block_{i}", **group_kw)(x, train)
            net.append(x)
        levels = [2] * NUM_STEM_BLOCKS
        block_fns = ["bottleneck"] * NUM_STEM_BLOCKS

        plans = plan_network(self.block_specs, self.filter_size_scale, self.min_level, self.max_level)
        outputs = {}
        for plan in plans:
            spec = plan.spec
            if not plan.built:
                net.append(None)
                levels.append(spec.level)
                block_fns.append(spec.block_fn)
                continue
            target_channels = _out_channels(spec.block_fn, plan.filters)
            parents = []
            for k, j in enumerate(plan.resampled_parents):
                parents.append(
                    Resample(
                        parent_level=levels[j],
                        parent_channels=net[j].shape[-1],
                        parent_block_fn=block_fns[j],
                        target_level=spec.level,
                        target_channels=target_channels,
                        alpha=self.resample_alpha,
                        activation=self.activation,
                        pool_padding=self.pool_padding,
                        pooling=self.resample_pooling,
                        name=f"merge_{plan.index}_resample_{k}",
                        **kw,
                    )(net[j], train)
                )
            parents.extend(net[j] for j in plan.direct_parents)
            x = act(sum(parents[1:], parents[0]))
            rate = self.stochastic_depth_rate * (plan.index + 1) / len(self.block_specs)
            x = BlockGroup(
                spec.block_fn,
                plan.filters,
                self.block_repeats,
                stochastic_depth_rate=rate,
                name=f"block_{plan.index}",
                **group_kw,
            )(x, train)
            net.append(x)
            levels.append(spec.level)
            block_fns.append(spec.block_fn)
            if spec.is_output and self.min_level <= spec.level <= self.max_level:
                outputs[spec.level] = x

        endpoint_act = self.activation if self.endpoint_activation else None
        return {
            level: snn.ConvBN(self.endpoints_num_filters, 1, activation=endpoint_act, name=f"endpoint_{level}", **kw)(
                outputs[level], train
            )
            for level in range(self.min_level, self.max_level + 1)
        }
