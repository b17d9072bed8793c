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


def _normalise(head: nn.Module, y: Array, name: str, train: bool) -> Array:
    """The head's batch norm ``name`` on ``y`` when ``head.norm == 'batch'``, else ``y``."""
    if head.norm != "batch":
        return y
    return snn.batch_norm(head.bn_momentum, head.bn_epsilon, dtype=head.dtype, name=name)(
        y, use_running_average=not train
    )


class BoxHead(nn.Module):
    num_classes: int
    num_convs: int = 0
    conv_filters: int = 256
    num_fcs: int = 2
    fc_dims: int = 1024
    norm: str | None = None  # None or 'batch'
    conv_bias: bool = True  # mmdetection's ConvModule drops the bias before its norm
    fc_norm: bool = True  # with norm='batch': also after the FCs (Model Garden), or the convs only (mmdetection)
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
            return _normalise(self, y, name, train)

        for i in range(self.num_convs):
            x = snn.conv(
                self.conv_filters, 3, use_bias=self.conv_bias, padding=self.padding,
                kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal"),
                dtype=self.dtype, name=f"conv_{i}",
            )(x)  # fmt: skip
            x = act(normalise(x, f"conv_norm_{i}"))
        x = x.reshape(x.shape[0], -1)
        for i in range(self.num_fcs):
            x = nn.Dense(self.fc_dims, dtype=self.dtype, name=f"fc_{i}")(x)
            x = act(normalise(x, f"fc_norm_{i}") if self.fc_norm else x)
        class_logits = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype, name="class_logits"
        )(x)
        box_outputs = 4 if self.class_agnostic_boxes else 4 * self.num_classes
        box_deltas = nn.Dense(
            box_outputs, kernel_init=nn.initializers.normal(0.001), dtype=self.dtype, name="box_deltas"
        )(x)
        if self.class_agnostic_boxes:
            box_deltas = jnp.tile(box_deltas, (1, self.num_classes))
        out = jnp.promote_types(class_logits.dtype, jnp.float32)  # bfloat16 compute -> float32 outputs
        return class_logits.reshape(batch, rois, -1).astype(out), box_deltas.reshape(batch, rois, -1).astype(out)


def upsample_2x2(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """A 2x2 transposed convolution with stride 2 (no overlap): every input pixel writes its own 2x2
    output block, ``y[2i + a, 2j + b, o] = sum_c x[i, j, c] * kernel[a, b, c, o] (+ bias[o])``.

    x [N, H, W, C], kernel [2, 2, C, O] -> [N, 2H, 2W, O]. torch's ``ConvTranspose2d(C, O, 2, 2)``
    weight [C, O, a, b] and Keras' ``Conv2DTranspose(O, 2, 2)`` kernel [a, b, O, C] are transposes of it.
    """
    n, h, w, _ = x.shape
    y = jnp.einsum("nhwc,abco->nhawbo", x, kernel.astype(x.dtype)).reshape(n, 2 * h, 2 * w, kernel.shape[-1])
    return y if bias is None else y + bias.astype(y.dtype)


class MaskHead(nn.Module):
    """Mask branch of Mask R-CNN: ``num_convs`` 3x3 convs, a 2x2 stride-2 transposed conv, and a 1x1
    conv to one mask logit map per class.

    torchvision's ``MaskRCNNHeads`` + ``MaskRCNNPredictor`` is ``norm=None``; TF Model Garden's
    ``MaskHead`` is ``norm='batch'`` (convs and the deconv keep their bias and are followed by batch
    norm). Parameter names: ``conv_{i}``, ``conv_norm_{i}``, ``deconv`` (kernel [2, 2, in, out]),
    ``deconv_norm``, ``mask_logits``.
    """

    num_classes: int
    num_convs: int = 4
    conv_filters: int = 256
    norm: str | None = None  # None or 'batch'
    conv_bias: bool = True  # mmdetection's ConvModule drops the bias before its norm
    deconv_norm: bool = True  # with norm='batch': also after the deconv (Model Garden), or not (mmdetection)
    class_agnostic: bool = False
    activation: str = "relu"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    padding: str = "same"
    dtype: Any = None

    @nn.compact
    def __call__(self, roi_features: Array, train: bool = False) -> Array:
        """roi_features [B, R, P, P, C] -> mask logits [B, R, 2P, 2P, num_classes] (one map when class-agnostic)."""
        if self.norm not in (None, "batch"):
            raise ValueError(f"mask head norm must be None or 'batch', got {self.norm!r}")
        act = snn.get_activation(self.activation)
        batch, rois = roi_features.shape[:2]
        x = roi_features.reshape((batch * rois,) + roi_features.shape[2:])
        kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

        def normalise(y, name):
            return _normalise(self, y, name, train)

        for i in range(self.num_convs):
            x = snn.conv(
                self.conv_filters, 3, use_bias=self.conv_bias, padding=self.padding, kernel_init=kernel_init,
                dtype=self.dtype, name=f"conv_{i}",
            )(x)  # fmt: skip
            x = act(normalise(x, f"conv_norm_{i}"))
        x = _Upsample2x2(self.conv_filters, dtype=self.dtype, name="deconv")(x)
        x = act(normalise(x, "deconv_norm") if self.deconv_norm else x)
        outputs = 1 if self.class_agnostic else self.num_classes
        logits = snn.conv(outputs, 1, use_bias=True, kernel_init=kernel_init, dtype=self.dtype, name="mask_logits")(x)
        if self.class_agnostic:
            logits = jnp.broadcast_to(logits, logits.shape[:-1] + (self.num_classes,))
        return logits.reshape((batch, rois) + logits.shape[1:]).astype(jnp.promote_types(logits.dtype, jnp.float32))


class _Upsample2x2(nn.Module):
    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"), (2, 2, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if self.dtype is not None:
            x = x.astype(self.dtype)
        return upsample_2x2(x, kernel, bias)
