"""Region sources: where the R-MAE region maps come from.

A source turns one raw sample (full-resolution image, before augmentation) into a stack of
label maps ``int32 [S, H, W]`` — S scales, values 0 = "in no segment", 1..n = segment ids
(ids are per scale). The sampler later pools the segments of every scale that fall inside the
augmented crop (:mod:`rmae.data.sampling`).

Sources (spec strings for :func:`parse_region_source` in brackets):

- :class:`FelzenszwalbSource` (``fh``, ``fh:500,1000,1500``, ``fh:paper``) — the paper's
  default, ``skimage.segmentation.felzenszwalb(img, scale=s, min_size=s)`` at several s.
- :class:`SlicSource` (``slic``, ``slic:16,48``) — SLIC superpixels at several n_segments.
- :class:`GroundTruthSource` (``gt``) — the dataset's instance map (background is no region).
- :class:`PanopticSource` (``panoptic``) — instances plus FH segments of the background.
- :class:`LabelMapSource` (``labelmaps:DIR``) — label-map PNGs a user saved (e.g. SAM masks).

Computing is done once per image and cached on disk (:class:`~rmae.data.cache.RegionCache`);
``source(sample, cache)`` reads the cache or computes and writes it on a miss.

Bounded cost: the segmenting sources (FH, SLIC, panoptic) segment at most
:data:`MAX_REGION_PIXELS` (1 Mpx) — a larger image is reduced by an integer box filter first and
the labels are scaled back to its size with nearest neighbour. FH needs up to ~300 bytes per
pixel (measured on noise), so this caps it near 300 MB and a few seconds per scale, whatever the
image; COCO and ImageNet photos (< 1 Mpx) are segmented at full resolution, as in the paper.
(Images themselves are already bounded on load; see :mod:`rmae.data.imageio`.)

Length (~400 lines): one idea — the region sources and their spec parser; each source is a short
class, and splitting them apart would scatter the one spec grammar users learn.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from PIL import Image

from .base import BadSampleError, DataError, Sample
from .cache import RegionCache, hash_array
from .imageio import reduction_factor
from .transforms import resize_maps_nearest

REGIONS_VERSION = 1  # part of every cache key: bump when a source's output changes
#: The most pixels FH / SLIC / panoptic segment (larger images are reduced first; see above).
MAX_REGION_PIXELS = 1 << 20


class RegionSource:
    """Base class. Subclasses set ``name`` and implement :meth:`segment` and :meth:`params`."""

    name: str = ""
    #: False for sources whose maps are cheaper to re-read than to cache (gt, label maps)
    cacheable: bool = True
    #: raw-sample keys the source needs besides ``image``
    requires: tuple[str, ...] = ()
    #: the most pixels :meth:`segment` is given (None: the source reads maps, it does not segment)
    max_pixels: int | None = None

    def params(self) -> dict[str, Any]:
        return {}

    def segment(self, sample: Sample) -> np.ndarray:  # pragma: no cover - abstract
        """``int32 [S, h, w]`` label maps of the sample as given."""
        raise NotImplementedError

    def compute(self, sample: Sample) -> np.ndarray:
        """``int32 [S, H, W]`` label maps at the image's size; :meth:`segment` runs on a copy
        reduced to at most :attr:`max_pixels` pixels (box filter for the image, nearest
        neighbour for the maps it requires) and its labels are scaled back."""
        h, w = sample["image"].shape[:2]
        f = 1 if self.max_pixels is None else reduction_factor(h, w, self.max_pixels)
        if f == 1:
            return self.segment(sample)
        small = dict(sample, image=np.asarray(Image.fromarray(sample["image"]).reduce(f)))
        hs, ws = small["image"].shape[:2]
        for k in self.requires:
            small[k] = resize_maps_nearest(np.asarray(sample[k]), (0, 0, h, w), (hs, ws))
        return resize_maps_nearest(self.segment(small), (0, 0, hs, ws), (h, w))

    def spec(self) -> str:
        """The spec string that rebuilds this source (for configs and messages)."""
        return self.name

    def fingerprint(self) -> str:
        payload = json.dumps({"name": self.name, "v": REGIONS_VERSION, **self.params()},
                             sort_keys=True, default=str)
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()

    def cache_key(self, sample: Sample) -> str:
        """Hash of the image content, the source parameters and any extra inputs."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.fingerprint().encode())
        h.update(hash_array(sample["image"]).encode())
        for k in self.requires:
            h.update(hash_array(np.asarray(sample[k])).encode())
        return h.hexdigest()

    def check(self, sample: Sample) -> None:
        missing = [k for k in self.requires if k not in sample]
        if missing:
            raise DataError(
                f"region source '{self.spec()}' needs {', '.join(missing)} but sample "
                f"'{sample.get('key')}' has none — use a dataset with ground truth "
                "(scenes, coco:…) or another source (fh, slic)"
            )

    def __call__(self, sample: Sample, cache: RegionCache | None = None) -> np.ndarray:
        """``int32 [S, H, W]`` label maps for ``sample``, through ``cache`` when given."""
        self.check(sample)
        if cache is None or not self.cacheable:
            return self.compute(sample)
        key = self.cache_key(sample)
        hit = cache.get(self.name, key, sample["image"].shape[:2])
        if hit is not None:
            return hit
        labels = self.compute(sample)
        cache.put(self.name, key, labels)
        return labels

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


# --------------------------------------------------------------------------------------------
# Felzenszwalb–Huttenlocher
# --------------------------------------------------------------------------------------------

#: The paper's COCO scales (ImageNet used 1000 alone), in pixels of a full-resolution photo.
PAPER_FH_SCALES = (500, 1000, 1500)
#: Image area (pixels) at which relative scales equal the given ones: a typical full-resolution
#: COCO / ImageNet photo (~500×400), where the paper's values were chosen.
FH_REFERENCE_AREA = 200_000
#: FH's threshold k/|C| is in units of segment size; a purely area-proportional k over-segments
#: small images (texture dominates). Scaling k with area**0.75 keeps the segment count roughly
#: constant from 64² to 500×400 on the embedded data (measured: ~10 segments at the mid scale
#: on scenes at 64² (k≈53), on photos at 224² (k≈354) and at full resolution (k=1000)).
FH_AREA_EXPONENT = 0.75


class FelzenszwalbSource(RegionSource):
    """Multi-scale Felzenszwalb–Huttenlocher segments (every pixel is in one segment).

    ``scales``: FH ``scale`` values, also used as ``min_size`` (the paper's recipe).
    ``relative`` (default True): each scale is multiplied by
    ``(H·W / FH_REFERENCE_AREA) ** FH_AREA_EXPONENT`` for each image, so the defaults give
    comparable segmentations on 64² scenes and on COCO photos. ``relative=False`` applies the
    values literally — the paper's setting for full-resolution COCO/ImageNet images
    (``fh:paper``). ``sigma`` is skimage's default smoothing.
    """

    name = "fh"
    max_pixels = MAX_REGION_PIXELS

    def __init__(self, scales: tuple[float, ...] = PAPER_FH_SCALES, relative: bool = True,
                 sigma: float = 0.8) -> None:
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"FH scales must be positive numbers, got {scales!r}")
        self.scales = tuple(float(s) for s in scales)
        self.relative = bool(relative)
        self.sigma = float(sigma)

    def params(self) -> dict[str, Any]:
        p = {"scales": self.scales, "relative": self.relative, "sigma": self.sigma, "max_pixels": self.max_pixels}
        if self.relative:
            p.update(reference_area=FH_REFERENCE_AREA, exponent=FH_AREA_EXPONENT)
        return p

    def spec(self) -> str:
        scales = ",".join(f"{s:g}" for s in self.scales)
        return f"fh:{scales}" + ("" if self.relative else ":abs")

    def effective_scales(self, height: int, width: int) -> tuple[float, ...]:
        if not self.relative:
            return self.scales
        f = (height * width / FH_REFERENCE_AREA) ** FH_AREA_EXPONENT
        return tuple(max(1.0, s * f) for s in self.scales)

    def segment(self, sample: Sample) -> np.ndarray:
        from skimage.segmentation import felzenszwalb

        img = sample["image"]
        out = [felzenszwalb(img, scale=s, sigma=self.sigma, min_size=max(1, int(round(s)))) + 1
               for s in self.effective_scales(*img.shape[:2])]
        return np.stack(out).astype(np.int32)


class SlicSource(RegionSource):
    """Multi-scale SLIC superpixels, one scale per ``n_segments`` value (compact, grid-like)."""

    name = "slic"
    max_pixels = MAX_REGION_PIXELS

    def __init__(self, n_segments: tuple[int, ...] = (16, 48), compactness: float = 10.0) -> None:
        if not n_segments or any(int(n) < 1 for n in n_segments):
            raise ValueError(f"SLIC n_segments must be positive integers, got {n_segments!r}")
        self.n_segments = tuple(int(n) for n in n_segments)
        self.compactness = float(compactness)

    def params(self) -> dict[str, Any]:
        return {"n_segments": self.n_segments, "compactness": self.compactness, "max_pixels": self.max_pixels}

    def spec(self) -> str:
        return "slic:" + ",".join(map(str, self.n_segments))

    def segment(self, sample: Sample) -> np.ndarray:
        from skimage.segmentation import slic

        img = sample["image"]
        out = [slic(img, n_segments=n, compactness=self.compactness, start_label=1,
                    channel_axis=-1) for n in self.n_segments]
        return np.stack(out).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


class GroundTruthSource(RegionSource):
    """The dataset's instance map as one scale; background (0) is no region."""

    name = "gt"
    cacheable = False  # it *is* the sample's own map
    requires = ("instances",)

    def segment(self, sample: Sample) -> np.ndarray:
        return np.asarray(sample["instances"], np.int32)[None]


class PanopticSource(RegionSource):
    """Instances as segments, plus FH segments of the background pixels ("stuff").

    The background is segmented with FH at one scale (default the middle paper scale, made
    relative to image size as in :class:`FelzenszwalbSource`) and cut to the pixels no instance
    covers; fragments smaller than FH's ``min_size`` after that cut are dropped (label 0).
    One scale only: repeating the instances at several scales would make the sampler pick them
    several times as often.
    """

    name = "panoptic"
    requires = ("instances",)
    max_pixels = MAX_REGION_PIXELS

    def __init__(self, scale: float = 1000, relative: bool = True) -> None:
        self.fh = FelzenszwalbSource((scale,), relative=relative)

    def params(self) -> dict[str, Any]:
        return {"fh": self.fh.params(), "max_pixels": self.max_pixels}

    def spec(self) -> str:
        return "panoptic"

    def segment(self, sample: Sample) -> np.ndarray:
        inst = np.asarray(sample["instances"], np.int32)
        fh = self.fh.segment(sample)[0]
        min_size = int(round(self.fh.effective_scales(*inst.shape)[0]))
        n = int(inst.max(initial=0))
        stuff = np.where(inst == 0, fh, 0)
        ids, inverse, counts = np.unique(stuff, return_inverse=True, return_counts=True)
        keep = (ids > 0) & (counts >= min_size)
        new_ids = np.zeros(len(ids), np.int32)
        new_ids[keep] = n + 1 + np.arange(int(keep.sum()), dtype=np.int32)
        out = np.where(inst > 0, inst, new_ids[inverse.reshape(inst.shape)])
        return out[None].astype(np.int32)


class LabelMapSource(RegionSource):
    """Label-map files saved by the user (SAM, another segmenter, hand annotations).

    ``root`` holds one label map per image, found by the image's key (its path relative to the
    dataset root): ``root/<key with its extension replaced by .png>``, else
    ``root/<key>.png``, else any file under ``root`` with the same stem (if unique). 8- and
    16-bit PNG/TIFF, palette and colour-coded maps are read (see
    :func:`~rmae.data.imageio.load_label_map`); 0 = no segment. A map whose size differs from
    the image but has the same aspect ratio (within 2 %) is resized with nearest neighbour;
    a missing or mismatched map makes the sample bad (skipped, or an error in strict mode).
    """

    name = "labelmaps"
    cacheable = False  # reading the PNG is as cheap as reading a cache entry

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(
                f"labelmaps:{root}: directory '{self.root}' does not exist — point it at the "
                "folder of label-map PNGs (one per image, same relative path or file stem)"
            )
        self._by_stem: dict[str, list[Path]] | None = None

    def params(self) -> dict[str, Any]:
        return {"root": str(self.root)}

    def spec(self) -> str:
        return f"labelmaps:{self.root}"

    def find(self, key: str) -> Path | None:
        rel = Path(key)
        for cand in (self.root / rel.with_suffix(".png"), self.root / (key + ".png"),
                     self.root / rel.with_suffix(".tif"), self.root / rel.with_suffix(".tiff")):
            if cand.is_file():
                return cand
        if self._by_stem is None:
            from .folder import walk_files

            index: dict[str, list[Path]] = {}
            for folder, f in walk_files(self.root):
                if f.lower().endswith((".png", ".tif", ".tiff")):
                    index.setdefault(Path(f).stem, []).append(Path(folder, f))
            self._by_stem = index
        hits = self._by_stem.get(rel.stem, [])
        return hits[0] if len(hits) == 1 else None

    def segment(self, sample: Sample) -> np.ndarray:
        from .imageio import load_label_map

        key = str(sample.get("key", ""))
        path = self.find(key)
        where = sample.get("path", key)
        if path is None:
            raise BadSampleError(str(where), f"no label map for it under '{self.root}' "
                                 f"(looked for {Path(key).with_suffix('.png')} and stem "
                                 f"'{Path(key).stem}')")
        labels = load_label_map(path)
        h, w = sample["image"].shape[:2]
        if labels.shape != (h, w):
            lh, lw = labels.shape
            if abs(lh / lw - h / w) > 0.02 * (h / w):
                raise BadSampleError(str(path), f"label map is {lw}x{lh} but its image {where} "
                                     f"is {w}x{h} (different aspect ratio)")
            rows = np.minimum((np.arange(h) + 0.5) * lh / h, lh - 1).astype(np.intp)
            cols = np.minimum((np.arange(w) + 0.5) * lw / w, lw - 1).astype(np.intp)
            labels = labels[rows[:, None], cols[None, :]]
        return labels[None].astype(np.int32)


# --------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------

REGION_SOURCE_FORMS = ("fh", "fh:S1,S2,...", "fh:paper", "slic", "slic:N1,N2,...", "gt",
                       "panoptic", "labelmaps:DIR")


#: At most this many scales per source (each is one more segmentation of every image).
MAX_SCALES = 8


def _numbers(text: str, what: str, spec: str, high: float, integers: bool = False) -> tuple[float, ...]:
    """Comma-separated positive finite numbers ≤ ``high`` (whole numbers if ``integers``)."""
    example = "slic:16,48" if integers else "fh:500,1000,1500"
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise DataError(f"region source '{spec}': {what} must be comma-separated numbers, e.g. {example}") from None
    if not vals or len(vals) > MAX_SCALES:
        raise DataError(f"region source '{spec}': give 1 to {MAX_SCALES} {what}, e.g. {example}")
    if not all(math.isfinite(v) and 0 < v <= high and (not integers or v.is_integer()) for v in vals):
        kind = "whole numbers" if integers else "numbers"
        raise DataError(f"region source '{spec}': {what} must be positive {kind} of at most {high:g}, e.g. {example}")
    return vals


def parse_region_source(spec: str | RegionSource | None, data_root: str | Path | None = None
                        ) -> RegionSource | None:
    """Build a region source from its spec string (see module docstring); None/"none" → None.

    ``fh:…`` values are relative to image size (see :class:`FelzenszwalbSource`); append
    ``:abs`` (``fh:1000:abs``) or use ``fh:paper`` (= ``fh:500,1000,1500:abs``) for the
    paper's literal values. ``labelmaps`` without a directory looks for ``<data_root>_labelmaps``
    beside the dataset's image folder.
    """
    if spec is None or isinstance(spec, RegionSource):
        return spec
    s = str(spec).strip()
    kind, _, rest = s.partition(":")
    kind = kind.lower()
    if kind in ("", "none"):
        return None
    if kind == "fh":
        if rest == "paper":
            return FelzenszwalbSource(PAPER_FH_SCALES, relative=False)
        relative = True
        if rest.endswith(":abs"):
            rest, relative = rest[: -len(":abs")], False
        scales = _numbers(rest, "FH scales", s, high=1e7) if rest else PAPER_FH_SCALES
        return FelzenszwalbSource(scales, relative=relative)
    if kind == "slic":
        n = _numbers(rest, "SLIC segment counts", s, high=10_000, integers=True) if rest else (16, 48)
        return SlicSource(tuple(int(v) for v in n))
    if kind in ("gt", "instances"):
        return GroundTruthSource()
    if kind == "panoptic":
        return PanopticSource()
    if kind in ("labelmaps", "labelmap", "sam"):
        if not rest:
            if data_root is None:
                raise DataError(f"region source '{s}' needs a directory: labelmaps:DIR")
            rest = str(Path(data_root).expanduser()).rstrip("/") + "_labelmaps"
        return LabelMapSource(rest)
    raise DataError(f"unknown region source '{s}'; use one of: {', '.join(REGION_SOURCE_FORMS)}")
