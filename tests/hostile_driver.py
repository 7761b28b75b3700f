"""Run cases of the hostile-input corpus (``hostile_corpus.CASES``) as the ``rmae`` command, and
print one JSON line per case.

    python tests/hostile_driver.py [NAME ...]        # all cases when no name is given
    python tests/hostile_driver.py --table [NAME ...]  # the same, as a Markdown table

rmae, torch and the data libraries are imported once; each case then runs in a process forked
from this idle parent (it has run no torch op, so the fork is safe), exactly as
``python -m rmae ARGS`` runs it (``runpy`` on ``rmae.__main__``), in its own folder, with
stdout/stderr captured at the file-descriptor level, under

- a memory bound: ``RLIMIT_AS`` = the address space already mapped at the fork (torch's
  libraries alone map ~3 GiB) + :data:`MEMORY_BUDGET`;
- a time bound: the case's ``timeout`` (its process group is killed past it);

and the parent measures its peak resident memory (``ru_maxrss`` of ``os.wait4``) and wall time.
A native crash, a hang or an allocation beyond the budget therefore fails that one case and
the rest still run. Shared inputs (a trained run, a 9000×9000 PNG) are made once, in a forked
child too, and each case copies what it needs.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

MEMORY_BUDGET = 2 * 2**30  # bytes of address space a case may add to what the imports mapped


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return resource.getrlimit(resource.RLIMIT_AS)[0]


def _child(case, folder: Path, shared: dict) -> None:
    """In the forked child: build the inputs, run the command, check, exit with its status."""
    code = 70
    try:
        os.setpgid(0, 0)  # the parent kills the whole group on a timeout (DataLoader workers too)
        folder.mkdir(parents=True)
        os.chdir(folder)
        os.environ["RMAE_CACHE"] = str(folder / "rmae-cache")
        argv = case.build(folder, shared)
        if argv is None:  # a case that only makes inputs (the shared setup)
            os._exit(0)
        for fd, name in ((1, "stdout.txt"), (2, "stderr.txt")):
            target = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        limit = _vm_size() + MEMORY_BUDGET
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        sys.argv = ["rmae", *argv]
        try:
            runpy.run_module("rmae", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - a traceback is what the case must show
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        problem = case.check(folder, shared) if case.check else None
        (folder / "check.txt").write_text(problem or "")
    except BaseException:  # noqa: BLE001 - the driver's own failure (a builder): reported as such
        with open(folder / "driver.txt", "w") as f:
            traceback.print_exc(file=f)
        code = 70
    finally:
        os._exit(code)


def run_case(case, folder: Path, shared: dict) -> dict:
    """Fork, run one case, wait (killing it past its timeout); the record of what happened."""
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(case, folder, shared)
    deadline = t0 + case.timeout
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.02)

    def text(name: str) -> str:
        p = folder / name
        return p.read_text(errors="replace")[-20_000:] if p.exists() else ""

    return {"name": case.name, "rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
            "wall_s": round(time.monotonic() - t0, 2), "maxrss_mb": round(usage.ru_maxrss / 1024, 1),
            "stdout": text("stdout.txt"), "stderr": text("stderr.txt"), "check": text("check.txt"),
            "driver": text("driver.txt")}


def _outcome(case, row: dict) -> str:
    """What the user saw: the error line, or the skip / warning word and the result line."""
    lines = [line for line in row["stderr"].splitlines() if line.strip() and "subcommand plugin" not in line]
    if case.expect == "error":
        return "error: " + (lines[-1].split(": error: ", 1)[-1] if lines else "(none)")
    words = [line for line in lines if line.startswith("rmae.data: ")]
    result = (row["stdout"].strip().splitlines() or [""])[0]
    return ("skip/warn: " + words[0][len("rmae.data: "):] + "; " if words else "handled; ") + result


def table(rows: list[dict], cases: dict) -> str:
    base = next(r["maxrss_mb"] for r in rows if r["name"] == "<baseline>")
    out = [f"baseline (forked after the imports): {base:.0f} MB peak RSS", "",
           "| case | input | outcome | s | peak MB over baseline |", "|---|---|---|---|---|"]
    for r in rows:
        if r["name"] in cases:
            c = cases[r["name"]]
            text = _outcome(c, r).replace("|", "\\|")
            out.append(f"| {c.name} | {c.summary} | {text[:220]} | {r['wall_s']:.1f} | {r['maxrss_mb'] - base:.0f} |")
    return "\n".join(out)


def main(names: list[str]) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    as_table = "--table" in names
    names = [n for n in names if n != "--table"]
    import hostile_corpus as corpus  # imports rmae, torch, the data libraries: once, here

    cases = [c for c in corpus.CASES if not names or c.name in names]
    root = Path(tempfile.mkdtemp(prefix="rmae-hostile-"))
    try:
        shared = corpus.Shared(root / "shared")
        setup = run_case(corpus.SETUP, root / "shared", {})
        if setup["rc"] != 0:
            print(json.dumps(setup), flush=True)
            return 1
        rows = []
        for case, folder in [(corpus.BASELINE, "baseline"), *((c, c.name) for c in cases)]:
            rows.append(run_case(case, root / folder, shared.paths()))
            if not as_table:
                print(json.dumps(rows[-1]), flush=True)
        if as_table:
            print(table(rows, {c.name: c for c in cases}))
        return 0
    finally:
        if not os.environ.get("RMAE_HOSTILE_KEEP"):  # set it to look at a case's folder afterwards
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
