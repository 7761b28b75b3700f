"""``coco:IMAGES_DIR:ANNOTATIONS_JSON`` — COCO-format instance annotations as dense maps.

Masks are decoded with pycocotools from polygons, uncompressed RLE (``counts`` a list) and
compressed RLE (``counts`` a string). Each image yields:

- ``instances`` int32 [H, W]: non-crowd annotations painted in order of decreasing mask area
  (larger objects first, so small objects lying on them stay visible); ids 1..n follow that
  order; an annotation left with no visible pixel is dropped.
- ``classes`` int32 [H, W]: contiguous category ids 1..C (COCO's ids sorted; 0 = background),
  painted in the same order, crowd annotations included (their pixels are that category, they
  just are not single objects), crowds first so a listed object on top of a crowd wins.
- ``instance_classes`` int64 [n], ``boxes`` float32 [n, 4] (x0, y0, x1, y1) from the
  annotation's ``bbox`` (from the mask when the annotation has none).

An image whose decoded size differs from the JSON's ``height``/``width`` is a bad sample (the
annotation would not line up).

Hostile or damaged files never reach pycocotools' C code in a form that can crash it (a
polygon coordinate of 1e12 or NaN, an RLE whose counts do not add up, would make it read or
write out of bounds). The JSON is read only from a regular file of at most
:data:`MAX_ANNOTATION_BYTES`; a file that is not a COCO document (not a mapping, ``images``
not a list, …) is refused with one :class:`DataError`, and entries that cannot be indexed (no
integer ``id``) are left out with one warning line. Everything else is checked per image, when
it is loaded:

- an image entry needs a ``file_name`` and whole-number ``height``/``width`` of at most
  :data:`~rmae.data.imageio.MAX_WORKING_PIXELS` pixels; otherwise the image is skipped with a
  word, like an unreadable file;
- an annotation needs a known ``category_id`` and a segmentation that is polygons of finite
  coordinates within the image's own size around it (``-W ≤ x ≤ 2W``, ``-H ≤ y ≤ 2H``) and of
  total length at most :data:`MAX_POLYGON_PERIMETER` pixels, or an RLE of the image's size whose
  counts are non-negative and add up to H·W; its ``bbox``, if present, is four finite numbers.
  A bad annotation is skipped with a word (``rmae.data: skipping FILE (annotation id N): …``)
  and the rest of the image is used. ``area`` is never read.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..io import read_regular
from .base import BadSampleError, BaseDataset, DataError, Sample
from .imageio import DEFAULT_MAX_PIXELS, MAX_WORKING_PIXELS, load_image

#: The largest annotation JSON read (COCO train2017 instances: 448 MB).
MAX_ANNOTATION_BYTES = 2 * 2**30
#: The longest outline (sum of max(|dx|, |dy|) over a mask's polygon edges, in pixels) decoded:
#: pycocotools allocates ~80 bytes per pixel of outline.
MAX_POLYGON_PERIMETER = 1 << 20


class _Bad(Exception):
    """An annotation or image entry that cannot be used (the message says why)."""


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _polygons(seg: list, h: int, w: int) -> list[list[float]]:
    """Checked polygons (flat x, y lists with at least 3 points) of a segmentation list."""
    polys, perimeter = [], 0.0
    for poly in seg:
        if not isinstance(poly, list) or len(poly) % 2:
            raise _Bad("a polygon is not a flat list of x, y pairs")
        try:
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError, OverflowError):
            raise _Bad("a polygon holds something other than numbers") from None
        if not np.isfinite(xy).all():
            raise _Bad("a polygon coordinate is not a finite number")
        x, y = xy[:, 0], xy[:, 1]
        if x.min(initial=0) < -w or x.max(initial=0) > 2 * w or y.min(initial=0) < -h or y.max(initial=0) > 2 * h:
            far = float(np.abs(xy).max())
            raise _Bad(f"a polygon coordinate ({far:.4g}) lies far outside the {w}x{h} image")
        if len(xy) < 3:
            continue  # a degenerate polygon covers no pixel
        edges = np.abs(np.diff(xy, axis=0, append=xy[:1]))
        perimeter += float(edges.max(axis=1).sum())
        polys.append(xy.ravel().tolist())
    if perimeter > MAX_POLYGON_PERIMETER:
        raise _Bad(f"its polygons' outline is {perimeter:.0f} pixels long, more than {MAX_POLYGON_PERIMETER}")
    return polys


def _rle_string_counts(counts: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, in Python,
    so that a malformed string is an error here rather than a read past its end in C)."""
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise _Bad("its RLE string ends in the middle of a number")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise _Bad(f"its RLE string holds {counts[p]!r}, not a COCO RLE character")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
            if k > 13:
                raise _Bad("its RLE string holds a number too long to be a run length")
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _rle(seg: dict, h: int, w: int) -> dict:
    """A checked RLE (``size`` [h, w], counts non-negative and adding up to h·w)."""
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_whole(v) for v in size)) or size != [h, w]:
        raise _Bad(f"its RLE size {size!r} is not the image's [height, width] = [{h}, {w}]")
    if isinstance(counts, list):
        runs = counts
        if not all(_whole(v) for v in runs):
            raise _Bad("its RLE counts hold something other than whole numbers")
    elif isinstance(counts, str):
        runs = _rle_string_counts(counts)
    else:
        raise _Bad(f"its RLE counts are a {type(counts).__name__}, not a list or a string")
    if any(v < 0 for v in runs):
        raise _Bad("its RLE counts include a negative run length")
    if sum(runs) != h * w:
        raise _Bad(f"its RLE counts add up to {sum(runs)}, not to the image's {w}x{h} = {h * w} pixels")
    if isinstance(counts, list):
        return {"size": [h, w], "counts": counts}
    return {"size": [h, w], "counts": counts.encode("ascii")}


def _decode(seg: Any, h: int, w: int) -> np.ndarray:
    """One annotation's segmentation, checked (see module docstring) → bool [h, w]."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        polys = _polygons(seg, h, w)
        if not polys:
            return np.zeros((h, w), bool)
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)
    if isinstance(seg, dict):
        rle = _rle(seg, h, w)
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, h, w)
        return mask_utils.decode(rle).astype(bool)
    raise _Bad(f"its segmentation is a {type(seg).__name__}, not polygons or an RLE")


def _box(ann: dict, mask: np.ndarray) -> list[float]:
    """(x0, y0, x1, y1) from the annotation's ``bbox``, or from the mask when it has none."""
    bbox = ann.get("bbox")
    if bbox is None:
        ys, xs = np.nonzero(mask)
        if not len(xs):
            return [0.0, 0.0, 0.0, 0.0]
        return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    ok = isinstance(bbox, list) and len(bbox) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    if not ok:
        raise _Bad(f"its bbox {str(bbox)[:60]} is not four finite numbers [x, y, width, height]")
    x, y, bw, bh = bbox
    return [x, y, x + bw, y + bh]


def _read_document(path: Path, spec: str) -> dict:
    """The JSON document, or one :class:`DataError` saying why it is not a COCO file."""
    try:
        doc = json.loads(read_regular(path, MAX_ANNOTATION_BYTES))
    except FileNotFoundError:
        raise DataError(f"{spec}: annotation file '{path}' does not exist — give a COCO instances JSON, "
                        "e.g. annotations/instances_val2017.json") from None
    except (IsADirectoryError, ValueError, RecursionError, OSError) as err:  # JSONDecodeError, bad UTF-8
        why = " ".join(str(err).replace(f"{path}: ", "").split())[:200]
        raise DataError(f"{path}: is not a COCO instances JSON ({why})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        got = type(doc.get("images") if isinstance(doc, dict) else doc).__name__
        raise DataError(f"{path}: is not a COCO instances JSON (expected a mapping with an \"images\" list, got {got})")
    for key in ("annotations", "categories"):
        if not isinstance(doc.get(key, []), list):
            raise DataError(f"{path}: is not a COCO instances JSON (\"{key}\" is a {type(doc[key]).__name__}, "
                            "not a list)")
    return doc


def _indexable(doc: dict) -> tuple[dict, list[str]]:
    """The document with only entries pycocotools can index (dicts with whole-number ids, the
    first of each id; annotations of a listed image), and what was left out."""
    dropped: list[str] = []
    clean: dict[str, list] = {}
    for key, need in (("images", ("id",)), ("categories", ("id",)),
                      ("annotations", ("id", "image_id", "category_id"))):
        seen: set[int] = set()
        kept = []
        for entry in doc.get(key, []):
            if not isinstance(entry, dict) or not all(_whole(entry.get(k)) for k in need):
                dropped.append(f"{key} entry {str(entry)[:60]} has no whole-number {'/'.join(need)}")
            elif entry["id"] in seen:
                dropped.append(f"{key} entry id {entry['id']} is listed twice (the first is used)")
            else:
                seen.add(entry["id"])
                kept.append(entry)
        clean[key] = kept
    image_ids = {im["id"] for im in clean["images"]}
    orphans = [a for a in clean["annotations"] if a["image_id"] not in image_ids]
    if orphans:
        dropped.append(f"{len(orphans)} annotation(s) of image ids not in \"images\" (e.g. {orphans[0]['image_id']})")
        clean["annotations"] = [a for a in clean["annotations"] if a["image_id"] in image_ids]
    return {**doc, **clean}, dropped


class CocoDataset(BaseDataset):
    """A COCO instances JSON over an image folder (see module docstring).

    ``skip_empty``: drop images without any annotation (default False: for pre-training every
    image is useful).
    """

    has_instances = True

    def __init__(self, images_dir: str | Path, annotations: str | Path, strict: bool = False,
                 skip_empty: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(strict=strict)
        self.images_dir = Path(images_dir).expanduser()
        self.annotations = Path(annotations).expanduser()
        spec = f"coco:{images_dir}:{annotations}"
        if not self.images_dir.is_dir():
            raise DataError(f"{spec}: image directory '{self.images_dir}' does not exist — "
                            "give the folder holding the images, e.g. coco:/data/coco/val2017:"
                            "/data/coco/annotations/instances_val2017.json")
        doc, dropped = _indexable(_read_document(self.annotations, spec))
        if dropped:
            self.skips.record(str(self.annotations), f"left out {len(dropped)} entries that are not COCO records "
                                                     f"(e.g. {dropped[0]})")
        from pycocotools.coco import COCO

        self.coco = COCO()
        self.coco.dataset = doc
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()
        cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_class = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.category_names = [str(self.coco.cats[c].get("name", c)) for c in cat_ids]
        ids = sorted(self.coco.getImgIds())
        if skip_empty:
            ids = [i for i in ids if self.coco.getAnnIds(imgIds=i)]
        self.image_ids = ids
        self.max_pixels = max_pixels

    @property
    def root(self) -> Path:
        """The image folder (keys are file names relative to it)."""
        return self.images_dir

    def __len__(self) -> int:
        return len(self.image_ids)

    def _image_entry(self, info: dict) -> tuple[str, int, int]:
        """(file name, height, width) of an image entry, checked."""
        name, h, w = info.get("file_name"), info.get("height"), info.get("width")
        where = f"{self.annotations} (image id {info['id']})"
        if not isinstance(name, str) or not name:
            raise BadSampleError(where, f"file_name {name!r} is not a file name")
        if not (_whole(h) and _whole(w) and h > 0 and w > 0):
            raise BadSampleError(where, f"height={h!r}, width={w!r} are not positive whole numbers")
        if h * w > min(MAX_WORKING_PIXELS, self.max_pixels):
            raise BadSampleError(where, f"{w}x{h} is more than the {min(MAX_WORKING_PIXELS, self.max_pixels)} "
                                        "pixels rmae decodes masks at")
        return name, h, w

    def load(self, index: int) -> Sample:
        info = self.coco.imgs[self.image_ids[index]]
        name, h, w = self._image_entry(info)
        path = self.images_dir / name
        image = load_image(path, self.max_pixels)
        if image.shape[:2] != (h, w):
            raise BadSampleError(
                str(path), f"image is {image.shape[1]}x{image.shape[0]} but the annotations say "
                f"{w}x{h} (wrong file, or an EXIF rotation the annotations did not apply)"
            )
        decoded, skipped = [], []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"])):
            try:
                if ann["category_id"] not in self.cat_to_class:
                    raise _Bad(f"category_id {ann['category_id']} is not among the categories")
                crowd = ann.get("iscrowd", 0)
                if crowd not in (0, 1):  # also False / True
                    raise _Bad(f"iscrowd {str(crowd)[:40]} is not 0 or 1")
                m = _decode(ann.get("segmentation"), h, w)
                box = _box(ann, m)
            except _Bad as bad:
                skipped.append((f"{self.annotations} (annotation id {ann['id']})", f"{bad}; annotation skipped"))
                continue
            decoded.append((bool(crowd), int(m.sum()), ann, m, box))
        if skipped and self.strict:
            raise BadSampleError(*skipped[0])

        instances = np.zeros((h, w), np.int32)
        classes = np.zeros((h, w), np.int32)
        for _, _, ann, m, _ in sorted((d for d in decoded if d[0]), key=lambda d: -d[1]):
            classes[m] = self.cat_to_class[ann["category_id"]]
        objects = sorted((d for d in decoded if not d[0]), key=lambda d: -d[1])
        for i, (_, _, ann, m, _) in enumerate(objects, start=1):
            instances[m] = i
            classes[m] = self.cat_to_class[ann["category_id"]]
        # Renumber so ids are 1..n over the instances that are still visible.
        present = np.bincount(instances.ravel(), minlength=len(objects) + 1)[1:] > 0
        remap = np.zeros(len(objects) + 1, np.int32)
        remap[1:][present] = np.arange(1, int(present.sum()) + 1)
        instances = remap[instances]
        kept = [o for o, p in zip(objects, present) if p]
        instance_classes = np.array([self.cat_to_class[o[2]["category_id"]] for o in kept], np.int64)
        boxes = np.array([o[4] for o in kept], np.float32).reshape(-1, 4)
        return {"image": image, "key": name, "path": str(path), "index": index,
                "instances": instances, "classes": classes, "instance_classes": instance_classes,
                "boxes": boxes, "image_id": int(info["id"]), "skipped": skipped}
