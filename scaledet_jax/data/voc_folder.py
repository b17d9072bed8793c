"""A PASCAL VOC-format folder as a data source: the layout of VOCdevkit and of LabelImg / CVAT exports.

    VOC2007/                                 one "year folder"; several may be given, comma-separated
      Annotations/<id>.xml                   <annotation> with <size> and <object>s (<name>, <difficult>,
                                             <bndbox> xmin/ymin/xmax/ymax)
      JPEGImages/<id>.jpg                    the image (another extension when the XML's <filename> or the
                                             only file named <id>.* says so)
      ImageSets/Main/<split>.txt             the ids of a split, one per line (a second column is ignored;
                                             <class>_<split>.txt files are not splits)

Nothing is copied twice: each split is validated into the COCO folder's ``SplitIndex`` and prepared by the
same fingerprinted tfds builder (``coco_folder.prepare_indexes``), so preprocessing, caching, skipped images
and the checks against the model are the COCO folder's. Next to the prepared copy goes a COCO-format json per
split (``instances_<split>.json``, with ``difficult`` and ``iscrowd`` = difficult): the evaluation's ground
truth, for the VOC and the COCO protocol alike.

Coordinates: the XML's numbers are taken as they are, as tfds ``voc`` does (``bbox = (ymin / height, xmin /
width, ymax / height, xmax / width)``, nothing subtracted): a box is [xmin, xmax] x [ymin, ymax] in continuous
pixel coordinates of the decoded image, its width ``xmax - xmin``. The devkit reads the same numbers as
1-based inclusive pixel indices (width ``xmax - xmin + 1``); ``evaluate_voc`` adds that pixel back
(``pixel_offset=1``), so detections need no shift. Boxes must lie in [0, width] x [0, height] of the XML's
<size> (when it gives one) with max >= min.

Classes (``classes`` / ``config.data.voc_classes``): '' (automatic) gives the 20 VOC classes in the standard
order (aeroplane = 1 ... tvmonitor = 20) when every object name is one of them (compared case-insensitively),
else the names found in the prepared splits' XMLs, sorted, numbered from 1; 'voc' always the 20; or an explicit
comma-separated list of names (ids 1..N in that order), which pins the numbering of a custom dataset.

``difficult`` objects are kept as ignore regions: ``is_crowd`` in the examples (never a positive or a negative
in training) and ignored by the VOC evaluation.

Image ids: when every id is digits with underscores (``000005``, ``2008_000002``) and they stay unique, the
digits (5, 2008000002: the same ids as the tfds ``voc`` source gets); otherwise 1..N in order of first listing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence

from absl import logging

from scaledet_jax.cli import UserError
from scaledet_jax.data import coco_folder

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# Bump when the prepared examples or the evaluation json change for the same files.
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_DIGIT_ID = re.compile(r"^[0-9]+(_[0-9]+)*$")


def parse_folders(spec: str) -> list[str]:
    """``config.data.voc_folder`` -> absolute year folders (comma-separated, e.g. 'VOC2007,VOC2012' for 07+12).
    UserError when one is missing or has no Annotations/."""
    folders = [os.path.abspath(os.path.expanduser(p.strip())) for p in (spec or "").split(",") if p.strip()]
    if not folders:
        raise UserError(
            "no VOC folder given: set --config.data.voc_folder to a VOCdevkit year folder (Annotations/, "
            "JPEGImages/, ImageSets/Main/<split>.txt), or several separated by commas"
        )
    for folder in folders:
        if not os.path.isdir(folder):
            raise UserError(
                f"data.voc_folder {folder} is not a folder: point --config.data.voc_folder at a VOCdevkit year "
                "folder (e.g. /data/VOCdevkit/VOC2007), or use tfds (--config.data.source=tfds "
                "--config.data.tfds_name=voc/2007)"
            )
        for sub in ("Annotations", "JPEGImages"):
            if not os.path.isdir(os.path.join(folder, sub)):
                raise UserError(
                    f"{folder} has no {sub}/: a VOC folder holds Annotations/<id>.xml, JPEGImages/<id>.jpg and "
                    "ImageSets/Main/<split>.txt"
                )
    if len(set(folders)) != len(folders):
        raise UserError(f"data.voc_folder names a folder twice: {spec}")
    return folders


def split_file(folder: str, split: str) -> str:
    return os.path.join(folder, "ImageSets", "Main", f"{split}.txt")


def split_names(folders: Sequence[str]) -> list[str]:
    """The splits of the folders (each ``ImageSets/Main/<split>.txt``; ``<class>_<split>.txt`` left out)."""
    stems: set[str] = set()
    for folder in folders:
        main = os.path.join(folder, "ImageSets", "Main")
        if os.path.isdir(main):
            stems |= {f[:-4] for f in os.listdir(main) if f.endswith(".txt")}
    return sorted(s for s in stems if not ("_" in s and s.split("_", 1)[1] in stems))


def _split_ids(path: str) -> list[tuple[int, str]]:
    """(line number, id) of each non-empty line of a split file (its first column)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text, so not a VOC split file (one image id per line)") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return [(n, line.split()[0]) for n, line in enumerate(lines, 1) if line.strip()]


# ---------------------------------------------------------------------------------------------
# Annotation XML
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VocObject:
    name: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax as written
    difficult: bool


@dataclasses.dataclass
class VocAnnotation:
    filename: str | None  # <filename>
    size: tuple[int, int] | None  # (height, width) from <size>, None when absent or 0
    objects: list[VocObject]


def _number(text: str | None) -> float | None:
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_annotation(path: str) -> VocAnnotation:
    """One annotation XML, validated; UserError (one line naming the file and the object) on a problem."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise UserError(f"missing annotation file {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except ET.ParseError as e:
        raise UserError(f"{path} is not valid XML: {e}") from None
    if root.tag != "annotation":
        raise UserError(f"{path} is not a VOC annotation: its root element is <{root.tag}>, not <annotation>")
    size = None
    size_node = root.find("size")
    if size_node is not None:
        width, height = _number(size_node.findtext("width")), _number(size_node.findtext("height"))
        if (
            width is None
            or height is None
            or width < 0
            or height < 0
            or not (width.is_integer() and height.is_integer())
        ):
            raise UserError(
                f"{path} has <size> width {size_node.findtext('width')!r}, height {size_node.findtext('height')!r}; "
                "expected whole numbers of pixels"
            )
        if width > 0 and height > 0:  # LabelImg writes 0 x 0 when it could not read the image: unknown
            size = (int(height), int(width))
    objects = []
    for i, node in enumerate(root.findall("object")):
        name = (node.findtext("name") or "").strip()
        where = f"{path}: object {i} ({name})" if name else f"{path}: object {i}"
        if not name:
            raise UserError(f"{where} has no <name>")
        bndbox = node.find("bndbox")
        if bndbox is None:
            raise UserError(f"{where} has no <bndbox>")
        box = []
        for key in ("xmin", "ymin", "xmax", "ymax"):
            value = _number(bndbox.findtext(key))
            if value is None:
                raise UserError(f"{where} has <bndbox> {key} {bndbox.findtext(key)!r}; expected a number")
            box.append(value)
        xmin, ymin, xmax, ymax = box
        if xmax < xmin or ymax < ymin:
            raise UserError(
                f"{where} has a bad box: xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, ymax {ymax:g} (max < min)"
            )
        if min(box) < 0 or (size is not None and (xmax > size[1] or ymax > size[0])):
            raise UserError(
                f"{where} has a box outside the image: xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, ymax {ymax:g} "
                f"on {'<size> ' + str(size[1]) + ' x ' + str(size[0]) if size else 'an image'} (width x height)"
            )
        difficult = (node.findtext("difficult") or "0").strip().lower()
        if difficult not in ("0", "1", "true", "false"):
            raise UserError(f"{where} has <difficult> {difficult!r}; expected 0 or 1")
        objects.append(VocObject(name, (xmin, ymin, xmax, ymax), difficult in ("1", "true")))
    filename = (root.findtext("filename") or "").strip() or None
    return VocAnnotation(filename, size, objects)


# ---------------------------------------------------------------------------------------------
# Splits -> SplitIndex
# ---------------------------------------------------------------------------------------------


def _image_listing(folder: str) -> dict[str, list[str]]:
    """JPEGImages' image files by stem."""
    listing: dict[str, list[str]] = {}
    for name in sorted(os.listdir(os.path.join(folder, "JPEGImages"))):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS:
            listing.setdefault(stem, []).append(name)
    return listing


def _find_image(folder: str, image_id: str, annotation: VocAnnotation, listing: dict[str, list[str]]) -> str | None:
    """JPEGImages/<id>.jpg as the devkit and tfds read it, else the XML's <filename>, else the one <id>.* there."""
    names = listing.get(image_id, [])
    if f"{image_id}.jpg" in names:
        return f"{image_id}.jpg"
    if annotation.filename and os.path.isfile(os.path.join(folder, "JPEGImages", annotation.filename)):
        return annotation.filename
    return names[0] if len(names) == 1 else None


def class_layout(names: set[str], classes: str = "") -> tuple[dict[str, int], dict[int, str]]:
    """(object name -> category id, category id -> class name) under the rule of ``classes`` (module
    docstring) for the object ``names`` found. The VOC layout maps every spelling case of a VOC name; names
    that have no id are left out (``load`` refuses them)."""
    setting = (classes or "").strip()
    if setting.lower() == "voc" or (not setting and all(n.lower() in VOC_CLASSES for n in names)):
        categories = {i + 1: name for i, name in enumerate(VOC_CLASSES)}
        layout = {n: VOC_CLASSES.index(n.lower()) + 1 for n in names if n.lower() in VOC_CLASSES}
        return layout | {name: i for i, name in categories.items()}, categories
    if setting:
        listed = [c.strip() for c in setting.split(",") if c.strip()]
        if len(set(listed)) != len(listed):
            raise UserError(f"data.voc_classes names a class twice: {setting}")
    else:
        listed = sorted(names)
    categories = {i + 1: name for i, name in enumerate(listed)}
    return {name: i for i, name in categories.items()}, categories


def _image_ids(entries: list[tuple[int, str]]) -> dict[tuple[int, str], int]:
    """(folder index, VOC id) -> integer image id: the digits when every id is digits with underscores and they
    stay unique (and fit int64), else 1..N in order of first listing."""
    digits = {}
    for key in entries:
        stem = key[1]
        if not _DIGIT_ID.match(stem) or len(stem.replace("_", "")) > 18:
            break
        digits[key] = int(stem.replace("_", ""))
    else:
        if len(set(digits.values())) == len(digits):
            return digits
    return {key: i + 1 for i, key in enumerate(entries)}


def load(folders: Sequence[str], splits: Sequence[str], classes: str = "") -> dict[str, coco_folder.SplitIndex]:
    """Reads and validates every listed XML of ``splits`` over ``folders`` (images located, not opened yet);
    UserError on the first problem. A split is the union of its files in the folders that have one."""
    listings = {folder: _image_listing(folder) for folder in folders}
    parsed: dict[str, list[tuple[int, str, str, VocAnnotation]]] = {}  # split -> (folder index, id, image, xml)
    for split in splits:
        files = [(i, split_file(folder, split)) for i, folder in enumerate(folders)]
        files = [(i, path) for i, path in files if os.path.isfile(path)]
        if not files:
            raise UserError(
                f"no ImageSets/Main/{split}.txt in {', '.join(folders)} (splits: {', '.join(split_names(folders))})"
            )
        entries = []
        for i, path in files:
            folder = folders[i]
            ids = _split_ids(path)
            if not ids:
                raise UserError(f"{path} lists no images (an empty split)")
            seen: dict[str, int] = {}
            for line, image_id in ids:
                if image_id in seen:
                    raise UserError(
                        f"{path}: image id {image_id!r} is listed twice (lines {seen[image_id]} and {line})"
                    )
                seen[image_id] = line
                annotation = parse_annotation(os.path.join(folder, "Annotations", f"{image_id}.xml"))
                image = _find_image(folder, image_id, annotation, listings[folder])
                if image is None:
                    raise UserError(
                        f"{path} line {line}: no image for id {image_id!r}: expected "
                        f"{os.path.join(folder, 'JPEGImages', image_id + '.jpg')}"
                        + (f" (or its <filename> {annotation.filename})" if annotation.filename else "")
                    )
                entries.append((i, image_id, image, annotation))
        parsed[split] = entries

    names = {obj.name for entries in parsed.values() for *_, annotation in entries for obj in annotation.objects}
    layout, categories = class_layout(names, classes)
    unknown = sorted(names - set(layout))
    if unknown:
        example = next(
            os.path.join(folders[i], "Annotations", f"{image_id}.xml")
            for entries in parsed.values()
            for i, image_id, _, annotation in entries
            if any(obj.name in unknown for obj in annotation.objects)
        )
        listed = (classes or "").strip()
        allowed = "the 20 VOC classes" if listed.lower() == "voc" else f"data.voc_classes ({listed})"
        raise UserError(
            f"object names {', '.join(map(repr, unknown[:10]))}{' ...' if len(unknown) > 10 else ''} (e.g. in "
            f"{example}) are not in {allowed}: add them, or set --config.data.voc_classes='' to number the names found"
        )
    ids = _image_ids(list(dict.fromkeys((i, image_id) for entries in parsed.values() for i, image_id, *_ in entries)))

    indexes = {}
    for split, entries in parsed.items():
        image_dirs = sorted({os.path.join(folders[i], "JPEGImages") for i, *_ in entries})
        image_dir = image_dirs[0] if len(image_dirs) == 1 else os.path.commonpath(image_dirs)
        images, objects, annotation_id = [], {}, 0
        for i, image_id, image, annotation in entries:
            number = ids[(i, image_id)]
            images.append((number, os.path.relpath(os.path.join(folders[i], "JPEGImages", image), image_dir)))
            rows = objects.setdefault(number, [])
            for obj in annotation.objects:
                annotation_id += 1
                xmin, ymin, xmax, ymax = obj.box
                w, h = xmax - xmin, ymax - ymin
                rows.append((annotation_id, xmin, ymin, w, h, layout[obj.name], obj.difficult, w * h, None))
        paths = [split_file(folder, split) for folder in folders if os.path.isfile(split_file(folder, split))]
        indexes[split] = coco_folder.SplitIndex(
            split=split,
            json_path=" + ".join(paths),
            image_dir=image_dir,
            images=images,
            objects=objects,
            categories=categories,
            has_annotations=True,
        )
    logging.info(
        "VOC folder %s: %s; classes %s",
        ", ".join(folders),
        ", ".join(f"{split} {len(index.images)} images" for split, index in indexes.items()),
        ", ".join(f"{k}={v}" for k, v in categories.items()),
    )
    return indexes


# ---------------------------------------------------------------------------------------------
# The evaluation ground truth, fingerprint and preparation
# ---------------------------------------------------------------------------------------------


def coco_ground_truth(index: coco_folder.SplitIndex) -> dict:
    """A split as a COCO ground-truth dict: boxes [x, y, w, h] in the module's convention, ``difficult`` and
    ``iscrowd`` (= difficult, so the COCO protocol ignores them too), every class in ``categories``."""
    images = [{"id": image_id, "file_name": name} for image_id, name in index.images]
    annotations = [
        {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": [x, y, w, h], "area": area,
         "iscrowd": int(difficult), "difficult": int(difficult)}
        for image_id, _ in index.images
        for ann_id, x, y, w, h, category, difficult, area, _ in index.objects.get(image_id, [])
    ]  # fmt: skip
    categories = [{"id": k, "name": v} for k, v in sorted(index.categories.items())]
    return {"images": images, "annotations": annotations, "categories": categories}


def annotation_json_path(prepared_dir: str, split: str) -> str:
    return os.path.join(prepared_dir, f"instances_{split}.json")


def _write_jsons(data_dir: str, indexes: dict[str, coco_folder.SplitIndex]) -> None:
    for split, index in indexes.items():
        path = annotation_json_path(data_dir, split)
        with open(path + ".tmp", "w") as f:
            json.dump(coco_ground_truth(index), f)
        os.replace(path + ".tmp", path)


def fingerprint(folders: Sequence[str], splits: Sequence[str], classes: str = "") -> str:
    """16 hex digits over the prepared format, the class setting, the splits' files, every XML they list and the
    image folders' file names and sizes."""
    digest = hashlib.sha256(
        f"scaledet_jax voc_folder format {FORMAT_VERSION} {coco_folder.FORMAT_VERSION} "
        f"{coco_folder.CocoFolder.VERSION} classes {classes!r} splits {sorted(set(splits))!r}\n".encode()
    )
    for folder in folders:
        digest.update(f"\0folder {folder}\0".encode())
        for split in sorted(set(splits)):
            path = split_file(folder, split)
            if not os.path.isfile(path):
                digest.update(f"\0no split {split}\0".encode())
                continue
            digest.update(f"\0split {split}\0".encode())
            try:
                with open(path, "rb") as f:
                    digest.update(f.read())
                ids = [line.split()[0] for line in open(path, encoding="utf-8", errors="replace") if line.strip()]
            except OSError as e:
                raise UserError(f"cannot read {path}: {e.strerror or e}") from None
            for image_id in ids:
                xml = os.path.join(folder, "Annotations", f"{image_id}.xml")
                try:
                    with open(xml, "rb") as f:
                        digest.update(f"\0{image_id}\0".encode() + f.read())
                except OSError:
                    digest.update(f"\0{image_id} unreadable\0".encode())  # load() says why
        listing = []
        with os.scandir(os.path.join(folder, "JPEGImages")) as entries:
            for entry in entries:
                if entry.is_file():
                    listing.append(f"{entry.name}\0{entry.stat().st_size}\n")
        digest.update("".join(sorted(listing)).encode())
    return digest.hexdigest()[:16]


def prepare(
    folders: Sequence[str],
    splits: Sequence[str],
    *,
    classes: str = "",
    cache_dir: str = "",
    fallback_dir: str = "",
    skip_bad_images: bool = False,
    check: Callable[[dict[str, dict]], None] | None = None,
) -> coco_folder.CocoFolder:
    """The prepared builder of ``splits`` of the VOC year folders ``folders`` (``parse_folders``), reusing a copy
    prepared from the same contents; as ``coco_folder.prepare``: validation, then ``check(summaries)``, then
    every image decoded, before anything is written. Copies go to ``cache_dir``, else ``<first folder>/tfds``,
    else ``fallback_dir``. The builder's ``annotation_jsons`` maps each split to its COCO-format ground truth."""
    folders = [os.path.abspath(f) for f in folders]
    splits = list(dict.fromkeys(splits))
    builder = coco_folder.prepare_indexes(
        f"{','.join(folders)} (splits {', '.join(splits)})",  # the copies' key: other splits are other copies
        fingerprint(folders, splits, classes),
        lambda: load(folders, splits, classes),
        default_root=os.path.join(folders[0], "tfds"),
        cache_dir=cache_dir,
        fallback_dir=fallback_dir,
        skip_bad_images=skip_bad_images,
        check=check,
        write_extra=_write_jsons,
    )
    builder.annotation_jsons = {split: annotation_json_path(builder.prepared_dir, split) for split in splits}
    return builder
