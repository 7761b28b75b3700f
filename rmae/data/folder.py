"""``folder:PATH`` — every image under a directory, recursively, optionally labelled by sub-folder.

Files are listed once, sorted by relative path (so indices are stable across machines), and
only by extension (:data:`~rmae.data.imageio.IMAGE_EXTENSIONS`, case-insensitive); other files
(``.txt``, ``.json``, hidden files) are ignored and counted in :attr:`ignored`. A file with an
image extension that does not decode is skipped at load time (see :mod:`rmae.data.base`).

Class labels: with ``class_folders=None`` (auto) the first-level sub-folder names become classes
(sorted, as torchvision's ``ImageFolder``) when every image lies inside one and there are at
least two; ``True`` forces it, ``False`` disables it.

Symbolic links to folders are followed, but every real folder is walked once (at its first
path in sorted order): a link back to a parent, or a loop of links, cannot make the walk endless
or list an image once per lap.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from .base import BaseDataset, DataError, Sample
from .imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_image


def walk_files(root: Path) -> Iterator[tuple[str, str]]:
    """(folder path, file name) of every non-hidden file under ``root``, depth first in sorted
    order; links to folders are followed, each real folder (device, inode) visited once."""
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:  # unreadable or vanished: nothing to list there
            continue
        subfolders = []
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                continue
            if is_dir:
                subfolders.append(e.path)
            else:
                yield folder, e.name
        stack.extend(reversed(subfolders))


def list_images(root: Path) -> tuple[list[str], int]:
    """Relative POSIX paths of image files under ``root`` (sorted) and how many others there were."""
    found: list[str] = []
    ignored = 0
    for folder, name in walk_files(root):
        if name.lower().endswith(IMAGE_EXTENSIONS):
            found.append(Path(folder, name).relative_to(root).as_posix())
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
