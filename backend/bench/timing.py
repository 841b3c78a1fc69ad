"""Timing shared by the benchmarks: interleaved rounds, device-synchronised clocks, RSS."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

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
