"""ResNet-50/101 (He et al., 2016) as the backbone of two-stage detectors: images -> {2..5: C2..C5}.

One module for the three sources we track; their differences are fields:

* TF Model Garden (``official/vision/modeling/backbones/resnet.py``, stem v0): TF 'SAME' padding
  for convs and the stem max pool, trainable batch norm 0.99/1e-3, stride on the 3x3 conv.
* torchvision (``torchvision.models.resnet`` as the detection models build it): symmetric
  padding, ``FrozenBatchNorm2d`` with eps 1e-5, stride on the 3x3 conv, ``trainable_layers``.
* Detectron / maskrcnn-benchmark (MSRA weights): as torchvision but the stride on the first 1x1.

Every stage's first block has a projection shortcut (1x1 conv with the stage stride, then norm),
stage 2 included (stride 1 there); convs have no bias; the activation follows the residual add.

Variables: ``stem_conv``, ``stem_norm``, then ``stage{s}_block{b}`` (s = 2..5, b from 0) with
``conv1``/``norm1``, ``conv2``/``norm2``, ``conv3``/``norm3`` and, on each stage's first block,
``shortcut_conv``/``shortcut_norm``. The shortcut is called first, as Model Garden creates it, so
the creation-order converter lines up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from scaledet_jax import nn as snn

Array = jax.Array

# depth -> blocks per stage (stages 2..5); bottleneck widths 64, 128, 256, 512, expansion 4.
RESNET_BLOCKS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_FILTERS = (64, 128, 256, 512)
EXPANSION = 4
NORMS = ("batch", "frozen")


def make_norm(
    norm: str, momentum: float, epsilon: float, dtype: Any, name: str, zero_scale: bool = False
) -> nn.BatchNorm | snn.FrozenBatchNorm:
    """'batch': trainable batch norm (Keras momentum semantics; ``zero_scale``: gamma starts at 0);
    'frozen': torchvision's FrozenBatchNorm2d."""
    if norm == "batch":
        return snn.batch_norm(momentum, epsilon, dtype=dtype, name=name, zero_scale=zero_scale)
    if norm == "frozen":
        return snn.FrozenBatchNorm(epsilon, dtype=dtype, name=name)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4) residual block; the stride sits on the 3x3 or, Detectron-style, on the 1x1."""

    filters: int
    strides: int = 1
    use_projection: bool = False
    stride_in_1x1: bool = False
    activation: str = "relu"
    norm: str = "batch"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    padding: str = "same"
    kernel_init: Callable = snn.keras_variance_scaling
    dtype: Any = None
    dilation: int = 1  # of the 3x3 conv (DetNet's stride-16 stages: 2)
    # torchvision's zero_init_residual: norm3's gamma starts at 0, so each block starts as (act of) its
    # shortcut; deep nets trained from scratch converge faster (Goyal et al. 2017). Init only.
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        act = snn.get_activation(self.activation)

        def conv_norm(
            x: Array, features: int, kernel: int, strides: int, conv_name: str, norm_name: str, dilation: int = 1
        ) -> Array:
            x = snn.conv(
                features, kernel, strides, dilation, padding=self.padding, kernel_init=self.kernel_init,
                dtype=self.dtype, name=conv_name,
            )(x)  # fmt: skip
            zero = self.zero_init_residual and norm_name == "norm3"
            norm = make_norm(self.norm, self.bn_momentum, self.bn_epsilon, self.dtype, norm_name, zero)
            return norm(x, use_running_average=not train)

        shortcut = x
        if self.use_projection:
            shortcut = conv_norm(x, self.filters * EXPANSION, 1, self.strides, "shortcut_conv", "shortcut_norm")
        stride_1x1, stride_3x3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        x = act(conv_norm(x, self.filters, 1, stride_1x1, "conv1", "norm1"))
        x = act(conv_norm(x, self.filters, 3, stride_3x3, "conv2", "norm2", self.dilation))
        x = conv_norm(x, self.filters * EXPANSION, 1, 1, "conv3", "norm3")
        return act(x + shortcut)


class ResNet(nn.Module):
    """ResNet-50/101: images [B, H, W, 3] -> {level: [B, H/2^level, W/2^level, C]} for levels 2..5.

    ``frozen_stages=k`` freezes the stem (k >= 1) and stages 2..k: their outputs (the next part's
    input and the returned C2..Ck) go through ``jax.lax.stop_gradient`` (no backward pass through
    them) and their norms run in inference mode even when training (mmdetection's frozen stages; a
    no-op for ``norm='frozen'``). torchvision's ``trainable_layers=3`` is ``frozen_stages=2``.
    Masking weight decay of the frozen variables is the trainer's job.
    """

    depth: int = 50
    stage_blocks: tuple[int, int, int, int] | None = None  # blocks per stage, overriding depth's (small test nets)
    stride_in_1x1: bool = False  # True: Detectron / maskrcnn-benchmark (MSRA) weights
    norm: str = "batch"  # 'frozen': torchvision's FrozenBatchNorm2d
    frozen_stages: int = 0
    activation: str = "relu"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3  # torchvision's FrozenBatchNorm2d: 1e-5
    conv_padding: str = "same"  # 'symmetric' for PyTorch-trained weights
    pool_padding: str = "same"  # torchvision's stem pool pads 1 on each side: 'symmetric'
    kernel_init: Callable = snn.keras_variance_scaling
    dtype: Any = None
    zero_init_residual: bool = False  # each block's last BN gamma starts at 0 (training from scratch)

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> dict[int, Array]:
        if self.stage_blocks is None and self.depth not in RESNET_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BLOCKS)}, got {self.depth}")
        stage_blocks = RESNET_BLOCKS[self.depth] if self.stage_blocks is None else tuple(self.stage_blocks)
        if len(stage_blocks) != 4 or min(stage_blocks) < 1:
            raise ValueError(f"stage_blocks must be 4 positive counts, got {stage_blocks}")
        if not 0 <= self.frozen_stages <= 5:
            raise ValueError(f"frozen_stages must be in 0..5, got {self.frozen_stages}")
        return stem_and_stages(
            self, images, train, stage_blocks=stage_blocks, stage_filters=STAGE_FILTERS, stage_strides=(1, 2, 2, 2)
        )


def stem_and_stages(
    parent: nn.Module,
    images: Array,
    train: bool,
    *,
    stage_blocks: tuple[int, ...],
    stage_filters: tuple[int, ...],
    stage_strides: tuple[int, ...],
    stage_dilations: tuple[int, ...] | None = None,
    stem_filters: int = 64,
) -> dict[int, Array]:
    """ResNet's 7x7/2 stem + 3x3/2 max pool and bottleneck stages (levels 2, 3, ...), built inside ``parent``'s
    compact ``__call__`` with its fields (norm, epsilon, paddings, activation, ``frozen_stages``, ...): the body
    of ResNet and of DetNet (whose last two stages keep the stride and dilate their 3x3 convs).

    ``frozen_stages=k`` freezes the stem (k >= 1) and stages 2..k: their outputs go through ``stop_gradient``
    and their norms run in inference mode. Every stage's first block has a projection shortcut with the
    stage's stride; variables ``stem_conv``, ``stem_norm``, ``stage{level}_block{b}``.
    """
    p = parent
    kw = dict(
        activation=p.activation,
        norm=p.norm,
        bn_momentum=p.bn_momentum,
        bn_epsilon=p.bn_epsilon,
        padding=p.conv_padding,
        kernel_init=p.kernel_init,
        dtype=p.dtype,
        zero_init_residual=getattr(p, "zero_init_residual", False),
    )

    def freeze(x: Array, part: int) -> Array:
        # Every frozen part's output, not only the last one's: C2..C_k are also returned features.
        return jax.lax.stop_gradient(x) if part <= p.frozen_stages else x

    stem_train = train and p.frozen_stages < 1
    x = snn.conv(
        stem_filters, 7, 2, padding=p.conv_padding, kernel_init=p.kernel_init, dtype=p.dtype, name="stem_conv"
    )(images)
    x = make_norm(p.norm, p.bn_momentum, p.bn_epsilon, p.dtype, "stem_norm")(x, use_running_average=not stem_train)
    x = snn.get_activation(p.activation)(x)
    x = freeze(snn.max_pool(x, 3, 2, p.pool_padding), 1)

    dilations = stage_dilations or (1,) * len(stage_blocks)
    features = {}
    stages = zip(stage_blocks, stage_filters, stage_strides, dilations, strict=True)
    for level, (repeats, filters, stride, dilation) in enumerate(stages, 2):
        stage_train = train and p.frozen_stages < level
        for b in range(repeats):
            x = BottleneckBlock(
                filters,
                strides=stride if b == 0 else 1,
                use_projection=b == 0,
                stride_in_1x1=p.stride_in_1x1,
                dilation=dilation,
                name=f"stage{level}_block{b}",
                **kw,
            )(x, stage_train)
        x = freeze(x, level)
        features[level] = x
    return features


def build_resnet(model_config: ml_collections.ConfigDict) -> ResNet:
    """The ResNet described by ``config.model``: ``backbone.{depth, stride_in_1x1, norm, frozen_stages,
    bn_epsilon, zero_init_residual}`` (``bn_epsilon`` None: ``norm.epsilon``), ``norm.momentum``, paddings and
    dtype."""
    b = model_config.backbone
    bn_epsilon = b.get("bn_epsilon")
    return ResNet(
        depth=b.get("depth", 50),
        stride_in_1x1=b.get("stride_in_1x1", False),
        norm=b.get("norm", "batch"),
        frozen_stages=b.get("frozen_stages", 0),
        activation=model_config.get("activation", "relu"),
        bn_momentum=model_config.norm.momentum,
        bn_epsilon=model_config.norm.epsilon if bn_epsilon is None else bn_epsilon,
        conv_padding=model_config.get("conv_padding", "same"),
        pool_padding=model_config.get("pool_padding", "same"),
        dtype={"float32": None, "bfloat16": "bfloat16"}[model_config.get("dtype", "float32")],
        zero_init_residual=b.get("zero_init_residual", False),
    )
