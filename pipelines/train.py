"""DVC stage `train`: fine-tune on the train split and write the candidate model directory.

Starts from, in order: the last checkpoint of an interrupted run of the same settings
(resume), `train.base_weights` when set, the deployed model named by the `deployed` stage's
snapshot (a new box predictor, started from its classes, when the label set changed), else
random weights. When the candidate already is this run's result (see `_already_trained`), it is
kept and nothing is trained. Checkpoints every `train.checkpoint_period` iterations; metrics
and plots go to dvclive. Under `torchrun` (several processes, GPUs or nodes) it trains with
DistributedDataParallel and the same params give the same model as one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from backend.detection.checkpoint import load_weights, predictor_state
from backend.detection.config import DetectorConfig, bundled_config, dump_config, load_config
from backend.detection.device import distributed_setup, resolve_device
from backend.detection.model import GeneralizedRCNN
from backend.detection.training import TrainOptions, init_from_scratch, train
from backend.files import file_sha256
from backend.model_dir import ModelDir, ModelDirError, write_model_dir
from backend.recipe import Recipe, describe, parse_recipe, recipe_json
from backend.weights import Start, StartError, resolve_start

from .coco import category_names, dataset_hash, read_coco
from .dataset import StreamedSamples
from .deployed import deployed_model
from .params import PARAMS_FILE, code_sha256, fail, load_params

OPTION_KEYS = (
    "iterations",
    "batch_size",
    "lr",
    "warmup_iters",
    "workers",
    "checkpoint_period",
    "seed",
    "weight_decay",
    "momentum",
    "precision",
    "object_crops",
)


def train_options(params: dict[str, Any], recipe: Recipe, cfg: DetectorConfig) -> TrainOptions:
    """The training settings of params.yaml `train`, with the crops the recipe runs the
    model on: tiles of its tile size, or whole images resized as the config resizes them."""
    if "crop_size" in params:
        fail("train.crop_size is now the recipe's tile_size (params.yaml `recipe`), so "
             "that training, evaluation and serving cannot disagree: move it there")
    chosen = {k: params[k] for k in OPTION_KEYS if k in params}
    if recipe is None:
        return TrainOptions(**chosen, whole_image=(cfg.min_size_test, cfg.max_size_test))
    return TrainOptions(**chosen, crop_size=recipe.tile_size)


def _frozen(params: dict[str, Any]) -> dict[str, int]:
    """`train.freeze_at` as the config's MODEL.BACKBONE.FREEZE_AT (detectron2's name): the
    backbone stages kept as the start model has them. From a model that already sees the
    survey's animals, 4 (the whole backbone) trains only the proposals and the box head,
    more than twice as many steps in the same time; from scratch, nothing may be frozen."""
    if params.get("freeze_at") is None:
        return {}
    value = params["freeze_at"]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 5:
        fail(f"train.freeze_at is a backbone stage, 0 (train everything) to 5 (up to res5): "
             f"got {value!r}")
    return {"MODEL.BACKBONE.FREEZE_AT": value}


def config_path(name: str) -> Path:
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") and path.exists() else bundled_config(name)


def _run_key(settings: object, dataset: str) -> str:
    """Checkpoints resume only a run of the same settings on the same data."""
    return hashlib.sha256(json.dumps([settings, dataset], sort_keys=True).encode()).hexdigest()[:12]


def _previous_candidate(out: Path) -> ModelDir | None:
    try:
        return ModelDir.open(out)
    except ModelDirError:
        return None


@dataclass(frozen=True)
class Link:
    """What a training run started from, as its model's lineage names it: the weights
    (SHA-256, where they are found again), the iterations they had been through (0 for
    random weights, None when unknown: a checkpoint from outside the loop) and the chain of
    starts before them, so a model says every iteration its weights went through."""

    start: str
    sha256: str | None  # None: random weights
    location: str | None = None
    iterations_before: int | None = 0
    ancestors: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def to(cls, start: str, sha256: str, location: str, lineage: dict[str, Any]) -> Link:
        """A start with weights; `lineage` is its model.json ({} for a bare checkpoint)."""
        seen = lineage.get("iterations_total", lineage.get("iterations"))
        return cls(start, sha256, location, None if seen is None else int(seen),
                   list(lineage.get("chain", [])))

    def lineage(self, iterations: int) -> dict[str, Any]:
        """The model.json entries of a run of `iterations` from this start."""
        chain = [] if self.sha256 is None else [
            {"start": self.start, "sha256": self.sha256, "location": self.location,
             "iterations_total": self.iterations_before}, *self.ancestors]
        return {"start": self.start, "start_sha256": self.sha256, "iterations": iterations,
                "iterations_total": iterations + (self.iterations_before or 0),
                "chain": chain}


def _start_weights(
    model: GeneralizedRCNN, params: dict[str, Any], labels: list[str],
    deployed: ModelDir | None, deployed_sha256: str | None, previous: ModelDir | None,
    out: Path,
) -> Link:
    """Load the weights training starts from, and name them. `train.base_weights` is where
    the loop starts: once a model trained from it is deployed (or, before any deploy, the
    last candidate), rounds go on from that model, so each adds its iterations to what the
    loop has learnt instead of starting over (`train.each_round: restart` starts every round
    from base_weights). Before any model is deployed (none has yet saved annotators work),
    training goes on from the last candidate rather than from scratch: the gate holds back
    what annotators see, not what the loop has learnt."""
    base = _base_start(params)
    if base is not None and not _goes_on(params, base, deployed, previous):
        load_weights(model, base.weights, for_inference=False)
        name = f"weights {base.source}" + (f" ({base.url})" if base.url else "")
        return Link.to(_new_head(model, name, base.labels, labels, base.weights), base.sha256,
                       base.location, base.lineage or {})
    if deployed is not None:
        load_weights(model, deployed.weights, for_inference=False)
        name = _new_head(model, f"deployed model {deployed.version}", deployed.labels, labels,
                         deployed.weights)
        return Link.to(name, deployed_sha256, str(deployed.path.absolute()), deployed.metadata)
    if previous is None:
        init_from_scratch(model)
        return Link("random weights", None)
    load_weights(model, previous.weights, for_inference=False)
    name = _new_head(model, "the last candidate (not deployed)", previous.labels, labels,
                     previous.weights)
    return Link.to(name, file_sha256(previous.weights), _in_dvc_cache(out),
                   previous.metadata)


def _base_start(params: dict[str, Any]) -> Start | None:
    if not params.get("base_weights"):
        return None
    try:
        return resolve_start(str(params["base_weights"]))
    except StartError as exc:
        fail(str(exc))


def _goes_on(params: dict[str, Any], base: Start, deployed: ModelDir | None,
             previous: ModelDir | None) -> bool:
    """Whether this round goes on from the deployed model (else, with nothing deployed, the
    last candidate) instead of base_weights: it must descend from base_weights (its lineage
    names those weights), so changing base_weights starts the loop again from them."""
    each_round = params.get("each_round", "continue")
    if each_round not in ("continue", "restart"):
        fail(f"train.each_round is continue or restart, not {each_round!r}")
    latest = deployed if deployed is not None else previous
    if each_round == "restart" or latest is None:
        return False
    lineage = latest.metadata
    return base.sha256 in (lineage.get("start_sha256"),
                           *(link.get("sha256") for link in lineage.get("chain", [])))


def _in_dvc_cache(out: Path) -> str:
    """Where a candidate replaced by this run is found again: the DVC cache, by the hash
    dvc.lock gives the output (`git log -S <md5> dvc.lock` names the commit to check out)."""
    try:
        outs = yaml.safe_load(Path("dvc.lock").read_text())["stages"]["train"]["outs"]
        md5 = next(o["md5"] for o in outs if Path(o["path"]) == out)
    except (OSError, KeyError, TypeError, StopIteration):
        return f"{out} (not recorded by DVC)"
    return f"DVC cache: {out} md5 {md5}"


def _new_head(model: GeneralizedRCNN, name: str, theirs: list[str] | None,
              ours: list[str], weights: Path) -> str:
    """A start trained on other classes gets a new box predictor, as detectron2 fine-tunes
    to new classes, but one that starts from what the start's head knew of animals and
    their boxes (`BoxPredictor.start_from_other_classes`), not from noise."""
    if theirs is None or theirs == ours:
        return name
    kept = model.roi_heads.box_predictor.start_from_other_classes(predictor_state(weights))
    how = "started from the mean of its classes" if kept else "re-initialised"
    return f"{name}, box predictor {how} for the new label set {theirs} -> {ours}"


def _already_trained(
    out: Path, lineage: dict[str, Any], start_sha256: str | None
) -> ModelDir | None:
    """The candidate in `out` if it is what this run would train: the same code, settings
    and train split, and either trained from this start or itself this start. The second
    case is the loop's fixed point: once the candidate is deployed, the deployed model
    (train's start) changes, yet training it again on the data it was trained on would
    only repeat its epochs."""
    if start_sha256 is None or lineage["code_sha256"] is None:
        return None
    candidate = _previous_candidate(out)
    if candidate is None or any(candidate.metadata.get(key) != value
                                for key, value in lineage.items()):
        return None
    same = start_sha256 in (candidate.metadata.get("start_sha256"),
                            file_sha256(candidate.weights))
    return candidate if same else None


def _processes(tp: dict[str, Any]) -> tuple[torch.device, int, int]:
    """(device, rank, world size): one process, or one of torchrun's."""
    if int(tp.get("threads") or 0) > 0:  # beside other jobs, all cores is oversubscription
        torch.set_num_threads(int(tp["threads"]))
    device = resolve_device(tp.get("device", "auto"))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, 0, 1
    backend, device = distributed_setup(device, int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return device, dist.get_rank(), dist.get_world_size()


def _resume(checkpoint: Path, model: GeneralizedRCNN, link: Link
            ) -> tuple[int, dict[str, Any] | None, Link]:
    """(iteration, checkpoint state, start) of an interrupted run of these settings; the
    lineage names what that run started from, not the checkpoint (deleted at the end)."""
    if not checkpoint.is_file():
        return 0, None, link
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return (int(state["iteration"]), state,
            Link(**state["link"]) if "link" in state else link)  # else an older checkpoint


def _saver(checkpoint: Path, model: GeneralizedRCNN, link: Link, rank: int):
    """What the training loop calls every checkpoint period: rank 0 saves atomically."""

    def save(done: int, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        if rank != 0:
            return
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict(), "iteration": done,
                    "link": asdict(link)}, tmp)
        tmp.replace(checkpoint)

    return save


def _reporter(live: Any, progress: Progress | None):
    """What the training loop calls every step: dvclive's metrics and the console line."""

    def report(iteration: int, losses: dict[str, float]) -> None:
        if live is not None:
            for name, value in losses.items():
                live.log_metric(f"train/{name}", value)
            live.next_step()
        if progress is not None:
            progress.step(iteration + 1, losses["total_loss"])

    return report


def main() -> None:
    params = load_params()
    tp = params.get("train", {})
    split_dir = Path(params.get("split", {}).get("dir", "data/split"))
    images = Path(params.get("dataset", {}).get("dir", "data/dataset")) / "images"
    out = Path(tp.get("output", "models/candidate"))
    device, rank, world = _processes(tp)

    coco = read_coco(split_dir / "train.json")
    labels = category_names(coco)
    recipe = parse_recipe(params.get("recipe"), f"{PARAMS_FILE} recipe")
    cfg_file = config_path(tp.get("config", "tiny_tridentnet"))
    overrides = {"MODEL.ROI_HEADS.NUM_CLASSES": len(labels), **_frozen(tp)}
    cfg = load_config(cfg_file, overrides)
    options = train_options(tp, recipe, cfg)
    torch.manual_seed(options.seed)
    model = GeneralizedRCNN(cfg)
    deployed, snapshot = deployed_model(params)
    link = _start_weights(model, tp, labels, deployed, snapshot.get("weights_sha256"),
                          _previous_candidate(out), out)
    if link.sha256 is None and tp.get("freeze_at"):
        fail(f"train.freeze_at {tp['freeze_at']} would keep random weights frozen: there is "
             "no model to start from (train.base_weights, a deployed model); set it to 0 "
             "until one exists")
    settings = {k: v for k, v in tp.items() if k != "threads"}  # threads change no result
    lineage = {"dataset": dataset_hash(split_dir / "train.json"), "params": settings,
               "recipe": recipe_json(recipe), "code_sha256": code_sha256("train")}
    kept = _already_trained(out, lineage, link.sha256)
    if kept is not None and rank == 0:
        print(f"train: {out} was trained from {kept.metadata.get('start')} with this code "
              "and these settings on this train split: kept as it is")
    if kept is None:
        checkpoint = Path(tp.get("checkpoints", "models/checkpoints")) / (
            _run_key([settings, recipe_json(recipe)], lineage["dataset"]) + ".pth")
        start, state, link = _resume(checkpoint, model, link)
        if rank == 0:
            resumed = f", resumed at iteration {start} from {checkpoint}" if start else ""
            if link.sha256 is None and not start:
                print(f"train: {snapshot.get('why_none')}; starting from random weights")
            print(f"train: {len(coco['images'])} images, classes {labels}, from "
                  f"{link.start}{resumed}, {world} process(es) on {device}; recipe: "
                  f"{describe(recipe)}", flush=True)
        model.to(device)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                    lr=options.lr, momentum=options.momentum,
                                    weight_decay=options.weight_decay)
        if state is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        live = _live((link.iterations_before or 0) + start) if rank == 0 else None
        train(torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model,
              StreamedSamples(coco, images), options, start_iteration=start,
              optimizer=optimizer,
              on_step=_reporter(live, Progress(start, options.iterations) if rank == 0 else None),
              on_checkpoint=_saver(checkpoint, model, link, rank), rank=rank, world_size=world,
              scaler_state=state.get("scaler") if state is not None else None)
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
            write_model_dir(out, dump_config(cfg_file, overrides),
                            {k: v.cpu() for k, v in model.state_dict().items()}, labels, {
                                "version": "candidate", **lineage,
                                **link.lineage(options.iterations),
                                **({"resumed_at_iteration": start} if start else {}),
                                "processes": world,
                                # Label Studio task ids: calibrate --project warns about them
                                "train_tasks": sorted(int(im["id"]) for im in coco["images"]),
                            })
            checkpoint.unlink(missing_ok=True)
            if live is not None:
                live.end()
            print(f"train: wrote {out}")
    if world > 1:
        dist.destroy_process_group()


class Progress:
    """A console line every ~5% of the run (and at its end): `dvc repro` shows a stage's
    output, so a long training says how it goes, not only dvclive's files."""

    def __init__(self, start: int, total: int) -> None:
        self.start, self.total = start, total
        self.every = max(1, total // 20)
        self.began = time.monotonic()

    def step(self, done: int, loss: float) -> None:
        if done % self.every and done != self.total:
            return
        rate = (done - self.start) / max(time.monotonic() - self.began, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        print(f"train: it {done}/{self.total} loss {loss:.4f} {rate:.2f} it/s "
              f"ETA {int(eta) // 60}:{int(eta) % 60:02d}", flush=True)


def _live(start: int):
    """dvclive's logger; its metrics and plots are declared in our dvc.yaml, so it must not
    write them there itself (the first `dvc repro` left dvc.yaml modified). Steps count
    every iteration the weights have seen: a resumed run, and a round started from the
    last model, go on from there instead of overwriting the curve from step 0."""
    try:
        from dvclive import Live
    except ImportError:
        return None
    live = Live("dvclive", save_dvc_exp=False, report=None, dvcyaml=False, resume=start > 0)
    live.step = start
    return live


if __name__ == "__main__":
    main()
