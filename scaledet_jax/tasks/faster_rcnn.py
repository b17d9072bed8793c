"""Two-stage detection (Faster R-CNN): RPN anchor targets and losses, the sampled RoIs' losses,
and per-class detections from the box head.

Losses follow ``config.loss.style``: 'torchvision' (RPN: binary cross-entropy averaged over the
256 sampled anchors per image, smooth-L1 with beta 1/9 on positives over the same count; box head:
softmax cross-entropy averaged over the sampled RoIs, smooth-L1 on the ground-truth class's deltas of
foreground RoIs over the same count) or 'model_garden' (its fixed RPN normaliser, Huber losses
normalised per positive coordinate, per level for the RPN); see ``ops.two_stage``. Each part is
weighted by ``config.loss.<part>_weight``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scaledet_jax.models import build_model
from scaledet_jax.ops import anchors as anchor_ops
from scaledet_jax.ops import two_stage
from scaledet_jax.tasks import init_with_images, register_task

Array = jax.Array


def _flatten(per_level: dict[int, Array], size: int) -> Array:
    """{level: [B, H, W, A * size]} -> [B, N, size] in anchor order (size 1 drops the last axis)."""
    flat = jnp.concatenate([v.reshape(v.shape[0], -1, size) for _, v in sorted(per_level.items())], axis=1)
    return flat[..., 0] if size == 1 else flat


def category_output_table(category_ids) -> np.ndarray:
    """table[id] = output index (1-based, 0 background) of category ``id``; 0 for ids without an output."""
    table = np.zeros(max(category_ids) + 1, np.int32)
    for index, category in enumerate(category_ids, 1):
        table[category] = index
    return table


@register_task("faster_rcnn")
class FasterRCNNTask:
    batch_fields = ("image", "boxes", "classes", "valid", "crowd")
    log_losses = ("rpn_score_loss", "rpn_box_loss", "fast_rcnn_class_loss", "fast_rcnn_box_loss")

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model = build_model(config.model)
        per_level = self.model.anchors()
        self.anchors = jnp.asarray(anchor_ops.flatten_levels(per_level))
        self.level_sizes = tuple(v.size // 4 for _, v in sorted(per_level.items()))

    def init(self, rngs: dict[str, Array], image_size: int) -> dict[str, Any]:
        return init_with_images(self.model, rngs, image_size)

    def losses(self, variables, batch, rng, train: bool = True):
        parts, new_stats, _ = self.losses_and_outputs(variables, batch, rng, train)
        return parts, new_stats

    def losses_and_outputs(self, variables, batch, rng, train: bool = True):
        """(loss parts, new batch_stats, the model's training outputs)."""
        gt = self.ground_truth(batch)
        dropout_rng, sampling_rng, rpn_rng = jax.random.split(rng, 3)
        rngs = {"dropout": dropout_rng, "sampling": sampling_rng}
        if train:
            outputs, updates = self.model.apply(
                variables, batch["image"], gt, train=True, mutable=["batch_stats"], rngs=rngs
            )
            new_stats = updates["batch_stats"]
        else:
            outputs, new_stats = (
                self.model.apply(variables, batch["image"], gt, train=False, rngs=rngs),
                variables["batch_stats"],
            )
        r, c = self.config.model.rpn, self.config.loss

        def targets(boxes, valid, crowd, key):
            return two_stage.rpn_targets(
                self.anchors, boxes, valid, crowd, key,
                positive_iou=r.positive_iou, negative_iou=r.negative_iou,
                batch_size_per_image=r.batch_size_per_image, positive_fraction=r.positive_fraction,
            )  # fmt: skip

        keys = jax.random.split(rpn_rng, batch["image"].shape[0])
        rpn = jax.vmap(targets)(gt["boxes"], gt["valid"], gt["crowd"], keys)
        rpn_parts = two_stage.rpn_loss(
            _flatten(outputs["rpn_objectness"], 1),
            _flatten(outputs["rpn_deltas"], 4),
            rpn["labels"],
            rpn["box_targets"],
            beta=c.rpn_smooth_l1_beta,
            style=c.get("style", "torchvision"),
            batch_size_per_image=r.batch_size_per_image,
            level_sizes=self.level_sizes,
        )
        samples = outputs["roi_targets"]
        roi_parts = two_stage.fast_rcnn_loss(
            outputs["class_logits"],
            outputs["box_deltas"],
            samples["classes"],
            samples["box_targets"],
            samples["valid"],
            beta=c.roi_smooth_l1_beta,
            style=c.get("style", "torchvision"),
        )
        parts = {**rpn_parts, **roi_parts}
        parts["model_loss"] = (
            c.rpn_score_weight * parts["rpn_score_loss"]
            + c.rpn_box_weight * parts["rpn_box_loss"]
            + c.class_weight * parts["fast_rcnn_class_loss"]
            + c.box_weight * parts["fast_rcnn_box_loss"]
        )
        parts["num_foreground_rois"] = jnp.sum(samples["foreground"] & samples["valid"]).astype(jnp.float32)
        return parts, new_stats, outputs

    def predict(self, variables, images, image_sizes=None, nms_scales=None):
        """Detections (boxes in input pixels); ``image_sizes`` [B, 2]: each image's unpadded (height, width),
        which proposals and detections are clipped to (default the whole input); ``nms_scales`` [B]: see
        ``ops.two_stage.fast_rcnn_detections``."""
        outputs = self.model.apply(variables, images, train=False, image_sizes=image_sizes)
        clip_to = tuple(images.shape[1:3]) if image_sizes is None else image_sizes
        return self.to_category_ids(self.detections(outputs, clip_to, nms_scales))

    def ground_truth(self, batch: dict[str, Array]) -> dict[str, Array]:
        """The batch's objects with classes as output indices: with ``model.category_ids`` (a converted
        mmdetection model: output c >= 1 is category_ids[c - 1]) ids without an output are left out,
        i.e. they train as background, as in the RetinaNet family; otherwise output c is category c."""
        gt = {k: batch[k] for k in self.batch_fields if k != "image"}
        ids = tuple(self.config.model.get("category_ids", ()) or ())
        if ids:
            table = jnp.asarray(category_output_table(ids))
            known = (gt["classes"] > 0) & (gt["classes"] < table.shape[0])
            classes = jnp.where(known, table[jnp.clip(gt["classes"], 0, table.shape[0] - 1)], 0)
            gt["classes"] = classes
            gt["valid"] = gt["valid"] & (classes > 0)
        return gt

    def to_category_ids(self, detections: dict[str, Array]) -> dict[str, Array]:
        """Output indices -> category ids (identity unless ``model.category_ids``)."""
        ids = tuple(self.config.model.get("category_ids", ()) or ())
        if ids:
            lookup = jnp.asarray((0, *ids), jnp.int32)
            detections = {**detections, "classes": jnp.where(detections["valid"], lookup[detections["classes"]], 0)}
        return detections

    def detections(self, outputs: dict[str, Any], clip_to=None, nms_scales=None) -> dict[str, Array]:
        """The box head's inference outputs -> fixed-shape detections (boxes in input pixels), clipped to
        ``clip_to``: (H, W) or per image [B, 2] (default the square ``image_size``)."""
        m = self.config.model
        d = m.detection
        return two_stage.fast_rcnn_detections(
            outputs["class_logits"],
            outputs["box_deltas"],
            outputs["rois"],
            outputs["roi_valid"],
            (m.image_size, m.image_size) if clip_to is None else clip_to,
            box_weights=tuple(m.box_coder_weights),
            score_threshold=d.score_threshold,
            nms_iou=d.nms_iou_threshold,
            max_detections=d.max_detections,
            min_size=d.get("min_size", 1e-2),
            pre_nms_top_k=d.pre_nms_top_k,
            clip=d.get("clip", "image"),
            log_size_clip=d.get("log_size_clip", "max"),
            nms_scales=nms_scales,
        )
