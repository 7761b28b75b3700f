"""On-disk cache of region label maps: compressed, ≥16-bit, content- and parameter-keyed, atomic.

Layout: ``<cache_dir>/<source name>/<key[:2]>/<key>.npz`` holding one array ``labels``
``[S, H, W]`` (S scales) as ``uint16`` when every label fits, else ``uint32`` — never ``uint8``,
which silently merges segments beyond 255 (the defect of the official R-MAE cache).

The key is ``blake2b(image bytes, shape) ⊕ source fingerprint`` where the fingerprint hashes the
source's name, parameters and version (plus any extra inputs such as a ground-truth map), so a
changed parameter or a changed image can never read a stale map. Writes go to a temporary file
in the same folder and are renamed into place, so a killed process or two workers writing the
same entry never leave a half-written file; a corrupt entry is treated as a miss.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np


def default_cache_dir() -> Path:
    """``$RMAE_CACHE`` if set, else ``~/.cache/rmae/regions``."""
    env = os.environ.get("RMAE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rmae" / "regions"


def hash_array(arr: np.ndarray, digest_size: int = 16) -> str:
    """Hex digest of an array's dtype, shape and bytes (≈1 GB/s; an 224² image is ~0.15 ms)."""
    h = hashlib.blake2b(digest_size=digest_size)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` to a temp file beside ``path``, then ``os.replace`` onto it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an ``.npz`` file, or None if it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (FileNotFoundError, OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError):
        return None


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Non-negative integer labels in the smallest dtype of at least 16 bits that holds them."""
    top = int(labels.max(initial=0))
    if labels.size and int(labels.min()) < 0:
        raise ValueError("region labels must be non-negative")
    return labels.astype(np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32)


class RegionCache:
    """Get/put region label stacks ``[S, H, W]`` by key (see module docstring)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def path(self, source_name: str, key: str) -> Path:
        return self.root / source_name / key[:2] / f"{key}.npz"

    def get(self, source_name: str, key: str) -> np.ndarray | None:
        data = load_npz(self.path(source_name, key))
        if data is None or "labels" not in data:
            self.misses += 1
            return None
        self.hits += 1
        return data["labels"].astype(np.int32)

    def put(self, source_name: str, key: str, labels: np.ndarray) -> None:
        atomic_save_npz(self.path(source_name, key), labels=compact_labels(labels))

    def __contains__(self, item: tuple[str, str]) -> bool:
        return self.path(*item).is_file()

    def __repr__(self) -> str:
        return f"RegionCache({str(self.root)!r})"
