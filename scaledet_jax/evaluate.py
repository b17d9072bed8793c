"""COCO evaluation with pycocotools: detections (and instance masks) collected on the host.

Ground truth: when the data source has an annotation json (a COCO folder, the synthetic set) the
evaluation runs against that json as pycocotools would — every object, its annotation area and crowd
flag, restricted to the images evaluated; for tfds (``coco/2017``) every object of the eval split
with its stored area (``pipeline.tfds_ground_truth``, not the batches cut to ``max_instances``);
without either it is rebuilt from the evaluation batches (boxes mapped back to original image
pixels). ``bbox`` metrics keep their plain names (AP, AP50, ...); when the detections carry masks,
``segm`` metrics follow as segm_AP, segm_AP50, ... Metrics pycocotools leaves undefined (-1: no
ground truth in an area range) are NaN here and null in ``eval_<step>.json``, never 0; a per-class
AP / AP50 table with category names goes to the json and the log. ``config.eval_protocol='voc'`` scores
PASCAL VOC mAP instead (``scaledet_jax.evaluate_voc.VocEvaluator``, same interface, same ground truth).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

import numpy as np

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _xywh(boxes: np.ndarray) -> np.ndarray:
    """[ymin, xmin, ymax, xmax] -> COCO [x, y, w, h]."""
    return np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], axis=1)


def annotation_json(config, workdir: str, builder=None) -> str | None:
    """The eval split's COCO json when ``config.data`` reads a COCO folder (or the synthetic set), or the one a
    VOC folder's prepared copy holds (``builder.annotation_jsons``)."""
    from scaledet_jax.data import coco_folder

    data = config.data
    prepared = (getattr(builder, "annotation_jsons", None) or {}).get(data.eval_split)
    if prepared:
        return prepared if os.path.exists(prepared) else None
    if data.source == "synthetic":
        folder = data.coco_folder or os.path.join(workdir, "synthetic_data")
    elif data.source == "coco_folder":
        folder = data.coco_folder
    else:
        return None
    path = coco_folder.json_path(folder, data.eval_split)
    return path if os.path.exists(path) else None


class CocoEvaluator:
    """Accumulates detections (and ground truth, without a json) batch by batch; ``evaluate()`` runs
    COCOeval for ``bbox`` and, when masks were added, ``segm``."""

    def __init__(
        self,
        annotation_json: str | None = None,
        with_masks: bool = False,
        ground_truth: dict | None = None,
        plus_one_boxes: bool = False,
        mask_paste: str = "torchvision",
    ) -> None:
        """``annotation_json``: the split's COCO json; ``ground_truth``: the same as a dict (tfds,
        ``pipeline.tfds_ground_truth``); with neither, the ground truth is rebuilt from the batches.
        ``plus_one_boxes`` (a converted mmdetection v1 model, ``detection.clip='plus_one'``): boxes map back
        to the image by their inclusive corners and their COCO width is x2 - x1 + 1 there, as mmdetection
        writes it; ``mask_paste``: ``'torchvision'`` (``ops.masks.paste_masks``) or ``'mmdet'``
        (``paste_masks_mmdet``), as ``Detector.predict`` pastes."""
        self.annotation_json = annotation_json
        self.ground_truth = ground_truth
        self.with_masks = with_masks  # segm metrics and results, even when no detection has been made
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.detections: list[dict] = []
        self.segmentations: list[dict] = []
        self.category_ids: set[int] = set()
        self.plus_one_boxes = plus_one_boxes
        self.mask_paste = mask_paste

    def add_ground_truth(self, batch: dict[str, np.ndarray]) -> None:
        for i, image_id in enumerate(batch["image_id"]):
            if image_id < 0:  # padding
                continue
            height, width = (int(v) for v in batch["original_size"][i])
            self.images.append({"id": int(image_id), "height": height, "width": width})
            if self.annotation_json or self.ground_truth:  # the json / dataset has the objects
                continue
            valid = batch["valid"][i]
            boxes = _xywh(batch["boxes"][i][valid] / batch["scale"][i])
            for box, cls, crowd in zip(boxes, batch["classes"][i][valid], batch["crowd"][i][valid], strict=True):
                self.category_ids.add(int(cls))
                self.annotations.append(
                    {
                        "id": len(self.annotations) + 1,
                        "image_id": int(image_id),
                        "category_id": int(cls),
                        "bbox": [float(v) for v in box],
                        "area": float(box[2] * box[3]),
                        "iscrowd": int(crowd),
                    }
                )

    def add_detections(self, batch: dict[str, np.ndarray], detections: dict[str, np.ndarray]) -> None:
        """``detections``: boxes [B, D, 4] (input pixels), scores, classes, valid, optionally masks
        [B, D, m, m] (probabilities in each box's frame, pasted into the original image here)."""
        from scaledet_jax.ops import masks as mask_ops

        for i, image_id in enumerate(batch["image_id"]):
            if image_id < 0:
                continue
            valid = detections["valid"][i]
            height, width = (int(v) for v in batch["original_size"][i])
            boxes = detections["boxes"][i][valid]
            if self.plus_one_boxes:  # mmdetection's inclusive x2 = ours - 1 is what its scale factor divides
                inclusive = np.array([0.0, 0.0, 1.0, 1.0])
                boxes = (boxes - inclusive) / batch["scale"][i] + inclusive
            else:
                boxes = boxes / batch["scale"][i]
            boxes = np.clip(boxes, 0, [height, width, height, width])
            scores, classes = detections["scores"][i][valid], detections["classes"][i][valid]
            for box, score, cls in zip(_xywh(boxes), scores, classes, strict=True):
                self.detections.append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(cls),
                        "bbox": [round(float(v), 2) for v in box],
                        "score": round(float(score), 5),
                    }
                )
            if "masks" in detections:
                paste = mask_ops.paste_masks_mmdet if self.mask_paste == "mmdet" else mask_ops.paste_masks
                pasted = paste(detections["masks"][i][valid], boxes, height, width)
                for rle, score, cls in zip(mask_ops.encode_masks(pasted), scores, classes, strict=True):
                    self.segmentations.append(
                        {
                            "image_id": int(image_id),
                            "category_id": int(cls),
                            "segmentation": rle,
                            "score": round(float(score), 5),
                        }
                    )

    def _ground_truth(self):
        from pycocotools.coco import COCO

        if self.annotation_json:
            return COCO(self.annotation_json)
        ground_truth = COCO()
        if self.ground_truth:
            ground_truth.dataset = self.ground_truth
            ground_truth.createIndex()
            return ground_truth
        ground_truth.dataset = {
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": c} for c in sorted(self.category_ids)],
        }
        ground_truth.createIndex()
        return ground_truth

    @staticmethod
    def _no_results(ground_truth):
        """An empty results set (pycocotools' ``loadRes`` refuses an empty list): AP / AR are then 0 wherever
        there is ground truth and undefined where there is none, as they should be."""
        from pycocotools.coco import COCO

        empty = COCO()
        empty.dataset = {
            "images": list(ground_truth.dataset["images"]),
            "categories": list(ground_truth.dataset.get("categories", [])),
            "annotations": [],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            empty.createIndex()
        return empty

    def evaluate(self, verbose: bool = False) -> dict[str, float]:
        """COCO metrics: ``AP``, ``AP50``, ... (bbox) and ``segm_AP``, ... (segm) as floats, NaN where
        pycocotools reports them undefined (-1: no ground truth in that area range). The per-class AP and
        AP50 with category names go to ``self.per_class`` ({iou type: [{id, name, AP, AP50}]})."""
        from pycocotools.cocoeval import COCOeval

        results = {"bbox": self.detections}
        if self.with_masks or self.segmentations:
            results["segm"] = self.segmentations
        metrics: dict[str, float] = {}
        self.per_class: dict[str, list[dict]] = {}
        with contextlib.redirect_stdout(io.StringIO()) as log:
            ground_truth = self._ground_truth()
            image_ids = sorted({image["id"] for image in self.images})
            for iou_type, found in results.items():
                prefix = "" if iou_type == "bbox" else f"{iou_type}_"
                # loadRes adds fields (area, id, bbox, ...) to the dicts it is given: give it copies.
                if found:
                    results_api = ground_truth.loadRes([dict(r) for r in found])
                else:
                    results_api = self._no_results(ground_truth)
                coco_eval = COCOeval(ground_truth, results_api, iouType=iou_type)
                coco_eval.params.imgIds = image_ids
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.summarize()
                metrics.update(
                    {prefix + name: _defined(v) for name, v in zip(METRIC_NAMES, coco_eval.stats, strict=True)}
                )
                self.per_class[iou_type] = _per_class(coco_eval, ground_truth)
        if verbose:
            print(log.getvalue())
        return metrics

    def write(self, workdir: str, step: int, metrics: dict[str, Any]) -> tuple[str, ...]:
        """``eval_<step>.json`` (metrics), ``detections_<step>.json`` (COCO bbox results) and, with masks,
        ``segmentations_<step>.json`` (COCO segm results, RLE), each written atomically."""
        undefined = sorted(k for k, v in metrics.items() if v != v)
        summary = {"step": step, **{k: (None if v != v else v) for k, v in metrics.items()}}
        if undefined:
            summary["undefined"] = undefined
            summary["note"] = "null: undefined (no ground truth in that area range), not 0"
        for iou_type, rows in getattr(self, "per_class", {}).items():
            key = "per_class" if iou_type == "bbox" else f"{iou_type}_per_class"
            summary[key] = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]
        files = [("eval", summary), ("detections", self.detections)]
        if self.with_masks or self.segmentations:
            files.append(("segmentations", self.segmentations))
        paths = []
        for name, content in files:
            path = os.path.join(workdir, f"{name}_{step}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(content, f)
            os.replace(path + ".tmp", path)
            paths.append(path)
        return tuple(paths)


def summary_lines(metrics: dict[str, float]) -> list[str]:
    """The headline numbers of an evaluation, for the end of ``main.py``: VOC mAP (``eval_protocol='voc'``) or
    COCO box AP, plus mask AP for Mask R-CNN."""
    if "mAP" in metrics:
        return [f"VOC mAP@0.5 = {metrics['mAP']:.4f} (all-point, VOC2010+; VOC07 11-point {metrics['mAP_voc07']:.4f})"]
    lines = [f"COCO AP@[.5:.95] = {metrics['AP']:.4f} (AP50 {metrics['AP50']:.4f}, AP75 {metrics['AP75']:.4f})"]
    if "segm_AP" in metrics:
        lines.append(
            f"COCO mask AP@[.5:.95] = {metrics['segm_AP']:.4f} (AP50 {metrics['segm_AP50']:.4f}, "
            f"AP75 {metrics['segm_AP75']:.4f})"
        )
    return lines


def _defined(value: float) -> float:
    """pycocotools' -1 ("no ground truth in this range") as NaN."""
    return float("nan") if value < 0 else float(value)


def _per_class(coco_eval, ground_truth) -> list[dict]:
    """AP (IoU .50:.95) and AP50 per category (all areas, 100 detections), NaN without ground truth."""
    precision = coco_eval.eval["precision"]  # [IoU thresholds, recall points, categories, areas, max dets]
    rows = []
    for k, category in enumerate(coco_eval.params.catIds):
        every = precision[:, :, k, 0, -1]
        at50 = precision[0, :, k, 0, -1]
        rows.append(
            {
                "id": int(category),
                "name": str(ground_truth.cats.get(category, {}).get("name", category)),
                "AP": float(np.mean(every[every > -1])) if np.any(every > -1) else float("nan"),
                "AP50": float(np.mean(at50[at50 > -1])) if np.any(at50 > -1) else float("nan"),
            }
        )
    return rows


def format_per_class(rows: list[dict]) -> str:
    """The per-class table for the log: name, id, then every other column of the rows (COCO: AP, AP50; VOC:
    AP, AP_voc07, object counts); floats with 3 decimals, 'n/a' where undefined."""
    columns = [k for k in rows[0] if k not in ("id", "name")] if rows else ["AP", "AP50"]
    width = max([len(r["name"]) for r in rows] + [8])
    sizes = {c: max(6, len(c)) for c in columns}

    def cell(value, size: int) -> str:
        if isinstance(value, float):
            return f"{'n/a':>{size}}" if value != value else f"{value:{size}.3f}"
        return f"{value!s:>{size}}"

    lines = [f"{'category':<{width}}  {'id':>4}" + "".join(f"  {c:>{sizes[c]}}" for c in columns)]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {r['id']:>4}" + "".join(f"  {cell(r[c], sizes[c])}" for c in columns))
    return "\n".join(lines)
