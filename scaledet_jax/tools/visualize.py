"""Draws a run's evaluation results on its images: boxes, class names, scores and instance masks.

    python -m scaledet_jax.tools.visualize --workdir=runs/maskrcnn_quickstart --output=maskrcnn.png

Reads the newest ``segmentations_<step>.json`` (or ``detections_<step>.json`` for box-only models) a
run's evaluation wrote, the evaluated split's COCO json for file names and category names, and the
images; writes one PNG: a grid of the first ``--num_images`` images with their detections above
``--score_threshold``. Without ``--coco_folder`` the run's synthetic dataset (``WORKDIR/synthetic_data``,
split ``val``) is used.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
from PIL import Image, ImageDraw

from scaledet_jax.cli import UserError

# Distinct, saturated colours (one per category id, cycling).
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128),
)  # fmt: skip


def newest_results(workdir: str) -> str:
    """The newest ``segmentations_<step>.json``, else ``detections_<step>.json``, of a run."""
    for kind in ("segmentations", "detections"):
        found = glob.glob(os.path.join(workdir, f"{kind}_*.json"))
        steps = [(int(m.group(1)), path) for path in found if (m := re.search(rf"{kind}_(\d+)\.json$", path))]
        if steps:
            return max(steps)[1]
    raise UserError(
        f"no detections_<step>.json or segmentations_<step>.json in {workdir}: evaluate the run first "
        f"(python main.py --mode=eval --workdir={workdir} --config=...)"
    )


def draw_detections(
    image: np.ndarray,
    detections: list[dict],
    names: dict[int, str],
    score_threshold: float = 0.5,
    scale: int = 1,
    show_scores: bool = True,
) -> Image.Image:
    """``image`` [H, W, 3] uint8 with COCO results (``bbox`` [x, y, w, h], ``score``, ``category_id`` and
    optionally an RLE ``segmentation``) drawn on it: masks tinted at 50%, boxes, '<name> <score>' labels.
    ``scale`` enlarges the picture (nearest neighbour) before the boxes and labels are drawn."""
    from pycocotools import mask as mask_api

    kept = sorted((d for d in detections if d["score"] >= score_threshold), key=lambda d: d["score"])
    pixels = image.astype(np.float32)
    for d in kept:
        if "segmentation" in d:
            binary = mask_api.decode(d["segmentation"]).astype(bool)
            if binary.shape != image.shape[:2]:
                raise UserError(
                    f"a mask of image id {d['image_id']} is {binary.shape[1]}x{binary.shape[0]} but the image is "
                    f"{image.shape[1]}x{image.shape[0]}: the results and the images are from different datasets"
                )
            colour = np.asarray(PALETTE[d["category_id"] % len(PALETTE)], np.float32)
            pixels[binary] = 0.5 * pixels[binary] + 0.5 * colour
    picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    for d in kept:
        colour = PALETTE[d["category_id"] % len(PALETTE)]
        if "bbox" in d:
            x, y, w, h = (v * scale for v in d["bbox"])
        else:
            x, y, w, h = (v * scale for v in mask_api.toBbox(d["segmentation"]))
        if not np.all(np.isfinite([x, y, w, h])):  # PIL loops forever on a nan corner
            continue
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=2)
        label = str(names.get(d["category_id"], d["category_id"]))
        if show_scores:
            label += f" {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), label)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
        draw.text((x, y), label, fill=(255, 255, 255))
    return picture


def eval_pictures(
    batch: dict[str, np.ndarray],
    detections: dict[str, np.ndarray],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    names: dict[int, str],
    count: int,
    score_threshold: float = 0.3,
    bgr: bool = False,
) -> list[np.ndarray]:
    """Ground truth (left) next to predictions (right) for the first ``count`` images of an eval batch, in
    network pixels (the normalised input un-normalised and cut to the image's region): uint8 [H, 2W + 4, 3]."""
    from scaledet_jax.evaluate import _xywh
    from scaledet_jax.ops import masks as mask_ops

    pictures = []
    for i in range(min(count, len(batch["image_id"]))):
        if batch["image_id"][i] < 0:
            continue
        h, w = (int(round(float(v) * float(batch["scale"][i]))) for v in batch["original_size"][i])
        h, w = max(1, min(h, batch["image"].shape[1])), max(1, min(w, batch["image"].shape[2]))
        pixels = batch["image"][i, :h, :w] * np.asarray(std) + np.asarray(mean)
        pixels = np.clip(pixels[..., ::-1] if bgr else pixels, 0, 255).astype(np.uint8)
        valid = batch["valid"][i]
        truth = [
            {"bbox": list(map(float, box)), "category_id": int(c), "score": 1.0}
            for box, c in zip(_xywh(batch["boxes"][i][valid]), batch["classes"][i][valid], strict=True)
        ]
        keep = detections["valid"][i] & (detections["scores"][i] >= score_threshold)
        boxes = detections["boxes"][i][keep]
        found = [
            {"bbox": list(map(float, box)), "category_id": int(c), "score": float(s)}
            for box, c, s in zip(
                _xywh(boxes), detections["classes"][i][keep], detections["scores"][i][keep], strict=True
            )
        ]
        if "masks" in detections and len(found):
            pasted = mask_ops.paste_masks(detections["masks"][i][keep], boxes, h, w)
            for d, rle in zip(found, mask_ops.encode_masks(pasted), strict=True):
                d["segmentation"] = rle
        left = draw_detections(pixels, truth, names, 0.0, show_scores=False)
        right = draw_detections(pixels, found, names, score_threshold)
        pictures.append(np.asarray(grid([left, right], 2)))
    return pictures


def grid(pictures: list[Image.Image], columns: int) -> Image.Image:
    """Pictures side by side in rows of ``columns``, each cell the size of the largest, on white."""
    width = max(p.width for p in pictures)
    height = max(p.height for p in pictures)
    rows = -(-len(pictures) // columns)
    sheet = Image.new("RGB", (columns * width + (columns - 1) * 4, rows * height + (rows - 1) * 4), (255, 255, 255))
    for i, picture in enumerate(pictures):
        sheet.paste(picture, ((i % columns) * (width + 4), (i // columns) * (height + 4)))
    return sheet


def visualize(
    results: str,
    coco_folder: str,
    split: str,
    output: str,
    num_images: int = 8,
    score_threshold: float = 0.5,
    columns: int = 4,
    scale: int = 2,
) -> str:
    """Writes the grid PNG to ``output`` (atomically) and returns its path."""
    from scaledet_jax.data import coco_folder as folder_api

    if not output.lower().endswith(".png"):
        raise UserError(f"--output must name a .png file, got {output!r}")
    try:
        with open(results) as f:
            detections = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read results {results}: {e}") from None
    if not isinstance(detections, list):
        raise UserError(f"{results} is not a COCO results list")
    index = folder_api.load_split(coco_folder, split)
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        by_image.setdefault(int(d["image_id"]), []).append(d)
    chosen = [(image_id, name) for image_id, name in index.images if image_id in by_image][:num_images]
    if not chosen:
        raise UserError(f"none of the images in {results} is in {index.json_path}: results from another dataset?")
    pictures = [
        draw_detections(
            folder_api.read_rgb(os.path.join(index.image_dir, name)),
            by_image[image_id],
            index.categories,
            score_threshold,
            scale,
        )
        for image_id, name in chosen
    ]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    temporary = output + ".tmp.png"
    grid(pictures, min(columns, len(pictures))).save(temporary)
    os.replace(temporary, output)
    return output


def main(argv: list[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if not f.workdir and not f.results:
        raise UserError("give --workdir=RUN (its newest evaluation results) or --results=FILE.json")
    results = f.results or newest_results(f.workdir)
    folder = f.coco_folder or (os.path.join(f.workdir, "synthetic_data") if f.workdir else "")
    if not folder:
        raise UserError("--coco_folder is required with --results (the folder whose split was evaluated)")
    path = visualize(results, folder, f.split, f.output, f.num_images, f.score_threshold, f.columns, f.scale)
    print(f"wrote {path} ({os.path.basename(results)})")


if __name__ == "__main__":
    from absl import flags

    from scaledet_jax.cli import run_app

    flags.DEFINE_string("workdir", None, "A run directory with evaluation results.")
    flags.DEFINE_string("results", None, "A COCO results json (default: the run's newest).")
    flags.DEFINE_string("coco_folder", None, "The evaluated COCO folder (default: WORKDIR/synthetic_data).")
    flags.DEFINE_string("split", "val", "The evaluated split.")
    flags.DEFINE_string("output", None, "The PNG to write.", required=True)
    flags.DEFINE_integer("num_images", 8, "How many images.")
    flags.DEFINE_float("score_threshold", 0.5, "Draw detections scoring at least this.")
    flags.DEFINE_integer("columns", 4, "Images per row.")
    flags.DEFINE_integer("scale", 2, "Enlarge each image this many times (small images).")
    run_app(main, "visualize")
