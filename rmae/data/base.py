"""The raw-sample contract shared by every dataset, and how bad files are skipped.

A *raw sample* is what a dataset's ``__getitem__`` returns, before any augmentation::

    {
      "image":     np.ndarray uint8 [H, W, 3]   RGB, full resolution
      "key":       str   stable identifier (relative path, COCO file name, "scenes/train/0/17")
      "index":     int   the index that was actually loaded (may differ from the one asked for
                         when a bad file was replaced by the next good one)
      "skipped":   list[(path, reason)]  files skipped producing this sample, and parts of it
                         left out (a malformed COCO annotation); normally empty
      # optional ground truth
      "instances": np.ndarray int32 [H, W]  0 = background, 1..n = visible pixels of instance i
      "classes":   np.ndarray int32 [H, W]  0 = background, 1..C = contiguous category ids
      "instance_classes": np.ndarray int64 [n]  category id of instance i+1
      "boxes":     np.ndarray float32 [n, 4]   (x0, y0, x1, y1), pixels, x1/y1 exclusive
      "label":     int   image-level class in 0..num_classes-1
      "path":      str   file the image came from (absent for generated data)
    }

Bad files never crash an epoch: ``__getitem__`` replaces a sample whose file cannot be read
by the next readable index, prints one warning line per file (per process) and records it in
:class:`SkipLog`. With ``strict=True`` the first bad file raises :class:`BadSampleError`
naming it instead.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from torch.utils.data import Dataset

from ..errors import UserError

Sample = dict[str, Any]


class DataError(UserError):
    """A data problem the user can fix (bad path, bad spec, unreadable file)."""


class BadSampleError(DataError):
    """One file (image, annotation, label map) could not be used."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"{self.path}: {reason} — fix or remove the file, or run without strict mode to skip it"
        )

    def __reduce__(self):  # keep (path, reason) across process boundaries (pool workers)
        return (type(self), (self.path, self.reason))


class SkipLog:
    """Which files were skipped, and why (one entry per file, in this process).

    DataLoader workers each hold their own copy; every sample carries the paths skipped while
    producing it (``sample["skipped"]``), so the main process can merge them back with
    :meth:`merge` (``rmae.data.pipeline.RegionLoader`` does this for you).
    """

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def record(self, path: str, reason: str, *, warn: bool = True) -> None:
        if path not in self.reasons and warn:
            # One line, no traceback: a bad JPEG in a million-image folder is routine.
            print(f"rmae.data: skipping {path}: {reason}", file=sys.stderr)
        self.reasons.setdefault(path, reason)

    def merge(self, entries: dict[str, str] | list[tuple[str, str]]) -> None:
        """Add entries recorded elsewhere (another worker) without warning again."""
        items = entries.items() if isinstance(entries, dict) else entries
        for path, reason in items:
            self.reasons.setdefault(str(path), str(reason))

    @property
    def count(self) -> int:
        return len(self.reasons)

    def summary(self) -> str:
        if not self.reasons:
            return "no files skipped"
        head = "; ".join(f"{p} ({r})" for p, r in list(self.reasons.items())[:5])
        more = f"; … and {self.count - 5} more" if self.count > 5 else ""
        return f"{self.count} file(s) skipped: {head}{more}"


class BaseDataset(Dataset):
    """A map-style dataset of raw samples with bad-file substitution.

    Subclasses implement :meth:`load` (may raise :class:`BadSampleError`) and ``__len__``.
    Class attributes describe the ground truth a subclass provides.
    """

    #: image-level class names (``label`` present) or None
    class_names: list[str] | None = None
    #: category names for ids 1..C of the ``classes`` map, or None
    category_names: list[str] | None = None
    has_instances: bool = False

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.skips = SkipLog()
        self._bad: set[int] = set()

    # -- to implement -------------------------------------------------------------------
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self) -> None:
        """Build per-process resources now (called in the main process before DataLoader
        workers fork, so they inherit them instead of each building its own)."""

    # -- shared -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0

    @property
    def num_categories(self) -> int:
        return len(self.category_names) if self.category_names else 0

    def __getitem__(self, index: int) -> Sample:
        return self.get_with_fallback(index, self.load)

    def get_with_fallback(self, index: int, fn: Callable[[int], Sample]) -> Sample:
        """``fn(index)``, or ``fn`` of the next index whose file is readable.

        Known-bad indices are remembered so a bad file costs one failed decode per process.
        """
        n = len(self)
        if n == 0:
            raise DataError(f"{type(self).__name__} is empty: there is nothing to load")
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n}")
        skipped: list[tuple[str, str]] = []
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                sample = fn(j)
            except BadSampleError as err:
                if self.strict:
                    raise
                self._bad.add(j)
                self.skips.record(err.path, err.reason)
                skipped.append((err.path, err.reason))
                continue
            for path, reason in sample.get("skipped", []):  # parts of the sample (a bad annotation)
                self.skips.record(path, reason)
            sample.setdefault("index", j)
            sample["skipped"] = skipped + sample.get("skipped", [])
            return sample
        raise DataError(
            f"{type(self).__name__}: none of its {n} files could be read ({self.skips.summary()})"
        )

    def summary(self) -> str:
        """One line for the end of an epoch: how many files were skipped and which."""
        return f"{type(self).__name__}: {len(self)} samples, {self.skips.summary()}"
