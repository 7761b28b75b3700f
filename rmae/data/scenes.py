"""``scenes``: procedurally generated multi-object images with exact ground truth.

Each image holds 2–6 objects of :data:`SHAPES` (class ids 1..7, 0 = background) placed over a
crop of a real photograph or texture shipped with scikit-image / scikit-learn. Every object has
its own fill — a flat colour, stripes, a checkerboard, or a crop of a real texture — and later
objects occlude earlier ones. Masks are rasterised without anti-aliasing and the image is
painted *from the final instance map*, so the instance map is exactly the set of visible
pixels of each object: a pixel belongs to instance i if and only if it shows instance i's fill.
Placements that would leave any object with fewer than ``min_area`` visible pixels are redrawn,
so no object vanishes under the others.

Determinism: sample ``index`` of ``split`` under ``seed`` is drawn from
``np.random.default_rng([SALT, seed, split_id, index])``; the three splits use disjoint seed
sequences, so they never share an image, and any worker generates the same image for the
same index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .base import BaseDataset, Sample
from .cache import atomic_save_npz, load_npz
from .photos import PHOTO_NAMES, TEXTURE_NAMES, texture_bank

SHAPES = ("disk", "ellipse", "rectangle", "triangle", "star", "cross", "ring")
FILLS = ("flat", "stripes", "checker", "texture")
SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_LENGTHS = {"train": 10_000, "val": 1_000, "test": 1_000}
SCENES_VERSION = 1  # bump when generation changes: it is part of the cache path
_SALT = 0x5CE7E5
# Shipped images that are grayscale: tinted with a random colour when used as texture.
_GRAY = {"camera", "coins", "moon", "clock", *TEXTURE_NAMES}
_BANK_NAMES = PHOTO_NAMES + TEXTURE_NAMES


@dataclass
class Scene:
    """One generated scene.

    image: uint8 [S, S, 3]; instances: int32 [S, S] (0 = background, 1..n);
    classes: int32 [S, S] (0 = background, 1..len(SHAPES)); instance_classes: int64 [n];
    boxes: float32 [n, 4] (x0, y0, x1, y1) of the visible pixels, x1/y1 exclusive;
    fills: per instance {"kind": one of FILLS, "colors": list of RGB tuples};
    background: uint8 [S, S, 3], the image before any object was painted.
    """

    image: np.ndarray
    instances: np.ndarray
    classes: np.ndarray
    instance_classes: np.ndarray
    boxes: np.ndarray
    fills: list[dict] = field(default_factory=list)
    background: np.ndarray | None = None


@cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _polygon_mask(cy: float, cx: float, radii: np.ndarray, angles: np.ndarray,
                  size: int) -> np.ndarray:
    """Hard-edged (no anti-aliasing) fill of a polygon given in polar form around (cy, cx).

    PIL's C rasteriser is ~15x faster than ``skimage.draw.polygon`` here and, being aliased,
    sets each pixel fully or not at all — exactly what an instance mask needs.
    """
    xs = cx + radii * np.cos(angles)
    ys = cy + radii * np.sin(angles)
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).polygon(list(zip(xs.tolist(), ys.tolist())), fill=1)
    return np.asarray(im).astype(bool)


_CIRCLE = np.linspace(0, 2 * np.pi, 48, endpoint=False)


def shape_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random, aliased (hard-edged) bool mask ``[size, size]`` of one shape class."""
    r = size * rng.uniform(0.12, 0.28)
    cy, cx = rng.uniform(0.1 * size, 0.9 * size, 2)
    th = rng.uniform(0, 2 * np.pi)
    if kind in ("disk", "ring"):
        m = _polygon_mask(cy, cx, np.full(_CIRCLE.size, r), _CIRCLE, size)
        if kind == "ring":
            inner = r * rng.uniform(0.4, 0.6)
            m &= ~_polygon_mask(cy, cx, np.full(_CIRCLE.size, inner), _CIRCLE, size)
        return m
    if kind == "ellipse":
        a, b = r, r * rng.uniform(0.35, 0.65)
        # polar radius of an ellipse with semi-axes a, b at angle phi, then rotated by th
        rad = a * b / np.hypot(b * np.cos(_CIRCLE), a * np.sin(_CIRCLE))
        return _polygon_mask(cy, cx, rad, _CIRCLE + th, size)
    if kind == "rectangle":
        a, b = r, r * rng.uniform(0.45, 0.9)
        pts = np.array([[a, b], [-a, b], [-a, -b], [a, -b]])
    elif kind == "triangle":
        ang = th + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        return _polygon_mask(cy, cx, np.full(3, r), ang, size)
    elif kind == "star":
        ang = th + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        return _polygon_mask(cy, cx, rad, ang, size)
    elif kind == "cross":
        w = r * rng.uniform(0.28, 0.4)
        # 12-vertex plus sign, then rotated.
        pts = np.array([[w, r], [w, w], [r, w], [r, -w], [w, -w], [w, -r],
                        [-w, -r], [-w, -w], [-r, -w], [-r, w], [-w, w], [-w, r]])
    else:
        raise ValueError(f"unknown shape {kind!r}; choose from {SHAPES}")
    rad = np.hypot(pts[:, 0], pts[:, 1])
    ang = np.arctan2(pts[:, 1], pts[:, 0]) + th
    return _polygon_mask(cy, cx, rad, ang, size)


def _color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.uint8)


def _texture_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    bank = texture_bank(size)
    t = int(rng.integers(len(bank)))
    tex = bank[t]
    y = int(rng.integers(tex.shape[0] - size + 1))
    x = int(rng.integers(tex.shape[1] - size + 1))
    crop = tex[y:y + size, x:x + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.rot90(crop, int(rng.integers(4)))
    if _BANK_NAMES[t] in _GRAY:
        tint = rng.uniform(0.35, 1.0, 3).astype(np.float32)
        crop = (crop.astype(np.float32) * tint).astype(np.uint8)
    return np.ascontiguousarray(crop)


def _paint(image: np.ndarray, sel: np.ndarray, kind: str, rng: np.random.Generator) -> list[tuple]:
    """Paint fill ``kind`` into ``image[sel]`` (in place); return the flat colours it used.

    Patterns are evaluated on the selected pixels only: the cost follows the object, not
    the image.
    """
    size = image.shape[0]
    if kind == "flat":
        c = _color(rng)
        image[sel] = c
        return [tuple(int(v) for v in c)]
    if kind == "texture":
        image[sel] = _texture_crop(rng, size)[sel]
        return []
    if kind not in ("stripes", "checker"):
        raise ValueError(f"unknown fill {kind!r}; choose from {FILLS}")
    colors = np.stack([_color(rng), _color(rng)])
    ys, xs = np.nonzero(sel)
    phi = rng.uniform(0, np.pi)
    period = size * rng.uniform(0.05, 0.12)
    u = np.floor((xs * np.cos(phi) + ys * np.sin(phi)) / period)
    if kind == "checker":
        u += np.floor((ys * np.cos(phi) - xs * np.sin(phi)) / period)
    image[ys, xs] = colors[u.astype(np.int64) % 2]
    return [tuple(int(v) for v in c) for c in colors]


def _boxes(inst: np.ndarray, n: int) -> np.ndarray:
    """``float32 [n, 4]`` (x0, y0, x1, y1), x1/y1 exclusive, of each id's pixels."""
    boxes = np.zeros((n, 4), np.float32)
    for i, sl in enumerate(ndimage.find_objects(inst, max_label=n)):
        if sl is not None:
            boxes[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return boxes


def generate_scene(rng: np.random.Generator, size: int = 64, *, min_objects: int = 2,
                   max_objects: int = 6, min_area: int | None = None,
                   fill_kinds: tuple[str, ...] = FILLS, max_tries: int = 12) -> Scene:
    """Draw one scene from ``rng`` (see module docstring for the guarantees).

    ``min_area`` — minimum visible pixels per object; default ``max(12, size²/100)``.
    """
    if size < 16:
        raise ValueError(f"scenes need size >= 16 pixels, got {size}")
    min_area = max(12, size * size // 100) if min_area is None else min_area
    background = _texture_crop(rng, size)
    n_target = int(rng.integers(min_objects, max_objects + 1))
    inst = np.zeros((size, size), np.int32)
    visible = np.zeros(max_objects + 1, np.int64)  # visible pixel count per instance id
    kinds: list[int] = []
    tries = 0
    # Objects are placed one at a time; a placement is kept only if, after it, every object
    # (old and new) still shows at least min_area pixels. Extra tries past n_target make
    # min_objects reachable even when early draws keep failing.
    while (len(kinds) < n_target and tries < max_tries * n_target) or (
            len(kinds) < min_objects and tries < 100 * max_tries):
        tries += 1
        cls = int(rng.integers(len(SHAPES)))
        m = shape_mask(SHAPES[cls], rng, size)
        new = int(m.sum())
        if new < min_area:
            continue
        n = len(kinds)
        after = visible[: n + 1] - np.bincount(inst[m], minlength=n + 1)[: n + 1]
        if n and after[1:].min() < min_area:
            continue
        inst[m] = n + 1
        visible[1: n + 1] = after[1:]
        visible[n + 1] = new
        kinds.append(cls + 1)

    n = len(kinds)
    image = background.copy()
    fills = []
    for i in range(1, n + 1):
        kind = fill_kinds[int(rng.integers(len(fill_kinds)))]
        fills.append({"kind": kind, "colors": _paint(image, inst == i, kind, rng)})

    instance_classes = np.asarray(kinds, np.int64)
    lut = np.concatenate([[0], instance_classes]).astype(np.int32)
    classes = lut[inst]
    boxes = _boxes(inst, n)
    return Scene(image, inst, classes, instance_classes, boxes, fills, background)


class ScenesDataset(BaseDataset):
    """The embedded default dataset (see module docstring).

    Raw samples (see :mod:`rmae.data.base`) carry ``image``, ``instances``, ``classes``,
    ``instance_classes``, ``boxes``, ``fills`` (empty when read back from ``cache_dir``) and ``label`` = (shape class of the largest
    visible object) − 1, in 0..6, so the set also serves image classification and probing.

    ``cache_dir``: optional folder for generated scenes (useful at large ``size``, where
    generation costs more than reading back a compressed file).
    """

    class_names = list(SHAPES)
    category_names = list(SHAPES)
    has_instances = True

    def __init__(self, split: str = "train", length: int | None = None, size: int = 64,
                 seed: int = 0, cache_dir: str | Path | None = None, strict: bool = False,
                 **scene_kwargs) -> None:
        super().__init__(strict=strict)
        if split not in SPLITS:
            raise ValueError(f"scenes split must be one of {sorted(SPLITS)}, got {split!r}")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.length = DEFAULT_LENGTHS[split] if length is None else int(length)
        self.scene_kwargs = scene_kwargs
        self.cache_dir = None
        if cache_dir is not None:
            tag = f"scenes-v{SCENES_VERSION}-s{self.size}-seed{self.seed}"
            if scene_kwargs:
                tag += "-" + "-".join(f"{k}={scene_kwargs[k]}" for k in sorted(scene_kwargs))
            self.cache_dir = Path(cache_dir) / tag / split

    def __len__(self) -> int:
        return self.length

    def prepare(self) -> None:
        texture_bank(self.size)  # ~1.5 s once; forked workers then share it

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([_SALT, self.seed, SPLITS[self.split], int(index)])

    def scene(self, index: int) -> Scene:
        return generate_scene(self.rng(index), self.size, **self.scene_kwargs)

    def load(self, index: int) -> Sample:
        key = f"scenes/{self.split}/{self.seed}/{index}"
        if self.cache_dir is not None:
            path = self.cache_dir / f"{index}.npz"
            data = load_npz(path)
            if data is not None and set(data) == {"image", "instances", "instance_classes", "boxes"} \
                    and data["image"].shape == (self.size, self.size, 3) \
                    and data["instances"].shape == (self.size, self.size):  # else damaged: generate again
                return self._sample(index, key, data["image"], data["instances"],
                                    data["instance_classes"], data["boxes"], [])
        sc = self.scene(index)
        if self.cache_dir is not None:
            atomic_save_npz(self.cache_dir / f"{index}.npz", image=sc.image,
                            instances=sc.instances.astype(np.uint16),
                            instance_classes=sc.instance_classes, boxes=sc.boxes)
        return self._sample(index, key, sc.image, sc.instances, sc.instance_classes, sc.boxes,
                            sc.fills)

    @staticmethod
    def _sample(index, key, image, instances, instance_classes, boxes, fills) -> Sample:
        instances = instances.astype(np.int32)
        lut = np.concatenate([[0], instance_classes]).astype(np.int32)
        areas = np.bincount(instances.ravel(), minlength=len(lut))[1:]
        label = int(instance_classes[int(np.argmax(areas))]) - 1 if len(areas) else 0
        return {"image": image, "key": key, "index": index, "instances": instances,
                "classes": lut[instances], "instance_classes": instance_classes,
                "boxes": boxes, "fills": fills, "label": label}
