"""COCO evaluation with pycocotools: ground truth and detections collected on the host.

Ground truth comes from the evaluation batches themselves (boxes mapped back to original image
pixels), so every data source — tfds, a COCO folder, the synthetic set — is evaluated the same way.
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


class CocoEvaluator:
    """Accumulates ground truth and detections batch by batch; ``evaluate()`` runs COCOeval."""

    def __init__(self) -> None:
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.detections: list[dict] = []
        self.category_ids: set[int] = set()

    def add_ground_truth(self, batch: dict[str, np.ndarray]) -> None:
        for i, image_id in enumerate(batch["image_id"]):
            if image_id < 0:  # padding
                continue
            height, width = (int(v) for v in batch["original_size"][i])
            self.images.append({"id": int(image_id), "height": height, "width": width})
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
        for i, image_id in enumerate(batch["image_id"]):
            if image_id < 0:
                continue
            valid = detections["valid"][i]
            height, width = batch["original_size"][i]
            boxes = detections["boxes"][i][valid] / batch["scale"][i]
            boxes = np.clip(boxes, 0, [height, width, height, width])
            for box, score, cls in zip(
                _xywh(boxes), detections["scores"][i][valid], detections["classes"][i][valid], strict=True
            ):
                self.detections.append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(cls),
                        "bbox": [round(float(v), 2) for v in box],
                        "score": round(float(score), 5),
                    }
                )

    def evaluate(self, verbose: bool = False) -> dict[str, float]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        ground_truth = COCO()
        ground_truth.dataset = {
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": c} for c in sorted(self.category_ids)],
        }
        with contextlib.redirect_stdout(io.StringIO()) as log:
            ground_truth.createIndex()
            if not self.detections:
                return dict.fromkeys(METRIC_NAMES, 0.0)
            detections = ground_truth.loadRes(self.detections)
            coco_eval = COCOeval(ground_truth, detections, iouType="bbox")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        if verbose:
            print(log.getvalue())
        return {name: float(max(v, 0.0)) for name, v in zip(METRIC_NAMES, coco_eval.stats, strict=True)}

    def write(self, workdir: str, step: int, metrics: dict[str, Any]) -> tuple[str, str]:
        """``eval_<step>.json`` (metrics) and ``detections_<step>.json`` (COCO results), atomically."""
        paths = (os.path.join(workdir, f"eval_{step}.json"), os.path.join(workdir, f"detections_{step}.json"))
        for path, content in zip(paths, ({"step": step, **metrics}, self.detections), strict=True):
            with open(path + ".tmp", "w") as f:
                json.dump(content, f)
            os.replace(path + ".tmp", path)
        return paths
