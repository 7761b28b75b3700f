"""Frozen-encoder features of a dataset: one vector (or token grid) per image, with its labels.

    from analysis.features import extract_features
    feats = extract_features(model, "scenes:train:2000", layer=-1, pool="cls")
    feats.features      # float32 [N, D]   (pool "cls" | "mean")  or  float16 [N, L, D] ("tokens")
    feats.labels        # int64 [N] image labels (-1 where the data has none)
    feats.patch_labels  # int64 [N, L] majority ground-truth category of each patch (0 = background)
    feats.classes       # pixel category maps [N, H, W] (uint8/int16/int32; "tokens" only)

``model`` is any encoder :mod:`analysis.encoder` accepts (ours or a timm ViT, with any number of
prefix tokens); extraction runs on the model's device. Run folders go through
:func:`analysis.feature_cache.load_features`, which extracts once and caches on disk.

Layers: ``layer`` is a block index of the encoder (negative counts from the end). The last block
(``-1``, the default) is followed by the encoder's final norm, so it equals
``model.forward_features``; earlier blocks give their raw residual-stream output (no norm), the
convention of layer-wise probing studies.

Pooling: ``cls`` is the cls token; ``mean`` averages the ``L`` patch tokens (prefix tokens —
cls, registers, distillation token — excluded, as MAE's global pool and timm's ``avg``);
``tokens`` keeps exactly the ``L`` patch tokens, in row-major grid order.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rmae.errors import UserError

from . import encoder
from .groundtruth import patch_labels as majority_patch_labels

POOLINGS = ("cls", "mean", "tokens")
#: Bump when extraction semantics change (which tensor is pooled, the norm, label rules):
#: part of every cache key, so old entries are ignored.
FEATURES_VERSION = 1


class FeatureError(UserError, ValueError):
    """Features cannot be extracted as asked (bad layer or pooling); the message says what to use."""


def check_pool(pool: str) -> str:
    if pool not in POOLINGS:
        raise FeatureError(f"pool must be one of {', '.join(POOLINGS)}, got {pool!r}")
    return pool


def check_layer(layer: int, depth: int) -> int:
    """``layer`` as a block index ``0..depth-1`` (:func:`analysis.encoder.normalize_layer`), or
    a :class:`FeatureError` naming the valid range."""
    try:
        return encoder.normalize_layer(layer, depth)
    except ValueError as e:
        raise FeatureError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# what the data are


def data_fingerprint(base: Any, spec: Any) -> dict[str, Any]:
    """What identifies the images of a raw dataset beyond its spec string.

    scenes: generator version and seed (images are a pure function of them); folder: every
    file's relative path, size and mtime; coco: the annotation file's size/mtime and every
    listed image's size/mtime; photos: scikit-image's version (it ships the files).
    """
    from rmae.data import scenes as scenes_mod

    fp: dict[str, Any] = {"type": type(base).__name__, "len": len(base)}
    if spec.kind == "scenes":
        fp.update(version=scenes_mod.SCENES_VERSION, seed=getattr(base, "seed", None),
                  size=getattr(base, "size", None))
        return fp
    h = hashlib.sha256()

    def stat(p: Path) -> None:
        try:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())

    if spec.kind == "folder":
        for rel in base.files:
            stat(base.root / rel)
    elif spec.kind == "coco":
        stat(base.annotations)
        for i in base.image_ids:
            stat(base.images_dir / base.coco.imgs[i]["file_name"])
    elif spec.kind == "photos":
        import skimage

        h.update(skimage.__version__.encode())
    fp["files"] = h.hexdigest()
    return fp


def data_slug(spec: Any) -> str:
    """Short readable name of a data spec for file names (paths collapse to a hash)."""
    if spec.kind == "scenes":
        return "scenes-" + (spec.split or "train") + (f"-{spec.length}" if spec.length else "")
    if spec.kind == "photos":
        return "photos"
    return f"{spec.kind}-{hashlib.sha256(str(spec).encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------
# the result


@dataclass
class Features:
    """Extracted features of one dataset (see module docstring for the arrays)."""

    features: torch.Tensor  # float32 [N, D] (cls/mean) | float16 [N, L, D] (tokens)
    labels: torch.Tensor  # int64 [N], -1 where the data has no image label
    patch_labels: torch.Tensor | None  # int64 [N, L] or None (no category maps)
    classes: torch.Tensor | None  # [N, H, W] pixel categories (tokens only) or None
    layer: int
    pool: str
    grid: tuple[int, int]  # (h, w) patch grid
    image_hw: tuple[int, int]
    num_classes: int  # image classes (0: no labels)
    num_categories: int  # categories of the pixel maps, excluding background (0: none)
    spec: str
    class_names: list[str] | None = None  # names of labels 0..num_classes-1, when the data have them
    cache_hit: bool = False
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def has_labels(self) -> bool:
        return self.num_classes > 0 and bool((self.labels >= 0).all())


def to_features(arrays: dict[str, np.ndarray], meta: dict[str, Any], *, cache_hit: bool,
                path: Path | None) -> Features:
    """:class:`Features` over ``arrays`` (numpy, shared, not copied) described by ``meta``."""
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return Features(
        features=t["features"], labels=t["labels"], patch_labels=t.get("patch_labels"),
        classes=t.get("classes"), layer=meta["layer"], pool=meta["pool"],
        grid=tuple(meta["grid"]), image_hw=tuple(meta["image_hw"]),
        num_classes=meta["num_classes"], num_categories=meta["num_categories"],
        spec=meta["data"], class_names=meta.get("class_names"), cache_hit=cache_hit, path=path, meta=meta)


# ---------------------------------------------------------------------------------------------
# extraction


def _map_dtype(num_labels: int) -> np.dtype:
    return np.dtype(np.uint8 if num_labels <= 256 else np.int16 if num_labels <= 32768 else np.int32)


class Arrays:
    """Output arrays, filled batch by batch: ``.npy`` memmaps in ``folder`` (bounded RAM, and
    they are the cache entry) or plain numpy arrays when ``folder`` is None."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.arrays: dict[str, np.ndarray] = {}

    def alloc(self, name: str, shape: tuple[int, ...], dtype: Any, fill: Any = None) -> np.ndarray:
        if self.folder is None:
            a = np.empty(shape, dtype=dtype)
        else:
            a = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        if fill is not None:
            a[...] = fill
        self.arrays[name] = a
        return a

    def finish(self) -> None:
        for a in self.arrays.values():
            if isinstance(a, np.memmap):
                a.flush()


@torch.no_grad()
def extract_into(model: nn.Module, base: Any, out: Arrays, *, layer: int, pool: str, data_seed: int = 0,
                 crop_pct: float = 1.0, batch_size: int = 64, num_workers: int = 0, progress: bool = True,
                 desc: str = "features") -> dict[str, Any]:
    """Run ``model`` (in eval mode, on its own device) over the raw dataset ``base`` and fill
    ``out``; returns the meta fields it learned. ``layer`` is already a block index."""
    from rmae.data import evaluation_loader

    info = encoder.describe(model)
    if pool == "cls" and not info.has_cls:
        raise FeatureError(f"{info.name} has no cls token: use pool 'mean' (or 'tokens')")
    hw, p, P = info.input_size, info.patch_size, info.num_prefix_tokens
    L, D, N = info.grid[0] * info.grid[1], info.embed_dim, len(base)
    loader = evaluation_loader(base, hw, batch_size=batch_size, seed=data_seed, crop_pct=crop_pct,
                               num_workers=num_workers)
    num_categories = int(getattr(base, "num_categories", 0) or 0)
    num_classes = int(getattr(base, "num_classes", 0) or 0)
    feats = out.alloc("features", (N, L, D) if pool == "tokens" else (N, D),
                      np.float16 if pool == "tokens" else np.float32)
    labels = out.alloc("labels", (N,), np.int64, fill=-1)
    patch_labels = classes = None
    device = encoder.model_device(model)
    was_training = model.training
    model.eval()
    i = 0
    bar = tqdm(total=N, desc=desc, unit="img", disable=not progress, leave=False, file=sys.stderr)
    try:
        for batch in loader:
            b = batch["images"].shape[0]
            x = encoder.block_tokens(model, batch["images"].to(device), [layer])[0].float()  # [b, P + L, D]
            # float16 halves the disk/RAM of [N, L, D] tokens; probes upcast per minibatch
            f = x[:, P:].half() if pool == "tokens" else encoder.pool_tokens(x, pool, P)
            feats[i: i + b] = f.cpu().numpy()
            if "label" in batch:
                labels[i: i + b] = batch["label"].numpy()
            if "classes" in batch:
                cmap = batch["classes"]
                if patch_labels is None:
                    patch_labels = out.alloc("patch_labels", (N, L), np.int64)
                    if pool == "tokens":  # pixel maps only serve the dense probe (tokens)
                        # Unnamed categories (num_categories 0) could exceed any small dtype later.
                        classes = out.alloc("classes", (N, *hw),
                                            _map_dtype(num_categories + 1) if num_categories else np.int32)
                patch_labels[i: i + b] = majority_patch_labels(cmap, p).numpy()
                if classes is not None:
                    classes[i: i + b] = cmap.numpy().astype(classes.dtype)
            i += b
            bar.update(b)
    finally:
        bar.close()
        model.train(was_training)
    out.finish()
    skipped = loader.dataset.skips.count
    if skipped:
        print(f"analysis.features: {loader.dataset.summary()}", file=sys.stderr)
    if num_categories == 0 and patch_labels is not None:
        num_categories = int(patch_labels.max())
    return {"grid": list(info.grid), "image_hw": list(hw), "patch_size": p, "embed_dim": D,
            "num_prefix_tokens": P,
            "num_classes": num_classes if bool((labels >= 0).all()) else 0,
            "num_categories": num_categories if patch_labels is not None else 0,
            "class_names": list(base.class_names) if getattr(base, "class_names", None) else None,
            "skipped": skipped}


def extract_features(model: nn.Module, data: Any, *, layer: int = -1, pool: str = "cls", data_seed: int = 0,
                     crop_pct: float = 1.0, batch_size: int = 64, num_workers: int = 0,
                     progress: bool = True) -> Features:
    """Features of ``data`` (a data spec) from ``model`` at block ``layer`` with pooling ``pool``,
    in memory, without any cache. The model runs on its own device (move it first).

    Images are produced at the model's input size (scenes are generated at it; other data are
    centre-cropped by ``crop_pct`` and resized). See :class:`Features` for what comes back.
    """
    from rmae.data import build_dataset, parse_data_spec

    check_pool(pool)
    spec = parse_data_spec(data)
    layer_n = check_layer(layer, len(model.blocks))
    base = build_dataset(spec, image_size=max(encoder.input_size(model)), seed=data_seed)
    out = Arrays(None)
    meta = extract_into(model, base, out, layer=layer_n, pool=pool, data_seed=data_seed, crop_pct=crop_pct,
                        batch_size=batch_size, num_workers=num_workers, progress=progress,
                        desc=f"features {spec}")
    meta.update(layer=layer_n, pool=pool, data=str(spec))
    return to_features(out.arrays, meta, cache_hit=False, path=None)
