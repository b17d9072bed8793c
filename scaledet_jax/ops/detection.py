"""Raw RetinaNet outputs -> final detections, with fixed shapes (jit-compiled predict).

Per image: sigmoid scores of every (anchor, class), class 0 dropped when it is Model Garden's unused
background slot (automl's EfficientDet has none: output ``i`` is category ``i + 1``, or
``category_ids[i]`` for mmdetection's contiguous classes); the top
``pre_nms_top_k`` candidates; boxes decoded against their anchors and clipped to the image;
candidates under ``score_threshold`` masked; per-class NMS; ``max_detections`` kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from scaledet_jax.ops import box_coder, nms

Array = jax.Array


def flatten_outputs(per_level: dict[int, Array], size: int) -> Array:
    """{level: [B, H, W, A * size]} -> [B, N, size] in anchor order."""
    return jnp.concatenate([v.reshape(v.shape[0], -1, size) for _, v in sorted(per_level.items())], axis=1)


def generate_detections(
    class_logits: Array,
    box_outputs: Array,
    anchors: Array,
    image_size: int,
    pre_nms_top_k: int = 5000,
    score_threshold: float = 0.05,
    nms_iou_threshold: float = 0.5,
    max_detections: int = 100,
    background_slot: bool = True,
    category_ids: Sequence[int] = (),
) -> dict[str, Array]:
    """class_logits [B, N, C], box_outputs [B, N, 4], anchors [N, 4] -> boxes/scores/classes/valid.

    ``classes`` are category ids: output index ``c`` with a background slot, ``c + 1`` without,
    ``category_ids[c]`` when given (no background slot).
    """
    if category_ids and (background_slot or len(category_ids) != class_logits.shape[-1]):
        raise ValueError(
            f"category_ids needs background_slot=False and one id per output ({class_logits.shape[-1]}), "
            f"got {len(category_ids)} ids"
        )
    id_table = jnp.asarray((0, *category_ids), jnp.int32) if category_ids else None

    def one_image(logits, codes):
        if background_slot:
            logits = logits[:, 1:]
        scores = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(-1)
        num_fg = logits.shape[1]
        k = min(pre_nms_top_k, scores.shape[0])
        top_scores, top_index = jax.lax.top_k(scores, k)
        anchor_index, classes = top_index // num_fg, top_index % num_fg + 1
        if id_table is not None:
            classes = id_table[classes]
        boxes = box_coder.decode_boxes(codes[anchor_index].astype(jnp.float32), anchors[anchor_index])
        boxes = jnp.clip(boxes, 0.0, float(image_size))
        masked = jnp.where(top_scores >= score_threshold, top_scores, -jnp.inf)
        keep, valid = nms.batched_nms(boxes, masked, classes, nms_iou_threshold, max_detections)
        return {
            "boxes": jnp.where(valid[:, None], boxes[keep], 0.0),
            "scores": jnp.where(valid, top_scores[keep], 0.0),
            "classes": jnp.where(valid, classes[keep], 0),
            "valid": valid,
        }

    return jax.vmap(one_image)(class_logits, box_outputs)
