"""On-disk cache of region label maps: compressed, ≥16-bit, content- and parameter-keyed, atomic.

Layout: ``<cache_dir>/<source name>/<key[:2]>/<key>.npz`` holding one array ``labels``
``[S, H, W]`` (S scales) as ``uint16`` when every label fits, else ``uint32`` — never ``uint8``,
which silently merges segments beyond 255 (the defect of the official R-MAE cache).

The key is ``blake2b(image bytes, shape) ⊕ source fingerprint`` where the fingerprint hashes the
source's name, parameters and version (plus any extra inputs such as a ground-truth map), so a
changed parameter or a changed image can never read a stale map. Writes go to a temporary file
in the same folder and are renamed into place, so a killed process or two workers writing the
same entry never leave a half-written file.

An entry counts as cached only once it has been verified: a regular file, a readable ``.npz``
whose ``labels`` header says ``[S, H, W]`` of the image's own size (S ≤ :data:`MAX_CACHED_SCALES`)
in ``uint16``/``uint32`` — checked before any data is decompressed, so a damaged or hostile
entry is a miss (recomputed and rewritten), never a crash or a zip bomb. A cache folder that
cannot be written is one clear :class:`~rmae.data.base.DataError` for ``rmae regions
precompute`` (whose whole job is writing it) and one warning for training, which then computes
region maps without caching them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..io import OutputPathError, atomic_write, open_regular
from .base import DataError

#: The most scales a cached entry may hold (a source has at most 8; see rmae.data.regions).
MAX_CACHED_SCALES = 16
_LABEL_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32))


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
    """``np.savez_compressed`` by :func:`rmae.io.atomic_write` (not fsynced: a cache is recomputed when lost)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a name
            np.savez_compressed(f, **arrays)

    atomic_write(path, write, durable=False)


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]] | None:
    """``{array name: (shape, dtype)}`` of an ``.npz`` read from the headers alone (nothing is
    decompressed beyond them), or None if the file is missing, not regular or not an npz."""
    try:
        with open_regular(path) as f, zipfile.ZipFile(f) as z:
            out = {}
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    return None
                with z.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read = {(1, 0): np.lib.format.read_array_header_1_0,
                            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read is None:
                        return None
                    shape, _, dtype = read(member)
                out[info.filename[:-4]] = (tuple(shape), dtype)
            return out
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError):
        return None


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an ``.npz`` file, or None if it is missing, not a regular file or unreadable."""
    try:
        with open_regular(path) as f, np.load(f, allow_pickle=False) as z:
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
    """Get/put region label stacks ``[S, H, W]`` by key (see module docstring).

    ``must_write``: a failed write is a :class:`DataError` (precompute); otherwise the first
    failure prints one warning and later entries are computed without being cached (training).
    """

    def __init__(self, root: str | Path | None = None, must_write: bool = False) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.must_write = must_write
        self.writable = True
        self.hits = 0
        self.misses = 0

    def path(self, source_name: str, key: str) -> Path:
        return self.root / source_name / key[:2] / f"{key}.npz"

    def valid(self, source_name: str, key: str, hw: tuple[int, int]) -> bool:
        """Whether the entry's header is that of labels ``[S, *hw]`` (see module docstring)."""
        headers = npz_headers(self.path(source_name, key))
        if headers is None or set(headers) != {"labels"}:
            return False
        shape, dtype = headers["labels"]
        return (len(shape) == 3 and 1 <= shape[0] <= MAX_CACHED_SCALES and tuple(shape[1:]) == tuple(hw)
                and dtype in _LABEL_DTYPES)

    def get(self, source_name: str, key: str, hw: tuple[int, int]) -> np.ndarray | None:
        """``int32 [S, *hw]`` labels of a verified entry, else None (a miss)."""
        data = load_npz(self.path(source_name, key)) if self.valid(source_name, key, hw) else None
        if data is None or "labels" not in data:
            self.misses += 1
            return None
        self.hits += 1
        return data["labels"].astype(np.int32)

    def not_writable(self, err: OSError | OutputPathError) -> str:
        return (f"cache folder {self.root} is not writable ({getattr(err, 'strerror', None) or err}); pass --cache DIR "
                "or region_cache=DIR (or region_cache=none)")

    def check_writable(self) -> None:
        """:class:`DataError` now, rather than after the first computed entry, if the cache
        folder cannot be created or written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".rmae-write-check.", suffix=".tmp")
            os.close(fd)
            os.unlink(tmp)
        except OSError as err:
            raise DataError(self.not_writable(err)) from None

    def put(self, source_name: str, key: str, labels: np.ndarray) -> None:
        if not self.writable:
            return
        try:
            atomic_save_npz(self.path(source_name, key), labels=compact_labels(labels))
        except (OSError, OutputPathError) as err:  # OutputPathError: a link or folder planted at an entry
            if self.must_write:
                raise DataError(self.not_writable(err)) from None
            self.writable = False
            print(f"rmae.data: {self.not_writable(err)}; region maps are computed but not cached",
                  file=sys.stderr, flush=True)

    def __repr__(self) -> str:
        return f"RegionCache({str(self.root)!r})"
