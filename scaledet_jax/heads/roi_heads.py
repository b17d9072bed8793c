"""Second-stage heads on pooled RoI features.

``BoxHead``: optional 3x3 convs, fully connected layers, then a classifier over all classes
(background included) and class-specific box deltas (channel ``c * 4 + k``, k in (ty, tx, th, tw)).
torchvision's ``TwoMLPHead`` + ``FastRCNNPredictor`` is ``num_convs=0, num_fcs=2, norm=None``;
TF Model Garden's ``DetectionHead`` is ``num_convs=4, num_fcs=1, norm='batch'`` (convs and FCs keep
their bias and are followed by batch norm, as Keras builds them). Features are flattened in
(y, x, channel) order; the converter re-orders torchvision's (channel, y, x) fc6 weights.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from scaledet_jax import nn as snn

Array = jax.Array


class BoxHead(nn.Module):
    num_classes: int
    num_convs: int = 0
    conv_filters: int = 256
    num_fcs: int = 2
    fc_dims: int = 1024
    norm: str | None = None  # None or 'batch'
    class_agnostic_boxes: bool = False
    activation: str = "relu"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    padding: str = "same"
    dtype: Any = None

    @nn.compact
    def __call__(self, roi_features: Array, train: bool = False) -> tuple[Array, Array]:
        """roi_features [B, R, P, P, C] -> class logits [B, R, num_classes], box deltas [B, R, 4 * classes]."""
        if self.norm not in (None, "batch"):
            raise ValueError(f"box head norm must be None or 'batch', got {self.norm!r}")
        act = snn.get_activation(self.activation)
        batch, rois = roi_features.shape[:2]
        x = roi_features.reshape((batch * rois,) + roi_features.shape[2:])

        def normalise(y, name):
            if self.norm != "batch":
                return y
            return snn.batch_norm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name=name)(
                y, use_running_average=not train
            )

        for i in range(self.num_convs):
            x = snn.conv(
                self.conv_filters, 3, use_bias=True, padding=self.padding,
                kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal"),
                dtype=self.dtype, name=f"conv_{i}",
            )(x)  # fmt: skip
            x = act(normalise(x, f"conv_norm_{i}"))
        x = x.reshape(x.shape[0], -1)
        for i in range(self.num_fcs):
            x = nn.Dense(self.fc_dims, dtype=self.dtype, name=f"fc_{i}")(x)
            x = act(normalise(x, f"fc_norm_{i}"))
        class_logits = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype, name="class_logits"
        )(x)
        box_outputs = 4 if self.class_agnostic_boxes else 4 * self.num_classes
        box_deltas = nn.Dense(
            box_outputs, kernel_init=nn.initializers.normal(0.001), dtype=self.dtype, name="box_deltas"
        )(x)
        if self.class_agnostic_boxes:
            box_deltas = jnp.tile(box_deltas, (1, self.num_classes))
        return (
            class_logits.reshape(batch, rois, -1).astype(jnp.float32),
            box_deltas.reshape(batch, rois, -1).astype(jnp.float32),
        )
