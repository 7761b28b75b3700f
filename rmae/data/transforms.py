"""Joint geometric augmentation of an image and its label maps, and pixel normalisation.

One crop box and one flip decision are drawn per sample and applied to everything: the image
is resampled with PIL's bicubic filter (antialiased when shrinking, as torchvision's
``RandomResizedCrop`` on PIL images), label maps (region scales, instances, classes) with
nearest neighbour — by index arithmetic on the same pixel-centre mapping, so map pixel (y, x)
is the source pixel under the centre of image pixel (y, x), and integer labels of any width
(uint16, uint32) survive untouched.

Box convention: ``(top, left, height, width)`` in source pixels (integers, as torchvision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[int, int, int, int]


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.2, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """torchvision's ``RandomResizedCrop.get_params`` driven by a numpy Generator.

    Ten tries at an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    failing that, the largest centred crop with a ratio inside the range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    h, w = max(1, h), max(1, w)
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, out: tuple[int, int], crop_pct: float = 0.875) -> Box:
    """The box of "resize the short side to out/crop_pct, centre-crop out" (timm/MAE eval)."""
    oh, ow = out
    s = min(height / oh, width / ow) * crop_pct  # source pixels per output pixel
    h = max(1, min(height, int(round(oh * s))))
    w = max(1, min(width, int(round(ow * s))))
    return (height - h) // 2, (width - w) // 2, h, w


def resize_maps_nearest(maps: np.ndarray, box: Box, out: tuple[int, int]) -> np.ndarray:
    """Crop ``box`` out of ``maps`` ``[..., H, W]`` and resize to ``out`` by nearest neighbour."""
    top, left, h, w = box
    oh, ow = out
    rows = top + np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.intp), h - 1)
    cols = left + np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.intp), w - 1)
    return maps[..., rows[:, None], cols[None, :]]


def apply_geometry(image: np.ndarray, maps: dict[str, np.ndarray], box: Box,
                   out: tuple[int, int], flip: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Crop+resize+flip an image (uint8 ``[H, W, 3]``) and label maps (``[..., H, W]``) alike.

    Returns the image as uint8 ``[oh, ow, 3]`` and each map as ``[..., oh, ow]`` (same dtype).
    """
    top, left, h, w = box
    pil = Image.fromarray(image).resize((out[1], out[0]), Image.Resampling.BICUBIC,
                                        box=(left, top, left + w, top + h))
    img = np.asarray(pil)
    new_maps = {k: resize_maps_nearest(v, box, out) for k, v in maps.items()}
    if flip:
        img = img[:, ::-1]
        new_maps = {k: v[..., ::-1] for k, v in new_maps.items()}
    return (np.ascontiguousarray(img),
            {k: np.ascontiguousarray(v) for k, v in new_maps.items()})


@dataclass
class JointRandomResizedCrop:
    """Training transform: RandomResizedCrop(scale, ratio) + horizontal flip with ``hflip``."""

    size: int | tuple[int, int] = 64
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5

    def __call__(self, image: np.ndarray, maps: dict[str, np.ndarray], rng: np.random.Generator
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        box = random_resized_crop_box(image.shape[0], image.shape[1], rng, self.scale, self.ratio)
        flip = bool(rng.random() < self.hflip)
        return apply_geometry(image, maps, box, _pair(self.size), flip)


@dataclass
class JointCenterCrop:
    """Deterministic evaluation transform: resize the short side to size/crop_pct, centre crop.

    ``crop_pct=1`` keeps the whole short side (useful when instance masks near the border
    matter); MAE/timm evaluate at 0.875.
    """

    size: int | tuple[int, int] = 64
    crop_pct: float = 0.875

    def __call__(self, image: np.ndarray, maps: dict[str, np.ndarray],
                 rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        out = _pair(self.size)
        box = center_crop_box(image.shape[0], image.shape[1], out, self.crop_pct)
        return apply_geometry(image, maps, box, out, flip=False)


def to_tensor(image: np.ndarray, normalize: bool = True,
              mean: tuple[float, float, float] = IMAGENET_MEAN,
              std: tuple[float, float, float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` → float32 ``[3, H, W]``: in [0, 1], then ``(x − mean) / std`` if
    ``normalize`` (ImageNet statistics, what MAE trains on)."""
    # np.require copies read-only arrays (PIL's asarray) so torch gets memory it may own.
    t = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
    t = t.float().div_(255.0)
    if normalize:
        t.sub_(torch.tensor(mean, device=t.device).view(3, 1, 1)).div_(torch.tensor(std, device=t.device).view(3, 1, 1))
    return t


def denormalize(images: torch.Tensor, mean: tuple[float, float, float] = IMAGENET_MEAN,
                std: tuple[float, float, float] = IMAGENET_STD) -> torch.Tensor:
    """Undo :func:`to_tensor`'s normalisation: ``[..., 3, H, W]`` → values in [0, 1] (clamped)."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * s + m).clamp_(0.0, 1.0)
