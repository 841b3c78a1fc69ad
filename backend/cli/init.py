"""`tridentloop init`: a new git + DVC checkout of the loop (or its code refreshed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import key_value


def add_parser(sub: argparse._SubParsersAction) -> None:
    init = sub.add_parser(
        "init", help="a new git + DVC checkout of the loop for a Label Studio project")
    init.add_argument("dir", type=Path, help="the checkout to create (new or empty)")
    init.add_argument("--project", type=int, help="the Label Studio project id to learn from")
    init.add_argument("--label-studio-url", help="Label Studio's URL (params.yaml; the API key "
                      "comes from LABEL_STUDIO_API_KEY when the stages run)")
    init.add_argument("--from", dest="start", metavar="WEIGHTS",
                      help="start the loop from a pretrained or previous survey's model: a "
                      "weights file, a model directory or registry, a URL or a "
                      "detectron2:// model-zoo name (train.base_weights); checked and "
                      "downloaded now")
    init.add_argument("--remote", help="the default DVC remote for datasets and models "
                      "(s3://bucket/loop, /mnt/share/loop, ...; default: a folder "
                      "tridentloop-dvc-remote beside the checkout)")
    init.add_argument("--set", action="append", default=[], type=key_value,
                      metavar="SECTION.KEY=VALUE",
                      help="any params.yaml setting, the value read as YAML "
                      "(e.g. train.iterations=2000, recipe.tile_size=800); repeatable")
    init.add_argument("--refresh-code", action="store_true",
                      help="in an existing checkout, replace backend/ and pipelines/ with this "
                      "installation's (after an upgrade); params and data are left alone")
    init.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from pipelines.workspace import (
        check_settings,
        copy_code,
        create_loop_project,
        default_remote,
        updated_params,
    )

    settings: dict[str, dict] = {}
    for dotted, value in args.set:
        section, _, key = dotted.partition(".")
        if not key:
            raise ValueError(f"--set {dotted}: expected SECTION.KEY=VALUE")
        settings.setdefault(section, {})[key] = yaml.safe_load(value)
    check_settings(settings)
    if args.refresh_code:
        if not (args.dir / "dvc.yaml").is_file():
            raise ValueError(f"{args.dir} is no loop checkout (no dvc.yaml)")
        copy_code(args.dir)
        if settings:
            params = args.dir / "params.yaml"
            params.write_text(updated_params(params.read_text(), settings))
        print(f"init: replaced the code in {args.dir}"
              + (" and set " + ", ".join(a for a, _ in args.set) if settings else "")
              + "; `git diff --stat` shows what changed, commit it, then `dvc repro` re-runs "
              "the stages whose code changed")
        return 0
    if args.project is None:
        raise ValueError("give --project: the id of the Label Studio project to learn from")
    updates: dict[str, dict] = {"labelstudio": {"project": args.project}}
    if args.label_studio_url:
        updates["labelstudio"]["url"] = args.label_studio_url
    for section, values in settings.items():
        updates.setdefault(section, {}).update(values)
    if args.start:
        from ..weights import resolve_start

        local = "://" not in args.start
        spec = str(Path(args.start).expanduser().absolute()) if local else args.start
        start = resolve_start(spec)
        updates.setdefault("train", {})["base_weights"] = spec
        print(f"init: the loop starts from {spec} (SHA-256 {start.sha256[:16]}...)"
              + ("" if start.labels is None else f", trained on {start.labels}; a new box "
                 "predictor is trained for this project's labels where they differ"))
    remote = args.remote or default_remote(args.dir)
    checkout = create_loop_project(args.dir, updates, remote=remote)
    print(f"init: {checkout} is a git + DVC checkout of the loop for Label Studio project "
          f"{args.project}; datasets and models are pushed to {remote} (DVC remote "
          "`storage`).\nNext:\n"
          f"  cd {checkout} && export LABEL_STUDIO_API_KEY=<token>\n"
          "  dvc repro                                   # export, train, evaluate, deploy\n"
          "  git add -A && git commit -m 'round 1' && dvc push   # this round's data and model\n"
          "  git remote add origin <url> && git push -u origin HEAD   # share the checkout\n"
          "A teammate: git clone <url> && cd <dir> && dvc pull && dvc repro")
    return 0
