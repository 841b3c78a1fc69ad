"""DVC stage `train`: fine-tune on the train split and write the candidate model directory.

Starts from, in order: the last checkpoint of an interrupted run of the same settings
(resume), `train.base_weights` when set, the deployed model named by the `deployed` stage's
snapshot (its box predictor re-initialised when the label set changed), else random
weights. When the candidate already is this run's result (see `_already_trained`), it is
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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from backend.detection.checkpoint import load_weights
from backend.detection.config import DetectorConfig, bundled_config, dump_config, load_config
from backend.detection.device import distributed_setup, resolve_device
from backend.detection.model import GeneralizedRCNN
from backend.detection.training import TrainOptions, init_from_scratch, train
from backend.files import file_sha256
from backend.model_dir import ModelDir, ModelDirError, write_model_dir
from backend.recipe import Recipe, describe, parse_recipe, recipe_json
from backend.weights import StartError, resolve_start

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


def _start_weights(
    model: GeneralizedRCNN, params: dict[str, Any], labels: list[str],
    deployed: ModelDir | None, deployed_sha256: str | None, previous: ModelDir | None,
) -> tuple[str, str | None]:
    """Load the weights training starts from: (what they are, the SHA-256 of their file;
    None for random weights), so a model's lineage names its parent exactly. Before any
    model is deployed (none has yet saved annotators work), training goes on from the last
    candidate rather than from scratch: the gate holds back what annotators see, not what
    the loop has learnt."""
    if params.get("base_weights"):
        try:
            base = resolve_start(str(params["base_weights"]))
        except StartError as exc:
            fail(str(exc))
        load_weights(model, base.weights, for_inference=False)
        name = f"weights {base.source}" + (f" ({base.url})" if base.url else "")
        return _new_head(model, name, base.labels, labels), base.sha256
    start, name = (deployed, f"deployed model {deployed.version}") if deployed is not None else (
        previous, "the last candidate (not deployed)")
    if start is None:
        init_from_scratch(model)
        return "random weights", None
    load_weights(model, start.weights, for_inference=False)
    sha = deployed_sha256 if deployed is not None else file_sha256(start.weights)
    return _new_head(model, name, start.labels, labels), sha


def _new_head(model: GeneralizedRCNN, name: str, theirs: list[str] | None,
              ours: list[str]) -> str:
    """A start trained on other classes gets a new box predictor, as detectron2 fine-tunes
    to new classes (one sized for another class count is re-initialised on loading)."""
    if theirs is None or theirs == ours:
        return name
    model.roi_heads.box_predictor.reset_parameters()
    return f"{name}, box predictor re-initialised for the new label set {theirs} -> {ours}"


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


def main() -> None:
    params = load_params()
    tp = params.get("train", {})
    split_dir = Path(params.get("split", {}).get("dir", "data/split"))
    images = Path(params.get("dataset", {}).get("dir", "data/dataset")) / "images"
    out = Path(tp.get("output", "models/candidate"))
    work = Path(tp.get("checkpoints", "models/checkpoints"))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if int(tp.get("threads") or 0) > 0:  # beside other jobs, all cores is oversubscription
        torch.set_num_threads(int(tp["threads"]))
    device = resolve_device(tp.get("device", "auto"))
    if distributed:
        backend, device = distributed_setup(device, int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    coco = read_coco(split_dir / "train.json")
    labels = category_names(coco)
    recipe = parse_recipe(params.get("recipe"), f"{PARAMS_FILE} recipe")
    cfg_file = config_path(tp.get("config", "tiny_tridentnet"))
    overrides = {"MODEL.ROI_HEADS.NUM_CLASSES": len(labels)}
    cfg = load_config(cfg_file, overrides)
    options = train_options(tp, recipe, cfg)
    torch.manual_seed(options.seed)
    model = GeneralizedRCNN(cfg)
    deployed, snapshot = deployed_model(params)
    origin, start_sha256 = _start_weights(
        model, tp, labels, deployed, snapshot.get("weights_sha256"), _previous_candidate(out)
    )
    settings = {k: v for k, v in tp.items() if k != "threads"}  # threads change no result
    lineage = {"dataset": dataset_hash(split_dir / "train.json"), "params": settings,
               "recipe": recipe_json(recipe), "code_sha256": code_sha256("train")}
    kept = _already_trained(out, lineage, start_sha256)
    if kept is not None:
        if rank == 0:
            print(f"train: {out} was trained from {kept.metadata.get('start')} with this code "
                  "and these settings on this train split: kept as it is")
        if distributed:
            dist.destroy_process_group()
        return
    key = _run_key([settings, recipe_json(recipe)], lineage["dataset"])
    checkpoint = work / f"{key}.pth"
    start, state, resumed = 0, None, ""
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        start = int(state["iteration"])
        # The lineage names what the run started from, not the checkpoint (deleted at the end).
        origin = state.get("origin", origin)
        start_sha256 = state.get("start_sha256")  # the resumed run's own starting point
        resumed = f", resumed at iteration {start} from {checkpoint}"
    elif start_sha256 is None and rank == 0:
        print(f"train: {snapshot.get('why_none')}; starting from random weights", flush=True)
    model.to(device)
    if rank == 0:
        print(
            f"train: {len(coco['images'])} images, classes {labels}, from {origin}{resumed}, "
            f"{world} process(es) on {device}; recipe: {describe(recipe)}"
        )
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=options.lr,
        momentum=options.momentum,
        weight_decay=options.weight_decay,
    )
    if state is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])

    live = _live(start) if rank == 0 else None
    progress = Progress(start, options.iterations) if rank == 0 else None

    def on_step(iteration: int, losses: dict[str, float]) -> None:
        if live is not None:
            for name, value in losses.items():
                live.log_metric(f"train/{name}", value)
            live.next_step()
        if progress is not None:
            progress.step(iteration + 1, losses["total_loss"])

    def on_checkpoint(done: int, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        if rank != 0:
            return
        work.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "iteration": done,
                "origin": origin,
                "start_sha256": start_sha256,
            },
            tmp,
        )
        tmp.replace(checkpoint)

    samples = StreamedSamples(coco, images)
    train(
        wrapped,
        samples,
        options,
        start_iteration=start,
        optimizer=optimizer,
        on_step=on_step,
        on_checkpoint=on_checkpoint,
        rank=rank,
        world_size=world,
        scaler_state=state.get("scaler") if state is not None else None,
    )
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        write_model_dir(
            out,
            dump_config(cfg_file, overrides),
            {k: v.cpu() for k, v in model.state_dict().items()},
            labels,
            {
                "version": "candidate",
                **lineage,
                "iterations": options.iterations,
                "start": origin,
                **({"resumed_at_iteration": start} if start else {}),
                "start_sha256": start_sha256,
                "processes": world,
                # Label Studio task ids: calibrate --project warns about (or leaves out) them
                "train_tasks": sorted(int(im["id"]) for im in coco["images"]),
            },
        )
        checkpoint.unlink(missing_ok=True)
        if live is not None:
            live.end()
        print(f"train: wrote {out}")
    if distributed:
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
    write them there itself (the first `dvc repro` left dvc.yaml modified). A resumed run
    goes on from its iteration, not from step 0."""
    try:
        from dvclive import Live
    except ImportError:
        return None
    live = Live("dvclive", save_dvc_exp=False, report=None, dvcyaml=False, resume=start > 0)
    live.step = start
    return live


if __name__ == "__main__":
    main()
