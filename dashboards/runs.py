"""The runs root: the only part of the file system the dashboard reads.

Every path the app opens goes through :meth:`RunsRoot.inside`, which resolves it (symlinks
included) and refuses anything that ends up outside the root — paths typed by nobody (widgets
carry names chosen from what :meth:`RunsRoot.discover` found, resolved again when used) and paths
that come from files (the weights file ``checkpoints/latest.json`` names). A run folder whose files
are symlinks leaving the root is refused as a whole (:meth:`RunsRoot.check_run`), so the model
loader never follows them.

What a run folder holds and how its files read is :class:`rmae.runfolder.RunFolder`'s business;
this module only decides whether the dashboard may open them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from rmae.errors import RunFolderError, UserError
from rmae.runfolder import RunFolder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: folders never searched for runs or images
SKIP_DIRS = {"__pycache__", "node_modules", ".git", "cache", ".cache", "checkpoints", "figures"}
REPORTS_DIR = "reports"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
#: entries of checkpoints/ and analysis/ checked per run (a folder of thousands is not a run)
MAX_CHECKED = 500


class UnsafePathError(UserError, ValueError):
    """A path that resolves outside the runs root (``..``, absolute paths, escaping symlinks)."""


@dataclass
class RunEntry:
    """A run folder found under the root. ``name`` is its path relative to the root."""

    name: str
    path: Path
    family: str | None = None
    model: str | None = None
    img_size: int | None = None
    problem: str | None = None  # why it cannot be used, shown as an error when selected

    @property
    def label(self) -> str:
        what = self.model or self.family or "?"
        return f"{self.name}  ({what})" if not self.problem else f"{self.name}  (unreadable)"


@dataclass
class Discovery:
    runs: list[RunEntry] = field(default_factory=list)
    image_folders: list[str] = field(default_factory=list)  # relative names
    reports: list[str] = field(default_factory=list)  # relative names of folders holding results.json
    rejected: list[str] = field(default_factory=list)  # "name → target" of escaping symlinks


def looks_like_run(path: Path) -> bool:
    """A run folder, or a folder with ``checkpoints/`` but no pointer: shown (and its loading
    error explained when selected) rather than hidden."""
    run = RunFolder(path)
    return run.is_run() or run.checkpoints.is_dir()


class RunsRoot:
    def __init__(self, root: str | os.PathLike):
        p = Path(root).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"runs root {root!s} is not a folder; pass --runs DIR with your run folders "
                                    "(e.g. the output of `rmae demo`)")
        self.root = p.resolve(strict=True)

    def __repr__(self) -> str:
        return f"RunsRoot({str(self.root)!r})"

    # -- safety --------------------------------------------------------------------------------

    def inside(self, rel: str | os.PathLike) -> Path:
        """Resolve ``rel`` (relative to the root, or absolute) and refuse it if it leaves the root."""
        rel = Path(rel)
        p = (rel if rel.is_absolute() else self.root / rel).resolve()
        if p != self.root and not p.is_relative_to(self.root):
            raise UnsafePathError(f"{rel}: outside the runs root {self.root} (refused)")
        return p

    def is_inside(self, path: str | os.PathLike) -> bool:
        try:
            self.inside(path)
            return True
        except (UnsafePathError, OSError, RuntimeError):
            return False

    def check_run(self, path: Path) -> None:
        """Refuse a run folder if any file the loaders may read resolves outside the root."""
        run = RunFolder(path)
        candidates = [run.config_path, run.metrics_path, run.model_path]
        for d in (run.checkpoints, run.analysis):
            if d.is_symlink() and not self.is_inside(d):
                raise UnsafePathError(f"{self.rel(path)}/{d.name} is a symlink leaving the runs root (refused)")
            if d.is_dir():
                candidates.extend(sorted(d.iterdir())[:MAX_CHECKED])
        for c in candidates:
            if (c.exists() or c.is_symlink()) and not self.is_inside(c):
                raise UnsafePathError(f"{self.rel(path)}/{c.relative_to(path)} is a symlink leaving the runs root "
                                      "(refused: the dashboard reads only files under --runs)")

    def run_folder(self, name: str) -> RunFolder:
        """The run folder ``name`` (relative to the root), resolved and checked now, at use."""
        path = self.inside(name)
        self.check_run(path)
        return RunFolder(path)

    def weights(self, run: RunFolder) -> Path:
        """The weights file the run's ``latest.json`` (or its layout) names, confined to the root."""
        return self.inside(run.weights_path())

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix() or "."
        except ValueError:
            return str(path)

    def report_dir(self, name: str) -> Path:
        """``<root>/reports/<name>`` for a user-typed report name (a plain name only)."""
        if not NAME_RE.match(name or ""):
            raise UnsafePathError(f"report name {name!r}: use letters, digits, '_', '-' or '.' (up to 64), "
                                  "e.g. mae-vs-rmae")
        return self.inside(Path(REPORTS_DIR) / name)

    # -- discovery ----------------------------------------------------------------------------

    def discover(self, max_depth: int = 3, limit: int = 300) -> Discovery:
        """Run folders, image folders and report folders under the root (breadth-first, no
        descent into run folders, hidden folders or :data:`SKIP_DIRS`; symlinks followed only
        while they stay inside the root)."""
        found = Discovery()
        seen: set[Path] = set()
        queue: list[tuple[Path, int]] = [(self.root, 0)]
        while queue and len(found.runs) < limit:
            folder, depth = queue.pop(0)
            try:
                entries = sorted(folder.iterdir(), key=lambda e: e.name)
            except OSError:
                continue
            has_images = False
            for e in entries:
                if e.name.startswith("."):
                    continue
                try:
                    if e.is_file():
                        has_images = has_images or e.suffix.lower() in IMAGE_EXTENSIONS
                        if e.name == "results.json" and folder != self.root:
                            found.reports.append(self.rel(folder))
                        continue
                    if not e.is_dir() or e.name in SKIP_DIRS:
                        continue
                    real = e.resolve()
                except OSError:
                    continue
                if real != self.root and not real.is_relative_to(self.root):
                    found.rejected.append(f"{self.rel(e)} → {real}")
                    continue
                if real in seen:
                    continue
                seen.add(real)
                if looks_like_run(e):
                    found.runs.append(self._entry(e))
                    res = RunFolder(e).analysis_dir("results.json")
                    if res.is_file() and self.is_inside(res):
                        found.reports.append(self.rel(res.parent))
                elif depth + 1 <= max_depth:
                    queue.append((e, depth + 1))
            if has_images and folder != self.root and len(found.image_folders) < limit:
                found.image_folders.append(self.rel(folder))
        found.runs.sort(key=lambda r: r.name)
        found.reports = sorted(set(found.reports))
        return found

    def _entry(self, path: Path) -> RunEntry:
        entry = RunEntry(self.rel(path), path)
        try:
            self.check_run(path)
            run = RunFolder(path)
            if not run.config_path.exists():
                return entry
            cfg = run.read_config()
            mc = run.model_config()
        except UnsafePathError as e:
            entry.problem = str(e)
            return entry
        except RunFolderError as e:  # its message names the file by absolute path: show the run's name
            entry.problem = str(e).replace(str(path), entry.name)
            return entry
        if isinstance(mc, dict):
            entry.family = mc.get("family")
            entry.model = mc.get("name") or cfg.get("model")
            entry.img_size = mc.get("img_size")
        else:
            entry.model = cfg.get("model")
        return entry

    def images_in(self, rel_folder: str, limit: int = 500) -> list[str]:
        """Image files directly inside an image folder (names relative to the root)."""
        folder = self.inside(rel_folder)
        out = []
        for e in sorted(folder.iterdir(), key=lambda e: e.name):
            if e.suffix.lower() in IMAGE_EXTENSIONS and e.is_file() and self.is_inside(e):
                out.append(self.rel(e))
                if len(out) >= limit:
                    break
        return out
