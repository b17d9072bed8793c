"""RoIAlign against torchvision: roi_align, MultiScaleRoIAlign and LevelMapper, values and gradients."""

import functools
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops.poolers import initLevelMapper

from scaledet_jax.ops.roi_align import assign_levels, multilevel_roi_align, roi_align

IMAGE = 128  # the "input image" the boxes live in
CHANNELS = 8
# Values are compared at 1e-5 absolute (they agree to ~1e-6: the sample coordinates are bit-identical). A gradient
# pixel sums many contributions w * cotangent in another order than torchvision's loop, so its float32 rounding
# error scales with the sum of their magnitudes (the gradient for |cotangent|), not with the (cancelling) result.
GRAD_RELATIVE_TO_MAGNITUDE = 4e-6

# Boxes [ymin, xmin, ymax, xmax] that stress the border rules.
SPECIAL_BOXES = [
    [0.0, 0.0, 128.0, 128.0],  # the whole image
    [-10.0, 100.0, 40.0, 150.0],  # crossing the top and right borders
    [-60.0, -60.0, -20.0, -30.0],  # fully outside (above-left)
    [140.0, 150.0, 200.0, 260.0],  # fully outside (below-right)
    [-3.0, -5.0, 3.0, 6.0],  # around the origin, partly outside
    [120.0, 125.0, 131.0, 133.0],  # around the far corner
    [50.0, 50.0, 50.0, 50.0],  # degenerate: a point
    [10.0, 20.0, 10.0, 60.0],  # degenerate: zero height
    [30.2, 40.7, 30.5, 41.0],  # tiny
    [60.0, 70.0, 40.0, 50.0],  # inverted
]


def _random_boxes(rng: np.random.RandomState, n: int) -> np.ndarray:
    """Boxes with log-uniform sizes 0.1..250 px anywhere in [-40, 170]^2, plus the special ones."""
    size = np.exp(rng.uniform(np.log(0.1), np.log(250.0), (n, 2)))
    start = rng.uniform(-40.0, 170.0, (n, 2)) - size / 2
    boxes = np.concatenate([start, start + size], axis=1)
    return np.concatenate([boxes, np.asarray(SPECIAL_BOXES)]).astype(np.float32)


def _to_torch_rois(boxes: np.ndarray) -> torch.Tensor:
    """[B, R, 4] (y1, x1, y2, x2) -> torchvision's [B * R, 5] (batch index, x1, y1, x2, y2)."""
    batch, num = boxes.shape[:2]
    index = np.repeat(np.arange(batch, dtype=np.float32), num)[:, None]
    return torch.from_numpy(np.concatenate([index, boxes.reshape(-1, 4)[:, [1, 0, 3, 2]]], axis=1))


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_()


def _torch_outputs(fn, features: list[torch.Tensor], cotangent: np.ndarray):
    """torchvision's output [B, R, P, P, C], feature gradients and their magnitudes (NHWC, for sum(out * ct))."""
    out = fn(features)
    cotangent = torch.from_numpy(cotangent.reshape(-1, *cotangent.shape[2:])).permute(0, 3, 1, 2)
    grads = torch.autograd.grad((out * cotangent).sum(), features, retain_graph=True)
    magnitudes = torch.autograd.grad((out * cotangent.abs()).sum(), features)  # bilinear weights are >= 0

    def nhwc(t):
        return t.detach().numpy().transpose(0, 2, 3, 1)

    batch = features[0].shape[0]
    out = nhwc(out).reshape(batch, -1, *nhwc(out).shape[1:])
    return out, [nhwc(g) for g in grads], [nhwc(m) for m in magnitudes]


def _ours(fn, features, cotangent):
    """Our output and feature gradient (JAX vjp) for sum(out * cotangent)."""
    out, vjp = jax.vjp(fn, features)
    return out, vjp(cotangent)[0]


def _assert_gradient_close(got, expected, magnitude, message):
    error = np.abs(np.asarray(got) - expected)
    tolerance = 1e-5 + GRAD_RELATIVE_TO_MAGNITUDE * magnitude
    worst = np.unravel_index(np.argmax(error - tolerance), error.shape)
    assert (error <= tolerance).all(), f"{message}: error {error[worst]:.3g} > {tolerance[worst]:.3g} at {worst}"


@functools.partial(jax.jit, static_argnames=("output_size", "sampling_ratio", "aligned"))
def _roi_align_and_vjp(features, boxes, spatial_scale, cotangent, output_size, sampling_ratio, aligned):
    """Compiled once per (output_size, sampling_ratio, aligned): the spatial scale is a traced argument."""
    return _ours(
        lambda f: roi_align(f, boxes, spatial_scale, output_size, sampling_ratio, aligned), features, cotangent
    )


# Every pair of (aligned, sampling_ratio, output_size) values occurs (a pairwise design: the full product
# costs twice the compile time), plus the box (7) and mask (14) heads at sampling 2 either way.
CONFIGS = [(False, 1, 7), (True, 1, 14), (False, 2, 14), (True, 2, 7), (False, 3, 7), (True, 3, 14)]
CONFIGS += [(False, 2, 7), (True, 2, 14)]


@pytest.mark.parametrize("aligned, sampling_ratio, output_size", CONFIGS)
def test_roi_align_matches_torchvision(aligned, sampling_ratio, output_size):
    rng = np.random.RandomState(sampling_ratio * 10 + output_size + aligned)
    size = 16  # the feature map of a (16 * stride)^2 image: one shape, one compilation, for all strides
    for stride in (4, 8, 16, 32):
        boxes = np.stack([_random_boxes(rng, 30), _random_boxes(rng, 30)])  # [2, 40, 4] on a 128 px image
        boxes = (boxes * (size * stride / IMAGE)).astype(np.float32)  # on the (16 * stride)^2 image
        features = rng.normal(size=(2, size, size, CHANNELS)).astype(np.float32)
        cotangent = rng.normal(size=(2, boxes.shape[1], output_size, output_size, CHANNELS)).astype(np.float32)

        rois = _to_torch_rois(boxes)
        expected, (expected_grad,), (magnitude,) = _torch_outputs(
            lambda f, rois=rois, stride=stride: torchvision.ops.roi_align(
                f[0], rois, output_size, 1.0 / stride, sampling_ratio, aligned
            ),
            [_nchw(features)],
            cotangent,
        )
        got, grad = _roi_align_and_vjp(
            features,
            boxes,
            1.0 / stride,
            cotangent,
            output_size=output_size,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
        assert np.abs(expected).max() > 0.1 and np.abs(expected_grad).max() > 0.1  # non-trivial comparison
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0, err_msg=f"values, stride {stride}")
        _assert_gradient_close(grad, expected_grad, magnitude, f"gradient, stride {stride}")


def test_samples_exactly_on_the_validity_border_match_torchvision():
    """Samples at exactly y = -1 or y = H still count (the last pixel / pixel 0); just beyond, they are 0."""
    rng = np.random.RandomState(5)
    features = rng.normal(size=(1, 16, 16, CHANNELS)).astype(np.float32)
    # One sample per box (output 1, sampling 1) at the box centre, feature scale 1.
    centres = [(16.0, 5.0), (-1.0, 7.0), (3.0, 16.0), (9.0, -1.0), (16.0, 16.0), (-1.0, -1.0), (16.5, 5.0), (3.0, -1.5)]
    boxes = np.asarray([[[y - 1, x - 1, y + 1, x + 1] for y, x in centres]], np.float32)
    expected = torchvision.ops.roi_align(_nchw(features), _to_torch_rois(boxes), 1, 1.0, 1, False)
    expected = expected.detach().numpy().reshape(len(centres), CHANNELS)
    got = jax.jit(roi_align, static_argnums=(2, 3, 4))(jnp.asarray(features), jnp.asarray(boxes), 1.0, 1, 1)
    got = np.asarray(got).reshape(len(centres), CHANNELS)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(expected[0], features[0, 15, 5])  # y = H reads the last row
    np.testing.assert_array_equal(expected[5], features[0, 0, 0])  # y = x = -1 read pixel (0, 0)
    np.testing.assert_array_equal(expected[6:], 0.0)  # beyond: no contribution


@pytest.fixture(scope="module")
def pyramid():
    """Two images' P2..P5 of a 128x128 input and boxes that land on every level (some across borders)."""
    rng = np.random.RandomState(0)
    features = {
        level: rng.normal(size=(2, IMAGE >> level, IMAGE >> level, CHANNELS)).astype(np.float32)
        for level in range(2, 6)
    }
    per_level = []
    for lo, hi in ((4.0, 100.0), (120.0, 210.0), (230.0, 440.0), (460.0, 700.0)):  # sqrt(area) ranges of P2..P5
        scale, aspect = rng.uniform(lo, hi, (2, 6, 1)), np.exp(rng.uniform(-0.4, 0.4, (2, 6, 1)))
        side = np.concatenate([scale * aspect, scale / aspect], axis=-1)
        center = rng.uniform(0.0, IMAGE, (2, 6, 2))
        per_level.append(np.concatenate([center - side / 2, center + side / 2], axis=-1))
    boxes = np.concatenate(per_level + [np.stack([np.asarray(SPECIAL_BOXES)] * 2)], axis=1).astype(np.float32)
    cotangent = rng.normal(size=(2, boxes.shape[1], 7, 7, CHANNELS)).astype(np.float32)

    pooler = torchvision.ops.MultiScaleRoIAlign([f"p{level}" for level in features], 7, 2)
    torch_boxes = [torch.from_numpy(b[:, [1, 0, 3, 2]]) for b in boxes]
    expected, grads, magnitudes = _torch_outputs(
        lambda fs: pooler(
            OrderedDict((f"p{level}", f) for level, f in zip(features, fs, strict=True)),
            torch_boxes,
            [(IMAGE, IMAGE)] * 2,
        ),
        [_nchw(f) for f in features.values()],
        cotangent,
    )
    return (
        features,
        boxes,
        cotangent,
        expected,
        dict(zip(features, grads, strict=True)),
        dict(zip(features, magnitudes, strict=True)),
    )


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_multilevel_roi_align_matches_torchvision(pyramid, chunk_size):
    features, boxes, cotangent, expected, expected_grad, magnitude = pyramid
    levels = np.asarray(assign_levels(boxes, 2, 5))
    assert set(levels[:, :24].ravel()) == {2, 3, 4, 5}  # the pyramid fixture really spans all levels

    def fn(f):
        return multilevel_roi_align(f, jnp.asarray(boxes), 7, sampling_ratio=2, chunk_size=chunk_size)

    got, grad = jax.jit(lambda f, ct: _ours(fn, f, ct))({k: jnp.asarray(v) for k, v in features.items()}, cotangent)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)
    for level in features:
        assert np.abs(expected_grad[level]).max() > 0.1, level  # every level receives gradient
        _assert_gradient_close(grad[level], expected_grad[level], magnitude[level], f"gradient, level {level}")


def test_multilevel_aligned_matches_torchvision_per_level(pyramid):
    """aligned=True, which MultiScaleRoIAlign does not offer: torchvision's roi_align on each RoI's mapped level."""
    features, boxes = pyramid[:2]
    rois = _to_torch_rois(boxes)
    levels = initLevelMapper(2, 5)([torch.from_numpy(b[:, [1, 0, 3, 2]]) for b in boxes]).numpy() + 2
    expected = np.zeros((len(rois), CHANNELS, 7, 7), np.float32)
    for level, fmap in features.items():
        pooled = torchvision.ops.roi_align(_nchw(fmap), rois, 7, 2.0**-level, 2, aligned=True)
        expected[levels == level] = pooled.detach().numpy()[levels == level]
    expected = expected.transpose(0, 2, 3, 1).reshape(2, -1, 7, 7, CHANNELS)
    pool = jax.jit(functools.partial(multilevel_roi_align, output_size=7, sampling_ratio=2, aligned=True))
    got = pool({k: jnp.asarray(v) for k, v in features.items()}, jnp.asarray(boxes))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_multilevel_with_explicit_strides_matches_torchvision_per_level(pyramid):
    """DetNet's pyramid: levels 4 and 5 both at stride 16. Each RoI is pooled from its mapped level (the
    level rule is unchanged) with that level's own spatial scale, as torchvision's roi_align on that map."""
    _, boxes = pyramid[:2]
    strides = {2: 4, 3: 8, 4: 16, 5: 16}
    rng = np.random.RandomState(5)
    features = {
        level: rng.normal(size=(2, IMAGE // stride, IMAGE // stride, CHANNELS)).astype(np.float32)
        for level, stride in strides.items()
    }
    rois = _to_torch_rois(boxes)
    levels = initLevelMapper(2, 5)([torch.from_numpy(b[:, [1, 0, 3, 2]]) for b in boxes]).numpy() + 2
    assert set(levels.ravel()) == {2, 3, 4, 5}
    expected = np.zeros((len(rois), CHANNELS, 7, 7), np.float32)
    for level, fmap in features.items():
        pooled = torchvision.ops.roi_align(_nchw(fmap), rois, 7, 1.0 / strides[level], 2)
        expected[levels == level] = pooled.detach().numpy()[levels == level]
    expected = expected.transpose(0, 2, 3, 1).reshape(2, -1, 7, 7, CHANNELS)
    pool = jax.jit(functools.partial(multilevel_roi_align, output_size=7, sampling_ratio=2, strides=strides))
    got = pool({k: jnp.asarray(v) for k, v in features.items()}, jnp.asarray(boxes))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_gradient_wrt_boxes_is_finite_for_degenerate_boxes(pyramid):
    features, boxes = pyramid[:2]
    feats = {k: jnp.asarray(v) for k, v in features.items()}
    grad = jax.jit(jax.grad(lambda b: jnp.sum(multilevel_roi_align(feats, b, 7, 2) ** 2)))(jnp.asarray(boxes))
    assert np.isfinite(np.asarray(grad)).all()


def test_assign_levels_matches_torchvision_level_mapper():
    rng = np.random.RandomState(3)
    side = np.exp(rng.uniform(np.log(1.0), np.log(4000.0), (300, 2)))
    boundary = np.asarray(
        [[s, s] for s in (56.0, 112.0, 224.0, 448.0, 896.0)] + [[s - 0.01, s] for s in (112.0, 224.0, 448.0)]
    )
    side = np.concatenate([side, boundary, [[0.0, 10.0], [0.0, 0.0]]])
    start = rng.uniform(-50.0, 500.0, side.shape)
    boxes = np.concatenate([start, start + side], axis=1).astype(np.float32)
    torch_boxes = [torch.from_numpy(boxes[:, [1, 0, 3, 2]])]
    for k_min, k_max, canonical_size, canonical_level in ((2, 5, 224, 4), (3, 7, 224, 4), (2, 6, 160, 5)):
        mapper = initLevelMapper(k_min, k_max, canonical_scale=canonical_size, canonical_level=canonical_level)
        expected = mapper(torch_boxes).numpy() + k_min
        got = np.asarray(assign_levels(jnp.asarray(boxes), k_min, k_max, canonical_size, canonical_level))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected)
        assert len(set(expected)) == k_max - k_min + 1  # every level occurs


@pytest.mark.parametrize("sampling_ratio", [0, -1])
def test_adaptive_sampling_ratio_is_refused(sampling_ratio):
    features = jnp.zeros((1, 8, 8, 2))
    boxes = jnp.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="dynamic shapes"):
        roi_align(features, boxes, 1.0, 7, sampling_ratio)
    with pytest.raises(ValueError, match="dynamic shapes"):
        multilevel_roi_align({2: features, 3: features[:, :4, :4]}, boxes, 7, sampling_ratio)


def test_non_consecutive_levels_are_refused():
    features = jnp.zeros((1, 8, 8, 2))
    with pytest.raises(ValueError, match="consecutive"):
        multilevel_roi_align({2: features, 4: features[:, :2, :2]}, jnp.zeros((1, 3, 4)), 7)


@pytest.mark.parametrize("output_size", [7, 14])
def test_model_garden_style_matches_multilevel_crop_and_resize(output_size):
    """style='model_garden' against Model Garden's own ``multilevel_crop_and_resize`` (run in TF) on
    P3-P7 of a 256 px image: level rule, single sample per bin, extrapolation above/left, clamping below/right.

    Boxes partly or wholly outside the image make Model Garden extrapolate with weights up to ~20 per
    axis: a value is then a cancelling sum of terms ~100x larger than itself, so float32 results differ
    by rounding (~3e-5, summed in another order than its kernel * 4 + average pool). Both sides also run
    in float64, where they must agree to 1e-8.
    """
    import tensorflow as tf
    from official.vision.ops import spatial_transform_ops

    rng = np.random.RandomState(11)
    image = 256
    levels = range(3, 8)
    features = {k: rng.normal(size=(2, image >> k, image >> k, CHANNELS)) for k in levels}
    # Sizes 4..900 px so that every level 3-7 is chosen, plus the non-degenerate special boxes (a
    # degenerate box's Model Garden level is an int cast of -inf: undefined) scaled to the image.
    size = np.exp(rng.uniform(np.log(4.0), np.log(900.0), (2, 40, 2)))
    corner = rng.uniform(-60, 300, (2, 40, 2))
    boxes = np.concatenate([corner, corner + size], -1)
    boxes[:, :6] = np.asarray(SPECIAL_BOXES[:6]) * 2.0

    def theirs(dtype):
        return spatial_transform_ops.multilevel_crop_and_resize(
            {str(k): tf.constant(f, dtype) for k, f in features.items()},
            tf.constant(boxes, dtype),
            output_size,
            sample_offset=0.5,
        ).numpy()

    ours_fn = jax.jit(functools.partial(multilevel_roi_align, output_size=output_size, style="model_garden"))
    f32 = {k: f.astype(np.float32) for k, f in features.items()}
    ours32 = np.asarray(ours_fn(f32, boxes.astype(np.float32)))
    theirs32 = theirs(tf.float32)
    assert ours32.shape == theirs32.shape == (2, 40, output_size, output_size, CHANNELS)
    with jax.enable_x64(True):
        ours64 = np.asarray(ours_fn(features, boxes))
    exact = theirs(tf.float64)
    assert ours64.dtype == np.float64
    np.testing.assert_allclose(ours64, exact, atol=1e-8, rtol=0)
    # float32: ours is no further from the exact values than Model Garden's own float32 kernel is.
    ours_error, theirs_error = np.max(np.abs(ours32 - exact)), np.max(np.abs(theirs32 - exact))
    assert ours_error <= 1.5 * theirs_error and np.max(np.abs(ours32 - theirs32)) <= 3e-4
    # The torchvision semantics differ on the same boxes (negative control).
    tv = np.asarray(multilevel_roi_align(f32, boxes.astype(np.float32), output_size, sampling_ratio=1))
    assert np.max(np.abs(tv - theirs32)) > 1e-2


def test_mmdet_style_matches_mmdetection_v1_extractor():
    """style='mmdet' = mmdetection v1's SingleRoIExtractor (level floor(log2(sqrt((w+1)(h+1)) / 56 + 1e-6))
    over P3-P6) + RoIAlign (end + 1): on RoIs of at least one feature pixel that is torchvision's
    roi_align on [x1, y1, x2 + 1, y2 + 1] at the RoI's level, computed here with torch."""
    rng = np.random.RandomState(12)
    image = 512
    features = {k: rng.normal(size=(1, image >> k, image >> k, CHANNELS)).astype(np.float32) for k in range(3, 7)}
    size = np.exp(rng.uniform(np.log(8.0), np.log(700.0), (60, 2)))
    corner = rng.uniform(-20, 480, (60, 2))
    boxes = np.concatenate([corner, corner + size], -1).astype(np.float32)  # ymin, xmin, ymax, xmax
    ours = np.asarray(
        multilevel_roi_align(features, boxes[None], 7, sampling_ratio=2, style="mmdet", canonical_size=56.0)
    )
    t = torch.from_numpy(boxes)
    scale = torch.sqrt((t[:, 3] - t[:, 1] + 1) * (t[:, 2] - t[:, 0] + 1))
    levels = torch.floor(torch.log2(scale / 56.0 + 1e-6)).clamp(0, 3).long().numpy()
    assert set(levels.tolist()) == {0, 1, 2, 3}
    for i, (box, level) in enumerate(zip(boxes, levels, strict=True)):
        fmap = torch.from_numpy(features[3 + level]).permute(0, 3, 1, 2)
        roi = torch.tensor([[0.0, box[1], box[0], box[3] + 1.0, box[2] + 1.0]])
        expected = torchvision.ops.roi_align(fmap, roi, 7, 2.0 ** -(3 + level), 2, aligned=False)
        np.testing.assert_allclose(ours[0, i], expected[0].permute(1, 2, 0).numpy(), atol=1e-5)
