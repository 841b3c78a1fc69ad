"""DVC stage `deploy`: put the candidate into the registry and serve it, only if its
pre-labels save annotators work and it is not worse than the deployed model on the same val
images, for annotators and for AP: its effort ratio below `deploy.max_effort_ratio` (1.0:
no cheaper than drawing every box) and at most the deployed model's + `tolerance`, and its
AP50 at least the deployed model's - `tolerance`. Never automatically when the label set
changed (unless `deploy.allow_label_change`): a renamed or added class is a decision a
person makes, not a metric. The deployed version's model.json carries the score thresholds
`evaluate` chose for it on val, which serving, prelabel and predict then use.

The new version is written atomically (temp dir + rename) with `model.json` lineage (dataset
hash, training params, git revision, metrics), then `current` is switched; a running
backend hot-reloads it. `deploy.json` records the decision either way.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from backend.model_dir import ModelDir, copy_model_dir
from backend.registry import Registry

from .coco import write_json
from .params import load_params


def _effort(metrics: dict[str, Any]) -> float | None:
    figures = metrics.get("effort")
    return None if figures is None else float(figures["overall"]["effort_ratio"])


def gate(
    metrics: dict[str, Any], tolerance: float, allow_label_change: bool = False,
    max_effort_ratio: float = 1.0,
) -> tuple[bool, str]:
    deployed = metrics.get("deployed")
    effort = _effort(metrics)
    if deployed is not None and deployed.get("is_candidate"):
        return False, f"the candidate is deployed already, as {deployed['version']}"
    if effort is not None and effort >= max_effort_ratio:
        return False, (f"effort ratio {effort:.3f} is not below deploy.max_effort_ratio "
                       f"{max_effort_ratio}: its pre-labels would cost annotators as much as "
                       "drawing every box")
    if deployed is None:
        return True, "no deployed model to compare with" + (
            f" (effort ratio {effort:.3f})" if effort is not None else "")
    compared = (f"AP50 {metrics['ap50']:.4f} vs deployed {deployed['version']} "
                f"{deployed['ap50']:.4f} on the same val images")
    if deployed.get("label_set_changed"):
        if allow_label_change:
            return True, f"the label set changed and deploy.allow_label_change is set ({compared})"
        return False, (
            f"the label set changed (deployed {deployed['version']}: {deployed.get('labels')}; "
            f"candidate: {sorted(metrics.get('per_class_ap', {}))}): not deployed "
            f"automatically ({compared}); set deploy.allow_label_change: true to deploy it"
        )
    deployed_effort = _effort(deployed)
    if effort is not None and deployed_effort is not None and (
        effort > deployed_effort + tolerance
    ):
        return False, (f"effort ratio {effort:.3f} > deployed {deployed['version']} "
                       f"{deployed_effort:.3f} + {tolerance}: annotators would correct more; "
                       f"keeping {deployed['version']}")
    if metrics["ap50"] >= deployed["ap50"] - tolerance:
        efforts = ("" if effort is None or deployed_effort is None else
                   f"; effort ratio {effort:.3f} vs {deployed_effort:.3f}")
        return True, (
            f"AP50 {metrics['ap50']:.4f} >= deployed {deployed['version']} "
            f"{deployed['ap50']:.4f} - {tolerance}{efforts}"
        )
    return False, (
        f"AP50 {metrics['ap50']:.4f} < deployed {deployed['version']} "
        f"{deployed['ap50']:.4f} - {tolerance}: keeping {deployed['version']}"
    )


def git_revision() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def next_version(registry: Registry) -> str:
    numbers = [int(n[1:5]) for n in registry.version_names() if n[:1] == "v" and n[1:5].isdigit()]
    return f"v{max(numbers, default=0) + 1:04d}"


def main() -> None:
    params = load_params()
    dp = params.get("deploy", {})
    metrics = json.loads(
        Path(params.get("evaluate", {}).get("metrics", "metrics.json")).read_text()
    )
    tolerance = float(dp.get("tolerance", 0.0))
    ok, reason = gate(metrics, tolerance, bool(dp.get("allow_label_change", False)),
                      float(dp.get("max_effort_ratio", 1.0)))
    decision: dict[str, Any] = {
        "deployed": ok,
        "reason": reason,
        "ap50": metrics["ap50"],
        "effort_ratio": _effort(metrics),
        "time": time.time(),
    }
    if ok:
        registry = Registry(dp.get("registry", "models/registry"))
        candidate = ModelDir.open(params.get("train", {}).get("output", "models/candidate"))
        name = next_version(registry)
        lineage = {
            **candidate.metadata,
            "version": name,
            "metrics": metrics,
            "git_revision": git_revision(),
            "deployed_at": time.time(),
            "previous": registry.current_name(),
            **({"score_thresholds": metrics["score_thresholds"]}
               if "score_thresholds" in metrics else {}),
        }
        copy_model_dir(candidate, registry.versions_dir / name, lineage)
        registry.switch(name, reason=f"deploy: {reason}")
        decision["version"] = name
    write_json(dp.get("record", "deploy.json"), decision)
    print(f"deploy: {'deployed ' + decision['version'] if ok else 'not deployed'} ({reason})")


if __name__ == "__main__":
    main()
