"""Run folders: the unit every tool exchanges, and the one module that knows their layout.

    RUN/
      .rmae-run                         marker: this folder is an rmae run (JSON: kind, created)
      config.yaml                       resolved settings + model_config (rebuilds the model)
      metrics.jsonl                     one JSON object per logging step
      model.safetensors                 weights of an imported run
      checkpoints/step_000100.safetensors   weights (+ model config in the metadata)
      checkpoints/step_000100.state.pt      optimizer, scaler, RNG, data position — tensors and
                                            plain containers only (torch.load(weights_only=True))
      checkpoints/latest.json           points at the newest complete pair; written last
      figures/recon_step_000100.png     reconstructions (masked | prediction | original)
      tensorboard/                      event files (losses, lr, throughput, reconstructions)
      analysis/…                        feature caches, probe results (written by ``analysis``)

Training, checkpoint loading, analysis, the dashboard and the notebooks all go through
:class:`RunFolder`; nobody else builds these paths. Every file is written atomically (temp file,
fsync, rename) and ``latest.json`` moves only after both files of a checkpoint are complete, so a
run killed at any instant resumes from a whole checkpoint. A writer holds an exclusive lock
(:meth:`RunFolder.lock`), so two processes can never interleave their files in one folder.

Reading is confined by construction: the weights file ``latest.json`` names must be a plain file
name inside ``checkpoints/`` and a regular file; small files are read with a size limit. Writing
never goes through a link: files are replaced atomically (a symlink, device or folder in their
place is refused) and the two files written in place, ``metrics.jsonl`` and the lock, are opened
with ``O_NOFOLLOW``. A user's folder (files, but no marker and no config rmae wrote) is never
written into.

(Over 400 lines on purpose: this is the one owner of the run-folder format, reading and writing.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import re
import stat
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from .errors import RunFolderError
from .io import (MAX_TEXT_BYTES, atomic_write, atomic_write_json, atomic_write_text, is_regular_file, open_regular,
                 read_regular, read_text)

MARKER = ".rmae-run"
LOCK = ".rmae-lock"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
MODEL = "model.safetensors"
LATEST = "latest.json"
CONFIG_HEADER = "# written by rmae; edit a copy, not this file (it rebuilds the model)\n"
_STEP_RE = re.compile(r"^step_(\d{6,})\.(safetensors|state\.pt)$")
_PLAIN_NAME_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$")  # a file name, no path
#: metrics.jsonl may be long (one line per logging step), but not unbounded
MAX_METRICS_BYTES = 256 * 2**20
#: entries of checkpoints/ looked at when no latest.json names the weights
MAX_CHECKPOINT_ENTRIES = 100_000


def file_digest(path: str | os.PathLike, _memo: dict[tuple, str] = {}) -> str:  # noqa: B006 - per-process memo
    """SHA-256 of a file's bytes, memoised per process on (path, size, mtime, inode) — any rewrite
    changes one of them — so a ViT-B checkpoint is hashed once per process (~0.3 s)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _memo:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _memo[key] = h.hexdigest()
    return _memo[key]


def _open_own_file(path: Path, flags: int) -> int:
    """A descriptor of a file rmae appends to or locks in place (created if missing), refusing a
    symlink, FIFO or device there: a run folder from elsewhere could point ``metrics.jsonl`` or
    the lock file at any of the user's files, which would then be written through."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError:
        if os.path.islink(path):
            raise RunFolderError(f"{path}: is a symbolic link; rmae writes only its own plain files in a run folder "
                                 "— remove the link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunFolderError(f"{path}: is not a regular file (a device, pipe or socket); remove it")
    return fd


class RunFolder:
    """The files of one run (see module docstring). Cheap to construct; nothing is read until asked."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.marker = self.root / MARKER
        self.config_path = self.root / CONFIG
        self.metrics_path = self.root / METRICS
        self.model_path = self.root / MODEL
        self.checkpoints = self.root / "checkpoints"
        self.latest_path = self.checkpoints / LATEST
        self.figures = self.root / "figures"
        self.tensorboard = self.root / "tensorboard"
        self.analysis = self.root / "analysis"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # -- identity ------------------------------------------------------------------------------

    def is_run(self) -> bool:
        """A folder rmae made: its marker, or (older runs) a latest.json, a model file or a
        config.yaml that rmae wrote (a user's own config.yaml does not make a folder a run)."""
        return self.root.is_dir() and (self.marker.is_file() or self.latest_path.is_file()
                                       or self.model_path.is_file() or self._config_written_by_rmae())

    def _config_written_by_rmae(self) -> bool:
        try:
            with open_regular(self.config_path) as f:
                return f.read(len(CONFIG_HEADER)) == CONFIG_HEADER.encode()
        except (OSError, ValueError):
            return False

    def refuse_foreign(self) -> "RunFolder":
        """Raise :class:`RunFolderError` if the path is anything but a run, an empty folder or
        nothing: a file, or a folder of the user's files, is not ours to write into."""
        if self.root.exists() and not self.root.is_dir():
            raise RunFolderError(f"{self.root}: exists and is not a folder; choose another --out")
        if self.holds_foreign_files():
            raise RunFolderError(f"{self.root}: is a folder with files that is not an rmae run; refusing to write "
                                 "into it (nothing was changed) — choose a new or empty folder for --out")
        return self

    def create(self, kind: str = "pretrain") -> "RunFolder":
        """Make the folder (or reuse it if it is already a run); see :meth:`refuse_foreign`."""
        self.refuse_foreign()
        for d in (self.root, self.checkpoints, self.figures):
            d.mkdir(parents=True, exist_ok=True)
        if not self.marker.is_file():
            atomic_write_json(self.marker, {"format": "rmae-run", "version": 1, "kind": kind,
                                            "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return self

    def holds_foreign_files(self) -> bool:
        """True for an existing folder with files that is not a run (only our lock file is ignored)."""
        return self.root.is_dir() and not self.is_run() and any(p.name != LOCK for p in self.root.iterdir())

    @contextlib.contextmanager
    def lock(self) -> Iterator["RunFolder"]:
        """Exclusive writer lock (``flock`` on ``RUN/.rmae-lock``, released when the process dies).
        A second writer gets one clear :class:`RunFolderError` at once instead of waiting. A
        folder the lock itself created is removed again if the writer failed before putting
        anything in it (a config error leaves no empty run behind)."""
        self.refuse_foreign()
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        fd = _open_own_file(self.root / LOCK, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                except OSError:
                    holder = "?"
                raise RunFolderError(f"{self.root}: another rmae process (pid {holder}) is writing this run; wait "
                                     "for it to finish, or use another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield self
        finally:
            os.close(fd)  # closing the descriptor releases the lock
            if created and [p.name for p in self.root.iterdir()] == [LOCK]:
                with contextlib.suppress(OSError):
                    (self.root / LOCK).unlink()
                    self.root.rmdir()

    # -- config --------------------------------------------------------------------------------

    def write_config(self, flat: dict[str, Any], model_config: dict[str, Any] | None) -> None:
        doc = dict(flat)
        if model_config is not None:
            doc["model_config"] = model_config
        text = CONFIG_HEADER + yaml.safe_dump(doc, sort_keys=False)
        atomic_write_text(self.config_path, text)

    def read_config(self) -> dict[str, Any]:
        """``config.yaml`` as a mapping (aliases refused, size bounded)."""
        from .settings import ConfigError, load_yaml_file

        if not self.config_path.exists():
            raise RunFolderError(f"{self.root}: not a run folder (no {CONFIG}); train one with `rmae pretrain` "
                                 "or make one with `rmae import`")
        try:
            return load_yaml_file(self.config_path, "run config")
        except ConfigError as e:
            raise RunFolderError(str(e)) from None

    def model_config(self) -> dict[str, Any] | None:
        """The ``model_config`` mapping of ``config.yaml`` (None when the folder has no config)."""
        if not self.config_path.exists():
            return None
        mc = self.read_config().get("model_config")
        if mc is not None and not isinstance(mc, dict):
            raise RunFolderError(f"{self.config_path}: model_config must be a mapping, got {type(mc).__name__}")
        return mc

    # -- metrics -------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` (flushed and fsynced: a crash loses at most it)."""
        with os.fdopen(_open_own_file(self.metrics_path, os.O_WRONLY | os.O_APPEND), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self, limit: int = 200_000) -> tuple[list[dict[str, Any]], int]:
        """``metrics.jsonl`` → (records, number of unreadable lines skipped). A run still being
        written may end in a partial line: skipped, not fatal. At most ``limit`` lines."""
        if not self.metrics_path.exists():
            return [], 0
        try:
            text = read_regular(self.metrics_path, MAX_METRICS_BYTES).decode("utf-8", errors="replace")
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{self.metrics_path}: cannot be read ({e})") from None
        rows, bad = [], 0
        for i, line in enumerate(text.splitlines()):
            if i >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(obj, dict):
                rows.append(obj)
            else:
                bad += 1
        return rows, bad

    def truncate_metrics(self, after_step: int) -> None:
        """Drop lines logged after ``after_step`` (a resumed run logs them again)."""
        rows, _ = self.read_metrics()
        kept = [r for r in rows if isinstance(r.get("step", 0), (int, float)) and r.get("step", 0) <= after_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    # -- weights -------------------------------------------------------------------------------

    def latest(self) -> dict[str, Any] | None:
        """``checkpoints/latest.json``, validated: ``{"step": int, "weights": NAME, "state": NAME}``
        with plain file names inside ``checkpoints/``; None when there is no pointer."""
        if not self.latest_path.exists():
            return None
        try:
            doc = json.loads(read_text(self.latest_path, 64 * 1024))
        except (ValueError, OSError) as e:
            why = {UnicodeDecodeError: "not UTF-8", json.JSONDecodeError: "not JSON"}.get(
                type(e), str(e).replace(f"{self.latest_path}: ", ""))
            raise RunFolderError(f"{self.latest_path}: unreadable ({why}); delete it to fall back to the "
                                 "newest checkpoint") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("weights"), str) \
                or not isinstance(doc.get("step", 0), int) or isinstance(doc.get("step", 0), bool):
            raise RunFolderError(f"{self.latest_path}: not a checkpoint pointer (needs step and weights); delete it "
                                 "to fall back to the newest checkpoint")
        for key in ("weights", "state"):
            name = doc.get(key)
            if name is None and key == "state":
                continue
            if not isinstance(name, str) or not _PLAIN_NAME_RE.match(name) \
                    or (key == "weights" and not name.endswith(".safetensors")):
                raise RunFolderError(f"{self.latest_path}: {key}={name!r} is not a file name inside checkpoints/ "
                                     "(refused); delete latest.json to fall back to the newest checkpoint")
        return doc

    def weights_path(self) -> Path:
        """The weights file :func:`rmae.load_model` reads: ``latest.json``'s, else
        ``model.safetensors``, else the newest ``checkpoints/step_*.safetensors``."""
        if not self.root.is_dir():
            raise RunFolderError(f"{self.root}: no such run folder")
        latest = self.latest()
        if latest is not None:
            p = self.checkpoints / latest["weights"]
            if is_regular_file(p) and not p.is_symlink():
                return p
        for p in (self.model_path, self.checkpoints / "last.safetensors"):
            if is_regular_file(p):
                return p
        steps = self.checkpoint_steps()
        if not steps:
            raise RunFolderError(f"{self.root}: a run folder without weights (no {MODEL} or checkpoints/step_*.safetensors); "
                                 "train it first or import a checkpoint into it")
        return self.checkpoints / f"step_{steps[-1]:06d}.safetensors"

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete-looking ``checkpoints/step_N.safetensors`` files, ascending."""
        if not self.checkpoints.is_dir():
            return []
        steps = set()
        for i, p in enumerate(self.checkpoints.iterdir()):
            if i >= MAX_CHECKPOINT_ENTRIES:  # a folder of millions of entries is not a trainer's
                break
            m = _STEP_RE.match(p.name)
            if m and m.group(2) == "safetensors" and is_regular_file(p):
                steps.add(int(m.group(1)))
        return sorted(steps)

    def digest(self) -> str:
        """Identity of what the run's model computes: SHA-256 over the weights file's bytes and
        the folder's ``model_config`` (which wins over the file's own config when both exist) —
        or, for a foreign encoder, its recorded timm ``arch`` (size and resampling rule included)."""
        h = hashlib.sha256(file_digest(self.weights_path()).encode())
        mc = self.model_config()
        if mc is not None:
            h.update(json.dumps(mc, sort_keys=True, default=str).encode())
        elif self.config_path.exists() and (arch := self.read_config().get("arch")) is not None:
            h.update(json.dumps(arch, sort_keys=True, default=str).encode())
        return h.hexdigest()

    # -- checkpoints (the trainer's) -----------------------------------------------------------

    def save_checkpoint(self, model, state: dict[str, Any], step: int, keep: int = 2) -> Path:
        import torch

        from .checkpoint import save_model

        name = f"step_{step:06d}"
        weights = self.checkpoints / f"{name}.safetensors"
        state_file = self.checkpoints / f"{name}.state.pt"
        save_model(model, weights, metadata={"step": str(step)})
        atomic_write(state_file, lambda tmp: torch.save(state, tmp))
        atomic_write_json(self.latest_path, {"step": step, "weights": weights.name, "state": state_file.name}, indent=None)
        self._prune(keep)
        return weights

    def load_state(self) -> tuple[Path, dict[str, Any]] | None:
        """(weights path, trainer state) of the latest checkpoint, or None without one."""
        import torch

        latest = self.latest()
        if latest is None:
            return None
        if latest.get("state") is None:
            raise RunFolderError(f"{self.latest_path}: names no trainer state (an imported run cannot be resumed); "
                                 "start a new run with --out")
        weights = self.checkpoints / latest["weights"]
        state_path = self.checkpoints / latest["state"]
        for p in (weights, state_path):
            if p.is_symlink() or not is_regular_file(p):
                raise RunFolderError(f"{p}: missing or not a regular file (latest.json points at it); delete "
                                     "checkpoints/latest.json to start over, or point it at an older step")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            from .checkpoint import refused_class

            refused = refused_class(e)
            if refused is None:  # damaged bytes, not a refused class
                raise RunFolderError(f"{state_path}: cannot be read (not a torch.save file); delete "
                                     "checkpoints/latest.json to start over, or point it at an older step") from None
            raise RunFolderError(f"{state_path}: refused — it holds pickled objects other than tensors and plain "
                                 f"containers ({refused}; rmae never runs code from a checkpoint); delete "
                                 "checkpoints/latest.json to start over") from None
        except Exception as e:  # noqa: BLE001 - any failure here means an unusable state file
            why = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise RunFolderError(f"{state_path}: cannot be read ({why}); delete "
                                 "checkpoints/latest.json to start over, or point it at an older step") from None
        if not isinstance(state, dict) or not {"optimizer", "step", "rng"} <= set(state) \
                or not isinstance(state["optimizer"], dict) or not isinstance(state["rng"], dict) \
                or not isinstance(state["step"], int) or isinstance(state["step"], bool) or state["step"] < 0:
            raise RunFolderError(f"{state_path}: not a trainer state (needs an optimizer mapping, a step count and "
                                 "an rng mapping); delete checkpoints/latest.json to start over")
        return weights, state

    def clean_partial(self) -> list[str]:
        """Delete temp files a killed save left behind (ours: ``.<name>.*.tmp`` of the files the
        trainer writes; safetensors' own: ``.tmp*``). Nothing refers to them; nothing else is touched."""
        removed = []
        if self.checkpoints.is_dir():
            for p in self.checkpoints.iterdir():
                ours = p.name.startswith((".step_", f".{LATEST}.")) and p.name.endswith(".tmp")
                if (ours or p.name.startswith(".tmp")) and is_regular_file(p) and not p.is_symlink():
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
        return removed

    def _prune(self, keep: int) -> None:
        """Remove the trainer's own older checkpoint pairs (``step_N.safetensors`` /
        ``step_N.state.pt``, names matched exactly), keeping the newest ``keep``."""
        if keep <= 0:
            return
        steps = self.checkpoint_steps()
        for s in steps[:-keep]:
            for suffix in ("safetensors", "state.pt"):
                p = self.checkpoints / f"step_{s:06d}.{suffix}"
                if is_regular_file(p) and not p.is_symlink():
                    p.unlink(missing_ok=True)

    # -- analysis ------------------------------------------------------------------------------

    def analysis_dir(self, *parts: str) -> Path:
        """``RUN/analysis/<parts…>`` (not created). Parts are plain names chosen by the code."""
        for part in parts:
            if not part or "/" in part or part in (".", ".."):
                raise ValueError(f"analysis folder part {part!r} must be a plain name")
        return self.analysis.joinpath(*parts)


def read_metrics_file(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """The tolerant ``metrics.jsonl`` reader for any folder that has one (fine-tuning outputs too)."""
    return RunFolder(path).read_metrics()


__all__ = ["MARKER", "MAX_TEXT_BYTES", "RunFolder", "RunFolderError", "file_digest", "read_metrics_file"]
