"""Mask R-CNN (He et al., 2017): Faster R-CNN plus a mask branch on the foreground RoIs.

Training: the sampled RoIs come foreground first (``two_stage.sample_rois``), so the first
``num_samples * foreground_fraction`` of them hold every foreground RoI (torchvision trains the mask
head on all positive samples, Model Garden on ``num_sampled_masks`` = 128 of them: the same set at
the default 512 x 0.25). Their mask targets are Model Garden's: each matched ground-truth mask,
already cropped to its own box by the input pipeline, re-sampled into the RoI
(``ops.masks.crop_masks_in_target_boxes``). Inference: the mask head runs on the final detections
(``mask_outputs``), as both sources do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from scaledet_jax.models.faster_rcnn import FasterRCNN
from scaledet_jax.ops import masks as mask_ops

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MaskSettings:
    output_size: int = 14  # RoIAlign size of the mask head's input (its output is twice this)
    sampling_ratio: int = 2
    target_size: int = 28
    num_samples: int = 0  # foreground RoIs trained per image; 0 = num_samples * foreground_fraction


class MaskRCNN(FasterRCNN):
    """``FasterRCNN`` + ``mask_head``. Training outputs add ``mask_logits`` [B, K, 28, 28, C],
    ``mask_targets`` [B, K, 28, 28], ``mask_classes`` [B, K] and ``mask_valid`` [B, K] for the K
    foreground slots; ``gt`` must carry ``masks`` [B, M, Km, Km] (cropped to each gt box)."""

    mask_head: nn.Module | None = None
    mask: MaskSettings = MaskSettings()

    def mask_outputs(self, features: dict[int, Array], boxes: Array, train: bool = False) -> Array:
        """Mask logits [B, D, 2P, 2P, C] on ``boxes`` [B, D, 4] (input pixels)."""
        pooled = self.pool(features, boxes, self.mask.output_size, self.mask.sampling_ratio)
        return self.mask_head(pooled, train=train)

    def num_mask_samples(self) -> int:
        return self.mask.num_samples or int(self.roi.num_samples * self.roi.foreground_fraction)

    def __call__(
        self,
        images: Array,
        gt: dict[str, Array] | None = None,
        train: bool = False,
        image_sizes: Array | None = None,
    ) -> dict[str, Any]:
        if self.mask_head is None:
            raise ValueError("MaskRCNN needs a mask_head")
        features = self.features(images, train=train)
        outputs = self._box_outputs(features, gt, train, tuple(images.shape[1:3]), image_sizes)
        if gt is None:
            outputs["features"] = features  # the mask head runs on the detections (mask_outputs)
            if self.is_initializing():  # create its variables
                self.mask_outputs(features, outputs["rois"][:, :1])
            return outputs
        samples = outputs["roi_targets"]
        k = self.num_mask_samples()
        rois = jax.lax.stop_gradient(samples["rois"][:, :k])
        matched = samples["matched_gt"][:, :k]
        fg_valid = samples["foreground"][:, :k] & samples["valid"][:, :k]
        take = jax.vmap(lambda values, index: values[index])
        targets = mask_ops.crop_masks_in_target_boxes(
            take(gt["masks"], matched), take(gt["boxes"], matched), rois, self.mask.target_size, sample_offset=0.5
        )
        outputs.update(
            mask_logits=self.mask_outputs(features, rois, train=train),
            mask_targets=jnp.where(fg_valid[..., None, None], targets, 0.0),
            mask_classes=jnp.where(fg_valid, samples["classes"][:, :k], 0),
            mask_valid=fg_valid,
        )
        return outputs
