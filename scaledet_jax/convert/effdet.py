"""rwightman's effdet (``tf_efficientdet_*``, ``efficientdet_*``) and timm EfficientNet layouts.

effdet = timm EfficientNet features (``backbone.``) + ``fpn.`` (BiFPN) + ``class_net.`` /
``box_net.`` (HeadNet). timm's blocks are numbered per stage (``blocks.{stage}.{j}``); ours run over
the whole network (``blocks_{i}``), so the stage/index pairs found in the checkpoint are enumerated
in order. timm names the first stage's depthwise-separable block ``conv_dw, bn1, se, conv_pw, bn2``
and the inverted-residual blocks ``conv_pw, bn1, conv_dw, bn2, se, conv_pwl, bn3``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flax import traverse_util

from scaledet_jax.convert.torch_layout import BN_IGNORED_SUFFIX, Path, leaf_name, numbered

_DS_NAMES = {  # DepthwiseSeparableConv (expansion ratio 1)
    "depthwise_conv": "conv_dw",
    "depthwise_bn": "bn1",
    "project_conv": "conv_pw",
    "project_bn": "bn2",
}
_IR_NAMES = {  # InvertedResidual
    "expand_conv": "conv_pw",
    "expand_bn": "bn1",
    "depthwise_conv": "conv_dw",
    "depthwise_bn": "bn2",
    "project_conv": "conv_pwl",
    "project_bn": "bn3",
}
_SE_NAMES = {"se_reduce": "se.conv_reduce", "se_expand": "se.conv_expand"}


def timm_efficientnet_source(state_keys, target_shapes: Mapping[str, Any], prefix: str = "", scope: Path = ()):
    """``source_key`` for our EfficientNet (under ``scope`` in the variable tree) from timm keys."""
    stage_blocks = numbered(state_keys, re.escape(prefix) + r"blocks\.(\d+)\.(\d+)\.")
    flat = traverse_util.flatten_dict(dict(target_shapes))
    expanded = {p[len(scope) + 1] for p in flat if p[len(scope) + 1 :][1:2] == ("expand_conv",)}

    def source(path: Path) -> str | None:
        local = path[1 + len(scope) :]
        leaf = leaf_name(path)
        if local[0] == "stem_conv":
            return f"{prefix}conv_stem.{leaf}"
        if local[0] == "stem_bn":
            return f"{prefix}bn1.{leaf}"
        if local[0].startswith("blocks_"):
            index = int(local[0].split("_")[1])
            if index >= len(stage_blocks):
                return None
            stage, j = stage_blocks[index]
            names = _IR_NAMES if local[0] in expanded else _DS_NAMES
            module = _SE_NAMES.get(local[1]) or names.get(local[1])
            return module and f"{prefix}blocks.{stage}.{j}.{module}.{leaf}"
        return None

    return source


def timm_efficientnet_ignored(key: str, prefix: str = "") -> str | None:
    if key.endswith(BN_IGNORED_SUFFIX):
        return "batch-norm step counter"
    rest = key[len(prefix) :] if key.startswith(prefix) else key
    if rest.startswith(("conv_head.", "bn2.", "classifier.")):
        return "ImageNet classifier head (not part of the detection backbone)"
    return None


def effdet_source(state_keys, target_shapes: Mapping[str, Any]):
    """``source_key`` for our EfficientDet (RetinaNet with backbone/decoder/head) from effdet keys."""
    backbone = timm_efficientnet_source(state_keys, target_shapes, prefix="backbone.", scope=("backbone",))
    min_level = 3  # effdet's levels start at P3; fpn.resample.{i} makes level 3 + i, bn_rep.{r}.{i} is level 3 + i

    def source(path: Path) -> str | None:
        part, local, leaf = path[1], path[2:], leaf_name(path)
        if part == "backbone":
            return backbone(path)
        if part == "decoder":
            if local[0].startswith("resample_p"):  # resample_p6/{conv,bn}
                level = int(local[0][len("resample_p") :])
                return f"fpn.resample.{level - min_level}.conv.{local[1]}.{leaf}"
            cell, node = int(local[0].split("_")[1]), int(local[1].split("_")[1])
            stem = f"fpn.cell.{cell}.fnode.{node}"
            if local[2] == "weights":
                return f"{stem}.combine.edge_weights"
            if local[2].startswith("resample_"):
                return f"{stem}.combine.resample.{local[2].split('_')[1]}.conv.{local[3]}.{leaf}"
            if local[2] == "op_after_combine":
                return f"{stem}.after_combine.conv.{'conv_dw' if local[3] == 'depthwise' else 'conv_pw'}.{leaf}"
            if local[2] == "bn":
                return f"{stem}.after_combine.conv.bn.{leaf}"
            return None
        if part == "head":
            name = local[0]
            net = "class_net" if name.startswith("class_") else "box_net"
            if name.endswith("_predict"):
                return f"{net}.predict.{'conv_dw' if local[1] == 'depthwise' else 'conv_pw'}.{leaf}"
            m = re.fullmatch(r"(class|box)_conv_(\d+)", name)
            if m:
                return f"{net}.conv_rep.{m.group(2)}.{'conv_dw' if local[1] == 'depthwise' else 'conv_pw'}.{leaf}"
            m = re.fullmatch(r"(class|box)_bn_(\d+)_(\d+)", name)
            if m:
                level, repeat = int(m.group(2)), int(m.group(3))
                return f"{net}.bn_rep.{repeat}.{level - min_level}.bn.{leaf}"
        return None

    return source


# effdet's PyTorch-trained ``efficientdet_*`` models (vs the TF ports ``tf_efficientdet_*``): timm's
# PyTorch EfficientNet backbone (symmetric padding, BN eps 1e-5), symmetric BiFPN pools, and no
# "redundant" bias in the convs that a BN follows.
PYTORCH_NATIVE_OPTIONS = {
    "conv_padding": "symmetric",
    "pool_padding": "symmetric",
    "backbone.bn_epsilon": 1e-5,
    "decoder.conv_bias": False,
    "head.conv_bias": False,
}


# effdet's post-processing (``DetBenchPredict``: ``_post_process`` + ``generate_detections``, its default model
# config): anchors with aspect (x, y) factors (1, 1), (1.4, 0.7), (0.7, 1.4); the top 5000 (anchor, class) pairs;
# box deltas decoded without a log-size clip; no score threshold; per-class NMS at IoU 0.5; 100 detections. Its
# test-time resize: transforms_coco_eval's ResizePad (PIL bilinear, top left on the mean colour; data/test_resize).
EFFDET_POSTPROCESSING = {
    "test_resize.style": "effdet",
    "anchor.aspect_multipliers": ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)),
    "detection.pre_nms_top_k": 5000,
    "detection.log_size_clip": "none",
    "detection.score_threshold": 0.0,
    "detection.nms_iou_threshold": 0.5,
    "detection.max_detections": 100,
}


def effdet_options(state, config) -> dict[str, Any]:
    """``tf_efficientdet_*`` keep automl's semantics; ``efficientdet_*`` (no redundant biases, which
    is how their checkpoints differ) get PyTorch's. Both: effdet's post-processing (``EFFDET_POSTPROCESSING``)."""
    if "fpn.cell.0.fnode.0.after_combine.conv.conv_pw.bias" in state:
        return dict(EFFDET_POSTPROCESSING)
    return {**PYTORCH_NATIVE_OPTIONS, **EFFDET_POSTPROCESSING}


def effdet_ignored(key: str) -> str | None:
    if key.endswith(BN_IGNORED_SUFFIX):
        return "batch-norm step counter"
    if key.startswith("anchors."):
        return "anchor buffers (recomputed from the config)"
    return None
