"""Features of a run folder, extracted once and cached per run, data, layer and pooling.

    from analysis.feature_cache import load_features
    feats = load_features("runs/mae", "scenes:train:2000", layer=-1, pool="cls")
    feats.cache_hit     # True when read back from disk (see analysis.features.Features)

Cache: ``RUN/analysis/features/<data>_<size>_L<layer>_<pool>_<key>/`` holds ``.npy`` arrays and
``meta.json``. The key is a SHA-256 over everything that determines the arrays: the run's
content identity (:meth:`rmae.runfolder.RunFolder.digest`: the bytes of the weights file the
folder resolves to, and its ``model_config``), the canonical data spec with a fingerprint of its
files (paths, sizes, mtimes) or generator version, the data seed, image size, crop, layer,
pooling and :data:`analysis.features.FEATURES_VERSION`. A retrained or re-imported run
therefore never reads stale features; entries made stale by new weights are deleted when the
new entry is written. Entries are written to a temporary folder and renamed into place, so a
killed extraction never leaves a half entry that a later run would trust; an unreadable entry is
rebuilt. Arrays are memory-mapped when read back, so token features larger than RAM stay on disk
until a minibatch touches them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rmae.device import resolve_device
from rmae.io import read_text
from rmae.runfolder import RunFolder

from .encoder import describe, load_encoder
from .features import (
    FEATURES_VERSION,
    Arrays,
    FeatureError,
    Features,
    check_layer,
    check_pool,
    data_fingerprint,
    data_slug,
    extract_into,
    to_features,
)

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------
# what a run's weights are


@dataclass(frozen=True)
class RunWeights:
    """The weights a run folder resolves to, identified by content.

    ``path``: the weights file ``rmae.load_model(run)`` reads; ``digest``:
    :meth:`RunFolder.digest` (its bytes and the folder's ``model_config``); ``depth``: number of
    encoder blocks; ``image_size``: the model's input side (the larger one for non-square inputs).
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
    if depth is None or size is None:  # a foreign file format or encoder: building the model is the only way
        info = describe(load_encoder(run))
        depth, size = info.depth, info.input_size
    size = max(size) if isinstance(size, (list, tuple)) else size
    return RunWeights(run=run, path=weights, digest=digest, depth=int(depth), image_size=int(size))


# ---------------------------------------------------------------------------------------------
# cache entries


def cache_dir(run: PathLike) -> Path:
    """``RUN/analysis/features``: where :func:`load_features` keeps its entries."""
    return RunFolder(run).analysis_dir("features")


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(read_text(path / "meta.json"))
    except (OSError, ValueError):  # missing, not a regular file, too large, not JSON, not UTF-8
        return None
    return meta if isinstance(meta, dict) else None


def _read_entry(path: Path, key: dict[str, Any]) -> Features | None:
    """The entry at ``path`` if it is complete and was made for exactly ``key``, else None."""
    meta = _read_meta(path)
    if meta is None or meta.get("key") != key:
        return None  # unreadable, a hash collision or a hand-edited folder: never trust it
    try:
        # "c" = copy-on-write map: pages load lazily, writes never reach the file, and torch
        # gets a writable array (no read-only warning).
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="c") for name in meta["arrays"]}
        return to_features(arrays, meta, cache_hit=True, path=path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _write_entry(entry: Path, fill: Callable[[Arrays], dict[str, Any]]) -> None:
    """Create ``entry`` atomically: ``fill(arrays) -> meta`` writes the arrays into a
    hidden temporary folder beside it, which is then renamed into place (complete or absent)."""
    root = entry.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=root))
    except OSError as e:
        raise FeatureError(f"{root}: cannot write the feature cache ({e.strerror or e}); "
                           "fix its permissions or probe with cache=false") from None
    try:
        out = Arrays(tmp)
        meta = fill(out)
        meta["arrays"] = sorted(out.arrays)
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


def _prune(root: Path, prefix: str, keep: Path, key: dict[str, Any]) -> None:
    """Delete entries with the same data/layer/pool made from other weights: they can never be
    hit again by this run (its weights changed) and token entries are large."""
    for other in root.glob(f"{prefix}_*"):
        if other == keep or not other.is_dir() or other.name.startswith("."):
            continue
        meta = _read_meta(other)
        if meta is None:
            continue
        k = meta.get("key", {})
        same_inputs = all(k.get(f) == key[f] for f in ("data", "data_seed", "crop_pct", "layer", "pool"))
        if same_inputs and k.get("weights") != key["weights"]:
            shutil.rmtree(other, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the one entry point


def load_features(run: PathLike, data: Any, *, layer: int = -1, pool: str = "cls", data_seed: int = 0,
                  crop_pct: float = 1.0, batch_size: int = 64, num_workers: int = 0,
                  device: str | torch.device = "auto", progress: bool = True, cache: bool = True,
                  prune_stale: bool = True) -> Features:
    """Features of ``data`` from run folder ``run`` at block ``layer`` with pooling ``pool``,
    read from the run's cache when an entry for exactly these weights and inputs exists,
    otherwise extracted (the model is loaded only then, on ``device``: ``auto`` = CUDA, else
    MPS, else CPU) and, with ``cache=True``, stored.

    Returns :class:`~analysis.features.Features` with ``cache_hit`` telling which happened.
    Raises ``rmae.CheckpointError`` / ``rmae.data.DataError`` / ``FeatureError`` /
    ``rmae.device.DeviceError`` (all ``rmae.errors.UserError``) with one-line messages.
    """
    from rmae.data import build_dataset, parse_data_spec

    check_pool(pool)
    spec = parse_data_spec(data)
    rw = resolve_run(run)
    layer_n = check_layer(layer, rw.depth)
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
    root = cache_dir(run)
    entry = root / f"{prefix}_{digest}"
    if cache and entry.is_dir():
        hit = _read_entry(entry, key)
        if hit is not None:
            return hit
        shutil.rmtree(entry, ignore_errors=True)  # unreadable or foreign: rebuild it

    model = load_encoder(run, resolve_device(device))
    t0 = time.perf_counter()

    def fill(out: Arrays) -> dict[str, Any]:
        meta = extract_into(model, base, out, layer=layer_n, pool=pool, data_seed=data_seed, crop_pct=crop_pct,
                            batch_size=batch_size, num_workers=num_workers, progress=progress,
                            desc=f"features {Path(run).name} {spec} L{layer_n} {pool}")
        meta.update(layer=layer_n, pool=pool, data=str(spec), key=key, weights_file=str(rw.path),
                    seconds=round(time.perf_counter() - t0, 3), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        return meta

    if not cache:
        out = Arrays(None)
        meta = fill(out)
        return to_features(out.arrays, meta, cache_hit=False, path=None)
    _write_entry(entry, fill)
    if prune_stale:
        _prune(root, prefix, keep=entry, key=key)
    got = _read_entry(entry, key)
    if got is None:  # pragma: no cover - only if the disk lost the file we just synced
        raise OSError(f"{entry}: feature cache entry unreadable right after writing it")
    got.cache_hit = False
    return got
