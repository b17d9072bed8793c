"""RetinaNet-style one-stage detectors (SpineNet RetinaNet, EfficientDet): anchors, focal/Huber losses, decoding."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scaledet_jax.models import build_model
from scaledet_jax.ops import anchors as anchor_ops
from scaledet_jax.ops import detection, losses, matching
from scaledet_jax.tasks import init_with_images, register_task

Array = jax.Array


def _input_hw(config: ml_collections.ConfigDict, input_hw: tuple[int, int] | None) -> tuple[int, int]:
    return tuple(input_hw) if input_hw else (config.model.image_size, config.model.image_size)


def model_anchors(config: ml_collections.ConfigDict, input_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The model's anchors for [H, W] = ``input_hw`` inputs (default the square ``image_size``), flattened in
    head-output order: [N, 4]. ``model.anchor.{center_offset, round_base, integer_stride, truncate_sizes}``
    (absent: Model Garden's layout) select torchvision's layout, ``plus_one_rounding`` mmdetection v1's (see
    ``ops.anchors.level_anchors``)."""
    m = config.model
    a = m.anchor
    per_level = anchor_ops.multilevel_anchors(
        m.min_level,
        m.max_level,
        a.num_scales,
        list(a.aspect_ratios),
        a.anchor_size,
        _input_hw(config, input_hw),
        center_offset=a.get("center_offset", 0.5),
        round_base=a.get("round_base", False),
        integer_stride=a.get("integer_stride", False),
        truncate_sizes=a.get("truncate_sizes", False),
        plus_one_rounding=a.get("plus_one_rounding", False),
        aspect_multipliers=tuple(a.get("aspect_multipliers", ())),
    )
    return anchor_ops.flatten_levels(per_level)


def level_anchor_counts(config: ml_collections.ConfigDict, input_hw: tuple[int, int] | None = None) -> tuple[int, ...]:
    """Anchors per level, in head-output order (``ops.detection``'s ``level_sizes``)."""
    m = config.model
    height, width = _input_hw(config, input_hw)
    per_location = anchor_ops.num_anchors_per_location(m.anchor.num_scales, m.anchor.aspect_ratios)
    return tuple(
        math.ceil(height / 2**level) * math.ceil(width / 2**level) * per_location
        for level in range(m.min_level, m.max_level + 1)
    )


def category_index_table(category_ids) -> jax.Array:
    """table[id] = the output index of category ``id``; -1 for ids without an output."""
    table = np.full(max(category_ids) + 1, -1, np.int32)
    for index, category in enumerate(category_ids):
        table[category] = index
    return jnp.asarray(table)


@register_task("retinanet", "efficientdet")
class RetinaNetTask:
    """Dense one-stage detection: every anchor is labelled against the ground truth (Model Garden's
    ``AnchorLabeler``) and scored with the focal loss; boxes by the Huber loss."""

    batch_fields = ("image", "boxes", "classes", "valid", "crowd")
    log_losses = ("cls_loss", "box_loss")

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model = build_model(config.model)
        self.anchors = jnp.asarray(model_anchors(config))
        self.level_sizes = level_anchor_counts(config)

    def init(self, rngs: dict[str, Array], image_size: int) -> dict[str, Any]:
        return init_with_images(self.model, rngs, image_size)

    def _class_targets(self, cls_targets: Array) -> Array:
        """Category ids -> output indices of the model's class layout (-1: no output, trains as background)."""
        m = self.config.model
        if m.get("background_slot", True):
            return cls_targets
        category_ids = m.get("category_ids", ())
        if category_ids:  # mmdetection layout: output c is category_ids[c]; other ids train as background
            table = category_index_table(category_ids)
            known = (cls_targets > 0) & (cls_targets < table.shape[0])
            return jnp.where(known, table[jnp.clip(cls_targets, 0, table.shape[0] - 1)], -1)
        return jnp.where(cls_targets > 0, cls_targets - 1, -1)  # automl layout: output c is category c + 1

    def losses(self, variables, batch, rng, train: bool = True):
        if train:
            outputs, updates = self.model.apply(
                variables, batch["image"], train=True, mutable=["batch_stats"], rngs={"dropout": rng}
            )
            new_stats = updates["batch_stats"]
        else:
            outputs, new_stats = self.model.apply(variables, batch["image"], train=False), variables["batch_stats"]
        num_classes = self.config.model.num_classes
        logits = detection.flatten_outputs(outputs["class_outputs"], num_classes)
        boxes = detection.flatten_outputs(outputs["box_outputs"], 4)
        c = self.config.loss
        label = functools.partial(
            matching.label_anchors,
            self.anchors,
            match_threshold=c.match_threshold,
            unmatched_threshold=c.unmatched_threshold,
        )
        targets = jax.vmap(label)(batch["boxes"], batch["classes"], batch["valid"], batch["crowd"])
        parts = losses.retinanet_loss(
            logits,
            boxes,
            self._class_targets(targets["cls_targets"]),
            targets["box_targets"],
            targets["cls_weights"],
            targets["box_weights"],
            num_classes,
            c.focal_alpha,
            c.focal_gamma,
            c.huber_delta,
            c.box_loss_weight,
        )
        return parts, new_stats

    def predict(self, variables, images, image_sizes=None, nms_scales=None):
        """Detections (boxes in input pixels) of images [B, H, W, 3] of any (static) shape. ``image_sizes``
        [B, 2]: each image's unpadded (height, width), which boxes are clipped to (default the whole input);
        ``nms_scales`` [B]: see ``ops.detection.generate_detections``."""
        m = self.config.model
        outputs = self.model.apply(variables, images, train=False)
        d = m.detection
        input_hw = tuple(images.shape[1:3])
        anchors, level_sizes = self.anchors, self.level_sizes
        if input_hw != (m.image_size, m.image_size):
            anchors, level_sizes = (
                jnp.asarray(model_anchors(self.config, input_hw)),
                level_anchor_counts(self.config, input_hw),
            )
        return detection.generate_detections(
            detection.flatten_outputs(outputs["class_outputs"], m.num_classes),
            detection.flatten_outputs(outputs["box_outputs"], 4),
            anchors,
            input_hw if image_sizes is None else image_sizes,
            d.pre_nms_top_k,
            d.score_threshold,
            d.nms_iou_threshold,
            d.max_detections,
            background_slot=m.get("background_slot", True),
            category_ids=tuple(m.get("category_ids", ())),
            level_sizes=level_sizes,
            per_level_top_k=d.get("per_level_top_k", 0),
            per_level_rank=d.get("per_level_rank", "anchor"),
            log_size_clip=d.get("log_size_clip", "max"),
            clip=d.get("clip", "image"),
            nms_scales=nms_scales,
        )
