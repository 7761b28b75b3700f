"""Hostile input and faults in the engine: every case of ``hostile_corpus`` run as the ``rmae``
command under a time and memory bound (see ``hostile_driver``), plus the cases that need
processes of their own — two writers on one run folder, a killed trainer's data workers.

Each corpus case is one test id. An error case must exit 2 with exactly one stderr line
``rmae <command>: error: …`` matching its pattern and no traceback; an accepted input must exit
0 and leave its word (the skip) on stderr; either way within its time limit, without a signal,
under ``RLIMIT_AS`` = imports + 2 GiB, and with nothing lost (the case's check).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hostile_corpus as corpus
from conftest import PY, ROOT, TINY_TRAIN, subprocess_env

DRIVER = ROOT / "tests" / "hostile_driver.py"
#: Peak resident memory a case may add to the forked baseline (the imports).
MEMORY_BOUND_MB = 1536
# Printed by the installed `rmae` entry points when a plugin of a *different* checkout cannot be
# imported from this one; an artefact of running a worktree against another editable install.
_PLUGIN_WARNING = re.compile(r"^rmae: warning: subcommand plugin ")


def _stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not _PLUGIN_WARNING.match(line)]


def problems(case: corpus.Case, result: dict, baseline_mb: float) -> list[str]:
    """Everything wrong with how ``case`` ran (empty when it behaved)."""
    out = []
    if result["driver"]:
        return [f"the case's builder failed:\n{result['driver']}"]
    if result["timed_out"]:
        out.append(f"did not finish within {case.timeout} s")
    elif result["rc"] < 0:
        out.append(f"killed by signal {-result['rc']}")
    err = _stderr_lines(result["stderr"])
    if "Traceback" in result["stderr"]:
        out.append("printed a traceback")
    if case.stderr and not re.search(case.stderr, result["stderr"], re.M):
        out.append(f"stderr does not match {case.stderr!r}")
    if case.expect == "error":
        err = [line for line in err if not (case.stderr and re.search(case.stderr, line))]  # the expected words
        if result["rc"] != 2:
            out.append(f"exit status {result['rc']}, not 2")
        prefix = f"rmae {case.command}: error: "
        if len(err) != 1 or not err[0].startswith(prefix):
            out.append(f"stderr is not one line starting {prefix!r}")
        elif not re.search(case.pattern, err[0][len(prefix):]):
            out.append(f"the error does not match {case.pattern!r}")
    else:
        if result["rc"] != 0:
            out.append(f"exit status {result['rc']}, not 0")
        if not re.search(case.pattern, result["stdout"], re.M):
            out.append(f"stdout does not match {case.pattern!r}")
    if result["check"]:
        out.append(f"check: {result['check']}")
    if result["maxrss_mb"] - baseline_mb > MEMORY_BOUND_MB:
        out.append(f"peak memory {result['maxrss_mb']:.0f} MB, more than {MEMORY_BOUND_MB} MB over the baseline")
    if out:
        out.append(f"stdout: {result['stdout'][-1500:]}\nstderr: {result['stderr'][-3000:]}")
    return out


@pytest.fixture(scope="module")
def corpus_results(request) -> dict[str, dict]:
    """The driver's records of the selected cases (one subprocess for all of them)."""
    selected = [item.callspec.params["case"].name for item in request.session.items
                if item.module is sys.modules[__name__] and hasattr(item, "callspec") and "case" in item.callspec.params]
    proc = subprocess.run([PY, str(DRIVER), *selected], capture_output=True, text=True, timeout=1200,
                          env={**subprocess_env(Path(os.environ.get("TMPDIR", "/tmp"))), "PYTHONPATH": str(ROOT)})
    rows = {}
    for line in proc.stdout.splitlines():
        row = json.loads(line)
        rows[row["name"]] = row
    assert "<baseline>" in rows, f"the driver failed before running any case:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return rows


@pytest.mark.parametrize("case", corpus.CASES, ids=[c.name for c in corpus.CASES])
def test_corpus_case(case: corpus.Case, corpus_results: dict[str, dict]) -> None:
    result = corpus_results.get(case.name)
    assert result is not None, f"{case.name} was not run (the driver died before it)"
    found = problems(case, result, corpus_results["<baseline>"]["maxrss_mb"])
    assert not found, f"{case.summary}:\n" + "\n".join(found)
