"""Pictures the dashboard shows and the points users click on them. No Streamlit, no models.

A *prepared* image is what one run sees — ``uint8 [H, W, 3]`` at the run's input size (short
side resized, centre crop, nothing cut off: ``crop_pct = 1``) and, when ground truth exists, its
instance map ``int32 [H, W]`` resized with nearest neighbours. A *point* is a position in
relative image coordinates ``(fy, fx) ∈ [0, 1)²``, so runs with different grids query the same
place; each run turns it into its own patch index. Pictures are shown at :data:`DISPLAY` pixels.
"""

from __future__ import annotations

import hashlib
import io
import math
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from rmae.data import JointCenterCrop, load_image, to_tensor

#: side of the pictures the dashboard shows (pixels); maps are upsampled to it
DISPLAY = 256
#: upload limits: bytes of the file, and decoded pixels (w·h)
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
QUERY_COLOR = (0, 255, 255)
CLICK_COLOR = (255, 64, 64)


# ------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class Prepared:
    image: np.ndarray  # uint8 [H, W, 3]
    instances: np.ndarray | None  # int32 [H, W], 0 = background
    digest: str

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def tensor(self) -> torch.Tensor:
        """The normalised model input ``float32 [1, 3, H, W]`` (on the CPU; callers move it)."""
        return to_tensor(self.image)[None]


def digest(*arrays: np.ndarray | None) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def prepare(image: np.ndarray, instances: np.ndarray | None, size: int | tuple[int, int]) -> Prepared:
    """Source image (``uint8 [h, w, 3]``, any size) → what a run of input size ``size`` sees."""
    maps = {"instances": instances.astype(np.int32)} if instances is not None else {}
    img, maps = JointCenterCrop(size, crop_pct=1.0)(image, maps)
    inst = maps.get("instances")
    return Prepared(img, inst, digest(img, inst))


def decode_upload(data: bytes, name: str = "upload") -> np.ndarray:
    """Uploaded bytes → ``uint8 [H, W, 3]`` with the byte and pixel limits enforced before any
    pixel is decoded (``rmae.data.load_image`` refuses bombs, truncation, non-images)."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"{name}: {len(data) / 2**20:.1f} MiB is more than the upload limit of "
                         f"{MAX_UPLOAD_BYTES / 2**20:.0f} MiB; downscale or re-encode it")
    suffix = Path(name).suffix.lower()[:8] if Path(name).suffix else ".img"
    with tempfile.TemporaryDirectory(prefix="rmae-upload-") as d:
        path = Path(d) / f"upload{suffix}"
        path.write_bytes(data)
        return load_image(path, max_pixels=MAX_UPLOAD_PIXELS)


# ------------------------------------------------------------------------------------------
# points, patches, clicks


def point_to_patch(point: tuple[float, float], grid: tuple[int, int]) -> int:
    """Relative point ``(fy, fx)`` → patch index (row-major) on ``grid``."""
    fy, fx = point
    r = min(max(int(math.floor(fy * grid[0])), 0), grid[0] - 1)
    c = min(max(int(math.floor(fx * grid[1])), 0), grid[1] - 1)
    return r * grid[1] + c


def patch_center(row: int, col: int, grid: tuple[int, int]) -> tuple[float, float]:
    return ((row + 0.5) / grid[0], (col + 0.5) / grid[1])


def patch_box(index: int, grid: tuple[int, int], size: int = DISPLAY) -> tuple[int, int, int, int]:
    """Display-space box ``(y0, x0, y1, x1)`` of patch ``index`` on a ``grid`` shown at ``size`` pixels."""
    r, c = divmod(int(index), grid[1])
    sy, sx = size / grid[0], size / grid[1]
    return (round(r * sy), round(c * sx), round((r + 1) * sy), round((c + 1) * sx))


def click_to_point(value: dict | None) -> tuple[float, float] | None:
    """``streamlit_image_coordinates`` value (display pixels) → relative point, or None."""
    if not value or "x" not in value or "y" not in value:
        return None
    w = float(value.get("width") or DISPLAY)
    h = float(value.get("height") or DISPLAY)
    fy = min(max(float(value["y"]) / h, 0.0), 0.999999)
    fx = min(max(float(value["x"]) / w, 0.0), 0.999999)
    return fy, fx


# ------------------------------------------------------------------------------------------
# display


def to_display(image: np.ndarray, size: int = DISPLAY, nearest: bool = False) -> np.ndarray:
    """Resize ``uint8 [h, w, 3]`` (or ``[h, w]``) to ``size × size`` for display."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(image).resize((size, size), resample))


def draw_box(image: np.ndarray, box: tuple[int, int, int, int], color=QUERY_COLOR, width: int = 2) -> np.ndarray:
    """Outline ``(y0, x0, y1, x1)`` (exclusive ends) on a copy of ``image``."""
    out = image.copy()
    y0, x0, y1, x1 = (int(v) for v in box)
    H, W = out.shape[:2]
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
    w = max(1, width)
    out[y0:min(y0 + w, y1), x0:x1] = color
    out[max(y1 - w, y0):y1, x0:x1] = color
    out[y0:y1, x0:min(x0 + w, x1)] = color
    out[y0:y1, max(x1 - w, x0):x1] = color
    return out


@lru_cache(maxsize=8)
def _lut(cmap: str) -> np.ndarray:
    return (colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def colorize(values01: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    idx = np.clip(np.nan_to_num(values01) * 255, 0, 255).round().astype(np.uint8)
    return _lut(cmap)[idx]


def overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.6, size: int = DISPLAY,
            box: tuple[int, int, int, int] | None = None, cmap: str = "inferno") -> np.ndarray:
    """A ``[gh, gw]`` map (min–max normalised, nearest-upsampled so patches stay visible) blended
    over the image at ``size`` pixels, with an optional query box."""
    a = amap.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    a01 = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    reps = (math.ceil(size / a.shape[0]), math.ceil(size / a.shape[1]))
    heat = colorize(np.kron(a01, np.ones(reps))[:size, :size], cmap) if size % a.shape[0] == 0 and size % a.shape[1] == 0 \
        else to_display(colorize(a01, cmap), size, nearest=True)
    base = to_display(image, size).astype(np.float32)
    out = ((1 - alpha) * base + alpha * heat.astype(np.float32)).round().clip(0, 255).astype(np.uint8)
    return draw_box(out, box) if box is not None else out


def mask_image(prob: np.ndarray, size: int = DISPLAY) -> np.ndarray:
    """A probability / binary map ``[H, W]`` in [0, 1] as a grey ``uint8 [size, size, 3]``."""
    g = (np.clip(prob, 0, 1) * 255).round().astype(np.uint8)
    return to_display(np.repeat(g[..., None], 3, axis=2), size, nearest=True)


def tint(image: np.ndarray, mask: np.ndarray, color=(255, 64, 64), alpha: float = 0.5, size: int = DISPLAY) -> np.ndarray:
    """Image with ``mask [H, W] bool`` tinted, at display size."""
    base = to_display(image, size).astype(np.float32)
    m = to_display((mask.astype(np.uint8) * 255), size, nearest=True) > 127
    out = base.copy()
    out[m] = (1 - alpha) * base[m] + alpha * np.asarray(color, np.float32)
    return out.round().astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
