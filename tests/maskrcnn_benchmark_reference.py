"""PyTorch rebuild of facebookresearch/maskrcnn-benchmark's ResNet-FPN Faster / Mask R-CNN (``R-50-FPN``,
``R-101-FPN``: MSRA bodies, stride in the first 1x1) with its exact ``state_dict`` keys, for converter tests.

Written from reading ``maskrcnn_benchmark/modeling/backbone/resnet.py`` (``ResNet``, ``StemWithFixedBatchNorm``,
``BottleneckWithFixedBatchNorm``, ``_make_stage``); nothing is imported from it. The body is torchvision's ResNet
(the same bottleneck: 1x1 -> 3x3 -> 1x1 x4, projection ``downsample.{0,1}`` on each stage's first block, relu after
the add) with maskrcnn-benchmark's differences applied:

* ``STRIDE_IN_1X1=True``: each stage's stride sits on ``conv1`` (the 1x1), not on ``conv2`` (the 3x3);
* ``FrozenBatchNorm2d`` without epsilon (``vovnet_reference.FrozenBatchNorm2d``);
* keys ``stem.conv1`` / ``stem.bn1`` (``BaseStem``: 7x7/2 conv, norm, relu, ``max_pool2d(3, 2, padding=1)``) and
  ``layer{1..4}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1}``.

The FPN (in channels 256, 512, 1024, 2048), RPN and RoI heads are ``vovnet_reference``'s: maskrcnn-benchmark's own,
which the VoVNet fork shares.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import vovnet_reference as ref
from torch import nn

RESNET_FPN_CHANNELS = (256, 512, 1024, 2048)


class Stem(nn.Module):
    """``StemWithFixedBatchNorm``: ``conv1`` 7x7/2 (no bias) -> ``bn1`` -> relu -> 3x3/2 max pool (padding 1)."""

    def __init__(self, conv1: nn.Conv2d, bn1: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = conv1, bn1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)


class MSRAResNetBody(nn.Module):
    """maskrcnn-benchmark's ``ResNet`` body: images NCHW -> [C2, C3, C4, C5]."""

    def __init__(self, depth: int = 50):
        super().__init__()
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=ref.FrozenBatchNorm2d)
        for layer in (net.layer2, net.layer3, net.layer4):
            first = layer[0]  # STRIDE_IN_1X1: the stride moves from the 3x3 to the first 1x1
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
        self.stem = Stem(net.conv1, net.bn1)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outputs.append(x)
        return outputs


class ResNetRCNN(ref.GeneralizedRCNN):
    """``GeneralizedRCNN`` with an R-``depth``-FPN backbone: keys ``backbone.body.*``, ``backbone.fpn.*``, ``rpn.*``,
    ``roi_heads.box.*`` (and ``roi_heads.mask.*``); ``features`` / the fixed-RoI ``forward`` as the VoVNet rebuild's."""

    def __init__(self, depth: int = 50, mask: bool = False):
        nn.Module.__init__(self)
        body = MSRAResNetBody(depth)
        self.backbone = nn.Sequential(OrderedDict([("body", body), ("fpn", ref.FPN(RESNET_FPN_CHANNELS))]))
        self.rpn = ref.RPN()
        heads = [("box", ref.BoxHead())] + ([("mask", ref.MaskHead())] if mask else [])
        self.roi_heads = nn.ModuleDict(OrderedDict(heads))


def calibrate_frozen_bn_(model: nn.Module, body: nn.Module, images: np.ndarray, seed: int = 0) -> nn.Module:
    """As ``vovnet_reference.calibrate_frozen_bn_`` for any ``body`` inside ``model``: every FrozenBatchNorm2d gets
    its input's per-channel statistics (variance x U(0.5, 1.5)) from one forward pass on ``images`` (NHWC),
    weight U(0.5, 1.5), bias N(0, 0.1); every other bias N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)

    def hook(module: ref.FrozenBatchNorm2d, inputs: tuple[torch.Tensor]) -> None:
        x, n = inputs[0], inputs[0].shape[1]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) * (torch.rand(n, generator=generator) + 0.5))
        module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
        module.bias.copy_(torch.randn(n, generator=generator) * 0.1)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, ref.FrozenBatchNorm2d)]
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            body(torch.from_numpy(images).permute(0, 3, 1, 2))
    finally:
        for handle in handles:
            handle.remove()
    return model.eval()
