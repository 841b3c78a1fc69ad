"""Training runs started from Label Studio's webhook: queued, one at a time, each with its
log on disk and its status readable over HTTP.

Requests that arrive while a run is already waiting join that run rather than queueing
another identical one; a run in progress is never interrupted or overlapped.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Job:
    id: str
    command: list[str]
    reason: str
    project: str | None
    status: str = "queued"  # queued | running | succeeded | failed
    returncode: int | None = None
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    log_path: str = ""

    def describe(self, log_tail: int = 4000) -> dict[str, Any]:
        info = asdict(self)
        path = Path(self.log_path)
        info["log_tail"] = path.read_text(errors="replace")[-log_tail:] if path.is_file() else ""
        return info


class TrainingJobs:
    def __init__(self, command: str, workdir: Path, log_dir: Path) -> None:
        self.command = shlex.split(command)
        self.workdir = Path(workdir)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, Job] = {}
        self._waiting: Job | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._counter = 0
        threading.Thread(target=self._run, name="training-jobs", daemon=True).start()

    def request(self, reason: str, project: str | None) -> Job:
        """Queue a run (or join the one already waiting) and return it at once."""
        with self._lock:
            if self._waiting is not None:
                return self._waiting
            self._counter += 1
            job_id = f"train-{time.strftime('%Y%m%dT%H%M%S')}-{self._counter}"
            job = Job(
                job_id, self.command, reason, project, log_path=str(self.log_dir / f"{job_id}.log")
            )
            self._jobs[job_id] = job
            self._waiting = job
            self._wake.notify()
            return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._waiting is None:
                    self._wake.wait()
                job, self._waiting = self._waiting, None
                job.status, job.started_at = "running", time.time()
            self._execute(job)

    def _execute(self, job: Job) -> None:
        # The command (`dvc repro`) and the stages it runs (`python -m pipelines...`) must
        # find this environment's executables first.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "PATH": path, "TRIDENTLOOP_JOB_ID": job.id}
        if job.project:
            env["TRIDENTLOOP_LS_PROJECT"] = job.project
        with open(job.log_path, "w") as out:
            out.write(f"$ {shlex.join(job.command)}  (in {self.workdir})\n")
            out.flush()
            try:
                proc = subprocess.run(
                    job.command,
                    cwd=self.workdir,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    check=False,
                )
                job.returncode = proc.returncode
            except OSError as exc:
                out.write(f"could not start the training command: {exc}\n")
                job.returncode = -1
        job.finished_at = time.time()
        job.status = "succeeded" if job.returncode == 0 else "failed"
        log.info("training job %s %s (exit %s)", job.id, job.status, job.returncode)
