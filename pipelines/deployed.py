"""DVC stage `deployed`: which model the registry serves, written to a small file
(`deploy.snapshot`, default data/deployed.json) that `train` (it starts from that model) and
`evaluate` (it compares with it) declare as a dependency, so dvc.lock names the model each
run read and a different deployed model re-runs them.

It runs at every `dvc repro` because the registry also changes outside DVC (a rollback, a
deploy by hand); while the same model is served the file stays byte-identical, so nothing
after it runs again. The stages open the model through the file and check its weights'
SHA-256, so they never read a model other than the one dvc.lock records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from backend.files import file_sha256
from backend.model_dir import ModelDir
from backend.registry import Registry, RegistryError

from .coco import write_json
from .params import fail, load_params

DEFAULT_SNAPSHOT = "data/deployed.json"


def snapshot(registry_root: str) -> dict[str, Any]:
    """The served version with its weights' hash, or why there is none."""
    registry = Registry(registry_root)
    name = registry.current_name()
    if name is None:
        return {"registry": registry_root, "version": None,
                "why_none": why_no_deployed_model(Path(registry_root))}
    try:
        model = registry.open(name)
    except (RegistryError, ValueError) as exc:
        fail(f"the registry's current version cannot be read: {exc}")
    return {"registry": registry_root, "version": name,
            "weights_sha256": file_sha256(model.weights), "labels": model.labels}


def why_no_deployed_model(registry: Path) -> str:
    """`dvc exp run --temp` copies the repository, not the git-ignored registry: say so,
    instead of silently training a different experiment from scratch."""
    if ".dvc/tmp/exps" in Path.cwd().resolve().as_posix() and not registry.is_absolute():
        return (f"no model registry at {registry} in this DVC temporary workspace (`dvc exp "
                "run --temp` and queued experiments copy only what git tracks); to start "
                "from the deployed model run `dvc exp run` in the workspace, or set "
                "deploy.registry or train.base_weights to an absolute path")
    return f"no deployed model in {registry} yet"


def snapshot_path(params: dict[str, Any]) -> Path:
    return Path(params.get("deploy", {}).get("snapshot", DEFAULT_SNAPSHOT))


def deployed_model(params: dict[str, Any]) -> tuple[ModelDir | None, dict[str, Any]]:
    """The model the snapshot names (None when none was deployed) and the snapshot, after
    checking that the registry still holds those exact weights."""
    path = snapshot_path(params)
    if not path.is_file():
        fail(f"{path} not found: the `deployed` stage writes it (`dvc repro` runs it; by "
             "hand: python -m pipelines.deployed)")
    record = json.loads(path.read_text())
    if record.get("version") is None:
        return None, record
    try:
        model = Registry(record["registry"]).open(record["version"])
    except (RegistryError, ValueError) as exc:
        fail(f"{path} names a model the registry cannot open ({exc}): run `dvc repro` again")
    if file_sha256(model.weights) != record["weights_sha256"]:
        fail(f"the weights of {record['version']} in {record['registry']} changed after {path} "
             "was written: run `dvc repro` again")
    return model, record


def main() -> None:
    params = load_params()
    record = snapshot(params.get("deploy", {}).get("registry", "models/registry"))
    write_json(snapshot_path(params), record)
    print(f"deployed: {record['version'] or record['why_none']}")


if __name__ == "__main__":
    main()
