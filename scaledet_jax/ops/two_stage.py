"""Two-stage (Faster R-CNN) targets, sampling, proposals, detections and losses with static shapes.

Semantics follow torchvision's ``RegionProposalNetwork`` / ``RoIHeads`` (and Model Garden where it
agrees); every count is fixed and variable-size results come padded with a validity mask, so all of
it runs under ``jax.jit`` (counts and thresholds are Python values, arrays are traced).

Boxes are [ymin, xmin, ymax, xmax] in pixels; box codes are [ty, tx, th, tw] (``box_coder``),
torchvision's are (dx, dy, dw, dh). Per-location head outputs are anchor-major: objectness
``[..., a]`` and deltas ``[..., a * 4 + k]``, the order of ``anchors.level_anchors`` and of
torchvision's ``permute_and_flatten``.

Random sampling draws one 31-bit random key per candidate and keeps the ``k`` largest with
``lax.top_k`` (ineligible candidates get key -1): a uniformly random subset, like torchvision's
``randperm``, with fixed shapes.

Ground truth comes padded to a fixed ``M`` with ``gt_valid``; COCO crowd boxes (``gt_crowd``) never
match (torchvision and Model Garden drop them from the training targets); for the RPN they also
keep overlapping anchors out of the negatives (see :func:`rpn_targets`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from scaledet_jax.ops import box_coder, nms
from scaledet_jax.ops.matching import box_iou

Array = jax.Array

BELOW_LOW_THRESHOLD = -1  # torchvision Matcher's codes
BETWEEN_THRESHOLDS = -2


def match_boxes(
    iou: Array, gt_valid: Array, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False
) -> Array:
    """torchvision ``Matcher`` on an [N, M] IoU matrix (rows: anchors/proposals, columns: padded gt).

    Returns int32 [N]: the matched gt index when the best IoU is >= ``high_threshold``, -1 when it is
    < ``low_threshold``, -2 in between. With ``allow_low_quality_matches`` every row whose IoU with
    a gt equals that gt's highest IoU (ties included) gets the row's own best gt (argmax over the
    row, as torchvision keeps ``all_matches``), whatever its IoU. Invalid columns never match; with
    no valid column every row is -1. Deviation, for degenerate input only: a gt that overlaps no row
    at all (highest IoU 0) makes no low-quality matches (torchvision would match every row with IoU
    0 to it, i.e. turn all background into positives). Per image.
    """
    gt_valid = gt_valid.astype(bool)
    masked = jnp.where(gt_valid[None, :], iou, -1.0)
    best = jnp.max(masked, axis=1)
    argbest = jnp.argmax(masked, axis=1).astype(jnp.int32)
    matches = jnp.where(
        best >= high_threshold,
        argbest,
        jnp.where(best < low_threshold, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS),
    )
    if allow_low_quality_matches:
        highest = jnp.max(masked, axis=0)  # [M]
        is_best = (masked == highest[None, :]) & (gt_valid & (highest > 0))[None, :]
        matches = jnp.where(jnp.any(is_best, axis=1), argbest, matches)
    return jnp.where(jnp.any(gt_valid), matches, BELOW_LOW_THRESHOLD).astype(jnp.int32)


def _random_subset(rng: Array, eligible: Array, k: int) -> tuple[Array, Array]:
    """k indices drawn uniformly without replacement among ``eligible`` [N]; ok marks real picks."""
    k = min(k, eligible.shape[0])
    keys = (jax.random.bits(rng, eligible.shape, jnp.uint32) >> 1).astype(jnp.int32)
    values, index = jax.lax.top_k(jnp.where(eligible, keys, -1), k)
    return index, values >= 0


def balanced_sample(
    rng: Array, positive: Array, negative: Array, num_samples: int, positive_fraction: float
) -> tuple[Array, Array, Array, Array]:
    """torchvision ``BalancedPositiveNegativeSampler`` for one image, with fixed shapes.

    ``positive``/``negative`` [N] bool (disjoint). Picks min(#positive, int(num_samples *
    positive_fraction)) positives and min(#negative, num_samples - #picked positives) negatives,
    each uniformly at random. Returns (positive index [P], positive ok [P], negative index [S'],
    negative ok [S']) with P = min(int(num_samples * positive_fraction), N), S' = min(num_samples, N).
    """
    rng_pos, rng_neg = jax.random.split(rng)
    pos_index, pos_ok = _random_subset(rng_pos, positive, int(num_samples * positive_fraction))
    neg_index, neg_ok = _random_subset(rng_neg, negative, num_samples)
    num_pos = jnp.sum(pos_ok)
    neg_ok = neg_ok & (jnp.arange(neg_ok.shape[0]) < num_samples - num_pos)
    return pos_index, pos_ok, neg_index, neg_ok


def rpn_targets(
    anchors: Array,
    gt_boxes: Array,
    gt_valid: Array,
    gt_crowd: Array,
    rng: Array,
    *,
    positive_iou: float = 0.7,
    negative_iou: float = 0.3,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    allow_low_quality_matches: bool = True,
    crowd_iou: float | None = None,
) -> dict[str, Array]:
    """RPN training targets of one image (torchvision ``assign_targets_to_anchors`` + sampler).

    anchors [N, 4]; gt_boxes [M, 4], gt_valid [M], gt_crowd [M] (padded ground truth); rng a PRNG key.
    Matching is :func:`match_boxes` (>= ``positive_iou`` positive, < ``negative_iou`` negative, in
    between ignored, low-quality matches kept). Crowd gt never match; a non-positive anchor whose
    IoU with a crowd box is >= ``crowd_iou`` (default ``negative_iou``: it would not have been a
    negative for an ordinary box there) is ignored instead of negative. No valid gt: every anchor is
    a negative candidate. Then :func:`balanced_sample` draws ``batch_size_per_image`` anchors.

    Returns ``labels`` int32 [N] (1 sampled positive, 0 sampled negative, -1 not sampled),
    ``box_targets`` [N, 4] (matched gt encoded against the anchor, box-coder weights 1 as
    torchvision's RPN; zeros where labels != 1) and ``matched`` int32 [N] (matcher result before
    sampling: gt index for positive candidates, -1 negative candidates, -2 ignored).
    """
    gt_valid, crowd = gt_valid.astype(bool), gt_crowd.astype(bool)
    iou = box_iou(anchors, gt_boxes)
    matched = match_boxes(iou, gt_valid & ~crowd, positive_iou, negative_iou, allow_low_quality_matches)
    crowd_max = jnp.max(jnp.where((gt_valid & crowd)[None, :], iou, 0.0), axis=1, initial=0.0)
    near_crowd = crowd_max >= (negative_iou if crowd_iou is None else crowd_iou)
    matched = jnp.where((matched == BELOW_LOW_THRESHOLD) & near_crowd, BETWEEN_THRESHOLDS, matched)

    num = anchors.shape[0]
    pos_index, pos_ok, neg_index, neg_ok = balanced_sample(
        rng, matched >= 0, matched == BELOW_LOW_THRESHOLD, batch_size_per_image, positive_fraction
    )
    labels = jnp.full((num,), -1, jnp.int32)
    labels = labels.at[jnp.where(pos_ok, pos_index, num)].set(1, mode="drop")
    labels = labels.at[jnp.where(neg_ok, neg_index, num)].set(0, mode="drop")
    encoded = box_coder.encode_boxes(gt_boxes[jnp.maximum(matched, 0)], anchors)
    return {
        "labels": labels,
        "box_targets": jnp.where((labels == 1)[:, None], encoded, 0.0),
        "matched": matched,
    }


def _real(x: Array) -> Array:
    """At least float32 (bfloat16 outputs are scored in float32; float64 stays float64 for x64 parity checks)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _image_hw(image_size, batch: int, dtype=jnp.float32) -> Array:
    """(h, w) or [B, 2] -> [B, 2]."""
    return jnp.broadcast_to(jnp.asarray(image_size, dtype), (batch, 2))


CLIPS = ("image", "plus_one")


def _clip(boxes: Array, hw: Array, style: str = "image") -> Array:
    """Clips [..., 4] boxes to [0, h] x [0, w] (torchvision ``clip_boxes_to_image``); ``plus_one``: mmdetection
    v1's "+1" boxes, whose inclusive corners clip to [0, size - 1] (here y1, x1 in [0, size - 1], y2, x2 in
    [1, size])."""
    if style not in CLIPS:
        raise ValueError(f"clip must be one of {CLIPS}, got {style!r}")
    limit = jnp.stack([hw[0], hw[1], hw[0], hw[1]])
    if style == "plus_one":
        return jnp.clip(boxes, jnp.array([0.0, 0.0, 1.0, 1.0], boxes.dtype), limit - jnp.array([1.0, 1.0, 0.0, 0.0]))
    return jnp.clip(boxes, 0.0, limit)


def _big_enough(boxes: Array, min_size: float) -> Array:
    """torchvision ``remove_small_boxes`` as a mask: both sides >= ``min_size``."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def generate_proposals(
    objectness: dict[int, Array],
    deltas: dict[int, Array],
    anchors: dict[int, Array],
    image_size,
    *,
    pre_nms_top_k: int = 1000,
    post_nms_top_k: int = 1000,
    nms_iou: float = 0.7,
    min_size: float = 1e-3,
    score_threshold: float = 0.0,
    box_weights: Sequence[float] | None = None,
    per_level_nms: bool = True,
    clip: str = "image",
    log_size_clip: str = "max",
) -> tuple[Array, Array, Array]:
    """RPN outputs -> proposals of a batch (torchvision ``RegionProposalNetwork.filter_proposals``).

    objectness {level: [B, H, W, A]} logits, deltas {level: [B, H, W, A * 4]}, anchors {level:
    [H, W, A * 4]}; image_size (h, w) or [B, 2] (per-image sizes to clip to). Per image and level
    the ``pre_nms_top_k`` highest logits are kept and decoded against their anchors (log-size
    changes clipped at log(1000/16)); boxes are clipped to the image; boxes with a side <
    ``min_size`` or sigmoid score < ``score_threshold`` are masked out; NMS (IoU > ``nms_iou``
    suppresses) runs per level (``per_level_nms``, torchvision and Model Garden) or across levels;
    the ``post_nms_top_k`` best survivors are returned in descending score order. mmdetection v1's RPN
    (``get_bboxes_single``: top ``nms_pre`` per level, NMS per level, ``nms_post`` = ``max_num``): ``clip``
    ``plus_one``, ``log_size_clip`` ``both`` (``box_coder.decode_boxes``), ``min_size`` 0.

    Returns (proposals [B, post_nms_top_k, 4], scores [B, post_nms_top_k] sigmoid probabilities,
    valid [B, post_nms_top_k]); padded slots are zeros with valid=False. Batched (vmaps itself).
    """
    levels = sorted(objectness)
    batch = objectness[levels[0]].shape[0]
    dtype = jnp.promote_types(deltas[levels[0]].dtype, jnp.float32)
    flat_anchors = [jnp.asarray(anchors[level], dtype).reshape(-1, 4) for level in levels]

    def one_image(logits_per_level, deltas_per_level, hw):
        boxes, logits, level_ids = [], [], []
        for i, (logit, delta, anchor) in enumerate(zip(logits_per_level, deltas_per_level, flat_anchors, strict=True)):
            logit = _real(logit.reshape(-1))
            top, index = jax.lax.top_k(logit, min(pre_nms_top_k, logit.shape[0]))
            codes = _real(delta.reshape(-1, 4)[index])
            boxes.append(box_coder.decode_boxes(codes, anchor[index], box_weights, log_size_clip=log_size_clip))
            logits.append(top)
            level_ids.append(jnp.full(top.shape, i, jnp.int32))
        boxes = _clip(jnp.concatenate(boxes), hw, clip)
        scores = jax.nn.sigmoid(jnp.concatenate(logits))
        ok = _big_enough(boxes, min_size) & (scores >= score_threshold)
        masked = jnp.where(ok, scores, -jnp.inf)
        if per_level_nms:
            keep, valid = nms.batched_nms(boxes, masked, jnp.concatenate(level_ids), nms_iou, post_nms_top_k)
        else:
            keep, valid = nms.nms(boxes, masked, nms_iou, post_nms_top_k)
        return jnp.where(valid[:, None], boxes[keep], 0.0), jnp.where(valid, scores[keep], 0.0), valid

    return jax.vmap(one_image)(
        [objectness[level] for level in levels],
        [deltas[level] for level in levels],
        _image_hw(image_size, batch, dtype),
    )


def sample_rois(
    proposals: Array,
    proposal_valid: Array,
    gt_boxes: Array,
    gt_classes: Array,
    gt_valid: Array,
    gt_crowd: Array,
    rng: Array,
    *,
    num_samples: int = 512,
    foreground_fraction: float = 0.25,
    foreground_iou: float = 0.5,
    background_iou_high: float = 0.5,
    background_iou_low: float = 0.0,
    add_ground_truth: bool = True,
    box_weights: Sequence[float] | None = (10.0, 10.0, 5.0, 5.0),
) -> dict[str, Array]:
    """Samples the RoIs of one image for the box head (torchvision ``select_training_samples``,
    Model Garden ``ROISampler``).

    proposals [R, 4] with proposal_valid [R]; padded ground truth gt_boxes [M, 4], gt_classes [M],
    gt_valid [M], gt_crowd [M]; rng a PRNG key. With ``add_ground_truth`` the valid non-crowd gt
    boxes are appended as candidates. Each candidate's best IoU over the valid non-crowd gt (0 when
    there is none) makes it foreground (>= ``foreground_iou``, class of the argmax gt) or background
    (in [``background_iou_low``, ``background_iou_high``)); crowd gt are left out as if removed
    (torchvision / Model Garden drop them from training targets). At most
    int(num_samples * foreground_fraction) foreground are drawn uniformly at random, background
    fills the rest (:func:`balanced_sample`).

    Returns, all [num_samples, ...], foreground first, then background, then padding:
    ``rois`` [., 4], ``classes`` int32 (0 background), ``box_targets`` [., 4] (matched gt encoded
    against the roi with ``box_weights``; zeros unless foreground), ``foreground`` bool, ``valid``
    bool (a real sample: torchvision returns fewer samples when candidates run out, Model Garden
    pads; padded slots are zeros), ``matched_gt`` int32 (gt index for foreground, 0 elsewhere, as
    torchvision's clamped index).
    """
    usable = gt_valid.astype(bool) & ~gt_crowd.astype(bool)
    candidates, candidate_valid = proposals.astype(jnp.float32), proposal_valid.astype(bool)
    if add_ground_truth:
        candidates = jnp.concatenate([candidates, gt_boxes.astype(jnp.float32)])
        candidate_valid = jnp.concatenate([candidate_valid, usable])
    iou = jnp.where(usable[None, :], box_iou(candidates, gt_boxes), -1.0)
    best = jnp.maximum(jnp.max(iou, axis=1), 0.0)
    matched = jnp.argmax(iou, axis=1).astype(jnp.int32)
    foreground = candidate_valid & (best >= foreground_iou)
    background = candidate_valid & ~foreground & (best < background_iou_high) & (best >= background_iou_low)

    fg_index, fg_ok, bg_index, bg_ok = balanced_sample(rng, foreground, background, num_samples, foreground_fraction)
    num_fg, num_bg = jnp.sum(fg_ok), jnp.sum(bg_ok)
    slot = jnp.arange(num_samples)
    is_fg = slot < num_fg
    index = bg_index[jnp.clip(slot - num_fg, 0, bg_index.shape[0] - 1)]
    if fg_index.shape[0]:
        index = jnp.where(is_fg, fg_index[jnp.minimum(slot, fg_index.shape[0] - 1)], index)
    valid = slot < num_fg + num_bg
    is_fg = is_fg & valid

    rois = jnp.where(valid[:, None], candidates[index], 0.0)
    matched_gt = jnp.where(is_fg, matched[index], 0)
    encoded = box_coder.encode_boxes(gt_boxes[matched_gt].astype(jnp.float32), rois, box_weights)
    return {
        "rois": rois,
        "classes": jnp.where(is_fg, gt_classes[matched_gt], 0).astype(jnp.int32),
        "box_targets": jnp.where(is_fg[:, None], encoded, 0.0),
        "foreground": is_fg,
        "valid": valid,
        "matched_gt": matched_gt,
    }


def _per_class_deltas(box_deltas: Array, num_classes: int) -> Array:
    """[..., C * 4] -> [..., C, 4]; class-agnostic [..., 4] is broadcast to every class."""
    codes = box_deltas.reshape(box_deltas.shape[:-1] + (-1, 4))
    return jnp.broadcast_to(codes, box_deltas.shape[:-1] + (num_classes, 4))


def fast_rcnn_detections(
    class_logits: Array,
    box_deltas: Array,
    rois: Array,
    roi_valid: Array,
    image_size,
    *,
    box_weights: Sequence[float] | None = (10.0, 10.0, 5.0, 5.0),
    score_threshold: float = 0.05,
    nms_iou: float = 0.5,
    max_detections: int = 100,
    min_size: float = 1e-2,
    pre_nms_top_k: int = 5000,
    background_slot: bool = True,
    clip: str = "image",
    log_size_clip: str = "max",
    nms_scales: Array | None = None,
) -> dict[str, Array]:
    """Box-head outputs -> detections of a batch (torchvision ``RoIHeads.postprocess_detections``).

    class_logits [B, R, C], box_deltas [B, R, C * 4] (class c uses [c*4:(c+1)*4], [ty, tx, th, tw];
    or [B, R, 4] class-agnostic), rois [B, R, 4] with roi_valid [B, R]; image_size (h, w) or [B, 2].
    Softmax over the C classes; each (roi, class) box decoded from the roi with ``box_weights`` and
    clipped to the image; with ``background_slot`` class 0 is dropped and class ids are the column
    index, without it every column is a class with id column + 1; candidates kept when score >
    ``score_threshold``, both sides >= ``min_size`` and the roi is valid; of these the
    ``pre_nms_top_k`` best go through per-class NMS (IoU > ``nms_iou`` suppresses) and the
    ``max_detections`` best survivors are returned in descending score order. Identical to
    torchvision whenever at most ``pre_nms_top_k`` candidates pass the filters.

    mmdetection v1 (``BBoxHead.get_det_bboxes`` + ``multiclass_nms``): ``clip`` ``plus_one``,
    ``log_size_clip`` ``both``, ``min_size`` 0, and ``nms_scales`` [B] (input pixels per original pixel): NMS
    compares the "+1" boxes as mmdetection does after dividing them by its scale factor (``rescale``); the
    returned boxes stay in input pixels.

    Returns boxes [B, max_detections, 4], scores, classes (int32), valid; padded slots are zeros /
    False. Batched (vmaps itself).
    """
    batch, _, num_classes = class_logits.shape
    first = 1 if background_slot else 0

    def one_image(logits, deltas, boxes_in, box_ok, hw, scale):
        probs = jax.nn.softmax(_real(logits), axis=-1)[:, first:]
        codes = _per_class_deltas(_real(deltas), num_classes)[:, first:]
        anchors = boxes_in.astype(codes.dtype)[:, None, :]
        boxes = _clip(box_coder.decode_boxes(codes, anchors, box_weights, log_size_clip=log_size_clip), hw, clip)
        classes = jnp.broadcast_to(jnp.arange(first, num_classes, dtype=jnp.int32) + (1 - first), probs.shape)
        ok = (probs > score_threshold) & _big_enough(boxes, min_size) & box_ok.astype(bool)[:, None]
        masked = jnp.where(ok, probs, -jnp.inf).reshape(-1)
        top, index = jax.lax.top_k(masked, min(pre_nms_top_k, masked.shape[0]))
        boxes, classes = boxes.reshape(-1, 4)[index], classes.reshape(-1)[index]
        compared = boxes
        if nms_scales is not None and clip == "plus_one":  # mmdetection's inclusive corners / its scale factor
            inclusive = jnp.array([0.0, 0.0, 1.0, 1.0], boxes.dtype)
            compared = (boxes - inclusive) / scale + inclusive
        keep, valid = nms.batched_nms(compared, top, classes, nms_iou, max_detections)
        return {
            "boxes": jnp.where(valid[:, None], boxes[keep], 0.0),
            "scores": jnp.where(valid, top[keep], 0.0),
            "classes": jnp.where(valid, classes[keep], 0),
            "valid": valid,
        }

    dtype = jnp.promote_types(box_deltas.dtype, jnp.float32)
    hw = _image_hw(image_size, batch, dtype)
    scales = jnp.ones((batch,), dtype) if nms_scales is None else jnp.asarray(nms_scales, dtype)
    return jax.vmap(one_image)(class_logits, box_deltas, rois, roi_valid, hw, scales)


def smooth_l1(diff: Array, beta: float) -> Array:
    """Element-wise smooth L1 (torch ``smooth_l1_loss``): 0.5 x^2 / beta below ``beta``, |x| - beta/2 above."""
    ax = jnp.abs(diff)
    return jnp.where(ax < beta, 0.5 * ax**2 / beta, ax - 0.5 * beta)


def huber(diff: Array, delta: float) -> Array:
    """Element-wise Huber loss (Keras ``Huber``): 0.5 x^2 below ``delta``, delta * (|x| - delta / 2) above."""
    ax = jnp.abs(diff)
    return jnp.where(ax <= delta, 0.5 * ax**2, delta * ax - 0.5 * delta**2)


LOSS_STYLES = ("torchvision", "model_garden")


def _check_style(style: str) -> None:
    if style not in LOSS_STYLES:
        raise ValueError(f"loss style must be one of {LOSS_STYLES}, got {style!r}")


def rpn_loss(
    objectness_logits: Array,
    deltas: Array,
    labels: Array,
    box_targets: Array,
    *,
    beta: float = 1.0 / 9.0,
    style: str = "torchvision",
    batch_size_per_image: int = 256,
    level_sizes: tuple[int, ...] | None = None,
) -> dict[str, Array]:
    """RPN losses of a batch.

    objectness_logits [B, N], deltas [B, N, 4], labels [B, N] (1 / 0 sampled, -1 not sampled, as
    from :func:`rpn_targets`), box_targets [B, N, 4].

    ``style='torchvision'`` (``RegionProposalNetwork.compute_loss``): ``rpn_score_loss`` is binary
    cross-entropy with logits averaged over the sampled anchors of the whole batch; ``rpn_box_loss``
    smooth L1 (``beta``) summed over the sampled positives, divided by the number of sampled anchors.

    ``style='model_garden'`` (``RpnScoreLoss`` / ``RpnBoxLoss``): the score loss is summed over
    sampled anchors and divided by B * ``batch_size_per_image``; the box loss is Huber with delta
    ``beta`` on the positives' coordinates, normalised per pyramid level by (4 * positives of that
    level + 0.01) and summed over levels (``level_sizes``: anchors per level, in order; None = one level).
    """
    _check_style(style)
    logits = objectness_logits.astype(jnp.float32)
    sampled, positive = labels >= 0, labels == 1
    target = positive.astype(jnp.float32)
    bce = jnp.maximum(logits, 0.0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    diff = deltas.astype(jnp.float32) - box_targets
    if style == "torchvision":
        num_sampled = jnp.maximum(jnp.sum(sampled), 1).astype(jnp.float32)
        box = smooth_l1(diff, beta)
        return {
            "rpn_score_loss": jnp.sum(jnp.where(sampled, bce, 0.0)) / num_sampled,
            "rpn_box_loss": jnp.sum(jnp.where(positive[..., None], box, 0.0)) / num_sampled,
        }
    score = jnp.sum(jnp.where(sampled, bce, 0.0)) / (logits.shape[0] * batch_size_per_image)
    per_anchor = jnp.sum(jnp.where(positive[..., None], huber(diff, beta), 0.0), axis=-1)  # [B, N]
    sizes = level_sizes or (logits.shape[1],)
    if sum(sizes) != logits.shape[1]:
        raise ValueError(f"level_sizes {sizes} do not add up to the {logits.shape[1]} anchors")
    box, start = 0.0, 0
    for size in sizes:
        level = slice(start, start + size)
        count = 4.0 * jnp.sum(positive[:, level]).astype(jnp.float32)
        box = box + jnp.sum(per_anchor[:, level]) / (count + 0.01)
        start += size
    return {"rpn_score_loss": score, "rpn_box_loss": box}


def fast_rcnn_loss(
    class_logits: Array,
    box_deltas: Array,
    classes: Array,
    box_targets: Array,
    valid: Array,
    *,
    beta: float = 1.0 / 9.0,
    style: str = "torchvision",
) -> dict[str, Array]:
    """Box-head losses of a batch of sampled RoIs.

    class_logits [B, S, C], box_deltas [B, S, C * 4] (or [B, S, 4] class-agnostic), classes [B, S]
    (0 background), box_targets [B, S, 4], valid [B, S] (real samples, as from :func:`sample_rois`).
    ``fast_rcnn_class_loss``: softmax cross-entropy averaged over valid samples (both styles).
    ``fast_rcnn_box_loss`` on the deltas of each valid foreground sample's gt class:
    ``style='torchvision'`` (``fastrcnn_loss``): smooth L1 (``beta``) summed, divided by the number of
    valid samples; ``style='model_garden'`` (``FastrcnnBoxLoss``): Huber with delta ``beta`` summed,
    divided by (4 * foreground samples + 0.01).
    """
    _check_style(style)
    logits = class_logits.astype(jnp.float32)
    valid = valid.astype(bool)
    num_valid = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    classes = classes.astype(jnp.int32)
    picked_logit = jnp.take_along_axis(logits, classes[..., None], axis=-1)[..., 0]
    cross_entropy = jax.nn.logsumexp(logits, axis=-1) - picked_logit
    codes = _per_class_deltas(box_deltas.astype(jnp.float32), logits.shape[-1])
    codes = jnp.take_along_axis(codes, classes[..., None, None], axis=-2)[..., 0, :]
    foreground = valid & (classes > 0)
    if style == "torchvision":
        box = jnp.sum(jnp.where(foreground[..., None], smooth_l1(codes - box_targets, beta), 0.0)) / num_valid
    else:
        count = 4.0 * jnp.sum(foreground).astype(jnp.float32)
        box = jnp.sum(jnp.where(foreground[..., None], huber(codes - box_targets, beta), 0.0)) / (count + 0.01)
    return {
        "fast_rcnn_class_loss": jnp.sum(jnp.where(valid, cross_entropy, 0.0)) / num_valid,
        "fast_rcnn_box_loss": box,
    }
