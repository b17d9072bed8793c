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
        norm=h.get("norm", "batch") or None,
        dtype=_dtype(model_config),
    )


@register_model("retinanet")
def _build_retinanet(model_config: ml_collections.ConfigDict) -> nn.Module:
    from scaledet_jax.models.retinanet import RetinaNet

    return RetinaNet(
        backbone=build_backbone(model_config), decoder=_build_decoder(model_config), head=_retinanet_head(model_config)
    )


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


@register_backbone("resnet")
def _build_resnet(model_config: ml_collections.ConfigDict) -> nn.Module:
    from scaledet_jax.backbones.resnet import build_resnet

    return build_resnet(model_config)


@register_backbone("vovnet")
def _build_vovnet(model_config: ml_collections.ConfigDict) -> nn.Module:
    from scaledet_jax.backbones.vovnet import build_vovnet

    return build_vovnet(model_config)


@register_backbone("detnet")
def _build_detnet(model_config: ml_collections.ConfigDict) -> nn.Module:
    from scaledet_jax.backbones.detnet import build_detnet

    return build_detnet(model_config)


def _build_decoder(model_config: ml_collections.ConfigDict) -> nn.Module | None:
    """The neck named by ``model.decoder.name``: 'fpn', or 'none' (backbone endpoints feed the heads)."""
    decoder = model_config.get("decoder")
    name = decoder.get("name", "none") if decoder is not None else "none"
    if name == "none":
        return None
    if name == "fpn":
        from scaledet_jax.necks.fpn import build_fpn

        return build_fpn(model_config)
    raise ValueError(f"unknown model.decoder.name {name!r}; use 'fpn' or 'none'")


@register_model("faster_rcnn")
def _build_faster_rcnn(model_config: ml_collections.ConfigDict) -> nn.Module:
    """Backbone (+ FPN) + RPN + multilevel RoIAlign + box head (torchvision / Model Garden semantics as options)."""
    from scaledet_jax.models.faster_rcnn import FasterRCNN

    return FasterRCNN(**_two_stage_parts(model_config))


@register_model("mask_rcnn")
def _build_mask_rcnn(model_config: ml_collections.ConfigDict) -> nn.Module:
    """Faster R-CNN + mask head on RoIAlign 14x14 features (``model.mask_head``)."""
    from scaledet_jax.heads.roi_heads import MaskHead
    from scaledet_jax.models.mask_rcnn import MaskRCNN, MaskSettings

    m = model_config
    head = m.mask_head
    return MaskRCNN(
        **_two_stage_parts(m),
        mask_head=MaskHead(
            num_classes=m.num_classes,
            num_convs=head.num_convs,
            conv_filters=head.conv_filters,
            norm=head.get("norm") or None,
            class_agnostic=head.get("class_agnostic", False),
            conv_bias=head.get("conv_bias", True),
            deconv_norm=head.get("deconv_norm", True),
            padding=m.get("conv_padding", "same"),
            bn_momentum=m.norm.momentum,
            bn_epsilon=m.norm.epsilon,
            dtype=_dtype(m),
        ),
        mask=MaskSettings(
            output_size=head.roi_output_size,
            sampling_ratio=head.get("sampling_ratio", m.roi.sampling_ratio),
            target_size=2 * head.roi_output_size,
            num_samples=head.get("num_samples", 0),
        ),
    )


def _two_stage_parts(model_config: ml_collections.ConfigDict) -> dict:
    """The Faster R-CNN modules and settings of ``model_config`` (shared by Faster and Mask R-CNN)."""
    from scaledet_jax.heads.roi_heads import BoxHead
    from scaledet_jax.heads.rpn import RPNHead
    from scaledet_jax.models import faster_rcnn as frcnn

    m = model_config
    a, rpn, roi, head = m.anchor, m.rpn, m.roi, m.box_head
    anchor = frcnn.AnchorSettings(
        num_scales=a.num_scales,
        aspect_ratios=tuple(a.aspect_ratios),
        anchor_size=a.anchor_size,
        center_offset=a.get("center_offset", 0.5),
        round_base=a.get("round_base", False),
        integer_stride=a.get("integer_stride", False),
        plus_one_rounding=a.get("plus_one_rounding", False),
    )
    padding = m.get("conv_padding", "same")
    norm = dict(bn_momentum=m.norm.momentum, bn_epsilon=m.norm.epsilon)
    return dict(
        backbone=build_backbone(m),
        decoder=_build_decoder(m),
        rpn_head=RPNHead(
            num_anchors=anchor.num_anchors,
            min_level=m.min_level,
            max_level=m.max_level,
            num_convs=rpn.num_convs,
            num_filters=rpn.num_filters,
            norm=rpn.get("norm") or None,
            padding=padding,
            dtype=_dtype(m),
            **norm,
        ),
        box_head=BoxHead(
            num_classes=m.num_classes,
            num_convs=head.num_convs,
            conv_filters=head.conv_filters,
            num_fcs=head.num_fcs,
            fc_dims=head.fc_dims,
            norm=head.get("norm") or None,
            class_agnostic_boxes=head.get("class_agnostic_boxes", False),
            conv_bias=head.get("conv_bias", True),
            fc_norm=head.get("fc_norm", True),
            padding=padding,
            dtype=_dtype(m),
            **norm,
        ),
        image_size=m.image_size,
        feature_strides=tuple(m.feature_strides) if m.get("feature_strides") else None,
        min_level=m.min_level,
        max_level=m.max_level,
        anchor=anchor,
        proposals=frcnn.ProposalSettings(
            pre_nms_top_k_train=rpn.pre_nms_top_k_train,
            post_nms_top_k_train=rpn.post_nms_top_k_train,
            pre_nms_top_k=rpn.pre_nms_top_k,
            post_nms_top_k=rpn.post_nms_top_k,
            nms_iou=rpn.nms_iou,
            min_size=rpn.min_size,
            score_threshold=rpn.get("score_threshold", 0.0),
            clip=rpn.get("clip", "image"),
            log_size_clip=rpn.get("log_size_clip", "max"),
        ),
        roi=frcnn.RoISettings(
            min_level=roi.min_level,
            max_level=roi.max_level,
            output_size=roi.output_size,
            sampling_ratio=roi.sampling_ratio,
            aligned=roi.aligned,
            canonical_size=roi.canonical_size,
            canonical_level=roi.canonical_level,
            style=roi.get("style", "torchvision"),
            plus_one=roi.get("plus_one", False),
            num_samples=roi.num_samples,
            foreground_fraction=roi.foreground_fraction,
            foreground_iou=roi.foreground_iou,
            background_iou_high=roi.background_iou_high,
            background_iou_low=roi.background_iou_low,
            box_weights=tuple(m.box_coder_weights),
        ),
    )
