"""Runs a detector on your images: one annotated PNG per image and a COCO results json.

    python -m scaledet_jax.predict --workdir=runs/quickstart --input='photos/*.jpg' --output=predictions
    python -m scaledet_jax.predict --init_from=converted/spinenet49 --config=configs/spinenet49.py \\
        --input=photos/ --output=predictions [--score_threshold=0.3] [--batch_size=4]

``--workdir``: a run (its newest checkpoint; config and class names from its ``detector.json``, ``--config``
overrides); ``--init_from``: a converted checkpoint directory (``--config`` required). ``--input``: an image, a
directory (its JPEG/PNG/BMP/GIF/TIFF/WebP files) or a glob. Writes ``OUTPUT/<name>.png`` per image (boxes, class
names, scores, masks) and ``OUTPUT/detections.json`` (COCO results: ``image_id`` is the image's index in
``OUTPUT/images.json``, which lists the file names and sizes). A file that cannot be read gets one line and the
rest still run; the exit status is 2 when no image could be read.
"""

from __future__ import annotations

import glob
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402

from scaledet_jax.cli import UserError, config_from_flags, define_config_flag, run_app  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

define_config_flag()
flags.DEFINE_string("workdir", None, "A training run's workdir: its newest checkpoint is used.")
flags.DEFINE_string("init_from", None, "A converted checkpoint directory (python -m scaledet_jax.convert).")
flags.DEFINE_string("input", None, "An image file, a directory of images, or a glob ('photos/*.jpg').")
flags.DEFINE_string("output", None, "Directory for the annotated PNGs and detections.json.")
flags.DEFINE_float("score_threshold", 0.3, "Detections below this score are not drawn nor written.")
flags.DEFINE_integer("batch_size", 1, "Images per predict call (compiled once for this size).")
FLAGS = flags.FLAGS


def find_images(pattern: str) -> list[str]:
    """The image files ``pattern`` names: a file, a directory's images (sorted), or a glob's matches."""
    if os.path.isdir(pattern):
        names = sorted(os.listdir(pattern))
        return [os.path.join(pattern, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    if os.path.isfile(pattern):
        return [pattern]
    return sorted(p for p in glob.glob(pattern) if os.path.isfile(p))


def _output_names(paths: list[str]) -> list[str]:
    """A distinct PNG name per input (``a.jpg`` and ``a.png`` both exist: ``a.png``, ``a_1.png``)."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, k = f"{stem}.png", 0
        while name in used:
            k += 1
            name = f"{stem}_{k}.png"
        used.add(name)
        names.append(name)
    return names


def _write_atomically(path: str, write) -> None:
    temporary = path + ".partial"
    write(temporary)
    os.replace(temporary, path)


def coco_results(image_id: int, found: dict) -> list[dict]:
    """One image's detections in COCO results format (``bbox`` [x, y, w, h]; ``segmentation`` RLE with masks)."""
    from scaledet_jax.ops import masks as mask_ops

    results = []
    rles = mask_ops.encode_masks(found["masks"]) if "masks" in found and len(found["scores"]) else None
    for k, (box, score, category) in enumerate(zip(found["boxes"], found["scores"], found["classes"], strict=True)):
        x1, y1, x2, y2 = (float(v) for v in box)
        result = {
            "image_id": image_id,
            "category_id": int(category),
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "score": round(float(score), 5),
        }
        if rles is not None:
            result["segmentation"] = rles[k]
        results.append(result)
    return results


def predict_files(detector, paths: list[str], output: str, score_threshold: float) -> tuple[int, list[str]]:
    """Runs ``detector`` on ``paths`` and writes the pictures, ``detections.json`` and ``images.json`` into
    ``output``; returns (images done, one line per file that could not be read)."""
    from tqdm import tqdm

    from scaledet_jax.data.coco_folder import read_rgb
    from scaledet_jax.tools.visualize import draw_detections

    os.makedirs(output, exist_ok=True)
    names = _output_names(paths)
    images, results, problems = [], [], []
    progress = tqdm(total=len(paths), unit="image", desc="predict", file=sys.stderr, dynamic_ncols=True)
    for start in range(0, len(paths), detector.batch_size):
        chunk, pixels = [], []
        for path, name in zip(paths[start : start + detector.batch_size], names[start:], strict=False):
            try:
                pixels.append(read_rgb(path))
                chunk.append((path, name))
            except Exception as error:  # noqa: BLE001 - any unreadable file is reported in one line and skipped
                problems.append(f"{path}: cannot read it as an image ({type(error).__name__}: {error})")
                progress.update(1)
        if not chunk:
            continue
        for (path, name), image, found in zip(chunk, pixels, detector.predict(pixels, score_threshold), strict=True):
            image_id = len(images)
            images.append({"id": image_id, "file_name": path, "height": image.shape[0], "width": image.shape[1]})
            drawn = coco_results(image_id, found)
            results.extend(drawn)
            picture = draw_detections(image, drawn, detector.categories, score_threshold)
            _write_atomically(os.path.join(output, name), lambda p, picture=picture: picture.save(p, format="PNG"))
            progress.update(1)
    progress.close()
    categories = [{"id": k, "name": v} for k, v in sorted(detector.categories.items())]
    listing = {"images": images, "categories": categories}
    for filename, content in (("detections.json", results), ("images.json", listing)):

        def write(p, content=content):
            with open(p, "w") as f:
                json.dump(content, f)

        _write_atomically(os.path.join(output, filename), write)
    return len(images), problems


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    if bool(FLAGS.workdir) == bool(FLAGS.init_from):
        raise UserError("give one of --workdir=RUN (a training run) or --init_from=DIR (a converted checkpoint)")
    if not FLAGS.input or not FLAGS.output:
        raise UserError("--input=IMAGE|DIR|GLOB and --output=DIR are required")
    if FLAGS.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {FLAGS.batch_size}")
    paths = find_images(FLAGS.input)
    if not paths:
        raise UserError(f"no image files found at {FLAGS.input!r} (a file, a directory of images, or a glob)")
    config = config_from_flags() if FLAGS["config"].present else None
    from scaledet_jax.detector import Detector

    detector = Detector.from_checkpoint(FLAGS.workdir or FLAGS.init_from, config, batch_size=FLAGS.batch_size)
    done, problems = predict_files(detector, paths, FLAGS.output, FLAGS.score_threshold)
    for line in problems:
        print(f"predict: skipped {line}", file=sys.stderr)
    if not done:
        raise UserError(f"none of the {len(paths)} files could be read as an image")
    message = f"Wrote {done} annotated images, detections.json and images.json to {FLAGS.output}"
    logging.info(message)
    print(message + (f" ({len(problems)} files skipped)" if problems else ""))


if __name__ == "__main__":
    run_app(main, "python -m scaledet_jax.predict")
