"""Runs one training command for the backend and outlives nothing: when the backend dies
(SIGTERM from the parent-death signal) or asks it to stop, it stops the command's whole
process group (`dvc repro` and its stages); it writes the exit code to a file so that a
restarted backend can tell how the run ended.

    python -m backend.serving.job_runner EXIT_FILE JOB_ID BACKEND_PID -- COMMAND...

JOB_ID is only there so that a restarted backend recognises this process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path


def _die_with_parent() -> None:
    """SIGTERM to this process when the backend that started it dies (Linux)."""
    import ctypes

    # Elsewhere (no Linux libc) the backend's own shutdown stops the run.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: list[str]) -> int:
    exit_file, _job_id, backend_pid, separator, *command = argv
    if separator != "--" or not command:
        print("usage: job_runner EXIT_FILE JOB_ID BACKEND_PID -- COMMAND...", file=sys.stderr)
        return 2
    _die_with_parent()
    child = subprocess.Popen(command, start_new_session=True)
    stopped_by: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        """Pass the stop on to the whole group; force it 20 s later if it lingers. The
        main flow below sees the child end and records how."""
        stopped_by.append(signum)
        _signal_group(child.pid, signal.SIGTERM)
        threading.Timer(20, _signal_group, (child.pid, signal.SIGKILL)).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if os.getppid() != int(backend_pid):  # the backend died before the signal was armed
        stop(signal.SIGTERM, None)
    returncode = child.wait()
    if stopped_by:
        returncode = -stopped_by[0]
    Path(exit_file).write_text(str(returncode))
    os._exit(returncode if returncode >= 0 else 128 - returncode)  # not waiting for the timer


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
