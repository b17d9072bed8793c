"""Browse mode (issue 14 item 6): the augmented training examples with their boxes, where the data says."""

import os
import subprocess
import sys

import numpy as np
from configs_util import CONFIG_DIR, load_config
from PIL import Image

from scaledet_jax.data import pipeline
from scaledet_jax.tools import browse
from scaledet_jax.tools.visualize import PALETTE

ROOT = str(CONFIG_DIR.parent)


def _config():
    config = load_config("quickstart")
    config.data.synthetic_train_images = 6
    config.data.synthetic_val_images = 2
    config.data.train_batch_size = 4
    return config


def test_browse_draws_the_trainers_batches_with_their_boxes(tmp_path):
    config = _config()
    pictures, names = browse.browse_pictures(config, str(tmp_path), num_images=5)
    assert names == {1: "circle", 2: "square", 3: "triangle"} and len(pictures) == 5
    batches = pipeline.train_batches(config, pipeline.get_builder(config, str(tmp_path)))
    examples = [(b, i) for b in (next(batches), next(batches)) for i in range(len(b["image"]))][:5]
    mean, std = np.asarray(config.model.input.mean), np.asarray(config.model.input.std)
    own = []
    for picture, (batch, i) in zip(pictures, examples, strict=True):
        drawn = np.asarray(picture).astype(int)
        plain = np.clip(batch["image"][i] * std + mean, 0, 255).round().astype(np.uint8)
        plain = np.repeat(np.repeat(plain, 2, axis=0), 2, axis=1).astype(int)  # drawn at scale 2
        assert drawn.shape == plain.shape
        allowed = np.zeros(drawn.shape[:2], bool)  # box outlines and their labels (top-left corner)
        boxes = 2 * batch["boxes"][i][batch["valid"][i]]
        assert len(boxes) > 0
        colours = {PALETTE[int(c) % len(PALETTE)] for c in batch["classes"][i][batch["valid"][i]]}
        for (y1, x1, y2, x2), c in zip(boxes, batch["classes"][i][batch["valid"][i]], strict=True):
            top, left, bottom, right = (int(np.floor(v)) for v in (y1, x1, y2, x2))
            band = np.zeros_like(allowed)
            band[max(top - 3, 0) : bottom + 4, max(left - 3, 0) : right + 4] = True
            band[top + 4 : bottom - 3, left + 4 : right - 3] = False
            allowed |= band
            allowed[max(top - 3, 0) : top + 16, max(left - 3, 0) : left + 110] = True
            # the box's left edge, half-way down, is in its class colour (another box may be drawn over it)
            middle = (top + bottom) // 2
            if bottom - top > 40:
                edge = {tuple(drawn[middle, left]), tuple(drawn[middle, left + 1])}
                own.append(PALETTE[int(c) % len(PALETTE)] in edge)
                assert edge & colours, (edge, colours)
        changed = np.any(np.abs(drawn - plain) > 1, axis=-1)  # 1: float32 vs float64 un-normalising
        outside = np.argwhere(changed & ~allowed)
        assert changed.any() and not len(outside), (outside[:10], boxes, len(outside))  # nothing away from boxes
    assert len(own) >= 3 and np.mean(own) >= 0.5


def test_main_browse_writes_a_picture(tmp_path):
    result = subprocess.run(
        [sys.executable, "main.py", "--mode=browse", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
         "--config.data.synthetic_train_images=4", "--config.data.synthetic_val_images=2", "--browse_images=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    path = os.path.join(tmp_path, "browse.png")
    assert f"Wrote {path}" in result.stdout
    with Image.open(path) as picture:
        size = 2 * 128
        assert picture.size == (3 * size + 2 * 4, size)  # 3 pictures in a row, 4 px apart
