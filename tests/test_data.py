"""Synthetic data, the COCO-folder tfds builder and preprocessing (eager and inside tf.data)."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from scaledet_jax.data import coco_folder, preprocess, synthetic


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shapes"))
    synthetic.generate(folder, num_train=12, num_val=4, seed=3)
    return folder


def test_synthetic_dataset_is_deterministic_and_valid(shapes_folder, tmp_path):
    synthetic.generate(str(tmp_path), num_train=12, num_val=4, seed=3)
    for split in ("train", "val"):
        a = json.load(open(os.path.join(shapes_folder, "annotations", f"instances_{split}.json")))
        b = json.load(open(tmp_path / "annotations" / f"instances_{split}.json"))
        assert a == b
        per_image = {}
        for ann in a["annotations"]:
            per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
            x, y, w, h = ann["bbox"]
            info = a["images"][ann["image_id"] - 1]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= info["width"] and y + h <= info["height"]
            assert ann["segmentation"] and ann["area"] > 0
        assert all(1 <= n <= 6 for n in per_image.values())
        assert {c["id"] for c in a["categories"]} == {1, 2, 3}
    train = json.load(open(os.path.join(shapes_folder, "annotations", "instances_train.json")))
    val = json.load(open(os.path.join(shapes_folder, "annotations", "instances_val.json")))
    assert train["annotations"][0]["bbox"] != val["annotations"][0]["bbox"]  # held-out split differs


def test_coco_folder_builder_reads_boxes_back(shapes_folder):
    builder = coco_folder.CocoFolder(folder=shapes_folder)
    builder.download_and_prepare()
    assert builder.info.splits["train"].num_examples == 12
    data = json.load(open(os.path.join(shapes_folder, "annotations", "instances_val.json")))
    by_id = {img["id"]: img for img in data["images"]}
    for example in builder.as_dataset(split="val").as_numpy_iterator():
        info = by_id[int(example["image/id"])]
        assert example["image"].shape == (info["height"], info["width"], 3)
        anns = sorted((a for a in data["annotations"] if a["image_id"] == info["id"]), key=lambda a: a["id"])
        order = np.argsort(example["objects"]["id"])
        h, w = info["height"], info["width"]
        expected = np.array(
            [
                [
                    a["bbox"][1] / h,
                    a["bbox"][0] / w,
                    (a["bbox"][1] + a["bbox"][3]) / h,
                    (a["bbox"][0] + a["bbox"][2]) / w,
                ]
                for a in anns
            ]
        )
        np.testing.assert_allclose(example["objects"]["bbox"][order], expected, atol=1e-5)
        np.testing.assert_array_equal(example["objects"]["label"][order], [a["category_id"] for a in anns])


def test_coco_folder_grayscale_and_jpeg(tmp_path):
    from PIL import Image

    (tmp_path / "train").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(np.full((20, 30), 128, np.uint8)).save(tmp_path / "train" / "a.jpg")
    json.dump(
        {
            "images": [{"id": 7, "file_name": "a.jpg", "height": 20, "width": 30}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 5, "bbox": [3, 2, 10, 8], "iscrowd": 1}],
            "categories": [{"id": 5, "name": "x"}],
        },
        open(tmp_path / "annotations" / "instances_train.json", "w"),
    )
    builder = coco_folder.CocoFolder(folder=str(tmp_path))
    builder.download_and_prepare()
    (example,) = list(builder.as_dataset(split="train").as_numpy_iterator())
    assert example["image"].shape == (20, 30, 3)
    assert bool(example["objects"]["is_crowd"][0])


def _box_example(height, width, boxes_px, labels=None):
    """A black image with each box filled white; bbox normalised like tfds."""
    image = np.zeros((height, width, 3), np.uint8)
    for y0, x0, y1, x1 in boxes_px:
        image[y0:y1, x0:x1] = 255
    boxes = np.array(boxes_px, np.float32).reshape(-1, 4) / [height, width, height, width]
    n = len(boxes_px)
    return {
        "image": tf.constant(image),
        "image/id": tf.constant(1, tf.int64),
        "objects": {
            "bbox": tf.constant(boxes, tf.float32),
            "label": tf.constant(labels if labels is not None else [1] * n, tf.int64),
            "is_crowd": tf.constant([False] * n),
        },
    }


def _white_extent(image):
    pixels = image * np.array(preprocess.STDDEV_RGB) + np.array(preprocess.MEAN_RGB)
    ys, xs = np.nonzero(pixels[..., 0] > 200)
    return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])


@pytest.mark.parametrize("seed", range(6))
def test_train_augmentation_moves_boxes_with_pixels(seed):
    example = _box_example(90, 120, [(30, 40, 60, 100)])
    out = preprocess.preprocess(
        example,
        training=True,
        output_size=128,
        max_instances=5,
        seed=tf.constant([seed, 0], tf.int64),
        scale_min=0.5,
        scale_max=2.0,
    )
    assert out["image"].shape == (128, 128, 3)
    if not bool(out["valid"][0]):  # the crop missed the box entirely: it must be dropped, not kept degenerate
        assert not np.any(out["image"].numpy()[..., 0] > 2.0)
        return
    box = out["boxes"].numpy()[0]
    np.testing.assert_allclose(box, _white_extent(out["image"].numpy()), atol=1.5)
    assert not np.any(out["valid"].numpy()[1:])


def test_eval_preprocessing_keeps_scale_and_pads():
    example = _box_example(64, 256, [(10, 20, 30, 60)])
    out = preprocess.preprocess(example, training=False, output_size=128, max_instances=3)
    assert float(out["scale"]) == pytest.approx(0.5)
    np.testing.assert_allclose(out["boxes"].numpy()[0], [5, 10, 15, 30], atol=1e-4)
    np.testing.assert_array_equal(out["original_size"].numpy(), [64, 256])
    # Bottom half is padding (zeros after normalisation).
    assert np.all(out["image"].numpy()[40:] == 0)


def test_degenerate_boxes_dropped_and_padding():
    example = _box_example(100, 100, [(10, 10, 40, 40), (50, 50, 50, 80), (60, 60, 90, 90)], labels=[1, 2, 3])
    out = preprocess.preprocess(example, training=False, output_size=128, max_instances=4)
    np.testing.assert_array_equal(out["valid"].numpy(), [True, True, False, False])
    np.testing.assert_array_equal(out["classes"].numpy(), [1, 3, 0, 0])


def test_image_without_objects():
    example = _box_example(50, 50, [])
    example["objects"]["bbox"] = tf.zeros([0, 4], tf.float32)
    for training in (True, False):
        out = preprocess.preprocess(
            example, training=training, output_size=64, max_instances=4, seed=tf.constant([0, 1], tf.int64)
        )
        assert not np.any(out["valid"].numpy())


def test_preprocessing_inside_tf_data_matches_eager():
    examples = [_box_example(80, 60, [(10, 10, 50, 40)]), _box_example(70, 90, [(5, 30, 60, 80)])]
    ds = tf.data.Dataset.from_tensor_slices(
        {
            "image": tf.stack([tf.image.resize(e["image"], [80, 90]) for e in examples]),
            "image/id": tf.constant([1, 2], tf.int64),
            "objects": {
                "bbox": tf.stack([e["objects"]["bbox"] for e in examples]),
                "label": tf.constant([[1], [2]], tf.int64),
                "is_crowd": tf.constant([[False], [False]]),
            },
        }
    )
    fn = lambda i, ex: preprocess.preprocess(  # noqa: E731
        ex,
        training=True,
        output_size=64,
        max_instances=2,
        seed=tf.stack([i, tf.constant(9, tf.int64)]),
        scale_min=0.8,
        scale_max=1.2,
    )
    graph = list(ds.enumerate().map(fn).as_numpy_iterator())
    for i, ex in enumerate(ds):
        eager = fn(tf.constant(i, tf.int64), ex)
        np.testing.assert_allclose(graph[i]["image"], eager["image"].numpy(), atol=1e-5)
        np.testing.assert_allclose(graph[i]["boxes"], eager["boxes"].numpy(), atol=1e-5)


def test_input_normalisation_option_rgb_and_bgr():
    """model.input: (pixel - mean) / std in the weights' channel order, checked against NumPy."""
    from scaledet_jax import defaults
    from scaledet_jax.data import pipeline

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 10
    example = {
        "image": tf.constant(rgb),
        "image/id": tf.constant(1, tf.int64),
        "objects": {
            "bbox": tf.zeros([0, 4], tf.float32),
            "label": tf.zeros([0], tf.int64),
            "is_crowd": tf.zeros([0], tf.bool),
        },
    }
    config = defaults.get_config()
    imagenet = preprocess.preprocess(
        example, training=False, output_size=8, max_instances=1, normalization=pipeline.normalization(config)
    )["image"].numpy()
    np.testing.assert_allclose(
        imagenet[0, 0], (np.array([200, 100, 10]) - preprocess.MEAN_RGB) / preprocess.STDDEV_RGB, rtol=1e-6
    )

    config.model.input.update(dict(mean=(102.98, 115.95, 122.77), std=(1.0, 1.0, 1.0), channels="bgr"))
    bgr = preprocess.preprocess(
        example, training=False, output_size=8, max_instances=1, normalization=pipeline.normalization(config)
    )["image"].numpy()
    np.testing.assert_allclose(bgr[0, 0], np.array([10, 100, 200]) - np.array([102.98, 115.95, 122.77]), rtol=1e-6)

    config.model.input.channels = "grb"
    with pytest.raises(Exception, match="'rgb' or 'bgr'"):
        pipeline.normalization(config)
