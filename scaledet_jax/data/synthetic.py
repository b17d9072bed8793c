"""A synthetic detection dataset the project generates itself, written as a COCO-format folder (or, with
``write_voc_folder`` / ``generate_voc``, as a PASCAL VOC year folder).

Filled circles, squares and triangles (three classes) of varied size, colour and position, 1-6 per
image, overlapping at most moderately, on noisy textured backgrounds; boxes, areas and polygon
instance masks in ``annotations/instances_<split>.json``, PNG images in ``<split>/``. The same seed
gives the same files. Used by the quickstart and the tests, so nothing has to be downloaded.

    python -m scaledet_jax.data.synthetic --out=/tmp/shapes --train=600 --val=100 [--format=voc]
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]


# Further shapes for a synthetic set with other classes (fine-tuning experiments): data.synthetic_classes.
SHAPES = ("circle", "square", "triangle", "pentagon", "hexagon", "star", "cross")


def categories_for(classes: str | tuple[str, ...] = "") -> list[dict]:
    """COCO categories (ids 1..N) of the comma-separated shape names; '' = circle, square, triangle."""
    names = [n.strip() for n in classes.split(",")] if isinstance(classes, str) else list(classes)
    names = [n for n in names if n]
    if not names:
        return CATEGORIES
    unknown = [n for n in names if n not in SHAPES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"synthetic classes must be distinct names among {', '.join(SHAPES)}; got {', '.join(names)}")
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(names)]


def _background(rng: np.random.RandomState, height: int, width: int) -> np.ndarray:
    """A smooth colour gradient, random stripes and pixel noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, 3)
    gradient = rng.uniform(-0.4, 0.4, (2, 3))
    image = base + yy[..., None] * gradient[0] + xx[..., None] * gradient[1]
    angle, freq = rng.uniform(0, math.pi), rng.uniform(0.05, 0.3)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * freq)[..., None]
    image = image + stripes * rng.uniform(5, 25, 3) + rng.normal(0, 10, (height, width, 3))
    return np.clip(image, 0, 255)


def _polygon(kind: str, cx: float, cy: float, size: float, rng: np.random.RandomState) -> list[tuple[float, float]]:
    r = size / 2
    if kind == "circle":
        return [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    if kind == "square":
        a = rng.uniform(0, math.pi / 2)
        return [
            (
                cx + r * math.sqrt(2) * math.cos(a + k * math.pi / 2),
                cy + r * math.sqrt(2) * math.sin(a + k * math.pi / 2),
            )
            for k in range(4)
        ]
    if kind in ("pentagon", "hexagon"):
        n, a = (5 if kind == "pentagon" else 6), rng.uniform(0, 2 * math.pi)
        return [
            (cx + r * math.cos(a + k * 2 * math.pi / n), cy + r * math.sin(a + k * 2 * math.pi / n)) for k in range(n)
        ]
    if kind == "star":
        a = rng.uniform(0, 2 * math.pi)
        return [
            (cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(a + k * math.pi / 5),
             cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(a + k * math.pi / 5))
            for k in range(10)
        ]  # fmt: skip
    if kind == "cross":
        w = r / 3
        return [(cx + x, cy + y) for x, y in ((-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r),
                                                (-w, w), (-r, w), (-r, -w), (-w, -w))]  # fmt: skip
    a = rng.uniform(0, 2 * math.pi)
    return [
        (cx + r * 1.2 * math.cos(a + k * 2 * math.pi / 3), cy + r * 1.2 * math.sin(a + k * 2 * math.pi / 3))
        for k in range(3)
    ]


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_example(rng: np.random.RandomState, height: int, width: int, categories: list[dict] = CATEGORIES):
    """One image (uint8 HxWx3) and its objects [(category_id, polygon, (x0, y0, x1, y1))]."""
    image = Image.fromarray(_background(rng, height, width).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(rng.randint(1, 7)):
        for _attempt in range(20):
            category = categories[rng.randint(len(categories))]
            size = rng.uniform(0.12, 0.5) * min(height, width)
            cx, cy = rng.uniform(size / 2, width - size / 2), rng.uniform(size / 2, height - size / 2)
            polygon = _polygon(category["name"], cx, cy, size, rng)
            xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
            box = (max(0.0, min(xs)), max(0.0, min(ys)), min(float(width), max(xs)), min(float(height), max(ys)))
            if all(_iou(box, other[2]) < 0.3 for other in objects):
                break
        else:
            continue
        color = tuple(int(c) for c in rng.randint(0, 256, 3))
        draw.polygon(polygon, fill=color, outline=tuple(max(0, c - 60) for c in color))
        objects.append((category["id"], polygon, box))
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 4, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), objects


def _polygon_area(polygon) -> float:
    xs, ys = np.array([p[0] for p in polygon]), np.array([p[1] for p in polygon])
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def write_split(
    folder: str, split: str, num_images: int, seed: int, min_size: int = 96, max_size: int = 160, classes: str = ""
) -> str:
    """Writes ``folder/<split>/*.png`` and ``folder/annotations/instances_<split>.json``; returns the json path.
    ``classes``: the shapes drawn (``categories_for``)."""
    categories = categories_for(classes)
    rng = np.random.RandomState(seed)
    image_dir = os.path.join(folder, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        height, width = rng.randint(min_size, max_size + 1, 2)
        pixels, objects = make_example(rng, int(height), int(width), categories)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(os.path.join(image_dir, file_name))
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": int(height), "width": int(width)})
        for category_id, polygon, (x0, y0, x1, y1) in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round(_polygon_area(polygon), 2),
                    "iscrowd": 0,
                    "segmentation": [[round(float(v), 2) for point in polygon for v in point]],
                }
            )
    path = os.path.join(folder, "annotations", f"instances_{split}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    os.replace(tmp, path)  # the json appears only once the split is complete
    return path


def generate(folder: str, num_train: int, num_val: int, seed: int = 0, classes: str = "") -> None:
    """Writes the train and held-out 'val' splits (different seeds) unless they already exist (same image
    count and classes)."""
    categories = categories_for(classes)
    for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
        path = os.path.join(folder, "annotations", f"instances_{split}.json")
        if os.path.exists(path):
            with open(path) as f:
                existing = json.load(f)
            if len(existing["images"]) == count and existing["categories"] == categories:
                continue
        write_split(folder, split, count, split_seed, classes=classes)
        # A tfds copy prepared from the old files would be stale.
        shutil.rmtree(os.path.join(folder, "tfds"), ignore_errors=True)


VOC_SPLIT_FILES = ("train", "val", "trainval")


def _voc_xml(image_id: str, file_name: str, height: int, width: int, objects: list[tuple[str, tuple, bool]]) -> bytes:
    """A VOCdevkit-style annotation: <size>, and per object <name>, <pose>, <truncated>, <difficult>, <bndbox>."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "synthetic"
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, box, difficult in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = name
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        ET.SubElement(node, "difficult").text = str(int(difficult))
        bndbox = ET.SubElement(node, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
            ET.SubElement(bndbox, key).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def write_voc_folder(
    folder: str,
    num_images: int,
    seed: int = 0,
    *,
    num_val: int | None = None,
    difficult_fraction: float = 0.15,
    min_size: int = 96,
    max_size: int = 160,
) -> dict[str, list[str]]:
    """Writes the synthetic shapes as a VOC year folder: ``JPEGImages/<id>.jpg`` (ids 000001...),
    ``Annotations/<id>.xml`` and ``ImageSets/Main/{train,val,trainval}.txt`` (the last ``num_val`` images,
    default a quarter, are 'val'). Boxes are the shapes' boxes rounded to whole pixels within [1, width] x
    [1, height] (the numbers the VOC source reads back as its coordinates); class names circle / square /
    triangle (so a VOC folder source numbers them 1-3 as the COCO set does); each object is <difficult> with
    probability ``difficult_fraction``, drawn from its own generator so the images do not depend on it. The
    split files are written last: a folder with them is complete. Returns {split: ids}."""
    rng = np.random.RandomState(seed)
    flags = np.random.RandomState(seed + 7919)
    num_val = num_images // 4 if num_val is None else num_val
    if not 0 <= num_val <= num_images:
        raise ValueError(f"num_val {num_val} must be in [0, {num_images}]")
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    names = {c["id"]: c["name"] for c in CATEGORIES}
    ids = []
    for index in range(num_images):
        height, width = (int(v) for v in rng.randint(min_size, max_size + 1, 2))
        pixels, objects = make_example(rng, height, width)
        image_id = f"{index + 1:06d}"
        Image.fromarray(pixels).save(os.path.join(folder, "JPEGImages", f"{image_id}.jpg"), quality=95)
        voc_objects = []
        for category_id, _, (x0, y0, x1, y1) in objects:
            box = (
                min(max(int(round(x0)), 1), width),
                min(max(int(round(y0)), 1), height),
                min(max(int(round(x1)), 1), width),
                min(max(int(round(y1)), 1), height),
            )
            voc_objects.append((names[category_id], box, bool(flags.uniform() < difficult_fraction)))
        with open(os.path.join(folder, "Annotations", f"{image_id}.xml"), "wb") as f:
            f.write(_voc_xml(image_id, f"{image_id}.jpg", height, width, voc_objects))
        ids.append(image_id)
    splits = {"train": ids[: num_images - num_val], "val": ids[num_images - num_val :], "trainval": ids}
    for split in VOC_SPLIT_FILES:
        path = os.path.join(folder, "ImageSets", "Main", f"{split}.txt")
        with open(path + ".tmp", "w") as f:
            f.write("".join(f"{i}\n" for i in splits[split]))
        os.replace(path + ".tmp", path)
    return splits


def generate_voc(folder: str, num_train: int, num_val: int, seed: int = 0) -> None:
    """``write_voc_folder`` with ``num_train`` + ``num_val`` images unless the folder already holds that many."""
    main = os.path.join(folder, "ImageSets", "Main")
    counts = []
    for split in ("train", "val"):
        try:
            with open(os.path.join(main, f"{split}.txt")) as f:
                counts.append(sum(1 for line in f if line.strip()))
        except OSError:
            counts.append(None)
    if counts == [num_train, num_val]:
        return
    for sub in ("Annotations", "JPEGImages", "ImageSets", "tfds"):
        shutil.rmtree(os.path.join(folder, sub), ignore_errors=True)  # a tfds copy of the old files would be stale
    write_voc_folder(folder, num_train + num_val, seed, num_val=num_val)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("coco", "voc"), default="coco")
    args = parser.parse_args()
    (generate_voc if args.format == "voc" else generate)(args.out, args.train, args.val, args.seed)
    print(f"wrote {args.train} train and {args.val} val images to {args.out}", file=sys.stderr)
