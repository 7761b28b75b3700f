"""Decode image and label-map files into arrays, turning every failure into BadSampleError.

Images become ``uint8 [H, W, 3]`` RGB whatever their mode: EXIF orientation is applied
(``ImageOps.exif_transpose``), grayscale is replicated, palette images are expanded, alpha is
composited onto white (how a viewer on a white page shows it, instead of exposing whatever
colour hides under transparent pixels), 16-bit and 32-bit integer images are rescaled from
0..65535 to 0..255. Decompression bombs (more than ``max_pixels`` pixels, or PIL's own
``DecompressionBombWarning``/``Error``) are refused before any pixel is decoded.

Size policy: what the loader and the region sources can afford. An image of more than
:data:`MAX_WORKING_PIXELS` (16.8 Mpx, 4096²) is reduced on load by the smallest integer factor
that fits (a box filter; JPEGs are decoded at the reduced size directly), so every array after
decoding — image, region maps, crops — is bounded whatever the file says (a 9000×9000 PNG of a
few hundred KB becomes 3000×3000). Label maps are reduced the same way with nearest neighbour,
so their integer labels survive. Training never sees the difference: random crops are resized
to the model's input (≤ 4096², see :mod:`rmae.models.config`) anyway. Only regular files are
opened (a FIFO named ``x.png`` is a bad sample, not a hang).

Label maps (user segmentations such as SAM masks) keep their integer values: 8- or 16-bit
single-channel PNG/TIFF, palette PNG (the palette *index* is the label), or an RGB colour-coded
map (each distinct colour becomes one label, black = 0).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..io import open_regular
from .base import BadSampleError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: Default pixel limit: PIL's own bomb threshold (~89 Mpx, i.e. a 9459² image).
DEFAULT_MAX_PIXELS = 89_478_485
#: Images (and label maps) with more pixels are reduced on load to at most this many.
MAX_WORKING_PIXELS = 1 << 24
# Modes PIL's box ``reduce`` does not take, and the mode each becomes first.
_REDUCIBLE = {"1": "L", "I;16": "I", "I;16B": "I", "I;16L": "I", "I;16N": "I"}


def reduction_factor(height: int, width: int, max_pixels: int) -> int:
    """The smallest integer f with ⌈height/f⌉·⌈width/f⌉ ≤ ``max_pixels`` (1 when it fits)."""
    f = max(1, math.isqrt(height * width // max(1, max_pixels)))
    while -(-height // f) * -(-width // f) > max_pixels:
        f += 1
    return f


def _shrink(img: Image.Image, factor: int, labels: bool) -> Image.Image:
    """``img`` reduced by ``factor``: a box filter for pictures, nearest neighbour for labels."""
    if factor == 1:
        return img
    size = (-(-img.width // factor), -(-img.height // factor))
    if labels:
        return img.resize(size, Image.Resampling.NEAREST)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img.convert(_REDUCIBLE.get(img.mode, img.mode)).reduce(factor)


def _open(path: Path, max_pixels: int, labels: bool = False) -> Image.Image:
    try:
        with warnings.catch_warnings(), open_regular(path) as f:
            # PIL only *warns* between MAX_IMAGE_PIXELS and twice that; a warning in a worker is
            # invisible and the decode may exhaust memory, so it is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
            w, h = img.size
            if w * h > max_pixels:
                raise BadSampleError(
                    str(path), f"image is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels} "
                    "(decompression bomb guard)"
                )
            factor = reduction_factor(h, w, MAX_WORKING_PIXELS)
            if factor > 1 and not labels and img.format == "JPEG":
                img.draft(img.mode, (-(-w // factor), -(-h // factor)))  # DCT scaling: decode smaller
            img.load()  # decode now, inside the try, so truncation is caught here
            return _shrink(img, reduction_factor(img.height, img.width, MAX_WORKING_PIXELS), labels)
    except BadSampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSampleError(str(path), f"decompression bomb: {err}") from None
    except FileNotFoundError:
        raise BadSampleError(str(path), "file not found") from None
    except IsADirectoryError:
        raise BadSampleError(str(path), "is a folder, not an image file") from None
    except Image.UnidentifiedImageError:
        raise BadSampleError(str(path), "not an image file (PIL cannot identify it)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        # OSError covers "image file is truncated"; keep the path out of the reason (the
        # message names it once already).
        reason = str(err).replace(str(path), "").replace("''", "").strip(" :")
        raise BadSampleError(str(path), f"cannot decode image ({reason})") from None


def _high_bit_to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        # Mode "F": float images are assumed in [0, 1] unless clearly larger.
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    # 16-bit (and "I" 32-bit) images use 0..65535; dividing by 257 maps 65535 → 255 exactly.
    return (np.clip(arr.astype(np.int64), 0, 65535) // 257).astype(np.uint8)


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL image (already oriented) → ``uint8 [H, W, 3]``."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = _high_bit_to_uint8(np.asarray(img))
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(img)


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as ``uint8 [H, W, 3]`` RGB, EXIF-oriented.

    Raises :class:`BadSampleError` (naming the file) for anything that is not a readable
    image: missing, truncated, corrupt, not an image, or a decompression bomb.
    """
    path = Path(path)
    img = _open(path, max_pixels)
    try:
        img = ImageOps.exif_transpose(img)
        arr = to_rgb_array(img)
    except (OSError, ValueError, SyntaxError) as err:
        raise BadSampleError(str(path), f"cannot convert image ({err})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadSampleError(str(path), f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


def load_label_map(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a label-map file as ``int32 [H, W]`` with its integer values preserved.

    No EXIF rotation: label maps are written by programs, in the orientation of the array.
    """
    path = Path(path)
    img = _open(path, max_pixels, labels=True)
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB")).astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        # Colour-coded map: each distinct colour is one segment, black stays 0.
        uniq, inverse = np.unique(code, return_inverse=True)
        labels = inverse.reshape(code.shape).astype(np.int32)
        if uniq[0] != 0:
            labels += 1
        return labels
    if img.mode == "1":
        return np.asarray(img, dtype=np.int32)
    if img.mode in ("L", "P", "I;16", "I;16B", "I;16L", "I;16N", "I"):
        return np.asarray(img).astype(np.int32)
    raise BadSampleError(
        str(path), f"label map has image mode {img.mode!r}; save it as an 8- or 16-bit "
        "single-channel PNG (0 = no segment)"
    )
