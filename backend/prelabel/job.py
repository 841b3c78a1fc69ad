"""`tridentloop prelabel`: a whole survey pre-labelled by one batch job.

Label Studio's "Retrieve predictions" sends every selected task in one request and gives up
after 100 s, so surveys are pre-labelled here instead: items stream through the engine
(`stream`, or a Ray cluster with `--ray`), each finished image is saved at once (imported
into Label Studio in chunks, or appended to a JSON Lines file), and its prediction's score
is the image's uncertainty, so annotators sort by it in the Data Manager. A rerun skips what
is done; Ctrl-C stops cleanly with everything finished so far saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from .. import uncertainty
from ..counts import Counting
from ..detection.device import resolve_device, run_settings
from ..detection.structures import Detections
from ..detection.tiling import Pixels, TilingOptions
from ..files import write_atomically
from ..imagery.exports import Exports
from ..imagery.images import PixelScaling
from ..imagery.raster import WindowedRaster
from ..labelstudio.connect import open_project
from ..labelstudio.label_config import parse_label_config, read_mapping
from ..labelstudio.results import prediction, rectangle_results, validate
from ..labelstudio.views import EMPTY_TAB, REVIEW_TAB, sort_into_tabs
from ..media.fetch import MediaSettings
from ..model_dir import ModelDir
from ..predict import detection_records
from ..recipe import RecipeOverrides
from ..registry import Registry
from ..thresholds import ScoreThresholds
from .shards import Shard, merge_results, shard_key
from .sinks import JsonLinesSink, PredictionImporter, read_results
from .sources import FileLoader, Item, TaskLoader, image_files, listing_root, project_tasks
from .stream import ImageResult, detect_stream

log = logging.getLogger(__name__)


class Destination(Protocol):
    """One mode of the job: what is left to do, how an item loads, where a result goes."""

    load: Callable[[Item], Pixels | WindowedRaster]
    thresholds: ScoreThresholds  # what annotators are offered; error-rate counts by them

    def todo(self) -> tuple[list[Item], int]: ...

    def save(self, item: Item, det: Detections, height: int, width: int, score: float) -> None: ...

    def fail(self, item: Item, error: str) -> None: ...

    def close(self) -> None: ...


@dataclass
class Report:
    """What a run did, written next to its output: failures are listed, never fatal."""

    model_version: str
    uncertainty: str
    images: int = 0
    already_done: int = 0
    done: int = 0
    tiles: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")


class LabelStudioProject:
    """Predictions imported into a project, one per task, tagged with the model version.
    With the model's triage threshold, two Data Manager tabs sort the tasks it saw into
    those to review and those likely empty (no detection scoring at the threshold)."""

    def __init__(self, args: argparse.Namespace, version: str, labels: list[str],
                 thresholds: ScoreThresholds, triage: float | None) -> None:
        url, key = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
        if not url or not key:
            raise ValueError("--project needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set")
        self.client, found = open_project(url, key, args.project, "prelabel", args.retry_for)
        self.args = args
        self.version = version
        self.thresholds = thresholds.resolve(args.score_threshold, "--score-threshold")
        log.info("prelabel: boxes offered from score thresholds %s",
                 self.thresholds.describe(labels))
        self.project = args.project
        config = parse_label_config(found.label_config)
        self.config = config
        mapping = read_mapping(args.label_mapping) if args.label_mapping else None
        usable = config.usable(labels, mapping)
        if not usable and not args.rank_only:  # ranking writes no box: any model can rank
            raise ValueError(
                f"project {self.project}: none of the model's classes {labels} matches a "
                "label of its config; rename labels, add predicted_values or --label-mapping"
            )
        # one image per task: the first image's controls
        self.data_key = usable[0][0].data_key if usable else config.controls[0].data_key
        self.usable = [(c, m) for c, m in usable if c.data_key == self.data_key]
        media = MediaSettings(url, key, timeout=args.download_timeout,
                              cloud_schemes=frozenset(args.allow_cloud),
                              allow_private_urls=args.allow_private_urls)
        self.load = TaskLoader(media, args.max_pixels, _jpeg_device(args))
        self.importer = PredictionImporter(self.client, self.project, args.chunk, args.retry_for)
        self.triage = triage
        self.likely_empty: dict[int, bool] = {}

    def todo(self) -> tuple[list[Item], int]:
        return project_tasks(self.client, self.project, self.data_key, self.version,
                             self.args.retry_for, self.args.only_unlabeled)

    def fail(self, item: Item, error: str) -> None:
        """A task that failed stays out of Label Studio (the run's report lists it)."""

    def save(self, item: Item, det: Detections, height: int, width: int, score: float) -> None:
        regions = []
        for control, class_map in [] if self.args.rank_only else self.usable:
            regions += rectangle_results(
                det, width, height, control, class_map, self.thresholds
            )
        validate(regions, self.config)
        assert item.task_id is not None
        self.importer.add(item.task_id, prediction(regions, self.version, score))
        if self.triage is not None:
            self.likely_empty[item.task_id] = det.best_score() < self.triage

    def close(self) -> None:
        self.importer.flush()
        if self.likely_empty:
            self._sort_into_tabs()

    def _sort_into_tabs(self) -> None:
        empty, review = sort_into_tabs(self.client, self.project, self.likely_empty)
        log.info("prelabel: %d task(s) likely empty (best score under the triage threshold "
                 "%.3g), %d to review: Data Manager tabs %r and %r", empty, self.triage,
                 review, EMPTY_TAB, REVIEW_TAB)


class ResultFiles:
    """JSON Lines (and optionally COCO) results for image files anywhere fsspec reaches; with
    `args.shard`, this shard's images and results file (`--merge-shards` writes exports)."""

    def __init__(self, args: argparse.Namespace, version: str, labels: list[str] | None,
                 thresholds: ScoreThresholds, counting: Counting,
                 triage: float | None) -> None:
        if args.output is None:
            raise ValueError("--images needs --output FILE.jsonl (it is also the progress file)")
        self.pattern = args.images
        self.thresholds = thresholds
        self.shard: Shard | None = args.shard
        self.exports = _exports(args, labels, counting, triage)
        if self.shard is not None and self.exports.wanted:
            log.info("prelabel: shard %d of %d writes its results only; `--merge-shards` "
                     "writes the exports once every shard is done", self.shard.index,
                     self.shard.count)
        self.version = version
        self.labels = labels
        self.sink = JsonLinesSink(_results_path(args))
        self.load = FileLoader(
            args.max_pixels, PixelScaling(args.value_range, args.bands, args.nodata),
            _jpeg_device(args),
        )

    def todo(self) -> tuple[list[Item], int]:
        root = listing_root(self.pattern)
        files = [f for f in image_files(self.pattern)
                 if self.shard is None or self.shard.holds(shard_key(f, root))]
        todo = [Item(f) for f in files if f not in self.sink.done]
        return todo, len(files) - len(todo)

    def fail(self, item: Item, error: str) -> None:
        """A failed image gets its line with the `error`, as `predict` writes it, so every
        export lists it (MegaDetector's `failure`); a rerun tries it again."""
        self.sink.write({"image": item.uri, "model_version": self.version, "error": error})

    def save(self, item: Item, det: Detections, height: int, width: int, score: float) -> None:
        self.sink.write(
            {
                "image": item.uri,
                "width": width,
                "height": height,
                "model_version": self.version,
                "uncertainty": score,
                "detections": detection_records(det, self.labels),
            }
        )

    def close(self) -> None:
        self.sink.close()
        if self.exports.wanted and self.shard is None:
            self.exports.write(read_results(self.sink.path), self.labels, self.version)


def _jpeg_device(args: argparse.Namespace) -> torch.device | None:
    """`--decode device`: JPEGs decoded on the model's device; refused where it cannot hold."""
    if args.decode != "device":
        return None
    if args.ray is not None:
        raise ValueError("--decode device is for a one-process job; with --ray, decode tasks "
                         "run on the cluster's CPUs: leave --decode out")
    if args.exact:
        raise ValueError("--exact decodes as detectron2 does (PIL, bit for bit); "
                         "--decode device uses nvJPEG: give one or the other")
    return resolve_device(args.device)


def _exports(args: argparse.Namespace, labels: list[str] | None, counting: Counting,
             triage: float | None) -> Exports:
    counting = counting.resolve(args.count_threshold, "--count-threshold")
    if args.counts or args.megadetector:
        log.info("prelabel: counting %s", counting.describe(labels))
    return Exports(args.megadetector, args.counts, counting, args.geojson, args.coco, triage)


def merge_shards(args: argparse.Namespace) -> int:
    """`--merge-shards`: the shards' results as one run's `--output`, and its exports."""
    if args.images is None or args.output is None:
        raise ValueError("--merge-shards goes with --images and --output, as the shards ran")
    model, version = open_model(args)
    records = merge_results(args.output, image_files(args.images), listing_root(args.images))
    write_atomically(args.output, "".join(json.dumps(r) + "\n" for r in records))
    exports = _exports(args, model.labels, model.counting, model.triage_threshold)
    if exports.wanted:
        exports.write(records, model.labels, version)
    failed = sum("error" in r for r in records)
    print(f"prelabel --merge-shards: {len(records)} image(s) in {args.output}"
          + (f", {failed} failed (their lines say why)" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def open_model(args: argparse.Namespace) -> tuple[ModelDir, str]:
    """The model to run and the version its predictions are tagged with."""
    if args.model is not None:
        model = ModelDir.open(args.model)
        return model, args.model_version or model.version
    model = Registry(args.registry).current()  # one read of `current`: a switch mid-way
    return model, model.path.name               # cannot pair one model with another's name


def run_prelabel(args: argparse.Namespace, recipe: RecipeOverrides) -> int:
    if args.merge_shards:
        return merge_shards(args)
    if args.project is not None and args.shard is not None:
        raise ValueError("--shard splits an --images survey; a project's tasks are shared "
                         "by one job's workers (--workers, or --ray for several machines)")
    if args.project is not None and (args.megadetector or args.counts or args.geojson):
        raise ValueError("--megadetector, --counts and --geojson go with --images: a "
                         "project's predictions live in Label Studio")
    model, version = open_model(args)
    tiling = recipe.apply(model.recipe, version)
    labels = model.labels or []
    destination: Destination = (
        LabelStudioProject(args, version, labels, model.thresholds, model.triage_threshold)
        if args.project is not None
        else ResultFiles(args, version, model.labels, model.thresholds, model.counting,
                         model.triage_threshold)
    )
    items, already = destination.todo()
    if args.limit is not None:
        items = items[: args.limit]
    report = Report(version, args.uncertainty, len(items) + already, already)
    weights = (uncertainty.class_weights(labels, args.labelled_boxes)
               if args.labelled_boxes is not None else None)
    report_path = args.report or _default_report(args)
    print(f"prelabel: {len(items)} image(s) to do, {already} already done, model {version}",
          file=sys.stderr)
    progress = tqdm(total=len(items), desc="prelabel", unit="img", mininterval=1.0)
    tiles = _TileProgress(progress, report)
    results = _results(args, model, tiling, destination, items, tiles.add)
    started = time.monotonic()  # the model is loaded: the rate is the survey's, not start-up's
    tiles.started = started
    try:
        for result in results:
            _record(result, destination, report, args.uncertainty, weights)
            progress.update()
            tiles.show()
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        progress.close()
        results.close()
        destination.close()
        report.seconds = round(time.monotonic() - started, 2)
        report.write(report_path)
    _summarise(report, report_path)
    return 130 if report.interrupted else (1 if report.failed else 0)


class _TileProgress:
    """Tiles run so far and their rate on the progress bar, refreshed as the device finishes
    batches (at most once a second), not only when an image completes."""

    def __init__(self, progress: tqdm, report: Report) -> None:
        self.progress, self.report = progress, report
        self.started = self.shown = time.monotonic()
        self.done = 0

    def add(self, crops: int) -> None:
        self.done += crops
        if time.monotonic() - self.shown >= 1.0:
            self.show()

    def show(self) -> None:
        self.shown = time.monotonic()
        done = max(self.done, self.report.tiles)  # Ray reports whole images only
        rate = done / max(self.shown - self.started, 1e-9)
        self.progress.set_postfix(tiles=done, tiles_s=f"{rate:.1f}",
                                  failed=len(self.report.failed))


def _results(
    args: argparse.Namespace,
    model: ModelDir,
    tiling: TilingOptions | None,
    destination: Destination,
    items: list[Item],
    on_crops: Callable[[int], None],
) -> Iterator[ImageResult[Item]]:
    if args.ray is not None:
        try:
            from .ray_runner import ray_detect_stream
        except ImportError as exc:
            raise RuntimeError(
                f"--ray needs Ray Data ({exc}): pip install 'tridentloop[ray]'"
            ) from exc

        return ray_detect_stream(args, model, tiling, destination.load, items)
    predictor = model.predictor(dict(args.opt), **run_settings(args))
    predictors = [predictor, *uncertainty.counterparts(args.uncertainty, predictor)]
    return detect_stream(
        items, destination.load, predictors, tiling, args.workers, args.batch_size, on_crops
    )


def _record(result: ImageResult[Item], destination: Destination, report: Report,
            method: uncertainty.Method, weights: torch.Tensor | None) -> None:
    if result.error is not None:
        report.failed.append({"image": result.item.uri, "task": result.item.task_id,
                              "error": result.error})
        destination.fail(result.item, result.error)
        return
    score = uncertainty.score(method, result.detections, destination.thresholds, weights)
    destination.save(result.item, result.detections[0], result.height, result.width, score)
    report.done += 1
    report.tiles += result.crops


def _results_path(args: argparse.Namespace) -> Path:
    """`--output`, or with `--shard` this shard's file beside it."""
    return args.output if args.shard is None else args.shard.path(args.output)


def _default_report(args: argparse.Namespace) -> Path:
    if args.output is not None:
        output = _results_path(args)
        return output.with_name(output.stem + ".report.json")
    return Path(f"prelabel-project{args.project}.report.json")


def _summarise(report: Report, path: Path) -> None:
    rate = report.tiles / report.seconds if report.seconds else 0.0
    print(
        f"prelabel: {report.done} done, {len(report.failed)} failed, {report.already_done} "
        f"already done; {report.tiles} tiles in {report.seconds:.1f} s ({rate:.1f} tiles/s); "
        f"report {path}",
        file=sys.stderr,
    )
    for failure in report.failed[:20]:
        error = failure["error"]
        named = error if failure["image"] in error else f"{failure['image']}: {error}"
        print(f"  failed: {named}", file=sys.stderr)
    if report.interrupted:
        print("prelabel: interrupted; what finished is saved, run the same command to resume",
              file=sys.stderr)
