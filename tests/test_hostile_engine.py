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

import pytest
import yaml

import hostile_corpus as corpus
import rmae
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
                          env=subprocess_env(Path(os.environ.get("TMPDIR", "/tmp"))))
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


# ---------------------------------------------------------------------------------------------
# processes: two writers, a killed trainer


def _rmae(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "rmae", *args], cwd=cwd, env=subprocess_env(cwd), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _training(run: Path, proc: subprocess.Popen) -> bool:
    """True once ``proc`` logged a training step into ``run`` (fails if it exited instead)."""
    assert proc.poll() is None, f"the trainer exited early:\n{proc.communicate()[1][-3000:]}"
    return (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


LONG_RUN = ["pretrain", "--config", "demo", "--out", "run", *TINY_TRAIN, "steps=100000", "log_every=1",
            "checkpoint_every=2", "figure_every=0", "region_cache=none", "--no-progress"]


@pytest.fixture(scope="module")
def contested_run(tmp_path_factory) -> dict:
    """One trainer (with 2 data workers) writing a run; while it trains, a second `rmae pretrain`
    on the same folder with another model (the way a config mix-up happens) and a `--resume` of
    it; then the first is killed with SIGKILL. Records what each process did."""
    tmp = tmp_path_factory.mktemp("contested")
    first = _rmae(*LONG_RUN, "num_workers=2", cwd=tmp)
    try:
        _wait_for(lambda: _training(tmp / "run", first), 120, "the first trainer's first step")
        _wait_for(lambda: (tmp / "run" / "checkpoints" / "latest.json").is_file(), 120, "a checkpoint")
        others = [_rmae(*LONG_RUN, "model=mae_vit_tiny_patch8", cwd=tmp),
                  _rmae("pretrain", "--resume", "run", "--no-progress", cwd=tmp)]
        competitors = [(p.communicate(timeout=120)[1], p.returncode) for p in others]
        still_training = first.poll() is None
        # workers are made per epoch (not persistent): wait for a moment when both are up
        deadline = time.monotonic() + 60
        while len(workers := _children(first.pid)) < 2 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
    survivors = _survivors_after(workers, 3.0)
    return {"run": tmp / "run", "pid": first.pid, "competitors": competitors, "still_training": still_training,
            "workers": workers, "survivors": survivors}


def _survivors_after(workers: list[int], seconds: float) -> list[int]:
    """The workers still alive ``seconds`` after their parent was killed (then killed, so no test
    leaves them behind)."""
    deadline = time.monotonic() + seconds
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    return survivors


def test_a_second_writer_is_refused_at_once(contested_run):
    assert contested_run["still_training"], "the first trainer stopped while the others ran"
    for stderr, code in contested_run["competitors"]:
        lines = _stderr_lines(stderr)
        assert code == 2 and len(lines) == 1, stderr
        assert re.fullmatch(rf"rmae pretrain: error: run: another rmae process \(pid {contested_run['pid']}\) is writing "
                            r"this run; wait for it to finish, or use another --out", lines[0]), lines[0]


def test_the_first_writers_run_stays_whole(contested_run):
    """After the refused writers and a SIGKILL: one model's config, weights that fit it, one log."""
    run = contested_run["run"]
    doc = yaml.safe_load((run / "config.yaml").read_text())
    assert doc["model"] == "rmae_vit_tiny_patch8" and doc["model_config"]["family"] == "rmae"
    model = rmae.load_model(run)  # weights and config of the same model, strictly
    assert model.config.family == "rmae" and model.config.depth == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer's log, no interleaving


def test_data_workers_die_with_a_killed_trainer(contested_run):
    """SIGKILL of `rmae pretrain num_workers=2`: its DataLoader workers are gone within 3 s."""
    assert len(contested_run["workers"]) >= 2, f"expected 2 data workers, found {contested_run['workers']}"
    assert not contested_run["survivors"], "data workers outlived their killed trainer"


_BUSY_LOADER = """
import time
import numpy as np
from rmae.data import BaseDataset, RegionDataset, RegionLoader

class Slow(BaseDataset):
    def __len__(self):
        return 8
    def load(self, index):
        time.sleep(60)  # a worker busy with one item (FH on a large photo) when the trainer dies
        return {"image": np.zeros((32, 32, 3), np.uint8), "key": str(index)}

for batch in RegionLoader(RegionDataset(Slow(), source=None, cache=None, image_size=32), num_workers=2):
    pass
"""


def test_busy_data_workers_die_with_their_parent(tmp_path):
    """Workers in the middle of an item when the parent is killed: torch's watchdog would only
    notice after the item; ``end_with_parent`` has the kernel kill them at once."""
    parent = subprocess.Popen([PY, "-c", _BUSY_LOADER], env=subprocess_env(tmp_path), start_new_session=True)
    try:
        _wait_for(lambda: len(_children(parent.pid)) >= 2, 60, "two data workers")
        workers = _children(parent.pid)
        time.sleep(1)  # both are inside load() now
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
    assert not _survivors_after(workers, 3.0), "busy data workers outlived their killed parent"
