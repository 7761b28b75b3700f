"""Background analysis jobs: ``rmae analyze`` in a subprocess, so a page never blocks on it.

The metrics page's "Compute what is missing" starts :func:`analyze_command` through
:class:`JobBoard` and shows :meth:`Job.status` on every rerun (and on a timer in the browser).
No Streamlit here; one board lives per dashboard process (``st.cache_resource``).

- **Output**: the job's stdout and stderr go to ``REPORT/analyze.log``; a failed job's status
  carries the log's last line (``rmae analyze: error: …``, or a traceback's exception line).
  The log and the lock file are opened with ``O_NOFOLLOW``: a symlink planted in the report
  folder is refused (an ``OSError``), never followed out of the runs root; the log is read back
  the same way, and only if it is a regular file (a FIFO planted there cannot block the page).
- **One job per report folder**: a job holds an exclusive ``flock`` on ``REPORT/.rmae-job.lock``
  until it is seen to end, so a second start — from another browser session or another
  dashboard process on the same runs root — is refused (:class:`JobBusyError`) instead of two
  analyses writing one ``results.json``.
- **Ends with the dashboard**: the child stays in the dashboard's process group (Ctrl-C in the
  terminal of ``rmae dashboard`` reaches both), and the board terminates its running jobs when
  the process exits normally (``atexit``; Streamlit's SIGTERM handler stops the server that way).
  A dashboard killed with SIGKILL leaves its job running to completion; nothing else is spawned.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rmae.errors import UserError

LOG = "analyze.log"
LOCK = ".rmae-job.lock"
#: bytes of the log read back for the last error line
TAIL_BYTES = 64 * 1024


class JobBusyError(UserError):
    """An analysis is already running for this report folder."""


def analyze_command(runs: Sequence[str | Path], report_dir: str | Path, n_images: int,
                    probes: Sequence[str]) -> list[str]:
    """The ``rmae analyze`` command line of a dashboard job (only flags ``analyze`` keeps stable)."""
    return [sys.executable, "-m", "rmae", "analyze", *map(str, runs), "--data", f"scenes:val:{int(n_images)}",
            "--out", str(report_dir), "--probes", ",".join(probes) or "none", "--no-progress"]


@dataclass(frozen=True)
class JobStatus:
    state: str  # "running" | "done" | "failed"
    seconds: float  # since the start
    message: str = ""  # failed: the log's last line

    @property
    def running(self) -> bool:
        return self.state == "running"


def last_line(path: Path) -> str:
    """The last non-empty line of a log (its last :data:`TAIL_BYTES`), or "" — also for a
    symlink (not followed), a FIFO (would block) or anything else that is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return ""
        tail = os.pread(fd, TAIL_BYTES, max(0, st.st_size - TAIL_BYTES)).decode("utf-8", errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class Job:
    """One running (or finished) command writing into ``report_dir``."""

    def __init__(self, report_dir: Path, command: list[str], lock_fd: int, label: str = ""):
        self.report_dir = report_dir
        self.label = label or report_dir.name
        self.log = report_dir / LOG
        self.command = command
        self.started = time.time()
        self._lock_fd: int | None = lock_fd
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=report_dir)
        finally:
            os.close(log)
        self.ended: float | None = None
        self._mutex = threading.Lock()  # sessions poll from their own threads

    def status(self) -> JobStatus:
        code = self.proc.poll()
        if code is None:
            return JobStatus("running", time.time() - self.started)
        with self._mutex:
            if self.ended is None:
                self.ended = time.time()
                self._release()
        seconds = self.ended - self.started
        if code == 0:
            return JobStatus("done", seconds)
        why = last_line(self.log) or f"exit status {code}"
        return JobStatus("failed", seconds, why if code > 0 else f"stopped by signal {-code}: {why}")

    def terminate(self, wait: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.status()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None


class JobBoard:
    """The jobs of one dashboard process, by report folder."""

    def __init__(self) -> None:
        self._jobs: dict[Path, Job] = {}
        self._mutex = threading.Lock()
        atexit.register(self.terminate_all)

    def start(self, report_dir: Path, command: list[str], label: str = "") -> Job:
        """Start ``command`` for ``report_dir`` (created if needed), or :class:`JobBusyError`.
        ``label`` says what the job does, for the status line."""
        report_dir = Path(report_dir)
        with self._mutex:
            report_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(report_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise JobBusyError(f"{report_dir.name}: an analysis is already running for this report; wait for it "
                                   "to finish or choose another report name") from None
            try:
                job = Job(report_dir, command, fd, label)
            except BaseException:
                os.close(fd)
                raise
            self._jobs[report_dir] = job
            return job

    def get(self, report_dir: str | Path) -> Job | None:
        return self._jobs.get(Path(report_dir))

    def terminate_all(self) -> None:
        for job in list(self._jobs.values()):
            job.terminate()
