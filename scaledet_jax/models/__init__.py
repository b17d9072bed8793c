"""Model registry: ``build_model(model_config)`` assembles a detector from a config.

Families register a backbone builder (``@register_backbone('spinenet')``) and detectors register a
model builder (``@register_model('retinanet')``); each takes the ``config.model`` ConfigDict.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import ml_collections

from scaledet_jax.ops import anchors as anchor_ops

_BACKBONES: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {}
_MODELS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {}


def register_backbone(name: str):
    def wrap(fn):
        _BACKBONES[name] = fn
        return fn

    return wrap


def register_model(name: str):
    def wrap(fn):
        _MODELS[name] = fn
        return fn

    return wrap


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(sorted(table))}")
    return table[name]


def build_backbone(model_config: ml_collections.ConfigDict) -> nn.Module:
    return _lookup(_BACKBONES, "backbone", model_config.backbone.name)(model_config)


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
    """The detector described by ``config.model`` (a Flax module taking images [B, H, W, 3])."""
    return _lookup(_MODELS, "model", model_config.name)(model_config)


def _dtype(model_config):
    return {"float32": None, "bfloat16": "bfloat16"}[model_config.get("dtype", "float32")]


@register_backbone("spinenet")
def _build_spinenet(model_config: ml_collections.ConfigDict) -> nn.Module:
    from scaledet_jax.backbones.spinenet import SpineNet

    b = model_config.backbone
    # Optional explicit scaling (e.g. a smaller net for the quickstart); unset keys come from model_id.
    scaling = {
        k: b[k]
        for k in ("endpoints_num_filters", "filter_size_scale", "resample_alpha", "block_repeats")
        if b.get(k) is not None
    }
    return SpineNet.from_model_id(
        b.model_id,
        **scaling,
        min_level=model_config.min_level,
        max_level=model_config.max_level,
        activation=model_config.activation,
        stochastic_depth_rate=b.get("stochastic_depth_rate", 0.0),
        bn_momentum=model_config.norm.momentum,
        bn_epsilon=model_config.norm.epsilon,
        conv_padding=model_config.get("conv_padding", "same"),
        pool_padding=model_config.get("pool_padding", "same"),
        endpoint_activation=b.get("endpoint_activation", True),
        resample_pooling=b.get("resample_pooling", "repeated"),
        dtype=_dtype(model_config),
    )


def _retinanet_head(model_config: ml_collections.ConfigDict, separable: bool = False) -> nn.Module:
    from scaledet_jax.heads.retinanet import RetinaNetHead

    h, a = model_config.head, model_config.anchor
    return RetinaNetHead(
        num_classes=model_config.num_classes,
        num_anchors=anchor_ops.num_anchors_per_location(a.num_scales, a.aspect_ratios),
        min_level=model_config.min_level,
        max_level=model_config.max_level,
        num_convs=h.num_convs,
        num_filters=h.num_filters,
        activation=model_config.activation,
        bn_momentum=model_config.norm.momentum,
        bn_epsilon=model_config.norm.epsilon,
        padding=model_config.get("conv_padding", "same"),
        conv_bias=h.get("conv_bias", True),
        separable=separable,
        dtype=_dtype(model_config),
    )


@register_model("retinanet")
def _build_retinanet(model_config: ml_collections.ConfigDict) -> nn.Module:
    from scaledet_jax.models.retinanet import RetinaNet

    return RetinaNet(backbone=build_backbone(model_config), head=_retinanet_head(model_config))


@register_backbone("efficientnet")
def _build_efficientnet(model_config: ml_collections.ConfigDict) -> nn.Module:
    from scaledet_jax.backbones.efficientnet import EfficientNet

    b = model_config.backbone
    return EfficientNet.from_model_id(
        b.model_id,
        drop_connect_rate=b.get("drop_connect_rate", 0.2),
        max_level=min(5, model_config.max_level),
        activation=model_config.activation,
        bn_momentum=model_config.norm.momentum,
        bn_epsilon=b.get("bn_epsilon") or model_config.norm.epsilon,
        padding=model_config.get("conv_padding", "same"),
        dtype=_dtype(model_config),
    )


def _build_bifpn(model_config: ml_collections.ConfigDict) -> nn.Module:
    from scaledet_jax.necks.bifpn import BiFPN

    d = model_config.decoder
    return BiFPN(
        num_filters=d.num_filters,
        num_repeats=d.num_repeats,
        min_level=model_config.min_level,
        max_level=model_config.max_level,
        weight_method=d.get("weight_method", "fastattn"),
        activation=model_config.activation,
        bn_momentum=model_config.norm.momentum,
        bn_epsilon=model_config.norm.epsilon,
        conv_padding=model_config.get("conv_padding", "same"),
        pool_padding=model_config.get("pool_padding", "same"),
        conv_bias=d.get("conv_bias", True),
        dtype=_dtype(model_config),
    )


@register_model("efficientdet")
def _build_efficientdet(model_config: ml_collections.ConfigDict) -> nn.Module:
    """EfficientNet + BiFPN + separable class/box nets (automl's EfficientDet)."""
    from scaledet_jax.models.retinanet import RetinaNet

    return RetinaNet(
        backbone=build_backbone(model_config),
        decoder=_build_bifpn(model_config),
        head=_retinanet_head(model_config, separable=True),
    )
