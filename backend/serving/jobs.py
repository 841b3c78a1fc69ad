"""Training runs started from Label Studio's webhook: queued, one at a time, recorded on
disk, their logs readable over HTTP, and never orphaned or duplicated.

Each job is a JSON record in the jobs folder (id, command, status, pid, log path, exit
code), rewritten atomically at every change. A run is started through `job_runner`, which
dies with the backend (Linux parent-death signal) and then stops its command's whole
process group, so killing the backend stops `dvc repro` too; the runner writes the exit
code beside the record. On start the backend reconciles: a job whose process is gone is
marked failed (or finished, from its exit code file); one still running is adopted and
waited for before anything else runs, never started a second time.

Requests that arrive while a run is already waiting join that run rather than queueing
another identical one; a run in progress is never interrupted or overlapped.
"""

from __future__ import annotations

import contextlib
import json
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

import yaml

from .auth import child_environment

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")


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
    pid: int | None = None
    note: str = ""

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
        self._adopted: Job | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._reconcile()
        threading.Thread(target=self._run, name="training-jobs", daemon=True).start()

    def request(self, reason: str, project: str | None) -> Job:
        """Queue a run (or join the one already waiting) and return it at once."""
        with self._lock:
            if self._waiting is not None:
                return self._waiting
            job_id = f"train-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{len(self._jobs) + 1}"
            job = Job(
                job_id, self.command, reason, project, log_path=str(self.log_dir / f"{job_id}.log")
            )
            self._jobs[job_id] = job
            self._save(job)
            self._waiting = job
            self._wake.notify()
            return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.queued_at)

    def _record(self, job: Job) -> Path:
        return self.log_dir / f"{job.id}.json"

    def _exit_file(self, job: Job) -> Path:
        return self.log_dir / f"{job.id}.exit"

    def _save(self, job: Job) -> None:
        tmp = self._record(job).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(job)))
        os.replace(tmp, self._record(job))

    def _reconcile(self) -> None:
        """Read the records a previous backend left and settle every unfinished one."""
        for path in sorted(self.log_dir.glob("*.json")):
            try:
                job = Job(**json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                log.warning("ignoring unreadable job record %s: %s", path, exc)
                continue
            self._jobs[job.id] = job
            if job.status == "running" and job.pid and _runner_alive(job.pid, job.id):
                log.info("adopting training job %s (pid %d), still running", job.id, job.pid)
                self._adopted = job
            elif job.status == "running":
                self._finish(job, note="the backend stopped while it ran")
            elif job.status == "queued" and self._waiting is None:
                self._waiting = job
            elif job.status == "queued":
                self._finish(job, note="superseded by an earlier queued run")

    def _finish(self, job: Job, note: str = "") -> None:
        """Settle a job, trusting the exit code its runner wrote when there is one."""
        with contextlib.suppress(OSError, ValueError):
            job.returncode = int(self._exit_file(job).read_text())
        job.status = "succeeded" if job.returncode == 0 else "failed"
        job.finished_at = job.finished_at or time.time()
        job.note = note or job.note
        self._save(job)
        log.info("training job %s %s (exit %s)", job.id, job.status, job.returncode)

    def _run(self) -> None:
        if self._adopted is not None:
            while _runner_alive(self._adopted.pid or 0, self._adopted.id):
                time.sleep(1.0)
            with self._lock:
                self._finish(self._adopted, note="adopted after a backend restart")
        while True:
            with self._lock:
                while self._waiting is None:
                    self._wake.wait()
                job, self._waiting = self._waiting, None
                job.status, job.started_at = "running", time.time()
            self._execute(job)

    def _execute(self, job: Job) -> None:
        # The command (`dvc repro`) and the stages it runs (`python -m pipelines...`) must
        # find this environment's executables first; the backend's credentials stay here.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**child_environment(), "PATH": path, "TRIDENTLOOP_JOB_ID": job.id}
        refused = _other_project(self.workdir, job.project)
        if refused:
            Path(job.log_path).write_text(refused + "\n")
            with self._lock:
                job.returncode = 2
                self._finish(job, note=refused)
            return
        runner = [sys.executable, "-m", "backend.serving.job_runner", str(self._exit_file(job)),
                  job.id, str(os.getpid()), "--", *job.command]
        with open(job.log_path, "w") as out:
            out.write(f"$ {shlex.join(job.command)}  (in {self.workdir})\n")
            out.flush()
            try:
                proc = subprocess.Popen(
                    runner, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                out.write(f"could not start the training command: {exc}\n")
                with self._lock:
                    job.returncode = -1
                    self._finish(job)
                return
            with self._lock:
                job.pid = proc.pid
                self._save(job)
            returncode = proc.wait()
        with self._lock:
            job.returncode = returncode
            self._finish(job)


def _other_project(workdir: Path, project: str | None) -> str | None:
    """Why a webhook's project cannot train here, if it cannot. The loop reads its project
    from params.yaml alone, so that dvc.lock records the data a model was trained on; a
    webhook from another project must not quietly train on this one's."""
    params_file = workdir / "params.yaml"
    if not project or not params_file.is_file():
        return None
    configured = (yaml.safe_load(params_file.read_text()) or {}).get("labelstudio", {})
    if str(configured.get("project")) == str(project):
        return None
    return (f"the webhook came from project {project}, but {params_file} trains on project "
            f"{configured.get('project')}: set labelstudio.project to {project} there (one "
            "loop per project), so that dvc.lock records the data each model was trained on")


def _runner_alive(pid: int, job_id: str) -> bool:
    """Is `pid` still the runner of this job (not a recycled pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"backend.serving.job_runner" in cmdline and job_id.encode() in cmdline
