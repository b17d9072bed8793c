"""Faster R-CNN (Ren et al., 2015) with a feature pyramid: backbone (+ FPN) -> RPN -> proposals ->
multilevel RoIAlign -> box head, with static shapes throughout.

One module covers torchvision's ``FasterRCNN`` and TF Model Garden's ``MaskRCNNModel`` (box part):
their differences (anchors, FPN extra levels, RPN/box-head normalisation, RoIAlign sampling, counts)
are settings. In training the module also samples the RoIs the box head sees (ground truth added
to the RPN's proposals, as both sources do), with the 'sampling' RNG; the RPN's anchor targets and
all losses are computed outside, by ``scaledet_jax.tasks.faster_rcnn``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scaledet_jax.ops import anchors as anchor_ops
from scaledet_jax.ops import roi_align, two_stage

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AnchorSettings:
    num_scales: int = 1
    aspect_ratios: tuple[float, ...] = (2.0, 1.0, 0.5)  # w/h, our order (= torchvision's h/w 0.5, 1, 2)
    anchor_size: float = 8.0  # base size 8 * 2**level: 32 px at P2, as torchvision's ((32,), ..., (512,))
    center_offset: float = 0.0  # fraction of the stride (torchvision 0, Model Garden 0.5)
    round_base: bool = True  # torchvision rounds its base anchors to integers
    integer_stride: bool = True  # torchvision's stride is image_size // grid_size
    # mmdetection v1's AnchorGenerator ("+1" corners rounded around (stride - 1) / 2; ops.anchors.level_anchors)
    plus_one_rounding: bool = False

    @property
    def num_anchors(self) -> int:
        return self.num_scales * len(self.aspect_ratios)


@dataclasses.dataclass(frozen=True)
class ProposalSettings:
    pre_nms_top_k_train: int = 2000  # per level
    post_nms_top_k_train: int = 2000  # per image
    pre_nms_top_k: int = 1000
    post_nms_top_k: int = 1000
    nms_iou: float = 0.7
    min_size: float = 1e-3
    score_threshold: float = 0.0
    clip: str = "image"  # 'plus_one': mmdetection v1 (two_stage.generate_proposals)
    log_size_clip: str = "max"  # 'both': mmdetection v1's delta2bbox


@dataclasses.dataclass(frozen=True)
class RoISettings:
    min_level: int = 2  # RoIAlign reads these pyramid levels
    max_level: int = 5
    output_size: int = 7
    sampling_ratio: int = 2
    aligned: bool = False
    canonical_size: float = 224.0
    canonical_level: int = 4
    # or 'model_garden' (its crop_and_resize: level rule, 1 sample per bin, borders), 'mmdet', 'maskrcnn_benchmark',
    # 'jwyang_avg' (DetNet_pytorch's RoIAlignAvg: (P + 1)^2 grid + 2x2 average, spatial scale H_l / image_size)
    style: str = "torchvision"
    # Boxes here are mmdetection v1 "+1" boxes with exclusive corners (x2 = its inclusive x2 + 1): its RoIAlign
    # ('mmdet' style) reads the inclusive corners, so 1 is taken off y2, x2 first.
    plus_one: bool = False
    # RoI sampling in training
    num_samples: int = 512
    foreground_fraction: float = 0.25
    foreground_iou: float = 0.5
    background_iou_high: float = 0.5
    background_iou_low: float = 0.0
    box_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)


def rpn_anchors(
    image_size: int | tuple[int, int],
    min_level: int,
    max_level: int,
    a: AnchorSettings,
    strides: dict[int, int] | None = None,
) -> dict[int, np.ndarray]:
    """{level: [H_l, W_l, A * 4]} anchors of the RPN for ``image_size`` (S or (H, W)) inputs (``strides``:
    per-level feature strides, default 2**level)."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return {
        level: anchor_ops.level_anchors(
            level,
            a.num_scales,
            list(a.aspect_ratios),
            a.anchor_size,
            hw,
            center_offset=a.center_offset,
            round_base=a.round_base,
            integer_stride=a.integer_stride,
            plus_one_rounding=a.plus_one_rounding,
            stride=None if strides is None else strides[level],
        )
        for level in range(min_level, max_level + 1)
    }


class FasterRCNN(nn.Module):
    """images [B, S, S, 3] -> RPN outputs per level, the RoIs and the box head's outputs on them.

    ``__call__(images, train=False)`` (inference): RoIs are the RPN's ``post_nms_top_k`` proposals.
    ``__call__(images, gt, train=True)``: RoIs are ``num_samples`` sampled from proposals + ground
    truth (``gt``: boxes [B, M, 4], classes [B, M], valid [B, M], crowd [B, M]), returned with their
    targets. ``decoder`` is None when the backbone's endpoints feed the heads directly (SpineNet).
    """

    backbone: nn.Module
    rpn_head: nn.Module
    box_head: nn.Module
    decoder: nn.Module | None = None
    image_size: int = 1024
    min_level: int = 2  # RPN levels
    max_level: int = 6
    anchor: AnchorSettings = AnchorSettings()
    proposals: ProposalSettings = ProposalSettings()
    roi: RoISettings = RoISettings()
    # Feature stride of each level min_level..max_level; None: 2**level. DetNet: (4, 8, 16, 16, 16).
    feature_strides: tuple[int, ...] | None = None

    def level_strides(self) -> dict[int, int]:
        """{level: feature stride} of the RPN levels."""
        levels = range(self.min_level, self.max_level + 1)
        if self.feature_strides is None:
            return {level: 2**level for level in levels}
        if len(self.feature_strides) != len(levels):
            raise ValueError(
                f"model.feature_strides {tuple(self.feature_strides)} must give one stride per level "
                f"{self.min_level}..{self.max_level}"
            )
        return dict(zip(levels, self.feature_strides, strict=True))

    def anchors(self, input_hw: tuple[int, int] | None = None) -> dict[int, np.ndarray]:
        """{level: [H_l, W_l, A * 4]} RPN anchors for [H, W] = ``input_hw`` inputs (default: the square
        ``image_size``; a source's keep-ratio test-time resize gives other shapes)."""
        hw = input_hw or (self.image_size, self.image_size)
        return rpn_anchors(hw, self.min_level, self.max_level, self.anchor, self.level_strides())

    def features(self, images: Array, train: bool = False) -> dict[int, Array]:
        features = self.backbone(images, train=train)
        if self.decoder is not None:
            features = self.decoder(features, train=train)
        return features

    def rpn(self, features: dict[int, Array], train: bool = False):
        return self.rpn_head({k: features[k] for k in range(self.min_level, self.max_level + 1)}, train=train)

    def generate_proposals(
        self, objectness, deltas, train: bool, input_hw: tuple[int, int], image_sizes: Array | None = None
    ) -> tuple[Array, Array, Array]:
        """(proposals [B, K, 4], scores [B, K], valid [B, K]) for [H, W] = ``input_hw`` inputs, clipped to
        ``image_sizes`` [B, 2] (each image's unpadded height, width) or else the input; no gradient flows
        into them."""
        p = self.proposals
        return two_stage.generate_proposals(
            jax.tree_util.tree_map(jax.lax.stop_gradient, objectness),
            jax.tree_util.tree_map(jax.lax.stop_gradient, deltas),
            self.anchors(input_hw),
            input_hw if image_sizes is None else image_sizes,
            pre_nms_top_k=p.pre_nms_top_k_train if train else p.pre_nms_top_k,
            post_nms_top_k=p.post_nms_top_k_train if train else p.post_nms_top_k,
            nms_iou=p.nms_iou,
            min_size=p.min_size,
            score_threshold=p.score_threshold,
            clip=p.clip,
            log_size_clip=p.log_size_clip,
        )

    def pool(self, features: dict[int, Array], rois: Array, output_size: int, sampling_ratio: int) -> Array:
        """Multilevel RoIAlign of ``rois`` [B, R, 4] (input pixels) with the ``roi`` settings -> [B, R, P, P, C]."""
        r = self.roi
        strides = None
        if self.feature_strides is not None:
            strides = self.level_strides()
            missing = [level for level in range(r.min_level, r.max_level + 1) if level not in strides]
            if missing:
                raise ValueError(f"RoI levels {r.min_level}..{r.max_level} must be RPN levels; {missing} are not")
        levels = range(r.min_level, r.max_level + 1)
        scales = None
        if r.style == "jwyang_avg":  # the seed's spatial scale: map height / (padded) input height
            scales = {k: features[k].shape[1] / self.image_size for k in levels}
        if r.plus_one:
            rois = rois - jnp.asarray([0.0, 0.0, 1.0, 1.0], rois.dtype)
        return roi_align.multilevel_roi_align(
            {k: features[k] for k in levels},
            rois,
            output_size,
            sampling_ratio=sampling_ratio,
            aligned=r.aligned,
            canonical_size=r.canonical_size,
            canonical_level=r.canonical_level,
            style=r.style,
            strides=strides,
            spatial_scales=scales,
        )

    def roi_outputs(self, features: dict[int, Array], rois: Array, train: bool = False) -> tuple[Array, Array]:
        """Box-head class logits [B, R, C] and deltas [B, R, 4C] on ``rois`` [B, R, 4] (input pixels)."""
        return self.box_head(self.pool(features, rois, self.roi.output_size, self.roi.sampling_ratio), train=train)

    def sample_rois(self, proposals: Array, valid: Array, gt: dict[str, Array]) -> dict[str, Array]:
        r = self.roi
        rngs = jax.random.split(self.make_rng("sampling"), proposals.shape[0])

        def one(p, v, boxes, classes, gt_valid, crowd, rng):
            return two_stage.sample_rois(
                p, v, boxes, classes, gt_valid, crowd, rng,
                num_samples=r.num_samples, foreground_fraction=r.foreground_fraction,
                foreground_iou=r.foreground_iou, background_iou_high=r.background_iou_high,
                background_iou_low=r.background_iou_low, add_ground_truth=True, box_weights=r.box_weights,
            )  # fmt: skip

        return jax.vmap(one)(proposals, valid, gt["boxes"], gt["classes"], gt["valid"], gt["crowd"], rngs)

    def __call__(
        self,
        images: Array,
        gt: dict[str, Array] | None = None,
        train: bool = False,
        image_sizes: Array | None = None,
    ) -> dict[str, Any]:
        """``image_sizes`` [B, 2]: each image's unpadded (height, width) in input pixels, which proposals are
        clipped to (torchvision's ``ImageList.image_sizes``); default the whole input."""
        features = self.features(images, train=train)
        return self._box_outputs(features, gt, train, tuple(images.shape[1:3]), image_sizes)

    def _box_outputs(
        self,
        features: dict[int, Array],
        gt: dict[str, Array] | None,
        train: bool,
        input_hw: tuple[int, int],
        image_sizes: Array | None = None,
    ) -> dict[str, Any]:
        """RPN, proposals, (sampled) RoIs and the box head's outputs on them."""
        objectness, deltas = self.rpn(features, train=train)
        proposals, scores, valid = self.generate_proposals(objectness, deltas, train, input_hw, image_sizes)
        outputs = {"rpn_objectness": objectness, "rpn_deltas": deltas}
        if gt is not None:
            samples = self.sample_rois(proposals, valid, gt)
            rois, roi_valid = samples["rois"], samples["valid"]
            outputs["roi_targets"] = samples
        else:
            rois, roi_valid = proposals, valid
        class_logits, box_deltas = self.roi_outputs(features, jax.lax.stop_gradient(rois), train=train)
        outputs.update(
            rois=rois, roi_valid=roi_valid, class_logits=class_logits, box_deltas=box_deltas, proposal_scores=scores
        )
        return outputs
