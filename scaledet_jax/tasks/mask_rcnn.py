"""Mask R-CNN: Faster R-CNN's losses plus the mask loss, and detections with per-detection masks.

The mask loss is per-pixel sigmoid cross-entropy on the matched class's 28x28 map of each
foreground RoI (``ops.masks.mask_loss``: torchvision's mean over foreground pixels, or Model
Garden's normalisation with ``loss.style='model_garden'``), weighted by ``config.loss.mask_weight``.
Predictions add ``masks`` [B, D, 28, 28]: the detected class's mask probabilities in the box frame;
evaluation pastes them into the original image (``ops.masks.paste_masks``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from scaledet_jax.ops import masks as mask_ops
from scaledet_jax.tasks import register_task
from scaledet_jax.tasks.faster_rcnn import FasterRCNNTask

Array = jax.Array


@register_task("mask_rcnn")
class MaskRCNNTask(FasterRCNNTask):
    batch_fields = ("image", "boxes", "classes", "valid", "crowd", "masks")
    log_losses = (*FasterRCNNTask.log_losses, "mask_loss")

    def losses(self, variables, batch, rng, train: bool = True):
        parts, new_stats, outputs = self.losses_and_outputs(variables, batch, rng, train)
        c = self.config.loss
        parts["mask_loss"] = mask_ops.mask_loss(
            outputs["mask_logits"],
            outputs["mask_classes"],
            outputs["mask_targets"],
            outputs["mask_valid"],
            style=c.get("style", "torchvision"),
        )
        parts["model_loss"] = parts["model_loss"] + c.get("mask_weight", 1.0) * parts["mask_loss"]
        return parts, new_stats

    def predict(self, variables, images, image_sizes=None, nms_scales=None) -> dict[str, Array]:
        outputs = self.model.apply(variables, images, train=False, image_sizes=image_sizes)
        clip_to = tuple(images.shape[1:3]) if image_sizes is None else image_sizes
        detections = self.detections(outputs, clip_to, nms_scales)
        logits = self.model.apply(variables, outputs["features"], detections["boxes"], method="mask_outputs")
        channel = detections["classes"][:, :, None, None, None]  # output index (category ids come after)
        selected = jnp.take_along_axis(logits, jnp.broadcast_to(channel, logits.shape[:-1] + (1,)), axis=-1)[..., 0]
        detections["masks"] = jnp.where(detections["valid"][:, :, None, None], jax.nn.sigmoid(selected), 0.0)
        return self.to_category_ids(detections)

    def mask_logits_on(self, variables: dict[str, Any], images: Array, boxes: Array) -> Array:
        """Mask logits [B, D, 28, 28, C] on given ``boxes`` [B, D, 4] (input pixels): the parity tests' entry."""
        features = self.model.apply(variables, images, train=False, method="features")
        return self.model.apply(variables, features, boxes, method="mask_outputs")
