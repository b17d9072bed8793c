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
