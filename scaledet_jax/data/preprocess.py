"""Image and box preprocessing in TensorFlow ops, shared by every data source (runs in tf.data).

Input: an example with the structure of tfds ``coco/2017``. Output: a dict of fixed-shape tensors:
``image`` [S, S, 3] float32 normalised, ``boxes`` [M, 4] pixels of the network input
([ymin, xmin, ymax, xmax]), ``classes`` [M] int32, ``valid`` [M] bool, ``crowd`` [M] bool,
``image_id``, ``scale`` (network pixels per original pixel) and ``original_size`` [2]; with
``include_masks`` also ``masks`` [M, K, K] float32: each instance's mask cropped at its final box.

Training follows Model Garden's parser: random horizontal flip, scale jitter (resize so the image
fits ``random_scale * S``, random crop to S), pad to S at the bottom/right; boxes are clipped,
degenerate ones dropped. Evaluation resizes the longer side to S and pads. Randomness is
stateless, seeded per example, so a run is reproducible and resumable.

Instance masks follow Model Garden's Mask R-CNN parser: the full-size mask is flipped with the
image, and never resized as a whole; instead each kept instance's final (network-frame, clipped)
box is mapped back to the flipped original image (``(box + offset) / image_scale``, image_scale
the resized size over the original size per axis) and the mask is cut out there and resized to
K x K by ``tf.image.crop_and_resize`` (bilinear), so it costs M * K * K floats per example.
"""

from __future__ import annotations

import tensorflow as tf

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# tfds coco/2017 labels are 0..79; the 91-way models use the original COCO category ids.
COCO_80_TO_91 = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    27,
    28,
    31,
    32,
    33,
    34,
    35,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    63,
    64,
    65,
    67,
    70,
    72,
    73,
    74,
    75,
    76,
    77,
    78,
    79,
    80,
    81,
    82,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
)


def normalize_image(
    image: tf.Tensor, mean: tuple[float, ...] = MEAN_RGB, std: tuple[float, ...] = STDDEV_RGB, bgr: bool = False
) -> tf.Tensor:
    """RGB uint8 pixels -> (pixel - mean) / std, channels reversed first for BGR-trained weights
    (``mean`` / ``std`` are then in BGR order too)."""
    image = tf.cast(image, tf.float32)
    if bgr:
        image = image[..., ::-1]
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def denormalized_boxes(boxes: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    size = tf.cast(tf.stack([height, width, height, width]), tf.float32)
    return boxes * size


def image_only_example(image: tf.Tensor, image_id: int = 0) -> dict:
    """A decoded example with an image and no objects: what ``preprocess`` needs to prepare a picture to run on."""
    return {
        "image": image,
        "image/id": tf.constant(image_id, tf.int64),
        "objects": {
            "bbox": tf.zeros([0, 4], tf.float32),
            "label": tf.zeros([0], tf.int64),
            "is_crowd": tf.zeros([0], tf.bool),
        },
    }


def _pad_or_clip(tensor: tf.Tensor, length: int) -> tf.Tensor:
    tensor = tensor[:length]
    pad = length - tf.shape(tensor)[0]
    paddings = [[0, pad]] + [[0, 0]] * (len(tensor.shape) - 1)
    return tf.pad(tensor, paddings)


def preprocess(
    example: dict,
    *,
    training: bool,
    output_size: int,
    max_instances: int,
    seed: tf.Tensor | None = None,
    hflip: bool = True,
    scale_min: float = 1.0,
    scale_max: float = 1.0,
    label_map: tuple[int, ...] | None = None,
    normalization: dict | None = None,
    include_masks: bool = False,
    mask_crop_size: int = 112,
) -> dict[str, tf.Tensor]:
    """One example -> fixed-shape model inputs. ``seed`` ([2] int) drives the augmentation.

    ``normalization``: ``normalize_image`` keyword arguments (mean, std, bgr); ImageNet RGB by default.
    ``include_masks``: read ``objects/mask`` [N, H, W, 1] (0/1) and output ``masks`` [max_instances,
    mask_crop_size, mask_crop_size] float32 in [0, 1], aligned with ``boxes`` (zeros for padding).
    """
    image = example["image"]
    if image.shape.rank == 3 and image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    objects = example["objects"]
    boxes = denormalized_boxes(tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4]), height, width)
    classes = tf.cast(objects["label"], tf.int32)
    if label_map is not None:
        classes = tf.gather(tf.constant(label_map, tf.int32), classes)
    crowd = tf.cast(objects["is_crowd"], tf.bool)
    if include_masks:
        # [N, H, W] uint8; the reshape also gives the [0] of an image without objects (tfds decodes it flat).
        masks = tf.reshape(objects["mask"], tf.stack([-1, height, width]))

    size = tf.cast(tf.stack([height, width]), tf.float32)
    target = tf.constant([output_size, output_size], tf.float32)
    if training:
        seeds = tf.random.experimental.stateless_split(seed, 3)
        if hflip:
            flip = tf.random.stateless_uniform([], seeds[0]) > 0.5
            image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
            w = tf.cast(width, tf.float32)
            flipped = tf.stack([boxes[:, 0], w - boxes[:, 3], boxes[:, 2], w - boxes[:, 1]], axis=1)
            boxes = tf.where(flip, flipped, boxes)
            if include_masks:
                masks = tf.cond(flip, lambda: tf.reverse(masks, axis=[2]), lambda: masks)
        random_scale = tf.random.stateless_uniform([], seeds[1], scale_min, scale_max)
        scaled_target = tf.round(random_scale * target)
    else:
        scaled_target = target
    scale = tf.minimum(scaled_target[0] / size[0], scaled_target[1] / size[1])
    scaled_size = tf.round(size * scale)
    image = tf.image.resize(image, tf.cast(scaled_size, tf.int32), method="bilinear")
    offset = tf.zeros([2], tf.float32)
    if training:
        max_offset = tf.maximum(scaled_size - target, 0.0)
        offset = tf.floor(max_offset * tf.random.stateless_uniform([2], seeds[2]))
        begin = tf.cast(offset, tf.int32)
        image = image[begin[0] : begin[0] + output_size, begin[1] : begin[1] + output_size]
    image = normalize_image(image, **(normalization or {}))
    image = tf.image.pad_to_bounding_box(image, 0, 0, output_size, output_size)

    boxes = boxes * scale - tf.concat([offset, offset], 0)
    limit = tf.minimum(scaled_size - offset, target)
    boxes = tf.clip_by_value(boxes, 0.0, tf.concat([limit, limit], 0))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, classes, crowd = boxes[keep], classes[keep], crowd[keep]
    valid = tf.ones_like(classes, tf.bool)
    extra = {}
    if include_masks:
        extra["masks"] = tf.ensure_shape(
            _pad_or_clip(
                _crop_masks(masks[keep][:max_instances], boxes[:max_instances], offset, scaled_size / size, size,
                            mask_crop_size),
                max_instances,
            ),
            [max_instances, mask_crop_size, mask_crop_size],
        )  # fmt: skip
    return {
        "image": tf.ensure_shape(image, [output_size, output_size, 3]),
        "boxes": tf.ensure_shape(_pad_or_clip(boxes, max_instances), [max_instances, 4]),
        "classes": tf.ensure_shape(_pad_or_clip(classes, max_instances), [max_instances]),
        "valid": tf.ensure_shape(_pad_or_clip(valid, max_instances), [max_instances]),
        "crowd": tf.ensure_shape(_pad_or_clip(crowd, max_instances), [max_instances]),
        "image_id": tf.cast(example["image/id"], tf.int64),
        "scale": scale,
        "original_size": tf.cast(tf.stack([height, width]), tf.int32),
        **extra,
    }


def _crop_masks(
    masks: tf.Tensor, boxes: tf.Tensor, offset: tf.Tensor, image_scale: tf.Tensor, size: tf.Tensor, crop_size: int
) -> tf.Tensor:
    """Model Garden's mask crop: full-size masks [N, H, W] of the (flipped) original image, their final boxes
    [N, 4] in network pixels -> [N, K, K] float32, each mask bilinearly cut out at its box mapped back to the
    original frame ((box + offset) / image_scale, normalised by the original [H, W] as crop_and_resize wants)."""
    shift = tf.concat([offset, offset], 0)
    original = (boxes + shift) / tf.concat([image_scale, image_scale], 0)
    normalized = original / tf.concat([size, size], 0)
    cropped = tf.image.crop_and_resize(
        masks[..., None],  # uint8 in: no full-size float copy
        normalized,
        box_indices=tf.range(tf.shape(masks)[0], dtype=tf.int32),
        crop_size=[crop_size, crop_size],
        method="bilinear",
    )
    return cropped[..., 0]
