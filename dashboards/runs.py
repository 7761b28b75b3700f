"""The runs root: the only part of the file system the dashboard reads, and the one place that
decides what may be opened.

**Confinement by construction.** Every file the dashboard opens is checked by
:meth:`RunsRoot.file` just before it is opened, whether the app built its path (a run's
``config.yaml``, a figure, a report) or read it from a file under the root (the weights
``checkpoints/latest.json`` names, the run folders a study's ``results.json`` lists). The path is
resolved (symlinks included) and refused if it ends outside the root (:class:`UnsafePathError`),
then refused unless it is a regular file within the size limit of its kind
(:class:`RootFileError`: a FIFO would block a reader, a device or a 200 MB "JSON" would exhaust
it). Small files are then read by :func:`rmae.io.read_regular` on the resolved path
(``O_NONBLOCK`` and ``fstat`` on the open descriptor, so a FIFO swapped in after the check still
cannot block); files their owners read (``RunFolder``, ``Results.load``, ``rmae.load_model``,
PIL) are opened by them right after the check, by the path the check resolved. Folders go
through :meth:`RunsRoot.folder`. Nothing is checked by listing a folder ahead of time, so there
is no window an attacker can hide a symlink behind, and no render lists a large folder: listings
(:meth:`RunsRoot.listdir`) are bounded and only choose what to show. What is left is the race of
someone writing inside the root who swaps a checked file for a symlink between the check and the
open (closing it needs ``openat``-style opening inside the owners).

Run folders: what a run folder holds and how its files parse is :class:`rmae.runfolder.RunFolder`'s
business; :meth:`RunsRoot.run_config`, :meth:`RunsRoot.run_metrics` and :meth:`RunsRoot.weights`
check each file it will open just before it does. Studies (``rmae study``): a folder holding
``study.json``; its runs are ``STUDY/runs/NAME`` and their analyses ``STUDY/analysis/NAME``
(the layout of :mod:`analysis.study.plan`). A study's ``results.json`` records each run folder as
the path ``rmae study`` was given; only its last component (the run's name) is used, looked up
in the study's own ``runs/`` (:meth:`RunsRoot.study_run`), so a study that was moved still shows
its runs and a recorded path elsewhere is never opened.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from analysis.results import MAX_RESULTS_BYTES
from rmae.errors import RunFolderError, UserError
from rmae.io import read_regular
from rmae.runfolder import RunFolder
from rmae.settings import MAX_YAML_BYTES, ConfigError, load_yaml_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
REPORTS_DIR = "reports"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
#: entries read from one folder when listing it (discovery, image folders, figures, probe files)
MAX_ENTRIES = 2000
#: bytes the dashboard reads, by kind of file
LIMITS = {"results file": MAX_RESULTS_BYTES, "run config": MAX_YAML_BYTES, "checkpoint pointer": 64 * 1024,
          "training log": 64 * 2**20, "probe result": 1 * 2**20, "figure": 16 * 2**20, "image": 64 * 2**20}


class UnsafePathError(UserError, ValueError):
    """A path that resolves outside the runs root (``..``, absolute paths, escaping symlinks)."""


class RootFileError(UserError, ValueError):
    """A path under the root that cannot be read as what it should be: missing, a folder, a FIFO or
    device, too large, not UTF-8, not JSON."""


@dataclass
class SeedRun:
    """One seed of a study configuration, as its ``results.json`` lists it, resolved in the study."""

    configuration: str
    seed: Any
    recorded: str  # the run folder as the study recorded it
    name: str = ""  # the run's name (its folder under STUDY/runs/)
    run: str | None = None  # relative run folder, when it is one
    problem: str | None = None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


class RunsRoot:
    def __init__(self, root: str | os.PathLike):
        p = Path(root).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"runs root {root!s} is not a folder; pass --runs DIR with your run folders "
                                    "(e.g. the output of `rmae demo`)")
        self.root = p.resolve(strict=True)

    def __repr__(self) -> str:
        return f"RunsRoot({str(self.root)!r})"

    # -- confinement ---------------------------------------------------------------------------

    def _lexical(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        return Path(os.path.normpath(p if p.is_absolute() else self.root / p))

    def is_within(self, p: Path) -> bool:
        """Whether a resolved path lies in the root (no resolution here: see :meth:`inside`)."""
        return p == self.root or p.is_relative_to(self.root)

    def shown(self, path: str | os.PathLike) -> str:
        """How a path is named in messages: relative to the root when it lies (lexically) inside."""
        p = self._lexical(path)
        return self.rel(p) if self.is_within(p) else str(path)

    def inside(self, path: str | os.PathLike) -> Path:
        """Resolve ``path`` (relative to the root, or absolute) and refuse it if it leaves the root."""
        p = Path(path)
        full = p if p.is_absolute() else self.root / p
        shown = self.shown(path)
        try:
            real = full.resolve()  # ".." after a symlink is resolved as the system would
        except (OSError, RuntimeError):  # a symlink loop
            raise RootFileError(f"{shown}: a symlink loop (refused)") from None
        if self.is_within(real):
            return real
        if not self.is_within(self._lexical(path)):
            raise UnsafePathError(f"{shown}: outside the runs root {self.root} (refused)")
        raise UnsafePathError(f"{shown}: a symlink leaving the runs root (refused: the dashboard reads only "
                              "files under the runs root)")

    def is_inside(self, path: str | os.PathLike) -> bool:
        try:
            self.inside(path)
            return True
        except UserError:
            return False

    def file(self, path: str | os.PathLike, kind: str = "file") -> Path:
        """The resolved path of a regular file under the root, within the size limit of its
        ``kind`` (:data:`LIMITS`), or :class:`UnsafePathError` / :class:`RootFileError`."""
        real = self.inside(path)
        shown = self.shown(path)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise RootFileError(f"{shown}: no such file") from None
        except OSError as e:
            raise RootFileError(f"{shown}: cannot be read ({e.strerror})") from None
        if stat.S_ISDIR(st.st_mode):
            raise RootFileError(f"{shown}: is a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise RootFileError(f"{shown}: not a regular file (a FIFO, device or socket); refused")
        limit = LIMITS.get(kind)
        if limit is not None and st.st_size > limit:
            raise RootFileError(f"{shown}: {_size(st.st_size)}, more than the {_size(limit)} the dashboard reads "
                                f"for a {kind} (refused)")
        return real

    def folder(self, path: str | os.PathLike) -> Path:
        """The resolved path of a folder under the root, or :class:`UnsafePathError` / :class:`RootFileError`."""
        real = self.inside(path)
        if not real.is_dir():
            raise RootFileError(f"{self.shown(path)}: {'not a folder' if real.exists() else 'no such folder'}")
        return real

    def read_bytes(self, path: str | os.PathLike, kind: str = "file") -> bytes:
        real = self.file(path, kind)
        try:
            return read_regular(real, LIMITS.get(kind, LIMITS["results file"]))
        except (OSError, ValueError) as e:  # changed since the check
            raise RootFileError(f"{self.shown(path)}: cannot be read ({type(e).__name__})") from None

    def read_json(self, path: str | os.PathLike, kind: str = "file") -> Any:
        shown = self.shown(path)
        try:
            return json.loads(self.read_bytes(path, kind).decode("utf-8"))
        except UnicodeDecodeError:
            raise RootFileError(f"{shown}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise RootFileError(f"{shown}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except RecursionError:
            raise RootFileError(f"{shown}: nested too deeply to read") from None

    def listdir(self, path: str | os.PathLike, limit: int = MAX_ENTRIES) -> tuple[list[Path], bool]:
        """Up to ``limit`` entries of a folder under the root, sorted by name (unresolved: open
        each through :meth:`file` / :meth:`folder`), and whether there were more."""
        real = self.folder(path)
        names: list[str] = []
        more = False
        try:
            with os.scandir(real) as it:
                for e in it:
                    if len(names) >= limit:
                        more = True
                        break
                    names.append(e.name)
        except OSError:
            return [], False
        return [real / n for n in sorted(names)], more

    def images_in(self, rel_folder: str, limit: int = 500) -> list[str]:
        """Image files directly inside an image folder (relative names; each is checked when opened)."""
        entries, _ = self.listdir(rel_folder)
        return [self.rel(e) for e in entries if e.suffix.lower() in IMAGE_EXTENSIONS][:limit]

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix() or "."
        except ValueError:
            return str(path)

    def relativize(self, message: str) -> str:
        """An owner's message naming files by absolute path, with the root's prefix dropped."""
        return message.replace(str(self.root) + os.sep, "")

    # -- run folders ---------------------------------------------------------------------------

    def run_folder(self, name: str | os.PathLike) -> RunFolder:
        """The run folder ``name`` (relative to the root), resolved and checked now, at use."""
        return RunFolder(self.folder(name))

    def run_config(self, run: RunFolder) -> dict[str, Any]:
        """``config.yaml`` of a run (a regular file under the root, parsed by :mod:`rmae.settings`)."""
        try:
            return load_yaml_file(self.file(run.config_path, "run config"), "run config")
        except ConfigError as e:
            raise RunFolderError(self.relativize(str(e))) from None

    def run_metrics(self, run: RunFolder) -> tuple[list[dict], int]:
        """``metrics.jsonl`` of a run → (records, unreadable lines); no log → ``([], 0)``."""
        if not os.path.lexists(run.metrics_path):
            return [], 0
        self.file(run.metrics_path, "training log")
        return run.read_metrics()

    def weights(self, run: RunFolder) -> Path:
        """The weights file the run's ``latest.json`` (or its layout) names, checked now: the
        pointer and the ``checkpoints/`` folder :meth:`RunFolder.weights_path` reads, then the
        file it picks — the file ``rmae.load_model`` of this folder opens."""
        if os.path.lexists(run.checkpoints):
            self.inside(run.checkpoints)
        if os.path.lexists(run.latest_path):
            self.file(run.latest_path, "checkpoint pointer")
        if os.path.lexists(run.model_path):  # rmae skips one that is not a regular file: say why here
            self.file(run.model_path, "weights")
        try:
            path = run.weights_path()
        except RunFolderError as e:
            raise RunFolderError(self.relativize(str(e))) from None
        return self.file(path, "weights")

    def report_dir(self, name: str) -> Path:
        """``<root>/reports/<name>`` for a user-typed report name (a plain name only)."""
        if not NAME_RE.match(name or ""):
            raise UnsafePathError(f"report name {name!r}: use letters, digits, '_', '-' or '.' (up to 64), "
                                  "e.g. mae-vs-rmae")
        return self.inside(Path(REPORTS_DIR) / name)

    def results_file(self, report: str) -> Path:
        """``<report>/results.json``, checked (regular, within the results limit)."""
        return self.file(Path(report) / "results.json", "results file")

    # -- studies -------------------------------------------------------------------------------

    def study_run(self, study: str, configuration: str, seed: Any, recorded: Any) -> SeedRun:
        """A run folder a study's ``results.json`` lists, looked up in the study's ``runs/`` by its
        name (see module docstring); ``problem`` says why it cannot be shown."""
        out = SeedRun(configuration, seed, str(recorded))
        if not isinstance(recorded, str) or not recorded:
            out.problem = f"run folder {str(recorded)[:80]!r} is not a path; left out"
            return out
        p = PurePosixPath(recorded)
        if p.parent.name != "runs" or not NAME_RE.match(p.name):
            out.problem = (f"{recorded[:200]}: not a run folder of this study (its runs are {study}/runs/NAME); "
                           "left out")
            return out
        out.name = p.name
        rel = f"{study}/runs/{p.name}"
        try:
            folder = self.folder(rel)
        except UserError as e:
            out.problem = str(e)
            return out
        if not RunFolder(folder).is_run():
            out.problem = f"{rel}: not a run folder (no config.yaml, marker or weights)"
            return out
        out.run = rel
        return out

    def study_analysis(self, study: str, name: str) -> str:
        """The relative path of a study run's analysis (``STUDY/analysis/NAME/results.json``)."""
        return f"{study}/analysis/{name}/results.json"
