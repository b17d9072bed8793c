"""The sources' test-time resizes (``data/test_resize.py``) against the sources' own transforms.

torchvision: ``GeneralizedRCNNTransform`` itself (normalise, resize, pad; its ``image_sizes``); effdet:
``transforms_coco_eval`` (``ResizePad``) and its loader's normalisation; mmdetection v1: mmcv 0.x's
``imrescale`` rule (rebuilt here: mmcv is not installable beside this torch) with OpenCV, the library mmcv calls.
Each style's scale factors are the ones the source maps its boxes back with.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from configs_util import load_config, photo_like
from mmdet_efficientdet_reference import mmcv_imrescale

from scaledet_jax.data import test_resize


def _config(style: str, image_size: int = 128, **resize):
    config = load_config("spinenet49s")
    config.model.image_size = image_size
    config.model.test_resize.style = style
    for key, value in resize.items():
        config.model.test_resize[key] = value
    return config


@pytest.mark.parametrize("interpolation_sizes", [(64, 64), (200, 31), (7, 300), (128, 129)])
def test_torch_bilinear_equals_interpolate(interpolation_sizes):
    pixels = np.random.RandomState(0).uniform(0, 255, (97, 150, 3)).astype(np.float32)
    out_h, out_w = interpolation_sizes
    theirs = torch.nn.functional.interpolate(
        torch.from_numpy(pixels).permute(2, 0, 1)[None], size=(out_h, out_w), mode="bilinear", align_corners=False
    )[0].permute(1, 2, 0)
    ours = test_resize.torch_bilinear(pixels, out_h, out_w)
    assert ours.shape == (out_h, out_w, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)  # the blend's order: 1 ulp of 0-255 values
    # The sampling coordinates exactly: a ramp's interpolation is its source coordinate.
    ramp = np.broadcast_to(np.arange(150, dtype=np.float32)[None, :, None], (2, 150, 1))
    coordinates = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(ramp)).permute(2, 0, 1)[None], size=(2, out_w), mode="bilinear"
    )[0, 0, 0].numpy()
    np.testing.assert_array_equal(test_resize.torch_bilinear(ramp, 2, out_w)[0, :, 0], coordinates)


@pytest.mark.parametrize(
    "height,width,min_size,max_size",
    [(97, 150, 112, 160), (150, 97, 112, 160), (37, 300, 112, 160), (480, 640, 800, 1333)],
)
def test_torchvision_style_equals_generalized_rcnn_transform(height, width, min_size, max_size):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    image = photo_like(height, width, seed=height)
    config = _config("torchvision", min_size=min_size, max_size=max_size, size_divisor=32)
    spec = config.model.input
    transform = GeneralizedRCNNTransform(
        min_size, max_size, [m / 255 for m in spec.mean], [s / 255 for s in spec.std]
    ).eval()
    with torch.no_grad():
        batch, _ = transform([torch.from_numpy(image).permute(2, 0, 1).float() / 255])
    ours = test_resize.resize_for_model(image, config)
    theirs = batch.tensors[0].permute(1, 2, 0).numpy()
    assert ours.pixels.shape == theirs.shape
    assert ours.valid_hw == tuple(batch.image_sizes[0])
    np.testing.assert_allclose(ours.pixels, theirs, atol=2e-5, rtol=0)
    resized_h, resized_w = batch.image_sizes[0]
    assert ours.scale_yx == (resized_h / height, resized_w / width)  # resize_boxes' ratios


@pytest.mark.parametrize("height,width", [(97, 150), (150, 97), (128, 128), (300, 37)])
def test_effdet_style_equals_transforms_coco_eval(height, width):
    from effdet.data.transforms import transforms_coco_eval
    from PIL import Image

    image = photo_like(height, width, seed=width)
    config = _config("effdet")
    spec = config.model.input
    transform = transforms_coco_eval(
        128,
        interpolation="bilinear",
        use_prefetcher=True,
        fill_color="mean",
        mean=[m / 255 for m in spec.mean],
        std=[s / 255 for s in spec.std],
    )
    pixels, annotation = transform(Image.fromarray(image), {})
    # effdet's loader: (pixels - 255 * mean) / (255 * std) in float32, as its PrefetchLoader.
    mean, std = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in (spec.mean, spec.std))
    theirs = ((pixels.astype(np.float32) - mean) / std).transpose(1, 2, 0)
    ours = test_resize.resize_for_model(image, config)
    np.testing.assert_allclose(ours.pixels, theirs, atol=1e-6, rtol=0)
    assert ours.scale_yx == (1 / annotation["img_scale"],) * 2
    # effdet clips its boxes to img_size / img_scale: the original size times the factor.
    np.testing.assert_allclose(ours.valid_hw, np.array([height, width]) / annotation["img_scale"], rtol=1e-12)


@pytest.mark.parametrize("height,width,pad_square", [(110, 300, False), (300, 110, False), (97, 150, True)])
def test_mmdet_style_equals_mmcv_rescale_normalize_pad(height, width, pad_square):
    image = photo_like(height, width, seed=7)
    config = _config("mmdet", image_size=256, min_size=128, max_size=256, size_divisor=128, pad_square=pad_square)
    ours = test_resize.resize_for_model(image, config)
    resized, factor = mmcv_imrescale(image, (256, 128))
    spec = config.model.input
    normalised = (resized.astype(np.float32) - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    padded_h, padded_w = (256, 256) if pad_square else (-(-s // 128) * 128 for s in resized.shape[:2])
    theirs = np.zeros((padded_h, padded_w, 3), np.float32)
    theirs[: resized.shape[0], : resized.shape[1]] = normalised
    np.testing.assert_array_equal(ours.pixels, theirs)
    assert ours.valid_hw == resized.shape[:2] and ours.scale_yx == (factor, factor)
    assert pad_square or ours.pixels.shape[0] != ours.pixels.shape[1]  # a keep-ratio input is not square


def test_boxes_map_back_as_each_source_does():
    resized = test_resize.Resized(np.zeros((1, 1, 3), np.float32), (1.0, 1.0), (0.5, 0.25))
    boxes = np.array([[10.0, 20.0, 30.0, 41.0]])
    np.testing.assert_allclose(test_resize.boxes_to_original(boxes, resized, plus_one=False), [[20, 80, 60, 164]])
    # mmdetection v1 divides its inclusive corners: x2 - 1 = 40 -> 160, our exclusive 161.
    np.testing.assert_allclose(test_resize.boxes_to_original(boxes, resized, plus_one=True), [[20, 80, 59, 161]])


def test_unknown_style_is_one_clear_error():
    from scaledet_jax.cli import UserError

    config = copy.deepcopy(_config("letterbox"))
    config.model.test_resize.style = "opencv"
    with pytest.raises(UserError, match="model.test_resize.style must be one of letterbox, mmdet"):
        test_resize.style_of(config)
