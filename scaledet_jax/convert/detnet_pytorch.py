"""guoruoqian/DetNet_pytorch checkpoints: the DetNet-59 FPN Faster R-CNN (``--from=detnet-pytorch``) and the
ImageNet DetNet-59 (``--from=detnet-pytorch-imagenet``, backbone initialisation).

Detector (``fpn_{session}_{epoch}_{step}.pth`` as ``trainval_net.py`` saves it: ``{'session', 'epoch', 'model',
'optimizer', 'pooling_mode', 'class_agnostic'}``; the entries beside ``'model'`` are reported as ignored, and
``pooling_mode`` is not read: the layout is the seed's POOLING_MODE 'align', its ``cfgs/detnet59.yml``).
Keys -> our variables:

* ``RCNN_layer0.{0,1}`` (stem conv1 / bn1), ``RCNN_layer{1..5}.0.{b}.conv{1,2,3}`` / ``bn{1,2,3}``,
  ``downsample.{0,1}`` (stages 2-4) / ``extra_conv.{0,1}`` (stages 5-6) -> ``backbone`` (``detnet_source_key``).
* ``RCNN_toplayer``, ``RCNN_latlayer1..4``, ``RCNN_smooth1..2`` -> ``decoder/lateral_{6..2}``, ``output_{3,2}``.
* ``RCNN_rpn.RPN_Conv`` -> ``rpn_head/conv``; ``RCNN_rpn.RPN_cls_score`` (6 channels) -> ``rpn_head/objectness``
  folded to one logit per anchor, ``c_p - c_q`` for the channel pairs its proposal layer ranks
  (``SEED_RPN_INFERENCE_PAIRS``: sigmoid of the fold is the seed's ranked probability); ``RCNN_rpn.RPN_bbox_pred``
  -> ``rpn_head/box`` with (dx, dy, dw, dh) -> our (dy, dx, dh, dw). Anchors keep the seed's order (w/h ratios
  0.5, 1, 2 at each location), so no anchor permutation.
* ``RCNN_top.0`` (conv, kernel = stride = the RoI size: an FC over the (c, y, x)-flattened RoI feature) ->
  ``box_head/fc_0`` with its inputs re-ordered to our (y, x, c) flattening; ``RCNN_top.2`` (1x1 conv) -> ``fc_1``;
  ``RCNN_cls_score`` -> ``class_logits``; ``RCNN_bbox_pred`` -> ``box_deltas`` (class-specific, or class-agnostic
  when it has 4 outputs: ``--cag``), (dx, dy, dw, dh) -> (dy, dx, dh, dw).
* ``num_batches_tracked`` (absent from the seed's PyTorch 0.3 checkpoints, present in newer saves): ignored.

Classes come from ``RCNN_cls_score`` (21 for VOC: output 0 background, output c the c-th VOC class in the order
of ``SEED_VOC_CLASSES`` = ``voc_folder.VOC_CLASSES``, so VOC category ids need no table); the RoI size from
``RCNN_top.0``'s kernel (14, POOLING_SIZE); widths from the tensors. ``DETECTOR_OPTIONS`` are the seed's
semantics: DetNet-59 with frozen BN (eps 1e-5; stem and stage 2 frozen, FIXED_BLOCKS 1), its FPN (P6 = 1x1 of C6;
P5, P4 added at stride 16 without resizing; P3, P2 by align-corners bilinear upsampling + 3x3 smoothing of P3/P2
only), strides (4, 8, 16, 16, 16), RPN 3x3 conv of 512, anchors 32..512 px on P2..P6 centred at multiples of the
stride (not rounded), RoIAlignAvg 14 x 14 (``roi.style='jwyang_avg'``) on P2..P5, two 1024-d FC layers, box
coding stds (0.1, 0.1, 0.2, 0.2) = weights (10, 10, 5, 5), RGB/255 inputs normalised with ImageNet mean/std.

Not reproduced by these options (the seed's post-processing; issue 14 item 5): proposals ranked across all
levels together (pre-NMS 6000 / post-NMS 300 at test, 12000 / 2000 in training; ours rank per level), box
decoding and clipping with +1 widths (``bbox_transform_inv``, ``clip_boxes`` to W - 1), test NMS 0.3, the seed's
shorter-side-600 resizing (ours fits the longer side in the square input), and anchors when the input size is
not a multiple of 16 (the seed's centres stay at multiples of the stride).

ImageNet (``detnet59.pth``): ``conv1``, ``bn1``, ``layer{1..5}`` (``layer4/5.0.extra_conv``), ``fc`` -> our
``backbone`` (scope 'backbone'); ``fc`` (the 1000-class classifier) is ignored: the detector's backbone has none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from scaledet_jax.backbones.detnet import SEED_RPN_INFERENCE_PAIRS, detnet_fpn_source_key, detnet_source_key
from scaledet_jax.cli import UserError
from scaledet_jax.convert.torch_layout import BN_IGNORED_SUFFIX, Path

# lib/datasets/pascal_voc.py: output c >= 1 is this class (0 is '__background__').
SEED_VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
SEED_ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # cfg.ANCHOR_RATIOS, width / height, the seed's anchor order at a location
SEED_FEATURE_STRIDES = (4, 8, 16, 16, 16)  # FPN_FEAT_STRIDES for VOC and COCO (trainval_net.py)

BACKBONE_OPTIONS = {
    "activation": "relu",
    "conv_padding": "symmetric",
    "pool_padding": "symmetric",
    "backbone.norm": "frozen",
    "backbone.bn_epsilon": 1e-5,
}
DETECTOR_OPTIONS = {
    **BACKBONE_OPTIONS,
    "backbone.frozen_stages": 2,
    "min_level": 2,
    "max_level": 6,
    "feature_strides": SEED_FEATURE_STRIDES,
    "background_slot": True,
    "category_ids": (),
    "decoder.name": "fpn",
    "decoder.backbone_max_level": 6,
    "decoder.upsample": "bilinear_align_corners",
    "decoder.output_levels": (2, 3),
    "decoder.top_down_input": "output",
    "decoder.norm": "",
    "decoder.conv_bias": True,
    "anchor.num_scales": 1,
    "anchor.aspect_ratios": SEED_ANCHOR_RATIOS,
    "anchor.anchor_size": 8.0,  # FPN_ANCHOR_SCALES 32, 64, ..., 512 = 8 * 2**level on P2..P6
    "anchor.center_offset": 0.0,
    "anchor.round_base": False,
    "anchor.integer_stride": False,
    "rpn.num_convs": 1,
    "rpn.norm": "",
    "roi.min_level": 2,
    "roi.max_level": 5,
    "roi.style": "jwyang_avg",
    "roi.canonical_size": 224.0,
    "roi.canonical_level": 4,
    "box_head.num_convs": 0,
    "box_head.num_fcs": 2,
    "box_head.norm": "",
    "box_coder_weights": (10.0, 10.0, 5.0, 5.0),  # 1 / BBOX_NORMALIZE_STDS (0.1, 0.1, 0.2, 0.2)
}

_BOX_FROM_SEED = np.asarray([1, 0, 3, 2])  # ours (dy, dx, dh, dw) <- the seed's (dx, dy, dw, dh)
_RPN_SCORE = "RCNN_rpn.RPN_cls_score"
_TOP_FC, _TOP_FC2 = "RCNN_top.0.weight", "RCNN_top.2.weight"
_DETECTOR_KEY, _IMAGENET_KEY = "RCNN_layer0.0.weight", "conv1.weight"
_HEADS = {
    ("rpn_head", "conv"): "RCNN_rpn.RPN_Conv",
    ("rpn_head", "objectness"): _RPN_SCORE,
    ("rpn_head", "box"): "RCNN_rpn.RPN_bbox_pred",
    ("box_head", "fc_0"): "RCNN_top.0",
    ("box_head", "fc_1"): "RCNN_top.2",
    ("box_head", "class_logits"): "RCNN_cls_score",
    ("box_head", "box_deltas"): "RCNN_bbox_pred",
}
_LEAVES = {"kernel": "weight", "bias": "bias"}


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in np.shape(state[key]))


def _check_config(config, what: str) -> None:
    m = config.model
    if m.backbone.get("name") != "detnet" or (what == "detector" and m.name != "faster_rcnn"):
        raise UserError(
            f"the checkpoint is DetNet_pytorch's {what} but the config builds a {m.name} with a "
            f"{m.backbone.get('name')!r} backbone; use a DetNet-59 Faster R-CNN config "
            "(defaults.detnet_fasterrcnn_config(), e.g. configs/detnet59_fasterrcnn_voc07.py)"
        )


def _backbone_options(state: Mapping[str, Any], layer: str, stem: str) -> dict[str, Any]:
    """Blocks per stage and widths (stem, stage 2..6 bottleneck widths) read from the state; ``layer`` names
    the seed's stage modules (``'layer{}'`` or ``'RCNN_layer{}.0'``, formatted with 1..5)."""
    blocks, widths = [], []
    for index in range(1, 6):
        name = layer.format(index)
        pattern = re.compile(re.escape(name) + r"\.(\d+)\.conv1\.weight")
        found = [int(m.group(1)) for k in state if (m := pattern.fullmatch(k))]
        if not found:
            raise UserError(f"no {name}.*.conv1.weight in the checkpoint: not a DetNet_pytorch DetNet")
        blocks.append(max(found) + 1)
        widths.append(_shape(state, f"{name}.0.conv1.weight")[0])
    return {
        "backbone.stage_blocks": tuple(blocks),
        "backbone.stage_filters": tuple(widths),
        "backbone.stem_filters": _shape(state, stem)[0],
    }


def detector_options(state: Mapping[str, Any], config) -> dict[str, Any]:
    """``DETECTOR_OPTIONS`` plus the classes, RoI size, widths and box-head kind read from the checkpoint."""
    if _DETECTOR_KEY not in state and _IMAGENET_KEY in state:
        raise UserError(
            "the checkpoint is DetNet_pytorch's ImageNet DetNet-59 (conv1, layer1..5, fc), not its detector; "
            "convert it with --from=detnet-pytorch-imagenet"
        )
    required = (_DETECTOR_KEY, f"{_RPN_SCORE}.weight", "RCNN_rpn.RPN_Conv.weight", _TOP_FC, _TOP_FC2)
    required += ("RCNN_cls_score.weight", "RCNN_bbox_pred.weight", "RCNN_toplayer.weight")
    missing = [key for key in required if key not in state]
    if missing:
        raise UserError(f"not a DetNet_pytorch FPN detector checkpoint: no {', '.join(missing)}")
    _check_config(config, "detector")
    scores = _shape(state, f"{_RPN_SCORE}.weight")[0]
    if scores != 2 * len(SEED_ANCHOR_RATIOS):
        raise UserError(f"{_RPN_SCORE} has {scores} channels; the seed's RPN scores 3 anchors with 6")
    top = _shape(state, _TOP_FC)  # [fc_dims, channels, P, P], kernel = stride = POOLING_SIZE
    classes = _shape(state, "RCNN_cls_score.weight")[0]
    return {
        **DETECTOR_OPTIONS,
        **_backbone_options(state, "RCNN_layer{}.0", _DETECTOR_KEY),
        "num_classes": classes,
        "decoder.num_filters": _shape(state, "RCNN_toplayer.weight")[0],
        "rpn.num_filters": _shape(state, "RCNN_rpn.RPN_Conv.weight")[0],
        "roi.output_size": top[-1],
        "box_head.fc_dims": top[0],
        "box_head.class_agnostic_boxes": _shape(state, "RCNN_bbox_pred.weight")[0] == 4 and classes != 1,
    }


def imagenet_options(state: Mapping[str, Any], config) -> dict[str, Any]:
    """``BACKBONE_OPTIONS`` and the blocks / widths read from ``detnet59.pth``."""
    if _IMAGENET_KEY not in state and _DETECTOR_KEY in state:
        raise UserError(
            "the checkpoint is DetNet_pytorch's FPN detector (RCNN_layer0..5, RCNN_rpn, ...), not the ImageNet "
            "DetNet-59; convert it with --from=detnet-pytorch"
        )
    if _IMAGENET_KEY not in state:
        raise UserError("not a DetNet_pytorch ImageNet checkpoint: no conv1.weight")
    _check_config(config, "ImageNet DetNet-59")
    return {**BACKBONE_OPTIONS, **_backbone_options(state, "layer{}", _IMAGENET_KEY)}


def prepare(state: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors whose shape differs from ours, re-shaped before mapping (others unchanged; a tensor of an
    unexpected shape is left as it is, so the mapping reports it as mis-shaped):

    ``RCNN_rpn.RPN_cls_score.{weight,bias}`` [6, ...] -> [3, ...], row a = row p - row q for the pair (p, q)
    of ``SEED_RPN_INFERENCE_PAIRS``; ``RCNN_top.0.weight`` [F, C, P, P] -> [F, C * P * P] (an FC in (c, y, x)
    order); ``RCNN_top.2.weight`` [F, F, 1, 1] -> [F, F].
    """
    out = dict(state)
    for leaf in ("weight", "bias"):
        key = f"{_RPN_SCORE}.{leaf}"
        if key in out and np.shape(out[key])[0] == 2 * len(SEED_RPN_INFERENCE_PAIRS):
            array = np.asarray(out[key])
            out[key] = np.stack([array[p] - array[q] for p, q in SEED_RPN_INFERENCE_PAIRS])
    if _TOP_FC in out and np.ndim(out[_TOP_FC]) == 4:
        array = np.asarray(out[_TOP_FC])
        out[_TOP_FC] = array.reshape(array.shape[0], -1)
    if _TOP_FC2 in out and np.ndim(out[_TOP_FC2]) == 4 and np.shape(out[_TOP_FC2])[2:] == (1, 1):
        out[_TOP_FC2] = np.asarray(out[_TOP_FC2])[:, :, 0, 0]
    return out


def detector_source(state_keys, target_shapes: Mapping[str, Any]):
    """``source_key`` for our FasterRCNN (DetNet + FPN + RPN + box head) from the seed's detector keys."""

    def source(path: Path) -> str | None:
        part, local = path[1], (path[0], *path[2:])
        if part == "backbone":
            return detnet_source_key(local, "detector")
        if part == "decoder":
            return detnet_fpn_source_key(local)
        module = _HEADS.get((part, path[2])) if len(path) == 4 else None
        return module and _LEAVES.get(path[3]) and f"{module}.{_LEAVES[path[3]]}"

    return source


def imagenet_source(state_keys, target_shapes: Mapping[str, Any]):
    """``source_key`` for our DetNet backbone (scope 'backbone') from ``detnet59.pth``'s keys."""

    def source(path: Path) -> str | None:
        return detnet_source_key((path[0], *path[2:]), "imagenet") if path[1] == "backbone" else None

    return source


def ignored(key: str) -> str | None:
    if key.endswith(BN_IGNORED_SUFFIX):
        return "batch-norm step counter (the seed's BN is frozen)"
    return None


def imagenet_ignored(key: str) -> str | None:
    if key.startswith("fc."):
        return "ImageNet classifier (the detector's backbone has none)"
    return ignored(key)


def transform(config) -> Any:
    """RPN and box-head deltas into (dy, dx, dh, dw); fc_0's inputs from (c, y, x) to our (y, x, c) order."""

    def apply(path: Path, array: np.ndarray) -> np.ndarray:
        if path[0] != "params" or len(path) != 4:
            return array
        part, name, leaf = path[1:]
        if (part, name) in (("rpn_head", "box"), ("box_head", "box_deltas")):
            return array.reshape(array.shape[:-1] + (-1, 4))[..., _BOX_FROM_SEED].reshape(array.shape)
        if (part, name, leaf) == ("box_head", "fc_0", "kernel"):
            size = config.model.roi.output_size
            grid = array.reshape(-1, size, size, array.shape[-1])  # rows in the seed's (c, y, x) order
            return grid.transpose(1, 2, 0, 3).reshape(array.shape)
        return array

    return apply
