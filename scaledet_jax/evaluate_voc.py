"""PASCAL VOC detection evaluation: per-class AP at one IoU threshold, 11-point (VOC2007) and all-point (VOC2010+).

The rules are the devkit's (MATLAB ``VOCevaldet.m``; py-faster-rcnn / detectron2 ``voc_eval.py``):

* Per class, detections are ranked by score (a stable sort: equal scores keep the order they were added, as
  MATLAB's ``sort`` does). Each is compared with the ground truth of its class in its image; the one of
  largest IoU (the first of equal ones) is its candidate, whether or not it was matched already.
* IoU on boxes [x1, y1, x2, y2] with ``pixel_offset`` added to every width and height (intersection
  included): 1, the devkit's inclusive integer pixel indices (``x2 - x1 + 1``), for VOC data, whose
  coordinates this project keeps as written (``data.voc_folder``, tfds ``voc``); 0 for continuous boxes
  (a COCO folder evaluated with this protocol).
* IoU >= ``iou_threshold`` (MATLAB ``ovmax >= minoverlap``; ``strict_iou``: IoU > threshold, as the Python
  ports): a difficult candidate makes the detection neither TP nor FP (left out of the ranking's counts); an
  unmatched one makes it a TP and matched; a matched one (a duplicate) an FP. Below the threshold: FP.
* Recall = TP / npos with npos the class's non-difficult objects; precision = TP / max(TP + FP, eps).
  11-point AP: mean over t in 0, 0.1, ..., 1 (``np.arange(0, 1.1, 0.1)``) of the largest precision at
  recall >= t (0 where none); all-point AP: the area under the precision envelope (``VOCap``).
* A class without a non-difficult object in the images evaluated has no AP (NaN, ``null`` in the json, 'n/a'
  in the log), and the means leave it out; the devkit would divide by zero.

Ground truth is the COCO-format dict or json the data source provides (``difficult`` per annotation, else
``iscrowd``: crowd regions are ignored the same way), restricted to the images evaluated, or rebuilt from
the batches as ``CocoEvaluator`` does. Detections arrive as ``CocoEvaluator`` collects them (original image
pixels, [x, y, w, h] rounded to 0.01, scores to 1e-5); x2 = x + w.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from absl import logging

from scaledet_jax.evaluate import CocoEvaluator

METRIC_NAMES = ("mAP", "mAP_voc07")
ELEVEN_POINTS = np.arange(0.0, 1.1, 0.1)  # exactly py-faster-rcnn's thresholds (0.30000000000000004, ...)


def pairwise_iou(boxes: np.ndarray, others: np.ndarray, pixel_offset: float = 1.0) -> np.ndarray:
    """IoU [N, M] of [N, 4] and [M, 4] boxes [x1, y1, x2, y2], ``pixel_offset`` added to each extent."""
    boxes, others = np.asarray(boxes, np.float64), np.asarray(others, np.float64)
    iw = np.minimum(boxes[:, None, 2], others[None, :, 2]) - np.maximum(boxes[:, None, 0], others[None, :, 0])
    ih = np.minimum(boxes[:, None, 3], others[None, :, 3]) - np.maximum(boxes[:, None, 1], others[None, :, 1])
    inter = np.maximum(iw + pixel_offset, 0.0) * np.maximum(ih + pixel_offset, 0.0)
    area = (boxes[:, 2] - boxes[:, 0] + pixel_offset) * (boxes[:, 3] - boxes[:, 1] + pixel_offset)
    other_area = (others[:, 2] - others[:, 0] + pixel_offset) * (others[:, 3] - others[:, 1] + pixel_offset)
    union = area[:, None] + other_area[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray, eleven_point: bool = False) -> float:
    """VOC AP of a ranked PR curve: 11-point (VOC2007) or all-point (area under the precision envelope)."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if eleven_point:
        return float(sum(np.max(precision[recall >= t]) if np.any(recall >= t) else 0.0 for t in ELEVEN_POINTS) / 11.0)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: precision made non-increasing in recall
    changes = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def voc_evaluate(
    ground_truth: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    detections: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    class_ids: list[int],
    *,
    iou_threshold: float = 0.5,
    pixel_offset: float = 1.0,
    strict_iou: bool = False,
) -> dict[int, dict[str, float]]:
    """Per-class VOC results.

    ``ground_truth``: image id -> (boxes [G, 4] x1y1x2y2, class ids [G], difficult [G] bool), every image
    evaluated (one without objects too). ``detections``: (image ids [D], boxes [D, 4], class ids [D], scores
    [D]) in the order they were produced; those on other images are left out. Returns class id ->
    {'AP', 'AP_voc07', 'npos', 'difficult', 'detections', 'tp', 'fp'} (AP NaN when npos is 0)."""
    image_ids, boxes, labels, scores = (np.asarray(a) for a in detections)
    boxes = boxes.reshape(-1, 4).astype(np.float64)
    keep = np.isin(image_ids, np.fromiter(ground_truth, np.int64, len(ground_truth)))
    image_ids, boxes, labels, scores = image_ids[keep], boxes[keep], labels[keep], scores[keep]

    # All ground truth in one list; each image's objects start at offsets[image id].
    offsets, start = {}, 0
    for image_id, (_, gt_labels, _) in ground_truth.items():
        offsets[image_id] = start
        start += len(np.asarray(gt_labels).reshape(-1))
    all_labels = np.concatenate([np.asarray(g[1], np.int64).reshape(-1) for g in ground_truth.values()] or [[]])
    all_difficult = np.concatenate([np.asarray(g[2], bool).reshape(-1) for g in ground_truth.values()] or [[]])
    all_difficult = all_difficult.astype(bool)

    # Each detection's candidate: the object of its class and image of largest IoU (the first of equal ones).
    best_iou = np.full(len(image_ids), -np.inf)
    best_gt = np.full(len(image_ids), -1, np.int64)
    by_image = np.argsort(image_ids, kind="stable")
    bounds = np.flatnonzero(np.diff(image_ids[by_image])) + 1
    for members in np.split(by_image, bounds) if len(by_image) else []:
        gt_boxes, gt_labels, _ = ground_truth[int(image_ids[members[0]])]
        gt_labels = np.asarray(gt_labels).reshape(-1)
        if not len(gt_labels):
            continue
        iou = pairwise_iou(boxes[members], np.asarray(gt_boxes).reshape(-1, 4), pixel_offset)
        iou = np.where(labels[members][:, None] == gt_labels[None, :], iou, -np.inf)
        j = np.argmax(iou, axis=1)
        best_iou[members] = iou[np.arange(len(members)), j]
        best_gt[members] = np.where(np.isfinite(best_iou[members]), offsets[int(image_ids[members[0]])] + j, -1)

    hit = best_iou > iou_threshold if strict_iou else best_iou >= iou_threshold
    on_difficult = hit & all_difficult[np.maximum(best_gt, 0)] if len(all_difficult) else np.zeros_like(hit)
    results = {}
    for class_id in class_ids:
        of_class = all_labels == class_id
        npos, ndiff = int(np.sum(of_class & ~all_difficult)), int(np.sum(of_class & all_difficult))
        members = np.flatnonzero(labels == class_id)
        members = members[np.argsort(-scores[members].astype(np.float64), kind="stable")]
        candidates = hit[members] & ~on_difficult[members]  # detections on a difficult object count nowhere
        # The first (highest ranked) detection of each object is its TP; later ones on it are duplicates (FP).
        first = np.zeros(len(members), bool)
        if candidates.any():
            _, first_index = np.unique(best_gt[members][candidates], return_index=True)
            first[np.flatnonzero(candidates)[first_index]] = True
        tp = first.astype(np.float64)
        fp = (~hit[members] | (candidates & ~first)).astype(np.float64)
        row = {"npos": npos, "difficult": ndiff, "detections": len(members), "tp": int(tp.sum()), "fp": int(fp.sum())}
        if npos == 0:
            row.update(AP=float("nan"), AP_voc07=float("nan"))
        else:
            tp, fp = np.cumsum(tp), np.cumsum(fp)
            recall = tp / npos
            precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            row.update(AP=average_precision(recall, precision), AP_voc07=average_precision(recall, precision, True))
        results[class_id] = row
    return results


def mean_defined(values) -> float:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


class VocEvaluator(CocoEvaluator):
    """PASCAL VOC mAP with ``CocoEvaluator``'s driving interface (``add_ground_truth``, ``add_detections``,
    ``evaluate``, ``write``). Metrics: ``mAP`` (all-point) and ``mAP_voc07`` (11-point) at ``iou_threshold``;
    ``per_class['bbox']``: rows {id, name, AP, AP_voc07, npos, difficult, detections} for every class."""

    def __init__(
        self,
        annotation_json: str | None = None,
        ground_truth: dict | None = None,
        *,
        iou_threshold: float = 0.5,
        pixel_offset: float = 1.0,
        strict_iou: bool = False,
    ) -> None:
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        super().__init__(annotation_json, with_masks=False, ground_truth=ground_truth)
        self.iou_threshold, self.pixel_offset, self.strict_iou = float(iou_threshold), float(pixel_offset), strict_iou

    @classmethod
    def from_config(cls, config, annotation_json: str | None = None, ground_truth: dict | None = None) -> VocEvaluator:
        """With ``config.eval_voc``'s conventions (iou_threshold, pixel_offset, strict_iou)."""
        options = dict(config.get("eval_voc", {}) or {})
        return cls(annotation_json, ground_truth, **options)

    def add_detections(self, batch: dict[str, np.ndarray], detections: dict[str, np.ndarray]) -> None:
        """As ``CocoEvaluator.add_detections``; instance masks are not scored here (not pasted)."""
        super().add_detections(batch, {k: v for k, v in detections.items() if k != "masks"})

    def _coco_dict(self) -> dict:
        if self.annotation_json:
            with open(self.annotation_json) as f:
                return json.load(f)
        if self.ground_truth:
            return self.ground_truth
        return {
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": c} for c in sorted(self.category_ids)],
        }

    def evaluate(self, verbose: bool = False) -> dict[str, float]:
        """``mAP`` and ``mAP_voc07`` (NaN when no class has a non-difficult object); the per-class rows go to
        ``self.per_class['bbox']``."""
        data = self._coco_dict()
        evaluated = {int(image["id"]) for image in self.images}
        objects: dict[int, list] = {image_id: [] for image_id in evaluated}
        for ann in data.get("annotations", []):
            if int(ann["image_id"]) in objects:
                x, y, w, h = (float(v) for v in ann["bbox"])
                difficult = ann.get("difficult", ann.get("iscrowd", 0))
                objects[int(ann["image_id"])].append((x, y, x + w, y + h, int(ann["category_id"]), bool(difficult)))
        ground_truth = {
            image_id: (
                np.array([o[:4] for o in objs], np.float64).reshape(-1, 4),
                np.array([o[4] for o in objs], np.int64),
                np.array([o[5] for o in objs], bool),
            )
            for image_id, objs in objects.items()
        }
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in data.get("categories", [])}
        class_ids = sorted(names)
        dets = self.detections
        xywh = np.array([d["bbox"] for d in dets], np.float64).reshape(-1, 4)
        det_boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        results = voc_evaluate(
            ground_truth,
            (
                np.array([d["image_id"] for d in dets], np.int64),
                det_boxes,
                np.array([d["category_id"] for d in dets], np.int64),
                np.array([d["score"] for d in dets], np.float64),
            ),
            class_ids,
            iou_threshold=self.iou_threshold,
            pixel_offset=self.pixel_offset,
            strict_iou=self.strict_iou,
        )
        rows = [
            {"id": c, "name": names[c], "AP": r["AP"], "AP_voc07": r["AP_voc07"], "npos": r["npos"],
             "difficult": r["difficult"], "detections": r["detections"]}
            for c, r in results.items()
        ]  # fmt: skip
        self.per_class = {"bbox": rows}
        self.undefined_classes = [r["name"] for r in rows if r["AP"] != r["AP"]]
        if self.undefined_classes:
            logging.info(
                "VOC AP undefined for %s (no non-difficult object in the %d images evaluated): left out of the mean",
                ", ".join(self.undefined_classes),
                len(evaluated),
            )
        metrics = {"mAP": mean_defined(r["AP"] for r in rows), "mAP_voc07": mean_defined(r["AP_voc07"] for r in rows)}
        if verbose:
            from scaledet_jax.evaluate import format_per_class

            print(format_per_class(rows))
        return metrics

    def write(self, workdir: str, step: int, metrics: dict[str, Any]) -> tuple[str, ...]:
        """``eval_<step>.json`` (metrics, the protocol's conventions, the per-class table) and
        ``detections_<step>.json`` (COCO bbox results), each written atomically."""
        nan = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731
        summary = {"step": step, **{k: nan(v) for k, v in metrics.items()}}
        summary["protocol"] = {
            "name": "voc",
            "iou_threshold": self.iou_threshold,
            "pixel_offset": self.pixel_offset,
            "match": "iou > threshold" if self.strict_iou else "iou >= threshold",
            "mAP": "all-point (VOC2010+)",
            "mAP_voc07": "11-point (VOC2007)",
        }
        undefined = sorted(k for k, v in metrics.items() if v != v)
        if undefined:
            summary["undefined"] = undefined
        if getattr(self, "undefined_classes", None):
            summary["undefined_classes"] = self.undefined_classes
        if undefined or getattr(self, "undefined_classes", None):
            summary["note"] = (
                "null: undefined (a class without a non-difficult object in the images evaluated), not 0; "
                "left out of the means"
            )
        summary["per_class"] = [
            {k: nan(v) for k, v in r.items()} for r in getattr(self, "per_class", {}).get("bbox", [])
        ]
        paths = []
        for name, content in (("eval", summary), ("detections", self.detections)):
            path = os.path.join(workdir, f"{name}_{step}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(content, f)
            os.replace(path + ".tmp", path)
            paths.append(path)
        return tuple(paths)
