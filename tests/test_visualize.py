"""The results picture tool: masks tinted where the results say, low scores left out, one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from configs_util import CONFIG_DIR
from PIL import Image

from scaledet_jax.cli import UserError
from scaledet_jax.data import synthetic
from scaledet_jax.tools import visualize


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    synthetic.write_split(str(root), "val", 3, seed=5)
    return root


def _results(folder, score=0.9):
    """The ground truth as COCO results (RLE masks), plus one low-scoring fake per image."""
    from pycocotools.coco import COCO

    coco = COCO(str(folder / "annotations" / "instances_val.json"))
    results = []
    for ann in coco.dataset["annotations"]:
        rle = coco.annToRLE(ann)
        rle["counts"] = rle["counts"].decode()
        results.append(
            {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": score,
             "segmentation": rle}
        )  # fmt: skip
    return coco, results


def test_masks_are_tinted_and_low_scores_left_out(folder, tmp_path):
    coco, results = _results(folder)
    image_id = coco.dataset["images"][0]["id"]
    info = coco.imgs[image_id]
    anns = coco.imgToAnns[image_id]
    biggest = max(anns, key=lambda a: a["area"])
    mask = coco.annToMask(biggest).astype(bool)
    # A low-scoring detection covering the whole image must not be drawn.
    from pycocotools import mask as mask_api

    whole = mask_api.encode(np.asfortranarray(np.ones((info["height"], info["width"]), np.uint8)))
    whole["counts"] = whole["counts"].decode()
    results.append({"image_id": image_id, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.1, "segmentation": whole})
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out = visualize.visualize(
        str(path), str(folder), "val", str(tmp_path / "grid.png"), num_images=3, columns=3, scale=2
    )
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    original = np.asarray(Image.open(folder / "val" / info["file_name"]).convert("RGB")).astype(int)
    assert sheet.shape[1] >= 3 * 2 * info["width"] and sheet.shape[0] >= 2 * info["height"]
    # The biggest object's median pixel (inside it, away from its box edges and label) is tinted 50% with its colour.
    ys, xs = np.nonzero(mask)
    cy, cx = int(np.median(ys)), int(np.median(xs))
    colour = np.asarray(visualize.PALETTE[biggest["category_id"] % len(visualize.PALETTE)])
    covered = [a for a in anns if coco.annToMask(a)[cy, cx]]
    assert covered == [biggest]
    expected = np.clip(np.floor(0.5 * original[cy, cx] + 0.5 * colour + 1e-4), 0, 255)
    np.testing.assert_allclose(sheet[2 * cy, 2 * cx], expected, atol=1)
    # Outside every mask (and away from boxes/labels) the pixel is the image's own: the 0.1 fake is not drawn.
    union = np.zeros_like(mask)
    for a in anns:
        x, y, w, h = a["bbox"]
        union[max(0, int(y) - 14) : int(y + h) + 3, max(0, int(x) - 3) : int(x + w) + 60] = True
    free = np.argwhere(~union)
    assert len(free)
    y, x = free[len(free) // 2]
    np.testing.assert_array_equal(sheet[2 * y, 2 * x], original[y, x])


def test_bad_inputs_are_one_line_errors(folder, tmp_path):
    with pytest.raises(UserError, match="no detections_<step>.json"):
        visualize.newest_results(str(tmp_path))
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]))
    with pytest.raises(UserError, match="none of the images"):
        visualize.visualize(str(other), str(folder), "val", str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
    run = subprocess.run(
        [sys.executable, "-m", "scaledet_jax.tools.visualize", f"--results={tmp_path / 'missing.json'}",
         f"--coco_folder={folder}", f"--output={tmp_path / 'y.png'}"],
        capture_output=True, text=True, cwd=str(CONFIG_DIR.parent), timeout=300,
    )  # fmt: skip
    assert run.returncode == 2
    lines = [line for line in run.stderr.strip().splitlines() if line]
    assert lines[-1].startswith("visualize: error: cannot read results") and "Traceback" not in run.stderr
    assert not (tmp_path / "y.png").exists()
