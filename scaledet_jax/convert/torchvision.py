"""torchvision detection checkpoints: ``fasterrcnn_resnet50_fpn``, ``maskrcnn_resnet50_fpn`` and
``retinanet_resnet50_fpn`` (v1 architectures; ResNet-50 or -101 bodies), as ``model.state_dict()`` or
references/detection's ``{'model': ..., 'optimizer': ..., ...}``. The ``_v2`` models (GroupNorm / conv box
heads) do not fit and are refused by the strict mapping.

Keys
----
Backbone ``backbone.body.``: ``conv1``, ``bn1``, ``layer{1..4}.{b}.conv{1,2,3}`` / ``bn{1,2,3}`` and
``downsample.{0,1}`` (our ``stage{2..5}_block{b}``; FrozenBatchNorm2d buffers weight, bias,
running_mean, running_var -> our FrozenBatchNorm's 'batch_stats'; a ``num_batches_tracked``, saved
by a BatchNorm2d build, is ignored). FPN ``backbone.fpn.inner_blocks.{i}.0`` / ``layer_blocks.{i}.0``
(``inner_blocks.{i}`` in checkpoints saved before torchvision 0.13) for our ``lateral_{l}`` /
``output_{l}``, i = l - min_level, and RetinaNet's ``extra_blocks.p6`` / ``p7``. Faster R-CNN:
``rpn.head.conv.0.0`` (old: ``rpn.head.conv``), ``rpn.head.cls_logits`` / ``bbox_pred``;
``roi_heads.box_head.fc6`` / ``fc7``, ``roi_heads.box_predictor.cls_score`` / ``bbox_pred``.
Mask R-CNN adds ``roi_heads.mask_head.{i}.0`` (old: ``mask_fcn{i+1}``) for our ``conv_{i}``,
``roi_heads.mask_predictor.conv5_mask`` (ConvTranspose2d, weight [in, out, 2, 2]) and ``mask_fcn_logits``.
RetinaNet: ``head.{classification,regression}_head.conv.{i}.0`` (old: ``conv.{2i}``),
``cls_logits`` / ``bbox_reg``.

Semantics (model options, stored with the converted checkpoint)
---------------------------------------------------------------
Symmetric conv / pool padding, relu, FrozenBatchNorm eps 1e-5 (``--from=torchvision``) or 0
(``--from=torchvision-coco-v1``: torchvision's published COCO_V1 weights of both detectors, which
torchvision itself runs with eps 0 via ``overwrite_eps``), ImageNet RGB input, output c = category
id c with background 0 (``background_slot``; COCO: 91, the count is read from the checkpoint),
anchors centred at multiples of the (integer) stride with rounded base sizes.
Faster R-CNN: FPN P2-P5 + max-pooled P6, one RPN conv, 3 anchors of size 32 * 2**(level - 2),
RoIAlign 7x7 (sampling 2, not aligned) on P2-P5, two-FC box head, box coding weights (10, 10, 5, 5).
RetinaNet: FPN P3-P5 + P6/P7 by 3x3/2 convs from the P5 output (relu before P7), no FPN or head
norm, 9 anchors of sizes (x, int(x 2^1/3), int(x 2^2/3)) for x = 32 * 2**(level - 3)
(``anchor.truncate_sizes``).

Re-ordered on conversion: box codes (dx, dy, dw, dh) -> our (dy, dx, dh, dw) in every box
predictor; RetinaNet's anchors per location (ratio-major with h/w ratios (0.5, 1, 2), then size)
-> ours (scale-major, w/h ratios); the box head's fc6 input from (channel, y, x) to our (y, x,
channel) flattening.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from scaledet_jax.cli import UserError
from scaledet_jax.convert.mmdet import anchor_permutation
from scaledet_jax.convert.torch_layout import BN_IGNORED_SUFFIX, Path, leaf_name, numbered

FASTER_RCNN, RETINANET, MASK_RCNN = "faster_rcnn", "retinanet", "mask_rcnn"
_KIND_KEYS = {
    FASTER_RCNN: "roi_heads.box_predictor.cls_score.weight",
    RETINANET: "head.classification_head.cls_logits.weight",
}
_CONFIGS = {
    FASTER_RCNN: "configs/fasterrcnn_resnet50_fpn.py",
    RETINANET: "configs/retinanet_resnet50_fpn.py",
    MASK_RCNN: "configs/maskrcnn_resnet50_fpn.py",
}
_NAMES = {FASTER_RCNN: "Faster R-CNN", RETINANET: "RetinaNet", MASK_RCNN: "Mask R-CNN"}
# A Mask R-CNN has a Faster R-CNN's keys plus its mask branch (head convs named as in torchvision >= 0.13
# or before).
_MASK_KEYS = ("roi_heads.mask_head.0.0.weight", "roi_heads.mask_head.mask_fcn1.weight")
_DEPTHS = {6: 50, 23: 101}  # bottlenecks in layer3 -> ResNet depth
TORCHVISION_RATIOS = (0.5, 1.0, 2.0)  # h / w, both detectors' AnchorGenerator

# Both detectors (eps added by the layout entry: 1e-5, or 0 for the COCO_V1 weights).
COMMON_OPTIONS = {
    # GeneralizedRCNNTransform's defaults: shorter side 800, longer at most 1333, padded to multiples of 32.
    "test_resize.style": "torchvision",
    "test_resize.min_size": 800,
    "test_resize.max_size": 1333,
    "test_resize.size_divisor": 32,
    "activation": "relu",
    "conv_padding": "symmetric",
    "pool_padding": "symmetric",
    "backbone.norm": "frozen",
    "backbone.stride_in_1x1": False,
    "decoder.norm": "",
    "background_slot": True,
    "category_ids": (),
    "anchor.aspect_ratios": [2.0, 1.0, 0.5],  # w / h: torchvision's (0.5, 1, 2) h / w, same index
    "anchor.center_offset": 0.0,
    "anchor.round_base": True,
    "anchor.integer_stride": True,
}
FASTER_RCNN_OPTIONS = {
    "min_level": 2,
    "max_level": 6,
    "decoder.extra_levels": "maxpool",
    "anchor.num_scales": 1,
    "anchor.anchor_size": 8.0,
    "rpn.norm": "",
    "roi.min_level": 2,
    "roi.max_level": 5,
    "roi.output_size": 7,
    "roi.sampling_ratio": 2,
    "roi.aligned": False,
    "roi.canonical_size": 224.0,
    "roi.canonical_level": 4,
    "box_head.num_convs": 0,
    "box_head.num_fcs": 2,
    "box_head.norm": "",
    "box_head.class_agnostic_boxes": False,
    "box_coder_weights": (10.0, 10.0, 5.0, 5.0),
}
MASK_RCNN_OPTIONS = {
    "mask_head.num_convs": 4,
    "mask_head.norm": "",
    "mask_head.class_agnostic": False,
    "mask_head.roi_output_size": 14,
    "mask_head.sampling_ratio": 2,
}
RETINANET_OPTIONS = {
    "min_level": 3,
    "max_level": 7,
    "decoder.extra_levels": "p6p7",
    "decoder.extra_input": "output",  # LastLevelP6P7(256, 256): P6 from the P5 output
    "head.norm": "",
    "head.num_convs": 4,
    "head.conv_bias": True,
    "anchor.num_scales": 3,
    "anchor.anchor_size": 4.0,
    "anchor.truncate_sizes": True,
    # RetinaNet.postprocess_detections: per level the top 1000 (anchor, class) pairs above 0.05, decoded
    # (log-size clipped from above), clipped to the image, per-class NMS at 0.5, 300 detections.
    "detection.per_level_top_k": 1000,
    "detection.per_level_rank": "pair",
    "detection.score_threshold": 0.05,
    "detection.nms_iou_threshold": 0.5,
    "detection.max_detections": 300,
}


def detector_kind(keys) -> str:
    """'faster_rcnn' or 'retinanet' from the checkpoint's keys."""
    found = [kind for kind, key in _KIND_KEYS.items() if key in keys]
    if len(found) != 1:
        raise UserError(
            "not a torchvision Faster R-CNN, Mask R-CNN or RetinaNet checkpoint (expected "
            f"{' or '.join(_KIND_KEYS.values())})"
        )
    if found[0] == FASTER_RCNN and any(key in keys for key in _MASK_KEYS):
        return MASK_RCNN
    return found[0]


def _pick(keys, *candidates: str) -> str:
    """The first candidate the checkpoint has (current torchvision name first); else the first."""
    return next((key for key in candidates if key in keys), candidates[0])


def torchvision_source(state_keys, target_shapes: Mapping[str, Any]):
    """``source_key`` for our FasterRCNN / RetinaNet from torchvision's keys."""
    keys = set(state_keys)
    lateral = [int(n.split("_")[1]) for n in target_shapes["params"].get("decoder", {}) if n.startswith("lateral_")]
    min_level = min(lateral) if lateral else 0

    def fpn(block: str, level: int, leaf: str) -> str:
        i = level - min_level
        return _pick(keys, f"backbone.fpn.{block}.{i}.0.{leaf}", f"backbone.fpn.{block}.{i}.{leaf}")

    def source(path: Path) -> str | None:
        part, local, leaf = path[1], path[2:], leaf_name(path)
        if part == "backbone":
            if local[0] == "stem_conv":
                return f"backbone.body.conv1.{leaf}"
            if local[0] == "stem_norm":
                return f"backbone.body.bn1.{leaf}"
            m = re.fullmatch(r"stage(\d)_block(\d+)", local[0])
            if not m:
                return None
            stem = f"backbone.body.layer{int(m.group(1)) - 1}.{m.group(2)}"
            n = re.fullmatch(r"(conv|norm)(\d)", local[1])
            if n:
                return f"{stem}.{'conv' if n.group(1) == 'conv' else 'bn'}{n.group(2)}.{leaf}"
            if local[1] in ("shortcut_conv", "shortcut_norm"):
                return f"{stem}.downsample.{0 if local[1] == 'shortcut_conv' else 1}.{leaf}"
            return None
        if part == "decoder":
            kind, level = local[0].rsplit("_", 1)
            if kind in ("lateral", "output"):
                return fpn("inner_blocks" if kind == "lateral" else "layer_blocks", int(level), leaf)
            if kind == "extra":
                return f"backbone.fpn.extra_blocks.p{level}.{leaf}"
            return None
        if part == "rpn_head":
            if local[0] == "conv":
                return _pick(keys, f"rpn.head.conv.0.0.{leaf}", f"rpn.head.conv.{leaf}")
            module = {"objectness": "cls_logits", "box": "bbox_pred"}.get(local[0])
            return module and f"rpn.head.{module}.{leaf}"
        if part == "box_head":
            module = {
                "fc_0": "box_head.fc6",
                "fc_1": "box_head.fc7",
                "class_logits": "box_predictor.cls_score",
                "box_deltas": "box_predictor.bbox_pred",
            }.get(local[0])
            return module and f"roi_heads.{module}.{leaf}"
        if part == "mask_head":
            m = re.fullmatch(r"conv_(\d)", local[0])
            if m:
                i = int(m.group(1))
                return _pick(keys, f"roi_heads.mask_head.{i}.0.{leaf}", f"roi_heads.mask_head.mask_fcn{i + 1}.{leaf}")
            module = {"deconv": "conv5_mask", "mask_logits": "mask_fcn_logits"}.get(local[0])
            return module and f"roi_heads.mask_predictor.{module}.{leaf}"
        if part == "head":
            name = local[0]
            if name in ("class_predict", "box_predict"):
                return (
                    f"head.classification_head.cls_logits.{leaf}"
                    if name == "class_predict"
                    else f"head.regression_head.bbox_reg.{leaf}"
                )
            m = re.fullmatch(r"(class|box)_conv_(\d+)", name)
            if m:
                head = "classification_head" if m.group(1) == "class" else "regression_head"
                i = int(m.group(2))
                return _pick(keys, f"head.{head}.conv.{i}.0.{leaf}", f"head.{head}.conv.{2 * i}.{leaf}")
        return None

    return source


def torchvision_ignored(key: str) -> str | None:
    if key.endswith(BN_IGNORED_SUFFIX):
        return "batch-norm step counter (FrozenBatchNorm2d drops it too)"
    return None


def torchvision_options(state: Mapping[str, Any], config) -> dict[str, Any]:
    """The detector's options; classes, ResNet depth and anchors per location read from the state."""
    kind = detector_kind(state.keys())
    if config.model.name != kind:
        raise UserError(
            f"the checkpoint is a torchvision {_NAMES[kind]} but the "
            f"config builds model.name={config.model.name!r}; use --config={_CONFIGS[kind]}"
        )
    blocks = numbered(state.keys(), r"backbone\.body\.layer3\.(\d+)\.conv1\.weight$")
    if len(blocks) not in _DEPTHS:
        raise UserError(f"backbone.body.layer3 has {len(blocks)} bottlenecks: not a ResNet-50 or -101 body")
    options = {**COMMON_OPTIONS, "backbone.depth": _DEPTHS[len(blocks)]}
    if kind in (FASTER_RCNN, MASK_RCNN):
        classes = int(np.shape(state["roi_heads.box_predictor.cls_score.weight"])[0])
        anchors = int(np.shape(state["rpn.head.cls_logits.weight"])[0]) if "rpn.head.cls_logits.weight" in state else 3
        expected = len(TORCHVISION_RATIOS)
        options.update(FASTER_RCNN_OPTIONS)
        if kind == MASK_RCNN:
            options.update(MASK_RCNN_OPTIONS)
    else:
        bias = "head.classification_head.cls_logits.bias"
        box = "head.regression_head.bbox_reg.bias"
        anchors = int(np.shape(state[box])[0]) // 4 if box in state else 9
        expected = 3 * len(TORCHVISION_RATIOS)
        outputs = int(np.shape(state[bias])[0]) if bias in state else 0
        if outputs % anchors:
            raise UserError(f"{bias} has {outputs} outputs, not a multiple of {anchors} anchors per location")
        classes = outputs // anchors
        options.update(RETINANET_OPTIONS)
    if anchors != expected:
        raise UserError(
            f"the checkpoint predicts {anchors} anchors per location; torchvision's default AnchorGenerator "
            f"(the one this layout reproduces) has {expected}"
        )
    options["num_classes"] = classes
    return options


_BOX_FROM_TORCHVISION = np.asarray([1, 0, 3, 2])  # ours (dy, dx, dh, dw) <- torchvision (dx, dy, dw, dh)


def _regroup(array: np.ndarray, order: np.ndarray, per_anchor: int, swap_box: bool) -> np.ndarray:
    """Re-orders the last axis (anchor-major groups of ``per_anchor`` channels) into our order."""
    grouped = array.reshape(array.shape[:-1] + (len(order), per_anchor))[..., order, :]
    if swap_box:
        grouped = grouped[..., _BOX_FROM_TORCHVISION]
    return grouped.reshape(array.shape)


def torchvision_transform(config) -> Any:
    """Predictor channels into our anchor order and box coding; fc6 rows into (y, x, c) order."""
    m = config.model
    perm = anchor_permutation(m.anchor.num_scales, m.anchor.aspect_ratios, TORCHVISION_RATIOS)

    def transform(path: Path, array: np.ndarray) -> np.ndarray:
        if path[0] != "params":
            return array
        part, name = path[1], path[2]
        if part == "rpn_head" and name in ("objectness", "box"):
            return _regroup(array, perm, 1 if name == "objectness" else 4, name == "box")
        if part == "head" and name in ("class_predict", "box_predict"):
            return _regroup(array, perm, m.num_classes if name == "class_predict" else 4, name == "box_predict")
        if part == "mask_head" and name == "deconv" and path[-1] == "kernel":
            return array.transpose(0, 1, 3, 2)  # ConvTranspose2d weight [in, out, kh, kw] -> our [kh, kw, in, out]
        if part == "box_head" and name == "box_deltas":
            return _regroup(array, np.arange(array.shape[-1] // 4), 4, True)
        if part == "box_head" and name == "fc_0" and path[-1] == "kernel":
            size, channels = m.roi.output_size, m.decoder.num_filters
            grid = array.reshape(channels, size, size, array.shape[-1])  # torchvision flattens (c, y, x)
            return grid.transpose(1, 2, 0, 3).reshape(array.shape)
        return array

    return transform


# ---------------------------------------------------------------------------------------------
# Reference models for ``--reference`` (random init; the converter loads the checkpoint into them)
# ---------------------------------------------------------------------------------------------

REFERENCES = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn")


def torchvision_reference(name: str, config, size: int):
    """torchvision's ``name`` built as its COCO weights are (FrozenBatchNorm2d with the config's eps,
    3 trainable layers) with the config's classes and ResNet depth; nothing downloaded."""
    import functools

    import torchvision
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    if name not in REFERENCES:
        raise UserError(f"--reference for --from=torchvision must be one of {', '.join(REFERENCES)}, got {name!r}")
    m = config.model
    norm = functools.partial(FrozenBatchNorm2d, eps=m.backbone.bn_epsilon)
    body = getattr(torchvision.models, f"resnet{m.backbone.get('depth', 50)}")(weights=None, norm_layer=norm)
    if name == "fasterrcnn_resnet50_fpn":
        return FasterRCNN(_resnet_fpn_extractor(body, 3), num_classes=m.num_classes)
    if name == "maskrcnn_resnet50_fpn":
        return MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=m.num_classes)
    backbone = _resnet_fpn_extractor(body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes=m.num_classes)


def torch_in_our_order(
    objectness_or_class: Any, deltas: Any, per_anchor: int, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One level of a torchvision head (NCHW tensors) -> NHWC arrays in our channel order."""
    scores = objectness_or_class.detach().permute(0, 2, 3, 1).double().numpy()
    boxes = deltas.detach().permute(0, 2, 3, 1).double().numpy()
    return _regroup(scores, order, per_anchor, False), _regroup(boxes, order, 4, True)


def torchvision_compare(reference, model, variables, images: np.ndarray) -> dict[str, float]:
    """Max abs differences of the FPN features and the per-level head outputs (RPN for Faster
    R-CNN, class/box for RetinaNet) on ``images`` (already normalised, NHWC)."""
    import torch

    from scaledet_jax.models.faster_rcnn import FasterRCNN

    reference = reference.eval()
    with torch.no_grad():
        features = reference.backbone(torch.from_numpy(images).permute(0, 3, 1, 2))
    first = model.min_level if isinstance(model, FasterRCNN) else 3
    theirs = {first + i: f for i, f in enumerate(features.values())}
    worst: dict[str, float] = {}

    def record(kind: str, ours, other) -> None:
        worst[kind] = max(worst.get(kind, 0.0), float(np.max(np.abs(np.asarray(ours, np.float64) - other))))

    if isinstance(model, FasterRCNN):
        ours = model.apply(variables, images, method=FasterRCNN.features)
        objectness, deltas = model.apply(variables, ours, method=FasterRCNN.rpn)
        with torch.no_grad():
            logits, boxes = reference.rpn.head(list(theirs.values()))
        order = anchor_permutation(1, COMMON_OPTIONS["anchor.aspect_ratios"], TORCHVISION_RATIOS)
        for level, logit, box in zip(sorted(theirs), logits, boxes, strict=True):
            record("features", ours[level], theirs[level].permute(0, 2, 3, 1).double().numpy())
            score_ref, box_ref = torch_in_our_order(logit, box, 1, order)
            record("rpn_objectness", objectness[level], score_ref)
            record("rpn_deltas", deltas[level], box_ref)
        return worst

    def pyramid_and_head(m, x):
        features = m.decoder(m.backbone(x))
        return features, m.head(features)

    ours, (class_outputs, box_outputs) = model.apply(variables, images, method=pyramid_and_head)
    head = reference.head
    classes = head.classification_head.num_classes
    order = anchor_permutation(3, COMMON_OPTIONS["anchor.aspect_ratios"], TORCHVISION_RATIOS)
    for level, feature in theirs.items():
        with torch.no_grad():
            cls = head.classification_head.cls_logits(head.classification_head.conv(feature))
            box = head.regression_head.bbox_reg(head.regression_head.conv(feature))
        record("features", ours[level], feature.permute(0, 2, 3, 1).double().numpy())
        cls_ref, box_ref = torch_in_our_order(cls, box, classes, order)
        record("class", class_outputs[level], cls_ref)
        record("box", box_outputs[level], box_ref)
    return worst
