"""Evaluation follows the official COCO protocol (issue 13 item 1): against the split's annotation json,
every object (more per image than ``data.max_instances``), annotation areas (polygon areas, unlike box
areas), undefined metrics as undefined, and a per-class table — all equal to pycocotools run directly
on the json and the results file we write."""

import json

import numpy as np
import pytest
from configs_util import load_config
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from scaledet_jax.data import pipeline, synthetic
from scaledet_jax.evaluate import METRIC_NAMES, CocoEvaluator

MAX_INSTANCES = 2  # the synthetic images hold up to 6 objects


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocol")
    folder = tmp / "shapes"
    synthetic.write_split(str(folder), "train", 4, seed=1)
    json_path = synthetic.write_split(str(folder), "val", 16, seed=2)
    config = load_config("fasterrcnn_quickstart")
    d = config.data
    d.source, d.coco_folder, d.train_split, d.eval_split = "coco_folder", str(folder), "train", "val"
    d.max_instances, d.eval_batch_size = MAX_INSTANCES, 4
    builder = pipeline.get_builder(config, str(tmp))
    batches = list(pipeline.eval_batches(config, builder))
    gt = COCO(json_path)
    rng = np.random.RandomState(0)
    detections_per_batch = []
    for batch in batches:
        boxes = np.zeros((4, 12, 4), np.float32)
        scores, classes, valid = np.zeros((4, 12), np.float32), np.zeros((4, 12), np.int32), np.zeros((4, 12), bool)
        for i, image_id in enumerate(batch["image_id"]):
            for j, ann in enumerate(gt.imgToAnns[int(image_id)][:12]):
                x, y, w, h = (np.asarray(ann["bbox"]) + rng.normal(0, 2.0, 4)) * batch["scale"][i]
                boxes[i, j] = [y, x, y + h, x + w]  # network pixels, as the model predicts them
                scores[i, j], valid[i, j] = rng.uniform(0.1, 1.0), True
                classes[i, j] = ann["category_id"] if rng.uniform() > 0.2 else ann["category_id"] % 3 + 1
        detections_per_batch.append({"boxes": boxes, "scores": scores, "classes": classes, "valid": valid})
    return dict(tmp=tmp, json=json_path, gt=gt, batches=batches, detections=detections_per_batch)


def _run(evaluation, annotation_json):
    evaluator = CocoEvaluator(annotation_json)
    for batch, detections in zip(evaluation["batches"], evaluation["detections"], strict=True):
        evaluator.add_ground_truth(batch)
        evaluator.add_detections(batch, detections)
    return evaluator, evaluator.evaluate()


def test_metrics_equal_pycocotools_on_the_json_and_our_results_file(evaluation):
    gt = evaluation["gt"]
    per_image = [len(gt.imgToAnns[i]) for i in gt.getImgIds()]
    assert max(per_image) > MAX_INSTANCES  # objects beyond the batches' max_instances count
    areas = [(a["area"], a["bbox"][2] * a["bbox"][3]) for a in gt.dataset["annotations"]]
    assert any(abs(area - box) > 0.1 * box for area, box in areas)  # polygon areas unlike box areas

    evaluator, ours = _run(evaluation, evaluation["json"])
    _, results_path, *_ = evaluator.write(str(evaluation["tmp"]), 7, ours)
    direct = COCOeval(gt, gt.loadRes(results_path), iouType="bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    for name, value in zip(METRIC_NAMES, direct.stats, strict=True):
        if value < 0:
            assert np.isnan(ours[name]), name  # undefined stays undefined
        else:
            assert ours[name] == pytest.approx(value, abs=1e-12), name
    assert 0.2 < ours["AP"] < 0.95

    # The eval json: undefined metrics as null with a note, and the per-class table with names.
    saved = json.load(open(evaluation["tmp"] / "eval_7.json"))
    undefined = [n for n, v in zip(METRIC_NAMES, direct.stats, strict=True) if v < 0]
    assert undefined and all(saved[n] is None for n in undefined) and saved["undefined"] == sorted(undefined)
    rows = {r["name"]: r for r in saved["per_class"]}
    assert set(rows) == {c["name"] for c in gt.dataset["categories"]}
    for category in gt.dataset["categories"]:  # each class scored on its own by pycocotools
        alone = COCOeval(gt, gt.loadRes(results_path), iouType="bbox")
        alone.params.catIds = [category["id"]]
        alone.evaluate()
        alone.accumulate()
        alone.summarize()
        assert rows[category["name"]]["AP"] == pytest.approx(alone.stats[0], abs=1e-12)
        assert rows[category["name"]]["AP50"] == pytest.approx(alone.stats[1], abs=1e-12)


def test_ground_truth_rebuilt_from_batches_differs(evaluation):
    """Negative control: the batches' ground truth (cut to max_instances, box areas) scores otherwise."""
    _, from_json = _run(evaluation, evaluation["json"])
    _, from_batches = _run(evaluation, None)
    assert abs(from_json["AP"] - from_batches["AP"]) > 0.01 or abs(from_json["AR100"] - from_batches["AR100"]) > 0.01


def test_no_detections_give_zero_where_defined_and_undefined_elsewhere(evaluation):
    evaluator = CocoEvaluator(evaluation["json"])
    for batch in evaluation["batches"][1:]:  # not every image of the json is evaluated (e.g. another host's)
        evaluator.add_ground_truth(batch)
    metrics = evaluator.evaluate()
    assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0 and np.isnan(metrics["APl"])


def test_plus_one_boxes_map_back_and_measure_as_mmdetection_writes_them():
    """A converted mmdetection v1 model's "+1" box (exclusive corners here) at scale 0.5: mmdetection divides its
    inclusive corners (x1 20 -> 40, x2 41 - 1 = 40 -> 80) and writes w = x2 - x1 + 1 = 41; plain boxes give 42."""
    batch = {"image_id": np.array([1]), "original_size": np.array([[200, 300]]), "scale": np.array([0.5])}
    detections = {
        "boxes": np.array([[[10.0, 20.0, 31.0, 41.0]]]),
        "scores": np.array([[0.9]]),
        "classes": np.array([[1]]),
        "valid": np.array([[True]]),
    }
    mmdet = CocoEvaluator(plus_one_boxes=True)
    mmdet.add_detections(batch, detections)
    plain = CocoEvaluator()
    plain.add_detections(batch, detections)
    assert mmdet.detections[0]["bbox"] == [40.0, 20.0, 41.0, 41.0]
    assert plain.detections[0]["bbox"] == [40.0, 20.0, 42.0, 42.0]
