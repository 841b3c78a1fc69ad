"""DVC stage `deploy`: put the candidate into the registry and serve it, only if its
pre-labels save annotators work and it is not worse than the deployed model on the same val
images, for annotators and for AP: its out-of-sample effort ratio below
`deploy.max_effort_ratio` (1.0: no cheaper than drawing every box) and at most the deployed
model's at its served thresholds + `effort_tolerance`, and its AP50 at least the deployed
model's - `ap50_tolerance`. A val split with fewer than `min_val_objects` boxes decides by
noise: the gate refuses and says how many more are needed. Never automatically when the label set
changed (unless `deploy.allow_label_change`): a renamed or added class is a decision a
person makes, not a metric. The deployed version's model.json carries the score thresholds
`evaluate` chose for it on val, its count calibration and triage threshold, which serving,
prelabel and predict then use.

The new version is written atomically (temp dir + rename) with `model.json` lineage (dataset
hash, training params, git revision, metrics), then `current` is switched; a running
backend hot-reloads it. `deploy.json` records the decision either way.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.model_dir import ModelDir, copy_model_dir
from backend.registry import Registry
from backend.settings import from_section

from .coco import write_json
from .params import fail, load_params


@dataclass(frozen=True)
class GateSettings:
    """params.yaml `deploy`: what a candidate must show to be served."""

    ap50_tolerance: float = 0.01  # AP50 may fall this much below the deployed model's
    effort_tolerance: float = 0.02  # and its effort ratio rise this much above it
    max_effort_ratio: float = 1.0  # only pre-labels that beat drawing (< 1.0)
    min_val_objects: int = 25  # fewer val boxes decide by noise: refuse and say so
    allow_label_change: bool = False

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> GateSettings:
        if "tolerance" in params:
            fail("deploy.tolerance is now two settings, deploy.ap50_tolerance and "
                 "deploy.effort_tolerance: rename it in params.yaml")
        return from_section(cls, params)


def _effort(metrics: dict[str, Any]) -> float | None:
    """The effort ratio a model is judged on: out of sample for a candidate, at its served
    thresholds for the deployed model."""
    figures = metrics.get("effort_out_of_sample") or metrics.get("effort_served")
    return None if figures is None else float(figures["effort_ratio"])


def _offers_nothing(metrics: dict[str, Any]) -> bool:
    chosen = (metrics.get("score_thresholds") or {}).get("per_class")
    return chosen is not None and all(t is None for t in chosen.values())


def _too_costly(effort: float, metrics: dict[str, Any], settings: GateSettings) -> str:
    if _offers_nothing(metrics):
        return (f"no class's pre-labels beat drawing on val with confidence, so none would be "
                f"offered (effort ratio {effort:.3f}); more labels give the evidence, or "
                "effort.confidence, effort.delete_cost and effort.offer_rare change what "
                "counts as enough")
    return (f"out-of-sample effort ratio {effort:.3f} is not below deploy.max_effort_ratio "
            f"{settings.max_effort_ratio}: its pre-labels would cost annotators as much as "
            "drawing every box (raise deploy.max_effort_ratio to deploy it anyway)")


def gate(metrics: dict[str, Any], settings: GateSettings = GateSettings()) -> tuple[bool, str]:
    deployed = metrics.get("deployed")
    effort = _effort(metrics)
    if deployed is not None and deployed.get("is_candidate"):
        return False, f"the candidate is deployed already, as {deployed['version']}"
    objects = (metrics.get("effort") or {}).get("overall", {}).get("ground_truth")
    if objects is not None and objects < settings.min_val_objects:
        return False, (f"val holds {objects} labelled boxes, fewer than deploy.min_val_objects "
                       f"{settings.min_val_objects}: the comparison would be noise; label "
                       f"{settings.min_val_objects - objects} more val boxes (split.val_percent "
                       "of the labels go to val) or lower deploy.min_val_objects")
    if effort is not None and effort >= settings.max_effort_ratio:
        return False, _too_costly(effort, metrics, settings)
    if deployed is None:
        return True, "no deployed model to compare with" + (
            f" (out-of-sample effort ratio {effort:.3f})" if effort is not None else "")
    compared = (f"AP50 {metrics['ap50']:.4f} vs deployed {deployed['version']} "
                f"{deployed['ap50']:.4f} on the same val images")
    if deployed.get("label_set_changed"):
        if settings.allow_label_change:
            return True, f"the label set changed and deploy.allow_label_change is set ({compared})"
        return False, (
            f"the label set changed (deployed {deployed['version']}: {deployed.get('labels')}; "
            f"candidate: {sorted(metrics.get('per_class_ap', {}))}): not deployed "
            f"automatically ({compared}); set deploy.allow_label_change: true to deploy it"
        )
    deployed_effort = _effort(deployed)
    if effort is not None and deployed_effort is not None and (
        effort > deployed_effort + settings.effort_tolerance
    ):
        return False, (f"effort ratio {effort:.3f} > deployed {deployed['version']} "
                       f"{deployed_effort:.3f} + deploy.effort_tolerance "
                       f"{settings.effort_tolerance}: annotators would correct more; "
                       f"keeping {deployed['version']}")
    if metrics["ap50"] >= deployed["ap50"] - settings.ap50_tolerance:
        efforts = ("" if effort is None or deployed_effort is None else
                   f"; effort ratio {effort:.3f} vs {deployed_effort:.3f}")
        return True, (
            f"AP50 {metrics['ap50']:.4f} >= deployed {deployed['version']} "
            f"{deployed['ap50']:.4f} - {settings.ap50_tolerance}{efforts}"
        )
    return False, (
        f"AP50 {metrics['ap50']:.4f} < deployed {deployed['version']} "
        f"{deployed['ap50']:.4f} - deploy.ap50_tolerance {settings.ap50_tolerance}: keeping "
        f"{deployed['version']}"
    )


CALIBRATION_KEYS = ("score_thresholds", "count_calibration", "triage")


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
    ok, reason = gate(metrics, GateSettings.from_params(dp))
    decision: dict[str, Any] = {
        "deployed": ok,
        "reason": reason,
        "ap50": metrics["ap50"],
        "effort_ratio": _effort(metrics),
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
            **{k: metrics[k] for k in CALIBRATION_KEYS if k in metrics},
        }
        copy_model_dir(candidate, registry.versions_dir / name, lineage)
        registry.switch(name, reason=f"deploy: {reason}")
        decision["version"] = name
    write_json(dp.get("record", "deploy.json"), decision)
    print(f"deploy: {'deployed ' + decision['version'] if ok else 'not deployed'} ({reason})")


if __name__ == "__main__":
    main()
