"""`tridentloop model`, `rollback`, `versions`: model directories and the registry."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    model_cmd = sub.add_parser("model", help="make a model directory from detectron2 files, "
                               "or show one")
    model_sub = model_cmd.add_subparsers(dest="model_command", required=True)
    init = model_sub.add_parser(
        "init", help="config + weights + labels -> a validated model directory"
    )
    init.add_argument("dest", type=Path, help="the model directory to create")
    init.add_argument("--config", type=Path, required=True, help="detectron2 config.yaml")
    init.add_argument("--weights", type=Path, required=True, help="checkpoint (.pth or .pkl)")
    init.add_argument("--labels", type=Path, required=True, help="class names, one per line")
    init.add_argument("--version", help="version name (default: the directory's name)")
    init.add_argument("--tiled", type=int, metavar="TILE_SIZE",
                      help="the model runs on tiles of this size at native resolution "
                      "(default: whole images, as DefaultPredictor)")
    init.add_argument("--overlap", type=float, default=0.2, help="--tiled: fraction of a tile")
    init.add_argument("--merge", choices=["nms", "greedy"], default="nms", help="--tiled")
    init.add_argument("--merge-metric", choices=["iou", "ios"], default="iou", help="--tiled")
    init.add_argument("--merge-threshold", type=float, default=0.5, help="--tiled")
    init.add_argument("--full-image-pass", action="store_true",
                      help="--tiled: also run the whole image, for objects larger than a tile")
    show = model_sub.add_parser("show", help="recipe, classes, version and lineage")
    show.add_argument("path", type=Path, help="a model directory")
    show.add_argument("--json", action="store_true", help="one JSON object")

    rollback = sub.add_parser("rollback", help="serve the registry's previous version again")
    rollback.add_argument("--registry", type=Path, required=True)

    versions = sub.add_parser("versions", help="list a registry's versions")
    versions.add_argument("--registry", type=Path, required=True)
    model_cmd.set_defaults(run=_model)
    rollback.set_defaults(run=_rollback)
    versions.set_defaults(run=_versions)


def _model(args: argparse.Namespace) -> int:
    import json

    from ..model_dir import ModelDir, init_model_dir
    from ..recipe import parse_recipe

    if args.model_command == "init":
        recipe = parse_recipe(
            {"mode": "tiled", "tile_size": args.tiled, "overlap": args.overlap,
             "merge": args.merge, "merge_metric": args.merge_metric,
             "merge_threshold": args.merge_threshold, "full_image_pass": args.full_image_pass}
            if args.tiled else None,
            "the command line",
        )
        model = init_model_dir(args.dest, args.config, args.weights, args.labels, recipe,
                               args.version)
        print(f"model init: {model.path} loads and runs; {model.summary()['runs']}")
        return 0
    summary = ModelDir.open(args.path).summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"model    {summary['path']}\nversion  {summary['version']}\n"
          f"classes  {', '.join(summary['classes'] or ['(no labels.txt)'])}\n"
          f"runs     {summary['runs']}")
    for key, value in summary["lineage"].items():
        print(f"{key:<8} {json.dumps(value) if isinstance(value, dict | list) else value}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from ..registry import Registry

    registry = Registry(args.registry)
    current = registry.current_name()
    print(f"rolled back from {current} to {registry.rollback()}")
    return 0


def _versions(args: argparse.Namespace) -> int:
    import json

    from ..registry import Registry

    for entry in Registry(args.registry).describe():
        print(json.dumps(entry))
    return 0
