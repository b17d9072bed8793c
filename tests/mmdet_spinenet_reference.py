"""PyTorch reference for the mmdetection-v1.1 SpineNet RetinaNet of ``yan-roo/SpineNet-Pytorch``.

A self-contained, pure-torch re-implementation (no mmcv / mmdet) whose ``state_dict()`` keys, shapes
and eval-mode forward equal those of the checkpoints released by that repository, so converted
weights can be checked for parity against the JAX port.

Sources read (written independently from them, not copied):

* ``yan-roo/SpineNet-Pytorch`` @ b3f9e7e523cdef24044a995bf6eeb5a694ba8ed0 (2021-03-18):
  ``mmdet/models/backbones/spinenet.py`` (the backbone; the only model code in that repo) and
  ``configs/spinenet/spinenet_{49S,49_B_8gpu_640,96,143,190}_B_8gpu.py`` (RetinaNet configs).
* mmdetection v1.1.0+8732ed9, which that repo says to copy its files into (README "Installation"):
  ``mmdet/ops/conv_module.py`` (ConvModule: conv -> norm -> act, ``bias='auto'`` = no bias when
  normed, ``act_cfg=dict(type='ReLU')`` by default), ``mmdet/ops/norm.py`` (BN/SyncBN named
  ``bn`` + postfix), ``mmdet/models/backbones/resnet.py`` (``BasicBlock``, ``Bottleneck``,
  ``make_res_layer``), ``mmdet/models/anchor_heads/anchor_head.py`` and ``retina_sepbn_head.py``.
  Read from the stored ``open-mmlab/mmdetection`` index and from v1.x forks (Sense-X/TSD,
  Kenneth-Wong/MMSceneGraph) that carry the same v1.1 files.

The RetinaNet is ``type='RetinaNet'`` with ``neck=None``: ``backbone.*`` then ``bbox_head.*``.
All norms are ``SyncBN(momentum=0.01, eps=1e-3)``; here they are ``nn.BatchNorm2d`` with the same
eps / momentum, which is identical in eval mode and has identical state_dict keys.

Semantic differences from TF Model Garden's SpineNet + RetinaNet
(``official/vision/modeling/backbones/spinenet.py``, ``heads/dense_prediction_heads.py``):

1. Activation is ReLU everywhere (ConvModule default, ``nn.ReLU`` in the residual blocks,
   ``F.relu`` after each merge); the backbone's ``activation`` argument is ignored. Model Garden
   SpineNet recipes use swish.
2. Padding is symmetric PyTorch padding (``k // 2`` on both sides): stem 7x7/2 conv pad 3, stem
   max-pool 3x3/2 pad 1, resample 3x3/2 conv pad 1, all 3x3/1 convs pad 1. Model Garden uses TF
   'SAME', which for even sizes pads stride-2 ops (total - total // 2) after, total // 2 before.
3. Down-sampling by more than 2 levels: one stride-2 3x3 conv then ONE max-pool with
   ``kernel = 3 if scale >= 1/4 else 5``, ``stride = 0.5 / scale``, ``padding = kernel // 2``
   (spinenet.py L106-116). For 2 levels that is a 3x3/2 pad-1 pool (Model Garden: 3x3/2 SAME).
   For 3 levels (only merge_ops[13].resample_ops[0], level 4 -> 7) it is a single 5x5/4 pad-2
   pool, whereas Model Garden applies two 3x3/2 SAME pools: not the same function.
4. Endpoints are 1x1 conv + BN with NO activation (``act_cfg=None``, L213-217); Model Garden
   applies the activation after the endpoint BN.
5. Orphan ("0 out-degree") blocks are added to an output block BEFORE the current block's two
   parents are counted as consumed (L258-272), and the match is on the full NCHW shape. Model
   Garden counts the parents first and matches on width and channels. For the NAS specs (and H, W
   multiples of 128) both rules select the same single edge: the level-5 output
   (``scale_permuted_blocks.12``, spec (5, (7, 12))) also adds, un-resampled, net[11] = the output
   of ``scale_permuted_blocks.9`` (level-5 bottleneck, consumed by no block). ``forward`` records
   the edges it used in ``SpineNet.orphan_parents`` ({block index: [net indices]}).
   Input H, W must be multiples of 128 (mmdet pads with size_divisor=128); e.g. 64x64 fails in the
   source too (level 7 rounds up to 1 and its x4 upsample no longer matches level 5).
6. No stochastic depth, drop-connect or DropBlock at all (train and eval). Model Garden appends a
   16th level-2 output spec that only affects its stochastic-depth schedule; it is absent here.
7. BN eps 1e-3 and momentum 0.01 (torch convention) = Keras momentum 0.99: the same as Model
   Garden. No conv in the backbone has a bias (same as Model Garden).
8. Residual-block shortcut: projection (``downsample.0`` 1x1 conv + ``downsample.1`` BN) only
   when the channel count changes, i.e. only in ``init_block1.0`` (64 -> 4 * stem filters); the
   same rule as Model Garden's ``use_projection``.
9. Resample squeeze width is ``int(parent_filters * alpha)`` with ``parent_filters`` the parent
   level's filters BEFORE the bottleneck x4, as in Model Garden.
10. Head (RetinaSepBNHead): tower 3x3 convs are shared across levels, BN per level, conv has NO
    bias (Model Garden tower convs have a bias); ReLU; predictors are 3x3 convs with bias,
    shared across levels. ``stacked_convs`` 4 (7 for 190), ``feat_channels`` = endpoint filters.
11. Classes: sigmoid focal loss with ``num_classes=81`` including background, so ``retina_cls``
    outputs ``9 * 80`` channels; channel ``a * 80 + c`` is class label ``c + 1`` (COCO
    contiguous). Model Garden predicts ``9 * num_classes`` (91 COCO ids, index 0 unused).
12. Anchors (mmdet v1 ``AnchorGenerator``, not a module here): per position anchor index
    ``a = ratio_index * 3 + scale_index`` (ratio-major), ratios [0.5, 1, 2] are h/w, scales
    ``octave_base_scale * 2**(i/3)`` with octave_base_scale 3 (49S/49/96) or 4 (143/190), base
    size = stride, centre ``(stride - 1) / 2``, rounded "+1" pixel boxes. Model Garden is
    scale-major with aspect = w/h. Box channel ``a * 4 + k`` is (dx, dy, dw, dh), stds 1.0,
    (Model Garden: dy, dx, dh, dw).

Mask R-CNN (``build_mmdet_maskrcnn_spinenet``; configs ``configs/spinenet/mask_rcnn_spinenet_{49S_B_8gpu_640,
49_B_8gpu_640,96_B_8gpu_1024,143_B_8gpu_1280}.py``: mmdet ``MaskRCNN``, ``neck=None``). Sources read, besides
the files above: the seed's own ``mmdet/models/bbox_heads/convfc_bbox_head.py`` (yan-roo @ 75e08a0),
``mmdet/models/bbox_heads/bbox_head.py``, ``anchor_heads/rpn_head.py``, ``roi_extractors/single_level.py``,
``ops/roi_align/roi_align.py`` (Sense-X/TSD, Kenneth-Wong/MMSceneGraph: v1.x copies),
``mask_heads/fcn_mask_head.py`` (open-mmlab/mmdetection @ 01132d8, the ``upsample_method`` version of v1.x) and
``ops/roi_align/src/roi_align_kernel.cu`` (open-mmlab/mmdetection @ 108fc9e, MMSceneGraph ``ROIAlignForwardV1``:
the same forward kernel). What they do:

* State dict, in registration order: ``backbone.*``, ``rpn_head.{rpn_conv,rpn_cls,rpn_reg}``, ``bbox_head.fc_cls``,
  ``bbox_head.fc_reg`` (created first by ``BBoxHead.__init__``, re-created with the fc width by
  ``ConvFCBBoxHead.__init__`` in the same dict slot), ``bbox_head.shared_convs.{i}.{conv,bn}``,
  ``bbox_head.shared_fcs.0``, ``mask_head.convs.{i}.{conv,bn}``, ``mask_head.upsample``, ``mask_head.conv_logits``.
  RoI extractors and losses hold no parameters. Widths: 49S 128 channels / fc 512; 49, 96, 143 256 / fc 1024.
* RPNHead.forward_single: ``relu(rpn_conv(x))`` (3x3, bias, no norm) -> ``rpn_cls`` (1x1, ``num_anchors * 1``
  sigmoid logits, 3 anchors) and ``rpn_reg`` (1x1, ``num_anchors * 4``), on all five levels P3-P7.
* ConvFCBBoxHead.forward (4 shared convs, 1 shared fc): ``x = conv(x)`` for each ConvModule (conv no bias ->
  BN -> ReLU); ``x = x.flatten(1)`` (NCHW: feature index ``c * 49 + h * 7 + w``); ``x = relu(fc(x))`` for the
  shared fc (no norm); ``cls_score = fc_cls(x)`` [K, num_classes] (softmax, index 0 = background),
  ``bbox_pred = fc_reg(x)`` [K, 4 * num_classes] (class-specific, channel ``4 * c + k`` = (dx, dy, dw, dh)).
* FCNMaskHead.forward: 4 ConvModules (3x3 pad 1, conv no bias -> BN -> ReLU); ``upsample`` =
  ``nn.ConvTranspose2d(C, C, 2, stride=2)`` (bias, no norm) followed by ``relu`` (deconv only); ``conv_logits``
  1x1 -> [K, num_classes, 28, 28].
* SingleRoIExtractor (``finest_scale=56``, ``featmap_strides=[8, 16, 32, 64]``): the detector passes
  ``x[:num_inputs]`` = P3-P6 only (P7 feeds only the RPN). Level ``floor(log2(sqrt((x2 - x1 + 1) * (y2 - y1 + 1))
  / 56 + 1e-6))`` clamped to [0, 3], i.e. P3 < 112 px <= P4 < 224 <= P5 < 448 <= P6; one RoIAlign per level with
  ``spatial_scale = 1 / stride``, results scattered back in RoI order.
* RoIAlign(out_size, sample_num=2) with ``aligned`` absent / False = the legacy kernel ``ROIAlignForward(V1)``:
  ``roi_start = x1 * scale``, ``roi_end = (x2 + 1) * scale``, ``roi_size = max(end - start, 0)`` (the comment says
  "Force malformed ROIs to be 1x1" but the code clamps at 0), ``bin = size / pooled``, sample ``start + p * bin +
  (i + 0.5) * bin / sample_num`` for i < sample_num on each axis, averaged over the ``sample_num ** 2`` samples;
  bilinear: 0 if ``y < -1 or y > H`` (same for x), else ``y = max(y, 0)``, ``y_low = int(y)``, and at
  ``y_low >= H - 1`` both neighbours are ``H - 1``. torchvision ``roi_align(aligned=False)`` differs only in
  ``roi_end = x2 * scale`` and ``roi_size = max(end - start, 1)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FILTER_SIZE_MAP = {1: 32, 2: 64, 3: 128, 4: 256, 5: 256, 6: 256, 7: 256}

BOTTLENECK = "bottleneck"
BASIC = "basic"

# (level, block type, (input offset 0, input offset 1), is_output); offsets index this full list,
# whose first two entries are the stem (init) blocks.
SPINENET_BLOCK_SPECS: tuple[tuple[int, str, tuple[int, int] | tuple[None, None], bool], ...] = (
    (2, BOTTLENECK, (None, None), False),  # init_block1
    (2, BOTTLENECK, (None, None), False),  # init_block2
    (2, BOTTLENECK, (0, 1), False),
    (4, BASIC, (0, 1), False),
    (3, BOTTLENECK, (2, 3), False),
    (4, BOTTLENECK, (2, 4), False),
    (6, BASIC, (3, 5), False),
    (4, BOTTLENECK, (3, 5), False),
    (5, BASIC, (6, 7), False),
    (7, BASIC, (6, 8), False),
    (5, BOTTLENECK, (8, 9), False),
    (5, BOTTLENECK, (8, 10), False),
    (4, BOTTLENECK, (5, 10), True),
    (3, BOTTLENECK, (4, 10), True),
    (5, BOTTLENECK, (7, 12), True),
    (7, BOTTLENECK, (5, 14), True),
    (6, BOTTLENECK, (12, 14), True),
)

SCALING_MAP: dict[str, dict[str, Any]] = {
    "49S": dict(endpoints_num_filters=128, filter_size_scale=0.65, resample_alpha=0.5, block_repeats=1),
    "49": dict(endpoints_num_filters=256, filter_size_scale=1.0, resample_alpha=0.5, block_repeats=1),
    "96": dict(endpoints_num_filters=256, filter_size_scale=1.0, resample_alpha=0.5, block_repeats=2),
    "143": dict(endpoints_num_filters=256, filter_size_scale=1.0, resample_alpha=1.0, block_repeats=3),
    "190": dict(endpoints_num_filters=512, filter_size_scale=1.3, resample_alpha=1.0, block_repeats=4),
}

# RetinaSepBNHead settings of configs/spinenet/spinenet_*_B_8gpu*.py.
HEAD_CONFIGS: dict[str, dict[str, Any]] = {
    "49S": dict(feat_channels=128, stacked_convs=4, octave_base_scale=3),
    "49": dict(feat_channels=256, stacked_convs=4, octave_base_scale=3),
    "96": dict(feat_channels=256, stacked_convs=4, octave_base_scale=3),
    "143": dict(feat_channels=256, stacked_convs=4, octave_base_scale=4),
    "190": dict(feat_channels=512, stacked_convs=7, octave_base_scale=4),
}
ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # h / w
SCALES_PER_OCTAVE = 3
ANCHOR_STRIDES = (8, 16, 32, 64, 128)

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # torch convention (Keras 0.99)


def _expansion(block: str) -> int:
    return 4 if block == BOTTLENECK else 1


class _NormCfg:
    def __init__(self, eps: float, momentum: float):
        self.eps, self.momentum = eps, momentum

    def __call__(self, channels: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum)


class ConvModule(nn.Module):
    """mmdet ConvModule with a norm: ``conv`` (no bias) -> ``bn`` -> optional ReLU."""

    def __init__(
        self, cin: int, cout: int, k: int, norm: _NormCfg, stride: int = 1, padding: int = 0, act: bool = True
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
        self.bn = norm(cout)
        self.with_activation = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.with_activation else x


class BasicBlock(nn.Module):
    """mmdet v1 BasicBlock (stride 1): 3x3 -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, norm: _NormCfg, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class Bottleneck(nn.Module):
    """mmdet v1 Bottleneck (pytorch style, stride 1): 1x1 -> 3x3 -> 1x1 (4x), + shortcut, ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, norm: _NormCfg, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


_BLOCKS = {BOTTLENECK: Bottleneck, BASIC: BasicBlock}


def make_res_layer(block: str, inplanes: int, planes: int, repeats: int, norm: _NormCfg) -> nn.Sequential:
    """mmdet v1 ``make_res_layer`` at stride 1: projection (Sequential conv, BN) iff channels change."""
    cls = _BLOCKS[block]
    out = planes * cls.expansion
    downsample = None
    if inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, bias=False), norm(out))
    layers = [cls(inplanes, planes, norm, downsample)]
    layers += [cls(out, planes, norm) for _ in range(1, repeats)]
    return nn.Sequential(*layers)


class Resample(nn.Module):
    """1x1 squeeze (+ReLU) -> resize -> 1x1 expand (no activation)."""

    def __init__(self, parent_filters: int, parent_block: str, cout: int, scale: float, alpha: float, norm: _NormCfg):
        super().__init__()
        self.scale = scale
        squeezed = int(parent_filters * alpha)  # alpha on the filters before the x4 expansion
        self.squeeze_conv = ConvModule(parent_filters * _expansion(parent_block), squeezed, 1, norm)
        if scale < 1:
            self.downsample_conv = ConvModule(squeezed, squeezed, 3, norm, stride=2, padding=1)
        self.expand_conv = ConvModule(squeezed, cout, 1, norm, act=False)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1:
            return x
        if self.scale > 1:
            return F.interpolate(x, scale_factor=self.scale, mode="nearest")
        x = self.downsample_conv(x)
        if self.scale < 0.5:
            kernel = 3 if self.scale >= 0.25 else 5
            x = F.max_pool2d(x, kernel_size=kernel, stride=int(0.5 / self.scale), padding=kernel // 2)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand_conv(self._resize(self.squeeze_conv(x)))


class Merge(nn.Module):
    """Resamples the two parents to the target level / width and sums them."""

    def __init__(self, spec, filter_size_scale: float, alpha: float, norm: _NormCfg):
        super().__init__()
        level, block, offsets, _ = spec
        cout = int(FILTER_SIZE_MAP[level] * filter_size_scale) * _expansion(block)
        self.resample_ops = nn.ModuleList()
        for offset in offsets:
            p_level, p_block, _, _ = SPINENET_BLOCK_SPECS[offset]
            p_filters = int(FILTER_SIZE_MAP[p_level] * filter_size_scale)
            self.resample_ops.append(Resample(p_filters, p_block, cout, 2.0 ** (p_level - level), alpha, norm))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.resample_ops[0](inputs[0]) + self.resample_ops[1](inputs[1])


class SpineNet(nn.Module):
    """Images NCHW -> [endpoint level 3, ..., level 7], each ``endpoints_num_filters`` channels."""

    def __init__(
        self,
        model_id: str,
        output_levels: tuple[int, ...] = (3, 4, 5, 6, 7),
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ):
        super().__init__()
        cfg = SCALING_MAP[model_id]
        norm = _NormCfg(bn_eps, bn_momentum)
        scale, repeats = cfg["filter_size_scale"], cfg["block_repeats"]
        self.output_levels = tuple(output_levels)
        self.block_specs = SPINENET_BLOCK_SPECS[2:]
        stem_filters = int(FILTER_SIZE_MAP[2] * scale)

        # Registration order follows the source so state_dict key order matches too.
        self.conv1 = ConvModule(3, 64, 7, norm, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.init_block1 = make_res_layer(BOTTLENECK, 64, stem_filters, repeats, norm)
        self.init_block2 = make_res_layer(BOTTLENECK, stem_filters * 4, stem_filters, repeats, norm)

        self.merge_ops = nn.ModuleList()
        self.scale_permuted_blocks = nn.ModuleList()
        for spec in self.block_specs:
            level, block = spec[0], spec[1]
            self.merge_ops.append(Merge(spec, scale, cfg["resample_alpha"], norm))
            filters = int(FILTER_SIZE_MAP[level] * scale)
            self.scale_permuted_blocks.append(
                make_res_layer(block, filters * _expansion(block), filters, repeats, norm)
            )

        # Keys inserted in block-spec order (4, 3, 5, 7, 6), as the source does.
        self.endpoint_convs = nn.ModuleDict()
        for level, _, _, is_output in self.block_specs:
            if is_output:
                cin = int(FILTER_SIZE_MAP[level] * scale) * 4
                self.endpoint_convs[str(level)] = ConvModule(cin, cfg["endpoints_num_filters"], 1, norm, act=False)
        self.orphan_parents: dict[int, list[int]] = {}  # filled by forward: block index -> added net indices

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.conv1(images))
        feat1 = self.init_block1(x)
        feat2 = self.init_block2(feat1)
        net = [feat1, feat2]
        outgoing = [0, 0]
        outputs = {}
        for i, (level, _, offsets, is_output) in enumerate(self.block_specs):
            x = self.merge_ops[i]([net[j] for j in offsets])
            if is_output:
                # The parents of this block are not counted as consumed yet (source order).
                added = []
                for j, (feat, n) in enumerate(zip(net, outgoing, strict=True)):
                    if n == 0 and feat.shape == x.shape:
                        x = x + feat
                        outgoing[j] += 1
                        added.append(j)
                self.orphan_parents[i] = added
            x = self.scale_permuted_blocks[i](F.relu(x))
            net.append(x)
            outgoing.append(0)
            for j in offsets:
                outgoing[j] += 1
            if is_output:
                outputs[level] = x
        return [self.endpoint_convs[str(level)](outputs[level]) for level in self.output_levels]


class RetinaSepBNHead(nn.Module):
    """Towers of 3x3 ConvModules (conv shared across levels, BN per level), 3x3 predictors."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int,
        stacked_convs: int = 4,
        num_ins: int = 5,
        num_anchors: int = len(ANCHOR_RATIOS) * SCALES_PER_OCTAVE,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ):
        super().__init__()
        norm = _NormCfg(bn_eps, bn_momentum)
        self.cls_out_channels = num_classes - 1  # sigmoid: background is not predicted
        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        for _ in range(num_ins):
            cls_tower, reg_tower = nn.ModuleList(), nn.ModuleList()
            for k in range(stacked_convs):
                cin = in_channels if k == 0 else feat_channels
                cls_tower.append(ConvModule(cin, feat_channels, 3, norm, padding=1))
                reg_tower.append(ConvModule(cin, feat_channels, 3, norm, padding=1))
            self.cls_convs.append(cls_tower)
            self.reg_convs.append(reg_tower)
        for k in range(stacked_convs):  # share the conv (not the BN) of level 0 with every level
            for lvl in range(1, num_ins):
                self.cls_convs[lvl][k].conv = self.cls_convs[0][k].conv
                self.reg_convs[lvl][k].conv = self.reg_convs[0][k].conv
        self.retina_cls = nn.Conv2d(feat_channels, num_anchors * self.cls_out_channels, 3, padding=1)
        self.retina_reg = nn.Conv2d(feat_channels, num_anchors * 4, 3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
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
    """mmdet v1 ``RetinaNet`` with ``neck=None``: forward returns raw (cls_scores, bbox_preds)."""

    def __init__(self, backbone: SpineNet, bbox_head: RetinaSepBNHead):
        super().__init__()
        self.backbone = backbone
        self.bbox_head = bbox_head

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.bbox_head(self.backbone(images))


def build_mmdet_spinenet_retinanet(
    model_id: str,
    num_classes: int = 81,
    *,
    bn_eps: float = BN_EPS,
    bn_momentum: float = BN_MOMENTUM,
    feat_channels: int | None = None,
    stacked_convs: int | None = None,
) -> RetinaNet:
    """The repo's RetinaNet for ``model_id`` in 49S/49/96/143/190 (``num_classes`` incl. background)."""
    if model_id not in SCALING_MAP:
        raise ValueError(f"unknown SpineNet {model_id!r}; choose from {sorted(SCALING_MAP)}")
    head = HEAD_CONFIGS[model_id]
    in_channels = SCALING_MAP[model_id]["endpoints_num_filters"]
    backbone = SpineNet(model_id, bn_eps=bn_eps, bn_momentum=bn_momentum)
    bbox_head = RetinaSepBNHead(
        num_classes,
        in_channels,
        feat_channels or head["feat_channels"],
        stacked_convs or head["stacked_convs"],
        bn_eps=bn_eps,
        bn_momentum=bn_momentum,
    )
    return RetinaNet(backbone, bbox_head)


def trainable_parameter_count(model: nn.Module) -> int:
    """As mmcv's ``get_model_parameters_number``: shared tower convs are counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# Mask R-CNN (configs/spinenet/mask_rcnn_spinenet_*.py): MaskRCNN with neck=None, heads of mmdetection v1.1.

# (conv channels = RPN / RoI head width, shared fc width) per config.
MASKRCNN_HEAD_CONFIGS: dict[str, dict[str, int]] = {
    "49S": dict(channels=128, fc_out_channels=512),  # mask_rcnn_spinenet_49S_B_8gpu_640.py
    "49": dict(channels=256, fc_out_channels=1024),  # mask_rcnn_spinenet_49_B_8gpu_640.py
    "96": dict(channels=256, fc_out_channels=1024),  # mask_rcnn_spinenet_96_B_8gpu_1024.py
    "143": dict(channels=256, fc_out_channels=1024),  # mask_rcnn_spinenet_143_B_8gpu_1280.py
}
RPN_NUM_ANCHORS = 3  # anchor_scales [3] x anchor_ratios [0.5, 1, 2]
ROI_FEATMAP_STRIDES = (8, 16, 32, 64)  # SingleRoIExtractor: P3-P6 only
ROI_FINEST_SCALE = 56
ROI_SAMPLE_NUM = 2
BBOX_ROI_SIZE = 7
MASK_ROI_SIZE = 14


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _roi_align_axis_weights(
    start: torch.Tensor, bin_size: torch.Tensor, pooled: int, sample_num: int, size: int
) -> torch.Tensor:
    """[K] RoI starts / bin sizes on one axis -> [K, pooled, size]: the sample-averaged bilinear weights.

    The legacy kernel's bilinear weight of a sample (y, x) is ``wy(y) * wx(x)`` and its out-of-range test is
    ``y`` or ``x`` alone, so each output is ``sum_{h, w} Ay[p, h] * f[h, w] * Ax[q, w]``.
    """
    dtype = start.dtype
    p = torch.arange(pooled, dtype=dtype, device=start.device)[None, :, None]
    i = torch.arange(sample_num, dtype=dtype, device=start.device)[None, None, :]
    s, b = start[:, None, None], bin_size[:, None, None]
    coord = s + p * b + (i + 0.5) * b / sample_num  # [K, pooled, sample_num], the kernel's expression order
    valid = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0)
    low = coord.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    coord = torch.where(edge, low.to(dtype), coord)
    frac = coord - low.to(dtype)
    w_low = ((1.0 - frac) * valid)[..., None] * F.one_hot(low, size).to(dtype)
    w_high = (frac * valid)[..., None] * F.one_hot(high, size).to(dtype)
    return (w_low + w_high).sum(dim=2) / sample_num


def mmdet_roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    out_size: int | tuple[int, int],
    spatial_scale: float,
    sample_num: int = ROI_SAMPLE_NUM,
    chunk: int = 256,
) -> torch.Tensor:
    """mmdetection v1 ``RoIAlign(aligned=False)`` (legacy CUDA kernel), vectorised in torch.

    ``features`` [N, C, H, W]; ``rois`` [K, 5] = (batch index, x1, y1, x2, y2) in image pixels. ``roi_end`` is
    ``(x2 + 1) * spatial_scale`` and the RoI size is clamped at 0 (torchvision: no +1, clamped at 1). Returns
    [K, C, out_h, out_w]. Only ``sample_num > 0`` (fixed samples per bin axis) is supported.
    """
    if sample_num <= 0:
        raise NotImplementedError("adaptive sampling (sample_num=0) is not implemented")
    out_h, out_w = _pair(out_size)
    _, channels, height, width = features.shape
    out = features.new_zeros(rois.shape[0], channels, out_h, out_w)
    if rois.shape[0] == 0:
        return out
    rois = rois.to(features.dtype)
    scale = torch.tensor(spatial_scale, dtype=features.dtype, device=features.device)
    start_w, start_h = rois[:, 1] * scale, rois[:, 2] * scale
    end_w, end_h = (rois[:, 3] + 1) * scale, (rois[:, 4] + 1) * scale
    bin_w = (end_w - start_w).clamp(min=0.0) / out_w
    bin_h = (end_h - start_h).clamp(min=0.0) / out_h
    a_y = _roi_align_axis_weights(start_h, bin_h, out_h, sample_num, height)  # [K, out_h, H]
    a_x = _roi_align_axis_weights(start_w, bin_w, out_w, sample_num, width)  # [K, out_w, W]
    batch = rois[:, 0].long()
    for b in batch.unique().tolist():
        sel = torch.nonzero(batch == b).squeeze(1)
        for j in range(0, sel.numel(), chunk):
            idx = sel[j : j + chunk]
            rows = torch.einsum("kph,chw->kcpw", a_y[idx], features[b])
            out[idx] = torch.einsum("kcpw,kqw->kcpq", rows, a_x[idx])
    return out


def map_roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: float = ROI_FINEST_SCALE) -> torch.Tensor:
    """SingleRoIExtractor.map_roi_levels: ``floor(log2(sqrt((w + 1)(h + 1)) / finest_scale + 1e-6))``, clamped."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1] + 1) * (rois[:, 4] - rois[:, 2] + 1))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class RPNHead(nn.Module):
    """mmdet v1 RPNHead: ``relu(rpn_conv(x))`` -> 1x1 ``rpn_cls`` (A sigmoid logits) and ``rpn_reg`` (4A)."""

    def __init__(self, in_channels: int, feat_channels: int, num_anchors: int = RPN_NUM_ANCHORS):
        super().__init__()
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cls_scores, bbox_preds = [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            cls_scores.append(self.rpn_cls(x))
            bbox_preds.append(self.rpn_reg(x))
        return cls_scores, bbox_preds


class ConvFCBBoxHead(nn.Module):
    """mmdet v1 ConvFCBBoxHead with only a shared branch: ConvModules -> NCHW flatten -> relu(fc) -> cls / reg."""

    def __init__(
        self,
        in_channels: int,
        conv_out_channels: int,
        fc_out_channels: int,
        num_classes: int,
        num_shared_convs: int = 4,
        num_shared_fcs: int = 1,
        roi_feat_size: int = BBOX_ROI_SIZE,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ):
        super().__init__()
        if num_shared_fcs < 1:
            raise ValueError("only the shared-fc configuration (num_shared_fcs >= 1) is rebuilt")
        norm = _NormCfg(bn_eps, bn_momentum)
        # BBoxHead.__init__ registers fc_cls / fc_reg first; ConvFCBBoxHead replaces them in the same slot.
        self.register_module("fc_cls", None)
        self.register_module("fc_reg", None)
        self.shared_convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_out_channels, conv_out_channels, 3, norm, padding=1)
            for i in range(num_shared_convs)
        )
        last = conv_out_channels if num_shared_convs > 0 else in_channels
        self.shared_fcs = nn.ModuleList(
            nn.Linear(last * roi_feat_size * roi_feat_size if i == 0 else fc_out_channels, fc_out_channels)
            for i in range(num_shared_fcs)
        )
        self.fc_cls = nn.Linear(fc_out_channels, num_classes)
        self.fc_reg = nn.Linear(fc_out_channels, 4 * num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoI features [K, C, 7, 7] -> (cls_score [K, num_classes], bbox_pred [K, 4 * num_classes])."""
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """mmdet v1 FCNMaskHead: ConvModules -> relu(ConvTranspose2d 2x2/2) -> 1x1 conv_logits (per class)."""

    def __init__(
        self,
        in_channels: int,
        conv_out_channels: int,
        num_classes: int,
        num_convs: int = 4,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ):
        super().__init__()
        norm = _NormCfg(bn_eps, bn_momentum)
        self.convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_out_channels, conv_out_channels, 3, norm, padding=1)
            for i in range(num_convs)
        )
        up_in = conv_out_channels if num_convs > 0 else in_channels
        self.upsample = nn.ConvTranspose2d(up_in, conv_out_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_out_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RoI features [K, C, 14, 14] -> mask logits [K, num_classes, 28, 28]."""
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


class MaskRCNN(nn.Module):
    """mmdet v1 ``MaskRCNN`` (``neck=None``) for parity on fixed RoIs; eval-mode pieces, no proposal / NMS logic."""

    def __init__(
        self,
        backbone: SpineNet,
        rpn_head: RPNHead,
        bbox_head: ConvFCBBoxHead,
        mask_head: FCNMaskHead,
        featmap_strides: tuple[int, ...] = ROI_FEATMAP_STRIDES,
        finest_scale: float = ROI_FINEST_SCALE,
        sample_num: int = ROI_SAMPLE_NUM,
    ):
        super().__init__()
        self.backbone = backbone
        self.rpn_head = rpn_head
        self.bbox_head = bbox_head
        self.mask_head = mask_head
        self.featmap_strides = tuple(featmap_strides)
        self.finest_scale = finest_scale
        self.sample_num = sample_num

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images NCHW (H, W multiples of 128) -> [P3, P4, P5, P6, P7] (the backbone endpoints; no neck)."""
        return self.backbone(images)

    def rpn(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: (cls [N, 3, h, w] sigmoid logits, reg [N, 12, h, w]); channel ``a * 4 + k`` = (dx, dy, dw, dh)."""
        return self.rpn_head(features)

    def roi_features(
        self, features: list[torch.Tensor], rois: torch.Tensor, out_size: int | tuple[int, int]
    ) -> torch.Tensor:
        """SingleRoIExtractor: ``rois`` [K, 5] (batch index, x1, y1, x2, y2) -> [K, C, out, out] from P3-P6."""
        feats = features[: len(self.featmap_strides)]
        out_h, out_w = _pair(out_size)
        levels = map_roi_levels(rois, len(feats), self.finest_scale)
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], out_h, out_w)
        for i, (feat, stride) in enumerate(zip(feats, self.featmap_strides, strict=True)):
            inds = levels == i
            if inds.any():
                out[inds] = mmdet_roi_align(feat, rois[inds], (out_h, out_w), 1.0 / stride, self.sample_num)
        return out

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> dict[str, Any]:
        """Fixed-RoI pass: RPN outputs on all levels and box / mask head outputs on ``rois`` (the same RoIs)."""
        feats = self.features(images)
        rpn_cls, rpn_reg = self.rpn(feats)
        cls_score, bbox_pred = self.bbox_head(self.roi_features(feats, rois, BBOX_ROI_SIZE))
        mask_logits = self.mask_head(self.roi_features(feats, rois, MASK_ROI_SIZE))
        return dict(rpn_cls=rpn_cls, rpn_reg=rpn_reg, cls_score=cls_score, bbox_pred=bbox_pred, mask_logits=mask_logits)


def build_mmdet_maskrcnn_spinenet(
    variant: str = "49S",
    num_classes: int = 81,
    *,
    bn_eps: float = BN_EPS,
    bn_momentum: float = BN_MOMENTUM,
) -> MaskRCNN:
    """The seed's Mask R-CNN SpineNet-``variant`` (49S/49/96/143); ``num_classes`` includes background (81)."""
    if variant not in MASKRCNN_HEAD_CONFIGS:
        raise ValueError(f"no Mask R-CNN config for SpineNet {variant!r}; choose from {sorted(MASKRCNN_HEAD_CONFIGS)}")
    cfg = MASKRCNN_HEAD_CONFIGS[variant]
    ch = cfg["channels"]
    assert ch == SCALING_MAP[variant]["endpoints_num_filters"]
    return MaskRCNN(
        SpineNet(variant, bn_eps=bn_eps, bn_momentum=bn_momentum),
        RPNHead(ch, ch),
        ConvFCBBoxHead(ch, ch, cfg["fc_out_channels"], num_classes, bn_eps=bn_eps, bn_momentum=bn_momentum),
        FCNMaskHead(ch, ch, num_classes, bn_eps=bn_eps, bn_momentum=bn_momentum),
    )
