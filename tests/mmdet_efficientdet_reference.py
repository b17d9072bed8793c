"""PyTorch reference for the mmdetection-v1.1 EfficientDet D0-D5 of ``lucifer443/EfficientDet-Pytorch``.

A self-contained, pure-torch re-implementation (no mmcv / mmdet) whose ``state_dict()`` keys, shapes,
parameter sharing and eval-mode forward equal those of the models built by that repository's configs,
so checkpoints trained with it can be checked for parity against the JAX port.

Sources read (written independently from them, not copied):

* ``lucifer443/EfficientDet-Pytorch`` @ 24742c011bca1b7b72a828d3d86191a9bbbcd363 (2020-05-02, HEAD;
  the whole repo): ``mmdet/models/backbones/efficientnet.py`` (a copy of lukemelas'
  EfficientNet-PyTorch of early 2020, adapted to mmdet norms), ``mmdet/models/necks/bifpn.py``,
  ``mmdet/models/anchor_heads/retina_sepconv_head.py``, ``mmdet/models/utils/effdet_utils.py``
  (Swish, ``SeparableConv2d``), ``configs/efficientdet/efficientdet_d0_4gpu.py`` and
  ``efficientdet_d{1,2,3,4,5}_8gpu.py``, ``README.md`` (parameter counts).
* mmdetection v1.1.0+8732ed9, which the README says to copy these files into; read from the v1.x
  fork Sense-X/TSD (same files): ``mmdet/ops/conv_module.py`` (ConvModule: conv -> norm -> act,
  ``bias='auto'``, here always ``bias=True`` and ``act_cfg=None``), ``mmdet/ops/norm.py`` (BN and
  SyncBN both named ``bn``), ``mmdet/models/anchor_heads/anchor_head.py`` (sigmoid:
  ``cls_out_channels = num_classes - 1``, ``num_anchors = len(ratios) * len(scales)``),
  ``mmdet/core/anchor/anchor_generator.py``, ``mmdet/core/bbox/transforms.py`` (delta2bbox).
* For the comparison: google/automl @ 6a54c8741e7c3265d4547c4f35f47a0391122dc5
  ``efficientdet/hparams_config.py``, ``efficientdet/tf2/{efficientdet_keras,anchors,fpn_configs}.py``,
  ``efficientdet/utils.py``, ``efficientdet/backbone/efficientnet_model.py``.

The detector is mmdet v1 ``RetinaNet`` (``backbone.*``, ``neck.*``, ``bbox_head.*``). Every norm is
``SyncBN`` (D0) or ``BN`` (D1-D5) with ``momentum=0.01, eps=1e-3`` (config line 3); here
``nn.BatchNorm2d`` with the same eps / momentum: identical in eval mode, identical state_dict keys.
The BiFPN's own default norm (momentum 0.003, eps 1e-4) and the EfficientNet GlobalParams
(0.99 / 1e-3) are never used: the config's ``norm_cfg`` is passed to all three parts.

state_dict keys (D0; ``{i}`` block, ``{s}`` BiFPN stack, ``{n}`` node, ``{j}`` node input,
``{l}`` level 0..4 = P3..P7, ``{k}`` tower conv; BN = weight, bias, running_mean, running_var,
num_batches_tracked)::

    backbone._conv_stem.weight                                    [32, 3, 3, 3]   (no bias)
    backbone._bn0.<BN>
    backbone._blocks.{i}._expand_conv.weight  /  ._bn0.<BN>       (absent when expand_ratio == 1)
    backbone._blocks.{i}._depthwise_conv.weight  /  ._bn1.<BN>    [C, 1, k, k]    (no bias)
    backbone._blocks.{i}._se_reduce.{weight,bias}  /  ._se_expand.{weight,bias}
    backbone._blocks.{i}._project_conv.weight  /  ._bn2.<BN>
    neck.extra_ops.0.conv.conv.{weight,bias}  /  neck.extra_ops.0.conv.bn.<BN>   (C5 -> P6; P7 has none)
    neck.stack_bifpns.{s}.top_down_merge.{n}.weight               [2]  fusion weights
    neck.stack_bifpns.{s}.top_down_merge.{n}.conv.depthwise.weight          [C, 1, 3, 3] (no bias)
    neck.stack_bifpns.{s}.top_down_merge.{n}.conv.pointwise.conv.{weight,bias}
    neck.stack_bifpns.{s}.top_down_merge.{n}.conv.pointwise.bn.<BN>
    neck.stack_bifpns.{s}.top_down_merge.{n}.resample_ops.{j}.conv.conv.{weight,bias}  (stack 0 only,
    neck.stack_bifpns.{s}.top_down_merge.{n}.resample_ops.{j}.conv.bn.<BN>             backbone inputs)
    neck.stack_bifpns.{s}.bottom_up_merge.{n}....                 (same layout; weight [3], P7: [2])
    bbox_head.{cls,reg}_convs.{l}.{k}.depthwise.weight            shared by all {l}, stored per {l}
    bbox_head.{cls,reg}_convs.{l}.{k}.pointwise.conv.{weight,bias} shared by all {l}, stored per {l}
    bbox_head.{cls,reg}_convs.{l}.{k}.pointwise.bn.<BN>           one BN per level
    bbox_head.retina_cls.depthwise.weight, bbox_head.retina_cls.pointwise.conv.{weight,bias}
    bbox_head.retina_reg.depthwise.weight, bbox_head.retina_reg.pointwise.conv.{weight,bias}

``top_down_merge.{0,1,2,3}`` are the nodes P6_td, P5_td, P4_td, P3_out and
``bottom_up_merge.{0,1,2,3}`` are P4_out, P5_out, P6_out, P7_out.

Semantic differences from google/automl's EfficientDet (and the same-looking parts that are not
different, so nobody has to check them again). ``eff`` = efficientnet.py, ``bifpn`` = bifpn.py,
``head`` = retina_sepconv_head.py, ``utils`` = effdet_utils.py, ``cfg`` = the D-variant config.

1. Backbone padding: ``Conv2dStaticSamePadding`` (eff L57-63, L83-106) because
   ``get_model_params`` always passes the classification resolution as ``image_size`` (eff L333-339;
   224/240/260/300/380/456 for b0-b5). The pad of every conv is computed ONCE from that resolution,
   not from the real feature size, and never updated per block: stride-1 k x k convs pad k // 2 on
   both sides, stride-2 3x3 convs pad (0 before, 1 after), stride-2 5x5 convs (1 before, 2 after),
   1x1 convs none. This is TF 'SAME' (automl) exactly when every stride-2 conv sees an even size,
   i.e. H, W multiples of 32 -- always true for the fixed 512..1280 (and any multiple-of-128) input;
   for other sizes the two differ. The padding modules have no state.
2. Down-sampling max pools (P6 from C5, P7 from P6 and every bottom-up BiFPN edge, bifpn L51-60):
   ``F.max_pool2d(kernel=s + 1, stride=s, padding=1)`` with ``s = W_in // W_target`` (always 2), i.e.
   symmetric -inf padding: output i covers rows 2i-1..2i+1. automl pools 3x3/2 'SAME', which for even
   sizes pads (0, 1): rows 2i..2i+2. Not the same function (shifted by one pixel).
3. Resampling targets are FIXED sizes from ``target_size_list`` (cfg; = img_size / 8 ... / 128),
   not the actual neighbour's size (bifpn L40, L51-60): an input is returned unchanged if its size
   equals the target, nearest-upsampled to it if smaller (``torch.Size <``: lexicographic), max-pooled
   if larger. The test pipeline pads every image to img_size x img_size (cfg ``Pad``), so the network
   only ever runs at that one size. ``build_mmdet_efficientdet(image_size=...)`` changes the targets
   for small tests (a multiple of 128). automl resizes to the real shapes (same result at the native
   size). Upsampling is nearest in both.
4. BN: momentum 0.01 (torch) / eps 1e-3 everywhere = automl's Keras momentum 0.99 / eps 1e-3: same.
   D0 uses SyncBN, D1-D5 BN: identical in eval.
5. Activation: swish (``MemoryEfficientSwish`` = x * sigmoid(x), utils L7-23) after the stem BN,
   the MBConv expand and depthwise BNs and the SE reduce conv (sigmoid gate); on the fused sum
   BEFORE each BiFPN node's separable conv (bifpn L33); after each head tower BN (utils L45-60). No
   activation after the 1x1 resample convs, after P6/P7, after a BiFPN node's BN or in the
   predictors. Same as automl (act_type swish, conv_bn_act_pattern False).
6. Where biases are: backbone convs none except the SE 1x1 convs (eff L157-158); every
   ``SeparableConv2d`` = depthwise 3x3 (pad 1, no bias) + ``pointwise`` ConvModule 1x1 conv WITH
   bias (bifpn L15, head L60/L70, predictors L85/L88) followed by BN (none in the predictors);
   resample / P6 1x1 convs have a bias AND BN (``ConvModule(bias=True, norm_cfg)``, bifpn L43-49).
   automl: SeparableConv2D(use_bias=True) then BN, Conv2D 1x1 (bias) then BN: the same parameters.
7. Fusion: fast normalised fusion ``w = relu(weight); w / (sum(w) + 1e-4)``, weights initialised
   to 1, then ``conv(swish(sum_i w_i * resample_i(x_i)))`` (bifpn L12-34): automl 'fastattn' with
   eps 0.0001 (efficientdet_keras.py L90-99) -- the same. But the ORDER of a node's inputs (of its
   ``weight`` entries and ``resample_ops``) differs (bifpn L86-111 vs fpn_configs.py L38-45):
   P6_td = [P7_in, P6_in] (automl [P6_in, P7_in]); P5_td, P4_td, P3_out = [upsampled higher node,
   lateral input] (automl [lateral, higher]); P4_out, P5_out, P6_out = [td node of that level,
   lateral input, pooled lower output] (automl [lateral, td node, lower output]); P7_out =
   [P7_in, pooled P6_out] (same as automl). Laterals that need a 1x1 conv (stack 0: C3, C4, C5)
   get a separate conv + BN per edge, as in automl.
8. P6 / P7 (bifpn L148-154, L175-176): ``extra_ops.0`` = 1x1 conv (bias) + BN on C5 then the
   3x3/2 pad-1 max pool; ``extra_ops.1`` = the max pool only (channels already match): automl's
   resample_p6 / resample_p7 apart from the pool padding (item 2).
9. Backbone outputs: ``out_indices=[4, 6, 8]`` = the last blocks of block groups 3, 5 and 7 (eff
   L409-416): strides 8/16/32, 40/112/320 channels for b0, as automl's reduction_3/4/5. The
   EfficientNet head conv (1280) and classifier are not built (eff L419-428).
10. Drop connect (train only, eff L46-55, L449-452): rate ``0.2 * idx / num_blocks``; eval is
    identical to automl. Source quirk: the first block of each group keeps ``stride`` as a list
    (``[1] == 1`` is False, eff L189), so it never has a residual -- no effect, because those
    blocks always change the channel count.
11. SE (eff L155-183): squeezed = ``max(1, int(input_filters * 0.25))``, reduce/expand 1x1 convs with
    bias, swish between, sigmoid gate: same as automl.
12. Head (head L43-88, L103-117): ``stacked_convs`` separable convs (3 for D0-D2, 4 for D3-D5, as
    automl) per branch, depthwise and pointwise conv shared by all levels, BN per level (as automl),
    swish; predictors ``retina_cls`` / ``retina_reg`` are separable convs (bias, no BN) shared by all
    levels. Classes: sigmoid focal loss with ``num_classes=81`` including background, so
    ``retina_cls`` outputs ``9 * 80`` channels; channel ``a * 80 + c`` is contiguous label ``c + 1``
    (the ``c``-th COCO category in id order). automl: ``9 * 90`` channels, ``c`` = category id c + 1.
    Hence parameter counts are automl's minus ``9 * 10 * (W_bifpn + 1)`` (predictor pointwise conv).
13. Anchors (mmdet v1 ``AnchorGenerator``, not a module; ``mmdet_anchors`` below): base size = stride
    (8..128), scales ``4 * 2**(i / 3)`` (octave_base_scale 4, scales_per_octave 3, cfg L29-31),
    ratios [0.5, 1, 2] are h / w (h = base * scale * sqrt(r), w = base * scale / sqrt(r)); per
    location anchor ``a = ratio_index * 3 + scale_index`` (ratio-major, despite ``scale_major=True``);
    centre ``(stride - 1) / 2 + stride * (x, y)``; corners ``ctr -/+ 0.5 * (size - 1)`` rounded to
    integers for the base anchors; (x1, y1, x2, y2); locations row-major, anchors fastest. automl
    (tf2/anchors.py L117-157): scale-major ``a = scale_index * 3 + aspect_index`` with aspects
    [1.0, 2.0, 0.5] as w / h, centre ``stride / 2 + stride * (x, y)``, unrounded sizes, (y1, x1, y2, x2).
    mmdet anchor (r, s) = automl anchor (s, [1, 0, 2][r]) up to the rounding / "+1" convention.
14. Box deltas: channel ``a * 4 + k`` is (dx, dy, dw, dh), means 0, stds 1 (cfg L32-34), decoded
    with "+1" pixel sizes ``pw = x2 - x1 + 1``, ``x1' = gx - gw / 2 + 0.5``, ``x2' = gx + gw / 2 - 0.5``
    and dw, dh clamped to ``|log(16 / 1000)|`` (transforms.py delta2bbox). automl: (dy, dx, dh, dw),
    continuous sizes, no clamp.
15. Input: RGB, mean [123.675, 116.28, 103.53], std [58.395, 57.12, 57.375] on 0..255 (cfg L63-64) --
    numerically automl's mean_rgb / stddev_rgb (0.485 * 255, ... / 0.229 * 255, ...). Resize keeping
    the aspect ratio so the image fits img_size x img_size, pad bottom/right to img_size x img_size
    (cfg L81-95), as automl's eval. (The D0 config initialises the backbone from AdvProp weights,
    ``adv-efficientnet-b0``, which were trained on [-1, 1] inputs; the detector still uses mean/std.)
16. Training-only, not modelled: focal loss gamma 1.5, alpha 0.25 (= automl); SmoothL1 beta 0.11,
    weight 1 (automl: Huber delta 0.1 times box_loss_weight 50); MaxIoUAssigner 0.5 / 0.5,
    min_pos_iou 0. Test: ``nms_pre=1000`` per level, score_thr 0.05, class-wise NMS 0.5, 100 per image.
17. Config bug: ``efficientdet_d2_8gpu.py`` keeps D0's ``in_channels=[40, 112, 320]`` although
    efficientnet-b2 gives [48, 120, 352]; a model built from it has 1x1 resample convs of the wrong
    input width and cannot run (its README count, 8.09M, is that of the corrected model). By default
    ``build_mmdet_efficientdet`` takes the neck widths from the backbone; pass
    ``neck_in_channels=VARIANTS['d2']['neck_in_channels']`` for the literal config's shapes.

Parameter counts (``trainable_parameter_count``, shared head convs once, 81 classes), vs README:
D0 3,874,217 (3.87M), D1 6,617,888 (6.62M), D2 8,086,869 (8.09M), D3 12,017,806 (12.02M),
D4 20,703,425 (20.7M), D5 33,627,305 (33.63M): each is automl's 90-class count minus 90 * (W + 1).

Checked (not a test here): effdet's ``tf_efficientdet_d0`` (automl in PyTorch, TF 'SAME'), randomised
with ``torch_reference.randomize_`` and copied into this D0 at 128x128 (backbone keys in order,
node inputs permuted as in item 7): backbone features agree to 2e-5; the head outputs agree to
3e-4 (relative 5e-6) once ``Resample``'s pool is switched to TF 'SAME' padding, and differ by O(10)
with the source's symmetric pool padding -- item 2 is the only difference in the eval forward
apart from the output-layout conventions (items 12-14). The repo released no checkpoint (README
"Notice" 1), so the keys were derived from the source, not read from a file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # torch convention (Keras 0.99)

# efficientnet_params: (width, depth, classification resolution = static padding image size).
EFFICIENTNET_PARAMS: dict[str, tuple[float, float, int]] = {
    "efficientnet-b0": (1.0, 1.0, 224),
    "efficientnet-b1": (1.0, 1.1, 240),
    "efficientnet-b2": (1.1, 1.2, 260),
    "efficientnet-b3": (1.2, 1.4, 300),
    "efficientnet-b4": (1.4, 1.8, 380),
    "efficientnet-b5": (1.6, 2.2, 456),
}
# The seven block groups: (repeats, kernel, stride, expand_ratio, input_filters, output_filters, se_ratio).
BLOCK_GROUPS: tuple[tuple[int, int, int, int, int, int, float], ...] = (
    (1, 3, 1, 1, 32, 16, 0.25),
    (2, 3, 2, 6, 16, 24, 0.25),
    (2, 5, 2, 6, 24, 40, 0.25),
    (3, 3, 2, 6, 40, 80, 0.25),
    (3, 5, 1, 6, 80, 112, 0.25),
    (4, 5, 2, 6, 112, 192, 0.25),
    (1, 3, 1, 6, 192, 320, 0.25),
)
DEPTH_DIVISOR = 8
DROP_CONNECT_RATE = 0.2

# The configs/efficientdet/*.py values. neck_in_channels is the config's literal BiFPN in_channels
# (wrong for d2, see the module docstring); target_size_list = img_size // (8, 16, 32, 64, 128).
VARIANTS: dict[str, dict[str, Any]] = {
    "d0": dict(arch="efficientnet-b0", neck_in_channels=(40, 112, 320), fpn_channels=64, stack=3,
               stacked_convs=3, img_size=512),
    "d1": dict(arch="efficientnet-b1", neck_in_channels=(40, 112, 320), fpn_channels=88, stack=4,
               stacked_convs=3, img_size=640),
    "d2": dict(arch="efficientnet-b2", neck_in_channels=(40, 112, 320), fpn_channels=112, stack=5,
               stacked_convs=3, img_size=768),
    "d3": dict(arch="efficientnet-b3", neck_in_channels=(48, 136, 384), fpn_channels=160, stack=6,
               stacked_convs=4, img_size=896),
    "d4": dict(arch="efficientnet-b4", neck_in_channels=(56, 160, 448), fpn_channels=224, stack=7,
               stacked_convs=4, img_size=1024),
    "d5": dict(arch="efficientnet-b5", neck_in_channels=(64, 176, 512), fpn_channels=288, stack=7,
               stacked_convs=4, img_size=1280),
}  # fmt: skip
README_PARAMS = {"d0": 3.87e6, "d1": 6.62e6, "d2": 8.09e6, "d3": 12.02e6, "d4": 20.7e6, "d5": 33.63e6}

OUT_INDICES = (4, 6, 8)  # backbone stages -> C3, C4, C5
ANCHOR_STRIDES = (8, 16, 32, 64, 128)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # h / w
OCTAVE_BASE_SCALE = 4
SCALES_PER_OCTAVE = 3
FUSION_EPS = 1e-4


class _NormCfg:
    def __init__(self, eps: float, momentum: float):
        self.eps, self.momentum = eps, momentum

    def __call__(self, channels: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class Swish(nn.Module):
    """``MemoryEfficientSwish`` / ``Swish`` of effdet_utils.py (the same function; no state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swish(x)


# ----------------------------------------------------------------------------------------------
# Backbone: lukemelas EfficientNet-PyTorch layout.
# ----------------------------------------------------------------------------------------------


def round_filters(filters: int, width: float) -> int:
    scaled = filters * width
    new = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if new < 0.9 * scaled:
        new += DEPTH_DIVISOR
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


class Conv2dStaticSamePadding(nn.Conv2d):
    """Conv whose zero padding is fixed at construction from ``image_size`` (TF 'SAME' for that size)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, image_size: int, stride: int = 1, groups: int = 1, bias: bool = True
    ):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=bias)
        out = math.ceil(image_size / stride)
        pad = max((out - 1) * stride + kernel - image_size, 0)
        if pad > 0:
            self.static_padding: nn.Module = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        else:
            self.static_padding = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand, BN, swish], kxk depthwise, BN, swish, SE, 1x1 project, BN, skip."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        se_ratio: float,
        image_size: int,
        norm: _NormCfg,
    ):
        super().__init__()
        self.expand_ratio, self.stride, self.cin, self.cout = expand_ratio, stride, cin, cout
        mid = cin * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = Conv2dStaticSamePadding(cin, mid, 1, image_size, bias=False)
            self._bn0 = norm(mid)
        self._depthwise_conv = Conv2dStaticSamePadding(mid, mid, kernel, image_size, stride, groups=mid, bias=False)
        self._bn1 = norm(mid)
        squeezed = max(1, int(cin * se_ratio))
        self._se_reduce = Conv2dStaticSamePadding(mid, squeezed, 1, image_size)
        self._se_expand = Conv2dStaticSamePadding(squeezed, mid, 1, image_size)
        self._project_conv = Conv2dStaticSamePadding(mid, cout, 1, image_size, bias=False)
        self._bn2 = norm(cout)
        self._swish = Swish()

    def forward(self, inputs: torch.Tensor, drop_connect_rate: float = 0.0) -> torch.Tensor:
        x = inputs
        if self.expand_ratio != 1:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        gate = self._se_expand(self._swish(self._se_reduce(F.adaptive_avg_pool2d(x, 1))))
        x = torch.sigmoid(gate) * x
        x = self._bn2(self._project_conv(x))
        if self.stride == 1 and self.cin == self.cout:
            if drop_connect_rate and self.training:  # lukemelas drop_connect, per sample
                keep = 1.0 - drop_connect_rate
                mask = torch.floor(keep + torch.rand([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device))
                x = x / keep * mask
            x = x + inputs
        return x


class EfficientNet(nn.Module):
    """Images NCHW -> (C3, C4, C5): the last blocks of the block groups named by ``out_indices``."""

    def __init__(
        self,
        arch: str = "efficientnet-b0",
        out_indices: Sequence[int] = OUT_INDICES,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
        drop_connect_rate: float = DROP_CONNECT_RATE,
    ):
        super().__init__()
        width, depth, image_size = EFFICIENTNET_PARAMS[arch]
        norm = _NormCfg(bn_eps, bn_momentum)
        self.drop_connect_rate = drop_connect_rate
        stem = round_filters(32, width)
        self._conv_stem = Conv2dStaticSamePadding(3, stem, 3, image_size, stride=2, bias=False)
        self._bn0 = norm(stem)
        self._blocks = nn.ModuleList()
        group_ends, channels = [], []
        for repeats, kernel, stride, expand, cin, cout, se in BLOCK_GROUPS:
            cin, cout, repeats = round_filters(cin, width), round_filters(cout, width), round_repeats(repeats, depth)
            for r in range(repeats):
                self._blocks.append(
                    MBConvBlock(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand, se, image_size,
                                norm)
                )  # fmt: skip
            group_ends.append(len(self._blocks))
            channels.append(cout)
        # Stage s (2..8) is block group s - 2; its output is that group's last block.
        self.out_block_indices = [group_ends[s - 2] - 1 for s in out_indices]
        self.out_channels = [channels[s - 2] for s in out_indices]
        self._swish = Swish()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self._swish(self._bn0(self._conv_stem(images)))
        outs = []
        for idx, block in enumerate(self._blocks):
            x = block(x, self.drop_connect_rate * idx / len(self._blocks))
            if idx in self.out_block_indices:
                outs.append(x)
        return outs


# ----------------------------------------------------------------------------------------------
# BiFPN neck.
# ----------------------------------------------------------------------------------------------


class ConvModule(nn.Module):
    """mmdet ConvModule as used here: ``conv`` (with bias) -> optional ``bn``; no activation."""

    def __init__(self, cin: int, cout: int, norm: _NormCfg | None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=True)
        if norm is not None:
            self.bn = norm(cout)
        self.with_norm = norm is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bn(x) if self.with_norm else x


class SeparableConv2d(nn.Module):
    """effdet_utils ``SeparableConv2d``: 3x3 depthwise (pad 1, no bias) -> 1x1 conv (bias) [-> BN] [-> swish]."""

    def __init__(self, cin: int, cout: int, norm: _NormCfg | None, activation: bool = False):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = ConvModule(cin, cout, norm)
        self.act = Swish() if activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.depthwise(x))
        return self.act(x) if self.act is not None else x


class Resample(nn.Module):
    """Optional 1x1 conv + BN (channels differ), then resize to the FIXED ``target_size``."""

    def __init__(self, cin: int, cout: int, target_size: int, norm: _NormCfg):
        super().__init__()
        self.target_size = (target_size, target_size)
        self.is_conv = cin != cout
        if self.is_conv:
            self.conv = ConvModule(cin, cout, norm)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        if size == self.target_size:
            return x
        if size < self.target_size:  # lexicographic, as torch.Size comparison in the source
            return F.interpolate(x, size=self.target_size, mode="nearest")
        assert x.shape[-2] % self.target_size[0] == 0 and x.shape[-1] % self.target_size[1] == 0
        stride = x.shape[-1] // self.target_size[1]
        return F.max_pool2d(x, kernel_size=stride + 1, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            x = self.conv(x)
        return self._resize(x)


class WeightedMerge(nn.Module):
    """A BiFPN node: resample each input, fast normalised fusion, swish, separable conv + BN."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, target_size: int, norm: _NormCfg):
        super().__init__()
        self.conv = SeparableConv2d(out_channels, out_channels, norm)
        self.eps = FUSION_EPS
        self.num_ins = len(in_channels)
        self.weight = nn.Parameter(torch.ones(self.num_ins))
        self.relu = nn.ReLU(inplace=False)
        self.swish = Swish()
        self.resample_ops = nn.ModuleList(Resample(c, out_channels, target_size, norm) for c in in_channels)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        assert len(inputs) == self.num_ins
        w = self.relu(self.weight)
        w = w / (w.sum() + self.eps)
        x = 0
        for i in range(self.num_ins):
            x = x + w[i] * self.resample_ops[i](inputs[i])
        return self.conv(self.swish(x))


class BiFPNLayer(nn.Module):
    """One BiFPN cell over 5 levels (``bifpn_layer`` in the source)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, target_sizes: Sequence[int], norm: _NormCfg):
        super().__init__()
        n = self.num_outs = len(target_sizes)
        self.top_down_merge = nn.ModuleList()
        for i in range(n - 1, 0, -1):  # nodes P6_td, P5_td, P4_td, P3_out
            ins = [in_channels[i], in_channels[i - 1]] if i == n - 1 else [out_channels, in_channels[i - 1]]
            self.top_down_merge.append(WeightedMerge(ins, out_channels, target_sizes[i - 1], norm))
        self.bottom_up_merge = nn.ModuleList()
        for i in range(n - 1):  # nodes P4_out, P5_out, P6_out, P7_out
            ins = [out_channels, in_channels[i + 1], out_channels] if i < n - 2 else [in_channels[-1], out_channels]
            self.bottom_up_merge.append(WeightedMerge(ins, out_channels, target_sizes[i + 1], norm))

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        n = self.num_outs
        assert len(inputs) == n
        top_down: list[torch.Tensor] = []
        for k, i in enumerate(range(n - 1, 0, -1)):
            higher = inputs[i] if i == n - 1 else top_down[-1]
            top_down.append(self.top_down_merge[k]([higher, inputs[i - 1]]))
        outputs = top_down[::-1]  # [P3_out, P4_td, P5_td, P6_td]
        for i in range(1, n - 1):
            outputs[i] = self.bottom_up_merge[i - 1]([outputs[i], inputs[i], outputs[i - 1]])
        outputs.append(self.bottom_up_merge[-1]([inputs[-1], outputs[-1]]))
        return outputs


class BiFPN(nn.Module):
    """(C3, C4, C5) -> P6 = pool(BN(conv1x1(C5))), P7 = pool(P6) -> ``stack`` BiFPN cells -> P3..P7."""

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        target_sizes: Sequence[int],
        stack: int,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ):
        super().__init__()
        norm = _NormCfg(bn_eps, bn_momentum)
        channels = list(in_channels)
        num_outs = len(target_sizes)
        self.extra_ops = nn.ModuleList()
        for i in range(len(channels), num_outs):
            self.extra_ops.append(Resample(channels[-1], out_channels, target_sizes[i], norm))
            channels.append(out_channels)
        self.stack_bifpns = nn.ModuleList()
        for _ in range(stack):
            self.stack_bifpns.append(BiFPNLayer(channels, out_channels, target_sizes, norm))
            channels = [out_channels] * num_outs

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outs = list(inputs)
        for op in self.extra_ops:
            outs.append(op(outs[-1]))
        for layer in self.stack_bifpns:
            outs = layer(outs)
        return outs


# ----------------------------------------------------------------------------------------------
# Head and detector.
# ----------------------------------------------------------------------------------------------


class RetinaSepConvHead(nn.Module):
    """Separable-conv towers (convs shared across levels, BN per level, swish) and separable predictors."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int,
        stacked_convs: int,
        num_ins: int = len(ANCHOR_STRIDES),
        num_anchors: int = len(ANCHOR_RATIOS) * SCALES_PER_OCTAVE,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ):
        super().__init__()
        norm = _NormCfg(bn_eps, bn_momentum)
        self.cls_out_channels = num_classes - 1  # sigmoid: no background output
        self.num_anchors = num_anchors
        self.relu = nn.ReLU(inplace=True)  # registered by the source, unused
        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        for _ in range(num_ins):
            cls_tower, reg_tower = nn.ModuleList(), nn.ModuleList()
            for k in range(stacked_convs):
                cin = in_channels if k == 0 else feat_channels
                cls_tower.append(SeparableConv2d(cin, feat_channels, norm, activation=True))
                reg_tower.append(SeparableConv2d(cin, feat_channels, norm, activation=True))
            self.cls_convs.append(cls_tower)
            self.reg_convs.append(reg_tower)
        for k in range(stacked_convs):  # share level 0's depthwise and pointwise conv (not the BN)
            for lvl in range(1, num_ins):
                for towers in (self.cls_convs, self.reg_convs):
                    towers[lvl][k].depthwise = towers[0][k].depthwise
                    towers[lvl][k].pointwise.conv = towers[0][k].pointwise.conv
        self.retina_cls = SeparableConv2d(feat_channels, num_anchors * self.cls_out_channels, None)
        self.retina_reg = SeparableConv2d(feat_channels, num_anchors * 4, None)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cls_scores, bbox_preds = [], []
        for i, x in enumerate(feats):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs[i]:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs[i]:
                reg_feat = conv(reg_feat)
            cls_scores.append(self.retina_cls(cls_feat))
            bbox_preds.append(self.retina_reg(reg_feat))
        return cls_scores, bbox_preds


class RetinaNet(nn.Module):
    """mmdet v1 ``RetinaNet``: forward returns the raw (cls_scores, bbox_preds), NCHW, levels P3..P7."""

    def __init__(self, backbone: EfficientNet, neck: BiFPN, bbox_head: RetinaSepConvHead):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.bbox_head = bbox_head

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.bbox_head(self.neck(self.backbone(images)))


def build_mmdet_efficientdet(
    variant: str,
    num_classes: int = 81,
    *,
    image_size: int | None = None,
    neck_in_channels: Sequence[int] | None = None,
    bn_eps: float = BN_EPS,
    bn_momentum: float = BN_MOMENTUM,
) -> RetinaNet:
    """The repo's EfficientDet ``variant`` in d0..d5 (``num_classes`` includes the background).

    ``image_size`` (default: the config's img_size) fixes the BiFPN resampling targets and must then
    be the input's H = W; a multiple of 128. ``neck_in_channels`` defaults to the backbone's real
    widths (= the config's, except d2's broken config).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientDet {variant!r}; choose from {sorted(VARIANTS)}")
    cfg = VARIANTS[variant]
    size = cfg["img_size"] if image_size is None else image_size
    if size % ANCHOR_STRIDES[-1]:
        raise ValueError(f"image_size {size} must be a multiple of {ANCHOR_STRIDES[-1]}")
    backbone = EfficientNet(cfg["arch"], bn_eps=bn_eps, bn_momentum=bn_momentum)
    in_channels = list(backbone.out_channels if neck_in_channels is None else neck_in_channels)
    width = cfg["fpn_channels"]
    neck = BiFPN(in_channels, width, [size // s for s in ANCHOR_STRIDES], cfg["stack"], bn_eps, bn_momentum)
    head = RetinaSepConvHead(num_classes, width, width, cfg["stacked_convs"], bn_eps=bn_eps, bn_momentum=bn_momentum)
    return RetinaNet(backbone, neck, head)


def trainable_parameter_count(model: nn.Module) -> int:
    """As mmcv's ``get_model_parameters_number``: ``parameters()`` yields shared head convs once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mmdet_anchors(
    featmap_size: tuple[int, int],
    stride: int,
    octave_base_scale: float = OCTAVE_BASE_SCALE,
    scales_per_octave: int = SCALES_PER_OCTAVE,
    ratios: Sequence[float] = ANCHOR_RATIOS,
) -> torch.Tensor:
    """mmdet v1 ``AnchorGenerator(stride, scales, ratios).grid_anchors``: [H * W * A, 4] (x1, y1, x2, y2).

    Row ``(y * W + x) * A + a`` with ``a = ratio_index * scales_per_octave + scale_index``; matches
    ``cls_score.permute(0, 2, 3, 1).reshape(N, -1, num_classes - 1)``.
    """
    scales = torch.tensor([octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)])
    h_ratios = torch.sqrt(torch.tensor(list(ratios), dtype=torch.float32))
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
    ctr = 0.5 * (stride - 1)
    base = torch.stack([ctr - 0.5 * (ws - 1), ctr - 0.5 * (hs - 1), ctr + 0.5 * (ws - 1), ctr + 0.5 * (hs - 1)], -1)
    base = base.round()
    feat_h, feat_w = featmap_size
    shift_x = torch.arange(feat_w, dtype=torch.float32) * stride
    shift_y = torch.arange(feat_h, dtype=torch.float32) * stride
    xx, yy = shift_x.repeat(feat_h), shift_y[:, None].repeat(1, feat_w).reshape(-1)
    shifts = torch.stack([xx, yy, xx, yy], -1)
    return (base[None] + shifts[:, None]).reshape(-1, 4)


if __name__ == "__main__":
    for name in VARIANTS:
        model = build_mmdet_efficientdet(name)
        count = trainable_parameter_count(model)
        keys = list(model.state_dict())
        print(f"{name}: {count:,} trainable parameters (README {README_PARAMS[name] / 1e6:.2f}M), "
              f"{len(keys)} state_dict keys")  # fmt: skip
        if name == "d2":
            literal = build_mmdet_efficientdet(name, neck_in_channels=VARIANTS[name]["neck_in_channels"])
            print(f"  d2 with the config's literal in_channels {VARIANTS[name]['neck_in_channels']}: "
                  f"{trainable_parameter_count(literal):,} (cannot run a forward)")  # fmt: skip
            del literal
        if name == "d0":
            print("  first keys:", *keys[:10], sep="\n    ")
            print("  last keys:", *keys[-10:], sep="\n    ")
        del model

    size = 128
    model = build_mmdet_efficientdet("d0", image_size=size).eval()
    with torch.no_grad():
        cls_scores, bbox_preds = model(torch.randn(1, 3, size, size))
    print(f"d0 forward at {size}x{size}:")
    for level, (c, b) in enumerate(zip(cls_scores, bbox_preds, strict=True), start=3):
        print(f"  P{level}: cls {tuple(c.shape)}  box {tuple(b.shape)}")


def mmdet_v1_delta2bbox(anchors: torch.Tensor, deltas: torch.Tensor, max_shape: tuple[int, int]) -> torch.Tensor:
    """mmdet v1 ``delta2bbox`` (means 0, stds 1; ``wh_ratio_clip`` 16 / 1000 on both sides; "+1" widths;
    clamped to ``[0, w - 1] x [0, h - 1]``). ``deltas`` (dx, dy, dw, dh)."""
    max_ratio = abs(math.log(16 / 1000))
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw, dh = deltas[:, 2].clamp(min=-max_ratio, max=max_ratio), deltas[:, 3].clamp(min=-max_ratio, max=max_ratio)
    px, py = (anchors[:, 0] + anchors[:, 2]) * 0.5, (anchors[:, 1] + anchors[:, 3]) * 0.5
    pw, ph = anchors[:, 2] - anchors[:, 0] + 1.0, anchors[:, 3] - anchors[:, 1] + 1.0
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + pw * dx, py + ph * dy
    x1, y1 = gx - gw * 0.5 + 0.5, gy - gh * 0.5 + 0.5
    x2, y2 = gx + gw * 0.5 - 0.5, gy + gh * 0.5 - 0.5
    h, w = max_shape
    return torch.stack([x1.clamp(0, w - 1), y1.clamp(0, h - 1), x2.clamp(0, w - 1), y2.clamp(0, h - 1)], -1)


def mmdet_v1_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """mmdet v1 ``nms`` (its CPU kernel): greedy by score, IoU of "+1" pixel boxes, suppress at >= threshold."""
    order = torch.argsort(scores, descending=True)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for position, i in enumerate(order.tolist()):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[position + 1 :]
        w = (torch.minimum(boxes[i, 2], boxes[rest, 2]) - torch.maximum(boxes[i, 0], boxes[rest, 0]) + 1).clamp(min=0)
        h = (torch.minimum(boxes[i, 3], boxes[rest, 3]) - torch.maximum(boxes[i, 1], boxes[rest, 1]) + 1).clamp(min=0)
        inter = w * h
        suppressed[rest[inter / (areas[i] + areas[rest] - inter) >= iou_threshold]] = True
    return torch.tensor(keep, dtype=torch.long)


def mmdet_v1_detections(
    cls_scores: list[torch.Tensor],
    bbox_preds: list[torch.Tensor],
    octave_base_scale: float,
    img_shape: tuple[int, int],
    nms_pre: int = 1000,
    score_thr: float = 0.05,
    iou_threshold: float = 0.5,
    max_per_img: int = 100,
    scale_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet v1 ``AnchorHead.get_bboxes_single`` + ``multiclass_nms`` on one image's per-level NCHW (batch 1)
    sigmoid logits and box deltas, with the seeds' test_cfg: (boxes "+1" x1, y1, x2, y2, scores, labels 0..C-1).
    ``img_shape``: the resized image's (h, w) boxes are clipped to; ``scale_factor``: its ``rescale``, the boxes
    divided by it before NMS (so NMS compares boxes in original pixels)."""
    boxes_all, scores_all = [], []
    for cls_score, bbox_pred, stride in zip(cls_scores, bbox_preds, ANCHOR_STRIDES, strict=True):
        anchors = mmdet_anchors(tuple(cls_score.shape[-2:]), stride, octave_base_scale).to(cls_score.dtype)
        scores = cls_score[0].permute(1, 2, 0).reshape(len(anchors), -1).sigmoid()
        deltas = bbox_pred[0].permute(1, 2, 0).reshape(-1, 4)
        if 0 < nms_pre < scores.shape[0]:
            _, top = scores.max(dim=1)[0].topk(nms_pre)
            anchors, deltas, scores = anchors[top], deltas[top], scores[top]
        boxes_all.append(mmdet_v1_delta2bbox(anchors, deltas, img_shape))
        scores_all.append(scores)
    boxes, scores = torch.cat(boxes_all) / scale_factor, torch.cat(scores_all)
    kept_boxes, kept_scores, labels = [], [], []
    for c in range(scores.shape[1]):
        chosen = scores[:, c] > score_thr
        if not chosen.any():
            continue
        keep = mmdet_v1_nms(boxes[chosen], scores[chosen, c], iou_threshold)
        kept_boxes.append(boxes[chosen][keep])
        kept_scores.append(scores[chosen, c][keep])
        labels.append(torch.full((len(keep),), c, dtype=torch.long))
    boxes, scores, labels = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(labels)
    if len(scores) > max_per_img:
        top = scores.argsort(descending=True)[:max_per_img]
        boxes, scores, labels = boxes[top], scores[top], labels[top]
    return boxes, scores, labels


def mmcv_imrescale(image: np.ndarray, scale: tuple[int, int]) -> tuple[np.ndarray, float]:
    """mmcv 0.x ``imrescale(img, (long, short), return_scale=True)``, mmdetection v1.1's ``Resize(keep_ratio=True)``:
    the factor ``min(long / max(h, w), short / min(h, w))``, sizes ``int(side * factor + 0.5)``, OpenCV bilinear."""
    import cv2

    h, w = image.shape[:2]
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    new_size = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
    return cv2.resize(image, new_size, interpolation=cv2.INTER_LINEAR), factor
