"""Anchors and the box coder against NumPy references and TF Model Garden."""

import math

import numpy as np
import pytest

from scaledet_jax.ops import anchors as anchor_ops
from scaledet_jax.ops import box_coder


def numpy_reference_anchors(level, num_scales, ratios, anchor_size, image_size, stride=None):
    """Written out anchor by anchor, independent of the vectorised implementation."""
    h, w = image_size
    stride = 2**level if stride is None else stride
    fh, fw = math.ceil(h / stride), math.ceil(w / stride)
    sy, sx = h / fh, w / fw
    out = np.zeros((fh, fw, num_scales * len(ratios) * 4))
    for i in range(fh):
        for j in range(fw):
            cy, cx = sy * i + sy / 2, sx * j + sx / 2
            k = 0
            for s in range(num_scales):
                for r in ratios:
                    size = anchor_size * 2**level * 2 ** (s / num_scales)
                    ah, aw = size / math.sqrt(r), size * math.sqrt(r)
                    out[i, j, 4 * k : 4 * k + 4] = [cy - ah / 2, cx - aw / 2, cy + ah / 2, cx + aw / 2]
                    k += 1
    return out


@pytest.mark.parametrize("image_size", [(256, 256), (384, 256)])
def test_anchors_match_numpy_reference(image_size):
    got = anchor_ops.multilevel_anchors(3, 7, 3, [0.5, 1.0, 2.0], 3.0, image_size)
    for level, boxes in got.items():
        ref = numpy_reference_anchors(level, 3, [0.5, 1.0, 2.0], 3.0, image_size)
        assert boxes.shape == ref.shape
        np.testing.assert_allclose(boxes, ref, rtol=1e-6, atol=1e-3)


def test_anchors_with_explicit_strides_match_numpy_reference():
    """DetNet's levels 4..6 share stride 16: the grid follows the stride, the anchor size the level."""
    for level, stride in ((2, 4), (4, 16), (5, 16), (6, 16)):
        got = anchor_ops.level_anchors(level, 1, [0.5, 1.0, 2.0], 8.0, (96, 128), stride=stride)
        ref = numpy_reference_anchors(level, 1, [0.5, 1.0, 2.0], 8.0, (96, 128), stride=stride)
        assert got.shape == ref.shape == (math.ceil(96 / stride), 128 // stride, 12)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-4)
    # The default is 2**level.
    np.testing.assert_array_equal(
        anchor_ops.level_anchors(5, 1, [1.0], 8.0, (128, 128), stride=32),
        anchor_ops.level_anchors(5, 1, [1.0], 8.0, (128, 128)),
    )


def test_anchors_match_model_garden():
    from official.vision.ops import anchor as tf_anchor

    kwargs = dict(min_level=3, max_level=7, num_scales=3, aspect_ratios=[0.5, 1.0, 2.0], anchor_size=4.0)
    ref = tf_anchor.Anchor(image_size=[640, 512], **kwargs).multilevel_boxes
    got = anchor_ops.multilevel_anchors(image_size=(640, 512), **kwargs)
    for level in range(3, 8):
        np.testing.assert_allclose(got[level], ref[str(level)].numpy(), rtol=1e-6, atol=1e-3)


def test_flatten_levels_order():
    per_level = anchor_ops.multilevel_anchors(3, 4, 1, [1.0], 2.0, (64, 64))
    flat = anchor_ops.flatten_levels(per_level)
    assert flat.shape == (8 * 8 + 4 * 4, 4)
    np.testing.assert_array_equal(flat[0], per_level[3][0, 0])
    np.testing.assert_array_equal(flat[64], per_level[4][0, 0])
    np.testing.assert_array_equal(flat[9], per_level[3][1, 1])


def _random_boxes(rng, n, size=500.0, min_side=8.0):
    # Sides within 31x of each other stay inside the decoder's log(1000 / 16) size clip.
    yx = rng.uniform(0, size, (n, 2))
    hw = rng.uniform(min_side, size / 2, (n, 2))
    return np.concatenate([yx, yx + hw], axis=1).astype(np.float32)


@pytest.mark.parametrize("weights", [None, (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_round_trip(weights):
    rng = np.random.RandomState(0)
    boxes, anchors = _random_boxes(rng, 1000), _random_boxes(rng, 1000)
    codes = box_coder.encode_boxes(boxes, anchors, weights)
    decoded = np.asarray(box_coder.decode_boxes(codes, anchors, weights))
    np.testing.assert_allclose(decoded, boxes, atol=1e-3)


def test_decode_clips_huge_size_changes():
    anchors = np.array([[0.0, 0.0, 10.0, 10.0]], np.float32)
    decoded = np.asarray(box_coder.decode_boxes(np.array([[0.0, 0.0, 20.0, 1.0]], np.float32), anchors))
    np.testing.assert_allclose(decoded[0, 2] - decoded[0, 0], 10.0 * 1000.0 / 16.0, rtol=1e-5)
    np.testing.assert_allclose(decoded[0, 3] - decoded[0, 1], 10.0 * np.e, rtol=1e-5)


def test_box_coder_matches_model_garden():
    import tensorflow as tf
    from official.vision.ops import box_ops
    from official.vision.utils.object_detection import box_list, faster_rcnn_box_coder

    rng = np.random.RandomState(1)
    boxes, anchors = _random_boxes(rng, 500), _random_boxes(rng, 500)
    ref = (
        faster_rcnn_box_coder.FasterRcnnBoxCoder()
        .encode(box_list.BoxList(tf.constant(boxes)), box_list.BoxList(tf.constant(anchors)))
        .numpy()
    )
    np.testing.assert_allclose(np.asarray(box_coder.encode_boxes(boxes, anchors)), ref, rtol=1e-5, atol=1e-5)

    codes = rng.randn(500, 4).astype(np.float32)
    codes[:5, 2:] = 9.0  # exercises the log-size clip
    ref = box_ops.decode_boxes(tf.constant(codes), tf.constant(anchors)).numpy()
    np.testing.assert_allclose(np.asarray(box_coder.decode_boxes(codes, anchors)), ref, rtol=1e-5, atol=1e-3)
