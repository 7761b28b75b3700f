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
  annotation's ``bbox``.

An image whose decoded size differs from the JSON's ``height``/``width`` is a bad sample (the
annotation would not line up); so is an annotation pycocotools cannot decode.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from .base import BadSampleError, BaseDataset, DataError, Sample
from .imageio import DEFAULT_MAX_PIXELS, load_image


def _decode(ann: dict, h: int, w: int) -> np.ndarray:
    """One annotation's segmentation → bool [h, w]."""
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    if isinstance(seg, list):  # polygons
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((h, w), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, h, w)
    else:  # compressed RLE
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


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
        if not self.annotations.is_file():
            raise DataError(f"{spec}: annotation file '{self.annotations}' does not exist — "
                            "give a COCO instances JSON, e.g. annotations/instances_val2017.json")
        from pycocotools.coco import COCO

        try:
            # pycocotools prints progress lines to stdout; keep the user's console clean.
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(self.annotations))
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as err:
            raise DataError(f"{spec}: '{self.annotations}' is not a COCO instances JSON ({err!r})") from None
        cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_class = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.category_names = [self.coco.cats[c].get("name", str(c)) for c in cat_ids]
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

    def load(self, index: int) -> Sample:
        info = self.coco.imgs[self.image_ids[index]]
        path = self.images_dir / info["file_name"]
        image = load_image(path, self.max_pixels)
        h, w = int(info["height"]), int(info["width"])
        if image.shape[:2] != (h, w):
            raise BadSampleError(
                str(path), f"image is {image.shape[1]}x{image.shape[0]} but the annotations say "
                f"{w}x{h} (wrong file, or an EXIF rotation the annotations did not apply)"
            )
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"]))
        decoded = []
        for ann in anns:
            if ann.get("category_id") not in self.cat_to_class:
                continue
            try:
                m = _decode(ann, h, w)
            except Exception as err:  # pycocotools raises bare Exceptions/TypeErrors
                raise BadSampleError(str(self.annotations),
                                     f"annotation {ann.get('id')} of {info['file_name']} "
                                     f"cannot be decoded ({err})") from None
            decoded.append((bool(ann.get("iscrowd", 0)), int(m.sum()), ann, m))

        instances = np.zeros((h, w), np.int32)
        classes = np.zeros((h, w), np.int32)
        for crowd, _, ann, m in sorted((d for d in decoded if d[0]), key=lambda d: -d[1]):
            classes[m] = self.cat_to_class[ann["category_id"]]
        objects = sorted((d for d in decoded if not d[0]), key=lambda d: -d[1])
        for i, (_, _, ann, m) in enumerate(objects, start=1):
            instances[m] = i
            classes[m] = self.cat_to_class[ann["category_id"]]
        # Renumber so ids are 1..n over the instances that are still visible.
        present = np.bincount(instances.ravel(), minlength=len(objects) + 1)[1:] > 0
        remap = np.zeros(len(objects) + 1, np.int32)
        remap[1:][present] = np.arange(1, int(present.sum()) + 1)
        instances = remap[instances]
        kept = [o for o, p in zip(objects, present) if p]
        instance_classes = np.array([self.cat_to_class[o[2]["category_id"]] for o in kept], np.int64)
        boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in
                          (o[2].get("bbox", (0, 0, 0, 0)) for o in kept)], np.float32).reshape(-1, 4)
        return {"image": image, "key": info["file_name"], "path": str(path), "index": index,
                "instances": instances, "classes": classes, "instance_classes": instance_classes,
                "boxes": boxes, "image_id": int(info["id"])}
