"""Matching, losses and NMS against NumPy references, Model Garden and torchvision."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from scaledet_jax.ops import box_coder, losses, matching, nms


def _boxes(rng, n, size=200.0):
    yx = rng.uniform(0, size, (n, 2))
    hw = rng.uniform(4, size / 2, (n, 2))
    return np.concatenate([yx, yx + hw], 1).astype(np.float32)


def numpy_iou(a, b):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            ih = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            iw = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = ih * iw
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union
    return out


def test_box_iou_matches_numpy_and_torchvision():
    rng = np.random.RandomState(0)
    a, b = _boxes(rng, 30), _boxes(rng, 20)
    got = np.asarray(matching.box_iou(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(got, numpy_iou(a, b), atol=1e-6)
    tv = torchvision.ops.box_iou(torch.from_numpy(a[:, [1, 0, 3, 2]]), torch.from_numpy(b[:, [1, 0, 3, 2]]))
    np.testing.assert_allclose(got, tv.numpy(), atol=1e-6)


def numpy_label(anchors, gt, classes, match=0.5, unmatched=0.4):
    """Model Garden's matcher written out with loops (force-match included)."""
    iou = numpy_iou(anchors, gt)
    matched = iou.argmax(1)
    best = iou.max(1)
    ind = np.where(best >= match, 1, np.where(best < unmatched, -1, -2))
    for j in range(len(gt)):  # later columns do not override the first one with the same best row
        i = iou[:, j].argmax()
        if not any(iou[:, k].argmax() == i for k in range(j)):
            matched[i], ind[i] = j, 1
    cls = np.where(ind == 1, classes[matched], -1)
    return cls, ind, matched


def test_label_anchors_matches_reference_with_padding():
    rng = np.random.RandomState(1)
    anchors, gt = _boxes(rng, 300), _boxes(rng, 5)
    classes = np.array([3, 1, 2, 7, 5])
    pad = 3  # padded slots must be invisible
    gt_padded = np.concatenate([gt, np.zeros((pad, 4), np.float32)])
    classes_padded = np.concatenate([classes, np.zeros(pad, int)])
    valid = np.array([True] * 5 + [False] * pad)
    out = matching.label_anchors(
        jnp.asarray(anchors),
        jnp.asarray(gt_padded),
        jnp.asarray(classes_padded),
        jnp.asarray(valid),
        match_threshold=0.5,
        unmatched_threshold=0.4,
    )
    cls, ind, matched = numpy_label(anchors, gt, classes)
    np.testing.assert_array_equal(np.asarray(out["cls_targets"]), cls)
    np.testing.assert_array_equal(np.asarray(out["box_weights"]), (ind == 1).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out["cls_weights"]), (ind != -2).astype(np.float32))
    positives = ind == 1
    expected = np.asarray(box_coder.encode_boxes(gt[matched[positives]], anchors[positives]))
    np.testing.assert_allclose(np.asarray(out["box_targets"])[positives], expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out["box_targets"])[~positives] == 0)


def test_label_anchors_matches_model_garden():
    import tensorflow as tf
    from official.vision.ops import anchor as tf_anchor

    rng = np.random.RandomState(2)
    anchors, gt = _boxes(rng, 200), _boxes(rng, 6)
    classes = rng.randint(1, 10, 6)
    labeler = tf_anchor.AnchorLabeler(match_threshold=0.5, unmatched_threshold=0.4)
    cls_t, box_t, _, cls_w, box_w = labeler.label_anchors(
        {"3": tf.constant(anchors.reshape(10, 20, 4))}, tf.constant(gt), tf.constant(classes[:, None])
    )
    out = matching.label_anchors(
        jnp.asarray(anchors),
        jnp.asarray(gt),
        jnp.asarray(classes),
        jnp.ones(6, bool),
        match_threshold=0.5,
        unmatched_threshold=0.4,
    )
    np.testing.assert_array_equal(np.asarray(out["cls_targets"]), cls_t["3"].numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(out["cls_weights"]), cls_w.numpy())
    np.testing.assert_array_equal(np.asarray(out["box_weights"]), box_w.numpy())
    np.testing.assert_allclose(
        np.asarray(out["box_targets"]) * box_w.numpy()[:, None],
        box_t["3"].numpy().reshape(-1, 4) * box_w.numpy()[:, None],
        rtol=1e-5,
        atol=1e-5,
    )


def test_no_ground_truth_means_all_negative():
    anchors = _boxes(np.random.RandomState(3), 50)
    out = matching.label_anchors(jnp.asarray(anchors), jnp.zeros((4, 4)), jnp.zeros(4, int), jnp.zeros(4, bool))
    assert np.all(np.asarray(out["cls_targets"]) == -1)
    assert np.all(np.asarray(out["cls_weights"]) == 1) and np.all(np.asarray(out["box_weights"]) == 0)


def test_crowd_boxes_ignore_instead_of_positive():
    anchors = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110]], np.float32)
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 61]], np.float32)
    out = matching.label_anchors(
        jnp.asarray(anchors),
        jnp.asarray(gt),
        jnp.array([1, 2]),
        jnp.array([True, True]),
        gt_crowd=jnp.array([False, True]),
    )
    np.testing.assert_array_equal(np.asarray(out["cls_targets"]), [1, -1, -1])
    np.testing.assert_array_equal(np.asarray(out["cls_weights"]), [1, 0, 1])
    np.testing.assert_array_equal(np.asarray(out["box_weights"]), [1, 0, 0])


def test_focal_loss_matches_model_garden():
    import tensorflow as tf
    from official.vision.losses import focal_loss

    rng = np.random.RandomState(4)
    logits = rng.normal(0, 3, (2, 50, 7)).astype(np.float32)
    targets = (rng.uniform(size=(2, 50, 7)) < 0.1).astype(np.float32)
    ref = (
        focal_loss.FocalLoss(alpha=0.25, gamma=1.5, reduction=tf.keras.losses.Reduction.NONE)
        .call(tf.constant(targets), tf.constant(logits))
        .numpy()
    )
    np.testing.assert_allclose(np.asarray(losses.sigmoid_focal_loss(logits, targets)), ref, rtol=1e-5, atol=1e-6)


def test_huber_matches_numpy():
    rng = np.random.RandomState(5)
    pred, target = rng.normal(0, 0.3, (100, 4)), rng.normal(0, 0.3, (100, 4))
    err = np.abs(pred - target)
    ref = np.where(err <= 0.1, 0.5 * err**2, 0.1 * err - 0.5 * 0.01)
    np.testing.assert_allclose(np.asarray(losses.huber_loss(pred, target, 0.1)), ref, rtol=1e-5, atol=1e-7)


def test_retinanet_loss_reductions():
    rng = np.random.RandomState(6)
    logits = rng.normal(size=(2, 30, 5)).astype(np.float32)
    boxes = rng.normal(size=(2, 30, 4)).astype(np.float32)
    cls_t = rng.choice([-1, 1, 3], (2, 30))
    box_t = rng.normal(size=(2, 30, 4)).astype(np.float32)
    cls_w = (rng.uniform(size=(2, 30)) > 0.1).astype(np.float32)
    box_w = (cls_t >= 0).astype(np.float32)
    out = losses.retinanet_loss(logits, boxes, cls_t, box_t, cls_w, box_w, num_classes=5)
    onehot = np.eye(5)[np.clip(cls_t, 0, None)] * (cls_t >= 0)[..., None]
    n = box_w.sum() + 1
    fl = np.asarray(losses.sigmoid_focal_loss(logits, onehot))
    np.testing.assert_allclose(out["cls_loss"], (fl * cls_w[..., None]).sum() / n, rtol=1e-5)
    hub = np.asarray(losses.huber_loss(boxes, box_t, 0.1)).mean(-1)
    np.testing.assert_allclose(out["box_loss"], (hub * box_w).sum() / n, rtol=1e-5)
    np.testing.assert_allclose(out["model_loss"], out["cls_loss"] + 50 * out["box_loss"], rtol=1e-6)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(threshold):
    rng = np.random.RandomState(7)
    boxes = _boxes(rng, 400, size=100.0)
    scores = rng.uniform(size=400).astype(np.float32)
    keep, valid = nms.nms(jnp.asarray(boxes), jnp.asarray(scores), threshold, 400)
    ours = np.asarray(keep)[np.asarray(valid)]
    ref = torchvision.ops.nms(torch.from_numpy(boxes[:, [1, 0, 3, 2]]), torch.from_numpy(scores), threshold).numpy()
    np.testing.assert_array_equal(ours, ref)
    keep, valid = nms.nms(jnp.asarray(boxes), jnp.asarray(scores), threshold, 10)  # truncated output
    np.testing.assert_array_equal(np.asarray(keep), ref[:10])


def test_batched_nms_matches_torchvision():
    rng = np.random.RandomState(8)
    boxes = _boxes(rng, 300, size=100.0)
    scores = rng.uniform(size=300).astype(np.float32)
    classes = rng.randint(0, 4, 300)
    keep, valid = nms.batched_nms(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(classes), 0.5, 300)
    ref = torchvision.ops.batched_nms(
        torch.from_numpy(boxes[:, [1, 0, 3, 2]]), torch.from_numpy(scores), torch.from_numpy(classes), 0.5
    ).numpy()
    np.testing.assert_array_equal(np.asarray(keep)[np.asarray(valid)], ref)


def test_nms_masked_scores_never_kept():
    boxes = jnp.asarray(_boxes(np.random.RandomState(9), 20))
    scores = jnp.where(jnp.arange(20) < 5, jnp.linspace(1, 2, 20), -jnp.inf)
    keep, valid = nms.nms(boxes, scores, 0.5, 20)
    assert set(np.asarray(keep)[np.asarray(valid)]) <= set(range(5))


@pytest.mark.parametrize("background_slot,category_ids", [(True, ()), (False, ()), (False, (7, 20, 31, 90))])
def test_generate_detections_class_layouts(background_slot, category_ids):
    from scaledet_jax.ops import detection

    # Two anchors; anchor 0 fires on output channel 2, anchor 1 on channel 0.
    anchors = jnp.asarray([[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 90.0, 90.0]])
    logits = np.full((1, 2, 4), -10.0, np.float32)
    logits[0, 0, 2], logits[0, 1, 0] = 5.0, 4.0
    out = detection.generate_detections(
        jnp.asarray(logits), jnp.zeros((1, 2, 4)), anchors, 128, 8, 0.05, 0.5, 4,
        background_slot=background_slot, category_ids=category_ids,
    )  # fmt: skip
    found = {
        int(c): tuple(np.asarray(b))
        for c, b, v in zip(out["classes"][0], out["boxes"][0], out["valid"][0], strict=True)
        if v
    }
    if background_slot:  # Model Garden: channel c is category c, channel 0 is never reported
        assert found == {2: (10.0, 10.0, 30.0, 30.0)}
    elif not category_ids:  # automl: channel c is category c + 1
        assert found == {3: (10.0, 10.0, 30.0, 30.0), 1: (50.0, 50.0, 90.0, 90.0)}
    else:  # mmdetection: channel c is category_ids[c]
        assert found == {31: (10.0, 10.0, 30.0, 30.0), 7: (50.0, 50.0, 90.0, 90.0)}


def test_category_ids_map_training_targets_to_outputs():
    from scaledet_jax.train import category_index_table

    table = np.asarray(category_index_table((1, 2, 4, 90)))
    assert table.shape == (91,) and list(table[[1, 2, 4, 90]]) == [0, 1, 2, 3]
    assert (np.delete(table, [1, 2, 4, 90]) == -1).all()  # other ids (and 0) have no output
    with pytest.raises(ValueError, match="background_slot=False"):
        from scaledet_jax.ops import detection

        detection.generate_detections(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)), jnp.zeros((2, 4)), 128,
                                      category_ids=(1, 2, 3, 4))  # fmt: skip


def _two_boxes_as_detections(anchors, image_size, **options):
    """Detections of two anchors decoded with zero deltas (boxes = anchors), both scored high in class 0."""
    from scaledet_jax.ops import detection

    batch = 1 if np.ndim(image_size) < 2 else len(image_size)
    logits = jnp.asarray([[[5.0], [4.0]]] * batch)
    return detection.generate_detections(
        logits, jnp.zeros(logits.shape[:2] + (4,)), jnp.asarray(anchors, jnp.float32), image_size,
        pre_nms_top_k=2, score_threshold=0.05, nms_iou_threshold=0.5, max_detections=2, background_slot=False,
        log_size_clip="both", **options,
    )  # fmt: skip


def test_plus_one_nms_compares_boxes_in_original_pixels_with_nms_scales():
    """mmdetection v1 divides its inclusive corners by the scale factor before NMS, and "+1" IoU is not scale
    invariant: boxes 10 px wide 3.2 px apart overlap by IoU 0.515 in input pixels ((10 - 3.2) / (10 + 3.2)) but
    0.486 after x / 0.25 (widths (10 - 1) / 0.25 + 1 = 37, shift 12.8: 24.2 / 49.8). At threshold 0.5 the second
    box is suppressed in the input frame and kept in the original one."""
    anchors = [[0.0, 0.0, 10.0, 10.0], [0.0, 3.2, 10.0, 13.2]]
    input_frame = _two_boxes_as_detections(anchors, 100, clip="plus_one")
    original_frame = _two_boxes_as_detections(anchors, 100, clip="plus_one", nms_scales=jnp.asarray([0.25]))
    assert int(input_frame["valid"].sum()) == 1 and int(original_frame["valid"].sum()) == 2
    # Returned boxes stay in input pixels either way.
    np.testing.assert_allclose(np.asarray(original_frame["boxes"][0]), anchors, atol=1e-5)
    # Plain boxes: IoU is scale invariant, nms_scales changes nothing.
    plain = _two_boxes_as_detections(anchors, 100, nms_scales=jnp.asarray([0.25]))
    assert int(plain["valid"].sum()) == 1


def test_detections_clip_to_each_images_own_size():
    """Per-image sizes [B, 2] (a keep-ratio resize's unpadded extents): each image's boxes clip to its own."""
    anchors = [[10.0, 20.0, 90.0, 95.0], [0.0, 0.0, 5.0, 5.0]]
    sizes = jnp.asarray([[50.0, 60.0], [100.0, 80.0]])
    out = _two_boxes_as_detections(anchors, sizes)
    np.testing.assert_allclose(np.asarray(out["boxes"][0, 0]), [10, 20, 50, 60], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["boxes"][1, 0]), [10, 20, 90, 80], atol=1e-5)
    plus_one = _two_boxes_as_detections(anchors, sizes, clip="plus_one")  # x1, y1 <= size - 1, x2, y2 <= size
    np.testing.assert_allclose(np.asarray(plus_one["boxes"][0, 0]), [10, 20, 50, 60], atol=1e-5)
    np.testing.assert_allclose(np.asarray(plus_one["boxes"][1, 1]), [0, 0, 5, 5], atol=1e-5)
