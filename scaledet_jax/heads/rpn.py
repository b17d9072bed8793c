"""Region proposal network head: a shared 3x3 conv, then per-anchor objectness and box deltas.

torchvision's ``RPNHead`` (one 3x3 conv with bias + relu, 1x1 predictors, N(0, 0.01) init) and
TF Model Garden's ``RPNHead`` (the same with a batch norm per level after each conv) are the
``norm=None`` / ``norm='batch'`` options of this one module. Weights are shared across levels.
Outputs per level: objectness logits [B, H, W, A] and deltas [B, H, W, A * 4] with channel
``a * 4 + k``, k in (ty, tx, th, tw) as our box coder orders them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from scaledet_jax import nn as snn

Array = jax.Array


class RPNHead(nn.Module):
    num_anchors: int
    min_level: int = 2
    max_level: int = 6
    num_convs: int = 1
    num_filters: int = 256
    norm: str | None = None  # None (torchvision) or 'batch' (Model Garden: BN per level after each conv)
    activation: str = "relu"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    padding: str = "same"
    dtype: Any = None

    @nn.compact
    def __call__(self, features: dict[int, Array], train: bool = False) -> tuple[dict[int, Array], dict[int, Array]]:
        if self.norm not in (None, "batch"):
            raise ValueError(f"RPN norm must be None or 'batch', got {self.norm!r}")
        act = snn.get_activation(self.activation)
        init = nn.initializers.normal(0.01)
        convs = [
            snn.conv(
                self.num_filters,
                3,
                use_bias=True,
                padding=self.padding,
                kernel_init=init,
                dtype=self.dtype,
                name="conv" if self.num_convs == 1 else f"conv_{i}",
            )  # fmt: skip
            for i in range(self.num_convs)
        ]
        objectness = snn.conv(self.num_anchors, 1, use_bias=True, kernel_init=init, dtype=self.dtype, name="objectness")
        deltas = snn.conv(4 * self.num_anchors, 1, use_bias=True, kernel_init=init, dtype=self.dtype, name="box")
        scores, boxes = {}, {}
        for level in range(self.min_level, self.max_level + 1):
            x = features[level]
            for i, conv in enumerate(convs):
                x = conv(x)
                if self.norm == "batch":
                    x = snn.batch_norm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name=f"norm_{level}_{i}")(
                        x, use_running_average=not train
                    )
                x = act(x)
            scores[level], boxes[level] = objectness(x), deltas(x)
        return scores, boxes
