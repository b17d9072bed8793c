"""PyTorch rebuild of the maskrcnn-benchmark-vovnet detectors (stigma0617/maskrcnn-benchmark-vovnet, branch
``vovnet``) with their exact ``state_dict`` keys, for parameter counts, parity tests and converter tests.

Written from reading the seed; nothing is imported from it (it needs compiled extensions). Where each
part comes from (paths in that repository, all on branch ``vovnet``; they equal facebookresearch/
maskrcnn-benchmark's except ``vovnet.py`` and the ``V-*-FPN`` entries of ``backbone.py``):

* ``VoVNetBody`` <- ``modeling/backbone/vovnet.py`` (``VoVNet``, ``_OSA_stage``, ``_OSA_module``, ``conv3x3``,
  ``conv1x1``): module names contain '/', e.g. ``stem.stem_1/conv.weight``,
  ``stage3.OSA3_1.layers.0.OSA3_1_0/norm.running_var``, ``stage3.OSA3_1.concat.OSA3_1_concat/conv.weight``.
  Stage-entry ``MaxPool2d(3, 2, ceil_mode=True)`` named ``Pooling`` (no parameters); every OSA module after
  a stage's first adds its input (``identity=True``). Convs: kaiming_normal_, no bias.
* ``FrozenBatchNorm2d`` <- ``layers/batch_norm.py``: four buffers, ``scale = weight * running_var.rsqrt()``
  (no epsilon).
* ``FPN`` / ``LastLevelMaxPool`` <- ``modeling/backbone/fpn.py`` with ``conv_with_kaiming_uniform(False, False)``
  from ``modeling/make_layers.py`` (conv with bias, kaiming_uniform a=1, bias 0): ``fpn_inner{1..4}`` (1x1),
  ``fpn_layer{1..4}`` (3x3), top-down ``F.interpolate(scale_factor=2, mode='nearest')``, P6 =
  ``max_pool2d(P5, 1, 2, 0)``. ``build_vovnet_fpn_backbone`` in ``modeling/backbone/backbone.py`` wraps them as
  ``nn.Sequential(body=VoVNet, fpn=FPN)`` with in_channels [256, 512, 768, 1024] (``MODEL.VOVNET.OUT_CHANNELS``
  256 x 1..4) and 256 outputs (``MODEL.VOVNET.BACKBONE_OUT_CHANNELS``).
* ``AnchorGenerator`` <- ``modeling/rpn/anchor_generator.py``: per-level ``cell_anchors`` buffers (Detectron's
  ``generate_anchors``: (0, 0, stride - 1, stride - 1) reference window, rounded ratio widths, then sizes; xyxy
  with +1 widths) saved as ``rpn.anchor_generator.cell_anchors.{i}``; ``grid_anchors`` shifts them by
  ``arange(0, W * stride, stride)``.
* ``RPNHead`` <- ``modeling/rpn/rpn.py`` (``SingleConvRPNHead``): ``rpn.head.conv`` (3x3, bias), ``cls_logits``
  (A), ``bbox_pred`` (4A); init normal(0.01), bias 0.
* ``FPN2MLPFeatureExtractor`` / ``FPNPredictor`` <- ``modeling/roi_heads/box_head/roi_box_feature_extractors.py`` /
  ``roi_box_predictors.py``: ``roi_heads.box.feature_extractor.fc6`` / ``fc7`` (``make_fc``: kaiming_uniform a=1),
  ``roi_heads.box.predictor.cls_score`` (81) / ``bbox_pred`` (81 * 4, class-specific).
* ``MaskRCNNFPNFeatureExtractor`` / ``MaskRCNNC4Predictor`` <- ``modeling/roi_heads/mask_head/
  roi_mask_feature_extractors.py`` / ``roi_mask_predictors.py``: ``roi_heads.mask.feature_extractor.mask_fcn{1..4}``
  (3x3, bias, ``make_conv3x3`` kaiming_normal fan_out), ``roi_heads.mask.predictor.conv5_mask`` (ConvTranspose2d
  2x2/2) and ``mask_fcn_logits`` (1x1, 81).
* ``Pooler`` <- ``modeling/poolers.py``: ``LevelMapper`` (``floor(4 + log2(sqrt(area) / 224 + 1e-6))`` clamped
  to 2..5, with ``BoxList.area()`` of ``structures/bounding_box.py``: (x2 - x1 + 1) * (y2 - y1 + 1), inclusive
  pixels) and the legacy (not aligned) ROIAlign CUDA kernel, which is ``torchvision.ops.roi_align(aligned=False)``.
* ``GeneralizedRCNN`` <- ``modeling/detector/generalized_rcnn.py`` + ``roi_heads/roi_heads.py``
  (``CombinedROIHeads`` is a ModuleDict ``box`` / ``mask``); only the parameterised parts and fixed-RoI passes,
  no proposal, loss or post-processing logic (they hold no parameters or buffers).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

VOVNET_SPECS = {  # depth -> (stage channels, concat channels, layers per block, blocks per stage)
    39: ((128, 160, 192, 224), (256, 512, 768, 1024), 5, (1, 1, 2, 2)),
    57: ((128, 160, 192, 224), (256, 512, 768, 1024), 5, (1, 1, 4, 3)),
}
NUM_CLASSES = 81  # COCO 80 + background (ROI_BOX_HEAD.NUM_CLASSES)
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ANCHOR_STRIDES = (4, 8, 16, 32, 64)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
POOLER_SCALES = (0.25, 0.125, 0.0625, 0.03125)
SAMPLING_RATIO = 2
BOX_RESOLUTION, MASK_RESOLUTION = 7, 14


class FrozenBatchNorm2d(nn.Module):
    """maskrcnn-benchmark's: buffers only, ``x * weight / sqrt(running_var) + (bias - mean * scale)``, no eps."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * self.running_var.rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def _conv_norm_relu(
    in_ch: int, out_ch: int, name: str, postfix: str | int, stride: int = 1, kernel: int = 3
) -> list[tuple[str, nn.Module]]:
    """The seed's ``conv3x3`` / ``conv1x1``: ('{name}_{postfix}/conv', '/norm', '/relu')."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [
        (f"{name}_{postfix}/conv", conv),
        (f"{name}_{postfix}/norm", FrozenBatchNorm2d(out_ch)),
        (f"{name}_{postfix}/relu", nn.ReLU(inplace=True)),
    ]


class OSAModule(nn.Module):
    """``_OSA_module``: ``layers`` (ModuleList of conv-norm-relu), ``concat`` (1x1), optional identity add."""

    def __init__(self, in_ch: int, stage_ch: int, concat_ch: int, layers: int, name: str, identity: bool = False):
        super().__init__()
        self.identity = identity
        self.layers = nn.ModuleList()
        channels = in_ch
        for i in range(layers):
            self.layers.append(nn.Sequential(OrderedDict(_conv_norm_relu(channels, stage_ch, name, i))))
            channels = stage_ch
        self.concat = nn.Sequential(
            OrderedDict(_conv_norm_relu(in_ch + layers * stage_ch, concat_ch, name, "concat", kernel=1))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        y = x
        for layer in self.layers:
            y = layer(y)
            outputs.append(y)
        y = self.concat(torch.cat(outputs, dim=1))
        return y + x if self.identity else y


class OSAStage(nn.Sequential):
    """``_OSA_stage``: ``Pooling`` (stages 3-5), ``OSA{s}_1``, then ``OSA{s}_{2..}`` with identity."""

    def __init__(self, in_ch: int, stage_ch: int, concat_ch: int, blocks: int, layers: int, stage: int):
        super().__init__()
        if stage != 2:
            self.add_module("Pooling", nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
        self.add_module(f"OSA{stage}_1", OSAModule(in_ch, stage_ch, concat_ch, layers, f"OSA{stage}_1"))
        for i in range(2, blocks + 1):
            name = f"OSA{stage}_{i}"
            self.add_module(name, OSAModule(concat_ch, stage_ch, concat_ch, layers, name, identity=True))


class VoVNetBody(nn.Module):
    """The seed's ``VoVNet`` (FrozenBatchNorm2d, no GN): images NCHW -> [C2, C3, C4, C5]."""

    def __init__(self, depth: int = 39):
        super().__init__()
        stage_ch, concat_ch, layers, blocks = VOVNET_SPECS[depth]
        stem = _conv_norm_relu(3, 64, "stem", "1", 2)
        stem += _conv_norm_relu(64, 64, "stem", "2", 1)
        stem += _conv_norm_relu(64, 128, "stem", "3", 2)
        self.add_module("stem", nn.Sequential(OrderedDict(stem)))
        in_ch = (128,) + tuple(concat_ch[:-1])
        self.stage_names = []
        for i in range(4):
            name = f"stage{i + 2}"
            self.stage_names.append(name)
            self.add_module(name, OSAStage(in_ch[i], stage_ch[i], concat_ch[i], blocks[i], layers, i + 2))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outputs.append(x)
        return outputs


def _kaiming_uniform_conv(in_ch: int, out_ch: int, kernel: int) -> nn.Conv2d:
    """``conv_with_kaiming_uniform(use_gn=False, use_relu=False)``: conv with bias, kaiming_uniform(a=1), bias 0."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=(kernel - 1) // 2, bias=True)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.constant_(conv.bias, 0)
    return conv


class LastLevelMaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.max_pool2d(x, 1, 2, 0)]


class FPN(nn.Module):
    """maskrcnn-benchmark FPN: [C2..C5] -> (P2, P3, P4, P5, P6)."""

    def __init__(self, in_channels_list: tuple[int, ...] = (256, 512, 768, 1024), out_channels: int = 256):
        super().__init__()
        self.inner_blocks, self.layer_blocks = [], []
        for idx, in_ch in enumerate(in_channels_list, 1):
            self.add_module(f"fpn_inner{idx}", _kaiming_uniform_conv(in_ch, out_channels, 1))
            self.add_module(f"fpn_layer{idx}", _kaiming_uniform_conv(out_channels, out_channels, 3))
            self.inner_blocks.append(f"fpn_inner{idx}")
            self.layer_blocks.append(f"fpn_layer{idx}")
        self.top_blocks = LastLevelMaxPool()

    def forward(self, x: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        last_inner = getattr(self, self.inner_blocks[-1])(x[-1])
        results = [getattr(self, self.layer_blocks[-1])(last_inner)]
        for feature, inner, layer in zip(
            x[:-1][::-1], self.inner_blocks[:-1][::-1], self.layer_blocks[:-1][::-1], strict=True
        ):
            top_down = F.interpolate(last_inner, scale_factor=2, mode="nearest")
            last_inner = getattr(self, inner)(feature) + top_down
            results.insert(0, getattr(self, layer)(last_inner))
        results.extend(self.top_blocks(results[-1]))
        return tuple(results)


def build_backbone(depth: int = 39) -> nn.Sequential:
    """``build_vovnet_fpn_backbone``: ``nn.Sequential(body, fpn)`` (keys ``body.*``, ``fpn.*``)."""
    return nn.Sequential(OrderedDict([("body", VoVNetBody(depth)), ("fpn", FPN())]))


def generate_cell_anchors(stride: int, sizes: tuple[float, ...], ratios: tuple[float, ...]) -> torch.Tensor:
    """Detectron's ``generate_anchors``: [len(ratios) * len(sizes), 4] xyxy around the (stride - 1) / 2 centre,
    ratio-major (ratio = h / w), widths rounded at the reference size, then scaled by size / stride."""
    w = h = float(stride)
    ctr = 0.5 * (stride - 1)
    ratios_np = np.asarray(ratios, dtype=np.float64)
    ws = np.round(np.sqrt(w * h / ratios_np))
    hs = np.round(ws * ratios_np)
    scales = np.asarray(sizes, dtype=np.float64) / stride
    boxes = []
    for rw, rh in zip(ws, hs, strict=True):
        sw, sh = rw * scales, rh * scales
        boxes.append(
            np.stack([ctr - 0.5 * (sw - 1), ctr - 0.5 * (sh - 1), ctr + 0.5 * (sw - 1), ctr + 0.5 * (sh - 1)], 1)
        )
    return torch.from_numpy(np.concatenate(boxes, 0)).float()


class BufferList(nn.Module):
    def __init__(self, buffers: list[torch.Tensor]):
        super().__init__()
        for i, buffer in enumerate(buffers):
            self.register_buffer(str(i), buffer)

    def __iter__(self):
        return iter(self._buffers.values())


class AnchorGenerator(nn.Module):
    """FPN anchors: one size per level, three ratios; ``grid_anchors`` as the seed (top-left shifts, xyxy)."""

    def __init__(self, sizes=ANCHOR_SIZES, ratios=ASPECT_RATIOS, strides=ANCHOR_STRIDES):
        super().__init__()
        self.strides = tuple(strides)
        self.cell_anchors = BufferList(
            [generate_cell_anchors(s, (size,), ratios) for s, size in zip(strides, sizes, strict=True)]
        )

    def num_anchors_per_location(self) -> int:
        return len(next(iter(self.cell_anchors)))

    def grid_anchors(self, grid_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per level [H * W * A, 4]: location-major (y, x), then the cell anchors."""
        out = []
        for (h, w), stride, base in zip(grid_sizes, self.strides, self.cell_anchors, strict=True):
            xs = torch.arange(0, w * stride, step=stride, dtype=torch.float32)
            ys = torch.arange(0, h * stride, step=stride, dtype=torch.float32)
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)], 1)
            out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return out


class RPNHead(nn.Module):
    """``SingleConvRPNHead``: relu(3x3 conv) -> 1x1 ``cls_logits`` [A] and ``bbox_pred`` [4A] per level."""

    def __init__(self, in_channels: int = 256, num_anchors: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


class RPN(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor_generator = AnchorGenerator()
        self.head = RPNHead(256, self.anchor_generator.num_anchors_per_location())


def _make_fc(dim_in: int, dim_out: int) -> nn.Linear:
    fc = nn.Linear(dim_in, dim_out)
    nn.init.kaiming_uniform_(fc.weight, a=1)
    nn.init.constant_(fc.bias, 0)
    return fc


class FPN2MLPFeatureExtractor(nn.Module):
    """Pooled [K, 256, 7, 7] -> NCHW flatten -> relu(fc6) -> relu(fc7) [K, 1024]."""

    def __init__(self, in_channels: int = 256, resolution: int = BOX_RESOLUTION, dim: int = 1024):
        super().__init__()
        self.fc6 = _make_fc(in_channels * resolution**2, dim)
        self.fc7 = _make_fc(dim, dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(pooled.flatten(1)))))


class FPNPredictor(nn.Module):
    def __init__(self, in_channels: int = 1024, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.constant_(layer.bias, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class MaskRCNNFPNFeatureExtractor(nn.Module):
    """Pooled [K, 256, 14, 14] -> 4 x relu(3x3 conv 256) (``mask_fcn1..4``)."""

    def __init__(self, in_channels: int = 256, layers: tuple[int, ...] = (256, 256, 256, 256)):
        super().__init__()
        self.blocks = []
        channels = in_channels
        for idx, features in enumerate(layers, 1):
            conv = nn.Conv2d(channels, features, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(conv.bias, 0)
            self.add_module(f"mask_fcn{idx}", conv)
            self.blocks.append(f"mask_fcn{idx}")
            channels = features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = pooled
        for name in self.blocks:
            x = F.relu(getattr(self, name)(x))
        return x


class MaskRCNNC4Predictor(nn.Module):
    """relu(ConvTranspose2d 2x2/2 ``conv5_mask``) -> 1x1 ``mask_fcn_logits`` [K, 81, 28, 28]."""

    def __init__(self, in_channels: int = 256, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, 256, 2, 2, 0)
        self.mask_fcn_logits = nn.Conv2d(256, num_classes, 1, 1, 0)
        for name, param in self.named_parameters():
            if "bias" in name:
                nn.init.constant_(param, 0)
            else:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask_fcn_logits(F.relu(self.conv5_mask(x)))


class BoxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.feature_extractor = FPN2MLPFeatureExtractor()
        self.predictor = FPNPredictor()


class MaskHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.feature_extractor = MaskRCNNFPNFeatureExtractor()
        self.predictor = MaskRCNNC4Predictor()


def map_levels(boxes: torch.Tensor, k_min: int = 2, k_max: int = 5) -> torch.Tensor:
    """``LevelMapper``: FPN level index (0 = P2) of xyxy boxes; ``BoxList.area()`` (+1 widths), eps 1e-6 inside
    the log, canonical 224 @ 4."""
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    levels = torch.floor(4 + torch.log2(torch.sqrt(area) / 224 + 1e-6))
    return levels.clamp(k_min, k_max).to(torch.int64) - k_min


def pool(features: list[torch.Tensor], rois: torch.Tensor, resolution: int) -> torch.Tensor:
    """``Pooler`` over P2..P5: ``rois`` [K, 5] (batch index, x1, y1, x2, y2) -> [K, C, r, r]."""
    levels = map_levels(rois[:, 1:])
    out = features[0].new_zeros(rois.shape[0], features[0].shape[1], resolution, resolution)
    for i, (feature, scale) in enumerate(zip(features, POOLER_SCALES, strict=False)):
        idx = torch.nonzero(levels == i).squeeze(1)
        if idx.numel():
            out[idx] = torchvision.ops.roi_align(
                feature, rois[idx], (resolution, resolution), scale, SAMPLING_RATIO, aligned=False
            )
    return out


class GeneralizedRCNN(nn.Module):
    """The seed's Faster / Mask R-CNN V-39/57-FPN parameters under their checkpoint keys (``backbone.*``,
    ``rpn.*``, ``roi_heads.box.*``, ``roi_heads.mask.*``), with fixed-RoI passes for parity tests."""

    def __init__(self, depth: int = 39, mask: bool = True):
        super().__init__()
        self.backbone = build_backbone(depth)
        self.rpn = RPN()
        heads = [("box", BoxHead())] + ([("mask", MaskHead())] if mask else [])
        self.roi_heads = nn.ModuleDict(OrderedDict(heads))

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Images NCHW (BGR 0-255 minus PIXEL_MEAN; sides multiples of 32) -> (P2, ..., P6)."""
        return self.backbone(images)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> dict[str, object]:
        feats = self.features(images)
        rpn_logits, rpn_deltas = self.rpn.head(list(feats))
        box = self.roi_heads["box"]
        cls_score, bbox_pred = box.predictor(box.feature_extractor(pool(list(feats[:4]), rois, BOX_RESOLUTION)))
        out = dict(
            features=feats, rpn_logits=rpn_logits, rpn_deltas=rpn_deltas, cls_score=cls_score, bbox_pred=bbox_pred
        )
        if "mask" in self.roi_heads:
            mask = self.roi_heads["mask"]
            out["mask_logits"] = mask.predictor(mask.feature_extractor(pool(list(feats[:4]), rois, MASK_RESOLUTION)))
        return out


def trainable_parameter_count(module: nn.Module) -> int:
    """What the seed counts: parameters only (FrozenBatchNorm2d's arrays are buffers)."""
    return sum(p.numel() for p in module.parameters())


def calibrate_frozen_bn_(model: nn.Module, images: np.ndarray, seed: int = 0) -> nn.Module:
    """Gives every FrozenBatchNorm2d random affine buffers and data-dependent statistics, in place.

    One forward pass on ``images`` (NHWC float32); a pre-hook sets each norm's running mean / variance to its
    input's per-channel statistics (variance scaled by U(0.5, 1.5) so it is not exactly the batch's) before the
    norm runs, so later layers see calibrated inputs and activations stay O(1) through the net. Weight
    U(0.5, 1.5), bias N(0, 0.1). Other biases (FPN, heads) get N(0, 0.1) too, so no code path sees zeros.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]

    def hook(module: FrozenBatchNorm2d, inputs: tuple[torch.Tensor]) -> None:
        x = inputs[0]
        n = x.shape[1]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) * (torch.rand(n, generator=generator) + 0.5))
        module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
        module.bias.copy_(torch.randn(n, generator=generator) * 0.1)

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            body = next(m for m in model.modules() if isinstance(m, VoVNetBody))
            body(torch.from_numpy(images).permute(0, 3, 1, 2))
    finally:
        for handle in handles:
            handle.remove()
    return model.eval()
