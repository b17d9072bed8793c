"""Test-time resize of a converted checkpoint's source, so that it gives the source's detections on any image.

Training and evaluation here letterbox every image to the square ``model.image_size`` (longer side to the size,
TF bilinear, padded to the square). The PyTorch projects whose checkpoints convert resize differently at test
time, and a detector is only the source's detector with the source's resize. ``model.test_resize.style``
(recorded by the converter) selects it for ``Detector.predict`` and ``python -m scaledet_jax.predict``:

* ``letterbox``: ours (``data.preprocess``; not handled here).
* ``mmdet`` (mmdetection v1 ``Resize(keep_ratio=True)`` + ``Normalize`` + ``Pad(size_divisor)``): mmcv's
  ``imrescale`` — scale factor ``min(long / max(h, w), short / min(h, w))`` for the ``(long, short)`` image
  scale, sizes ``int(side * factor + 0.5)``, OpenCV ``INTER_LINEAR`` on the uint8 image —, then normalise and
  pad with zeros to a multiple of ``size_divisor`` (SpineNet: 128), or with ``pad_square`` to the square
  ``image_size`` (EfficientDet's ``Pad(size=(S, S))``). Boxes map back by the one factor, mmdetection v1's
  ``bboxes /= scale_factor`` on its inclusive corners.
* ``torchvision`` (``GeneralizedRCNNTransform``): normalise, bilinear (``align_corners=False``) resize by
  ``min(min_size / min(h, w), max_size / max(h, w))`` with ``floor`` sizes and the recomputed per-axis factor,
  pad with zeros to a multiple of ``size_divisor``; boxes map back per axis (``resize_boxes``).
* ``effdet`` (``transforms_coco_eval``: ``ResizePad``): factor ``min(S / h, S / w)`` for ``S = image_size``,
  ``int`` sizes, PIL bilinear on the uint8 image pasted at the top left of an ``S x S`` canvas of the mean
  colour (``round(mean)``), then normalise.

``min_size`` / ``max_size`` of 0 mean ``model.image_size``. Every style also gives each image's unpadded size
in input pixels, which the source clips its boxes to before NMS.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np

from scaledet_jax.cli import UserError

STYLES = ("letterbox", "mmdet", "torchvision", "effdet")


@dataclasses.dataclass(frozen=True)
class Resized:
    """One image made ready for the model the source's way."""

    pixels: np.ndarray  # float [H_in, W_in, 3]: normalised and padded, the model's input
    valid_hw: tuple[float, float]  # the image's extent in input pixels (what boxes are clipped to)
    scale_yx: tuple[float, float]  # input pixels per original pixel, per axis (how boxes map back)


def style_of(config: ml_collections.ConfigDict) -> str:
    spec = config.model.get("test_resize")
    style = "letterbox" if spec is None else spec.get("style", "letterbox")
    if style not in STYLES:
        raise UserError(f"model.test_resize.style must be one of {', '.join(STYLES)}, got {style!r}")
    return style


def _sizes(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    spec, size = config.model.test_resize, config.model.image_size
    min_size, max_size = spec.get("min_size", 0) or size, spec.get("max_size", 0) or size
    return int(min_size), int(max_size), int(spec.get("size_divisor", 0) or 1)


def _normalise(pixels: np.ndarray, config: ml_collections.ConfigDict, dtype) -> np.ndarray:
    """(pixel - mean) / std in ``dtype`` on 0-255 pixels, channels reordered for 'bgr' weights."""
    spec = config.model.input
    if spec.channels == "bgr":
        pixels = pixels[..., ::-1]
    mean, std = np.asarray(spec.mean, dtype), np.asarray(spec.std, dtype)
    return ((pixels.astype(dtype) - mean) / std).astype(dtype)


def _pad_to(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Zeros below and right of ``pixels`` up to [height, width]."""
    if pixels.shape[0] > height or pixels.shape[1] > width:
        raise ValueError(f"cannot pad {pixels.shape[:2]} to {(height, width)}")
    padded = np.zeros((height, width, pixels.shape[2]), pixels.dtype)
    padded[: pixels.shape[0], : pixels.shape[1]] = pixels
    return padded


def _pad(pixels: np.ndarray, divisor: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    return _pad_to(pixels, math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor)


def torch_bilinear_weights(in_size: int, out_size: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear source pixels (``align_corners=False``, no scale given): for each output pixel the
    two input indices and the second one's weight, in ``dtype`` as its CPU kernel computes them."""
    scale = dtype(in_size) / dtype(out_size)
    # scale * (i + 0.5) - 0.5 rounded once, as the kernel's fused multiply-add (exact in float64 for float32).
    source = np.maximum((np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(dtype), 0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, np.clip(source - low.astype(dtype), 0, 1).astype(dtype)


def torch_bilinear(pixels: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """float [H, W, C] -> [out_h, out_w, C] as ``F.interpolate(mode='bilinear', align_corners=False)``, in the
    pixels' dtype."""
    dtype = pixels.dtype.type
    y0, y1, wy = torch_bilinear_weights(pixels.shape[0], out_h, dtype)
    x0, x1, wx = torch_bilinear_weights(pixels.shape[1], out_w, dtype)
    one = dtype(1)
    rows = pixels[y0] * (one - wy)[:, None, None] + pixels[y1] * wy[:, None, None]
    return (rows[:, x0] * (one - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]).astype(dtype)


def _mmdet(image: np.ndarray, config: ml_collections.ConfigDict, dtype) -> Resized:
    try:
        import cv2
    except ImportError:
        raise UserError(
            "model.test_resize.style 'mmdet' resizes with OpenCV, as mmdetection does: "
            "pip install opencv-python-headless"
        ) from None
    min_size, max_size, divisor = _sizes(config)
    height, width = image.shape[:2]
    long_edge, short_edge = max(min_size, max_size), min(min_size, max_size)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    new_w, new_h = int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)
    resized = cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pixels = _normalise(resized, config, dtype)
    if config.model.test_resize.get("pad_square", False):
        pixels = _pad_to(pixels, config.model.image_size, config.model.image_size)
    else:
        pixels = _pad(pixels, divisor)
    return Resized(pixels, (new_h, new_w), (factor, factor))


def _torchvision(image: np.ndarray, config: ml_collections.ConfigDict, dtype) -> Resized:
    min_size, max_size, divisor = _sizes(config)
    height, width = image.shape[:2]
    factor = min(min_size / min(height, width), max_size / max(height, width))
    new_h, new_w = math.floor(float(height) * factor), math.floor(float(width) * factor)
    resized = torch_bilinear(_normalise(image, config, dtype), new_h, new_w)
    return Resized(_pad(resized, divisor), (new_h, new_w), (new_h / height, new_w / width))


def _effdet(image: np.ndarray, config: ml_collections.ConfigDict, dtype) -> Resized:
    from PIL import Image

    size = config.model.image_size
    height, width = image.shape[:2]
    factor = min(size / height, size / width)
    new_h, new_w = int(height * factor), int(width * factor)
    fill = tuple(int(round(v)) for v in config.model.input.mean)
    if config.model.input.channels == "bgr":
        fill = fill[::-1]
    canvas = Image.new("RGB", (size, size), color=fill)
    canvas.paste(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    # effdet clips to the original size times the factor (img_size / img_scale), and maps back by 1 / factor.
    return Resized(_normalise(np.asarray(canvas), config, dtype), (height * factor, width * factor), (factor, factor))


def resize_for_model(image: np.ndarray, config: ml_collections.ConfigDict, dtype=np.float32) -> Resized:
    """uint8 RGB [H, W, 3] -> the model's input the way ``model.test_resize.style`` (not 'letterbox') says, in
    ``dtype`` (float64 only for parity checks against a source run in double precision)."""
    style = style_of(config)
    if style == "mmdet":
        return _mmdet(image, config, dtype)
    if style == "torchvision":
        return _torchvision(image, config, dtype)
    if style == "effdet":
        return _effdet(image, config, dtype)
    raise ValueError("the letterbox resize is data.preprocess's")


def boxes_to_original(boxes_yx: np.ndarray, resized: Resized, plus_one: bool) -> np.ndarray:
    """Boxes [N, 4] (y1, x1, y2, x2, input pixels) -> original pixels as the source maps them back. ``plus_one``
    (mmdetection v1's "+1" boxes): its inclusive corners are divided, ``x2 - 1`` here."""
    scale = np.asarray(resized.scale_yx * 2, np.float64)
    if not plus_one:
        return boxes_yx / scale
    inclusive = np.array([0.0, 0.0, 1.0, 1.0])
    return (boxes_yx - inclusive) / scale + inclusive
