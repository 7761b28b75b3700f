"""Data specs — one syntax for the CLI and configs — and the dataset builder.

=============================================  =============================================
``scenes`` / ``scenes:val`` / ``scenes:val:1000``  generated scenes, split train|val|test
``scenes:5000``                                  (default train), optional length
``photos``                                       the photographs scikit-image/-learn ship
``folder:PATH``                                  images under PATH, recursively
``coco:IMAGES_DIR:ANNOTATIONS_JSON``             COCO instances JSON over an image folder
=============================================  =============================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import BaseDataset, DataError
from .scenes import SPLITS

#: The longest generated stream (a training epoch draws a permutation of this many indices).
MAX_SCENES = 10_000_000
DATA_SPEC_FORMS = ("scenes[:train|val|test][:N]", "photos", "folder:PATH",
                   "coco:IMAGES_DIR:ANNOTATIONS_JSON")


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec. ``str(spec)`` gives back a canonical spec string."""

    kind: str  # "scenes" | "photos" | "folder" | "coco"
    split: str | None = None
    length: int | None = None
    path: str | None = None
    annotations: str | None = None

    def __str__(self) -> str:
        if self.kind == "scenes":
            return "scenes:" + (self.split or "train") + (f":{self.length}" if self.length else "")
        if self.kind == "folder":
            return f"folder:{self.path}"
        if self.kind == "coco":
            return f"coco:{self.path}:{self.annotations}"
        return self.kind

    @property
    def root(self) -> str | None:
        """The image folder (folder/coco), where ``labelmaps`` looks for ``<root>_labelmaps``."""
        return self.path


def _bad(spec: str, why: str) -> DataError:
    return DataError(f"bad data spec '{spec}': {why}. Valid forms: {', '.join(DATA_SPEC_FORMS)}")


def parse_data_spec(spec: str | DataSpec) -> DataSpec:
    """Parse a spec string (see module docstring). Only the syntax is checked here; paths are
    checked by :func:`build_dataset`."""
    if isinstance(spec, DataSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(str(spec), "empty")
    s = spec.strip()
    kind, _, rest = s.partition(":")
    kind = kind.lower()
    if kind == "scenes":
        split, length = None, None
        for part in [p for p in rest.split(":") if p] if rest else []:
            if part.isascii() and part.isdigit():
                if length is not None:
                    raise _bad(s, "more than one length")
                length = int(part) if len(part) <= 9 else MAX_SCENES + 1
                if not 1 <= length <= MAX_SCENES:
                    raise _bad(s, f"the length must be between 1 and {MAX_SCENES}")
            elif part in SPLITS:
                if split is not None:
                    raise _bad(s, "more than one split")
                split = part
            else:
                raise _bad(s, f"'{part}' is neither a split ({'|'.join(SPLITS)}) nor a length, "
                              "e.g. scenes:val:1000")
        return DataSpec("scenes", split or "train", length)
    if kind == "photos":
        if rest:
            raise _bad(s, "photos takes no arguments")
        return DataSpec("photos")
    if kind == "folder":
        if not rest:
            raise _bad(s, "folder needs a path, e.g. folder:/data/imagenet/train")
        return DataSpec("folder", path=rest)
    if kind == "coco":
        # Split at the last ':' before the JSON name so image paths may themselves hold ':'.
        images, sep, ann = rest.rpartition(":")
        if not sep or not images or not ann:
            raise _bad(s, "coco needs an image folder and a JSON, e.g. "
                          "coco:/data/coco/val2017:/data/coco/annotations/instances_val2017.json")
        return DataSpec("coco", path=images, annotations=ann)
    hint = ""
    if Path(s).expanduser().exists():
        hint = f" (to read the images in that directory, write folder:{s})"
    raise _bad(s, f"unknown kind '{kind}'{hint}")


def build_dataset(spec: str | DataSpec, *, image_size: int = 64, seed: int = 0,
                  strict: bool = False, cache_dir: str | Path | None = None,
                  **kwargs) -> BaseDataset:
    """The raw dataset for ``spec`` (see :mod:`rmae.data.base` for what items look like).

    ``image_size`` is the resolution ``scenes`` are generated at (other datasets keep their
    files' resolution; cropping happens in :class:`~rmae.data.pipeline.RegionDataset`).
    ``seed`` selects the ``scenes`` stream; ``strict`` makes a bad file an error instead of a
    skip; ``cache_dir`` stores generated scenes; extra ``kwargs`` go to the dataset class.
    """
    ds = parse_data_spec(spec)
    if ds.kind == "scenes":
        from .scenes import ScenesDataset

        return ScenesDataset(ds.split or "train", ds.length, size=image_size, seed=seed,
                             cache_dir=cache_dir, strict=strict, **kwargs)
    if ds.kind == "photos":
        from .photos import PhotosDataset

        return PhotosDataset(strict=strict, **kwargs)
    if ds.kind == "folder":
        from .folder import ImageFolderDataset

        return ImageFolderDataset(ds.path, strict=strict, **kwargs)
    from .coco import CocoDataset

    return CocoDataset(ds.path, ds.annotations, strict=strict, **kwargs)
