"""A PyTorch rebuild of guoruoqian/DetNet_pytorch (the DetNet-59 seed) with the seed's exact state_dict keys.

Where each part comes from (repository at commit 735e2c5):

* ``DetNet59`` — ``lib/model/fpn/detnet_backbone.py``: ``DetNet(Bottleneck, [3, 4, 6, 3, 3])``. Stem
  ``conv1`` 7x7/2 (pad 3, no bias), ``bn1``, relu, ``maxpool`` 3x3/2 pad 1; ``layer1..3`` are
  torchvision's ResNet-50 stages (stride on the 3x3 conv, ``downsample.{0,1}`` projection on each
  first block); ``layer4`` and ``layer5`` (``_make_new_layer(256, 3)``) are a ``BottleneckB`` (width
  256, 3x3 with dilation 2 / padding 2, 1x1 projection shortcut ``extra_conv.{0,1}``) then two
  ``BottleneckA`` (same, identity shortcut), all at stride 16; ``avgpool`` + ``fc`` (1024 -> classes).
  BatchNorm2d defaults (eps 1e-5). The three seed block classes are one class here
  (``DetNetBottleneck``) whose sub-module names reproduce each class's keys.
* ``DetNetFPN`` — the detector ``detnet(_FPN)`` of the same file plus ``lib/model/fpn/fpn.py`` and
  ``lib/model/rpn/rpn_fpn.py``: ``RCNN_rpn`` (``RPN_Conv`` 3x3 256 -> 512 with bias,
  ``RPN_cls_score`` 1x1 -> 2 * 3, ``RPN_bbox_pred`` 1x1 -> 4 * 3), ``RCNN_layer0`` = Sequential(conv1,
  bn1, relu, maxpool), ``RCNN_layer{1..5}`` = Sequential(layer{1..5}) (hence the extra ``.0.`` in the
  keys), ``RCNN_toplayer`` (1x1 1024 -> 256, for P6), ``RCNN_smooth1`` / ``RCNN_smooth2`` (3x3, P3 / P2),
  ``RCNN_latlayer1..4`` (1x1 from C5, C4, C3, C2), ``RCNN_top`` = Sequential(Conv2d(256, 1024,
  kernel = stride = POOLING_SIZE), ReLU, Conv2d(1024, 1024, 1), ReLU) with ``cfgs/detnet59.yml``'s
  POOLING_SIZE 14, ``RCNN_cls_score`` Linear(1024, classes), ``RCNN_bbox_pred`` Linear(1024, 4 *
  classes) (class-specific; ``--cag`` would make it 4). The seed registers ``RCNN_rpn`` first
  (``_FPN.__init__``), then the rest (``_init_modules``); its proposal/RoI layers hold no state.
* ``_FPN.forward`` top-down: P6 = toplayer(C6); P5 = latlayer1(C5) + P6; P4 = latlayer2(C4) + P5 (same
  stride, no resize); P3 = smooth1(up(P4) + latlayer3(C3)); P2 = smooth2(up(P3) + latlayer4(C2)), where
  ``up`` is ``F.upsample(size=lateral size, mode='bilinear')``, which under the PyTorch 0.2/0.3 the seed
  requires ("not support pytorch version >= 0.4.0") aligned corners; ``align_corners`` selects it here.
  The RPN reads P2..P6, the RoI head P2..P5.
* ``rpn_head`` reproduces ``_RPN_FPN.forward`` up to the proposal layer, including how it turns the 6
  score channels into the foreground probability the proposal layer ranks (``input[0][:, :, 1]``).
* ``pyramid_roi_feat`` / ``roi_align_avg`` — ``_FPN._PyramidRoI_Feat`` with POOLING_MODE 'align' and
  ``lib/model/roi_align`` (``RoIAlignAvg`` over ``RoIAlignFunction``), the kernels ported from
  ``src/roi_align_kernel.cu`` (the seed has no CPU implementation); ``DetNetFPN.rcnn_head`` runs them and
  the box head on given RoIs, as ``_FPN.forward`` does after the proposal layer at test time.

Everything is the seed's inference computation in current PyTorch; no training code.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EXPANSION = 4
POOLING_SIZE = 14  # cfgs/detnet59.yml
NUM_ANCHORS = 3  # one scale per level x ratios (0.5, 1, 2)


class DetNetBottleneck(nn.Module):
    """The seed's ``Bottleneck`` (shortcut 'downsample' or none), ``BottleneckB`` ('extra_conv') and
    ``BottleneckA`` (none, dilation 2) in one class with the same sub-module names."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, shortcut: str | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut_name = shortcut
        if shortcut is not None:
            projection = nn.Sequential(
                nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * EXPANSION),
            )
            setattr(self, shortcut, projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.shortcut_name is None else getattr(self, self.shortcut_name)(x)
        return self.relu(out + residual)


def _resnet_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """The seed's ``DetNet._make_layer`` (torchvision's): a projection on the first block."""
    layers = [DetNetBottleneck(inplanes, planes, stride, shortcut="downsample")]
    layers += [DetNetBottleneck(planes * EXPANSION, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _detnet_layer(inplanes: int, planes: int, blocks: int) -> nn.Sequential:
    """The seed's ``DetNet._make_new_layer``: BottleneckB then BottleneckA's, stride 1, dilation 2."""
    layers = [DetNetBottleneck(inplanes, planes, dilation=2, shortcut="extra_conv")]
    layers += [DetNetBottleneck(planes * EXPANSION, planes, dilation=2) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class DetNet59(nn.Module):
    """The ImageNet classifier (``detnet59.pth`` keys); ``features`` gives C2..C6, ``forward`` the logits."""

    def __init__(self, num_classes: int = 1000, layers: tuple[int, ...] = (3, 4, 6, 3, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _resnet_layer(64, 64, layers[0], 1)
        self.layer2 = _resnet_layer(256, 128, layers[1], 2)
        self.layer3 = _resnet_layer(512, 256, layers[2], 2)
        self.layer4 = _detnet_layer(1024, 256, layers[3])
        self.layer5 = _detnet_layer(1024, 256, layers[4])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1024, num_classes)

    def features(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for level, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4, self.layer5), 2):
            x = out[level] = layer(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)[6]), 1))


class RPNFPN(nn.Module):
    """``_RPN_FPN``'s layers (``din`` 256, 512-channel conv, 2 x 3 scores, 4 x 3 deltas)."""

    def __init__(self, din: int = 256):
        super().__init__()
        self.RPN_Conv = nn.Conv2d(din, 512, 3, 1, 1, bias=True)
        self.RPN_cls_score = nn.Conv2d(512, 2 * NUM_ANCHORS, 1, 1, 0)
        self.RPN_bbox_pred = nn.Conv2d(512, 4 * NUM_ANCHORS, 1, 1, 0)


class DetNetFPN(nn.Module):
    """The seed's FPN Faster R-CNN modules (keys of its ``fpn_*.pth`` ``['model']``); ``forward`` = backbone + FPN."""

    def __init__(self, num_classes: int = 21, align_corners: bool = True, pooling_size: int = POOLING_SIZE):
        super().__init__()
        self.align_corners = align_corners
        self.pooling_size = pooling_size
        self.RCNN_rpn = RPNFPN(256)
        body = DetNet59()
        self.RCNN_layer0 = nn.Sequential(body.conv1, body.bn1, body.relu, body.maxpool)
        self.RCNN_layer1 = nn.Sequential(body.layer1)
        self.RCNN_layer2 = nn.Sequential(body.layer2)
        self.RCNN_layer3 = nn.Sequential(body.layer3)
        self.RCNN_layer4 = nn.Sequential(body.layer4)
        self.RCNN_layer5 = nn.Sequential(body.layer5)
        self.RCNN_toplayer = nn.Conv2d(1024, 256, 1)
        self.RCNN_smooth1 = nn.Conv2d(256, 256, 3, padding=1)
        self.RCNN_smooth2 = nn.Conv2d(256, 256, 3, padding=1)
        self.RCNN_latlayer1 = nn.Conv2d(1024, 256, 1)
        self.RCNN_latlayer2 = nn.Conv2d(1024, 256, 1)
        self.RCNN_latlayer3 = nn.Conv2d(512, 256, 1)
        self.RCNN_latlayer4 = nn.Conv2d(256, 256, 1)
        self.RCNN_top = nn.Sequential(
            nn.Conv2d(256, 1024, pooling_size, stride=pooling_size),
            nn.ReLU(True),
            nn.Conv2d(1024, 1024, 1),
            nn.ReLU(True),
        )
        self.RCNN_cls_score = nn.Linear(1024, num_classes)
        self.RCNN_bbox_pred = nn.Linear(1024, 4 * num_classes)

    def _upsample_add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=y.shape[2:], mode="bilinear", align_corners=self.align_corners) + y

    def backbone_fpn(self, images: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """(C2..C6, P2..P6) as ``_FPN.forward`` computes them."""
        c = {}
        x = self.RCNN_layer0(images)
        for level, layer in enumerate(
            (self.RCNN_layer1, self.RCNN_layer2, self.RCNN_layer3, self.RCNN_layer4, self.RCNN_layer5), 2
        ):
            x = c[level] = layer(x)
        p6 = self.RCNN_toplayer(c[6])
        p5 = self.RCNN_latlayer1(c[5]) + p6
        p4 = self.RCNN_latlayer2(c[4]) + p5
        p3 = self.RCNN_smooth1(self._upsample_add(p4, self.RCNN_latlayer3(c[3])))
        p2 = self.RCNN_smooth2(self._upsample_add(p3, self.RCNN_latlayer4(c[2])))
        return c, {2: p2, 3: p3, 4: p4, 5: p5, 6: p6}

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.backbone_fpn(images)[1]

    def rpn_head(self, features: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``_RPN_FPN.forward`` before the proposal layer, levels 2..6 concatenated in (level, y, x, anchor) order.

        ``scores``: the 2-class logit pairs the training loss reads (``cls_score.permute(0, 2, 3, 1).view(B,
        -1, 2)``: channels (2a, 2a + 1) for anchor a); ``fg_prob``: what the proposal layer ranks — the
        softmax over channels (c, c + 3) regrouped by the same permute/view, i.e. anchor 0 gets
        softmax(c1, c4)[0], anchor 1 softmax(c0, c3)[1], anchor 2 softmax(c2, c5)[1]; ``deltas``: (dx, dy,
        dw, dh) per anchor; ``raw_scores`` / ``raw_deltas``: the per-level NCHW conv outputs.
        """
        rpn = self.RCNN_rpn
        scores, probs, deltas, raw_scores, raw_deltas = [], [], [], {}, {}
        for level in sorted(features):
            x = F.relu(rpn.RPN_Conv(features[level]))
            score = raw_scores[level] = rpn.RPN_cls_score(x)
            batch, channels, height, width = score.shape
            # The seed's reshape(x, 2): view (B, 2, A * H, W), softmax over dim 1, then back to (B, 2A, H, W).
            prob = F.softmax(score.contiguous().view(batch, 2, channels * height // 2, width), dim=1).view(score.shape)
            delta = raw_deltas[level] = rpn.RPN_bbox_pred(x)
            scores.append(score.permute(0, 2, 3, 1).reshape(batch, -1, 2))
            probs.append(prob.permute(0, 2, 3, 1).reshape(batch, -1, 2))
            deltas.append(delta.permute(0, 2, 3, 1).reshape(batch, -1, 4))
        return {
            "scores": torch.cat(scores, 1),
            "fg_prob": torch.cat(probs, 1)[:, :, 1],
            "deltas": torch.cat(deltas, 1),
            "raw_scores": raw_scores,
            "raw_deltas": raw_deltas,
        }

    def box_head(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_head_to_tail`` + predictors on RoI features [R, 256, P, P]: (cls_score, cls_prob, bbox_pred)."""
        fc7 = self.RCNN_top(pooled).mean(3).mean(2)
        cls_score = self.RCNN_cls_score(fc7)
        return cls_score, F.softmax(cls_score, dim=1), self.RCNN_bbox_pred(fc7)

    def rcnn_head(self, pyramid: dict[int, torch.Tensor], rois: torch.Tensor, im_info: torch.Tensor):
        """``_FPN.forward`` from the RoIs on (test time): RoIAlignAvg on P2..P5 (``pyramid_roi_feat``), then
        ``box_head``. ``rois`` [R, 5] (batch index, x1, y1, x2, y2); returns (cls_score, cls_prob, bbox_pred)."""
        pooled = pyramid_roi_feat([pyramid[level] for level in range(2, 6)], rois, im_info, self.pooling_size)
        return self.box_head(pooled)


def fpn_modules(model: DetNetFPN) -> list[nn.Module]:
    """The FPN's own layers (for parameter counts)."""
    names = ("RCNN_toplayer", "RCNN_smooth1", "RCNN_smooth2") + tuple(f"RCNN_latlayer{i}" for i in range(1, 5))
    return [getattr(model, name) for name in names]


# --- RoIAlignAvg (lib/model/roi_align, POOLING_MODE 'align') and _PyramidRoI_Feat --------------------------
#
# The seed's RoIAlign exists only as a CUDA kernel (``src/roi_align_kernel.cu``: ROIAlignForward /
# ROIAlignBackward; its CPU path raises NotImplementedError), so this is a loop-for-loop NumPy port of it.
# Rounding as the kernel's: RoI corners times the float spatial scale in float32, ``roi_width =
# fmaxf(end - start + 1., 0.)`` (float32), ``bin = roi_width / (aligned - 1.)`` (float32), the grid point
# ``ph * bin + start`` as one FMA (nvcc's default contraction), ``h_ratio = h - hstart`` in float32, and the
# interpolation ``data * (1. - h_ratio) * (1. - w_ratio) + ...`` in double (the kernel's ``1.`` literals are
# doubles) stored as float32. The backward kernel's atomicAdds are accumulated in float64 here.


def _grid_point(index: int, bin_size: np.float32, start: np.float32) -> np.float32:
    """``(float)(index) * bin + start`` rounded once, as the FMA nvcc emits (exact product in float64)."""
    return np.float32(np.float64(index) * np.float64(bin_size) + np.float64(start))


def _kernel_samples(roi: np.ndarray, spatial_scale: float, aligned_height: int, aligned_width: int, height: int,
                    width: int):  # fmt: skip
    """For one RoI [batch_index, x1, y1, x2, y2]: [(ph, pw, hstart, wstart, h_ratio, w_ratio)] of the valid
    grid points (the kernel writes 0 for the others and skips them in the backward pass)."""
    scale = np.float32(spatial_scale)
    start_w, start_h = np.float32(roi[1]) * scale, np.float32(roi[2]) * scale
    end_w, end_h = np.float32(roi[3]) * scale, np.float32(roi[4]) * scale
    roi_width = max(np.float32(np.float32(end_w - start_w) + np.float32(1.0)), np.float32(0.0))
    roi_height = max(np.float32(np.float32(end_h - start_h) + np.float32(1.0)), np.float32(0.0))
    bin_h = np.float32(roi_height / np.float32(aligned_height - 1))
    bin_w = np.float32(roi_width / np.float32(aligned_width - 1))
    samples = []
    for ph in range(aligned_height):
        for pw in range(aligned_width):
            h, w = _grid_point(ph, bin_h, start_h), _grid_point(pw, bin_w, start_w)
            if h < 0 or h >= height or w < 0 or w >= width:
                continue
            hstart, wstart = int(min(np.floor(h), height - 2)), int(min(np.floor(w), width - 2))
            samples.append((ph, pw, hstart, wstart, np.float32(h - hstart), np.float32(w - wstart)))
    return samples


def roi_align_forward(features: np.ndarray, rois: np.ndarray, aligned_height: int, aligned_width: int,
                      spatial_scale: float) -> np.ndarray:  # fmt: skip
    """ROIAlignForward: features [B, C, H, W] float32, rois [R, 5] -> [R, C, aligned_height, aligned_width]."""
    _, channels, height, width = features.shape
    out = np.zeros((len(rois), channels, aligned_height, aligned_width), np.float32)
    data = features.astype(np.float64)
    for n, roi in enumerate(rois):
        image = data[int(roi[0])]
        for ph, pw, hs, ws, hr, wr in _kernel_samples(roi, spatial_scale, aligned_height, aligned_width, height, width):
            hr, wr = np.float64(hr), np.float64(wr)
            value = (
                image[:, hs, ws] * (1.0 - hr) * (1.0 - wr)
                + image[:, hs, ws + 1] * (1.0 - hr) * wr
                + image[:, hs + 1, ws] * hr * (1.0 - wr)
                + image[:, hs + 1, ws + 1] * hr * wr
            )
            out[n, :, ph, pw] = value.astype(np.float32)
    return out


def roi_align_backward(grad_output: np.ndarray, rois: np.ndarray, feature_shape: tuple[int, ...],
                       spatial_scale: float) -> np.ndarray:  # fmt: skip
    """ROIAlignBackward: the same four weights scattered back (float64 sums of the kernel's atomicAdds)."""
    _, _, height, width = feature_shape
    aligned_height, aligned_width = grad_output.shape[2:]
    grad = np.zeros(feature_shape, np.float64)
    top = grad_output.astype(np.float64)
    for n, roi in enumerate(rois):
        image = grad[int(roi[0])]
        for ph, pw, hs, ws, hr, wr in _kernel_samples(roi, spatial_scale, aligned_height, aligned_width, height, width):
            hr, wr, diff = np.float64(hr), np.float64(wr), top[n, :, ph, pw]
            image[:, hs, ws] += diff * (1.0 - hr) * (1.0 - wr)
            image[:, hs, ws + 1] += diff * (1.0 - hr) * wr
            image[:, hs + 1, ws] += diff * hr * (1.0 - wr)
            image[:, hs + 1, ws + 1] += diff * hr * wr
    return grad.astype(np.float32)


class RoIAlignFunction(torch.autograd.Function):
    """``functions/roi_align.py``'s RoIAlignFunction on the ported kernels (features get a gradient, RoIs none)."""

    @staticmethod
    def forward(ctx, features, rois, aligned_height: int, aligned_width: int, spatial_scale: float):
        ctx.save_for_backward(rois)
        ctx.feature_shape, ctx.spatial_scale = tuple(features.shape), spatial_scale
        out = roi_align_forward(features.detach().numpy(), rois.numpy(), aligned_height, aligned_width, spatial_scale)
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        grad = roi_align_backward(grad_output.numpy(), rois.numpy(), ctx.feature_shape, ctx.spatial_scale)
        return torch.from_numpy(grad), None, None, None, None


def roi_align_avg(features: torch.Tensor, rois: torch.Tensor, spatial_scale: float, size: int = POOLING_SIZE):
    """``modules/roi_align.py``'s RoIAlignAvg: the (size + 1)^2 grid, then ``avg_pool2d(kernel 2, stride 1)``."""
    x = RoIAlignFunction.apply(features, rois, size + 1, size + 1, spatial_scale)
    return F.avg_pool2d(x, kernel_size=2, stride=1)


def roi_levels(rois: torch.Tensor) -> torch.Tensor:
    """``_PyramidRoI_Feat``'s level of each RoI [R, 5] (float32 as the seed computes it), clamped to 2..5."""
    h = rois[:, 4] - rois[:, 2] + 1
    w = rois[:, 3] - rois[:, 1] + 1
    roi_level = torch.log(torch.sqrt(h * w) / 224.0) / np.log(2)
    roi_level = torch.floor(roi_level + 4)
    roi_level[roi_level < 2] = 2
    roi_level[roi_level > 5] = 5
    return roi_level


def pyramid_roi_feat(feat_maps: list[torch.Tensor], rois: torch.Tensor, im_info: torch.Tensor,
                     size: int = POOLING_SIZE) -> torch.Tensor:  # fmt: skip
    """``_FPN._PyramidRoI_Feat`` with POOLING_MODE 'align': each RoI [batch_index, x1, y1, x2, y2] pooled by
    RoIAlignAvg from P2..P5 (``feat_maps``) at scale ``feat_maps[i].size(2) / im_info[0][0]``, in RoI order."""
    roi_level = roi_levels(rois)
    pooled, box_to_levels = [], []
    for i, level in enumerate(range(2, 6)):
        if (roi_level == level).sum() == 0:
            continue
        idx_l = (roi_level == level).nonzero().reshape(-1)
        box_to_levels.append(idx_l)
        scale = feat_maps[i].size(2) / float(im_info[0][0])
        pooled.append(roi_align_avg(feat_maps[i], rois[idx_l], scale, size))
    roi_pool_feat = torch.cat(pooled, 0)
    _, order = torch.sort(torch.cat(box_to_levels, 0))
    return roi_pool_feat[order]
