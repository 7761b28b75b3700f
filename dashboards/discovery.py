"""What is under the runs root: run folders, studies, image folders and reports, found by a bounded
walk (depth, entries per folder, folders per walk) — it only chooses what to show; every file is
checked by :class:`dashboards.runs.RunsRoot` when it is opened.

A folder holding ``study.json`` is a study (``rmae study --out``): its ``runs/`` are its run
folders, grouped under it (:attr:`RunEntry.study`), its ``results.json`` a report; its
``analysis/`` (one analysis per seed) and ``logs/`` are not searched.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from rmae.errors import RunFolderError, UserError
from rmae.runfolder import RunFolder

from .runs import IMAGE_EXTENSIONS, MAX_ENTRIES, RunsRoot

#: folders never searched for runs or images
SKIP_DIRS = {"__pycache__", "node_modules", ".git", "cache", ".cache", "checkpoints", "figures"}
STUDY_FILE = "study.json"  # marks a study folder (analysis.study.study.STUDY_FILE)
#: folders visited by one discovery
MAX_FOLDERS = 5000


@dataclass
class RunEntry:
    """A run folder found under the root. ``name`` is its path relative to the root."""

    name: str
    path: Path
    family: str | None = None
    model: str | None = None
    img_size: int | None = None
    problem: str | None = None  # why it cannot be used, shown as an error when selected
    study: str | None = None  # the study folder it belongs to (relative), if any

    @property
    def short(self) -> str:
        """The run's name within its study (``mae-s0``), or its relative name."""
        return PurePosixPath(self.name).name if self.study else self.name

    @property
    def label(self) -> str:
        name = f"{PurePosixPath(self.study).name} › {self.short}" if self.study else self.name
        what = self.model or self.family or "?"
        return f"{name}  ({what})" if not self.problem else f"{name}  (unreadable)"


@dataclass
class Study:
    """A study folder (``rmae study --out``): its runs (relative names) and whether it has results."""

    name: str
    runs: list[str] = field(default_factory=list)
    has_results: bool = False


@dataclass
class Discovery:
    runs: list[RunEntry] = field(default_factory=list)
    image_folders: list[str] = field(default_factory=list)  # relative names
    reports: list[str] = field(default_factory=list)  # relative names of folders holding results.json
    rejected: list[str] = field(default_factory=list)  # "name → target" of escaping symlinks
    studies: dict[str, Study] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # folders only partly searched (too many entries)


def _entries(root: RunsRoot, folder: Path, found: Discovery) -> list[Path]:
    try:
        entries, more = root.listdir(folder)
    except UserError:
        return []
    if more:
        found.notes.append(f"{root.rel(folder)} has more than {MAX_ENTRIES} entries; only {MAX_ENTRIES} were "
                           "searched (move runs into sub-folders)")
    return entries


def discover(root: RunsRoot, max_depth: int = 3, limit: int = 300) -> Discovery:
    """Run folders, studies, image folders and report folders under the root (breadth-first
    to ``max_depth``, at most :data:`MAX_ENTRIES` entries per folder and :data:`MAX_FOLDERS`
    folders; no descent into run folders, studies, hidden folders or :data:`SKIP_DIRS`;
    symlinks followed only while they stay inside the root)."""
    found = Discovery()
    seen: set[Path] = set()
    queue: list[tuple[Path, int]] = [(root.root, 0)]
    visited = 0
    while queue and len(found.runs) < limit and visited < MAX_FOLDERS:
        folder, depth = queue.pop(0)
        visited += 1
        has_images = False
        for e in _entries(root, folder, found):
            if e.name.startswith("."):
                continue
            try:
                st = os.stat(e)
            except OSError:
                st = None
            if st is None or not stat.S_ISDIR(st.st_mode):
                has_images = has_images or (st is not None and e.suffix.lower() in IMAGE_EXTENSIONS)
                if e.name == "results.json" and folder != root.root:
                    found.reports.append(root.rel(folder))  # a bad one is explained when chosen
                continue
            if e.name in SKIP_DIRS:
                continue
            try:
                real = e.resolve()
            except (OSError, RuntimeError):
                continue
            if not root.is_within(real):
                found.rejected.append(f"{root.rel(e)} → {real}")
                continue
            if real in seen:
                continue
            seen.add(real)
            if (e / STUDY_FILE).is_file():
                _study(root, e, found)
            elif _looks_like_run(e):
                found.runs.append(_entry(root, e))
                if os.path.lexists(RunFolder(e).analysis_dir("results.json")):
                    found.reports.append(root.rel(RunFolder(e).analysis))
            elif depth + 1 <= max_depth:
                queue.append((e, depth + 1))
        if has_images and folder != root.root and len(found.image_folders) < limit:
            found.image_folders.append(root.rel(folder))
    found.runs.sort(key=lambda r: r.name)
    found.reports = sorted(set(found.reports))
    return found


def _study(root: RunsRoot, folder: Path, found: Discovery) -> None:
    """A study folder: its report, and its runs/ (grouped under it)."""
    name = root.rel(folder)
    study = Study(name, has_results=os.path.lexists(folder / "results.json"))
    if study.has_results:
        found.reports.append(name)
    runs = folder / "runs"
    for e in _entries(root, runs, found) if runs.is_dir() else []:
        if e.name.startswith(".") or not e.is_dir():
            continue
        if not root.is_inside(e):
            found.rejected.append(f"{root.rel(e)} → {e.resolve()}")
            continue
        if _looks_like_run(e):
            entry = _entry(root, e)
            entry.study = name
            found.runs.append(entry)
            study.runs.append(entry.name)
    found.studies[name] = study


def _entry(root: RunsRoot, path: Path) -> RunEntry:
    """A run folder's entry: what its config says (types checked), or why it cannot be used."""
    entry = RunEntry(root.rel(path), path)
    run = RunFolder(path)
    try:
        if os.path.lexists(run.config_path):
            cfg = root.run_config(run)
            mc = cfg.get("model_config")
            if isinstance(mc, dict):
                entry.family, entry.img_size = mc.get("family"), mc.get("img_size")
                entry.model = mc.get("name") or cfg.get("model")
            elif mc is not None:
                raise RunFolderError(f"{entry.name}/config.yaml: model_config must be a mapping, got "
                                     f"{type(mc).__name__}")
            else:  # an imported foreign encoder (rmae.foreign): a timm architecture and its source
                entry.model = cfg.get("model")
                entry.family = cfg.get("source_kind")
                arch = cfg.get("arch")
                entry.img_size = arch.get("img_size") if isinstance(arch, dict) else None
        root.weights(run)
    except UserError as e:
        entry.problem = root.relativize(str(e))
    entry.family = entry.family if isinstance(entry.family, str) else None
    entry.model = str(entry.model) if entry.model is not None else None
    entry.img_size = entry.img_size if isinstance(entry.img_size, int) and not isinstance(entry.img_size, bool) \
        else None
    return entry


def _looks_like_run(path: Path) -> bool:
    """A run folder, or a folder with ``checkpoints/`` but no pointer: shown (and its loading
    error explained when selected) rather than hidden."""
    run = RunFolder(path)
    return run.is_run() or run.checkpoints.is_dir()
