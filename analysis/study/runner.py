"""Running a study's many small jobs so the machine stays busy.

A study is many independent trainings and analyses. Each job is a subprocess (``python -m rmae
pretrain …`` / ``analyze …``) with a fixed number of intra-op threads; up to ``parallel`` run at
once. Measured on this 2-core machine (``benchmarks/bench_study.py``): two one-thread processes
finish a set of small runs sooner than the same runs one after another with two threads each —
small ViT steps do not scale to two threads (every op ends in a barrier), two processes do.

A job's output goes to its log file; a failed job is reported with the last lines of its log and
does not stop the others. Stopping the study (Ctrl-C, SIGTERM) stops every running job: the
trainings resume from their last checkpoint when the same ``rmae study`` command is run again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    name: str
    argv: list[str]
    log: Path
    threads: int = 1
    returncode: int | None = None
    seconds: float = 0.0
    tail: str = field(default="", repr=False)


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def run_jobs(jobs: list[Job], parallel: int, progress: bool = True, what: str = "jobs") -> list[Job]:
    """Run ``jobs`` with at most ``parallel`` at a time; returns them with return codes filled."""
    pending, running = deque(jobs), []
    done = 0
    t0 = time.time()

    def stop_all(*_):
        for job, proc, _ in running:
            if proc.poll() is None:
                proc.terminate()
        raise KeyboardInterrupt

    # SIGTERM (a supervisor, `kill PID`) stops the jobs too; only the main thread may set handlers
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop_all) if main else None
    try:
        while pending or running:
            while pending and len(running) < max(1, parallel):
                job = pending.popleft()
                job.log.parent.mkdir(parents=True, exist_ok=True)
                fh = open(job.log, "w")
                proc = subprocess.Popen(job.argv, stdout=fh, stderr=subprocess.STDOUT, env=_env(job.threads))
                running.append((job, proc, (fh, time.time())))
            time.sleep(0.2)
            for item in list(running):
                job, proc, (fh, started) = item
                if proc.poll() is None:
                    continue
                fh.close()
                job.returncode, job.seconds = proc.returncode, time.time() - started
                running.remove(item)
                done += 1
                if job.returncode != 0:
                    job.tail = _tail(job.log)
                if progress:
                    status = "ok" if job.returncode == 0 else f"FAILED ({job.tail})"
                    print(f"  [{done}/{len(jobs)} {what}, {time.time() - t0:.0f} s] {job.name}: {status} "
                          f"({job.seconds:.0f} s)", flush=True)
    except KeyboardInterrupt:
        for job, proc, (fh, _) in running:
            if proc.poll() is None:
                proc.terminate()
        for job, proc, (fh, _) in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            fh.close()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return jobs


def rmae_command(*args: str) -> list[str]:
    """``python -m rmae ARGS`` with this interpreter (the study's own environment)."""
    return [sys.executable, "-m", "rmae", *args]
