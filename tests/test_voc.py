"""PASCAL VOC: the evaluator against the independent PyPI package ``mean_average_precision``, the VOC-folder source
(batches equal the XMLs; bad data refused in one line before anything is written), tfds ``voc`` (mock data,
structure only) and a tiny model trained and evaluated with the VOC protocol end to end."""

import torch  # noqa: F401, I001 - the torch stack before TensorFlow (conftest); this module imports TF lazily

import json
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from mean_average_precision import MeanAveragePrecision2d

from scaledet_jax import defaults
from scaledet_jax.cli import UserError
from scaledet_jax.data import pipeline, synthetic, voc_folder
from scaledet_jax.evaluate import CocoEvaluator, annotation_json
from scaledet_jax.evaluate_voc import VocEvaluator

ELEVEN = np.arange(0.0, 1.1, 0.1)  # the devkit's thresholds, handed to the package as they are


# ---------------------------------------------------------------------------------------------
# (a) The evaluator against mean_average_precision
# ---------------------------------------------------------------------------------------------


def _random_case(seed, num_images=40, num_classes=4, difficult_fraction=0.0):
    """Ground truth (a COCO dict with ``difficult``) and detections [B, D, 4] yx boxes: most objects found with
    jitter (some twice, some with the wrong class), difficult ones too, plus background false positives. Scores
    are distinct multiples of 1e-5 (the evaluator keeps 5 decimals), so no ranking depends on a sort's ties.

    Difficult flags are drawn per image and class, not per object: the package (2024.1.5.0) hands each
    detection the flags of its image's objects of that class through ``np.repeat(flags, n).reshape(n, -1)``
    (``utils.compute_match_table``), which is ``np.tile`` only when they are all equal; mixed flags in one image
    and class with several detections reach the wrong objects there."""
    rng = np.random.RandomState(seed)
    images, annotations, det_images = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id})
        dets, flags = [], {}
        for _ in range(rng.randint(0, 7)):
            x, y = rng.uniform(0, 300, 2)
            w, h = rng.uniform(8, 120, 2)
            category = int(rng.randint(1, num_classes + 1))
            difficult = flags.setdefault(category, bool(rng.uniform() < difficult_fraction))
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "bbox": [x, y, w, h],
                 "area": w * h, "iscrowd": int(difficult), "difficult": int(difficult)}
            )  # fmt: skip
            for _ in range(rng.choice([0, 1, 1, 1, 2])):  # missed, found, or found twice
                jitter = rng.normal(0, 0.12, 4) * [w, h, w, h]
                box = np.array([x, y, x + w, y + h]) + jitter
                wrong = rng.uniform() < 0.1
                dets.append((box, int(rng.randint(1, num_classes + 1)) if wrong else category))
        for _ in range(rng.randint(0, 3)):  # background
            x, y = rng.uniform(0, 300, 2)
            dets.append((np.array([x, y, x + rng.uniform(8, 100), y + rng.uniform(8, 100)]), int(rng.randint(1, 5))))
        det_images.append(dets)
    ground_truth = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)],
    }
    width = max(len(d) for d in det_images)
    boxes = np.zeros((num_images, width, 4), np.float32)
    classes = np.zeros((num_images, width), np.int32)
    valid = np.zeros((num_images, width), bool)
    for i, dets in enumerate(det_images):
        for j, (box, category) in enumerate(dets):
            x1, y1, x2, y2 = np.clip(box, 0, 999)
            boxes[i, j] = [y1, x1, y2, x2]
            classes[i, j], valid[i, j] = category, True
    scores = np.zeros((num_images, width), np.float32)
    scores[valid] = (rng.choice(99_000, int(valid.sum()), replace=False) + 1000) / 1e5
    return ground_truth, {"boxes": boxes, "classes": classes, "valid": valid, "scores": scores}


def _ours(ground_truth, detections, **options):
    evaluator = VocEvaluator(ground_truth=ground_truth, **options)
    n = len(ground_truth["images"])
    batch = {
        "image_id": np.array([image["id"] for image in ground_truth["images"]]),
        "original_size": np.full((n, 2), 1000, np.int32),
        "scale": np.ones(n, np.float32),
    }
    evaluator.add_ground_truth(batch)
    evaluator.add_detections(batch, detections)
    metrics = evaluator.evaluate()
    return evaluator, metrics, {r["id"]: r for r in evaluator.per_class["bbox"]}


def _package(ground_truth, detections, num_classes, *, difficult=True, npos_without_difficult=False):
    """The package on the detections our evaluator kept (rounded as in detections_<step>.json): boxes x1y1x2y2,
    classes 0-based. ``npos_without_difficult``: its per-image class counts (``class_counter``, which count every
    object, difficult ones too) reduced to the non-difficult objects, the devkit's npos."""
    metric = MeanAveragePrecision2d(num_classes)
    by_image = {}
    for d in detections:
        x, y, w, h = d["bbox"]
        by_image.setdefault(d["image_id"], []).append([x, y, x + w, y + h, d["category_id"] - 1, d["score"]])
    gts = {}
    for a in ground_truth["annotations"]:
        x, y, w, h = a["bbox"]
        gts.setdefault(a["image_id"], []).append(
            [x, y, x + w, y + h, a["category_id"] - 1, a["difficult"] if difficult else 0, 0]
        )
    for image in ground_truth["images"]:
        preds = np.array(by_image.get(image["id"], []), np.float64).reshape(-1, 6)
        gt = np.array(gts.get(image["id"], []), np.float64).reshape(-1, 7)
        metric.add(preds, gt)
        if npos_without_difficult and len(gt):
            for c in range(num_classes):
                metric.class_counter[-1, c] -= int(np.sum((gt[:, 4] == c) & (gt[:, 5] == 1)))
    all_point = metric.value(iou_thresholds=0.5, mpolicy="greedy")
    eleven = metric.value(iou_thresholds=0.5, recall_thresholds=ELEVEN, mpolicy="greedy")
    return (
        {c + 1: float(all_point[0.5][c]["ap"]) for c in range(num_classes)},
        {c + 1: float(eleven[0.5][c]["ap"]) for c in range(num_classes)},
    )


def test_voc_ap_equals_mean_average_precision_package():
    """No difficult objects: the package and ours (its '>' matching, +1 widths) agree class by class, 11-point and
    all-point."""
    ground_truth, detections = _random_case(0)
    evaluator, metrics, rows = _ours(ground_truth, detections, strict_iou=True)
    all_point, eleven = _package(ground_truth, evaluator.detections, 4)
    assert all(rows[c]["npos"] > 5 and 0.2 < rows[c]["AP"] < 0.95 for c in rows)  # a real, imperfect ranking
    diffs = [abs(rows[c]["AP"] - all_point[c]) for c in rows] + [abs(rows[c]["AP_voc07"] - eleven[c]) for c in rows]
    assert max(diffs) <= 1e-6, diffs
    assert metrics["mAP"] == pytest.approx(np.mean(list(all_point.values())), abs=1e-6)
    assert metrics["mAP_voc07"] == pytest.approx(np.mean(list(eleven.values())), abs=1e-6)
    assert any(abs(rows[c]["AP"] - rows[c]["AP_voc07"]) > 1e-3 for c in rows)  # the two protocols differ here


def test_difficult_objects_ignored_as_the_package_does():
    """Difficult objects: a detection on one is neither TP nor FP in both. The package counts difficult objects in
    npos (the devkit does not): with its counts reduced to the non-difficult objects the APs agree to 1e-6, and
    without, its all-point AP is ours scaled by npos / (npos + difficult) (precision unchanged, recall scaled)."""
    ground_truth, detections = _random_case(1, difficult_fraction=0.3)
    evaluator, metrics, rows = _ours(ground_truth, detections, strict_iou=True)
    assert all(rows[c]["difficult"] > 2 for c in rows)
    all_point, eleven = _package(ground_truth, evaluator.detections, 4, npos_without_difficult=True)
    diffs = [abs(rows[c]["AP"] - all_point[c]) for c in rows] + [abs(rows[c]["AP_voc07"] - eleven[c]) for c in rows]
    assert max(diffs) <= 1e-6, diffs
    raw, _ = _package(ground_truth, evaluator.detections, 4)
    for c, row in rows.items():
        assert raw[c] == pytest.approx(row["AP"] * row["npos"] / (row["npos"] + row["difficult"]), abs=1e-6)
    # Negative control: scoring the difficult objects as ordinary ones changes the result.
    plain, _ = _package(ground_truth, evaluator.detections, 4, difficult=False)
    assert max(abs(rows[c]["AP"] - plain[c]) for c in rows) > 1e-3


def test_iou_exactly_at_the_threshold_and_the_pixel_convention():
    """gt [1, 1, 10, 10] and a detection [1, 1, 10, 5] in inclusive pixels: 50 / 100 = IoU 0.5 exactly. MATLAB's
    VOCevaldet (IoU >= 0.5, our default) counts it, the Python ports (IoU > 0.5, ``strict_iou``, the package) do
    not; as continuous boxes (``pixel_offset=0``) the IoU is 36 / 81."""
    ground_truth = {
        "images": [{"id": 1}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}],
    }
    detections = {
        "boxes": np.array([[[1, 1, 5, 10]]], np.float32),
        "classes": np.array([[1]], np.int32),
        "valid": np.array([[True]]),
        "scores": np.array([[0.9]], np.float32),
    }
    assert _ours(ground_truth, detections)[1]["mAP"] == 1.0
    evaluator, metrics, _ = _ours(ground_truth, detections, strict_iou=True)
    assert metrics["mAP"] == 0.0 and _package(ground_truth | {"annotations": [
        dict(ground_truth["annotations"][0], difficult=0)]}, evaluator.detections, 1)[0][1] == 0.0  # fmt: skip
    assert _ours(ground_truth, detections, pixel_offset=0.0, iou_threshold=0.44)[1]["mAP"] == 1.0
    assert _ours(ground_truth, detections, pixel_offset=0.0, iou_threshold=0.45)[1]["mAP"] == 0.0


def test_mixed_difficult_flags_in_one_image():
    """The case the package cannot score (see ``_random_case``), worked by the devkit's rule: objects A (difficult),
    B, C of one class in one image; detections A .9 (ignored), B .8 (TP), A .7 (duplicate on a difficult object:
    ignored too), nothing .6 (FP), C .5 (TP). npos 2: recall .5 .5 1, precision 1 .5 2/3. All-point AP
    .5 * 1 + .5 * 2/3; 11-point: precision 1 at t = 0 ... .5 (6 points), 2/3 at t = .6 ... 1 (5 points)."""
    boxes = {"A": [0, 0, 10, 10], "B": [20, 20, 30, 30], "C": [40, 40, 50, 50], "none": [100, 100, 110, 110]}
    ground_truth = {
        "images": [{"id": 1}],
        "annotations": [
            {"id": i, "image_id": 1, "category_id": 1, "bbox": [*boxes[k][:2], 10, 10], "difficult": int(k == "A")}
            for i, k in enumerate("ABC", 1)
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    order = [("A", 0.9), ("B", 0.8), ("A", 0.7), ("none", 0.6), ("C", 0.5)]
    detections = {
        "boxes": np.array([[[b[1], b[0], b[3], b[2]] for b in (boxes[k] for k, _ in order)]], np.float32),
        "classes": np.ones((1, 5), np.int32),
        "valid": np.ones((1, 5), bool),
        "scores": np.array([[score for _, score in order]], np.float32),
    }
    _, metrics, rows = _ours(ground_truth, detections)
    assert (rows[1]["npos"], rows[1]["difficult"]) == (2, 1)
    assert metrics["mAP"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert metrics["mAP_voc07"] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)


def test_class_without_non_difficult_objects_is_undefined(tmp_path):
    ground_truth, detections = _random_case(2, num_classes=3)
    for a in ground_truth["annotations"]:
        if a["category_id"] == 3:
            a["difficult"] = a["iscrowd"] = 1
    ground_truth["categories"].append({"id": 4, "name": "absent"})
    evaluator, metrics, rows = _ours(ground_truth, detections)
    assert math.isnan(rows[3]["AP"]) and math.isnan(rows[4]["AP_voc07"]) and rows[3]["difficult"] > 0
    assert metrics["mAP"] == pytest.approx(np.mean([rows[1]["AP"], rows[2]["AP"]]))
    evaluator.write(str(tmp_path), 7, metrics)
    saved = json.load(open(tmp_path / "eval_7.json"))
    assert saved["undefined_classes"] == ["class3", "absent"] and "left out of the means" in saved["note"]
    assert [r["name"] for r in saved["per_class"]] == ["class1", "class2", "class3", "absent"]
    assert saved["per_class"][2]["AP"] is None and saved["protocol"]["match"] == "iou >= threshold"
    assert len(json.load(open(tmp_path / "detections_7.json"))) == len(evaluator.detections)


# ---------------------------------------------------------------------------------------------
# (b) The VOC folder
# ---------------------------------------------------------------------------------------------


def _config(folder, num_classes=4, **data):
    config = defaults.get_config()
    config.data.source = "voc_folder"
    config.data.voc_folder = folder
    config.data.train_split, config.data.eval_split = "train", "val"
    config.data.train_batch_size = config.data.eval_batch_size = 2
    config.model.num_classes = num_classes
    config.model.image_size = 128
    config.data.max_instances = 8
    config.data.update(data)
    return config


def _xml_objects(folder, image_id):
    """(name, [xmin, ymin, xmax, ymax], difficult) of an annotation, read here with ElementTree."""
    root = ET.parse(os.path.join(folder, "Annotations", f"{image_id}.xml")).getroot()
    return [
        (o.findtext("name"), [float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")],
         o.findtext("difficult") == "1")
        for o in root.findall("object")
    ]  # fmt: skip


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("voc") / "VOC")
    splits = synthetic.write_voc_folder(folder, 10, seed=2, num_val=4, difficult_fraction=0.3)
    work = str(tmp_path_factory.mktemp("voc_work"))
    config = _config(folder)
    return folder, splits, config, pipeline.get_builder(config, work), work


def test_voc_folder_batches_equal_the_xml(voc):
    folder, splits, config, builder, work = voc
    names = {"circle": 1, "square": 2, "triangle": 3}  # the names found, sorted
    assert builder.info.splits["train"].num_examples == 6 and builder.info.splits["val"].num_examples == 4
    seen, difficult = set(), 0
    for split in ("train", "val"):
        config.data.eval_split = split
        for batch in pipeline.eval_batches(config, builder):
            for i, image_id in enumerate(batch["image_id"]):
                if image_id < 0:
                    continue
                objects = _xml_objects(folder, f"{image_id:06d}")  # VOC ids 000001... -> image ids 1...
                valid = batch["valid"][i]
                assert valid.sum() == len(objects)
                xml_boxes = np.array([[b[1], b[0], b[3], b[2]] for _, b, _ in objects])  # XML numbers as they are
                np.testing.assert_allclose(batch["boxes"][i][valid] / batch["scale"][i], xml_boxes, atol=2e-3)
                np.testing.assert_array_equal(batch["classes"][i][valid], [names[n] for n, _, _ in objects])
                np.testing.assert_array_equal(batch["crowd"][i][valid], [d for _, _, d in objects])
                difficult += sum(d for _, _, d in objects)
                seen.add((split, int(image_id)))
    assert seen == {(s, int(i)) for s in ("train", "val") for i in splits[s]} and difficult >= 3
    config.data.eval_split = "val"
    # The evaluation's ground truth: every object of the split, difficult flags, every class named.
    truth = json.load(open(annotation_json(config, work, builder)))
    assert [c["name"] for c in truth["categories"]] == ["circle", "square", "triangle"]
    expected = [
        (int(i), names[n], [b[0], b[1], b[2] - b[0], b[3] - b[1]], int(d))
        for i in splits["val"]
        for n, b, d in _xml_objects(folder, i)
    ]
    got = [(a["image_id"], a["category_id"], a["bbox"], a["difficult"]) for a in truth["annotations"]]
    assert got == expected and all(a["iscrowd"] == a["difficult"] for a in truth["annotations"])
    # The same json scores the XML's own boxes at AP 1 under both protocols.
    path = annotation_json(config, work, builder)
    for evaluator, key in ((VocEvaluator(path), "mAP"), (CocoEvaluator(path), "AP50")):
        for batch in pipeline.eval_batches(config, builder):
            evaluator.add_ground_truth(batch)
            found = {k: batch[k] for k in ("boxes", "classes", "valid")}
            evaluator.add_detections(batch, dict(found, scores=batch["valid"].astype(np.float32)))
        assert evaluator.evaluate()[key] == pytest.approx(1.0)
    # A training batch carries the same classes and crowd (difficult) flags through the augmentation.
    batch = next(pipeline.train_batches(config, builder))
    assert set(batch["classes"][batch["valid"]]) <= {1, 2, 3} and batch["image"].shape == (2, 128, 128, 3)


def test_prepared_copy_reused_and_edits_prepare_again(voc, caplog):
    folder, _, config, builder, work = voc
    import logging

    caplog.set_level(logging.INFO)
    again = pipeline.get_builder(config, work)
    assert again.prepared_dir == builder.prepared_dir and "contents unchanged" in caplog.text
    xml = os.path.join(folder, "Annotations", "000009.xml")
    original = open(xml).read()
    try:
        open(xml, "w").write(original.replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
        edited = pipeline.get_builder(config, work)
        assert edited.prepared_dir != builder.prepared_dir
    finally:
        open(xml, "w").write(original)


def test_two_year_folders_make_one_split(tmp_path):
    """'VOC2007,VOC2012'-style: a split is the union of the folders' split files; ids that collide across the
    folders (both have 000001) are numbered 1..N instead."""
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    synthetic.write_voc_folder(a, 4, seed=5, num_val=1)
    synthetic.write_voc_folder(b, 3, seed=6, num_val=1)
    indexes = voc_folder.load(voc_folder.parse_folders(f"{a}, {b}"), ["trainval", "val"])
    assert [i for i, _ in indexes["trainval"].images] == list(range(1, 8))
    assert [name for _, name in indexes["trainval"].images][3:5] == [
        "A/JPEGImages/000004.jpg",
        "B/JPEGImages/000001.jpg",
    ]
    assert [i for i, _ in indexes["val"].images] == [4, 7]  # the same image keeps its id in every split


def _annotation(objects, size=(100, 80)):
    parts = [f"<annotation><filename>x.jpg</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
             "<depth>3</depth></size>"]  # fmt: skip
    for name, (x1, y1, x2, y2), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def _small_folder(root, objects_per_image, split="train"):
    from PIL import Image

    folder = os.path.join(root, "VOC")
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    ids = []
    for n, objects in enumerate(objects_per_image, 1):
        image_id = f"2008_{n:06d}"
        Image.new("RGB", (100, 80)).save(os.path.join(folder, "JPEGImages", f"{image_id}.jpg"))
        open(os.path.join(folder, "Annotations", f"{image_id}.xml"), "w").write(_annotation(objects))
        ids.append(image_id)
    open(os.path.join(folder, "ImageSets", "Main", f"{split}.txt"), "w").write("\n".join(ids) + "\n")
    return folder


def test_class_rule_voc_names_custom_names_and_an_explicit_list(tmp_path):
    folder = _small_folder(str(tmp_path / "voc"), [[("dog", (1, 1, 10, 10), 0), ("Person", (5, 5, 50, 50), 1)]])
    (index,) = voc_folder.load([folder], ["train"]).values()
    assert index.categories == {i + 1: c for i, c in enumerate(voc_folder.VOC_CLASSES)}  # the 20, standard order
    assert [o[5] for o in index.objects[2008000001]] == [12, 15]  # dog, person; ids from the digits of 2008_000001
    assert [o[6] for o in index.objects[2008000001]] == [False, True]
    custom = _small_folder(str(tmp_path / "custom"), [[("zebra", (1, 1, 10, 10), 0), ("cat", (5, 5, 9, 9), 0)]])
    (index,) = voc_folder.load([custom], ["train"]).values()
    assert index.categories == {1: "cat", 2: "zebra"}
    (index,) = voc_folder.load([custom], ["train"], "zebra,cat,horse").values()
    assert index.categories == {1: "zebra", 2: "cat", 3: "horse"}
    assert [o[5] for o in index.objects[2008000001]] == [1, 2]
    (index,) = voc_folder.load([folder], ["train"], "voc").values()
    assert len(index.categories) == 20


def _tree(path):
    out = []
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.stat(full)
            out.append((os.path.relpath(full, path), st.st_size if name in files else None, st.st_mtime_ns))
    return sorted(out)


def _rewrite(name, old, new):
    def mutate(folder):
        path = os.path.join(folder, "Annotations", name)
        text = open(path).read()
        assert old in text, (old, text)
        open(path, "w").write(text.replace(old, new, 1))

    return mutate


def _remove(relative):
    return lambda folder: os.remove(os.path.join(folder, relative))


def _write(relative, text):
    return lambda folder: open(os.path.join(folder, relative), "w").write(text)


BOX = "<xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax>"
XML1 = os.path.join("Annotations", "2008_000001.xml")
XML2 = "2008_000002.xml"
BAD_VOC = {
    "malformed_xml": (_write(XML1, "<annotation><object><name>dog</name>"), [XML1, "is not valid XML", "line 1"]),
    "missing_xml": (_remove(XML1), ["missing annotation file", XML1]),
    "missing_image": (
        _remove(os.path.join("JPEGImages", "2008_000002.jpg")),
        ["train.txt line 2", "no image for id '2008_000002'", "JPEGImages/2008_000002.jpg", "<filename> x.jpg"],
    ),
    "corrupt_image": (
        _write(os.path.join("JPEGImages", "2008_000002.jpg"), "not a jpeg"),
        ["image id 2008000002", "cannot read", "2008_000002.jpg", "skip_bad_images=True"],
    ),
    "max_below_min": (
        _rewrite(XML2, BOX, BOX.replace("<xmax>10</xmax>", "<xmax>0.5</xmax>")),
        [XML2, "object 0 (dog)", "bad box", "xmin 1, ymin 1, xmax 0.5, ymax 10 (max < min)"],
    ),
    "box_outside_the_image": (
        _rewrite(XML2, BOX, BOX.replace("<ymax>10</ymax>", "<ymax>81</ymax>")),
        [XML2, "object 0 (dog)", "outside the image", "ymax 81", "<size> 100 x 80"],
    ),
    "coordinate_not_a_number": (
        _rewrite(XML2, "<xmin>1</xmin>", "<xmin>left</xmin>"),
        [XML2, "object 0 (dog)", "<bndbox> xmin 'left'", "expected a number"],
    ),
    "bad_difficult": (
        _rewrite(XML2, "<difficult>0</difficult>", "<difficult>maybe</difficult>"),
        ["<difficult> 'maybe'"],
    ),
    "object_without_name": (_rewrite(XML2, "<name>dog</name>", "<name> </name>"), [XML2, "object 0 has no <name>"]),
    "object_without_box": (_rewrite(XML2, f"<bndbox>{BOX}</bndbox>", ""), [XML2, "object 0 (dog) has no <bndbox>"]),
    "wrong_root": (_write(XML1, "<labels/>"), [XML1, "root element is <labels>, not <annotation>"]),
    "empty_split": (_write(os.path.join("ImageSets", "Main", "train.txt"), "\n"), ["train.txt lists no images"]),
    "id_listed_twice": (
        _write(os.path.join("ImageSets", "Main", "train.txt"), "2008_000001\n2008_000002\n2008_000001\n"),
        ["train.txt", "'2008_000001' is listed twice (lines 1 and 3)"],
    ),
    "no_annotations_folder": (
        lambda folder: os.rename(os.path.join(folder, "Annotations"), os.path.join(folder, "xml")),
        ["has no Annotations/"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VOC))
def test_bad_voc_data_one_line_before_anything_is_written(case, tmp_path):
    folder = _small_folder(str(tmp_path), [[("dog", (1, 1, 10, 10), 0)]] * 3)
    open(os.path.join(folder, "ImageSets", "Main", "val.txt"), "w").write("2008_000003\n")
    mutate, expected = BAD_VOC[case]
    mutate(folder)
    _refused(_config(folder, num_classes=21), tmp_path / "work", *expected)


def _refused(config, workdir, *expected):
    folder = config.data.voc_folder
    before = _tree(folder)
    with pytest.raises(UserError) as info:
        pipeline.get_builder(config, str(workdir))
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    for piece in expected:
        assert piece in message, (piece, message)
    assert _tree(folder) == before  # no tfds/ folder, no half-prepared copy
    assert not os.path.exists(os.path.join(workdir, "prepared_data"))
    return message


def test_config_mistakes_one_line(tmp_path):
    folder = _small_folder(str(tmp_path), [[("dog", (1, 1, 10, 10), 0), ("cat", (2, 2, 9, 9), 0)]] * 2)
    open(os.path.join(folder, "ImageSets", "Main", "val.txt"), "w").write("2008_000002\n")
    work = tmp_path / "work"
    wrong_split = _config(folder, num_classes=21, eval_split="validation")
    _refused(wrong_split, work, "data.eval_split='validation' is not a split of", "(it has train, val)",
             "--config.data.eval_split=val")  # fmt: skip
    _refused(_config(folder, num_classes=21, voc_classes="dog,horse"), work,
             "object names 'cat'", "2008_000001.xml", "not in data.voc_classes (dog,horse)")  # fmt: skip
    _refused(_config(folder, num_classes=8), work, "category ids 8, 12", "--config.model.num_classes=13")
    _refused(_config(str(tmp_path / "nowhere"), num_classes=21), work, "is not a folder")


# ---------------------------------------------------------------------------------------------
# (c) tfds voc/2007, mock data (structure only: voc cannot be downloaded here)
# ---------------------------------------------------------------------------------------------


def _repair_voc(dataset):
    """tfds mock objects have unrelated lengths per field and inverted corners: make them consistent."""
    import tensorflow as tf

    def fix(example):
        objects = example["objects"]
        n = tf.reduce_min([tf.shape(objects[k])[0] for k in ("bbox", "label", "is_difficult")])
        objects = {k: v[:n] for k, v in objects.items()}
        b = objects["bbox"]
        objects["bbox"] = tf.concat([tf.minimum(b[:, :2], b[:, 2:]), tf.maximum(b[:, :2], b[:, 2:])], axis=1)
        return dict(example, objects=objects)

    return dataset.map(fix)


def test_tfds_voc_mock_through_the_pipeline_and_the_evaluator(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    config = defaults.get_config()
    config.data.source, config.data.tfds_name = "tfds", "voc/2007"
    config.data.train_split, config.data.eval_split = "train+validation", "test"
    config.data.train_batch_size = config.data.eval_batch_size = 2
    config.data.max_instances = 64
    config.model.image_size = 64
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        mocked = tfds.core.DatasetBuilder.as_dataset
        monkeypatch.setattr(
            tfds.core.DatasetBuilder, "as_dataset", lambda self, *a, **k: _repair_voc(mocked(self, *a, **k))
        )
        config.model.num_classes = 20
        with pytest.raises(UserError, match=r"category ids 20 .*--config.model.num_classes=21"):
            pipeline.get_builder(config, str(tmp_path))
        config.model.num_classes = 21  # 20 classes + the background slot
        builder = pipeline.get_builder(config, str(tmp_path))
        raw = list(tfds.as_numpy(builder.as_dataset(split="test")))
        train = next(pipeline.train_batches(config, builder))
        batches = list(pipeline.eval_batches(config, builder))
        truth = pipeline.tfds_ground_truth(config, builder)
    assert train["image"].shape == (2, 64, 64, 3) and set(train["classes"][train["valid"]]) <= set(range(1, 21))
    ids = [int(i) for b in batches for i in b["image_id"] if i >= 0]
    assert len(ids) == len(raw) == len(set(ids)) == len(truth["images"]) and ids == [i["id"] for i in truth["images"]]
    assert [c["name"] for c in truth["categories"]] == list(voc_folder.VOC_CLASSES)  # ids 1..20, the VOC order
    expected = [
        (int(label) + 1, int(difficult))
        for example in raw
        for label, difficult in zip(example["objects"]["label"], example["objects"]["is_difficult"], strict=True)
    ]
    assert [(a["category_id"], a["iscrowd"]) for a in truth["annotations"]] == expected
    assert 0 < sum(d for _, d in expected) < len(expected)  # difficult -> crowd (ignored), both kinds present
    crowd = [
        list(b["crowd"][i][b["valid"][i]]) for b in batches for i in range(len(b["image_id"])) if b["image_id"][i] >= 0
    ]
    assert crowd == [list(example["objects"]["is_difficult"]) for example in raw]  # and reach the batches as crowd
    # Scoring the ground truth itself gives AP 1 wherever a class has a non-difficult object.
    evaluator = VocEvaluator(ground_truth=truth)
    for batch in batches:
        evaluator.add_ground_truth(batch)
    evaluator.detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.5}
        for a in truth["annotations"]
    ]
    metrics = evaluator.evaluate()
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["mAP_voc07"] == pytest.approx(1.0)


def test_voc_image_ids_from_file_names():
    import tensorflow as tf

    names = ["000005.jpg", "2008_000002.jpg", "IMG 12.png"]
    ids = [int(pipeline.voc_image_id(tf.constant(n))) for n in names]
    assert ids[:2] == [5, 2008000002] and 0 <= ids[2] < 2**62
    found = voc_folder._image_ids([(0, "000005"), (0, "2008_000002"), (1, "2008_000003")])
    assert found == {(0, "000005"): 5, (0, "2008_000002"): 2008000002, (1, "2008_000003"): 2008000003}
    assert voc_folder._image_ids([(0, "a"), (0, "000005")]) == {(0, "a"): 1, (0, "000005"): 2}


# ---------------------------------------------------------------------------------------------
# (d) End to end: a tiny RetinaNet trained and evaluated on a synthetic VOC folder with the VOC protocol
# ---------------------------------------------------------------------------------------------


def test_train_and_evaluate_on_a_synthetic_voc_folder(tmp_path):
    """The quickstart RetinaNet as tests/test_train.py's resume test trains it (same shapes and schedule, so the
    session's compilation cache serves both), on a synthetic VOC folder, evaluated with eval_protocol='voc'."""
    from configs_util import load_config

    from scaledet_jax import train

    config = load_config("quickstart")
    config.data.synthetic_format = "voc"
    config.data.synthetic_train_images, config.data.synthetic_val_images = 8, 4
    config.data.train_batch_size = config.data.eval_batch_size = 4
    config.total_steps = 4
    config.log_every_steps, config.checkpoint_every_steps = 1, 2
    config.eval_protocol = "voc"
    result = train.train_and_evaluate(config, str(tmp_path))
    metrics = result["eval"]
    assert set(metrics) == {"mAP", "mAP_voc07"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values()), metrics
    saved = json.load(open(tmp_path / "eval_4.json"))
    assert [r["name"] for r in saved["per_class"]] == ["circle", "square", "triangle"]
    assert saved["protocol"]["name"] == "voc" and saved["mAP"] == metrics["mAP"]
    assert sum(r["npos"] for r in saved["per_class"]) > 0
    assert os.path.exists(tmp_path / "synthetic_voc" / "ImageSets" / "Main" / "val.txt")
    # main.py's closing line (it used to look for COCO's 'AP' and crash after a VOC evaluation).
    from scaledet_jax.evaluate import summary_lines

    assert summary_lines(metrics) == [
        f"VOC mAP@0.5 = {metrics['mAP']:.4f} (all-point, VOC2010+; VOC07 11-point {metrics['mAP_voc07']:.4f})"
    ]
