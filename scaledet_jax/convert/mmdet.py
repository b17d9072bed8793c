"""mmdetection v1.1 checkpoints: the SpineNet RetinaNet and Mask R-CNN of yan-roo / lucifer443
SpineNet-Pytorch and the EfficientDet of lucifer443 EfficientDet-Pytorch.

SpineNet
--------

Keys (``backbone.`` then ``bbox_head.``): the stem ``conv1.{conv,bn}``, stem blocks
``init_block{1,2}.{r}``, the scale-permuted blocks ``scale_permuted_blocks.{i}.{r}`` (mmdet v1
ResNet blocks: ``conv{1,2,3}.weight``, ``bn{1,2,3}.*``, projection ``downsample.{0,1}``), the
cross-scale merges ``merge_ops.{i}.resample_ops.{k}.{squeeze,downsample,expand}_conv.{conv,bn}``,
the endpoints ``endpoint_convs.{level}``; the head's towers ``{cls,reg}_convs.{level}.{k}``
(the conv shared by all levels but stored once per level, the BN per level) and the predictors
``retina_{cls,reg}``.

Semantics (model options, set by the converter and stored with the converted checkpoint): ReLU,
symmetric conv and max-pool padding, endpoints without activation, one max pool per resample
(level 4 -> 7 is a single 5x5/4 pool), head tower convs without bias, sigmoid classes without a
background output (80 COCO classes: output ``c`` is the ``c``-th COCO category id).

Mask R-CNN (``neck=None``, so ``backbone.`` then ``rpn_head.{rpn_conv,rpn_cls,rpn_reg}``,
``bbox_head.{shared_convs.{i}.{conv,bn},shared_fcs.{i},fc_cls,fc_reg}`` and
``mask_head.{convs.{i}.{conv,bn},upsample,conv_logits}``): ``MASK_RCNN_OPTIONS`` plus the widths and
classes read from the checkpoint; 81 classes with background 0 (output ``c >= 1`` is the ``c``-th COCO
category id, ``category_ids``); mmdetection v1's RoI level rule and RoIAlign (``roi.style='mmdet'``).

The predictors are permuted into our channel order on conversion: mmdetection orders a location's
anchors ratio-major with ratio = h / w and encodes boxes as (dx, dy, dw, dh); Model Garden (and
this project) orders them scale-major with aspect = w / h and encodes (dy, dx, dh, dw).

EfficientDet
------------
Keys: the backbone in lukemelas' EfficientNet-PyTorch layout (``backbone._conv_stem``, ``_bn0``,
``_blocks.{i}._{expand,depthwise,project}_conv``, ``._bn{0,1,2}``, ``._se_{reduce,expand}``; the
blocks numbered over the whole network as ours), P6 from C5 in ``neck.extra_ops.0.conv``, the BiFPN
nodes ``neck.stack_bifpns.{cell}.top_down_merge.{n}`` (our nodes 0..L-2) and ``bottom_up_merge.{n}``
(our nodes L-1..), each with its fusion ``weight``, ``resample_ops.{input}.conv.{conv,bn}`` and the
separable ``conv.depthwise`` / ``conv.pointwise.{conv,bn}``; the head as SpineNet's but separable
(``{cls,reg}_convs.{level}.{k}.{depthwise,pointwise.conv,pointwise.bn}``, ``retina_{cls,reg}``).

Semantics: the network is automl's except that every down-sampling max pool (P6, P7, the BiFPN's
bottom-up edges) pads symmetrically (``pool_padding='symmetric'``; the backbone's static 'same'
padding equals TF 'SAME' at the multiple-of-128 sizes it runs at), and the BiFPN nodes list their
inputs in another order (the fusion weights and resample ops are re-ordered on conversion). Classes
and predictors as for SpineNet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scaledet_jax.cli import UserError
from scaledet_jax.convert.torch_layout import BN_IGNORED_SUFFIX, Path, leaf_name

# mmdetection's CocoDataset classes in order: contiguous label c + 1 is this COCO category id.
COCO_80_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip

# mmdetection v1's RetinaNet-style post-processing (AnchorGenerator, delta2bbox, AnchorHead.get_bboxes_single with
# the seeds' test_cfg: nms_pre 1000 per level, score_thr 0.05, per-class NMS at IoU 0.5, max_per_img 100) and its
# test-time resize (Resize keep_ratio to the config's (S, S) image scale with OpenCV, Normalize, Pad: data/test_resize).
MMDET_V1_POSTPROCESSING = {
    "test_resize.style": "mmdet",
    "anchor.plus_one_rounding": True,
    "detection.per_level_top_k": 1000,
    "detection.log_size_clip": "both",
    "detection.clip": "plus_one",
    "detection.score_threshold": 0.05,
    "detection.nms_iou_threshold": 0.5,
    "detection.max_detections": 100,
}

SPINENET_OPTIONS = {
    "activation": "relu",
    "conv_padding": "symmetric",
    "pool_padding": "symmetric",
    "backbone.endpoint_activation": False,
    "backbone.resample_pooling": "single",
    "head.conv_bias": False,
    "background_slot": False,
    "test_resize.size_divisor": 128,  # the seeds' test pipeline: Pad(size_divisor=128)
}

_CONV_BN = {"conv": "conv", "bn": "bn"}  # ConvModule children


def _block_key(local: Path, leaf: str) -> str | None:
    """Our residual/bottleneck block (``conv{n}/{conv,bn}``, ``shortcut/{conv,bn}``) -> mmdet v1 ResNet keys."""
    module, part = local[0], local[1]
    if module == "shortcut":
        return f"downsample.{0 if part == 'conv' else 1}.{leaf}"
    m = re.fullmatch(r"conv(\d)", module)
    if not m:
        return None
    return f"conv{m.group(1)}.{leaf}" if part == "conv" else f"bn{m.group(1)}.{leaf}"


def spinenet_source(state_keys, target_shapes: Mapping[str, Any], min_level: int = 3):
    """``source_key`` for our SpineNet RetinaNet from the mmdetection port's keys."""

    def source(path: Path) -> str | None:
        part, local, leaf = path[1], path[2:], leaf_name(path)
        if part == "backbone":
            name = local[0]
            if name == "stem":
                return f"backbone.conv1.{_CONV_BN[local[1]]}.{leaf}"
            m = re.fullmatch(r"stem_block_(\d+)", name)
            if m:
                repeat = int(local[1].split("_")[1])
                inner = _block_key(local[2:], leaf)
                return inner and f"backbone.init_block{int(m.group(1)) + 1}.{repeat}.{inner}"
            m = re.fullmatch(r"block_(\d+)", name)
            if m:
                repeat = int(local[1].split("_")[1])
                inner = _block_key(local[2:], leaf)
                return inner and f"backbone.scale_permuted_blocks.{m.group(1)}.{repeat}.{inner}"
            m = re.fullmatch(r"merge_(\d+)_resample_(\d+)", name)
            if m:
                return (
                    f"backbone.merge_ops.{m.group(1)}.resample_ops.{m.group(2)}."
                    f"{local[1]}_conv.{_CONV_BN[local[2]]}.{leaf}"
                )
            m = re.fullmatch(r"endpoint_(\d+)", name)
            if m:
                return f"backbone.endpoint_convs.{m.group(1)}.{_CONV_BN[local[1]]}.{leaf}"
            return None
        if part == "head":
            return _head_key(local, leaf, min_level, separable=False)
        if part in ("rpn_head", "box_head", "mask_head"):
            return _two_stage_key(part, local, leaf)
        return None

    return source


def _two_stage_key(part: str, local: Path, leaf: str) -> str | None:
    """Our Mask R-CNN heads -> mmdetection v1.1 ``RPNHead`` / ``ConvFCBBoxHead`` / ``FCNMaskHead`` keys."""
    name = local[0]
    if part == "rpn_head":
        module = {"conv": "rpn_conv", "objectness": "rpn_cls", "box": "rpn_reg"}.get(name)
        return module and f"rpn_head.{module}.{leaf}"
    m = re.fullmatch(r"conv(?:_norm)?_(\d+)", name)
    if m:  # ConvModule: conv (no bias) + bn
        head = "bbox_head.shared_convs" if part == "box_head" else "mask_head.convs"
        return f"{head}.{m.group(1)}.{'bn' if '_norm_' in name else 'conv'}.{leaf}"
    if part == "box_head":
        m = re.fullmatch(r"fc_(\d+)", name)
        if m:
            return f"bbox_head.shared_fcs.{m.group(1)}.{leaf}"
        module = {"class_logits": "fc_cls", "box_deltas": "fc_reg"}.get(name)
        return module and f"bbox_head.{module}.{leaf}"
    module = {"deconv": "upsample", "mask_logits": "conv_logits"}.get(name)
    return module and f"mask_head.{module}.{leaf}"


# The seed's Mask R-CNN (mmdetection v1.1 ``MaskRCNN``, neck None): RPN conv without norm; box head of
# ConvModule convs (no bias, BN) and plain FCs; mask head of ConvModule convs and a plain transposed
# conv; 81 classes with background 0; mmdetection v1's RoI levels (finest scale 56 px) and RoIAlign.
MASK_RCNN_OPTIONS = {
    "name": "mask_rcnn",
    "background_slot": True,
    "rpn.num_convs": 1,
    "rpn.norm": "",
    "roi.style": "mmdet",
    "roi.canonical_size": 56.0,
    "roi.output_size": 7,
    "roi.sampling_ratio": 2,
    "box_head.norm": "batch",
    "box_head.conv_bias": False,
    "box_head.fc_norm": False,
    "box_head.class_agnostic_boxes": False,
    "mask_head.norm": "batch",
    "mask_head.conv_bias": False,
    "mask_head.deconv_norm": False,
    "mask_head.class_agnostic": False,
    "mask_head.roi_output_size": 14,
    "mask_head.sampling_ratio": 2,
    # mmdetection v1's two-stage test path (the seed's test_cfg): "+1" anchors and boxes throughout; RPN top 1000
    # per level, NMS 0.7 per level, 1000 proposals, no size filter; boxes decoded with the log-size clip on both
    # sides and clipped to [0, size - 1]; per-class NMS 0.5 on the boxes divided by the scale factor, score > 0.05,
    # 100 detections; masks pasted as get_seg_masks does; its keep-ratio OpenCV test-time resize.
    "anchor.plus_one_rounding": True,
    "rpn.clip": "plus_one",
    "rpn.log_size_clip": "both",
    "rpn.min_size": 0.0,
    "rpn.pre_nms_top_k": 1000,
    "rpn.post_nms_top_k": 1000,
    "rpn.nms_iou": 0.7,
    "roi.plus_one": True,
    "detection.clip": "plus_one",
    "detection.log_size_clip": "both",
    "detection.min_size": 0.0,
    "detection.score_threshold": 0.05,
    "detection.nms_iou_threshold": 0.5,
    "detection.max_detections": 100,
    "detection.mask_paste": "mmdet",
    "test_resize.style": "mmdet",
}


def is_two_stage(keys) -> bool:
    return "rpn_head.rpn_conv.weight" in keys


def spinenet_options(state: Mapping[str, Any], config) -> dict[str, Any]:
    """RetinaNet: classes from the predictor (``retinanet_class_options``). Mask R-CNN (the checkpoint has
    ``rpn_head``): ``MASK_RCNN_OPTIONS`` with the widths, RoI levels and classes read from the state."""
    if not is_two_stage(state.keys()):
        return retinanet_class_options(state, config)
    if config.model.name != "mask_rcnn" or "mask_head.conv_logits.weight" not in state:
        raise UserError(
            "the checkpoint is an mmdetection two-stage SpineNet (rpn_head, bbox_head"
            f"{', mask_head' if 'mask_head.conv_logits.weight' in state else ''}); convert it with a Mask R-CNN "
            "config, e.g. --config=configs/maskrcnn_spinenet49s.py"
        )
    classes = int(np.shape(state["bbox_head.fc_cls.weight"])[0])
    convs = len([k for k in state if re.fullmatch(r"bbox_head\.shared_convs\.\d+\.conv\.weight", k)])
    fcs = len([k for k in state if re.fullmatch(r"bbox_head\.shared_fcs\.\d+\.weight", k)])
    mask_convs = len([k for k in state if re.fullmatch(r"mask_head\.convs\.\d+\.conv\.weight", k)])
    anchors = int(np.shape(state["rpn_head.rpn_cls.weight"])[0])
    a = config.model.anchor
    if anchors != a.num_scales * len(a.aspect_ratios):
        raise UserError(
            f"rpn_head.rpn_cls predicts {anchors} anchors per location, the config "
            f"{a.num_scales * len(a.aspect_ratios)}; set model.anchor to match the checkpoint"
        )
    return {
        **MASK_RCNN_OPTIONS,
        "num_classes": classes,
        "category_ids": COCO_80_CATEGORY_IDS if classes == 81 else (),
        "rpn.num_filters": int(np.shape(state["rpn_head.rpn_conv.weight"])[0]),
        "box_head.num_convs": convs,
        "box_head.conv_filters": int(np.shape(state["bbox_head.shared_convs.0.conv.weight"])[0]) if convs else 256,
        "box_head.num_fcs": fcs,
        "box_head.fc_dims": int(np.shape(state["bbox_head.shared_fcs.0.weight"])[0]) if fcs else 1024,
        "mask_head.num_convs": mask_convs,
        "mask_head.conv_filters": int(np.shape(state["mask_head.upsample.weight"])[1]),
    }


def _tower(kind: str) -> str:
    return "cls_convs" if kind == "class" else "reg_convs"


def _head_key(local: Path, leaf: str, min_level: int, separable: bool) -> str | None:
    """Our head variable (below ``head``) -> the RetinaSepBNHead / separable head key. Tower convs
    are shared across levels: level 0's copy is used, the others are checked equal (``head_duplicates``)."""
    name = local[0]
    if separable:  # {depthwise, pointwise} submodules; the BN sits in the pointwise ConvModule
        conv = {"depthwise": "depthwise", "pointwise": "pointwise.conv"}.get(local[1]) if len(local) > 2 else None
        bn = "pointwise.bn"
    else:
        conv, bn = "conv", "bn"
    if name in ("class_predict", "box_predict"):
        predictor = f"bbox_head.retina_{'cls' if name == 'class_predict' else 'reg'}"
        if not separable:
            return f"{predictor}.{leaf}"
        return conv and f"{predictor}.{conv}.{leaf}"
    m = re.fullmatch(r"(class|box)_conv_(\d+)", name)
    if m:
        return conv and f"bbox_head.{_tower(m.group(1))}.0.{m.group(2)}.{conv}.{leaf}"
    m = re.fullmatch(r"(class|box)_bn_(\d+)_(\d+)", name)
    if m:
        level, k = int(m.group(2)), int(m.group(3))
        return f"bbox_head.{_tower(m.group(1))}.{level - min_level}.{k}.{bn}.{leaf}"
    return None


def spinenet_ignored(key: str) -> str | None:
    if key.endswith(BN_IGNORED_SUFFIX):
        return "batch-norm step counter"
    return None


def head_duplicates(key: str) -> str | None:
    """``bbox_head.{cls,reg}_convs.{level}.{k}.<conv>`` for level > 0 is a copy of level 0's (conv, or
    the separable head's depthwise and pointwise conv; the BN is per level)."""
    m = re.fullmatch(r"(bbox_head\.(?:cls|reg)_convs\.)(\d+)(\.\d+\.(?:conv|depthwise|pointwise\.conv)\..+)", key)
    if m and m.group(2) != "0":
        return f"{m.group(1)}0{m.group(3)}"
    return None


MMDET_ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # h / w, both repositories' configs


def anchor_permutation(
    num_scales: int, aspect_ratios: Sequence[float], source_ratios: Sequence[float] = MMDET_ANCHOR_RATIOS
) -> np.ndarray:
    """perm[a] = mmdetection's index of our anchor ``a`` at one location.

    Ours: a = scale * R + r with aspect w/h = aspect_ratios[r]. mmdetection: ratio-major
    a' = r' * S + scale with h/w = source_ratios[r'].
    """
    perm = []
    for scale in range(num_scales):
        for ratio in aspect_ratios:
            inverse = [i for i, q in enumerate(source_ratios) if abs(q * ratio - 1.0) < 1e-6]
            if not inverse or len(aspect_ratios) != len(source_ratios):
                raise UserError(
                    f"the config's anchor aspect ratios {list(aspect_ratios)} (w/h) are not mmdetection's "
                    f"{list(source_ratios)} (h/w); set model.anchor.aspect_ratios to match the checkpoint"
                )
            perm.append(inverse[0] * num_scales + scale)
    return np.asarray(perm)


_BOX_FROM_MMDET = np.asarray([1, 0, 3, 2])  # ours (dy, dx, dh, dw) <- mmdet (dx, dy, dw, dh)


def predictor_transform(config) -> Any:
    """Permutes the predictors' output channels (last axis in Flax layout) into our anchor order."""
    a = config.model.anchor
    perm = anchor_permutation(a.num_scales, a.aspect_ratios)

    def transform(path: Path, array: np.ndarray) -> np.ndarray:
        if path[0] == "params" and path[1] in ("rpn_head", "box_head", "mask_head"):
            return _two_stage_transform(config, perm, path, array)
        if path[0] != "params" or path[1] != "head" or path[2] not in ("class_predict", "box_predict"):
            return array
        if "depthwise" in path:  # a separable predictor's depthwise channels are its inputs
            return array
        per_anchor = array.shape[-1] // len(perm)
        grouped = array.reshape(array.shape[:-1] + (len(perm), per_anchor))[..., perm, :]
        if path[2] == "box_predict":
            grouped = grouped[..., _BOX_FROM_MMDET]
        return grouped.reshape(array.shape)

    return transform


def _two_stage_transform(config, perm: np.ndarray, path: Path, array: np.ndarray) -> np.ndarray:
    """RPN predictors into our anchor order and box coding; the box head's class-specific deltas into
    (dy, dx, dh, dw); the first FC's inputs from mmdetection's (c, y, x) flattening to ours (y, x, c);
    the transposed conv's weight [in, out, kh, kw] (already [kh, kw, out, in]) to [kh, kw, in, out]."""
    part, name = path[1], path[2]
    if part == "rpn_head" and name in ("objectness", "box"):
        per_anchor = 1 if name == "objectness" else 4
        grouped = array.reshape(array.shape[:-1] + (len(perm), per_anchor))[..., perm, :]
        return (grouped[..., _BOX_FROM_MMDET] if name == "box" else grouped).reshape(array.shape)
    if part == "box_head" and name == "box_deltas":
        return array.reshape(array.shape[:-1] + (-1, 4))[..., _BOX_FROM_MMDET].reshape(array.shape)
    if part == "box_head" and name == "fc_0" and path[-1] == "kernel":
        size = config.model.roi.output_size
        channels = array.shape[0] // (size * size)
        return array.reshape(channels, size, size, -1).transpose(1, 2, 0, 3).reshape(array.shape)
    if part == "mask_head" and name == "deconv" and path[-1] == "kernel":
        return array.transpose(0, 1, 3, 2)
    return array


def retinanet_class_options(state: Mapping[str, Any], config) -> dict[str, Any]:
    """Foreground classes from the class predictor's bias; COCO ids when there are 80; mmdetection v1's
    post-processing (``MMDET_V1_POSTPROCESSING``)."""
    keys = [k for k in ("bbox_head.retina_cls.bias", "bbox_head.retina_cls.pointwise.conv.bias") if k in state]
    if not keys:
        raise UserError("no bbox_head.retina_cls bias in the checkpoint: not an mmdetection RetinaNet checkpoint")
    key = keys[0]
    a = config.model.anchor
    anchors = a.num_scales * len(a.aspect_ratios)
    outputs = int(np.shape(state[key])[0])
    if outputs % anchors:
        raise UserError(f"{key} has {outputs} outputs, not a multiple of the config's {anchors} anchors per location")
    classes = outputs // anchors
    return {
        **MMDET_V1_POSTPROCESSING,
        "num_classes": classes,
        "category_ids": COCO_80_CATEGORY_IDS if classes == 80 else (),
    }


# ---------------------------------------------------------------------------------------------
# EfficientDet (lucifer443 EfficientDet-Pytorch)
# ---------------------------------------------------------------------------------------------

# lucifer443's test pipeline pads to the square input: Pad(size=(img_size, img_size)).
EFFICIENTDET_OPTIONS = {"pool_padding": "symmetric", "background_slot": False, "test_resize.pad_square": True}

_LUKEMELAS_NAMES = {
    "expand_conv": "_expand_conv",
    "expand_bn": "_bn0",
    "depthwise_conv": "_depthwise_conv",
    "depthwise_bn": "_bn1",
    "se_reduce": "_se_reduce",
    "se_expand": "_se_expand",
    "project_conv": "_project_conv",
    "project_bn": "_bn2",
}


def bifpn_input_order(min_level: int, max_level: int) -> list[list[int]]:
    """For each of our BiFPN nodes, mmdetection's position of each of our inputs.

    Top-down nodes list (higher node, lateral) where automl lists (lateral, higher); bottom-up nodes
    with three inputs (top-down node, lateral, lower output) for automl's (lateral, top-down, lower);
    the top level's bottom-up node (lateral, lower output) is the same in both.
    """
    from scaledet_jax.necks.bifpn import bifpn_nodes

    nodes = bifpn_nodes(min_level, max_level)
    top_down = max_level - min_level
    return [[1, 0] if n < top_down else ([1, 0, 2] if len(ins) == 3 else [0, 1]) for n, (_, ins) in enumerate(nodes)]


def efficientdet_source(state_keys, target_shapes: Mapping[str, Any]):
    """``source_key`` for our EfficientDet from the mmdetection port's keys."""
    from scaledet_jax.necks.bifpn import bifpn_nodes

    head_bns = [re.fullmatch(r"class_bn_(\d+)_0", name) for name in target_shapes["batch_stats"]["head"]]
    levels = sorted(int(m.group(1)) for m in head_bns if m)
    min_level, max_level = levels[0], levels[-1]

    nodes = bifpn_nodes(min_level, max_level)
    order = bifpn_input_order(min_level, max_level)
    top_down = max_level - min_level

    def merge(cell: int, node: int) -> str:
        kind, n = ("top_down_merge", node) if node < top_down else ("bottom_up_merge", node - top_down)
        return f"neck.stack_bifpns.{cell}.{kind}.{n}"

    def source(path: Path) -> str | None:
        part, local, leaf = path[1], path[2:], leaf_name(path)
        if part == "backbone":
            if local[0] == "stem_conv":
                return f"backbone._conv_stem.{leaf}"
            if local[0] == "stem_bn":
                return f"backbone._bn0.{leaf}"
            m = re.fullmatch(r"blocks_(\d+)", local[0])
            module = m and _LUKEMELAS_NAMES.get(local[1])
            return module and f"backbone._blocks.{m.group(1)}.{module}.{leaf}"
        if part == "decoder":
            if local[0] == "resample_p6":
                return f"neck.extra_ops.0.conv.{_CONV_BN[local[1]]}.{leaf}"
            m, n = re.fullmatch(r"cell_(\d+)", local[0]), re.fullmatch(r"node_(\d+)", local[1])
            if not (m and n):
                return None
            cell, node = int(m.group(1)), int(n.group(1))
            stem = merge(cell, node)
            if local[2] == "weights":
                return f"{stem}.weight"
            if local[2].startswith("resample_"):  # ours: resample_{input node id}
                position = nodes[node][1].index(int(local[2].split("_")[1]))
                return f"{stem}.resample_ops.{order[node][position]}.conv.{_CONV_BN[local[3]]}.{leaf}"
            if local[2] == "op_after_combine":
                return f"{stem}.conv.{'depthwise' if local[3] == 'depthwise' else 'pointwise.conv'}.{leaf}"
            if local[2] == "bn":
                return f"{stem}.conv.pointwise.bn.{leaf}"
            return None
        if part == "head":
            return _head_key(local, leaf, min_level, separable=True)
        return None

    return source


def efficientdet_transform(config) -> Any:
    """Predictor channels as for SpineNet, and each BiFPN node's fusion weights into our input order."""
    predictors = predictor_transform(config)
    order = bifpn_input_order(config.model.min_level, config.model.max_level)

    def transform(path: Path, array: np.ndarray) -> np.ndarray:
        if path[0] == "params" and path[1] == "decoder" and path[-1] == "weights":
            node = int(path[-2].split("_")[1])
            return array[np.asarray(order[node])]
        return predictors(path, array)

    return transform
