"""BiFPN (Tan et al., EfficientDet, 2020) following google/automl's node graph.

Levels above the backbone's last level (P6, P7, ...) are made from it: 1x1 conv + BN when the
width differs, then max pooling (window 3, stride 2). Each of ``num_repeats`` cells then runs
automl's node list: a top-down path (level max-1 .. min, fusing the level's latest node with the
level above) and a bottom-up path (level min+1 .. max, fusing every node of the level with the
level below). At each node the inputs are resampled to the node's level and width (1x1 conv with
bias + BN when the width differs; max pool down, nearest up), fused (fast normalised weighting
``sum relu(w_i) x_i / (sum relu(w_j) + 1e-4)``, softmax weighting, or a plain sum), then
swish -> separable 3x3 conv with bias -> BN.

Variables: ``resample_p{level}`` for the extra levels; ``cell_{r}/node_{j}`` with
``resample_{input}/{conv,bn}`` (first cell only: backbone widths differ), ``weights`` (weighted
fusion only), ``op_after_combine/{depthwise,pointwise}`` and ``bn``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from scaledet_jax import nn as snn

Array = jax.Array

WEIGHT_METHODS = ("fastattn", "attn", "sum")


def bifpn_nodes(min_level: int, max_level: int) -> list[tuple[int, tuple[int, ...]]]:
    """automl's BiFPN graph: [(level, input node ids)] where ids 0..L-1 are the input levels."""
    num_levels = max_level - min_level + 1
    node_ids = {min_level + i: [i] for i in range(num_levels)}
    next_id = num_levels
    nodes = []
    for level in range(max_level - 1, min_level - 1, -1):  # top-down
        nodes.append((level, (node_ids[level][-1], node_ids[level + 1][-1])))
        node_ids[level].append(next_id)
        next_id += 1
    for level in range(min_level + 1, max_level + 1):  # bottom-up
        nodes.append((level, tuple(node_ids[level]) + (node_ids[level - 1][-1],)))
        node_ids[level].append(next_id)
        next_id += 1
    return nodes


class Resample(nn.Module):
    """Brings a feature map to ``num_filters`` channels and ``target_shape`` spatially (NHWC)."""

    num_filters: int
    target_shape: tuple[int, int]
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    conv_padding: str = "same"
    pool_padding: str = "same"
    conv_bias: bool = True  # automl's redundant bias before BN; effdet's PyTorch-trained models have none
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if x.shape[-1] != self.num_filters:
            # automl: conv with bias *and* BN ("redundant bias" in effdet's words).
            x = snn.conv(
                self.num_filters,
                1,
                use_bias=self.conv_bias,
                padding=self.conv_padding,
                kernel_init=nn.initializers.glorot_uniform(),
                dtype=self.dtype,
                name="conv",
            )(x)
            x = snn.batch_norm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name="bn")(
                x, use_running_average=not train
            )
        height, width = x.shape[1:3]
        target_h, target_w = self.target_shape
        if height > target_h:
            stride = (height - 1) // target_h + 1
            if (width - 1) // target_w + 1 != stride:
                raise ValueError(f"cannot downsample {height}x{width} to {target_h}x{target_w} with one square stride")
            x = snn.max_pool(x, stride + 1, stride, self.pool_padding)
        elif height < target_h:
            scale = target_h // height
            if scale * height != target_h or scale * width != target_w:
                raise ValueError(
                    f"nearest upsampling needs integer ratios, got {height}x{width} -> {target_h}x{target_w}; "
                    "use an input size that is a multiple of 2**max_level"
                )
            x = snn.nearest_upsample(x, scale)
        if x.shape[1:3] != tuple(self.target_shape):
            raise ValueError(f"resampled to {x.shape[1:3]}, expected {tuple(self.target_shape)}")
        return x


class BiFPN(nn.Module):
    num_filters: int = 64
    num_repeats: int = 3
    min_level: int = 3
    max_level: int = 7
    weight_method: str = "fastattn"
    activation: str = "swish"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    conv_padding: str = "same"
    pool_padding: str = "same"
    conv_bias: bool = True  # automl's redundant bias before BN; effdet's PyTorch-trained models have none
    dtype: Any = None

    @nn.compact
    def __call__(self, features: dict[int, Array], train: bool = False) -> dict[int, Array]:
        if self.weight_method not in WEIGHT_METHODS:
            raise ValueError(f"weight_method must be one of {WEIGHT_METHODS}, got {self.weight_method!r}")
        resample_kwargs = dict(
            num_filters=self.num_filters,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            conv_padding=self.conv_padding,
            pool_padding=self.pool_padding,
            conv_bias=self.conv_bias,
            dtype=self.dtype,
        )

        # Input levels: the backbone's, then coarser ones made from the last.
        inputs = []
        for level in range(self.min_level, self.max_level + 1):
            if level in features:
                inputs.append(features[level])
            else:
                prev = inputs[-1]
                shape = ((prev.shape[1] - 1) // 2 + 1, (prev.shape[2] - 1) // 2 + 1)
                inputs.append(Resample(target_shape=shape, name=f"resample_p{level}", **resample_kwargs)(prev, train))
        shapes = {level: inputs[i].shape[1:3] for i, level in enumerate(range(self.min_level, self.max_level + 1))}

        cell_kwargs = dict(
            nodes=tuple(bifpn_nodes(self.min_level, self.max_level)),
            shapes=tuple(shapes[level] for level in range(self.min_level, self.max_level + 1)),
            min_level=self.min_level,
            num_filters=self.num_filters,
            weight_method=self.weight_method,
            activation=self.activation,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            conv_padding=self.conv_padding,
            pool_padding=self.pool_padding,
            conv_bias=self.conv_bias,
            dtype=self.dtype,
        )
        for r in range(self.num_repeats):
            inputs = BiFPNCell(name=f"cell_{r}", **cell_kwargs)(inputs, train)
        return {level: inputs[i] for i, level in enumerate(range(self.min_level, self.max_level + 1))}


class BiFPNCell(nn.Module):
    """One BiFPN layer: runs the node graph over the input levels, returns the newest node per level."""

    nodes: tuple[tuple[int, tuple[int, ...]], ...]
    shapes: tuple[tuple[int, int], ...]  # spatial shape per level, min_level first
    min_level: int
    num_filters: int
    weight_method: str = "fastattn"
    activation: str = "swish"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    conv_padding: str = "same"
    pool_padding: str = "same"
    conv_bias: bool = True  # automl's redundant bias before BN; effdet's PyTorch-trained models have none
    dtype: Any = None

    @nn.compact
    def __call__(self, inputs: list[Array], train: bool = False) -> list[Array]:
        nodes = list(inputs)
        for j, (level, offsets) in enumerate(self.nodes):
            nodes.append(
                FusionNode(
                    offsets=offsets,
                    target_shape=self.shapes[level - self.min_level],
                    num_filters=self.num_filters,
                    weight_method=self.weight_method,
                    activation=self.activation,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    conv_padding=self.conv_padding,
                    pool_padding=self.pool_padding,
                    conv_bias=self.conv_bias,
                    dtype=self.dtype,
                    name=f"node_{j}",
                )(nodes, train)
            )
        return nodes[-len(inputs) :]


class FusionNode(nn.Module):
    """Resamples the nodes ``offsets`` to this level, fuses them, then activation -> separable conv -> BN."""

    offsets: tuple[int, ...]
    target_shape: tuple[int, int]
    num_filters: int
    weight_method: str = "fastattn"
    activation: str = "swish"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    conv_padding: str = "same"
    pool_padding: str = "same"
    conv_bias: bool = True  # automl's redundant bias before BN; effdet's PyTorch-trained models have none
    dtype: Any = None

    @nn.compact
    def __call__(self, nodes: list[Array], train: bool = False) -> Array:
        resampled = [
            Resample(
                num_filters=self.num_filters,
                target_shape=self.target_shape,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                conv_padding=self.conv_padding,
                pool_padding=self.pool_padding,
                conv_bias=self.conv_bias,
                dtype=self.dtype,
                name=f"resample_{k}",
            )(nodes[k], train)
            for k in self.offsets
        ]
        stacked = jnp.stack(resampled, axis=-1)
        if self.weight_method == "sum":
            x = jnp.sum(stacked, axis=-1)
        else:
            weights = self.param("weights", nn.initializers.ones, (len(self.offsets),), jnp.float32).astype(
                stacked.dtype
            )
            if self.weight_method == "fastattn":
                weights = nn.relu(weights)
                x = jnp.sum(stacked * weights, axis=-1) / (jnp.sum(weights) + 1e-4)
            else:
                x = jnp.sum(stacked * jax.nn.softmax(weights), axis=-1)
        x = snn.get_activation(self.activation)(x)
        x = snn.SeparableConv(
            self.num_filters,
            3,
            use_bias=self.conv_bias,
            padding=self.conv_padding,
            dtype=self.dtype,
            name="op_after_combine",
        )(x)
        return snn.batch_norm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name="bn")(
            x, use_running_average=not train
        )
