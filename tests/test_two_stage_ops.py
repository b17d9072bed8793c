"""Two-stage ops (anchors, RPN targets, proposals, RoI sampling, detections, losses) against torchvision
modules and NumPy references written with loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from scaledet_jax.ops import anchors as anchor_ops
from scaledet_jax.ops import two_stage

TV_SIZES = ((32,), (64,), (128,), (256,), (512,))
TV_RATIOS = ((0.5, 1.0, 2.0),) * 5  # torchvision: height / width
OUR_RATIOS = (2.0, 1.0, 0.5)  # ours: width / height, same order
TV_ANCHOR_OPTIONS = {"center_offset": 0.0, "round_base": True, "integer_stride": True}


def _xy(boxes):
    """[ymin, xmin, ymax, xmax] <-> [x1, y1, x2, y2] (and [ty, tx, th, tw] <-> [dx, dy, dw, dh])."""
    return np.asarray(boxes)[..., [1, 0, 3, 2]]


def _torch(array):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array, np.float32)))


def _tv_anchors(image_size):
    generator = AnchorGenerator(TV_SIZES, TV_RATIOS)
    features = [
        torch.zeros(1, 1, -(-image_size[0] // 2**level), -(-image_size[1] // 2**level)) for level in range(2, 7)
    ]
    images = ImageList(torch.zeros(1, 3, *image_size), [tuple(image_size)])
    return generator(images, features)[0].numpy()


def _our_anchors(image_size):
    return anchor_ops.multilevel_anchors(2, 6, 1, OUR_RATIOS, 8.0, image_size, **TV_ANCHOR_OPTIONS)


def _random_boxes(rng, n, size=128.0, min_side=6.0, max_side=70.0):
    yx = rng.uniform(0, size - min_side, (n, 2))
    hw = rng.uniform(min_side, max_side, (n, 2))
    return np.concatenate([yx, np.minimum(yx + hw, size)], 1).astype(np.float32)


def _jittered(rng, gt, n, scale=0.15):
    """n boxes around randomly chosen gt boxes (many overlap a gt by IoU >= 0.5)."""
    base = gt[rng.randint(0, len(gt), n)]
    hw = np.concatenate([base[:, 2:] - base[:, :2]] * 2, 1)
    return (base + rng.normal(0, scale, (n, 4)) * hw).astype(np.float32)


def numpy_iou(a, b):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            ih = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            iw = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - ih * iw
            out[i, j] = ih * iw / union if union > 0 else 0.0
    return out


def numpy_matcher(iou, valid, high, low, low_quality):
    """torchvision's Matcher written out with loops over an [N, M] matrix with valid columns."""
    num, cols = iou.shape[0], [j for j in range(iou.shape[1]) if valid[j]]
    if not cols:
        return np.full(num, -1)
    best_gt = np.zeros(num, int)
    out = np.zeros(num, int)
    for i in range(num):
        best, arg = -1.0, -1
        for j in cols:
            if iou[i, j] > best:
                best, arg = iou[i, j], j
        best_gt[i] = arg
        out[i] = arg if best >= high else (-1 if best < low else -2)
    if low_quality:
        for j in cols:
            highest = max(iou[i, j] for i in range(num))
            if highest <= 0:  # documented deviation: a gt overlapping nothing makes no matches
                continue
            for i in range(num):
                if iou[i, j] == highest:
                    out[i] = best_gt[i]
    return out


# ----------------------------------------------------------------------------------------- anchors


@pytest.mark.parametrize("image_size", [(128, 128), (96, 128), (160, 128)])
def test_anchors_match_torchvision_anchor_generator(image_size):
    # 160 px: P6 is a 3-cell grid whose stride torchvision floors (160 // 3 = 53): integer_stride.
    ours = _our_anchors(image_size)
    got = anchor_ops.flatten_levels(ours)
    ref = _xy(_tv_anchors(image_size))
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    # the Model Garden defaults are a different layout (offset centres, unrounded sizes)
    default = anchor_ops.flatten_levels(anchor_ops.multilevel_anchors(2, 6, 1, OUR_RATIOS, 8.0, image_size))
    assert np.abs(default - ref).max() >= 0.5 * 4


# ----------------------------------------------------------------------------------------- matcher


@pytest.fixture(scope="module")
def rpn_case():
    rng = np.random.RandomState(0)
    anchors = anchor_ops.flatten_levels(_our_anchors((128, 128)))
    gt = _random_boxes(rng, 5, max_side=60.0)
    # tie case: a box centred half-way between P2 anchor centres gives several anchors the same IoU
    gt[4] = [12.0, 46.0, 32.0, 76.0]
    crowd_box = np.array([[70.0, 4.0, 120.0, 40.0]], np.float32)
    boxes = np.concatenate([gt, crowd_box, np.zeros((2, 4), np.float32)])  # 5 gt, 1 crowd, 2 padded
    valid = np.array([True] * 6 + [False] * 2)
    crowd = np.array([False] * 5 + [True] + [False] * 2)
    return anchors, gt, boxes, valid, crowd


@pytest.mark.parametrize("low_quality", [True, False])
def test_match_boxes_matches_numpy_and_torchvision(rpn_case, low_quality):
    anchors, gt, boxes, valid, crowd = rpn_case
    iou = numpy_iou(anchors, boxes).astype(np.float32)
    usable = valid & ~crowd
    got = np.asarray(two_stage.match_boxes(jnp.asarray(iou), jnp.asarray(usable), 0.7, 0.3, low_quality))
    np.testing.assert_array_equal(got, numpy_matcher(iou, usable, 0.7, 0.3, low_quality))
    tv = det_utils.Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)(_torch(iou[:, :5].T)).numpy()
    np.testing.assert_array_equal(got, tv)
    if low_quality:  # the tie case is exercised: several anchors share gt 4's highest IoU
        assert np.sum(iou[:, 4] == iou[:, 4].max()) >= 2 and iou[:, 4].max() < 0.7
        assert np.sum(got >= 0) > np.sum(iou[:, :5].max(1) >= 0.7)


def test_match_boxes_edge_cases():
    iou = jnp.asarray(np.random.RandomState(1).uniform(0, 1, (20, 3)).astype(np.float32))
    none = two_stage.match_boxes(iou, jnp.zeros(3, bool), 0.7, 0.3, True)
    np.testing.assert_array_equal(np.asarray(none), -1)
    # a low-quality match keeps the row's own best gt: row 0 is gt 0's best anchor but overlaps gt 1 more
    iou = np.array([[0.4, 0.5], [0.1, 0.65], [0.0, 0.2]], np.float32)
    got = np.asarray(two_stage.match_boxes(jnp.asarray(iou), jnp.ones(2, bool), 0.7, 0.3, True))
    np.testing.assert_array_equal(got, [1, 1, -1])
    np.testing.assert_array_equal(got, det_utils.Matcher(0.7, 0.3, True)(_torch(iou.T)).numpy())
    # a gt that overlaps nothing makes no low-quality matches (torchvision would match every row)
    iou = jnp.zeros((10, 1))
    np.testing.assert_array_equal(np.asarray(two_stage.match_boxes(iou, jnp.ones(1, bool), 0.7, 0.3, True)), -1)


# ----------------------------------------------------------------------------------------- RPN targets


@pytest.fixture(scope="module")
def tv_rpn():
    return RegionProposalNetwork(
        AnchorGenerator(TV_SIZES, TV_RATIOS),
        RPNHead(4, 3),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": 200, "testing": 200},
        post_nms_top_n={"training": 100, "testing": 100},
        nms_thresh=0.7,
    ).eval()


@functools.lru_cache
def _rpn_targets_fn(**kwargs):
    return jax.jit(functools.partial(two_stage.rpn_targets, **kwargs))


def test_rpn_targets_match_torchvision(rpn_case, tv_rpn):
    anchors, gt, boxes, valid, crowd = rpn_case
    out = _rpn_targets_fn()(anchors, boxes, valid, crowd, jax.random.key(0))
    labels, matched, targets = (np.asarray(out[k]) for k in ("labels", "matched", "box_targets"))

    tv_labels, tv_matched_boxes = tv_rpn.assign_targets_to_anchors([_torch(_xy(anchors))], [{"boxes": _torch(_xy(gt))}])
    tv_labels = tv_labels[0].numpy()
    # the crowd box only turns negatives near it (IoU >= 0.3) into ignored anchors
    near_crowd = numpy_iou(anchors, boxes[5:6])[:, 0] >= 0.3
    expected = np.where((tv_labels == 0) & near_crowd, -1, tv_labels)
    assert np.sum((tv_labels == 0) & near_crowd) > 0
    np.testing.assert_array_equal(np.where(matched >= 0, 1, np.where(matched == -1, 0, -1)), expected)

    positive, negative = matched >= 0, matched == -1
    num_pos = min(positive.sum(), 128)
    assert np.sum(labels == 1) == num_pos and np.sum(labels == 0) == min(negative.sum(), 256 - num_pos)
    assert np.all(positive[labels == 1]) and np.all(negative[labels == 0])

    tv_targets = tv_rpn.box_coder.encode_single(tv_matched_boxes[0], _torch(_xy(anchors))).numpy()
    sampled_pos = labels == 1
    np.testing.assert_allclose(targets[sampled_pos], _xy(tv_targets)[sampled_pos], atol=1e-4)
    assert np.all(targets[~sampled_pos] == 0)
    assert np.all(matched < 5)  # never the crowd box or a padded slot


def test_rpn_sampler_counts_randomness_and_uniformity(rpn_case):
    anchors, _, boxes, valid, crowd = rpn_case
    fn = _rpn_targets_fn(batch_size_per_image=32, positive_fraction=0.5)
    draws = 400
    out = jax.vmap(fn, in_axes=(None, None, None, None, 0))(
        anchors, boxes, valid, crowd, jax.random.split(jax.random.key(1), draws)
    )
    labels, matched = np.asarray(out["labels"]), np.asarray(out["matched"][0])
    positive, negative = matched >= 0, matched == -1
    assert positive.sum() > 16  # positives are subsampled too
    assert np.all(np.sum(labels == 1, 1) == 16) and np.all(np.sum(labels == 0, 1) == 16)
    assert np.all(positive[None] | (labels != 1)) and np.all(negative[None] | (labels != 0))
    assert len({row.tobytes() for row in labels}) == draws  # different keys, different picks
    # each positive is picked with probability 16 / #positives
    freq = np.sum(labels == 1, 0)[positive]
    expected = draws * 16 / positive.sum()
    assert np.all(np.abs(freq - expected) < 5 * np.sqrt(expected))
    chi2 = np.sum((freq - expected) ** 2 / expected)
    assert chi2 < positive.sum() + 5 * np.sqrt(2 * positive.sum())
    # negatives: uniform over the candidates, counted in 8 index groups (no bias to low indices)
    neg_index = np.flatnonzero(negative)
    groups = np.array_split(neg_index, 8)
    picks = np.sum(labels == 0, 0)
    counts = np.array([picks[g].sum() for g in groups])
    expected = draws * 16 * np.array([len(g) for g in groups]) / len(neg_index)
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_rpn_targets_without_ground_truth(rpn_case):
    anchors = rpn_case[0]
    out = _rpn_targets_fn()(anchors, jnp.zeros((3, 4)), jnp.zeros(3, bool), jnp.zeros(3, bool), jax.random.key(2))
    assert np.all(np.asarray(out["matched"]) == -1)
    labels = np.asarray(out["labels"])
    assert np.sum(labels == 0) == 256 and np.sum(labels == 1) == 0
    assert np.all(np.asarray(out["box_targets"]) == 0)


# ----------------------------------------------------------------------------------------- proposals


def _rpn_outputs(rng, image_size, batch=2, num_anchors=3):
    anchors = _our_anchors(image_size)
    objectness, deltas = {}, {}
    total = sum(v.shape[0] * v.shape[1] * num_anchors for v in anchors.values())
    logits = np.stack([rng.permutation(total) for _ in range(batch)]) * (12.0 / total) - 6.0  # distinct scores
    start = 0
    for level, grid in anchors.items():
        h, w = grid.shape[:2]
        n = h * w * num_anchors
        objectness[level] = logits[:, start : start + n].reshape(batch, h, w, num_anchors).astype(np.float32)
        codes = rng.normal(0, 0.3, (batch, h, w, num_anchors, 4))
        codes[..., 2:] += np.where(rng.uniform(size=(batch, h, w, num_anchors, 1)) < 0.05, -12.0, 0.0)  # tiny
        deltas[level] = codes.reshape(batch, h, w, num_anchors * 4).astype(np.float32)
        start += n
    return anchors, objectness, deltas


def _flat(per_level, batch, size):
    return np.concatenate([v.reshape(batch, -1, size) for _, v in sorted(per_level.items())], 1)


@pytest.fixture(scope="module")
def proposal_case():
    rng = np.random.RandomState(3)
    image_sizes = [(128, 128), (100, 120)]  # the second image is padded into the 128 x 128 batch
    anchors, objectness, deltas = _rpn_outputs(rng, (128, 128))
    batch = 2
    flat_anchors = anchor_ops.flatten_levels(anchors)
    flat_logits = _flat(objectness, batch, 1)[..., 0]
    flat_deltas = _flat(deltas, batch, 4)
    num_per_level = [v.shape[0] * v.shape[1] * 3 for _, v in sorted(anchors.items())]
    return anchors, objectness, deltas, image_sizes, flat_anchors, flat_logits, flat_deltas, num_per_level


@pytest.mark.parametrize("score_threshold", [0.0, 0.997])
def test_generate_proposals_match_torchvision_filter_proposals(proposal_case, tv_rpn, score_threshold):
    anchors, objectness, deltas, image_sizes, flat_anchors, flat_logits, flat_deltas, num_per_level = proposal_case
    fn = jax.jit(
        functools.partial(
            two_stage.generate_proposals,
            pre_nms_top_k=200,
            post_nms_top_k=100,
            nms_iou=0.7,
            score_threshold=score_threshold,
        )
    )
    boxes, scores, valid = (np.asarray(x) for x in fn(objectness, deltas, anchors, jnp.asarray(image_sizes)))
    assert boxes.shape == (2, 100, 4) and scores.shape == (2, 100) and valid.shape == (2, 100)

    tv_rpn.score_thresh = score_threshold
    batch = flat_logits.shape[0]
    tv_boxes = tv_rpn.box_coder.decode(_torch(_xy(flat_deltas.reshape(-1, 4))), [_torch(_xy(flat_anchors))] * batch)
    tv_out, tv_scores = tv_rpn.filter_proposals(
        tv_boxes.view(batch, -1, 4), _torch(flat_logits), image_sizes, num_per_level
    )
    for b in range(batch):
        n = len(tv_out[b])
        assert valid[b].sum() == n and np.all(valid[b, :n])
        np.testing.assert_allclose(boxes[b, :n], _xy(tv_out[b].numpy()), atol=1e-4)
        np.testing.assert_allclose(scores[b, :n], tv_scores[b].numpy(), atol=1e-5)
        assert np.all(boxes[b, n:] == 0) and np.all(scores[b, n:] == 0)
    if score_threshold == 0.0:
        assert all(len(t) == 100 for t in tv_out)  # the cap binds
    else:
        assert all(len(t) < 100 for t in tv_out)  # the threshold binds: padding is exercised


def test_generate_proposals_across_levels_nms(proposal_case):
    """per_level_nms=False: one NMS over all levels (torchvision.ops.nms on the same filtered candidates)."""
    import torchvision

    anchors, objectness, deltas, image_sizes, flat_anchors, flat_logits, flat_deltas, num_per_level = proposal_case
    fn = functools.partial(
        two_stage.generate_proposals, image_size=(128, 128), pre_nms_top_k=200, post_nms_top_k=100, per_level_nms=False
    )
    boxes, scores, valid = jax.jit(fn)(objectness, deltas, anchors)
    coder = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
    for b in range(2):
        cand, cand_scores, start = [], [], 0
        for n in num_per_level:
            logit = torch.from_numpy(flat_logits[b, start : start + n])
            top, index = logit.topk(min(200, n))
            codes = _torch(_xy(flat_deltas[b, start : start + n]))[index]
            cand.append(coder.decode_single(codes, _torch(_xy(flat_anchors[start : start + n]))[index]))
            cand_scores.append(torch.sigmoid(top))
            start += n
        cand = torchvision.ops.clip_boxes_to_image(torch.cat(cand), (128, 128))
        cand_scores = torch.cat(cand_scores)
        keep = torchvision.ops.remove_small_boxes(cand, 1e-3)
        cand, cand_scores = cand[keep], cand_scores[keep]
        keep = torchvision.ops.nms(cand, cand_scores, 0.7)[:100]
        n = len(keep)
        assert int(np.sum(valid[b])) == n
        np.testing.assert_allclose(np.asarray(boxes[b, :n]), _xy(cand[keep].numpy()), atol=1e-4)
        np.testing.assert_allclose(np.asarray(scores[b, :n]), cand_scores[keep].numpy(), atol=1e-5)


# ----------------------------------------------------------------------------------------- RoI sampling


def numpy_roi_labels(candidates, cand_valid, gt, usable, fg_iou=0.5, bg_high=0.5, bg_low=0.0):
    iou = numpy_iou(candidates, gt)
    fg, bg, matched = np.zeros(len(candidates), bool), np.zeros(len(candidates), bool), np.zeros(len(candidates), int)
    for i in range(len(candidates)):
        best, arg = 0.0, 0
        for j in range(len(gt)):
            if usable[j] and iou[i, j] > best:
                best, arg = iou[i, j], j
        matched[i] = arg
        fg[i] = cand_valid[i] and best >= fg_iou
        bg[i] = cand_valid[i] and not fg[i] and bg_low <= best < bg_high
    return fg, bg, matched


@pytest.fixture(scope="module")
def roi_case():
    rng = np.random.RandomState(4)
    gt = _random_boxes(rng, 4, min_side=16.0)
    crowd_box = np.array([[60.0, 60.0, 120.0, 120.0]], np.float32)
    gt_boxes = np.concatenate([gt, crowd_box, np.zeros((1, 4), np.float32)])
    gt_classes = np.array([3, 1, 7, 2, 5, 0])
    gt_valid = np.array([True] * 5 + [False])
    gt_crowd = np.array([False] * 4 + [True, False])
    proposals = np.concatenate([_jittered(rng, gt_boxes[:5], 150), _random_boxes(rng, 130)])
    proposal_valid = np.ones(len(proposals), bool)
    proposal_valid[-20:] = False  # padding
    proposals[-20:] = _jittered(rng, gt, 20, scale=0.02)  # padded slots would be foreground if not masked
    return proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_crowd


@functools.lru_cache
def _sample_rois_fn(**kwargs):
    return jax.jit(functools.partial(two_stage.sample_rois, **kwargs))


@pytest.mark.parametrize("add_ground_truth", [True, False])
def test_sample_rois_matches_numpy_reference(roi_case, add_ground_truth):
    proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_crowd = roi_case
    out = _sample_rois_fn(num_samples=64, add_ground_truth=add_ground_truth)(
        proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_crowd, jax.random.key(5)
    )
    out = {k: np.asarray(v) for k, v in out.items()}
    usable = gt_valid & ~gt_crowd
    candidates, cand_valid = proposals, proposal_valid
    if add_ground_truth:
        candidates = np.concatenate([proposals, gt_boxes])
        cand_valid = np.concatenate([proposal_valid, usable])
    fg, bg, matched = numpy_roi_labels(candidates, cand_valid, gt_boxes, usable)
    assert fg.sum() > 16 and bg.sum() > 48

    # the torchvision sampler draws the same counts from the same labels
    labels = np.where(fg, 1, np.where(bg, 0, -1))
    tv_pos, tv_neg = det_utils.BalancedPositiveNegativeSampler(64, 0.25)([torch.from_numpy(labels)])
    num_fg, num_bg = int(tv_pos[0].sum()), int(tv_neg[0].sum())
    assert out["foreground"].sum() == num_fg == 16 and out["valid"].sum() == num_fg + num_bg == 64
    np.testing.assert_array_equal(out["foreground"], np.arange(64) < 16)

    # every sample is a distinct eligible candidate with the reference's class and gt
    index = [int(np.flatnonzero(np.all(candidates == roi, 1))[0]) for roi in out["rois"]]
    assert len(set(index)) == 64
    assert np.all(fg[index[:16]]) and np.all(bg[index[16:]])
    np.testing.assert_array_equal(out["matched_gt"][:16], matched[index[:16]])
    np.testing.assert_array_equal(out["classes"], np.where(out["foreground"], gt_classes[matched[index]], 0))
    assert not np.any(gt_crowd[out["matched_gt"][:16]])

    tv_targets = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)).encode_single(
        _torch(_xy(gt_boxes[out["matched_gt"][:16]])), _torch(_xy(out["rois"][:16]))
    )
    np.testing.assert_allclose(out["box_targets"][:16], _xy(tv_targets.numpy()), atol=1e-4)
    assert np.all(out["box_targets"][16:] == 0)


def test_sample_rois_pads_when_candidates_run_out(roi_case):
    proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_crowd = roi_case
    out = _sample_rois_fn(num_samples=512)(
        proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_crowd, jax.random.key(6)
    )
    out = {k: np.asarray(v) for k, v in out.items()}
    candidates = np.concatenate([proposals, gt_boxes])
    cand_valid = np.concatenate([proposal_valid, gt_valid & ~gt_crowd])
    fg, bg, _ = numpy_roi_labels(candidates, cand_valid, gt_boxes, gt_valid & ~gt_crowd)
    num_fg = min(fg.sum(), 128)
    assert out["foreground"].sum() == num_fg and out["valid"].sum() == num_fg + bg.sum() < 512
    n = out["valid"].sum()
    assert np.all(out["valid"][:n]) and not np.any(out["valid"][n:])
    assert np.all(out["rois"][n:] == 0) and np.all(out["classes"][n:] == 0)

    # no ground truth: every valid proposal is background
    out = _sample_rois_fn(num_samples=512)(
        proposals, proposal_valid, gt_boxes, gt_classes, np.zeros(6, bool), gt_crowd, jax.random.key(7)
    )
    assert int(out["valid"].sum()) == proposal_valid.sum() and not np.any(np.asarray(out["foreground"]))


def test_sample_rois_uniform_foreground(roi_case):
    proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_crowd = roi_case
    fn = _sample_rois_fn(num_samples=64, add_ground_truth=True)
    draws = 300
    out = jax.vmap(fn, in_axes=(None,) * 6 + (0,))(
        proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_crowd, jax.random.split(jax.random.key(8), draws)
    )
    candidates = np.concatenate([proposals, gt_boxes])
    cand_valid = np.concatenate([proposal_valid, gt_valid & ~gt_crowd])
    fg, _, _ = numpy_roi_labels(candidates, cand_valid, gt_boxes, gt_valid & ~gt_crowd)
    rois, foreground = np.asarray(out["rois"]), np.asarray(out["foreground"])
    counts = np.zeros(len(candidates))
    for d in range(draws):
        for roi in rois[d][foreground[d]]:
            counts[np.flatnonzero(np.all(candidates == roi, 1))[0]] += 1
    assert counts[~fg].sum() == 0
    expected = draws * 16 / fg.sum()
    assert np.all(np.abs(counts[fg] - expected) < 5 * np.sqrt(expected))


# ----------------------------------------------------------------------------------------- detections


@pytest.mark.parametrize("max_detections", [100, 20])
def test_fast_rcnn_detections_match_torchvision_postprocess(max_detections):
    rng = np.random.RandomState(9)
    batch, num_rois, num_classes = 2, 40, 6
    image_sizes = [(128, 128), (112, 128)]
    rois = np.stack([_random_boxes(rng, num_rois, min_side=8.0) for _ in range(batch)])
    rois[:, :3, 2:] = rois[:, :3, :2] + 0.005  # tiny rois: boxes below min_size
    roi_valid = np.ones((batch, num_rois), bool)
    roi_valid[0, 30:] = False
    logits = (rng.normal(0, 2.5, (batch, num_rois, num_classes))).astype(np.float32)
    deltas = rng.normal(0, 1.0, (batch, num_rois, num_classes * 4)).astype(np.float32)

    fn = jax.jit(functools.partial(two_stage.fast_rcnn_detections, max_detections=max_detections))
    out = fn(logits, deltas, rois, roi_valid, jnp.asarray(image_sizes))
    out = {k: np.asarray(v) for k, v in out.items()}

    heads = tv_roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, max_detections)
    counts = [int(v.sum()) for v in roi_valid]
    tv_deltas = _xy(deltas.reshape(batch, num_rois, num_classes, 4)).reshape(batch, num_rois, -1)
    tv_boxes, tv_scores, tv_labels = heads.postprocess_detections(
        _torch(np.concatenate([logits[b, : counts[b]] for b in range(batch)])),
        _torch(np.concatenate([tv_deltas[b, : counts[b]] for b in range(batch)])),
        [_torch(_xy(rois[b, : counts[b]])) for b in range(batch)],
        image_sizes,
    )
    for b in range(batch):
        n = len(tv_boxes[b])
        assert (
            (n == 20 if max_detections == 20 else 20 < n < 100)
            and out["valid"][b].sum() == n
            and np.all(out["valid"][b, :n])
        )
        np.testing.assert_allclose(out["boxes"][b, :n], _xy(tv_boxes[b].numpy()), atol=1e-4)
        np.testing.assert_allclose(out["scores"][b, :n], tv_scores[b].numpy(), atol=1e-5)
        np.testing.assert_array_equal(out["classes"][b, :n], tv_labels[b].numpy())
        assert len(set(tv_labels[b].tolist())) >= 3  # several classes pass the threshold


# ----------------------------------------------------------------------------------------- losses


def test_rpn_loss_matches_torchvision(tv_rpn):
    rng = np.random.RandomState(10)
    batch, num = 2, 500
    logits = rng.normal(0, 2, (batch, num)).astype(np.float32)
    deltas = rng.normal(0, 0.3, (batch, num, 4)).astype(np.float32)
    targets = rng.normal(0, 0.3, (batch, num, 4)).astype(np.float32)
    labels = np.full((batch, num), -1)
    for b in range(batch):  # few enough that torchvision's sampler keeps all of them
        order = rng.permutation(num)
        labels[b, order[: 20 + 10 * b]], labels[b, order[100 : 200 + 20 * b]] = 1, 0
    got = two_stage.rpn_loss(logits, deltas, labels, targets)
    tv_score, tv_box = tv_rpn.compute_loss(
        _torch(logits.reshape(-1, 1)),
        _torch(deltas.reshape(-1, 4)),
        [_torch(v) for v in labels],
        [_torch(v) for v in targets],
    )
    np.testing.assert_allclose(float(got["rpn_score_loss"]), tv_score.item(), rtol=1e-5)
    np.testing.assert_allclose(float(got["rpn_box_loss"]), tv_box.item(), rtol=1e-5)


def test_fast_rcnn_loss_matches_torchvision():
    rng = np.random.RandomState(11)
    batch, samples, num_classes = 2, 64, 5
    logits = rng.normal(0, 2, (batch, samples, num_classes)).astype(np.float32)
    deltas = rng.normal(0, 0.5, (batch, samples, num_classes * 4)).astype(np.float32)
    targets = rng.normal(0, 0.5, (batch, samples, 4)).astype(np.float32)
    classes = np.where(rng.uniform(size=(batch, samples)) < 0.3, rng.randint(1, num_classes, (batch, samples)), 0)
    valid = np.ones((batch, samples), bool)
    valid[0, 50:] = False  # padded samples: junk classes that must not count
    classes[0, 50:] = 3
    got = two_stage.fast_rcnn_loss(logits, deltas, classes, targets, valid)
    tv_cls, tv_box = tv_roi_heads.fastrcnn_loss(
        _torch(logits[valid]), _torch(deltas[valid]), [torch.from_numpy(classes[valid])], [_torch(targets[valid])]
    )
    np.testing.assert_allclose(float(got["fast_rcnn_class_loss"]), tv_cls.item(), rtol=1e-5)
    np.testing.assert_allclose(float(got["fast_rcnn_box_loss"]), tv_box.item(), rtol=1e-5)


def test_model_garden_loss_style_matches_model_gardens_losses():
    """style='model_garden' against tf-models-official's RpnScoreLoss / RpnBoxLoss / FastrcnnClassLoss /
    FastrcnnBoxLoss run on the same values (per-level RPN box normalisation included)."""
    import tensorflow as tf
    from official.vision.losses import maskrcnn_losses as mg

    rng = np.random.RandomState(12)
    batch, shapes = 2, {2: (8, 8, 3), 3: (4, 4, 3)}
    sizes = tuple(int(np.prod(s)) for s in shapes.values())
    num = sum(sizes)
    logits = rng.normal(0, 2, (batch, num)).astype(np.float32)
    deltas = rng.normal(0, 0.3, (batch, num, 4)).astype(np.float32)
    labels = rng.choice([-1, 0, 1], size=(batch, num), p=[0.6, 0.3, 0.1])
    targets = np.where((labels == 1)[..., None], rng.normal(0, 0.3, (batch, num, 4)), 0.0).astype(np.float32)
    got = two_stage.rpn_loss(logits, deltas, labels, targets, style="model_garden", level_sizes=sizes)
    split = (
        lambda x, last: {  # noqa: E731
            level: tf.constant(part.reshape((batch,) + shape[:2] + (shape[2] * last,)))
            for (level, shape), part in zip(shapes.items(), np.split(x, np.cumsum(sizes)[:-1], axis=1), strict=True)
        }
    )
    score = mg.RpnScoreLoss(256)(split(logits, 1), split(labels.astype(np.float32), 1))
    box = mg.RpnBoxLoss(1.0 / 9.0)(split(deltas, 4), split(targets, 4))
    np.testing.assert_allclose(float(got["rpn_score_loss"]), float(score), rtol=1e-5)
    np.testing.assert_allclose(float(got["rpn_box_loss"]), float(box), rtol=1e-5)

    samples, num_classes = 64, 5
    class_logits = rng.normal(0, 2, (batch, samples, num_classes)).astype(np.float32)
    box_deltas = rng.normal(0, 0.8, (batch, samples, num_classes * 4)).astype(np.float32)
    box_targets = rng.normal(0, 0.8, (batch, samples, 4)).astype(np.float32)
    classes = np.where(rng.uniform(size=(batch, samples)) < 0.3, rng.randint(1, num_classes, (batch, samples)), 0)
    got = two_stage.fast_rcnn_loss(
        class_logits, box_deltas, classes, box_targets, np.ones((batch, samples), bool), beta=1.0, style="model_garden"
    )
    mg_class = mg.FastrcnnClassLoss()(tf.constant(class_logits), tf.constant(classes.astype(np.float32)))
    mg_box = mg.FastrcnnBoxLoss(1.0)(tf.constant(box_deltas), tf.constant(classes), tf.constant(box_targets))
    np.testing.assert_allclose(float(got["fast_rcnn_class_loss"]), float(mg_class), rtol=1e-5)
    np.testing.assert_allclose(float(got["fast_rcnn_box_loss"]), float(mg_box), rtol=1e-5)
    with pytest.raises(ValueError, match="loss style"):
        two_stage.rpn_loss(logits, deltas, labels, targets, style="detectron")
