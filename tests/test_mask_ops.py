"""Mask R-CNN mask ops against their oracles.

* ``crop_masks_in_target_boxes`` vs Model Garden's ``crop_mask_in_target_box`` (TF);
* ``mask_loss`` vs torchvision's ``maskrcnn_loss`` (targets from its ``project_masks_on_boxes``) and Model
  Garden's ``MaskrcnnLoss`` (TF), values and gradients;
* ``paste_masks`` vs torchvision's ``paste_masks_in_image(...) > 0.5``;
* ``encode_masks`` vs pycocotools' decode and area.

TensorFlow is imported inside the tests (after torch, see conftest.py).
"""

import json

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import roi_heads

from scaledet_jax.ops.masks import _resize_bilinear, crop_masks_in_target_boxes, encode_masks, mask_loss, paste_masks

LOSS_RTOL = 1e-5
# paste_masks reproduces torch's x86-64 CPU resize kernels bit for bit (fused multiply-adds included); torch's
# portable kernels (no FMA: ATEN_CPU_CAPABILITY=default, other architectures) may round a value differently in
# its last bit, which only matters for values exactly at the threshold.
TORCH_FMA_KERNELS = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _boxes(rng: np.random.RandomState, shape: tuple, low: float, high: float, lo_size: float, hi_size: float):
    """Boxes [..., 4] (ymin, xmin, ymax, xmax) with log-uniform sizes and starts in [low, high]."""
    size = np.exp(rng.uniform(np.log(lo_size), np.log(hi_size), (*shape, 2)))
    start = rng.uniform(low, high, (*shape, 2))
    return np.concatenate([start, start + size], axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# crop_masks_in_target_boxes


def _crop_case(seed: int, batch: int, num: int, size: int):
    """Cropped gt masks, their boxes and RoIs covering the interesting relations between the two."""
    rng = np.random.RandomState(seed)
    masks = rng.uniform(0.0, 1.0, (batch, num, size, size)).astype(np.float32)
    gt = _boxes(rng, (batch, num), 0.0, 100.0, 0.5, 120.0)
    gt_h, gt_w = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
    scale = np.stack([gt_h, gt_w, gt_h, gt_w], axis=-1) + 1.0
    rois = gt + rng.normal(0.0, 0.3, gt.shape).astype(np.float32) * scale  # jittered: partly outside the gt box
    rois = np.concatenate([np.minimum(rois[..., :2], rois[..., 2:]), np.maximum(rois[..., :2], rois[..., 2:])], -1)
    rois[:, 0] = gt[:, 0]  # the gt box itself
    rois[:, 1] = _boxes(rng, (batch,), 0.0, 100.0, 0.5, 120.0)  # unrelated: anywhere, usually disjoint
    rois[:, 2, 2:] = rois[:, 2, :2] + 0.3  # tiny RoIs (< 1 px)
    rois[:, 3, :2] = gt[:, 3, :2] + 0.25 * (gt[:, 3, 2:] - gt[:, 3, :2])
    rois[:, 3, 2:] = rois[:, 3, :2] + 0.2
    rois[:, 4] = gt[:, 4] + np.array([-60.0, -80.0, 70.0, 90.0], np.float32)  # much larger than its gt box
    rois[:, 5] = gt[:, 5] + np.array([2.0, -3.0, 40.0, 1.0], np.float32)  # crosses one side
    gt[:, 6, 2:] = gt[:, 6, :2] + 0.7  # a tiny gt box (< 1 px) inside a normal RoI
    rois[:, 6] = gt[:, 6] + np.array([-5.0, -6.0, 4.0, 3.0], np.float32)
    return masks, gt, rois.astype(np.float32)


@pytest.mark.parametrize("use_einsum", [True, False])
@pytest.mark.parametrize("output_size, sample_offset", [(28, 0.5), (14, 0.0)])
def test_crop_masks_matches_model_garden(use_einsum, output_size, sample_offset):
    import tensorflow as tf
    from official.vision.ops import spatial_transform_ops

    masks, gt, rois = _crop_case(seed=output_size, batch=2, num=24, size=16)
    expected = spatial_transform_ops.crop_mask_in_target_box(
        tf.constant(masks),
        tf.constant(gt),
        tf.constant(rois),
        output_size,
        sample_offset=sample_offset,
        use_einsum=use_einsum,
    ).numpy()
    crop = jax.jit(crop_masks_in_target_boxes, static_argnums=(3, 4))
    got = np.asarray(crop(masks, gt, rois, output_size, sample_offset))
    assert got.shape == expected.shape == (2, 24, output_size, output_size)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # Not vacuous: the RoIs see mask content, and the unrelated ones mostly zeros.
    assert expected[:, 0].mean() > 0.3


def test_crop_masks_leading_dims():
    """Any leading shape: [N, K, K] and [B, N, K, K] give the same per-instance crops."""
    masks, gt, rois = _crop_case(seed=3, batch=2, num=8, size=12)
    batched = np.asarray(crop_masks_in_target_boxes(masks, gt, rois))
    single = np.asarray(crop_masks_in_target_boxes(masks[1], gt[1], rois[1]))
    np.testing.assert_array_equal(batched[1], single)
    with pytest.raises(ValueError, match="mask_boxes"):
        crop_masks_in_target_boxes(masks, gt[:, :4], rois)


# ----------------------------------------------------------------------------------------------------------------
# mask_loss


def _loss_case(seed: int, num_valid: tuple[int, ...] = (5, 3)):
    """B images with full gt masks, RoIs matched to gts (first ``num_valid[b]`` valid), logits and targets.

    The targets are torchvision's own: ``project_masks_on_boxes`` (RoIAlign of the full gt masks at the RoIs).
    """
    rng = np.random.RandomState(seed)
    batch, rois, num_gt, size, classes, image = len(num_valid), 6, 3, 14, 5, 48
    gt_masks = (rng.uniform(size=(batch, num_gt, image, image)) > 0.5).astype(np.float32)
    gt_labels = rng.randint(1, classes, (batch, num_gt))
    gt_labels[0, 0] = 0  # a class-0 gt: counts for torchvision, not for Model Garden
    boxes = _boxes(rng, (batch, rois), 0.0, 40.0, 2.0, 30.0)  # [ymin, xmin, ymax, xmax]
    matched = rng.randint(0, num_gt, (batch, rois))
    matched[0, 0] = 0  # a valid RoI matched to the class-0 gt
    valid = np.arange(rois)[None, :] < np.asarray(num_valid)[:, None]
    targets = np.stack(
        [
            roi_heads.project_masks_on_boxes(
                torch.from_numpy(gt_masks[b]),
                torch.from_numpy(boxes[b][:, [1, 0, 3, 2]]),
                torch.from_numpy(matched[b]),
                size,
            ).numpy()
            for b in range(batch)
        ]
    )
    logits = rng.normal(0.0, 3.0, (batch, rois, size, size, classes)).astype(np.float32)
    return {
        "gt_masks": gt_masks,
        "gt_labels": gt_labels,
        "boxes": boxes,
        "matched": matched,
        "valid": valid,
        "classes": np.take_along_axis(gt_labels, matched, axis=1).astype(np.int32),
        "targets": targets.astype(np.float32),
        "logits": logits,
    }


def _torchvision_loss_and_grad(case):
    """torchvision's maskrcnn_loss on the valid RoIs; gradient scattered back to [B, R, S, S, C]."""
    valid = case["valid"]
    logits = torch.from_numpy(case["logits"][valid].transpose(0, 3, 1, 2).copy()).requires_grad_()  # [N, C, S, S]
    batch = valid.shape[0]
    loss = roi_heads.maskrcnn_loss(
        logits,
        [torch.from_numpy(case["boxes"][b][valid[b]][:, [1, 0, 3, 2]]) for b in range(batch)],
        [torch.from_numpy(case["gt_masks"][b]) for b in range(batch)],
        [torch.from_numpy(case["gt_labels"][b]) for b in range(batch)],
        [torch.from_numpy(case["matched"][b][valid[b]]) for b in range(batch)],
    )
    loss.backward()
    grad = np.zeros_like(case["logits"])
    grad[valid] = logits.grad.numpy().transpose(0, 2, 3, 1)
    return float(loss.detach()), grad


def _ours(case, style):
    fn = jax.jit(jax.value_and_grad(mask_loss), static_argnames="style")
    loss, grad = fn(case["logits"], case["classes"], case["targets"], case["valid"], style=style)
    return float(loss), np.asarray(grad)


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_loss_matches_torchvision(seed):
    case = _loss_case(seed)
    # Ignored RoIs may hold anything: they must not leak into the loss or its gradient.
    case["logits"][1, 5] = np.nan
    case["targets"][1, 4] = np.inf
    expected, expected_grad = _torchvision_loss_and_grad(case)
    loss, grad = _ours(case, "torchvision")
    assert loss == pytest.approx(expected, rel=LOSS_RTOL)
    scale = np.abs(expected_grad).max()
    assert scale > 0
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=LOSS_RTOL * scale)


def test_mask_loss_no_valid_roi_is_zero():
    case = _loss_case(0, num_valid=(0, 0))
    for style in ("torchvision", "model_garden"):
        loss, grad = _ours(case, style)
        assert loss == 0.0
        assert np.all(grad == 0.0)
    # torchvision's own answer for no positive RoI
    logits = torch.zeros((0, 5, 14, 14), requires_grad=True)
    empty = roi_heads.maskrcnn_loss(
        logits,
        [torch.zeros((0, 4))],
        [torch.zeros((1, 48, 48))],
        [torch.zeros(1, dtype=torch.int64)],
        [torch.zeros(0, dtype=torch.int64)],
    )
    assert float(empty.detach()) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_loss_matches_model_garden(seed):
    import tensorflow as tf
    from official.vision.losses import maskrcnn_losses

    case = _loss_case(seed)
    selected = np.take_along_axis(case["logits"], case["classes"][..., None, None, None], axis=-1)[..., 0]
    select_class_targets = np.where(case["valid"], case["classes"], 0)  # Model Garden's padding has class 0
    logits = tf.Variable(selected)
    with tf.GradientTape() as tape:
        # Outside a distribution strategy the loss runs in the default replica context (all_reduce is the identity).
        expected = maskrcnn_losses.MaskrcnnLoss()(
            logits, tf.constant(case["targets"]), tf.constant(select_class_targets)
        )
    selected_grad = tape.gradient(expected, logits).numpy()
    expected_grad = np.zeros_like(case["logits"])
    np.put_along_axis(expected_grad, case["classes"][..., None, None, None], selected_grad[..., None], axis=-1)

    loss, grad = _ours(case, "model_garden")
    assert loss == pytest.approx(float(expected), rel=LOSS_RTOL)
    scale = np.abs(expected_grad).max()
    assert scale > 0
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=LOSS_RTOL * scale)
    # The class-0 valid RoI is what makes the two reductions differ here.
    assert np.any(case["valid"] & (case["classes"] == 0))
    assert loss != pytest.approx(_ours(case, "torchvision")[0], rel=1e-3)


def test_mask_loss_rejects_unknown_style():
    case = _loss_case(0)
    with pytest.raises(ValueError, match="style"):
        mask_loss(case["logits"], case["classes"], case["targets"], case["valid"], style="detectron")


# ----------------------------------------------------------------------------------------------------------------
# paste_masks


def _torchvision_int_boxes(boxes: np.ndarray, size: int, padding: int) -> np.ndarray:
    """torchvision's expanded integer boxes (x0, y0, x1, y1), to pick the boxes its paste can handle."""
    scale = float(size + 2 * padding) / size
    return roi_heads.expand_boxes(torch.from_numpy(boxes[:, [1, 0, 3, 2]]), scale).to(torch.int64).numpy()


def _paste_case(seed: int, num: int, size: int, height: int, width: int, quantized: bool):
    rng = np.random.RandomState(seed)
    if quantized:  # values k / 4: many bilinear results land exactly on 0.5, so the float rounding must agree
        probs = (rng.randint(0, 5, (num, size, size)) / 4).astype(np.float32)
    else:
        probs = rng.uniform(0.0, 1.0, (num, size, size)).astype(np.float32)
    boxes = _boxes(rng, (num,), -20.0, min(height, width), 0.2, 1.5 * max(height, width))
    boxes[:3] = [[10.0, 12.0, 10.4, 12.3], [5.3, 40.6, 5.9, 41.0], [0.0, 0.0, 0.5, 0.5]]  # < 1 px
    boxes[3] = [-15.0, -25.0, height + 30.0, width + 12.0]  # covers the image and more
    boxes[4] = [-4.5, width - 6.2, 9.7, width + 3.1]  # across the top-right corner
    boxes[5] = [2.0, 3.0, 2.0 + height * 0.9, 3.0 + width * 0.7]  # large, inside (separable kernel path)
    boxes[6] = [-0.4, -0.6, 20.0, 30.0]  # negative coordinates truncated towards zero
    return probs, boxes


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("size, padding", [(28, 1), (14, 2)])
def test_paste_masks_matches_torchvision(quantized, size, padding):
    height, width = 61, 83
    probs, boxes = _paste_case(size + padding, 60, size, height, width, quantized)
    ib = _torchvision_int_boxes(boxes, size, padding)
    # torchvision's slicing breaks (shape error or wrong slice) when the expanded box is entirely outside the
    # image; those are compared with an empty mask in test_paste_masks_outside_image.
    ok = (np.minimum(ib[:, 2] + 1, width) >= np.maximum(ib[:, 0], 0)) & (
        np.minimum(ib[:, 3] + 1, height) >= np.maximum(ib[:, 1], 0)
    )
    assert ok[:7].all() and ok.sum() > 40
    probs, boxes = probs[ok], boxes[ok]
    expected = roi_heads.paste_masks_in_image(
        torch.from_numpy(probs)[:, None], torch.from_numpy(boxes[:, [1, 0, 3, 2]]), (height, width), padding=padding
    )[:, 0].numpy()
    got = paste_masks(probs, boxes, height, width, threshold=0.5, padding=padding)
    assert got.dtype == bool and got.shape == (len(boxes), height, width)
    if TORCH_FMA_KERNELS:
        np.testing.assert_array_equal(got, expected > 0.5)
    else:  # a last-bit difference can decide a value exactly at 0.5 the other way
        assert np.mean(got != (expected > 0.5)) < 1e-4
    assert got.any() and not got.all()
    if quantized:  # ties exist, and the rounding decides them the same way as torch
        assert np.any(expected == 0.5)


@pytest.mark.skipif(not TORCH_FMA_KERNELS, reason="bit-exact only against torch's x86-64 (FMA) kernels")
def test_resize_is_torch_bit_for_bit():
    """The resize inside paste_masks equals F.interpolate bit for bit, in both of torch's kernels."""
    rng = np.random.RandomState(0)
    sizes = [(1, 1), (1, 57), (30, 30), (30, 31), (64, 64), (64, 65), (12, 200), (150, 90), (7, 3), (333, 41)]
    sizes += [tuple(rng.randint(1, 160, 2)) for _ in range(20)]
    for k, (out_h, out_w) in enumerate(sizes):
        mask = rng.uniform(0.0, 1.0, (30, 30)).astype(np.float32)
        if k % 2:
            mask = (rng.randint(0, 5, (30, 30)) / 4).astype(np.float32)
        expected = F.interpolate(
            torch.from_numpy(mask)[None, None], size=(int(out_h), int(out_w)), mode="bilinear", align_corners=False
        )[0, 0].numpy()
        got = _resize_bilinear(mask, int(out_h), int(out_w), np.arange(out_h), np.arange(out_w))
        np.testing.assert_array_equal(got, expected, err_msg=f"output size {(out_h, out_w)}")
    # a window of rows and columns is the same window of the full resize
    got = _resize_bilinear(mask, 90, 120, np.arange(10, 50), np.arange(100, 120))
    np.testing.assert_array_equal(got, _resize_bilinear(mask, 90, 120, np.arange(90), np.arange(120))[10:50, 100:])


def test_paste_masks_outside_image():
    probs = np.ones((3, 28, 28), np.float32)
    boxes = np.array([[100.0, 10.0, 130.0, 40.0], [-50.0, -60.0, -20.0, -30.0], [5.0, 90.0, 20.0, 120.0]], np.float32)
    got = paste_masks(probs, boxes, 61, 83)
    assert got.shape == (3, 61, 83) and not got.any()
    assert paste_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), 61, 83).shape == (0, 61, 83)


# ----------------------------------------------------------------------------------------------------------------
# encode_masks


def test_encode_masks_round_trip():
    from pycocotools import mask as mask_utils

    rng = np.random.RandomState(0)
    binary = rng.uniform(size=(4, 37, 53)) > 0.7
    binary[1] = False
    binary[2] = True
    binary[3] = False
    binary[3, 10:20, 5:40] = True
    rles = encode_masks(binary)
    assert len(rles) == 4
    json.dumps(rles)  # JSON-ready: counts are str
    for rle, mask in zip(rles, binary, strict=True):
        assert isinstance(rle["counts"], str)
        assert list(rle["size"]) == [37, 53]
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
        assert mask_utils.area(rle) == mask.sum()
    decoded = mask_utils.decode(json.loads(json.dumps(rles)))  # what a results file reads back
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1).astype(bool), binary)
    assert encode_masks(np.zeros((0, 37, 53), bool)) == []


def test_pipeline_paste_then_encode():
    """Pasted masks encode to RLEs whose areas are the pasted pixel counts."""
    from pycocotools import mask as mask_utils

    probs, boxes = _paste_case(5, 10, 28, 40, 50, quantized=False)
    pasted = paste_masks(probs, boxes, 40, 50)
    areas = mask_utils.area(encode_masks(pasted))
    np.testing.assert_array_equal(areas, pasted.reshape(10, -1).sum(axis=1))
    assert areas.sum() > 0
