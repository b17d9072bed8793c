"""maskrcnn-benchmark checkpoints (facebookresearch/maskrcnn-benchmark and its VoVNet fork
stigma0617/maskrcnn-benchmark-vovnet): Faster / Mask R-CNN with a ResNet-50/101-FPN (MSRA, stride in the 1x1)
or VoVNet-39/57-FPN body, and timm's VoVNet ImageNet classifiers as a backbone initialisation.

Containers: ``model.state_dict()``, ``{'model': ...}``, and the trainer's ``Checkpointer`` file ``{'model',
'optimizer', 'scheduler', 'iteration'}`` (the entries beside 'model' are ignored and listed); ``module.``
prefixes (DistributedDataParallel) are stripped (``checkpoint.unwrap``).

Keys (``--from=maskrcnn-benchmark``)
------------------------------------
Body ``backbone.body.``: VoVNet ``stem.stem_{n}/{conv,norm}``, ``stage{s}.OSA{s}_{b}.layers.{i}.OSA{s}_{b}_{i}/
{conv,norm}``, ``stage{s}.OSA{s}_{b}.concat.OSA{s}_{b}_concat/{conv,norm}`` (``vovnet.seed_key``); ResNet
``stem.conv1`` / ``stem.bn1`` (our ``stem_conv`` / ``stem_norm``), ``layer{s-1}.{b}.conv{1,2,3}`` / ``bn{1,2,3}``
and ``downsample.{0,1}`` (our ``stage{s}_block{b}/conv{n}``, ``norm{n}``, ``shortcut_conv``, ``shortcut_norm``).
FrozenBatchNorm2d buffers weight, bias, running_mean, running_var -> our FrozenBatchNorm's 'batch_stats'.
FPN ``backbone.fpn.fpn_inner{l-1}`` / ``fpn_layer{l-1}`` -> ``lateral_{l}`` / ``output_{l}`` (``vovnet.seed_fpn_key``);
P6 is a parameter-free max pool. RPN ``rpn.head.conv`` / ``cls_logits`` / ``bbox_pred`` -> ``rpn_head/conv``,
``objectness``, ``box``. Box head ``roi_heads.box.feature_extractor.fc6`` / ``fc7`` -> ``box_head/fc_0`` /
``fc_1``, ``roi_heads.box.predictor.cls_score`` / ``bbox_pred`` -> ``class_logits`` / ``box_deltas``. Mask head
``roi_heads.mask.feature_extractor.mask_fcn{i+1}`` -> ``mask_head/conv_{i}``, ``roi_heads.mask.predictor.conv5_mask``
(ConvTranspose2d) / ``mask_fcn_logits`` -> ``deconv`` / ``mask_logits``. ``rpn.anchor_generator.cell_anchors.{i}``
are buffers computed from the config: checked equal to Detectron's ``generate_anchors`` for the FPN defaults
(sizes 32..512 on strides 4..64, h/w ratios 0.5, 1, 2; anything else is refused) and not converted.

Semantics (model options, stored with the converted checkpoint)
---------------------------------------------------------------
BGR 0-255 input minus PIXEL_MEAN (102.9801, 115.9465, 122.7717), std 1; symmetric padding; FrozenBatchNorm
without epsilon (eps 0); ResNet: stride in the 1x1 (MSRA), max-pooled stem with symmetric padding; VoVNet: identity
on every OSA module after a stage's first, stage-entry pools 3x3/2 ceil mode without padding. FPN P2-P5 + max-pooled
P6 (nearest top-down), one RPN conv, 3 anchors of size 32 * 2**(level - 2) per location (the same order as
torchvision's: h/w 0.5, 1, 2), RoIAlign 7x7 / 14x14 with 2x2 samples, not aligned, on P2-P5 with Detectron's level
rule (``roi.style='maskrcnn_benchmark'``: +1 box areas), two 1024-d FCs, class-specific boxes with weights
(10, 10, 5, 5), four 256-filter mask convs; 81 classes (background 0 + COCO's 80 contiguous: ``category_ids``).
The predictors are re-ordered as torchvision's (``torchvision.torchvision_transform``): box codes (dx, dy, dw, dh)
-> our (dy, dx, dh, dw), fc6 inputs (channel, y, x) -> (y, x, channel), the transposed conv's weight.

Not reproduced yet (raw network outputs are the source's; decoded boxes and detections are not): Detectron's "+1"
box widths in anchors, box encoding/decoding (x2 = ctr + w / 2 - 1), clipping to W - 1, NMS IoU and
``remove_small_boxes``; its cell anchors (widths rounded at the stride, then scaled: e.g. 48x24 at P2 where ours
are 45.25x22.63) are approximated (the order per location, the centres and the square anchors are equal:
``anchor.center_offset=0.5`` is Detectron's (stride - 1) / 2 with +1 widths; co-centred IoU >= 0.889). Training:
``FPN_POST_NMS_TOP_N_TRAIN`` counts per (GPU) batch, RPN anchors crossing the border are not sampled
(``STRADDLE_THRESH=0``), biases train at twice the learning rate. The Masker pastes with +1 and 1-pixel padding.

timm VoVNet (``--from=timm-vovnet``, backbone only)
----------------------------------------------------
timm ``vovnet39a`` / ``vovnet57a``: ``stem.{n-1}.{conv,bn}``, ``stages.{s-2}.blocks.{b-1}.conv_mid.{i}`` /
``conv_concat`` (``vovnet.timm_key``); the classifier ``head.*`` is ignored. Semantics: trainable BatchNorm eps
1e-5, no identity in the OSA modules, ImageNet RGB input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from scaledet_jax.backbones import vovnet
from scaledet_jax.cli import UserError
from scaledet_jax.convert import torchvision as torchvision_layout
from scaledet_jax.convert.mmdet import COCO_80_CATEGORY_IDS
from scaledet_jax.convert.torch_layout import BN_IGNORED_SUFFIX, Path, leaf_name, numbered

FASTER_RCNN, MASK_RCNN = "faster_rcnn", "mask_rcnn"
_BOX_KEY = "roi_heads.box.predictor.cls_score.weight"
_MASK_KEY = "roi_heads.mask.predictor.mask_fcn_logits.weight"
_FPN_KEY = "backbone.fpn.fpn_inner1.weight"
_VOVNET_KEY = "backbone.body.stem.stem_1/conv.weight"
_RESNET_KEY = "backbone.body.stem.conv1.weight"
_RESNET_DEPTHS = {6: 50, 23: 101}  # bottlenecks in layer3 -> depth
_VOVNET_DEPTHS = {(2, 2): 39, (4, 3): 57}  # OSA modules in stages 4 and 5 -> depth
_CELL_ANCHORS = re.compile(r"rpn\.anchor_generator\.cell_anchors\.(\d+)$")

# maskrcnn-benchmark's INPUT defaults: BGR pixels 0-255 minus the Caffe2 ImageNet mean, no scaling.
PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)
BGR_INPUT = {"input.mean": PIXEL_MEAN_BGR, "input.std": (1.0, 1.0, 1.0), "input.channels": "bgr"}
# MODEL.RPN defaults of every FPN config: one size per level, h/w ratios as torchvision's (same per-location order).
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ANCHOR_STRIDES = (4, 8, 16, 32, 64)
ANCHOR_RATIOS = torchvision_layout.TORCHVISION_RATIOS  # h / w (0.5, 1, 2)

# Both bodies: the torchvision Faster R-CNN head layout (FPN P2-P6, RoIAlign 7x7 sampling 2 not aligned, 2 FCs,
# weights (10, 10, 5, 5)) with Detectron's level rule, eps-free FrozenBatchNorm and BGR input.
COMMON_OPTIONS = {
    **torchvision_layout.FASTER_RCNN_OPTIONS,
    **BGR_INPUT,
    "activation": "relu",
    "conv_padding": "symmetric",
    "pool_padding": "symmetric",
    "backbone.norm": "frozen",
    "backbone.bn_epsilon": 0.0,
    "decoder.name": "fpn",
    "decoder.num_filters": 256,
    "decoder.norm": "",
    "background_slot": True,
    "anchor.aspect_ratios": [2.0, 1.0, 0.5],  # w / h: h / w (0.5, 1, 2), same index
    "anchor.center_offset": 0.5,  # Detectron's (stride - 1) / 2 centre with +1 widths: stride / 2
    "anchor.round_base": False,  # Detectron rounds at the stride, then scales: unrounded sizes are the closer
    "anchor.integer_stride": True,
    "rpn.num_convs": 1,
    "rpn.num_filters": 256,
    "roi.style": "maskrcnn_benchmark",
    "box_head.fc_dims": 1024,
}
RESNET_OPTIONS = {"backbone.name": "resnet", "backbone.stride_in_1x1": True}
VOVNET_OPTIONS = {
    "backbone.name": "vovnet",
    "backbone.residual": True,
    "backbone.pool_padding": "valid",
    "backbone.pool_ceil_mode": True,
}
MASK_RCNN_OPTIONS = {**torchvision_layout.MASK_RCNN_OPTIONS, "mask_head.conv_filters": 256}
TIMM_VOVNET_OPTIONS = {
    "conv_padding": "symmetric",
    "backbone.name": "vovnet",
    "backbone.norm": "batch",
    "backbone.bn_epsilon": 1e-5,
    "backbone.residual": False,
    "backbone.pool_padding": "valid",
    "backbone.pool_ceil_mode": True,
}


def detectron_cell_anchors(stride: int, sizes: tuple[float, ...], ratios: tuple[float, ...]) -> np.ndarray:
    """Detectron's ``generate_anchors``: [len(ratios) * len(sizes), 4] (x1, y1, x2, y2) inclusive-pixel boxes
    around ``(stride - 1) / 2``, ratio-major (ratio = h / w): widths rounded at the stride, then scaled."""
    centre = (stride - 1) / 2.0
    area = float(stride * stride)
    boxes = []
    for ratio in ratios:
        width = np.round(np.sqrt(area / ratio))
        height = np.round(width * ratio)
        for size in sizes:
            w, h = width * size / stride, height * size / stride
            boxes.append([centre - (w - 1) / 2, centre - (h - 1) / 2, centre + (w - 1) / 2, centre + (h - 1) / 2])
    return np.asarray(boxes, np.float64)


def detector_kind(keys) -> str:
    """'faster_rcnn' or 'mask_rcnn' from a maskrcnn-benchmark FPN checkpoint's keys."""
    if _BOX_KEY not in keys:
        raise UserError(f"not a maskrcnn-benchmark Faster / Mask R-CNN checkpoint (no {_BOX_KEY})")
    if _FPN_KEY not in keys:
        raise UserError(f"not a maskrcnn-benchmark FPN detector (no {_FPN_KEY}; C4 and RetinaNet models do not fit)")
    return MASK_RCNN if _MASK_KEY in keys else FASTER_RCNN


def body_options(keys) -> dict[str, Any]:
    """The body's name and depth (and its semantics) read from the keys."""
    if _VOVNET_KEY in keys:
        blocks = tuple(
            len(numbered(keys, rf"backbone\.body\.stage{s}\.OSA{s}_(\d+)\.concat\.OSA{s}_\d+_concat/conv\.weight$"))
            for s in (4, 5)
        )
        if blocks not in _VOVNET_DEPTHS:
            raise UserError(f"backbone.body has {blocks} OSA modules in stages 4 and 5: not a VoVNet-39 or -57 body")
        return {**VOVNET_OPTIONS, "backbone.depth": _VOVNET_DEPTHS[blocks]}
    if _RESNET_KEY in keys:
        blocks = numbered(keys, r"backbone\.body\.layer3\.(\d+)\.conv1\.weight$")
        if len(blocks) not in _RESNET_DEPTHS:
            raise UserError(f"backbone.body.layer3 has {len(blocks)} bottlenecks: not a ResNet-50 or -101 body")
        return {**RESNET_OPTIONS, "backbone.depth": _RESNET_DEPTHS[len(blocks)]}
    raise UserError(f"unknown maskrcnn-benchmark body (expected {_VOVNET_KEY} for VoVNet or {_RESNET_KEY} for ResNet)")


def check_cell_anchors(state: Mapping[str, Any]) -> None:
    """``UserError`` unless the checkpoint's saved cell anchors (if any) are the FPN defaults this layout sets."""
    found = {int(m.group(1)): key for key in state if (m := _CELL_ANCHORS.match(key))}
    if not found:
        return
    if sorted(found) != list(range(len(ANCHOR_STRIDES))):
        raise UserError(
            f"the checkpoint has cell anchors for {len(found)} levels; maskrcnn-benchmark's FPN has "
            f"{len(ANCHOR_STRIDES)} (strides {ANCHOR_STRIDES})"
        )
    for i, (stride, size) in enumerate(zip(ANCHOR_STRIDES, ANCHOR_SIZES, strict=True)):
        expected = detectron_cell_anchors(stride, (size,), ANCHOR_RATIOS).astype(np.float32)
        saved = np.asarray(state[found[i]])
        if saved.shape != expected.shape or not np.array_equal(saved.astype(np.float32), expected):
            raise UserError(
                f"{found[i]} is not maskrcnn-benchmark's default anchor (size {size} at stride {stride}, h/w ratios "
                f"{ANCHOR_RATIOS}): the checkpoint was trained with other MODEL.RPN anchors, which this layout "
                "does not set"
            )


def options(state: Mapping[str, Any], config) -> dict[str, Any]:
    """Every model option of the checkpoint: body, detector kind, classes (81 = COCO with ids), anchors checked."""
    keys = set(state.keys())
    kind = detector_kind(keys)
    if config.model.name != kind:
        name = "Mask R-CNN" if kind == MASK_RCNN else "Faster R-CNN"
        raise UserError(
            f"the checkpoint is a maskrcnn-benchmark {name} but the config builds model.name={config.model.name!r}; "
            f"use a {name} config (model.name={kind!r})"
        )
    result = {**COMMON_OPTIONS, **body_options(keys)}
    anchors = int(np.shape(state["rpn.head.cls_logits.weight"])[0]) if "rpn.head.cls_logits.weight" in state else 3
    if anchors != len(ANCHOR_RATIOS):
        raise UserError(
            f"rpn.head.cls_logits predicts {anchors} anchors per location; maskrcnn-benchmark's FPN default "
            f"(the one this layout reproduces) has {len(ANCHOR_RATIOS)}"
        )
    check_cell_anchors(state)
    if kind == MASK_RCNN:
        result.update(MASK_RCNN_OPTIONS)
    classes = int(np.shape(state[_BOX_KEY])[0])
    result["num_classes"] = classes
    result["category_ids"] = COCO_80_CATEGORY_IDS if classes == 81 else ()
    return result


def _resnet_key(local: Path, leaf: str) -> str | None:
    if local[0] in ("stem_conv", "stem_norm"):
        return f"backbone.body.stem.{'conv1' if local[0] == 'stem_conv' else 'bn1'}.{leaf}"
    m = re.fullmatch(r"stage(\d)_block(\d+)", local[0])
    if not m or len(local) < 2:
        return None
    stem = f"backbone.body.layer{int(m.group(1)) - 1}.{m.group(2)}"
    n = re.fullmatch(r"(conv|norm)(\d)", local[1])
    if n:
        return f"{stem}.{'conv' if n.group(1) == 'conv' else 'bn'}{n.group(2)}.{leaf}"
    if local[1] in ("shortcut_conv", "shortcut_norm"):
        return f"{stem}.downsample.{0 if local[1] == 'shortcut_conv' else 1}.{leaf}"
    return None


_HEAD_MODULES = {
    ("rpn_head", "conv"): "rpn.head.conv",
    ("rpn_head", "objectness"): "rpn.head.cls_logits",
    ("rpn_head", "box"): "rpn.head.bbox_pred",
    ("box_head", "fc_0"): "roi_heads.box.feature_extractor.fc6",
    ("box_head", "fc_1"): "roi_heads.box.feature_extractor.fc7",
    ("box_head", "class_logits"): "roi_heads.box.predictor.cls_score",
    ("box_head", "box_deltas"): "roi_heads.box.predictor.bbox_pred",
    ("mask_head", "deconv"): "roi_heads.mask.predictor.conv5_mask",
    ("mask_head", "mask_logits"): "roi_heads.mask.predictor.mask_fcn_logits",
}


def source(state_keys, target_shapes: Mapping[str, Any]):
    """``source_key`` for our Faster / Mask R-CNN (ResNet or VoVNet body) from maskrcnn-benchmark's keys."""
    is_vovnet = _VOVNET_KEY in set(state_keys)

    def key(path: Path) -> str | None:
        part, local = path[1], path[2:]
        if part == "backbone":
            if is_vovnet:
                try:
                    return vovnet.seed_key((path[0], *local), prefix="backbone.body.")
                except (KeyError, AttributeError):
                    return None
            return _resnet_key(local, leaf_name(path))
        if part == "decoder":
            try:
                return vovnet.seed_fpn_key(path, prefix="backbone.fpn.")
            except KeyError:
                return None
        if part == "mask_head":
            m = re.fullmatch(r"conv_(\d+)", local[0])
            if m:
                return f"roi_heads.mask.feature_extractor.mask_fcn{int(m.group(1)) + 1}.{leaf_name(path)}"
        module = _HEAD_MODULES.get((part, local[0]))
        return module and f"{module}.{leaf_name(path)}"

    return key


def ignored(key: str) -> str | None:
    if _CELL_ANCHORS.match(key):
        return (
            "RPN cell anchors (a buffer derived from the config; checked equal to Detectron's generate_anchors for "
            "the FPN defaults, which our anchors approximate)"
        )
    if key.endswith(BN_IGNORED_SUFFIX):
        return "batch-norm step counter (FrozenBatchNorm2d has none)"
    return None


def transform(config) -> Any:
    """torchvision's re-ordering: maskrcnn-benchmark (its ancestor) lays the predictors out the same way."""
    return torchvision_layout.torchvision_transform(config)


# ---------------------------------------------------------------------------------------------
# timm VoVNet (ImageNet) as the backbone initialisation
# ---------------------------------------------------------------------------------------------

_TIMM_VOVNET_DEPTHS = {(2, 2): 39, (4, 3): 57}


def timm_vovnet_options(state: Mapping[str, Any], config) -> dict[str, Any]:
    """timm's VoVNet semantics and the depth read from the blocks of stages 4 and 5."""
    keys = set(state.keys())
    blocks = tuple(len(numbered(keys, rf"stages\.{s - 2}\.blocks\.(\d+)\.conv_concat\.conv\.weight$")) for s in (4, 5))
    if blocks not in _TIMM_VOVNET_DEPTHS:
        raise UserError(
            f"the checkpoint has {blocks} OSA blocks in stages 4 and 5: not a timm vovnet39a / vovnet57a state_dict"
        )
    return {**TIMM_VOVNET_OPTIONS, "backbone.depth": _TIMM_VOVNET_DEPTHS[blocks]}


def timm_vovnet_source(state_keys, target_shapes: Mapping[str, Any]):
    """``source_key`` for our ``backbone`` (a VoVNet) from timm's keys."""

    def key(path: Path) -> str | None:
        if path[1] != "backbone":
            return None
        try:
            return vovnet.timm_key((path[0], *path[2:]))
        except (KeyError, AttributeError):
            return None

    return key


def timm_vovnet_ignored(key: str) -> str | None:
    if key.startswith("head."):
        return "ImageNet classifier (no counterpart in the detector)"
    if key.endswith(BN_IGNORED_SUFFIX):
        return "batch-norm step counter"
    return None


TIMM_VOVNETS = ("vovnet39a", "vovnet57a")


def timm_vovnet_reference(name: str, config, size: int):
    """timm's ``name`` (the whole classifier: ``features_only`` would rename its modules, so the checkpoint would
    not load into it), random init, nothing downloaded; its depth must be the checkpoint's."""
    import timm

    depth = config.model.backbone.get("depth")
    if name != f"vovnet{depth}a":
        raise UserError(f"--reference for this VoVNet-{depth} checkpoint must be vovnet{depth}a, got {name!r}")
    return timm.create_model(name, pretrained=False)


def timm_vovnet_compare(reference, model, variables, images: np.ndarray) -> dict[str, float]:
    """Max abs difference of C2-C5 (timm's ``forward_intermediates`` of stages 1-4) on ``images`` (NHWC)."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        theirs = reference.eval().forward_intermediates(x, [1, 2, 3, 4], intermediates_only=True)
    ours = model.apply(variables, images, train=False, method=lambda m, x, train: m.backbone(x, train))
    worst = max(
        float(np.max(np.abs(np.asarray(ours[level]) - feature.permute(0, 2, 3, 1).numpy())))
        for level, feature in enumerate(theirs, 2)
    )
    return {"features": worst}
