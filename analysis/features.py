"""Frozen-encoder features for probes, extracted once and cached per run, layer and pooling.

    from analysis.features import load_features
    feats = load_features("runs/mae", "scenes:train:2000", layer=-1, pool="cls")
    feats.features      # float32 [N, D]   (pool "cls" | "mean")  or  float16 [N, L, D] ("tokens")
    feats.labels        # int64 [N] image labels (-1 where the data has none)
    feats.patch_labels  # int64 [N, L] majority ground-truth category of each patch (0 = background)
    feats.classes       # pixel category maps [N, H, W] (uint8/int16/int32; "tokens" only)
    feats.cache_hit     # True when read back from disk

Layers: ``layer`` is a block index of the encoder (negative counts from the end). The last block
(``-1``, the default, or ``depth - 1``) is followed by the encoder's final LayerNorm, so it equals
``model.forward_features``; earlier blocks give their raw residual-stream output (no norm), the
convention of layer-wise probing studies.

Cache: ``RUN/analysis/features/<data>_<size>_L<layer>_<pool>_<key>/`` holds ``.npy`` arrays and
``meta.json``. The key is a SHA-256 over everything that determines the arrays: the **content
digest of the weights file** the run folder resolves to (``checkpoints/latest.json``,
``model.safetensors`` …) and of its ``model_config``, the canonical data spec with a fingerprint
of its files (paths, sizes, mtimes) or generator version, the data seed, image size, crop,
layer, pooling and :data:`FEATURES_VERSION`. A retrained or re-imported run therefore never reads
stale features; entries made stale by new weights are deleted when the new entry is written.
Entries are written to a temporary folder and renamed into place, so a killed extraction never
leaves a half entry that a later run would trust. Arrays are memory-mapped when read back, so
token features larger than RAM stay on disk until a minibatch touches them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

POOLINGS = ("cls", "mean", "tokens")
#: Bump when extraction semantics change (which tensor is pooled, the norm, label rules):
#: part of every cache key, so old entries are ignored.
FEATURES_VERSION = 1

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------
# what a run's weights are


@dataclass(frozen=True)
class RunWeights:
    """The weights a run folder resolves to, identified by content.

    ``path``: the weights file ``rmae.load_model(run)`` reads; ``digest``: SHA-256 of its bytes
    and of the folder's ``model_config``; ``depth``: number of encoder blocks; ``image_size``:
    the model's input side (the larger one for non-square inputs).
    """

    run: Path
    path: Path
    digest: str
    depth: int
    image_size: int


def _header_config(path: Path) -> tuple[dict[str, Any], int | None]:
    """(saved rmae config or {}, encoder depth counted from ``blocks.{i}`` keys or None) from a
    safetensors header — no tensor is read. ({}, None) when the file is not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError):
        return {}, None
    try:
        cfg = json.loads(meta.get("rmae_config", "{}"))
    except ValueError:
        cfg = {}
    idx = {int(m.group(1)) for k in keys if (m := re.search(r"(?:^|\.)blocks\.(\d+)\.", k))}
    return (cfg if isinstance(cfg, dict) else {}), (max(idx) + 1 if idx else None)


def resolve_run(run: PathLike) -> RunWeights:
    """Identify the weights of run folder ``run`` without building the model.

    Raises ``rmae.CheckpointError`` (a clear one-line message) when ``run`` is not a run folder
    or holds no weights.
    """
    from rmae import CheckpointError
    from rmae.runfolder import RunFolder

    run = Path(run)
    if not run.exists():
        raise CheckpointError(f"{run}: no such run folder")
    if not run.is_dir():
        raise CheckpointError(f"{run}: is a checkpoint file, not a run folder; make one with "
                              f"`rmae import {run} --out RUN` and probe RUN")
    folder = RunFolder(run)
    # The same resolution rmae.load_model uses (latest.json pointer, model.safetensors, newest
    # checkpoint), so the digest names the very file whose weights the features come from.
    weights = folder.weights_path()
    digest = folder.digest()
    model_config = folder.model_config()
    header, depth_from_keys = _header_config(weights)
    # rmae.load_model builds from the folder's model_config when there is one, else the file's.
    cfg = model_config if isinstance(model_config, dict) else header
    depth, size = cfg.get("depth", depth_from_keys), cfg.get("img_size")
    if depth is None or size is None:  # a foreign file format: building the model is the only way
        from rmae import load_model

        mc = load_model(run).config
        depth, size = mc.depth, mc.img_size
    size = max(size) if isinstance(size, (list, tuple)) else size
    return RunWeights(run=run, path=weights, digest=digest, depth=int(depth), image_size=int(size))


def normalize_layer(layer: int, depth: int) -> int:
    """Block index in ``0..depth-1`` for ``layer`` in ``-depth..depth-1``; ValueError otherwise."""
    if not -depth <= int(layer) < depth:
        raise ValueError(f"layer {layer} is out of range for a {depth}-block encoder "
                         f"(use 0..{depth - 1}, or -1 for the last block)")
    return int(layer) % depth


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
# extraction


@torch.no_grad()
def block_tokens(model: torch.nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """Tokens after encoder block ``layer`` (already normalised to ``0..depth-1``).

    images: float [B, 3, H, W] (ImageNet-normalised, the model's size) → float [B, 1+L, D],
    cls first. Blocks after ``layer`` are not run. The last block gets the final LayerNorm, so
    ``layer = depth-1`` equals ``model.forward_features(images)``.
    """
    model._check_images(images)  # the model's own clear size error
    x = model.patch_embed(images) + model.pos_embed[:, 1:, :]
    cls = (model.cls_token + model.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in model.blocks[: layer + 1]:
        x = blk(x)
    if layer == len(model.blocks) - 1:
        x = model.norm(x)
    return x


def patch_majority(classes: torch.Tensor, patch: int, num_labels: int) -> torch.Tensor:
    """Majority ground-truth category of every patch.

    classes: int64 [B, H, W] (0 = background, 1..C) → int64 [B, (H//p)·(W//p)] in row-major
    patch order (the ViT's token order). Ties go to the smaller id (``argmax`` returns the first
    maximum), so a half-background patch counts as background. ``num_labels`` ≥ max id + 1.
    """
    B, H, W = classes.shape
    h, w = H // patch, W // patch
    c = classes[:, : h * patch, : w * patch].reshape(B, h, patch, w, patch)
    c = c.permute(0, 1, 3, 2, 4).reshape(B * h * w, patch * patch)
    # scatter_add of counts: B·L·(C+1) memory, where one_hot would need B·L·p²·(C+1).
    counts = torch.zeros(B * h * w, num_labels, dtype=torch.int32)
    counts.scatter_add_(1, c, torch.ones_like(c, dtype=torch.int32))
    return counts.argmax(1).view(B, h * w)


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


def _map_dtype(num_labels: int) -> np.dtype:
    return np.dtype(np.uint8 if num_labels <= 256 else np.int16 if num_labels <= 32768 else np.int32)


class _Arrays:
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


def _extract_into(model: torch.nn.Module, base: Any, out: _Arrays, *, layer: int, pool: str,
                  crop_pct: float, batch_size: int, num_workers: int, device: torch.device,
                  progress: bool, desc: str) -> dict[str, Any]:
    """Run the encoder over ``base`` and fill ``out``; returns the meta fields it learned."""
    from rmae.data import RegionDataset, collate_regions

    cfg = model.config
    hw = tuple(cfg.image_hw)
    p = cfg.patch_size
    grid = (hw[0] // p, hw[1] // p)
    L, D, N = grid[0] * grid[1], cfg.embed_dim, len(base)
    ds = RegionDataset(base, source=None, cache=None, image_size=hw, train=False, crop_pct=crop_pct)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_regions)
    num_categories = int(getattr(base, "num_categories", 0) or 0)
    num_classes = int(getattr(base, "num_classes", 0) or 0)
    feats = out.alloc("features", (N, L, D) if pool == "tokens" else (N, D),
                      np.float16 if pool == "tokens" else np.float32)
    labels = out.alloc("labels", (N,), np.int64, fill=-1)
    patch_labels = classes = None
    model = model.to(device).eval()
    i = 0
    bar = tqdm(total=N, desc=desc, unit="img", disable=not progress, leave=False, file=sys.stderr)
    for batch in loader:
        b = batch["images"].shape[0]
        x = block_tokens(model, batch["images"].to(device), layer).float()
        if pool == "cls":
            f = x[:, 0]
        elif pool == "mean":
            f = x[:, 1:].mean(1)
        else:  # float16 halves the disk/RAM of [N, L, D]; probes upcast per minibatch
            f = x[:, 1:].half()
        feats[i: i + b] = f.cpu().numpy()
        if "label" in batch:
            labels[i: i + b] = batch["label"].numpy()
        if "classes" in batch:
            cmap = batch["classes"]
            n_lab = max(num_categories + 1, int(cmap.max()) + 1)
            if patch_labels is None:
                patch_labels = out.alloc("patch_labels", (N, L), np.int64)
                if pool == "tokens":  # pixel maps only serve the dense probe (tokens)
                    # Unnamed categories (num_categories 0) could exceed any small dtype later.
                    classes = out.alloc("classes", (N, *hw),
                                        _map_dtype(num_categories + 1) if num_categories else np.int32)
            patch_labels[i: i + b] = patch_majority(cmap, p, n_lab).numpy()
            if classes is not None:
                classes[i: i + b] = cmap.numpy().astype(classes.dtype)
        i += b
        bar.update(b)
    bar.close()
    out.finish()
    if ds.skips.count:
        print(f"analysis.features: {ds.summary()}", file=sys.stderr)
    if num_categories == 0 and patch_labels is not None:
        num_categories = int(patch_labels.max())
    return {"grid": list(grid), "image_hw": list(hw), "patch_size": p, "embed_dim": D,
            "num_classes": num_classes if bool((labels >= 0).all()) else 0,
            "num_categories": num_categories if patch_labels is not None else 0,
            "class_names": list(base.class_names) if getattr(base, "class_names", None) else None,
            "skipped": ds.skips.count}


def _to_features(arrays: dict[str, np.ndarray], meta: dict[str, Any], *, cache_hit: bool,
                 path: Path | None) -> Features:
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return Features(
        features=t["features"], labels=t["labels"], patch_labels=t.get("patch_labels"),
        classes=t.get("classes"), layer=meta["layer"], pool=meta["pool"],
        grid=tuple(meta["grid"]), image_hw=tuple(meta["image_hw"]),
        num_classes=meta["num_classes"], num_categories=meta["num_categories"],
        spec=meta["data"], class_names=meta.get("class_names"), cache_hit=cache_hit, path=path, meta=meta)


def extract_features(model: torch.nn.Module, data: Any, *, layer: int = -1, pool: str = "cls",
                     data_seed: int = 0, crop_pct: float = 1.0, batch_size: int = 64,
                     num_workers: int = 0, device: str | torch.device | None = None,
                     progress: bool = True) -> Features:
    """Extract features of ``data`` (a data spec) with ``model``, in memory, without any cache.

    Images are produced at the model's resolution (scenes are generated at it; other data are
    centre-cropped by ``crop_pct`` and resized). See :class:`Features` for what comes back.
    """
    from rmae.data import build_dataset, parse_data_spec

    if pool not in POOLINGS:
        raise ValueError(f"pool must be one of {POOLINGS}, got {pool!r}")
    spec = parse_data_spec(data)
    hw = tuple(model.config.image_hw)
    depth = len(model.blocks)
    layer_n = normalize_layer(layer, depth)
    base = build_dataset(spec, image_size=max(hw), seed=data_seed)
    out = _Arrays(None)
    meta = _extract_into(model, base, out, layer=layer_n, pool=pool, crop_pct=crop_pct,
                         batch_size=batch_size, num_workers=num_workers,
                         device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
                         progress=progress, desc=f"features {spec}")
    meta.update(layer=layer_n, pool=pool, data=str(spec))
    return _to_features(out.arrays, meta, cache_hit=False, path=None)


# ---------------------------------------------------------------------------------------------
# the cache


def feature_cache_dir(run: PathLike) -> Path:
    return Path(run) / "analysis" / "features"


def _read_entry(path: Path, key: dict[str, Any]) -> Features | None:
    """The entry at ``path`` if it is complete and was made for exactly ``key``, else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("key") != key:
            return None  # a hash collision or a hand-edited folder: never trust it
        arrays = {}
        for name in meta["arrays"]:
            # "c" = copy-on-write map: pages load lazily, writes never reach the file, and torch
            # gets a writable array (no read-only warning).
            arrays[name] = np.load(path / f"{name}.npy", mmap_mode="c")
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    return _to_features(arrays, meta, cache_hit=True, path=path)


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def load_features(run: PathLike, data: Any, *, layer: int = -1, pool: str = "cls",
                  data_seed: int = 0, crop_pct: float = 1.0, batch_size: int = 64,
                  num_workers: int = 0, device: str | torch.device | None = None,
                  progress: bool = True, cache: bool = True, prune_stale: bool = True) -> Features:
    """Features of ``data`` from run folder ``run`` at block ``layer`` with pooling ``pool``,
    read from the run's cache when an entry for exactly these weights and inputs exists,
    otherwise extracted (model loaded only then) and, with ``cache=True``, stored.

    Returns :class:`Features` with ``cache_hit`` telling which happened. Raises
    ``rmae.CheckpointError`` / ``rmae.data.DataError`` / ``ValueError`` with one-line messages.
    """
    from rmae import load_model
    from rmae.data import build_dataset, parse_data_spec

    if pool not in POOLINGS:
        raise ValueError(f"pool must be one of {POOLINGS}, got {pool!r}")
    spec = parse_data_spec(data)
    rw = resolve_run(run)
    layer_n = normalize_layer(layer, rw.depth)
    # The raw dataset is cheap to build (files are listed, nothing decoded) and its fingerprint
    # is part of the key; image size comes from the model config in the weights digest, but
    # scenes are generated at it, so it is in the fingerprint as well.
    image_size = rw.image_size
    base = build_dataset(spec, image_size=image_size, seed=data_seed)
    key = {"version": FEATURES_VERSION, "weights": rw.digest, "data": str(spec),
           "fingerprint": data_fingerprint(base, spec), "data_seed": int(data_seed),
           "image_size": image_size, "crop_pct": float(crop_pct), "layer": layer_n, "pool": pool}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    prefix = f"{data_slug(spec)}_{image_size}_L{layer_n}_{pool}"
    root = feature_cache_dir(run)
    entry = root / f"{prefix}_{digest}"
    if cache and entry.is_dir():
        hit = _read_entry(entry, key)
        if hit is not None:
            return hit
        shutil.rmtree(entry, ignore_errors=True)  # unreadable or foreign: rebuild it

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(run)
    t0 = time.perf_counter()
    desc = f"features {Path(run).name} {spec} L{layer_n} {pool}"
    if not cache:
        out = _Arrays(None)
        meta = _extract_into(model, base, out, layer=layer_n, pool=pool, crop_pct=crop_pct,
                             batch_size=batch_size, num_workers=num_workers, device=device,
                             progress=progress, desc=desc)
        meta.update(layer=layer_n, pool=pool, data=str(spec), key=key)
        return _to_features(out.arrays, meta, cache_hit=False, path=None)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}_{digest}.", suffix=".tmp", dir=root))
    try:
        out = _Arrays(tmp)
        meta = _extract_into(model, base, out, layer=layer_n, pool=pool, crop_pct=crop_pct,
                             batch_size=batch_size, num_workers=num_workers, device=device,
                             progress=progress, desc=desc)
        meta.update(layer=layer_n, pool=pool, data=str(spec), key=key, arrays=sorted(out.arrays),
                    weights_file=str(rw.path), seconds=round(time.perf_counter() - t0, 3),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        out.arrays.clear()  # drop the write maps before the rename
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _fsync_tree(tmp)
        try:
            os.rename(tmp, entry)  # atomic: the entry appears complete or not at all
        except OSError:
            if not entry.is_dir():  # anything but "a concurrent run finished it first"
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if prune_stale:
        _prune(root, prefix, keep=entry, key=key)
    got = _read_entry(entry, key)
    if got is None:  # pragma: no cover - only if the disk lost the file we just synced
        raise OSError(f"{entry}: feature cache entry unreadable right after writing it")
    got.cache_hit = False
    return got


def _prune(root: Path, prefix: str, keep: Path, key: dict[str, Any]) -> None:
    """Delete entries with the same data/layer/pool made from other weights: they can never be
    hit again by this run (its weights changed) and token entries are large."""
    for other in root.glob(f"{prefix}_*"):
        if other == keep or not other.is_dir() or other.name.startswith("."):
            continue
        try:
            meta = json.loads((other / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        k = meta.get("key", {})
        same_inputs = all(k.get(f) == key[f] for f in ("data", "data_seed", "crop_pct", "layer", "pool"))
        if same_inputs and k.get("weights") != key["weights"]:
            shutil.rmtree(other, ignore_errors=True)
