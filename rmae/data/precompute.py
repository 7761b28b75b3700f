"""Fill the region cache for a whole dataset, in parallel processes, with a progress bar.

Training reads the cache and computes on a miss anyway; precomputing moves that cost out of
the first epoch and spreads it over every core. Entries already present are not recomputed,
so an interrupted run simply resumes.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .base import BadSampleError, BaseDataset, DataError
from .cache import RegionCache
from .regions import RegionSource, parse_region_source
from .specs import DataSpec, build_dataset

_STATE: tuple[BaseDataset, RegionSource, RegionCache, bool] | None = None


@dataclass
class PrecomputeStats:
    images: int = 0
    computed: int = 0
    cached: int = 0  # already present
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    cache_dir: str = ""

    def __str__(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else float("inf")
        return (f"{self.images} images in {self.seconds:.1f}s ({rate:.1f}/s): "
                f"{self.computed} computed, {self.cached} already cached, "
                f"{len(self.skipped)} skipped → {self.cache_dir}")


def _init(state: tuple[BaseDataset, RegionSource, RegionCache, bool]) -> None:
    global _STATE
    _STATE = state


def _work(indices: list[int]) -> tuple[int, int, list[tuple[str, str]]]:
    assert _STATE is not None
    dataset, source, cache, strict = _STATE
    computed = cached = 0
    bad: list[tuple[str, str]] = []
    for i in indices:
        try:
            sample = dataset.load(i)
            bad.extend(sample.get("skipped", []))  # parts left out (a malformed annotation)
            source.check(sample)
            if not source.cacheable:
                source.compute(sample)  # still validates (e.g. every image has a label map)
                computed += 1
                continue
            key = source.cache_key(sample)
            if cache.get(source.name, key, sample["image"].shape[:2]) is not None:  # verified; damaged → recomputed
                cached += 1
                continue
            cache.put(source.name, key, source.compute(sample))
            computed += 1
        except BadSampleError as err:
            if strict:
                raise
            bad.append((err.path, err.reason))
    return computed, cached, bad


def precompute_regions(spec: str | DataSpec | BaseDataset, source: str | RegionSource,
                       cache_dir: str | Path | None = None, workers: int = 1, *,
                       image_size: int = 64, seed: int = 0, limit: int | None = None,
                       strict: bool = False, progress: bool = True,
                       chunk_size: int | None = None) -> PrecomputeStats:
    """Compute the region maps of every image of ``spec`` into ``cache_dir``.

    Args:
        spec: data spec (``"folder:/data/x"``), parsed spec, or an already-built dataset.
        source: region source or spec (``"fh"``, ``"fh:paper"``, ``"slic"``, ``"panoptic"``…).
        cache_dir: cache root; default ``$RMAE_CACHE`` or ``~/.cache/rmae/regions``.
        workers: processes (1 = in this process).
        image_size, seed: passed to :func:`build_dataset` (resolution/stream of ``scenes``).
        limit: only the first ``limit`` images.
        strict: stop at the first bad file instead of skipping it.
        progress: show a tqdm bar on stderr.

    Returns:
        :class:`PrecomputeStats`. Keys of the written entries are exactly those training
        computes, so a training run with the same source and cache reads them back.
    """
    dataset = spec if isinstance(spec, BaseDataset) else build_dataset(
        spec, image_size=image_size, seed=seed, strict=strict)
    strict = strict or dataset.strict
    src = parse_region_source(source, getattr(dataset, "root", None))
    if src is None:
        raise DataError("regions precompute needs a region source, e.g. --source fh")
    cache = RegionCache(cache_dir, must_write=True)
    if src.cacheable:
        cache.check_writable()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    workers = max(1, int(workers))
    chunk = chunk_size or max(1, min(32, n // (workers * 8) or 1))
    chunks = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    stats = PrecomputeStats(images=n, cache_dir=str(cache.root / src.name))

    from tqdm import tqdm

    dataset.prepare()  # e.g. the scenes texture bank: once here, inherited by forked workers
    bar = tqdm(total=n, desc=f"regions {src.spec()}", unit="img", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()

    def account(result: tuple[int, int, list[tuple[str, str]]], size: int) -> None:
        computed, cached, bad = result
        stats.computed += computed
        stats.cached += cached
        for path, reason in bad:
            if path not in stats.skipped:
                print(f"rmae.data: skipping {path}: {reason}", file=sys.stderr)
            stats.skipped.setdefault(path, reason)
        bar.update(size)

    state = (dataset, src, cache, strict)
    if workers == 1 or len(chunks) <= 1:
        _init(state)
        for c in chunks:
            account(_work(c), len(c))
    else:
        # fork shares the built dataset (file list, COCO index, texture bank) for free;
        # elsewhere it is pickled once per worker through the initializer.
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        with ctx.Pool(workers, initializer=_init, initargs=(state,)) as pool:
            for c, result in zip(chunks, pool.imap(_work, chunks)):
                account(result, len(c))
    bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats
