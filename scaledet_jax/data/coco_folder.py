"""A tfds builder for a local COCO-format folder — the format every labelling tool exports.

    folder/
      annotations/instances_<split>.json     COCO json: images, annotations (bbox, category_id, iscrowd,
                                             segmentation)
      <split>/ or images/<split>/            the image files named by ``file_name``

Examples have the structure of tfds ``coco/2017`` (``image``, ``image/id``, ``objects`` with
``bbox`` normalised [ymin, xmin, ymax, xmax], ``label``, ``is_crowd``, ``area``), so both go
through the same preprocessing, plus ``objects/mask``: one binary instance mask per object
([H, W, 1] uint8 0/1, PNG), decoded from the annotation's ``segmentation`` with pycocotools as
``COCO.annToMask`` does (polygons, uncompressed RLE as COCO's crowd regions have, compressed RLE);
an annotation without one gets its box filled. ``label`` holds the json's ``category_id``
unchanged. Images are decoded once when the dataset is prepared (JPEG or PNG; grayscale and RGBA
become RGB; 16-bit grayscale is scaled to 8 bit by its bit depth).

``prepare`` is the checked way in: it validates every json and decodes every image *before* tfds
writes anything (a data error is one ``UserError`` line naming the json, the image or annotation id
and the file; unreadable images can be left out with ``skip_bad_images``), and keys the prepared
copy by a content fingerprint (the jsons' bytes, the image files' names and sizes), so an edited
annotation file is prepared again while an unchanged folder reuses its copy. Copies live in
``<root>/<fingerprint>/``, where root is ``cache_dir`` when given, else ``folder/tfds`` when the
folder is writable, else a fallback (the run's ``WORKDIR/prepared_data``): a read-only folder works.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import gc
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from scaledet_jax.cli import UserError

# Bump when the prepared examples change for the same files (2: 16-bit images scaled, fingerprinted copies;
# 3: objects/mask). It is part of the fingerprint, so copies prepared in an older format are not reused.
FORMAT_VERSION = 3
SUMMARY_FILE = "prepared.json"
SKIP_HINT = "set --config.data.skip_bad_images=True to leave unreadable images out"
_FINGERPRINT_DIR = re.compile(r"^[0-9a-f]{16}$")
_PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


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


def json_path(folder: str, split: str) -> str:
    return os.path.join(folder, "annotations", f"instances_{split}.json")


def _find_image_dir(folder: str, split: str) -> str | None:
    for candidate in (
        os.path.join(folder, split),
        os.path.join(folder, "images", split),
        os.path.join(folder, "images"),
    ):
        if os.path.isdir(candidate):
            return candidate
    return None


def _image_dir(folder: str, split: str) -> str:
    found = _find_image_dir(folder, split)
    if found is None:
        raise UserError(
            f"no image folder for split {split!r} in {folder}: expected {os.path.join(folder, split)}/, "
            f"{os.path.join(folder, 'images', split)}/ or {os.path.join(folder, 'images')}/"
        )
    return found


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


class UnsupportedImage(ValueError):
    """An image whose pixels have no defined 8-bit RGB form (float pixels, unknown bit depth)."""


def _bit_depth(image) -> int | None:
    """Bits per sample of a PIL mode-'I' image, where the file says (PNG: always 16; TIFF: its tag)."""
    if image.format == "PNG":
        return 16
    if image.format == "TIFF":
        bits = getattr(image, "tag_v2", {}).get(258)  # BitsPerSample
        if isinstance(bits, tuple | list):
            bits = bits[0] if bits else None
        return int(bits) if bits else None
    return None


def to_rgb8(image) -> np.ndarray:
    """A decoded PIL image -> uint8 [H, W, 3] RGB.

    16-bit grayscale (PIL modes ``I;16*``, and ``I`` from PNG/TIFF) keeps its top 8 bits
    (``>> (bits - 8)``) instead of PIL's ``convert('RGB')``, which clips every value above 255 to
    white. 16-bit RGB(A) PNGs already arrive as 8-bit RGB(A) from PIL (its top byte).
    Float pixels (mode ``F``) and integer pixels of unknown bit depth raise ``UnsupportedImage``.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        bits = 16 if mode.startswith("I;16") else _bit_depth(image)
        if bits is None or not 8 <= bits <= 32:
            raise UnsupportedImage(f"{mode} pixels of unknown bit depth; save it as 8-bit RGB or grayscale")
        pixels = np.asarray(image).astype(np.int64)
        if pixels.min() < 0 or pixels.max() >= 2**bits:
            raise UnsupportedImage(f"{mode} pixels outside 0..{2**bits - 1}; save it as 8-bit RGB or grayscale")
        gray = (pixels >> (bits - 8)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        raise UnsupportedImage("floating-point pixels (mode F); save it as 8-bit RGB or grayscale")
    return np.asarray(image.convert("RGB"))


def read_rgb(path: str) -> np.ndarray:
    """Decodes the whole file (truncated files fail here, not later) -> uint8 [H, W, 3] RGB."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return to_rgb8(image)


def _inspect_image(path: str) -> tuple[str | None, tuple[int, int] | None]:
    """(why ``path`` cannot be read as an image (one line), None) or (None, its (height, width))."""
    if not os.path.isfile(path):
        return "file not found", None
    try:
        pixels = read_rgb(path)
    except UnsupportedImage as e:
        return str(e), None
    except Exception as e:  # noqa: BLE001 - any decoder failure makes the file unreadable
        text = " ".join(str(e).replace(repr(path), "").replace(path, "").split()) or type(e).__name__
        return f"{type(e).__name__}: {text[:200]}", None
    return None, (int(pixels.shape[0]), int(pixels.shape[1]))


def _image_problem(path: str) -> str | None:
    """Why ``path`` cannot be read as an image (one line), or None."""
    return _inspect_image(path)[0]


# ---------------------------------------------------------------------------------------------
# Annotation files
# ---------------------------------------------------------------------------------------------


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Segmentations
# ---------------------------------------------------------------------------------------------

SEGMENTATION_FORMS = "polygons [[x1, y1, x2, y2, ...], ...] or an RLE {'counts': ..., 'size': [height, width]}"


def rle_string_counts(counts: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string, decoded as pycocotools' ``rleFrString`` does
    (6-bit characters from '0': 5 value bits, 0x20 = another group follows, 0x10 in the last group = negative;
    from the fourth run on, each value is a difference to the run two before). ValueError when the string is
    not one. Only the run lengths: cheap enough to check a json with, no mask is drawn."""
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        value = shift = 0
        more = True
        while more:
            if p >= n:
                raise ValueError("the string ends inside a run length")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {counts[p]!r} is outside '0'..'o'")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _check_rle(rle: dict, where: str) -> dict:
    """The RLE with integer size, checked to cover exactly its size (pycocotools writes past the mask when the
    runs add up to more); UserError naming what is wrong."""
    size, counts = rle.get("size"), rle.get("counts")
    dims = [_as_int(v) for v in size] if isinstance(size, list) and len(size) == 2 else None
    if dims is None or None in dims or min(dims) < 1:
        raise UserError(f"{where} has an RLE segmentation with size {_short(size)}; expected [height, width]")
    height, width = dims
    if isinstance(counts, list):
        if {type(c) for c in counts} - {int}:
            raise UserError(f"{where} has an RLE segmentation whose counts {_short(counts)} are not all integers")
        runs = counts
    elif isinstance(counts, str):
        try:
            runs = rle_string_counts(counts)
        except ValueError as e:
            raise UserError(f"{where} has a compressed RLE segmentation that is not one: {e}") from None
    else:
        raise UserError(
            f"{where} has an RLE segmentation with counts {_short(counts)}; expected a list of run lengths or a "
            "compressed RLE string"
        )
    if runs and min(runs) < 0:
        raise UserError(f"{where} has an RLE segmentation with a negative run length")
    if sum(runs) != height * width:
        raise UserError(
            f"{where} has an RLE segmentation whose runs cover {sum(runs)} pixels, not the {height} x {width} = "
            f"{height * width} of its size"
        )
    return {"size": [height, width], "counts": counts}


def check_segmentation(segmentation, where: str) -> tuple[list | dict | None, int]:
    """(segmentation ready to decode, or None when there is none to use, number of polygons left out).

    Polygons come back as float64 arrays (a quarter of the memory of the json's lists, which a split's index
    holds until its examples are written). None: missing, empty, or only polygons of fewer than 3 points (no
    area; left out as Detectron does, where pycocotools would read a first polygon of 4 numbers as a box).
    Structure only, fast: no mask is drawn. UserError (one line, starting with ``where``) when it is malformed.
    """
    if segmentation is None or (isinstance(segmentation, list) and not segmentation):
        return None, 0
    if isinstance(segmentation, dict):
        return _check_rle(segmentation, where), 0
    if not isinstance(segmentation, list):
        raise UserError(f"{where} has segmentation {_short(segmentation)}; expected {SEGMENTATION_FORMS}")
    kept = []
    for i, polygon in enumerate(segmentation):
        if not isinstance(polygon, list):
            raise UserError(f"{where} has segmentation[{i}] {_short(polygon)}; expected {SEGMENTATION_FORMS}")
        try:
            total = sum(polygon)  # C speed; fails on anything but numbers, non-finite if any value is
        except TypeError:
            total = None
        if total is None or not math.isfinite(total):
            raise UserError(
                f"{where} has segmentation polygon {i} {_short(polygon)}; expected finite numbers x1, y1, x2, y2, ..."
            )
        if len(polygon) % 2:
            raise UserError(
                f"{where} has segmentation polygon {i} with {len(polygon)} numbers, an odd count; expected x, y pairs"
            )
        if len(polygon) >= 6:
            kept.append(np.asarray(polygon, np.float64))
    dropped = len(segmentation) - len(kept)
    return (kept or None), dropped


def decode_mask(segmentation: list | dict | None, bbox: tuple[float, ...], height: int, width: int) -> np.ndarray:
    """[height, width] uint8 0/1 mask of a ``check_segmentation`` result, drawn by pycocotools as
    ``COCO.annToMask`` does (polygons merged, uncompressed RLE converted, compressed RLE decoded); the box
    ``bbox`` [x, y, w, h] filled when there is no segmentation."""
    from pycocotools import mask as mask_utils

    if segmentation is None:
        rle = mask_utils.frPyObjects(np.array([bbox], np.float64), height, width)[0]
    elif isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    mask = mask_utils.decode(rle)
    if mask.shape != (height, width):
        raise UserError(f"a segmentation of size {mask.shape[0]} x {mask.shape[1]} on an image of {height} x {width}")
    return mask


@dataclasses.dataclass
class SplitIndex:
    """One validated ``instances_<split>.json``: what the builder writes for the split."""

    split: str
    json_path: str
    image_dir: str
    images: list[tuple[int, str]]  # (image id, file_name) in json order
    # image id -> [(annotation id, x, y, w, h, category id, is_crowd, area, segmentation)], segmentation as
    # ``check_segmentation`` returns it (None: the box is filled)
    objects: dict[int, list[tuple]]
    categories: dict[int, str]
    has_annotations: bool
    skipped: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)  # (image id, path, why)
    degenerate_polygons: int = 0  # polygons of fewer than 3 points left out

    def summary(self) -> dict:
        """What the checks before training need, stored next to the prepared copy. ``objects``: non-crowd
        boxes of positive size; ``segmentations``: how many of those have a mask of their own (the others
        get their box filled)."""
        used: dict[int, int] = {}
        count = boxes = masks = 0
        for anns in self.objects.values():
            for _, _, _, w, h, category, crowd, _, segmentation in anns:
                used[category] = used.get(category, 0) + 1
                count += 1
                is_object = not crowd and w > 0 and h > 0
                boxes += int(is_object)
                masks += int(is_object and segmentation is not None)
        return {
            "json": self.json_path,
            "images": len(self.images),
            "annotations": count,
            "objects": boxes,
            "segmentations": masks,
            "degenerate_polygons": self.degenerate_polygons,
            "has_annotations": self.has_annotations,
            "category_ids": {str(k): v for k, v in sorted(used.items())},
            "categories": sorted(self.categories),
            "skipped": [list(s) for s in self.skipped],
        }


def load_split(folder: str, split: str) -> SplitIndex:
    """Reads and validates ``annotations/instances_<split>.json`` (not the images); UserError on the first problem.

    The cyclic garbage collector is off meanwhile: a COCO-sized json makes tens of millions of objects that all
    stay alive, and its passes over them would cost more than the parsing (nothing here makes cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _load_split(folder, split)
    finally:
        if enabled:
            gc.enable()


def _load_split(folder: str, split: str) -> SplitIndex:
    path = json_path(folder, split)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text, so not a COCO json") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise UserError(
            f"{path} holds a JSON {type(data).__name__}, not a COCO object with 'images', 'annotations' and "
            "'categories'"
        )
    images = data.get("images")
    if not isinstance(images, list):
        what = "no 'images' list" if images is None else f"'images' of type {type(images).__name__}"
        raise UserError(f"{path} has {what}; a COCO json lists its images as [{{'id', 'file_name'}}, ...]")
    if not images:
        raise UserError(f"{path} lists no images ('images' is empty)")
    image_dir = _image_dir(folder, split)
    files: dict[int, str] = {}
    order: list[tuple[int, str]] = []
    for i, info in enumerate(images):
        if not isinstance(info, dict):
            raise UserError(f"{path}: images[{i}] is {_short(info)}, not an object with 'id' and 'file_name'")
        image_id = _as_int(info.get("id"))
        file_name = info.get("file_name")
        if image_id is None:
            raise UserError(
                f"{path}: images[{i}] (file_name {_short(file_name)}) has id {_short(info.get('id'))}; "
                "image ids must be integers"
            )
        if not isinstance(file_name, str) or not file_name:
            raise UserError(f"{path}: image id {image_id} (images[{i}]) has file_name {_short(file_name)}")
        if image_id in files:
            raise UserError(
                f"{path}: image id {image_id} is used twice ({files[image_id]!r} and {file_name!r}); "
                "image ids must be unique"
            )
        files[image_id] = file_name
        order.append((image_id, file_name))

    raw_categories = data.get("categories")
    if not isinstance(raw_categories, list):
        raise UserError(f"{path} has no 'categories' list; a COCO json names its classes as [{{'id', 'name'}}, ...]")
    categories: dict[int, str] = {}
    for i, category in enumerate(raw_categories):
        category_id = _as_int(category.get("id")) if isinstance(category, dict) else None
        if category_id is None:
            raise UserError(f"{path}: categories[{i}] is {_short(category)}; category ids must be integers")
        categories[category_id] = str(category.get("name", category_id))

    annotations = data.get("annotations")
    has_annotations = annotations is not None
    if annotations is None:
        annotations = []
    if not isinstance(annotations, list):
        raise UserError(f"{path}: 'annotations' is a {type(annotations).__name__}, not a list")
    objects: dict[int, list[tuple]] = {}
    unknown: dict[int, list[int]] = {}
    degenerate = 0
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise UserError(f"{path}: annotations[{i}] is {_short(ann)}, not an object")
        ann_id = _as_int(ann.get("id"))
        if ann_id is None:
            raise UserError(f"{path}: annotations[{i}] has id {_short(ann.get('id'))}; annotation ids must be integers")
        image_id = _as_int(ann.get("image_id"))
        if image_id not in files:
            raise UserError(
                f"{path}: annotation id {ann_id} refers to image id {_short(ann.get('image_id'))}, "
                "which is not in 'images'"
            )
        where = f"{path}: annotation id {ann_id} (image id {image_id}, file {files[image_id]})"
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise UserError(f"{where} has bbox {_short(bbox)}; expected 4 numbers [x, y, width, height]")
        category_id = _as_int(ann.get("category_id"))
        if category_id is None:
            raise UserError(f"{where} has category_id {_short(ann.get('category_id'))}; expected an integer")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):  # True/False compare equal to 1/0
            raise UserError(f"{where} has iscrowd {_short(crowd)}; expected 0 or 1")
        x, y, w, h = (float(v) for v in bbox)
        area = ann.get("area")
        if area is not None and not _is_number(area):
            raise UserError(f"{where} has area {_short(area)}; expected a number")
        if category_id not in categories:
            unknown.setdefault(category_id, []).append(ann_id)
        area = float(area) if area is not None else w * h
        segmentation, dropped = check_segmentation(ann.get("segmentation"), where)
        degenerate += dropped
        objects.setdefault(image_id, []).append((ann_id, x, y, w, h, category_id, bool(crowd), area, segmentation))
    if unknown:
        ids = sorted(unknown)
        examples = [a for c in ids for a in unknown[c]][:5]
        raise UserError(
            f"{path}: category ids {', '.join(map(str, ids))} (annotation ids {', '.join(map(str, examples))}"
            f"{', ...' if sum(map(len, unknown.values())) > 5 else ''}) are not in its 'categories' "
            f"({', '.join(map(str, sorted(categories))) or 'none'}); add them to 'categories' or correct the "
            "annotations"
        )
    return SplitIndex(split, path, image_dir, order, objects, categories, has_annotations, [], degenerate)


def load_folder(folder: str) -> dict[str, SplitIndex]:
    """Every split's json, validated (images not opened yet)."""
    splits = split_names(folder)
    if not splits:
        raise UserError(f"{folder} has no annotations/instances_<split>.json")
    return {split: load_split(folder, split) for split in splits}


def check_images(index: SplitIndex, *, skip_bad_images: bool = False, workers: int | None = None) -> SplitIndex:
    """Decodes every image of the split (threads); unreadable ones are refused, or left out when
    ``skip_bad_images`` (with their annotations, listed in ``skipped``). An RLE segmentation whose size is
    not its image's is refused."""
    paths = [os.path.join(index.image_dir, file_name) for _, file_name in index.images]
    workers = workers or min(16, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(_inspect_image, paths))
    for (image_id, file_name), (_, size) in zip(index.images, results, strict=True):
        for ann in index.objects.get(image_id, ()) if size else ():
            segmentation = ann[8]
            if isinstance(segmentation, dict) and tuple(segmentation["size"]) != size:
                raise UserError(
                    f"{index.json_path}: annotation id {ann[0]} (image id {image_id}, file {file_name}) has an RLE "
                    f"segmentation of size {segmentation['size'][0]} x {segmentation['size'][1]}, but the image is "
                    f"{size[0]} x {size[1]}"
                )
    problems = [why for why, _ in results]
    bad = [(image_id, path, why) for (image_id, _), path, why in zip(index.images, paths, problems, strict=True) if why]
    if not bad:
        return index
    if not skip_bad_images:
        raise UserError(_bad_image_message(index.json_path, bad, len(paths)))
    dropped = {image_id for image_id, _, _ in bad}
    logging.warning(
        "Leaving out %d unreadable of %d images of %s (data.skip_bad_images), e.g. %s",
        len(bad),
        len(paths),
        index.json_path,
        "; ".join(f"image id {i} {p} ({why})" for i, p, why in bad[:3]),
    )
    return dataclasses.replace(
        index,
        images=[image for image in index.images if image[0] not in dropped],
        objects={k: v for k, v in index.objects.items() if k not in dropped},
        skipped=index.skipped + bad,
    )


def _bad_image_message(json_file: str, bad: list, total: int) -> str:
    image_id, path, why = bad[0]
    more = f"; {len(bad)} of {total} images are unreadable" if len(bad) > 1 else ""
    return f"{json_file}: image id {image_id}: cannot read {path} ({why}){more}; fix or remove it, or {SKIP_HINT}"


# ---------------------------------------------------------------------------------------------
# Fingerprint and where the prepared copy lives
# ---------------------------------------------------------------------------------------------


def fingerprint(folder: str) -> str:
    """16 hex digits over the format of the prepared examples (``FORMAT_VERSION``, the builder's version), every
    split's json bytes and its image folder's file names and sizes."""
    digest = hashlib.sha256(f"scaledet_jax coco_folder format {FORMAT_VERSION} {CocoFolder.VERSION}\n".encode())
    for split in split_names(folder):
        path = json_path(folder, split)
        digest.update(f"\0split {split}\0".encode())
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            image_dir = _find_image_dir(folder, split)
            digest.update(f"\0images {image_dir and os.path.relpath(image_dir, folder)}\0".encode())
            if image_dir:
                listing = []
                for root, _, names in os.walk(image_dir):
                    for name in names:
                        full = os.path.join(root, name)
                        listing.append(f"{os.path.relpath(full, image_dir)}\0{os.stat(full).st_size}\n")
                digest.update("".join(sorted(listing)).encode())
        except OSError as e:
            raise UserError(f"cannot read {e.filename or path}: {e.strerror or e}") from None
    return digest.hexdigest()[:16]


def write_problem(path: str) -> str | None:
    """Why a directory cannot be created/written at ``path`` (one phrase), or None. Leaves nothing behind:
    it probes the nearest existing ancestor with a temporary file (real permissions, root or not)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is not a directory"
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".scaledet_write_test_")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        return f"{probe}: {e.strerror or e}"
    return None


def _read_summary(data_dir: str) -> dict | None:
    try:
        with open(os.path.join(data_dir, SUMMARY_FILE)) as f:
            summary = json.load(f)
        return summary if isinstance(summary, dict) and isinstance(summary.get("splits"), dict) else None
    except (OSError, ValueError):
        return None


def _stale_copies(folder: str, roots: list[str], keep: str) -> list[str]:
    """Copies prepared from earlier contents of ``folder`` (other fingerprints, or the unkeyed layout of
    ``folder/tfds/coco_folder``); copies of other folders sharing a cache_dir are not counted."""
    stale = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            full = os.path.join(root, name)
            if full == keep or not os.path.isdir(full):
                continue
            if _FINGERPRINT_DIR.match(name):
                summary = _read_summary(full)
                if summary is not None and summary.get("folder") == folder:
                    stale.append(full)
            elif name == "coco_folder" and root == os.path.join(folder, "tfds"):
                stale.append(full)
    return stale


def _moved(summary: dict, folder: str) -> dict[str, dict]:
    """The stored split summaries with paths under ``folder`` (a copy may come from an identical folder)."""
    old = summary.get("folder", folder)
    splits = summary["splits"]
    if old == folder:
        return splits

    def move(path: str) -> str:
        return folder + path[len(old) :] if path.startswith(old + os.sep) else path

    return {
        split: dict(s, json=move(s["json"]), skipped=[[i, move(p), why] for i, p, why in s.get("skipped", [])])
        for split, s in splits.items()
    }


def prepare(
    folder: str,
    *,
    cache_dir: str = "",
    fallback_dir: str = "",
    skip_bad_images: bool = False,
    check: Callable[[dict[str, dict]], None] | None = None,
) -> CocoFolder:
    """The prepared builder for ``folder``, reusing a copy prepared from the same contents.

    Before anything is written: every json is validated, ``check(summaries)`` runs (the caller's
    checks against the config: split contents, category ids), then every image is decoded. The copy
    goes to ``cache_dir/<fingerprint>`` when given, else ``folder/tfds/<fingerprint>`` or, when the
    folder is not writable, ``fallback_dir/<fingerprint>``. The builder's ``summary`` maps each split
    to ``SplitIndex.summary()``.
    """
    folder = os.path.abspath(folder)
    return prepare_indexes(
        folder,
        fingerprint(folder),
        lambda: load_folder(folder),
        cache_dir=cache_dir,
        fallback_dir=fallback_dir,
        skip_bad_images=skip_bad_images,
        check=check,
    )


def prepare_indexes(
    folder: str,
    fp: str,
    load: Callable[[], dict[str, SplitIndex]],
    *,
    default_root: str = "",
    cache_dir: str = "",
    fallback_dir: str = "",
    skip_bad_images: bool = False,
    check: Callable[[dict[str, dict]], None] | None = None,
    write_extra: Callable[[str, dict[str, SplitIndex]], None] | None = None,
) -> CocoFolder:
    """``prepare`` for any source that can say what it holds as validated ``SplitIndex`` objects (a COCO folder, a
    VOC folder): ``folder`` names the source (the copies' key, absolute), ``fp`` its content fingerprint,
    ``load()`` validates it and returns the indexes (called only when no copy with ``fp`` exists).
    ``default_root``: where copies go without ``cache_dir`` (default ``folder/tfds``). ``write_extra(data_dir,
    indexes)`` writes the source's own files into the copy before it is marked complete. The builder gets
    ``prepared_dir`` (the copy's folder) besides ``summary``."""
    roots = [os.path.abspath(cache_dir)] if cache_dir else [default_root or os.path.join(folder, "tfds")]
    if not cache_dir and fallback_dir:
        roots.append(os.path.abspath(fallback_dir))

    for root in roots:
        data_dir = os.path.join(root, fp)
        summary = _read_summary(data_dir)
        if summary is None:
            continue
        builder = CocoFolder(folder=folder, data_dir=data_dir)
        if not builder.is_prepared():
            continue
        splits = _moved(summary, folder)
        skipped = [(s["json"], s["skipped"], s["images"]) for s in splits.values() if s.get("skipped")]
        for json_file, bad, kept in skipped:
            if not skip_bad_images:
                raise UserError(_bad_image_message(json_file, bad, kept + len(bad)))
            logging.warning("Leaving out %d unreadable images of %s (data.skip_bad_images)", len(bad), json_file)
        if check is not None:
            check(splits)
        logging.info("Using the copy of %s prepared in %s (contents unchanged)", folder, data_dir)
        builder.summary = splits
        builder.prepared_dir = data_dir
        return builder

    problems = {root: write_problem(root) for root in roots}
    writable = [root for root in roots if problems[root] is None]
    if not writable:
        if cache_dir:
            raise UserError(
                f"cannot prepare {folder}: data.cache_dir {roots[0]} is not writable ({problems[roots[0]]}); "
                "set --config.data.cache_dir to a writable folder"
            )
        tried = " nor ".join(f"{root} ({problems[root]})" for root in roots)
        raise UserError(
            f"cannot prepare {folder}: neither {tried} is writable; set --config.data.cache_dir to a writable folder"
        )
    data_dir = os.path.join(writable[0], fp)
    if writable[0] != roots[0]:
        logging.info("%s is not writable (%s); preparing it in %s", roots[0], problems[roots[0]], data_dir)

    indexes = load()
    if check is not None:
        check({split: index.summary() for split, index in indexes.items()})
    stale = _stale_copies(folder, roots, data_dir)
    total = sum(len(index.images) for index in indexes.values())
    old_format = [path for path in stale if (_read_summary(path) or {}).get("format") != FORMAT_VERSION]
    if stale and len(old_format) == len(stale):
        logging.warning(
            "The copy of %s in %s was prepared by an older version of scaledet_jax (other example features): "
            "preparing it again in %s (the old copy can be deleted)",
            folder,
            ", ".join(stale),
            data_dir,
        )
    elif stale:
        logging.warning(
            "The annotations or images in %s changed since they were prepared in %s: preparing them again in %s "
            "(the old copy can be deleted)",
            folder,
            ", ".join(stale),
            data_dir,
        )
    else:
        logging.info("Preparing %s (%d images) in %s", folder, total, data_dir)
    for index in indexes.values():
        if index.degenerate_polygons:
            logging.warning(
                "%s: left out %d segmentation polygons of fewer than 3 points (no area)",
                index.json_path,
                index.degenerate_polygons,
            )
    indexes = {split: check_images(index, skip_bad_images=skip_bad_images) for split, index in indexes.items()}
    summaries = {split: index.summary() for split, index in indexes.items()}
    if check is not None and any(index.skipped for index in indexes.values()):
        check(summaries)  # leaving images out may have emptied a split

    builder = CocoFolder(folder=folder, data_dir=data_dir, splits=indexes)
    try:
        builder.download_and_prepare()
        if write_extra is not None:
            write_extra(data_dir, indexes)
        tmp = os.path.join(data_dir, SUMMARY_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"folder": folder, "fingerprint": fp, "format": FORMAT_VERSION, "splits": summaries}, f)
        os.replace(tmp, os.path.join(data_dir, SUMMARY_FILE))
    except OSError as e:
        if e.errno not in _PERMISSION_ERRNOS:
            raise
        raise UserError(
            f"cannot write the prepared copy of {folder} to {data_dir}: {e.strerror or e}; "
            "set --config.data.cache_dir to a writable folder with space"
        ) from None
    builder.summary = summaries
    builder.prepared_dir = data_dir
    return builder


# ---------------------------------------------------------------------------------------------
# The tfds builder
# ---------------------------------------------------------------------------------------------


class CocoFolder(tfds.core.GeneratorBasedBuilder):
    """COCO-format folder -> tfds dataset with the features of ``coco/2017``.

    ``splits``: the validated ``SplitIndex`` per split (``prepare`` passes them); without them the
    jsons and images are validated when the data is generated. Without ``data_dir`` the copy goes to
    ``folder/tfds/<fingerprint>``.
    """

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Boxes, labels, crowd flags, areas and annotation ids.",
        "2.0.0": "objects/mask: one binary instance mask per object (the box filled without a segmentation).",
    }

    def __init__(
        self,
        *,
        folder: str,
        data_dir: str | None = None,
        splits: dict[str, SplitIndex] | None = None,
        skip_bad_images: bool = False,
        **kwargs,
    ):
        self._folder = os.path.abspath(folder)
        self._indexes = splits
        self._skip_bad_images = skip_bad_images
        self.summary: dict[str, dict] | None = None
        data_dir = data_dir or os.path.join(self._folder, "tfds", fingerprint(self._folder))
        super().__init__(data_dir=data_dir, **kwargs)
        self._original_state.update(folder=self._folder)  # tfds re-creates builders from this when pickled

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
                            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                        }
                    ),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._indexes is None:
            self._indexes = {
                split: check_images(index, skip_bad_images=self._skip_bad_images)
                for split, index in load_folder(self._folder).items()
            }
            self.summary = {split: index.summary() for split, index in self._indexes.items()}
        return {split: self._generate_examples(index) for split, index in self._indexes.items()}

    def _generate_examples(self, index: SplitIndex):
        for image_id, file_name in index.images:
            pixels = read_rgb(os.path.join(index.image_dir, file_name))
            height, width = pixels.shape[:2]
            objects = {"bbox": [], "label": [], "is_crowd": [], "area": [], "id": [], "mask": []}
            for ann_id, x, y, w, h, category_id, crowd, area, segmentation in index.objects.get(image_id, []):
                if w <= 0 or h <= 0:
                    continue
                try:
                    mask = decode_mask(segmentation, (x, y, w, h), height, width)
                except UserError as e:  # checked before writing (check_images); an image replaced meanwhile
                    raise UserError(
                        f"{index.json_path}: annotation id {ann_id} (image id {image_id}, file {file_name}): {e}"
                    ) from None
                objects["mask"].append(mask[:, :, None])
                objects["bbox"].append(
                    tfds.features.BBox(
                        ymin=float(np.clip(y / height, 0, 1)),
                        xmin=float(np.clip(x / width, 0, 1)),
                        ymax=float(np.clip((y + h) / height, 0, 1)),
                        xmax=float(np.clip((x + w) / width, 0, 1)),
                    )
                )
                objects["label"].append(category_id)
                objects["is_crowd"].append(crowd)
                objects["area"].append(area)
                objects["id"].append(ann_id)
            yield image_id, {"image": pixels, "image/id": image_id, "image/filename": file_name, "objects": objects}


def category_names(folder: str, split: str) -> dict[int, str]:
    return load_split(folder, split).categories


def category_names_from_json(path: str) -> dict[int, str]:
    """{category id: name} of a COCO json (no validation: the json was validated when prepared)."""
    with open(path) as f:
        return {int(c["id"]): str(c.get("name", c["id"])) for c in json.load(f).get("categories", [])}
