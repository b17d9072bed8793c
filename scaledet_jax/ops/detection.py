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
    image_size,
    pre_nms_top_k: int = 5000,
    score_threshold: float = 0.05,
    nms_iou_threshold: float = 0.5,
    max_detections: int = 100,
    background_slot: bool = True,
    category_ids: Sequence[int] = (),
    *,
    level_sizes: Sequence[int] = (),
    per_level_top_k: int = 0,
    per_level_rank: str = "anchor",
    log_size_clip: str = "max",
    clip: str = "image",
    nms_scales: Array | None = None,
) -> dict[str, Array]:
    """class_logits [B, N, C], box_outputs [B, N, 4], anchors [N, 4] -> boxes/scores/classes/valid (boxes in
    input pixels). ``image_size``: what boxes are clipped to, S, (H, W) or per image [B, 2] (each image's
    unpadded height, width after a keep-ratio resize, as mmdetection's ``img_shape`` and effdet's
    ``img_size / img_scale``).

    ``classes`` are category ids: output index ``c`` with a background slot, ``c + 1`` without,
    ``category_ids[c]`` when given (no background slot).

    The sources' variants, as model options (``model.detection``):

    * ``per_level_top_k`` > 0 (with ``level_sizes``, the anchors per level): first the ``per_level_top_k``
      candidates of each level, then the top ``pre_nms_top_k`` (anchor, class) pairs among them.
      ``per_level_rank="anchor"``: anchors by their highest class score, all their classes candidates
      (mmdetection v1's ``nms_pre``; mmdetection keeps every pair above the score threshold there,
      ``pre_nms_top_k`` only bounds that set for fixed shapes: with 5000 pairs only a pair ranked below 5000
      that would survive NMS into the top ``max_detections`` could differ); ``"pair"``: (anchor, class) pairs
      (torchvision RetinaNet's ``topk_candidates``, which takes them among the pairs above the score
      threshold: the same top pairs, as lower ones are masked after);
    * ``log_size_clip``: ``box_coder.decode_boxes``'s (``max``, ``both`` for mmdetection v1, ``none`` effdet);
    * ``clip``: ``image`` clips boxes to [0, size]; ``plus_one`` as mmdetection v1 clips its "+1" pixel boxes
      to [0, size - 1] (in our frame x1, y1 in [0, size - 1] and x2, y2 in [1, size]);
    * ``nms_scales`` [B] (input pixels per original pixel): NMS compares the boxes as the source does after
      mapping them back to the original image, before NMS (mmdetection v1's ``rescale``). Only "+1" boxes
      (``clip="plus_one"``) need it: their IoU changes under scaling, plain boxes' does not.
    """
    if category_ids and (background_slot or len(category_ids) != class_logits.shape[-1]):
        raise ValueError(
            f"category_ids needs background_slot=False and one id per output ({class_logits.shape[-1]}), "
            f"got {len(category_ids)} ids"
        )
    if per_level_top_k > 0 and sum(level_sizes) != class_logits.shape[1]:
        raise ValueError(f"level_sizes {tuple(level_sizes)} do not add up to the {class_logits.shape[1]} anchors")
    if per_level_rank not in ("anchor", "pair"):
        raise ValueError(f"per_level_rank must be 'anchor' or 'pair', got {per_level_rank!r}")
    if clip not in ("image", "plus_one"):
        raise ValueError(f"clip must be 'image' or 'plus_one', got {clip!r}")
    id_table = jnp.asarray((0, *category_ids), jnp.int32) if category_ids else None
    batch = class_logits.shape[0]
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    image_hw = jnp.broadcast_to(jnp.asarray(size, jnp.float32), (batch, 2))
    scales = jnp.ones((batch,), jnp.float32) if nms_scales is None else jnp.asarray(nms_scales, jnp.float32)

    def one_image(logits, codes, hw, scale):
        if background_slot:
            logits = logits[:, 1:]
        per_anchor = jax.nn.sigmoid(logits.astype(jnp.float32))
        num_fg = logits.shape[1]
        if per_level_top_k > 0 and per_level_rank == "pair":  # candidates: pair indices (anchor * C + class)
            chosen, start = [], 0
            for size in level_sizes:
                level = per_anchor[start : start + size].reshape(-1)
                chosen.append(start * num_fg + jax.lax.top_k(level, min(per_level_top_k, level.shape[0]))[1])
                start += size
            pairs = jnp.concatenate(chosen)
            k = min(pre_nms_top_k, pairs.shape[0])
            top_scores, top = jax.lax.top_k(per_anchor.reshape(-1)[pairs], k)
            anchor_index, classes = pairs[top] // num_fg, pairs[top] % num_fg + 1
        else:
            candidates = jnp.arange(per_anchor.shape[0])  # anchors whose pairs are candidates
            if per_level_top_k > 0:
                chosen, start = [], 0
                for size in level_sizes:
                    best = jnp.max(per_anchor[start : start + size], axis=-1)
                    chosen.append(start + jax.lax.top_k(best, min(per_level_top_k, size))[1])
                    start += size
                candidates = jnp.concatenate(chosen)
            scores = per_anchor[candidates].reshape(-1)
            k = min(pre_nms_top_k, scores.shape[0])
            top_scores, top_index = jax.lax.top_k(scores, k)
            anchor_index, classes = candidates[top_index // num_fg], top_index % num_fg + 1
        if id_table is not None:
            classes = id_table[classes]
        boxes = box_coder.decode_boxes(
            codes[anchor_index].astype(jnp.float32), anchors[anchor_index], log_size_clip=log_size_clip
        )
        high = jnp.concatenate([hw, hw])
        if clip == "plus_one":
            boxes = jnp.clip(boxes, jnp.array([0.0, 0.0, 1.0, 1.0]), high - jnp.array([1.0, 1.0, 0.0, 0.0]))
            compared = boxes
            if nms_scales is not None:  # mmdetection's inclusive corners / its scale: x1 / s, (x2 - 1) / s + 1 here
                inclusive = jnp.array([0.0, 0.0, 1.0, 1.0])
                compared = (boxes - inclusive) / scale + inclusive
        else:
            boxes = jnp.clip(boxes, 0.0, high)
            compared = boxes
        masked = jnp.where(top_scores >= score_threshold, top_scores, -jnp.inf)
        keep, valid = nms.batched_nms(compared, masked, classes, nms_iou_threshold, max_detections)
        return {
            "boxes": jnp.where(valid[:, None], boxes[keep], 0.0),
            "scores": jnp.where(valid, top_scores[keep], 0.0),
            "classes": jnp.where(valid, classes[keep], 0),
            "valid": valid,
        }

    return jax.vmap(one_image)(class_logits, box_outputs, image_hw, scales)
