"""DVC stage `evaluate`: COCO metrics (pycocotools) and annotator effort of the candidate
and of the deployed model (the one the `deployed` stage's snapshot names) on the val split,
each run by its own recipe (model.json), as serving runs it; a candidate that is the
deployed model already is scored once.

Annotator effort (backend/effort.py): the candidate's per-class score thresholds that leave
annotators the fewest corrections on val, and at them the corrections per image, the effort
ratio (1.0: as costly as drawing every box), precision and recall. Figures fitted and scored
on the same images flatter, so `metrics.json` labels them `in_sample` and adds the effort
ratio measured out of sample (cross-fitted over val folds, with a 95% interval), which the
deploy gate decides on. The deployed model is scored at the thresholds it serves, not
re-fitted. The candidate's survey counts are calibrated (backend/counts.py: a ratio estimator
with a 95% interval, every class counted, with its coverage on held-out folds) and its
empty-image triage threshold chosen at `triage.recall`. `deploy` writes thresholds, count
calibration and triage into the deployed version's model.json, so serving, prelabel and
predict use them.

Writes `metrics.json` (for `dvc metrics diff` and the deploy gate), `plots/pr.json`
(precision-recall at IoU 0.5 per class) and `plots/effort.json` (effort ratio against the
threshold per class), both for `dvc plots`.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from backend import counts, effort
from backend.detection.tiling import TilePlan
from backend.files import file_sha256
from backend.imagery.images import load_image
from backend.model_dir import ModelDir
from backend.recipe import Recipe
from backend.thresholds import describe_threshold

from .coco import read_coco, write_json
from .deployed import deployed_model
from .params import fail, load_params


def result_records(det: Any, image_id: int, category: dict[int, int | None] | None = None
                   ) -> list[dict[str, Any]]:
    """COCO result records of one image's detections; `category` maps a model class to
    the val split's category (None: not in val, left out; no map: the class id as is)."""
    records = []
    for box, score, cls in zip(det.boxes.tolist(), det.scores.tolist(), det.classes.tolist(),
                               strict=True):
        category_id = int(cls) if category is None else category.get(int(cls))
        if category_id is not None:
            records.append({"image_id": image_id, "category_id": category_id,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                            "score": float(score)})
    return records


def detections_for(
    model: ModelDir, coco: dict[str, Any], images: Path, tiling: Recipe, device: str
) -> list[dict[str, Any]]:
    """COCO result records, scored by the model over every val image. Classes are matched
    to the val split's categories by name, so a model with another label set (the deployed
    one, after a label change) is scored on the same images and the classes both know."""
    predictor = model.predictor(device=device)
    category = {c["name"]: c["id"] for c in coco["categories"]}
    ids = dict(enumerate(category.get(name) for name in model.labels)) if model.labels else None
    records = []
    for image in tqdm(coco["images"], desc=f"evaluate {model.version}", unit="img",
                      disable=None):  # a bar on a terminal, not in logs
        det = predictor.detect(load_image(images / image["file_name"]), tiling)
        records += result_records(det, image["id"], ids)
    return records


DEFAULT_MAX_DETECTIONS = 300


def detection_cap(setting: Any, model: ModelDir, coco: dict[str, Any], tiling: Recipe) -> int:
    """pycocotools' `maxDets` (per image and class). `auto`: at least as many as the model can
    return for the largest val image by its recipe, DETECTIONS_PER_IMAGE per pass times its
    passes (tiles, and the full-image pass if any), so that no detection is cut: a tiled
    model on a whole orthophoto returns far more than 300."""
    if setting != "auto":
        return int(setting)
    per_pass = model.config.roi_heads.detections_per_image
    passes = max(len(TilePlan.for_image(im["height"], im["width"], tiling).crops)
                 for im in coco["images"])
    return max(per_pass * passes, DEFAULT_MAX_DETECTIONS)


def warn_if_capped(records: list[dict[str, Any]], cap: int, version: str) -> None:
    """Say so when an image and class reach the cap: their later detections are not
    counted, which lowers recall and AP."""
    counts = Counter((r["image_id"], r["category_id"]) for r in records)
    over = [key for key, n in counts.items() if n >= cap]
    if over:
        print(f"warning: evaluate {version}: {len(over)} image/class pair(s) reach "
              f"evaluate.max_detections={cap} (e.g. image {over[0][0]}: {counts[over[0]]} "
              "detections); the rest are not counted: raise it, or set it to auto")


def coco_metrics(
    coco: dict[str, Any],
    records: list[dict[str, Any]],
    max_detections: int = DEFAULT_MAX_DETECTIONS,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Summary metrics and PR-curve points (IoU 0.5, all areas), counting up to
    `max_detections` per image. pycocotools' default of 100 caps recall on dense scenes (a
    279-tree image could not pass 36%), and its printed summary reads AP at 100 whatever
    `maxDets` says, so the figures are taken from its precision table directly."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    if not records:
        zero = {
            "ap": 0.0,
            "ap50": 0.0,
            "ap75": 0.0,
            "ap_small": 0.0,
            "per_class_ap": dict.fromkeys(names.values(), 0.0),
            "max_detections": max_detections,
        }
        return zero, []
    ground_truth = COCO()
    ground_truth.dataset = {
        **coco,
        "annotations": [{**a, "iscrowd": a.get("iscrowd", 0)} for a in coco["annotations"]],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(records), "bbox")
        evaluator.params.maxDets = [1, 10, max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
    # [iou threshold, recall, class, area, max detections]; -1 where there is no ground truth
    precision = evaluator.eval["precision"][..., -1]
    ious = evaluator.params.iouThrs
    at_50, at_75 = (int(np.argmin(np.abs(ious - t))) for t in (0.5, 0.75))
    per_class = {}
    curve = []
    recalls = evaluator.params.recThrs
    for k, cat_id in enumerate(evaluator.params.catIds):
        per_class[names[cat_id]] = _mean_precision(precision[:, :, k, 0])
        for r, value in zip(recalls[::5], precision[at_50, ::5, k, 0], strict=True):
            curve.append(
                {
                    "class": names[cat_id],
                    "recall": round(float(r), 3),
                    "precision": round(max(float(value), 0.0), 4),
                }
            )
    return {
        "ap": _mean_precision(precision[..., 0]),
        "ap50": _mean_precision(precision[at_50, ..., 0]),
        "ap75": _mean_precision(precision[at_75, ..., 0]),
        "ap_small": _mean_precision(precision[..., 1]),
        "per_class_ap": per_class,
        "max_detections": max_detections,
    }, curve


def _mean_precision(table: np.ndarray) -> float:
    """COCO's average over the cells that have ground truth; 0 where none has."""
    valid = table[table > -1]
    return round(float(valid.mean()), 4) if valid.size else 0.0


def calibration_figures(val: dict[str, Any], records: list[dict[str, Any]],
                        settings: effort.EffortSettings, triage_recall: float
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What a model's detections on val give annotators and surveys: the thresholds chosen
    for annotators, effort at them in sample and out of sample, the count calibration with
    its figures and the triage threshold (metrics.json's fields); and the effort curve."""
    scored = effort.score_coco(val, records, settings)
    chosen = effort.choose_thresholds(scored, settings)
    calibration = counts.calibrate_counts(scored, settings.min_boxes)
    return {
        "score_thresholds": chosen,
        "effort": {"in_sample": True, **effort.report(scored, chosen["per_class"], settings)},
        "effort_out_of_sample": effort.cross_fitted(scored, settings),
        "count_calibration": calibration,
        "counts": counts.count_figures(scored, calibration),
        "triage": counts.choose_triage(scored, triage_recall, settings.folds),
    }, effort.curve(scored, settings)


def served_figures(model: ModelDir, val: dict[str, Any], records: list[dict[str, Any]],
                   settings: effort.EffortSettings) -> dict[str, Any]:
    """A deployed model's effort at the thresholds it serves, as annotators see them."""
    served = model.thresholds
    names = [c["name"] for c in val["categories"]]
    labels = model.labels or names
    per_class = {name: served.of(labels.index(name)) if name in labels else None
                 for name in names}
    scored = effort.score_coco(val, records, settings)
    return {"effort": effort.report(scored, per_class, settings),
            "effort_served": effort.at_thresholds(scored, per_class, settings),
            "score_thresholds": {"per_class": per_class, "source": served.source}}


def print_effort(version: str, figures: dict[str, Any], per_class: dict[str, float | None],
                 out_of_sample: dict[str, Any] | None = None) -> None:
    overall = figures["overall"]
    thresholds = ", ".join(f"{name} {describe_threshold(t)}"
                           for name, t in per_class.items())
    held = ("" if out_of_sample is None else
            f"; out of sample {out_of_sample['effort_ratio']:.3f} "
            f"[{out_of_sample['low']:.3f}, {out_of_sample['high']:.3f}]")
    print(f"evaluate {version}: effort ratio {overall['effort_ratio']:.3f}{held} "
          f"({overall['corrections_per_image']:.2f} corrections per image; kept "
          f"{overall['kept']}, adjusted {overall['adjusted']}, deleted {overall['deleted']}, "
          f"drawn {overall['drawn']}) at thresholds {thresholds}")


def _print_survey(figures: dict[str, Any]) -> None:
    rows = [f"{name} {counts.describe_count(row)} (true {row['count_true']})"
            for name, row in figures["counts"]["per_class"].items()]
    coverage = figures["counts"]["coverage_out_of_sample"]
    triage = figures["triage"]
    print(f"evaluate: counts on val {'; '.join(rows)}; interval coverage on held-out folds "
          f"{coverage['covered']}/{coverage['trials']}. Triage at {triage['recall_target']:.0%} "
          f"recall: {triage['skipped_share']:.1%} of val images need not be opened "
          f"({triage['animals_in_skipped']} animals in them)")


def main() -> None:
    params = load_params()
    ep = params.get("evaluate", {})
    settings = effort.EffortSettings.from_params(params.get("effort", {}))
    val = read_coco(Path(params.get("split", {}).get("dir", "data/split")) / "val.json")
    images = Path(params.get("dataset", {}).get("dir", "data/dataset")) / "images"
    if not val["images"]:
        fail("the val split is empty: nothing to evaluate on")
    device = ep.get("device", "auto")
    candidate = ModelDir.open(params.get("train", {}).get("output", "models/candidate"))
    setting = ep.get("max_detections", "auto")
    max_detections = detection_cap(setting, candidate, val, candidate.recipe)
    records = detections_for(candidate, val, images, candidate.recipe, device)
    warn_if_capped(records, max_detections, candidate.version)
    metrics, curve = coco_metrics(val, records, max_detections)
    figures, effort_curve = calibration_figures(
        val, records, settings, float(params.get("triage", {}).get("recall", 0.95)))
    print_effort(candidate.version, figures["effort"], figures["score_thresholds"]["per_class"],
                 figures["effort_out_of_sample"])
    _print_survey(figures)
    metrics.update(images=len(val["images"]), **figures, deployed=None)
    deployed, snapshot = deployed_model(params)
    if deployed is not None:
        is_candidate = snapshot["weights_sha256"] == file_sha256(candidate.weights)
        if not is_candidate:
            cap = max(max_detections, detection_cap(setting, deployed, val, deployed.recipe))
            records = detections_for(deployed, val, images, deployed.recipe, device)
            warn_if_capped(records, cap, deployed.version)
            deployed_metrics = coco_metrics(val, records, cap)[0]
        else:
            deployed_metrics = metrics
        served = served_figures(deployed, val, records, settings)
        print_effort(f"{snapshot['version']} (deployed, at its served thresholds)",
                     served["effort"], served["score_thresholds"]["per_class"])
        metrics["deployed"] = {
            "version": snapshot["version"],
            "ap50": deployed_metrics["ap50"],
            "ap": deployed_metrics["ap"],
            **served,
            "labels": deployed.labels,
            "label_set_changed": deployed.labels != candidate.labels,
            "is_candidate": is_candidate,  # the candidate is deployed already
        }
    write_json(ep.get("metrics", "metrics.json"), metrics)
    write_json(Path(ep.get("plots", "plots")) / "pr.json", curve)
    write_json(Path(ep.get("plots", "plots")) / "effort.json", effort_curve)
    deployed_line = ("none" if metrics["deployed"] is None else
                     f"{metrics['deployed']['version']} AP50 {metrics['deployed']['ap50']:.3f}")
    print(f"evaluate: AP50 {metrics['ap50']:.3f} AP {metrics['ap']:.3f} on "
          f"{len(val['images'])} images; deployed: {deployed_line}")


if __name__ == "__main__":
    main()
