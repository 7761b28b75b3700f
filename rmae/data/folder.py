"""``folder:PATH`` — every image under a directory, recursively, optionally labelled by sub-folder.

Files are listed once, sorted by relative path (so indices are stable across machines), and
only by extension (:data:`~rmae.data.imageio.IMAGE_EXTENSIONS`, case-insensitive); other files
(``.txt``, ``.json``, hidden files) are ignored and counted in :attr:`ignored`. A file with an
image extension that does not decode is skipped at load time (see :mod:`rmae.data.base`).

Class labels: with ``class_folders=None`` (auto) the first-level sub-folder names become classes
(sorted, as torchvision's ``ImageFolder``) when every image lies inside one and there are at
least two; ``True`` forces it, ``False`` disables it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import BaseDataset, DataError, Sample
from .imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_image


def list_images(root: Path) -> tuple[list[str], int]:
    """Relative POSIX paths of image files under ``root`` (sorted) and how many others there were."""
    found: list[str] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
            else:
                ignored += 1
    return sorted(found), ignored


class ImageFolderDataset(BaseDataset):
    """Images under ``root`` as raw samples (``image``, ``key`` = relative path, ``path``,
    and ``label`` when class folders are used)."""

    def __init__(self, root: str | Path, class_folders: bool | None = None,
                 strict: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(strict=strict)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(
                f"folder:{root}: directory '{self.root}' does not exist — pass a directory of "
                "images, e.g. folder:/data/imagenet/train"
            )
        self.files, self.ignored = list_images(self.root)
        if not self.files:
            raise DataError(
                f"folder:{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{self.root}'"
            )
        self.max_pixels = max_pixels
        tops = sorted({f.split("/", 1)[0] for f in self.files if "/" in f})
        nested = all("/" in f for f in self.files)
        if class_folders is None:
            class_folders = nested and len(tops) >= 2
        elif class_folders and not nested:
            loose = next(f for f in self.files if "/" not in f)
            raise DataError(
                f"folder:{root}: class_folders=True but '{loose}' is not inside a class sub-folder"
            )
        self.class_names = tops if class_folders else None
        self._class_index = {c: i for i, c in enumerate(tops)} if class_folders else {}

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Sample:
        rel = self.files[index]
        path = self.root / rel
        sample: Sample = {"image": load_image(path, self.max_pixels), "key": rel,
                          "path": str(path), "index": index}
        if self.class_names:
            sample["label"] = self._class_index[rel.split("/", 1)[0]]
        return sample

    def summary(self) -> str:
        extra = f", {self.ignored} non-image file(s) ignored" if self.ignored else ""
        return super().summary() + extra
