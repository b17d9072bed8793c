"""Instance masks through the data path (issue 11, item 1): the COCO-folder builder decodes every
``segmentation`` form as pycocotools' ``COCO.annToMask`` does, preprocessing carries each mask cut out
at its final box (Model Garden's Mask R-CNN parser, checked against that parser itself), the masks follow
the pixels through flip / scale jitter / crop / padding, and a mask model is refused data without masks."""

import json
import logging
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage
from test_bad_data import TRAIN, _config, _load, _make_folder, _refused

from scaledet_jax import defaults
from scaledet_jax.cli import UserError
from scaledet_jax.data import coco_folder, pipeline, preprocess


def _rasterize(polygons, height, width):
    """A 0/1 mask of polygons (pycocotools' rasteriser, as a polygon annotation would give)."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE of a 0/1 mask: column-major run lengths, starting with a run of 0s."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"counts": ([0] if flat[0] else []) + runs, "size": list(mask.shape)}


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _mask_folder(tmp_path):
    """A COCO folder with every segmentation form: image 1 has a two-part polygon, a crowd region as
    uncompressed RLE, a compressed RLE, an annotation without segmentation (box filled) and one whose
    second polygon has 2 points (left out); image 2 has no objects; image 3 one polygon."""
    folder = str(tmp_path / "masks")
    os.makedirs(os.path.join(folder, "train"))
    os.makedirs(os.path.join(folder, "annotations"))
    rng = np.random.RandomState(0)
    sizes = {1: (48, 64), 2: (40, 56), 3: (56, 44)}
    images = []
    for image_id, (h, w) in sizes.items():
        name = f"{image_id:03d}.png"
        Image.fromarray(rng.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(os.path.join(folder, "train", name))
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    h, w = sizes[1]
    yy, xx = np.mgrid[:h, :w]
    ellipse = (((yy - 30) / 9.0) ** 2 + ((xx - 20) / 14.0) ** 2 <= 1).astype(np.uint8)
    ring = ((((yy - 14) ** 2 + (xx - 46) ** 2) <= 100) & (((yy - 14) ** 2 + (xx - 46) ** 2) > 16)).astype(np.uint8)
    ring[14, 30:40] = 0  # many runs: exercises the delta coding of compressed RLE strings
    compressed = mask_utils.encode(np.asfortranarray(ring))
    polygon = [[4.5, 3.0, 30.2, 4.0, 30.0, 10.5, 12.0, 11.0, 11.5, 25.7, 4.0, 26.0], [40, 30, 60.0, 44.0, 38.5, 46.0]]
    box_only = [50.0, 36.0, 10.0, 9.0]
    annotations = [
        {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": polygon},
        {"id": 12, "image_id": 1, "category_id": 2, "iscrowd": 1, "segmentation": _uncompressed_rle(ellipse)},
        {
            "id": 13,
            "image_id": 1,
            "category_id": 3,
            "iscrowd": 0,
            "segmentation": {"counts": compressed["counts"].decode("ascii"), "size": [h, w]},
        },
        {"id": 14, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": box_only},
        {
            "id": 15,
            "image_id": 1,
            "category_id": 2,
            "iscrowd": 0,
            "segmentation": [[20.0, 2.0, 28.0, 2.0, 24.0, 9.0], [1.0, 1.0, 3.0, 3.0]],
        },
        {"id": 31, "image_id": 3, "category_id": 3, "iscrowd": 0, "segmentation": [[5, 6, 38, 9, 20, 50]]},
    ]
    for ann in annotations:
        if "bbox" not in ann:
            seg = ann["segmentation"]
            hh, ww = sizes[ann["image_id"]]
            if isinstance(seg, list):
                mask = _rasterize([p for p in seg if len(p) >= 6], hh, ww)
            elif isinstance(seg["counts"], list):
                mask = mask_utils.decode(mask_utils.frPyObjects(seg, hh, ww))
            else:
                mask = mask_utils.decode(seg)
            ann["bbox"] = _bbox(mask)
        ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    data = {"images": images, "annotations": annotations, "categories": [{"id": i, "name": str(i)} for i in (1, 2, 3)]}
    with open(os.path.join(folder, "annotations", "instances_train.json"), "w") as f:
        json.dump(data, f)
    return folder, data


def _examples(builder, split="train"):
    return {int(ex["image/id"]): ex for ex in builder.as_dataset(split=split).as_numpy_iterator()}


# ---------------------------------------------------------------------------------------------
# Decoding in the COCO-folder builder
# ---------------------------------------------------------------------------------------------


def test_masks_decoded_as_coco_ann_to_mask(tmp_path):
    folder, data = _mask_folder(tmp_path)
    builder = coco_folder.prepare(folder)
    coco = COCO(os.path.join(folder, "annotations", "instances_train.json"))
    examples = _examples(builder)
    for ann in data["annotations"]:
        example = examples[ann["image_id"]]
        row = list(example["objects"]["id"]).index(ann["id"])
        got = example["objects"]["mask"][row]
        info = coco.imgs[ann["image_id"]]
        assert got.shape == (info["height"], info["width"], 1) and got.dtype == np.uint8
        if "segmentation" not in ann:  # the box filled, rasterised by pycocotools as a box
            expected = mask_utils.decode(mask_utils.frPyObjects(np.array([ann["bbox"]], np.float64), *got.shape[:2]))
        elif ann["id"] == 15:  # the 2-point polygon encloses nothing and is left out
            expected = coco.annToMask(dict(ann, segmentation=ann["segmentation"][:1]))[..., None]
        else:
            expected = coco.annToMask(ann)[..., None]
        assert expected.sum() > 10
        np.testing.assert_array_equal(got, expected)
    assert examples[2]["objects"]["mask"].shape[0] == 0  # an image without objects
    summary = builder.summary["train"]
    # objects: non-crowd boxes (11, 13, 14, 15, 31); segmentations: those with a mask of their own.
    assert (summary["objects"], summary["segmentations"], summary["degenerate_polygons"]) == (5, 4, 1)


def test_compressed_rle_counts_as_pycocotools():
    rng = np.random.RandomState(1)
    for shape in ((7, 5), (33, 21), (64, 48)):
        mask = (rng.rand(*shape) > 0.6).astype(np.uint8)
        mask[: shape[0] // 2] = 1  # long runs too (multi-character numbers)
        encoded = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
        assert coco_folder.rle_string_counts(encoded) == _uncompressed_rle(mask)["counts"]


def test_masks_through_tf_data_and_the_batches(tmp_path):
    """In graph mode (tf.data), the empty image included; train/eval batches carry masks only for mask models."""
    folder, _ = _mask_folder(tmp_path)
    config = _config(folder, max_instances=6, mask_crop_size=16, train_batch_size=3, eval_batch_size=2)
    config.data.eval_split, config.data.shuffle_buffer = "train", 4
    config.model.image_size = 64
    config.model.name = "mask_rcnn"
    builder = pipeline.get_builder(config, str(tmp_path / "work"))
    batch = next(pipeline.train_batches(config, builder))
    assert batch["masks"].shape == (3, 6, 16, 16) and batch["masks"].dtype == np.float32
    assert np.all(batch["masks"][~batch["valid"]] == 0)
    assert np.all(batch["masks"][batch["valid"]].max(axis=(1, 2)) > 0.5)
    eval_batches = list(pipeline.eval_batches(config, builder))
    masks = np.concatenate([b["masks"] for b in eval_batches])
    valid = np.concatenate([b["valid"] for b in eval_batches])
    ids = np.concatenate([b["image_id"] for b in eval_batches])
    assert masks.shape == (4, 6, 16, 16) and valid[ids == 1].sum() == 5 and valid[ids == 2].sum() == 0
    assert np.all(masks[~valid] == 0)
    config.model.name = "faster_rcnn"
    assert "masks" not in next(pipeline.train_batches(config, builder))


# ---------------------------------------------------------------------------------------------
# Masks follow the pixels
# ---------------------------------------------------------------------------------------------

S, K = 64, 28


def _pixel_example(height=60, width=84):
    """Instance masks drawn into the pixels: instance 0 in red, instance 1 in green (they overlap), and an
    x ramp (2x + 20) in blue, which shows whether the output was flipped and where the crop lies."""
    # Shapes unlike their mirror images, each far from where the mirror puts it; they overlap at the top.
    triangle = _rasterize([[6, 8, 58, 10, 8, 52]], height, width)
    ell = _rasterize([[50, 3, 82, 3, 82, 23, 69, 23, 69, 58, 50, 58]], height, width)
    masks = np.stack([triangle, ell])
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0], image[..., 1] = triangle * 255, ell * 255
    image[..., 2] = 2 * np.arange(width)[None, :] + 20
    boxes = [[b[1], b[0], b[1] + b[3], b[0] + b[2]] for b in map(_bbox, masks)]
    example = {
        "image": tf.constant(image),
        "image/id": tf.constant(1, tf.int64),
        "objects": {
            "bbox": tf.constant(np.array(boxes, np.float32) / [height, width, height, width], tf.float32),
            "label": tf.constant([1, 2], tf.int64),
            "is_crowd": tf.constant([False, False]),
            "mask": tf.constant(masks[..., None]),
        },
    }
    return example, masks


def _run(example, seed=0, training=True, masks=None):
    if masks is not None:
        example = dict(example, objects=dict(example["objects"], mask=tf.constant(masks[..., None])))
    out = preprocess.preprocess(
        example,
        training=training,
        output_size=S,
        max_instances=4,
        seed=tf.constant([seed, 7], tf.int64),
        scale_min=0.5,
        scale_max=2.0,
        include_masks=True,
        mask_crop_size=K,
    )
    return {k: v.numpy() for k, v in out.items()}


# Where the two resamplings may disagree, in network pixels from a mask edge. crop_and_resize samples
# corner-aligned (at box * (size - 1) / size) and tf.image.resize half-pixel-centred, so the sample grid on the
# output image and the one on the original mask differ by -Y/S + (Y + offset)/H + (1 - scale)/2 network px
# (Y the box coordinate): at most (1 + scale)/2 <= 1.5 px for scales <= 2. The output image is itself a
# bilinear resampling of the binary mask, which moves an edge's ramp by up to 1 more px. Farther from an
# edge both sample a constant 0 or 1 and must agree to float precision (measured: 1.0 px already suffices).
EDGE_BAND_PX = 2.5


def _disagreement(out, row, channel):
    """Largest |mask - crop of the output image's instance plane| away from the mask's edges, and how many of
    the K x K samples away from the edges lie inside the mask."""
    pixels = out["image"] * np.array(preprocess.STDDEV_RGB) + np.array(preprocess.MEAN_RGB)
    inside_image = np.any(out["image"] != 0, axis=-1)  # padding is exactly 0 after normalisation
    plane = np.where(inside_image, pixels[..., channel] / 255.0, 0.0).astype(np.float32)
    box = out["boxes"][row]
    oracle = tf.image.crop_and_resize(plane[None, :, :, None], [box / S], [0], [K, K], method="bilinear")
    oracle = oracle.numpy()[0, :, :, 0]
    inside = np.pad(oracle >= 0.5, 1)  # the box edge is an edge of the mask (tight or cut boxes)
    edges = np.zeros_like(inside)
    for axis in (0, 1):
        change = np.diff(inside, axis=axis)
        edges |= np.pad(change, [(0, 1) if a == axis else (0, 0) for a in (0, 1)])
        edges |= np.pad(change, [(1, 0) if a == axis else (0, 0) for a in (0, 1)])
    edges = edges[1:-1, 1:-1]
    ry = math.ceil(EDGE_BAND_PX * (K - 1) / (box[2] - box[0]))  # network px -> K x K samples
    rx = math.ceil(EDGE_BAND_PX * (K - 1) / (box[3] - box[1]))
    band = ndimage.binary_dilation(edges, np.ones((2 * ry + 1, 2 * rx + 1), bool))
    far = ~band
    diff = np.abs(out["masks"][row] - oracle)
    return float(diff[far].max()) if far.any() else 0.0, int(np.sum(far & (oracle > 0.5)))


def test_masks_follow_the_pixels_through_flip_scale_crop_and_padding():
    example, masks = _pixel_example()
    height, width = masks.shape[1:]
    seen = set()
    for seed in range(14):
        out = _run(example, seed)
        ramp = (out["image"][..., 2] * preprocess.STDDEV_RGB[2] + preprocess.MEAN_RGB[2] - 20) / 2  # original x
        inside_image = np.any(out["image"] != 0, axis=-1)
        row = ramp[0][inside_image[0]]
        seen.add("flip" if row[-1] < row[0] else "no flip")
        seen.add("padded" if not inside_image.all() else "cropped")
        if row.min() > 0.5 or row.max() < width - 1.5 or not inside_image[:, 0].all():
            seen.add("image cut")
        for i in np.flatnonzero(out["valid"]):
            b = out["boxes"][i]
            full = np.array([v for v in _bbox(masks[i])[2:]][::-1]) * out["scale"]  # (h, w) scaled, uncut
            if np.any(np.array([b[2] - b[0], b[3] - b[1]]) < full - 1.5):
                seen.add("object cut")
            worst, interior = _disagreement(out, i, channel=i)
            assert interior >= 5, (seed, i, interior)  # the comparison sees the inside of the mask, not just 0s
            assert worst < 1e-3, (seed, i, worst)
        assert np.all(out["masks"][~out["valid"]] == 0)
        # A deliberately wrong transform (the masks mirrored against their pixels) fails the same comparison.
        wrong = _run(example, seed, masks=masks[:, :, ::-1])
        for i in np.flatnonzero(wrong["valid"]):
            assert _disagreement(wrong, i, channel=i)[0] > 0.5, (seed, i)
    assert seen == {"flip", "no flip", "padded", "cropped", "image cut", "object cut"}, seen


def test_masks_follow_the_pixels_in_evaluation():
    example, masks = _pixel_example(52, 90)
    out = _run(example, training=False)
    assert out["valid"].tolist() == [True, True, False, False]
    for i in (0, 1):
        worst, interior = _disagreement(out, i, channel=i)
        assert worst < 1e-3 and interior >= 5, (i, worst, interior)
    wrong = _run(example, training=False, masks=masks[:, :, ::-1])
    assert min(_disagreement(wrong, i, channel=i)[0] for i in (0, 1)) > 0.5


def test_no_masks_unless_asked_and_images_without_objects():
    example, _ = _pixel_example()
    plain = preprocess.preprocess(example, training=False, output_size=S, max_instances=4)
    assert "masks" not in plain
    empty = dict(example, objects={k: v[:0] for k, v in example["objects"].items()})
    empty["objects"]["mask"] = tf.zeros([0], tf.uint8)  # how tfds decodes an empty sequence of images
    for training in (True, False):
        out = _run(empty, training=training)
        assert out["masks"].shape == (4, K, K) and not out["masks"].any() and not out["valid"].any()


def test_masks_match_model_garden_parser(monkeypatch):
    """Model Garden's own Mask R-CNN parser, driven by our random draws (flip, scale, crop offset), gives the
    same boxes and masks. Square images: both resize by the same exact factor there (Model Garden scales boxes
    per axis by resized / original size, we by one factor; they are equal when the resized size is exact)."""
    from official.vision.dataloaders import maskrcnn_input
    from official.vision.ops import preprocess_ops

    size = 56
    yy, xx = np.mgrid[:size, :size]
    masks = np.stack(
        [
            _rasterize([[3, 5, 40, 8, 10, 50]], size, size),
            ((((yy - 35) / 12.0) ** 2 + ((xx - 38) / 8.0) ** 2) <= 1).astype(np.uint8),
            _rasterize([[30, 2, 54, 2, 54, 20, 44, 20, 44, 12, 30, 12]], size, size),
        ]
    )
    boxes = np.array([[b[1], b[0], b[1] + b[3], b[0] + b[2]] for b in map(_bbox, masks)], np.float32) / size
    image = np.random.RandomState(3).randint(0, 256, (size, size, 3)).astype(np.uint8)
    example = {
        "image": tf.constant(image),
        "image/id": tf.constant(1, tf.int64),
        "objects": {
            "bbox": tf.constant(boxes),
            "label": tf.constant([1, 2, 3], tf.int64),
            "is_crowd": tf.constant([False, True, False]),
            "mask": tf.constant(masks[..., None]),
        },
    }
    data = {
        "image": tf.constant(image),
        "groundtruth_boxes": tf.constant(boxes),
        "groundtruth_classes": tf.constant([1, 2, 3], tf.int64),
        "groundtruth_is_crowd": tf.constant([False, True, False]),
        "groundtruth_instance_masks": tf.constant(masks, tf.float32),
    }
    parser = maskrcnn_input.Parser(
        output_size=[S, S],
        min_level=2,
        max_level=4,
        num_scales=1,
        aspect_ratios=[1.0],
        anchor_size=2.0,
        aug_rand_hflip=True,
        aug_scale_min=0.5,
        aug_scale_max=2.0,
        skip_crowd_during_training=False,
        max_num_instances=4,
        include_mask=True,
        mask_crop_size=K,
    )
    real_uniform = tf.random.uniform
    flips = set()
    for seed in range(8):
        seeds = tf.random.experimental.stateless_split(tf.constant([seed, 7], tf.int64), 3)
        u_flip = float(tf.random.stateless_uniform([], seeds[0]))
        scale = tf.random.stateless_uniform([], seeds[1], 0.5, 2.0)
        u_offset = tf.random.stateless_uniform([2], seeds[2])
        # Model Garden draws, in order: flip (flips when < 0.5), vertical flip (prob 0), scale, crop offset.
        draws = [tf.constant(1.0 - u_flip), tf.constant(1.0), scale, u_offset]
        fake = lambda *a, _draws=draws, **k: _draws.pop(0) if _draws else real_uniform(*a, **k)
        monkeypatch.setattr(tf.random, "uniform", fake)
        try:
            _, labels = parser._parse_train_data(data)
        finally:
            monkeypatch.setattr(tf.random, "uniform", real_uniform)
        assert not draws and preprocess_ops.tf.random.uniform is real_uniform
        flips.add(u_flip > 0.5)
        out = _run(example, seed)
        n = int(out["valid"].sum())
        assert n == int(np.sum(labels["gt_classes"].numpy() >= 0)) and n > 0
        np.testing.assert_allclose(out["boxes"][:n], labels["gt_boxes"].numpy()[:n], atol=1e-4)
        np.testing.assert_allclose(out["masks"][:n], labels["gt_masks"].numpy()[:n], atol=1e-5)
    assert flips == {True, False}


# ---------------------------------------------------------------------------------------------
# Malformed segmentations, and data a mask model cannot train on
# ---------------------------------------------------------------------------------------------

BAD_SEGMENTATIONS = {
    "string": ("abc", ["has segmentation 'abc'", "expected polygons [[x1, y1"]),
    "text_in_polygon": ([[1, 2, "x", 4, 5, 6]], ["segmentation polygon 0", "expected finite numbers"]),
    "nan_in_polygon": ([[1, 2, 3, 4, 5, 6], [1, 2, float("nan"), 4, 5, 6]], ["segmentation polygon 1", "finite"]),
    "odd_polygon": ([[1, 2, 3, 4, 5, 6, 7]], ["polygon 0 with 7 numbers, an odd count"]),
    "list_of_rles": ([{"counts": [768], "size": [24, 32]}], ["segmentation[0] {'counts'"]),
    "rle_runs_short": ({"counts": [10, 5], "size": [24, 32]}, ["runs cover 15 pixels, not the 24 x 32 = 768"]),
    "rle_negative": ({"counts": [800, -32], "size": [24, 32]}, ["negative run length"]),
    "rle_float_counts": ({"counts": [768.0], "size": [24, 32]}, ["counts [768.0] are not all integers"]),
    "rle_bad_size": ({"counts": [768], "size": [24]}, ["RLE segmentation with size [24]; expected [height, width]"]),
    "rle_no_counts": ({"size": [24, 32]}, ["RLE segmentation with counts None"]),
    "compressed_bad_char": ({"counts": "0~", "size": [24, 32]}, ["compressed RLE", "character '~'"]),
    "compressed_truncated": ({"counts": "0P", "size": [24, 32]}, ["compressed RLE", "ends inside a run length"]),
    "rle_of_another_size": (
        {"counts": [100], "size": [10, 10]},
        ["file 001.png", "RLE segmentation of size 10 x 10, but the image is 24 x 32"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SEGMENTATIONS))
def test_malformed_segmentation_one_line_before_anything_is_written(case, tmp_path):
    folder = _make_folder(tmp_path)
    segmentation, expected = BAD_SEGMENTATIONS[case]
    data = _load(folder)
    data["annotations"][1]["segmentation"] = segmentation
    with open(os.path.join(folder, TRAIN), "w") as f:
        json.dump(data, f)
    _refused(_config(folder), tmp_path / "work", TRAIN, "annotation id 101", *expected)


def test_mask_model_needs_masks(tmp_path):
    folder = _make_folder(tmp_path)  # boxes only: no annotation has a segmentation
    config = _config(folder)
    config.model.name = "mask_rcnn"
    assert pipeline.needs_masks(config)
    assert not pipeline.needs_masks(defaults.get_config()) and not pipeline.needs_masks(defaults.fasterrcnn_config())
    _refused(config, tmp_path / "work", TRAIN, "has no instance masks", "none of its 4 objects", "fasterrcnn")
    data = _load(folder)
    data["annotations"][0]["segmentation"] = [[2, 3, 12, 3, 7, 11]]
    with open(os.path.join(folder, TRAIN), "w") as f:
        json.dump(data, f)
    builder = pipeline.get_builder(config, str(tmp_path / "work"))
    assert builder.summary["train"]["segmentations"] == 1


def test_mask_model_on_tfds_refused_before_tfds_is_touched(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(tfds, "builder", lambda *a, **k: pytest.fail("tfds was asked for the dataset"))
    config = defaults.get_config()  # data.source 'tfds', coco/2017
    config.model.name = "mask_rcnn"
    with pytest.raises(UserError) as info:
        pipeline.get_builder(config, str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    for piece in (
        "tfds coco/2017 has no instance masks",
        "--config.data.source=coco_folder --config.data.coco_folder=DIR",
        "train2017/",
        "annotations/instances_train2017.json",
    ):
        assert piece in message, (piece, message)


def test_copies_prepared_in_an_older_format_are_prepared_again(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    folder, _ = _mask_folder(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(coco_folder, "FORMAT_VERSION", 2)  # what a copy from before objects/mask carries
        old = coco_folder.prepare(folder)
        old_fingerprint = coco_folder.fingerprint(folder)
        m.setattr(coco_folder.CocoFolder, "VERSION", tfds_version("1.0.0"))
        assert coco_folder.fingerprint(folder) != old_fingerprint  # the builder's version keys the copy too
    caplog.clear()
    new = coco_folder.prepare(folder)
    assert new.data_dir != old.data_dir
    assert "prepared by an older version" in caplog.text and "changed since" not in caplog.text
    assert "mask" in new.info.features["objects"].feature.keys()
    assert coco_folder.prepare(folder).data_dir == new.data_dir  # reused from then on


def tfds_version(text):
    import tensorflow_datasets as tfds

    return tfds.core.Version(text)
