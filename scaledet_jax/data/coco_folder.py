"""A tfds builder for a local COCO-format folder — the format every labelling tool exports.

    folder/
      annotations/instances_<split>.json     COCO json: images, annotations (bbox, category_id, iscrowd)
      <split>/ or images/<split>/            the image files named by ``file_name``

Examples have the structure of tfds ``coco/2017`` (``image``, ``image/id``, ``objects`` with
``bbox`` normalised [ymin, xmin, ymax, xmax], ``label``, ``is_crowd``, ``area``), so both go
through the same preprocessing. ``label`` holds the json's ``category_id`` unchanged. Images are
decoded once when the dataset is prepared (JPEG or PNG; grayscale and RGBA become RGB).
The prepared TFRecords live in ``folder/tfds/`` by default.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow_datasets as tfds


def split_names(folder: str) -> list[str]:
    """Splits available in a COCO folder (one per ``annotations/instances_<split>.json``)."""
    ann_dir = os.path.join(folder, "annotations")
    if not os.path.isdir(ann_dir):
        return []
    return sorted(
        f[len("instances_") : -len(".json")]
        for f in os.listdir(ann_dir)
        if f.startswith("instances_") and f.endswith(".json")
    )


def _image_dir(folder: str, split: str) -> str:
    for candidate in (
        os.path.join(folder, split),
        os.path.join(folder, "images", split),
        os.path.join(folder, "images"),
    ):
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(f"no image directory for split {split!r} in {folder} (expected {folder}/{split}/)")


class CocoFolder(tfds.core.GeneratorBasedBuilder):
    """COCO-format folder -> tfds dataset with the features of ``coco/2017``."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, folder: str, data_dir: str | None = None, **kwargs):
        self._folder = os.path.abspath(folder)
        super().__init__(data_dir=data_dir or os.path.join(self._folder, "tfds"), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"COCO-format folder {self._folder}",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "image/id": np.int64,
                    "image/filename": tfds.features.Text(),
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.BBoxFeature(),
                            "label": np.int64,
                            "is_crowd": np.bool_,
                            "area": np.float32,
                            "id": np.int64,
                        }
                    ),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = split_names(self._folder)
        if not splits:
            raise FileNotFoundError(f"{self._folder} has no annotations/instances_<split>.json")
        return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split: str):
        from PIL import Image

        with open(os.path.join(self._folder, "annotations", f"instances_{split}.json")) as f:
            data = json.load(f)
        image_dir = _image_dir(self._folder, split)
        by_image: dict[int, list] = {}
        for ann in data.get("annotations", []):
            by_image.setdefault(ann["image_id"], []).append(ann)
        for info in data["images"]:
            with Image.open(os.path.join(image_dir, info["file_name"])) as image:
                pixels = np.asarray(image.convert("RGB"))
            height, width = pixels.shape[:2]
            objects = {"bbox": [], "label": [], "is_crowd": [], "area": [], "id": []}
            for ann in by_image.get(info["id"], []):
                x, y, w, h = ann["bbox"]
                if w <= 0 or h <= 0:
                    continue
                objects["bbox"].append(
                    tfds.features.BBox(
                        ymin=float(np.clip(y / height, 0, 1)),
                        xmin=float(np.clip(x / width, 0, 1)),
                        ymax=float(np.clip((y + h) / height, 0, 1)),
                        xmax=float(np.clip((x + w) / width, 0, 1)),
                    )
                )
                objects["label"].append(int(ann["category_id"]))
                objects["is_crowd"].append(bool(ann.get("iscrowd", 0)))
                objects["area"].append(float(ann.get("area", w * h)))
                objects["id"].append(int(ann["id"]))
            yield (
                info["id"],
                {"image": pixels, "image/id": info["id"], "image/filename": info["file_name"], "objects": objects},
            )


def category_names(folder: str, split: str) -> dict[int, str]:
    with open(os.path.join(folder, "annotations", f"instances_{split}.json")) as f:
        return {c["id"]: c["name"] for c in json.load(f)["categories"]}
