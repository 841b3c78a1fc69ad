"""Which benchmark a `tridentloop bench` run is, from its options: one function per job
(each reads only its own options), the engine's tiles/s when no job flag is given."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

from .engine import CASES, EngineBench, SurveySettings, print_records, run_engine_benchmark

Records = Iterator[dict]


def _cpu_unless_told(args: argparse.Namespace) -> str:
    return args.device if args.device != "auto" else "cpu"


def _prelabel(args: argparse.Namespace) -> Records:
    from .prelabel import PrelabelBench, run_prelabel_benchmark

    width, height = args.image_size
    return run_prelabel_benchmark(PrelabelBench(
        config=args.config or "tridentnet_fast_R_50_C4", images=args.survey_bench_images,
        height=height, width=width, tile_size=args.tile_size,
        overlap=args.tile_overlap, device=args.device, precision=args.precision,
        batch_size=args.batch_sizes[0] if args.batch_sizes else None,
        ray=args.prelabel_ray, decodes=tuple(args.prelabel_decode),
    ))


def _serve(args: argparse.Namespace) -> Records:
    from .serve import ServeBench, run_serve_benchmark

    return run_serve_benchmark(ServeBench(
        config=args.config or "tiny_tridentnet", requests=args.requests,
        tasks_per_request=args.tasks_per_request, concurrency=tuple(args.concurrency),
        request_deadline=args.request_deadline, device=args.device,
        precision=args.precision,
    ))


def _active_learning(args: argparse.Namespace) -> Records:
    from .active_learning import ActiveLearningBench, run_active_learning_benchmark

    return run_active_learning_benchmark(ActiveLearningBench(
        seeds=args.seeds or 5, first_seed=args.first_seed,
        **({"strategies": tuple(args.strategies)} if args.strategies else {}),
        biome=args.biome, empty_fraction=args.empty_fraction, rare_share=args.rare_share,
        iterations=args.iterations, device=_cpu_unless_told(args)))


def _counts(args: argparse.Namespace) -> Records:
    from .counts import CountBench, run_count_benchmark

    return run_count_benchmark(CountBench(
        **({"model": args.model_dir} if args.model_dir else {}), seeds=args.seeds or 20,
        val_frames=args.val_frames, survey_frames=args.survey_frames,
        empty_fraction=args.empty_fraction, device=_cpu_unless_told(args)))


def _views(args: argparse.Namespace) -> Records:
    from .views import ViewsBench, run_views_benchmark

    return run_views_benchmark(ViewsBench(
        **({"model": args.model_dir} if args.model_dir else {}), seeds=args.seeds or 5,
        val_frames=args.val_frames, survey_frames=args.survey_frames,
        empty_fraction=args.empty_fraction, device=_cpu_unless_told(args)))


def _uncertainty_check(args: argparse.Namespace) -> Records:
    from .uncertainty_check import UncertaintyCheck, run_uncertainty_check

    return run_uncertainty_check(UncertaintyCheck(
        **({"model": args.model_dir} if args.model_dir else {}), seeds=args.seeds or 3,
        empty_fraction=args.empty_fraction, device=_cpu_unless_told(args)))


def _pretrain_source(args: argparse.Namespace) -> Records:
    from .source_model import run_source_model_build

    return run_source_model_build(args.pretrain_source)


def _training_memory(args: argparse.Namespace) -> Records:
    from .training_memory import TrainingMemoryBench, run_training_memory_benchmark

    return run_training_memory_benchmark(TrainingMemoryBench(
        images=args.training_images, config=args.config or "tiny_tridentnet",
        device=args.device))


def _export(args: argparse.Namespace) -> Records:
    from .export import ExportBench, run_export_benchmark

    return run_export_benchmark(ExportBench(tasks=args.export_tasks))


def _raster(args: argparse.Namespace) -> Records:
    from .raster import RasterBench, run_raster_benchmark

    return run_raster_benchmark(RasterBench(
        size=args.raster_size, compare_size=args.raster_compare_size,
        config=args.config or "tiny_tridentnet", tile_size=args.tile_size,
        overlap=args.tile_overlap, device=args.device, precision=args.precision,
    ))


def _training(args: argparse.Namespace) -> Records:
    from .training import TrainingBench, run_training_benchmark

    return run_training_benchmark(TrainingBench(
        config=args.config or "tridentnet_fast_R_50_C4", batch_size=args.train_batch,
        iterations=args.train_iterations, device=args.device,
        precision=args.train_precision, baseline=args.baseline,
    ))


def _engine(args: argparse.Namespace) -> Records:
    survey = (SurveySettings(args.survey_images, args.tiles_per_image, args.price_per_hour)
              if args.survey else None)
    return run_engine_benchmark(EngineBench(
        cases=tuple(args.models or CASES), precisions=tuple(args.precisions or [args.precision]),
        batch_sizes=tuple(args.batch_sizes or [4]), repeats=args.repeats, width=args.width,
        device=args.device, baseline=args.baseline, survey=survey,
        variants=tuple(args.variants), channels_last=args.channels_last,
    ))


# option name -> the benchmark it selects (the CLI makes them mutually exclusive)
JOBS: dict[str, Callable[[argparse.Namespace], Records]] = {
    "prelabel": _prelabel, "serve": _serve, "active_learning": _active_learning,
    "counts": _counts, "views": _views, "uncertainty_check": _uncertainty_check,
    "pretrain_source": _pretrain_source,
    "training_memory": _training_memory, "export": _export, "raster": _raster,
    "training": _training,
}


def run_bench(args: argparse.Namespace) -> int:
    """Print the chosen benchmark's JSON lines; 1 if any case failed."""
    if args.list:
        print("\n".join(CASES))
        return 0
    job = next((run for flag, run in JOBS.items() if getattr(args, flag)), _engine)
    return print_records(job(args))
