"""RetinaNet head (Lin et al., 2017) as in TF Model Garden ``RetinaNetHead``.

Class and box towers of ``num_convs`` 3x3 convs whose weights are shared across levels, with a
separate batch norm per level, then a 3x3 predictor. With ``separable=True`` every conv is a
depthwise-separable conv with a pointwise bias and automl's variance-scaling initialisers: the
EfficientDet class/box nets. Outputs keep Model Garden's (and automl's) channel layout: class
channel ``a * num_classes + c`` and box channel ``a * 4 + k`` for anchor ``a``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax

from scaledet_jax import nn as snn

Array = jax.Array


def prior_probability_bias(prior: float = 0.01) -> float:
    """Class-logit bias so that every anchor starts at probability ``prior`` (focal loss paper)."""
    return -math.log((1.0 - prior) / prior)


class RetinaNetHead(nn.Module):
    num_classes: int
    num_anchors: int
    min_level: int = 3
    max_level: int = 7
    num_convs: int = 4
    num_filters: int = 256
    activation: str = "swish"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    padding: str = "same"
    prior_prob: float = 0.01
    conv_bias: bool = True  # tower convs; the mmdetection SpineNet head has none (BN follows)
    separable: bool = False
    norm: str | None = "batch"  # batch norm per level after each tower conv; None: torchvision's head (conv + relu)
    dtype: Any = None

    def _conv(self, features: int, name: str, kernel_init, bias_init=nn.initializers.zeros, use_bias: bool = True):
        if self.separable:
            scaling = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
            return snn.SeparableConv(
                features,
                3,
                use_bias=use_bias,
                padding=self.padding,
                depthwise_init=snn.keras_depthwise(nn.initializers.variance_scaling, 1.0, "fan_in", "truncated_normal"),
                pointwise_init=scaling,
                bias_init=bias_init,
                dtype=self.dtype,
                name=name,
            )
        return snn.conv(
            features,
            3,
            use_bias=use_bias,
            padding=self.padding,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=self.dtype,
            name=name,
        )

    @nn.compact
    def __call__(self, features: dict[int, Array], train: bool = False) -> tuple[dict[int, Array], dict[int, Array]]:
        act = snn.get_activation(self.activation)
        tower_init = nn.initializers.normal(0.01)
        predict_init = nn.initializers.normal(1e-5)

        def tower(prefix: str):
            return [
                self._conv(self.num_filters, f"{prefix}_conv_{i}", tower_init, use_bias=self.conv_bias)
                for i in range(self.num_convs)
            ]

        class_convs, box_convs = tower("class"), tower("box")
        class_predict = self._conv(
            self.num_classes * self.num_anchors,
            "class_predict",
            predict_init,
            nn.initializers.constant(prior_probability_bias(self.prior_prob)),
        )
        box_predict = self._conv(4 * self.num_anchors, "box_predict", predict_init)

        def apply_tower(x, convs, prefix, level):
            for i, conv in enumerate(convs):
                x = conv(x)
                if self.norm == "batch":
                    x = snn.batch_norm(
                        self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name=f"{prefix}_bn_{level}_{i}"
                    )(x, use_running_average=not train)
                x = act(x)
            return x

        class_outputs, box_outputs = {}, {}
        for level in range(self.min_level, self.max_level + 1):
            x = features[level]
            class_outputs[level] = class_predict(apply_tower(x, class_convs, "class", level))
            box_outputs[level] = box_predict(apply_tower(x, box_convs, "box", level))
        return class_outputs, box_outputs
