"""A trained or converted detector as one Python object: images in, detections in original pixels out.

    from scaledet_jax.detector import Detector

    detector = Detector.from_checkpoint("runs/quickstart")  # a run's workdir (its newest checkpoint)
    for found in detector.predict([image]):                # uint8 [H, W, 3] (or [H, W] / [H, W, 4]) arrays
        print(found["boxes"], found["scores"], found["names"])  # boxes [N, 4] x1, y1, x2, y2 in the image's pixels

Images of any size and aspect are resized keeping their aspect ratio to the model's input size and padded,
exactly as evaluation does (``data.preprocess.preprocess``), or as a converted checkpoint's source does at test
time (``model.test_resize``, recorded by the converter: ``data/test_resize.py``); boxes (and masks) are mapped
back to the original pixels. Predict is jit-compiled once per input shape; batches are padded to ``batch_size``
so that one compilation serves every call.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from scaledet_jax.cli import UserError
from scaledet_jax.data import test_resize
from scaledet_jax.data.test_resize import Resized

CARD = "detector.json"  # in a run's workdir: the config and the training data's class names


def write_card(workdir: str, config: ml_collections.ConfigDict, categories: dict[int, str]) -> str:
    """``WORKDIR/detector.json``: what ``Detector.from_checkpoint`` needs besides the checkpoint (atomically)."""
    path = os.path.join(workdir, CARD)
    card = {
        "config": json.loads(config.to_json_best_effort()),
        "categories": {str(k): v for k, v in categories.items()},
    }
    with open(path + ".tmp", "w") as f:
        json.dump(card, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the configs use."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def read_card(workdir: str) -> tuple[ml_collections.ConfigDict | None, dict[int, str]]:
    """(config, {category id: name}) from a run's ``detector.json``; (None, {}) when the run predates it."""
    path = os.path.join(workdir, CARD)
    if not os.path.exists(path):
        return None, {}
    with open(path) as f:
        card = json.load(f)
    return ml_collections.ConfigDict(_tuples(card["config"])), {int(k): v for k, v in card["categories"].items()}


def newest_checkpoint(workdir: str) -> str | None:
    """The newest ``WORKDIR/checkpoints/<step>`` folder holding a finished checkpoint, or None."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    steps = sorted((int(name) for name in os.listdir(directory) if name.isdigit()), reverse=True)
    for step in steps:
        path = os.path.join(directory, str(step))
        if os.path.isdir(os.path.join(path, "default")):
            return path
    return None


def restore_variables(step_dir: str) -> dict[str, Any]:
    """{'params', 'batch_stats'} of a training checkpoint as host arrays; the EMA parameters when the run kept
    them (what evaluation uses)."""
    import orbax.checkpoint as ocp

    path = os.path.join(step_dir, "default")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(path, restore_args=restore_args)
    params = state.get("ema_params") or state["params"]
    return {"params": params, "batch_stats": state.get("batch_stats", {})}


def _check_fits(task, config, variables: dict[str, Any], where: str) -> None:
    """One line naming the first tensor whose name or shape differs from what ``config`` builds."""
    expected = jax.eval_shape(lambda: task.init({"params": jax.random.key(0)}, config.model.image_size))
    flat = lambda tree: {  # noqa: E731
        jax.tree_util.keystr(path): tuple(np.shape(x)) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    for collection in ("params", "batch_stats"):
        want, have = flat(expected.get(collection, {})), flat(variables.get(collection, {}))
        for name in sorted(set(want) | set(have)):
            if want.get(name) != have.get(name):
                raise UserError(
                    f"{where} does not fit the config: {collection}{name} is {have.get(name, 'missing')} there, "
                    f"{want.get(name, 'absent')} in the model the config builds; give the config it was trained "
                    "or converted with (--config=...)"
                )


class Detector:
    """A detector ready to run on images: ``predict(images) -> [per image: boxes, scores, classes, names, masks]``."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        variables: dict[str, Any],
        categories: dict[int, str] | None = None,
        batch_size: int = 1,
        dtype: Any = np.float32,
    ) -> None:
        """``dtype``: of the model's input; float64 (with float64 variables, under ``jax.enable_x64``) runs the
        whole detector in double precision, as the parity tests compare it with its source."""
        from scaledet_jax.tasks import build_task

        self.config = config
        self.categories = dict(categories or {})
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.task = build_task(config)
        self.variables = jax.device_put(variables)
        self._predict = jax.jit(self.task.predict)
        self._prepare = None
        test_resize.style_of(config)  # an unknown style is one line here, not at the first image
        # mmdetection v1's "+1" boxes: they map back to original pixels by their inclusive corners.
        self._plus_one = config.model.get("detection", {}).get("clip", "image") == "plus_one"

    @classmethod
    def from_checkpoint(
        cls, path: str, config: ml_collections.ConfigDict | None = None, batch_size: int = 1
    ) -> Detector:
        """From a run's workdir (its newest checkpoint, its ``detector.json`` config and class names) or a
        converted checkpoint directory (``python -m scaledet_jax.convert``; ``config`` is then required).
        A ``config`` given for a run overrides the one it stored."""
        from scaledet_jax.convert import checkpoint as converted
        from scaledet_jax.tasks import build_task

        if not os.path.isdir(path):
            raise UserError(f"{path} is not a directory: give a run's workdir or a converted checkpoint directory")
        categories: dict[int, str] = {}
        if os.path.isfile(os.path.join(path, converted.INFO_FILE)):  # written by python -m scaledet_jax.convert
            if config is None:
                raise UserError(f"{path} is a converted checkpoint: give the model's config too (--config=...)")
            config = ml_collections.ConfigDict(config.to_dict())
            converted.apply_model_options(config, path)
            variables = converted.load_converted(path)
            categories = coco_names(config)
        else:
            step_dir = newest_checkpoint(path)
            if step_dir is None:
                raise UserError(
                    f"no checkpoint in {os.path.join(path, 'checkpoints')}: train first, or point at a converted "
                    "checkpoint directory"
                )
            stored, categories = read_card(path)
            config = config or stored
            if config is None:
                raise UserError(f"{path} has no {CARD} (trained before it was written): give its config (--config=...)")
            variables = restore_variables(step_dir)
        _check_fits(build_task(config), config, variables, path)
        return cls(config, variables, categories, batch_size)

    def _letterbox(self, image: np.ndarray) -> Resized:
        """uint8 [H, W, 3] -> the model's normalised, padded input, as evaluation prepares it."""
        if self._prepare is None:
            import tensorflow as tf

            from scaledet_jax.data import pipeline, preprocess

            pipeline._hide_accelerators_from_tf()
            config = self.config

            def prepare(pixels):
                out = preprocess.preprocess(
                    preprocess.image_only_example(pixels),
                    training=False,
                    output_size=config.model.image_size,
                    max_instances=1,
                    normalization=pipeline.normalization(config),
                )
                return out["image"], out["scale"]

            self._prepare = tf.function(prepare, input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        pixels, scale = self._prepare(image)
        size = float(self.config.model.image_size)
        return Resized(pixels.numpy(), (size, size), (float(scale.numpy()),) * 2)

    def _resize(self, image: np.ndarray) -> Resized:
        if test_resize.style_of(self.config) == "letterbox":
            return self._letterbox(image)
        return test_resize.resize_for_model(image, self.config, np.dtype(self.dtype).type)

    def _run(self, batch: np.ndarray, resized: list[Resized]) -> dict[str, np.ndarray]:
        """The jitted predict on one batch; a source's resize also gives each image's extent (clipping) and
        mmdetection's scale factor (its NMS compares boxes in original pixels)."""
        if test_resize.style_of(self.config) == "letterbox":  # as evaluation: boxes clipped to the whole input
            return jax.device_get(self._predict(self.variables, batch))
        sizes = np.tile(np.asarray(batch.shape[1:3], np.float32), (len(batch), 1))
        scales = np.ones(len(batch), np.float32)
        for i, item in enumerate(resized):
            sizes[i], scales[i] = item.valid_hw, item.scale_yx[0]
        extra = {"nms_scales": scales} if self._plus_one else {}
        return jax.device_get(self._predict(self.variables, batch, image_sizes=sizes, **extra))

    def predict(self, images: Sequence[np.ndarray] | np.ndarray, score_threshold: float = 0.0) -> list[dict]:
        """Detections of each image (uint8 [H, W, 3] RGB, [H, W] gray or [H, W, 4] RGBA; a list, a stacked
        [B, H, W, 3] array, or one image: a list of one) as a dict: ``boxes`` [N, 4] float32 (x1, y1, x2, y2
        in the image's pixels), ``scores`` [N], ``classes`` [N] (category ids), ``names`` [N] and, for Mask
        R-CNN, ``masks`` [N, H, W] bool — highest score first, those below ``score_threshold`` dropped.

        Images are resized as ``model.test_resize`` says (``data/test_resize.py``): ours letterboxes every
        image to the square ``image_size``; a converted checkpoint's source may keep the aspect ratio, which
        gives other input shapes. Images of one input shape run together, ``batch_size`` at a time; each shape
        compiles once."""
        from scaledet_jax.data.coco_folder import to_rgb8

        if isinstance(images, np.ndarray):  # one image [H, W(, C)] or a stack [B, H, W, C]
            images = list(images) if images.ndim == 4 else [images]
        rgb = [to_rgb8(image) if not isinstance(image, np.ndarray) else as_rgb(image) for image in images]
        resized = [self._resize(image) for image in rgb]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(resized):
            by_shape.setdefault(item.pixels.shape, []).append(index)
        results: list[dict | None] = [None] * len(rgb)
        for shape, indices in by_shape.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = np.zeros((self.batch_size, *shape), self.dtype)  # fixed batch: one compilation a shape
                for i, index in enumerate(chunk):
                    batch[i] = resized[index].pixels
                found = self._run(batch, [resized[index] for index in chunk])
                for i, index in enumerate(chunk):
                    results[index] = self._one_image(found, i, rgb[index].shape[:2], resized[index], score_threshold)
        return results

    def _one_image(self, found: dict, i: int, hw: tuple[int, int], resized: Resized, threshold: float) -> dict:
        from scaledet_jax.ops import masks as mask_ops

        height, width = hw
        keep = found["valid"][i] & (found["scores"][i] >= threshold)
        order = np.argsort(-found["scores"][i][keep], kind="stable")
        boxes_yx = test_resize.boxes_to_original(found["boxes"][i][keep][order], resized, self._plus_one)
        boxes_yx = np.clip(boxes_yx, 0, [height, width, height, width])
        classes = found["classes"][i][keep][order].astype(np.int64)
        result = {
            "boxes": boxes_yx[:, [1, 0, 3, 2]].astype(np.float32),
            "scores": found["scores"][i][keep][order].astype(np.float32),
            "classes": classes,
            "names": [self.categories.get(int(c), str(int(c))) for c in classes],
        }
        if "masks" in found:
            probabilities = found["masks"][i][keep][order]
            if self.config.model.detection.get("mask_paste", "torchvision") == "mmdet":
                result["masks"] = mask_ops.paste_masks_mmdet(probabilities, boxes_yx, height, width)
            else:
                result["masks"] = mask_ops.paste_masks(probabilities, boxes_yx, height, width)
        return result


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] from [H, W] (gray), [H, W, 1], [H, W, 3] or [H, W, 4] (alpha dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise UserError(f"images must be uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise UserError(f"an image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


# The 80 COCO category names at their ids (1..90 with gaps), for checkpoints converted from COCO-trained sources.
COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def coco_names(config: ml_collections.ConfigDict) -> dict[int, str]:
    """COCO's names at COCO's category ids when the model's outputs are COCO's classes (80 or 90/91), else {}."""
    from scaledet_jax.data.preprocess import COCO_80_TO_91

    m = config.model
    ids = tuple(m.get("category_ids", ())) or None
    if ids is None and m.num_classes not in (81, 90, 91):
        return {}
    return {int(category): name for category, name in zip(COCO_80_TO_91, COCO_NAMES, strict=True)}
