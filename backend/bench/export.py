"""`tridentloop bench --export`: the loop's export stage against a real Label Studio project
of N generated, annotated tasks (default 2,000), run once, then again after 1% more tasks
were labelled. The second run reads only the tasks changed since the first and fetches only
their images (target: ≤ 10% of the first run's time and bytes).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from ..labelstudio.local import LocalLabelStudio, import_images, local_label_studio
from ..labelstudio.results import rectangle_region
from ..synthetic import CLASSES, LABEL_CONFIG, survey_scene

_SIZE = (240, 320)  # (h, w) of a generated task image
_UPLOAD_BATCH = 100  # files per import request


@dataclass(frozen=True)
class ExportBench:
    tasks: int = 2000
    added_percent: float = 1.0


def _add_annotated_tasks(server: LocalLabelStudio, client, project: int, count: int,
                         rng: np.random.Generator, start: int) -> None:
    """`count` JPEG tasks, each with a person's submitted annotation of its animals."""
    scenes = {}
    for first in range(start, start + count, _UPLOAD_BATCH):
        files = []
        for i in range(first, min(first + _UPLOAD_BATCH, start + count)):
            scene = survey_scene(rng, *_SIZE, 4)
            buffer = io.BytesIO()
            Image.fromarray(scene.image).save(buffer, format="JPEG", quality=85)
            files.append((f"task{i:06d}.jpg", buffer.getvalue()))
            scenes[f"task{i:06d}.jpg"] = scene
        import_images(server, project, files)
    for task in client.tasks.list(project=project):
        scene = scenes.get(task.data["image"].rsplit("-", 1)[-1])
        if scene is None:
            continue
        result = [rectangle_region(box, CLASSES[c], _SIZE[1], _SIZE[0])
                  for box, c in zip(scene.boxes.tolist(), scene.classes.tolist(), strict=True)]
        client.annotations.create(id=task.id, result=result, was_cancelled=False)


def _export(checkout: Path, server: LocalLabelStudio) -> dict:
    """The export stage as `dvc repro` runs it, in a process of its own."""
    env = {**os.environ, "LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": server.token}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.export"], cwd=checkout, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    manifest = json.loads((checkout / "data/dataset/manifest.json").read_text())
    return {"seconds": round(seconds, 2), "bytes": manifest["fetched_bytes"],
            "images": manifest["images"], "fetched": manifest["images_fetched"],
            "tasks_read": manifest["tasks_read"], "listing": manifest["tasks_listed"]}


def run_export_benchmark(bench: ExportBench, server: LocalLabelStudio | None = None
                         ) -> Iterator[dict]:
    """On `server`, or on a Label Studio of its own started for the run."""
    with tempfile.TemporaryDirectory(prefix="tridentloop-export-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        if server is None:
            server = stack.enter_context(local_label_studio(root / "label-studio"))
        yield _measure(bench, server, root)


def _measure(bench: ExportBench, server: LocalLabelStudio, root: Path) -> dict:
    from label_studio_sdk import LabelStudio

    client = LabelStudio(base_url=server.url, api_key=server.token)
    project = client.projects.create(title="export bench", label_config=LABEL_CONFIG).id
    rng = np.random.default_rng(0)
    _add_annotated_tasks(server, client, project, bench.tasks, rng, 0)
    checkout = root / "checkout"
    checkout.mkdir()
    (checkout / "params.yaml").write_text(yaml.safe_dump(
        {"labelstudio": {"url": server.url, "project": project},
         "dataset": {"dir": "data/dataset"}}))
    first = _export(checkout, server)
    added = max(1, round(bench.tasks * bench.added_percent / 100))
    _add_annotated_tasks(server, client, project, added, rng, bench.tasks)
    second = _export(checkout, server)
    return {"case": "export", "tasks": bench.tasks, "added": added,
            "first_s": first["seconds"], "second_s": second["seconds"],
            "first_bytes": first["bytes"], "second_bytes": second["bytes"],
            "second_fetched": second["fetched"], "images": second["images"],
            "second_tasks_read": second["tasks_read"], "second_listing": second["listing"],
            "time_ratio": round(second["seconds"] / first["seconds"], 3),
            "bytes_ratio": round(second["bytes"] / max(first["bytes"], 1), 4)}
