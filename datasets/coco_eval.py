"""COCO bbox metrics via pycocotools COCOeval. Values are FRACTIONS in [0, 1] (not percent)."""

from __future__ import annotations

import contextlib
import io

import numpy as np

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(detections: dict, label_to_cat: dict[int, int]) -> list[dict]:
    """{image_id: {boxes xyxy, scores, labels (contiguous)}} → COCO result list (xywh, category_id)."""
    out = []
    for image_id, det in detections.items():
        boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(det["labels"]).reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {image_id}: boxes/scores/labels lengths differ")
        for (x0, y0, x1, y1), s, lab in zip(boxes, scores, labels, strict=True):
            if int(lab) not in label_to_cat:
                raise ValueError(f"image {image_id}: label {int(lab)} not in 1..{len(label_to_cat)}")
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_cat[int(lab)]),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "score": float(s),
                }
            )
    return out


def coco_metrics(coco_gt, detections: dict, label_to_cat: dict[int, int] | None = None) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (fractions) of ``detections`` against ``coco_gt`` (pycocotools COCO).

    ``detections`` maps image_id → torchvision output dict (``boxes`` xyxy, ``scores``, ``labels`` in
    contiguous ids 1..K). ``label_to_cat`` defaults to the sorted category ids of ``coco_gt``. No detections
    at all gives zeros. Size buckets with no ground truth (COCOeval's -1) are reported as 0.
    """
    from pycocotools.cocoeval import COCOeval

    if label_to_cat is None:
        label_to_cat = {i + 1: c for i, c in enumerate(sorted(coco_gt.getCatIds()))}
    results = to_coco_results(detections, label_to_cat)
    if not results:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = sorted(coco_gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: max(float(v), 0.0) for k, v in zip(METRIC_NAMES, ev.stats[:6], strict=True)}
