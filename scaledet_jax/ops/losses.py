"""RetinaNet losses with TF Model Garden's reductions.

* Sigmoid focal loss summed over anchors and classes, weighted by ``cls_weights``;
* Huber box loss averaged over the 4 coordinates (Keras' ``Huber``), summed over anchors,
  weighted by ``box_weights``;
* both divided by (number of positives + 1), counted over the whole global batch;
* total = class loss + box_loss_weight * box loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def sigmoid_focal_loss(logits: Array, targets: Array, alpha: float = 0.25, gamma: float = 1.5) -> Array:
    """Element-wise focal loss; ``targets`` in {0, 1} with the logits' shape."""
    logits = logits.astype(jnp.float32)
    cross_entropy = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    probs = jax.nn.sigmoid(logits)
    probs_gt = jnp.where(targets == 1.0, probs, 1.0 - probs)
    loss = (1.0 - probs_gt) ** gamma * cross_entropy
    return jnp.where(targets == 1.0, alpha * loss, (1.0 - alpha) * loss)


def huber_loss(pred: Array, target: Array, delta: float = 0.1) -> Array:
    """Element-wise Huber loss (quadratic below ``delta``, linear above)."""
    error = jnp.abs(pred.astype(jnp.float32) - target)
    quadratic = jnp.minimum(error, delta)
    return 0.5 * quadratic**2 + delta * (error - quadratic)


def retinanet_loss(
    class_logits: Array,
    box_outputs: Array,
    cls_targets: Array,
    box_targets: Array,
    cls_weights: Array,
    box_weights: Array,
    num_classes: int,
    alpha: float = 0.25,
    gamma: float = 1.5,
    delta: float = 0.1,
    box_loss_weight: float = 50.0,
) -> dict[str, Array]:
    """Losses of a batch: logits [B, N, C], boxes [B, N, 4], targets as from ``label_anchors``."""
    num_positives = jnp.sum(box_weights) + 1.0
    onehot = jax.nn.one_hot(cls_targets, num_classes)  # -1 -> all zeros
    cls_loss = jnp.sum(sigmoid_focal_loss(class_logits, onehot, alpha, gamma) * cls_weights[..., None])
    box_loss = jnp.sum(jnp.mean(huber_loss(box_outputs, box_targets, delta), axis=-1) * box_weights)
    cls_loss, box_loss = cls_loss / num_positives, box_loss / num_positives
    return {
        "cls_loss": cls_loss,
        "box_loss": box_loss,
        "model_loss": cls_loss + box_loss_weight * box_loss,
        "num_positives": num_positives - 1.0,
    }
