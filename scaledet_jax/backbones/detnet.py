"""DetNet-59 (Li et al., 2018) as guoruoqian/DetNet_pytorch builds it: images -> {2..6: C2..C6}.

ResNet-50's stem and stages 2-4 (3, 4, 6 bottlenecks, widths 64/128/256, projection shortcut on
each stage's first block, stride on the 3x3 conv), then two extra stages that keep stride 16:
each a bottleneck of width 256 (output 1024) with a 1x1 projection shortcut (the seed's
``BottleneckB.extra_conv``) and a 3x3 conv of dilation 2, followed by two identity bottlenecks with
the same dilated 3x3 (``BottleneckA``). Strides of the returned levels: 4, 8, 16, 16, 16.

Levels vs the seed: C2..C6 are the seed's ``layer1..layer5`` (ImageNet model) and
``RCNN_layer1..RCNN_layer5`` (detector, ``RCNN_layer0`` being the stem: conv1, bn1, relu, maxpool).

Semantics of the seed (fields here): PyTorch symmetric padding for convs and the 3x3/2 stem max
pool, BatchNorm eps 1e-5, frozen BN in the detector (``norm='frozen'``: the seed sets every BN to
eval mode and freezes its affine parameters), stem and stage 2 frozen (``cfg.DETNET.FIXED_BLOCKS = 1``
-> ``frozen_stages=2``). ``num_classes > 0`` adds the ImageNet classifier (global average pool +
``fc``; the module then returns the logits), so the released ``detnet59.pth`` maps completely.

Variables: ``stem_conv``, ``stem_norm``, ``stage{l}_block{b}`` (l = 2..6) with ``conv1..3`` /
``norm1..3`` and ``shortcut_conv`` / ``shortcut_norm`` on each stage's first block, ``fc``.
``detnet_source_key`` / ``detnet_fpn_source_key`` name the seed's tensor for each of our variables.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from scaledet_jax import nn as snn
from scaledet_jax.backbones.resnet import STAGE_FILTERS, stem_and_stages

Array = jax.Array

# Blocks per stage (levels 2..6); stages 5 and 6 (the seed's layer4/layer5) have width 256 and dilation 2.
DETNET59_BLOCKS = (3, 4, 6, 3, 3)
DETNET_STAGE_FILTERS = (*STAGE_FILTERS[:3], 256, 256)
DETNET_DILATIONS = (1, 1, 1, 2, 2)
LAYOUTS = ("imagenet", "detector")


class DetNet(nn.Module):
    """DetNet-59: images [B, H, W, 3] -> {level: feature} for levels 2..6 (strides 4, 8, 16, 16, 16).

    ``frozen_stages=k`` (0..6) freezes the stem (k >= 1) and stages 2..k as ResNet's does (outputs
    through ``stop_gradient``, norms in inference mode). With ``num_classes > 0`` it is the ImageNet
    classifier instead: images -> logits [B, num_classes] (global average pool of C6, then ``fc``).
    """

    stage_blocks: tuple[int, ...] = DETNET59_BLOCKS
    # Bottleneck widths of stages 2..6 and the stem's filters; narrower values give a small net of the
    # same structure (the quickstart). Outputs are 4x the width.
    stage_filters: tuple[int, ...] = DETNET_STAGE_FILTERS
    stem_filters: int = 64
    stride_in_1x1: bool = False  # True: MSRA/Caffe ResNet (the papers' FLOP counts); the seed: stride on the 3x3
    norm: str = "frozen"  # the seed's detector; 'batch' for ImageNet training
    frozen_stages: int = 0
    num_classes: int = 0
    activation: str = "relu"
    bn_momentum: float = 0.9  # PyTorch's BatchNorm2d momentum 0.1 in Keras semantics
    bn_epsilon: float = 1e-5
    conv_padding: str = "symmetric"
    pool_padding: str = "symmetric"
    kernel_init: Callable = snn.keras_variance_scaling
    dtype: Any = None
    zero_init_residual: bool = False  # each block's last BN gamma starts at 0 (training from scratch)

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> dict[int, Array] | Array:
        stage_blocks = tuple(self.stage_blocks)
        if len(stage_blocks) != 5 or min(stage_blocks) < 1:
            raise ValueError(f"stage_blocks must be 5 positive counts (levels 2..6), got {stage_blocks}")
        if len(self.stage_filters) != 5 or min(self.stage_filters) < 1:
            raise ValueError(f"stage_filters must be 5 positive widths (levels 2..6), got {tuple(self.stage_filters)}")
        if not 0 <= self.frozen_stages <= 6:
            raise ValueError(f"frozen_stages must be in 0..6, got {self.frozen_stages}")
        features = stem_and_stages(
            self,
            images,
            train,
            stage_blocks=stage_blocks,
            stage_filters=tuple(self.stage_filters),
            # Stages 3 and 4 halve the resolution; the dilated stages 5 and 6 keep stride 16.
            stage_strides=(1, 2, 2, 1, 1),
            stage_dilations=DETNET_DILATIONS,
            stem_filters=self.stem_filters,
        )
        x = features[6]
        if self.num_classes > 0:
            logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(jnp.mean(x, axis=(1, 2)))
            return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        return features


def build_detnet(model_config: ml_collections.ConfigDict) -> DetNet:
    """The DetNet of ``config.model``: ``backbone.{norm, frozen_stages, bn_epsilon, stage_blocks}`` (the seed's
    detector: 'frozen', 2, 1e-5), optional ``backbone.{stage_filters, stem_filters}`` (narrower nets),
    ``norm.momentum``, activation, paddings ('symmetric') and dtype."""
    b = model_config.backbone
    bn_epsilon = b.get("bn_epsilon")
    return DetNet(
        stage_blocks=tuple(b.get("stage_blocks") or DETNET59_BLOCKS),
        stage_filters=tuple(b.get("stage_filters") or DETNET_STAGE_FILTERS),
        stem_filters=b.get("stem_filters") or 64,
        norm=b.get("norm", "frozen"),
        frozen_stages=b.get("frozen_stages", 2),
        activation=model_config.get("activation", "relu"),
        bn_momentum=model_config.norm.momentum,
        bn_epsilon=1e-5 if bn_epsilon is None else bn_epsilon,
        conv_padding=model_config.get("conv_padding", "symmetric"),
        pool_padding=model_config.get("pool_padding", "symmetric"),
        dtype={"float32": None, "bfloat16": "bfloat16"}[model_config.get("dtype", "float32")],
        zero_init_residual=b.get("zero_init_residual", False),
    )


# --- DetNet_pytorch state_dict keys ----------------------------------------------------------------------

_CONV_LEAVES = {"kernel": "weight", "bias": "bias"}
_NORM_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# Our FPN levels -> the seed's _FPN module (lateral 1x1 convs and the two 3x3 smoothing convs).
DETNET_FPN_MODULES = {
    "lateral_6": "RCNN_toplayer",
    "lateral_5": "RCNN_latlayer1",
    "lateral_4": "RCNN_latlayer2",
    "lateral_3": "RCNN_latlayer3",
    "lateral_2": "RCNN_latlayer4",
    "output_3": "RCNN_smooth1",
    "output_2": "RCNN_smooth2",
}


# The seed's RPN scores 3 anchors per location with 6 channels. Its loss reads channels (2a, 2a + 1) as anchor
# a's (background, foreground) logits, but its proposal layer ranks softmax(c_a, c_{a+3}) regrouped by the
# same view (jwyang/fpn.pytorch issue 6): anchor a's ranked probability is sigmoid(c_p - c_q) for (p, q)
# below. A converter reproduces the seed's proposals with one objectness logit per anchor, c_p - c_q.
SEED_RPN_INFERENCE_PAIRS = ((1, 4), (3, 0), (5, 2))
SEED_RPN_TRAINING_PAIRS = ((1, 0), (3, 2), (5, 4))


def detnet_source_key(path: tuple[str, ...], layout: str = "imagenet") -> str | None:
    """The seed's state_dict key for our DetNet variable ``path`` = (collection, module..., leaf), or None.

    ``layout='imagenet'`` (``detnet59.pth``): ``conv1``, ``bn1``, ``layer{l-1}.{b}.conv{1,2,3}`` /
    ``bn{1,2,3}``, shortcuts ``layer{1..3}.0.downsample.{0,1}`` and ``layer{4,5}.0.extra_conv.{0,1}``,
    ``fc``. ``layout='detector'`` (the seed's Faster R-CNN checkpoints): the stem is
    ``RCNN_layer0.{0,1}`` and stage l is ``RCNN_layer{l-1}.0.{b}...`` (each layer wrapped in a
    one-element ``nn.Sequential``); no ``fc``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if len(path) < 3:
        return None
    collection, modules, leaf = path[0], path[1:-1], path[-1]
    is_norm = collection == "batch_stats" or "norm" in modules[-1]
    torch_leaf = (_NORM_LEAVES if is_norm else _CONV_LEAVES).get(leaf)
    if torch_leaf is None:
        return None
    if modules == ("stem_conv",) or modules == ("stem_norm",):
        if layout == "detector":
            return f"RCNN_layer0.{0 if modules[0] == 'stem_conv' else 1}.{torch_leaf}"
        return f"{'conv1' if modules[0] == 'stem_conv' else 'bn1'}.{torch_leaf}"
    if modules == ("fc",) and layout == "imagenet":
        return f"fc.{torch_leaf}"
    if len(modules) != 2:
        return None
    match = re.fullmatch(r"stage([2-6])_block(\d+)", modules[0])
    sub = re.fullmatch(r"(conv|norm)([123])|shortcut_(conv|norm)", modules[1])
    if not match or not sub:
        return None
    level, block = int(match.group(1)), int(match.group(2))
    if sub.group(3):  # the projection shortcut: ResNet's downsample, DetNet's extra_conv on stages 5-6
        name = "extra_conv" if level >= 5 else "downsample"
        torch_module = f"{name}.{0 if sub.group(3) == 'conv' else 1}"
    else:
        torch_module = f"{'conv' if sub.group(1) == 'conv' else 'bn'}{sub.group(2)}"
    layer = f"RCNN_layer{level - 1}.0" if layout == "detector" else f"layer{level - 1}"
    return f"{layer}.{block}.{torch_module}.{torch_leaf}"


def detnet_fpn_source_key(path: tuple[str, ...]) -> str | None:
    """The seed's key for our FPN variable ``path`` = ('params', 'lateral_6' | ..., 'kernel' | 'bias')."""
    if len(path) != 3 or path[0] != "params" or path[1] not in DETNET_FPN_MODULES or path[2] not in _CONV_LEAVES:
        return None
    return f"{DETNET_FPN_MODULES[path[1]]}.{_CONV_LEAVES[path[2]]}"
