"""Timing shared by the benchmarks: interleaved rounds, device-synchronised clocks, RSS."""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..detection.device import synchronize


def time_interleaved(
    runs: list[Callable[[], object]], repeats: int, device: torch.device
) -> list[float]:
    """Best wall time (s) of each run over `repeats` rounds after one warm-up round; the runs
    alternate within each round so that load on the machine hits them alike."""
    best = [float("inf")] * len(runs)
    for round_ in range(repeats + 1):
        for i, run in enumerate(runs):
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if round_ > 0:
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ProcessTreeMemory:
    """Peak memory of a process with all its descendants (DataLoader workers, Ray actors),
    sampled from /proc while it runs: what the machine has to hold. Each process counts its
    proportional set size (PSS), so the libraries and copy-on-write pages forked workers
    share with their parent are counted once, not once per worker."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval, self.peak_kib = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        """The peak in MiB."""
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kib = max(self.peak_kib, sum(map(_pss_kib, _tree(self.pid))))


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class MeasuredRun:
    seconds: float
    peak_rss_mb: float  # the process itself, from the kernel
    tree_peak_pss_mb: float  # the process and its children, sampled


def run_measured(command: list[str], what: str, cwd: Path | None = None) -> MeasuredRun:
    """Run `command` to its end in a process of its own and measure it: a benchmark's
    memory figure must not include the benchmark's own process. A failure raises."""
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL)
    tree = ProcessTreeMemory(child.pid)
    _, status, usage = os.wait4(child.pid, 0)
    tree_peak = tree.stop()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{what} failed (exit {child.returncode})")
    return MeasuredRun(time.perf_counter() - started, usage.ru_maxrss / 1024, tree_peak)
