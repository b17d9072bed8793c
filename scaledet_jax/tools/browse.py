"""Look at your training data as the model will see it, before a long run.

    python main.py --mode=browse --config=configs/quickstart.py --workdir=runs/quickstart [--browse_images=8]

Draws the first training batches, after augmentation (flip, scale jitter, crop) and exactly as the trainer
gets them (``data.pipeline.train_batches``, un-normalised, drawn 2x), with their ground-truth boxes and class
names; writes ``WORKDIR/browse.png``. Boxes that do not sit on
their objects here mean the annotations or the preprocessing are wrong.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from PIL import Image

from scaledet_jax.cli import UserError


def browse_pictures(
    config: ml_collections.ConfigDict, workdir: str, num_images: int = 8
) -> tuple[list[Image.Image], dict[int, str]]:
    """The first ``num_images`` augmented training examples with their boxes drawn, and the class names."""
    from scaledet_jax.data import pipeline
    from scaledet_jax.tools.visualize import draw_detections

    if num_images < 1:
        raise UserError(f"the number of images to browse must be at least 1, got {num_images}")
    builder = pipeline.get_builder(config, workdir)
    names = pipeline.dataset_categories(config, workdir, builder)
    spec = config.model.input
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    bgr = spec.get("channels", "rgb") == "bgr"
    pictures: list[Image.Image] = []
    for batch in pipeline.train_batches(config, builder):
        for i in range(len(batch["image"])):
            pixels = batch["image"][i] * std + mean
            pixels = np.clip(pixels[..., ::-1] if bgr else pixels, 0, 255).round().astype(np.uint8)
            valid = batch["valid"][i]
            objects = [
                {
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "category_id": int(c),
                    "score": 1.0,
                }
                for (y1, x1, y2, x2), c in zip(batch["boxes"][i][valid], batch["classes"][i][valid], strict=True)
            ]
            pictures.append(draw_detections(pixels, objects, names, 0.0, scale=2, show_scores=False))
            if len(pictures) == num_images:
                return pictures, names
    return pictures, names


def browse(config: ml_collections.ConfigDict, workdir: str, num_images: int = 8, output: str = "") -> str:
    """Writes the pictures of ``browse_pictures`` as one grid PNG (``WORKDIR/browse.png`` by default, atomically)."""
    from scaledet_jax.tools.visualize import grid

    pictures, _ = browse_pictures(config, workdir, num_images)
    output = output or os.path.join(workdir, "browse.png")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    temporary = output + ".tmp.png"
    grid(pictures, min(4, len(pictures))).save(temporary)
    os.replace(temporary, output)
    return output
