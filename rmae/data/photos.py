"""The real photographs and textures that scikit-image and scikit-learn ship on disk.

Only images stored inside the installed packages are used (no pooch downloads), so this works
offline. They serve twice: as the ``photos`` dataset for visual demos, and as the texture bank
from which ``scenes`` cuts its backgrounds and textured object fills. Each image is decoded
once per process and kept in memory (``functools.cache``).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

from .base import BaseDataset, Sample

# Photographs of things (the demo set). Each loads from the package's own data folder.
PHOTO_NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "clock",
    "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
    "sklearn:china", "sklearn:flower",
)
# Texture-like images, used (with the photos) as scene backgrounds and object fills.
TEXTURE_NAMES = ("brick", "grass", "gravel", "cell", "text", "page")


def _as_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


@cache
def shipped_image(name: str) -> np.ndarray:
    """One shipped image as ``uint8 [H, W, 3]`` (``"sklearn:china"`` for scikit-learn's)."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        return _as_rgb(load_sample_image(name.split(":", 1)[1] + ".jpg"))
    import skimage.data

    arr = getattr(skimage.data, name)()
    if isinstance(arr, tuple):  # stereo_motorcycle returns (left, right, disparity)
        arr = arr[0]
    return _as_rgb(arr)


def _downscale(arr: np.ndarray, max_side: int | None) -> np.ndarray:
    h, w = arr.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return arr
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS))


class PhotosDataset(BaseDataset):
    """The shipped photographs (no ground truth), each at most ``max_side`` pixels on a side.

    ``max_side`` (default 512) keeps region computation on the larger ones (retina is 1411²)
    at demo speed; ``None`` keeps the original resolution.
    """

    def __init__(self, max_side: int | None = 512, names: tuple[str, ...] = PHOTO_NAMES,
                 strict: bool = False) -> None:
        super().__init__(strict=strict)
        self.names = tuple(names)
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> Sample:
        name = self.names[index]
        return {"image": _downscale(shipped_image(name), self.max_side), "key": f"photos/{name}",
                "index": index}


@cache
def texture_bank(size: int) -> tuple[np.ndarray, ...]:
    """Every shipped image resized so its short side is ``2·size`` (``uint8 [h, w, 3]``).

    Scenes cut ``size``² windows out of these with plain slicing: no per-sample resize, which
    keeps generation in the thousands of images per second. Cached per process and size.
    """
    out = []
    for name in PHOTO_NAMES + TEXTURE_NAMES:
        arr = shipped_image(name)
        h, w = arr.shape[:2]
        s = 2 * size / min(h, w)
        new = (max(size, round(w * s)), max(size, round(h * s)))
        out.append(np.asarray(Image.fromarray(arr).resize(new, Image.Resampling.LANCZOS)))
    return tuple(out)
