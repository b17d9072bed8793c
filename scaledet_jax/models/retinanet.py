"""RetinaNet detector: backbone (+ optional decoder) + dense class/box head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from scaledet_jax.heads.retinanet import RetinaNetHead

Array = jax.Array


class RetinaNet(nn.Module):
    """images [B, H, W, 3] -> {'class_outputs': {level: [B, H_l, W_l, A*C]}, 'box_outputs': {...}}.

    ``decoder`` is None for backbones whose endpoints feed the head directly (SpineNet), or an FPN
    / BiFPN module mapping backbone features to head features.
    """

    backbone: nn.Module
    head: RetinaNetHead
    decoder: nn.Module | None = None

    def __call__(self, images: Array, train: bool = False) -> dict[str, Any]:
        features = self.backbone(images, train=train)
        if self.decoder is not None:
            features = self.decoder(features, train=train)
        class_outputs, box_outputs = self.head(features, train=train)
        return {"class_outputs": class_outputs, "box_outputs": box_outputs}
