"""From raw samples to model batches: regions, joint augmentation, sampling, collate, loader.

:class:`RegionDataset` wraps any raw dataset (:mod:`rmae.data.base`); each item is::

    {
      "image":     float32 [3, H, W]   ImageNet-normalised (normalize=True) or in [0, 1];
                                       undo with rmae.data.denormalize
      "regions":   uint8 [k, H, W] in {0, 1}        (absent when source is None, e.g. MAE)
      "num_segments": int   distinct segments available in the crop (< k ⇒ duplicates)
      "instances": int64 [H, W]  (when the dataset has instances; 0 = background)
      "classes":   int64 [H, W]  (when the dataset has category maps)
      "label":     int           (when the dataset has image labels)
      "index": int, "key": str, "skipped": list[(path, reason)]
    }

:func:`collate_regions` stacks these into ``images`` [B, 3, H, W] float32, ``regions``
[B, k, H, W] float32 {0, 1}, ``instances``/``classes`` [B, H, W] int64, ``label`` [B] int64,
``index`` [B] int64, ``keys`` list[str], ``skipped`` list[(path, reason)].

Skipped files: workers record them in their own copy of the dataset; every batch carries them
(``batch["skipped"]``). With your own DataLoader call ``dataset.skips.merge(batch["skipped"])``
per batch so ``dataset.summary()`` in the main process is complete (RegionLoader does this).
A user error inside a worker (no readable file left, a missing label map) arrives as a batch
``{"_error": exc}`` rather than as torch's re-raised copy with the worker's traceback pasted into
its message; ``raise batch["_error"]`` (RegionLoader does) gives the one-line error itself.

Reproducibility: the augmentation and region choice of item ``i`` come from
``np.random.default_rng([seed, epoch, i])`` — independent of worker count and order, so a run
(or a resumed run) sees the same batches. Call :meth:`RegionDataset.set_epoch` each epoch, or
use :class:`RegionLoader`, which does it and seeds shuffling the same way.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..errors import UserError
from .base import BaseDataset, Sample
from .cache import RegionCache
from .regions import RegionSource, parse_region_source
from .sampling import sample_regions
from .transforms import JointCenterCrop, JointRandomResizedCrop, to_tensor

_SALT = 0x2E610

CacheArg = RegionCache | str | Path | None


class RegionDataset(Dataset):
    """Training/eval view of a raw dataset (see module docstring).

    Args:
        base: a raw dataset (``build_dataset(spec)``).
        source: region source or its spec (``"fh"``, ``"gt"``…); None for no regions (MAE).
        cache: a :class:`RegionCache`, a folder, ``"default"`` (``$RMAE_CACHE`` or
            ``~/.cache/rmae/regions``) or None (compute every time).
        num_regions: k.
        image_size: output side (or (h, w)).
        train: RandomResizedCrop + flip when True, deterministic centre crop when False.
        min_region_size, min_region_patches, patch_size: sampling filters (see sampling).
        normalize: ImageNet mean/std normalisation of ``image``.
        scale, ratio, hflip: RandomResizedCrop parameters (paper: 0.2–1, 3/4–4/3, 0.5).
        crop_pct: eval centre-crop fraction.
        seed: base of every per-item generator.
    """

    def __init__(self, base: BaseDataset, source: RegionSource | str | None = "fh",
                 cache: CacheArg = "default", num_regions: int = 8,
                 image_size: int | tuple[int, int] = 64, train: bool = True,
                 min_region_size: int = 0, min_region_patches: int = 0, patch_size: int = 16,
                 normalize: bool = True, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 crop_pct: float = 0.875, seed: int = 0) -> None:
        self.base = base
        self.source = parse_region_source(source, getattr(base, "root", None))
        if isinstance(cache, str) and cache == "default":
            cache = RegionCache()
        elif cache is not None and not isinstance(cache, RegionCache):
            cache = RegionCache(cache)
        self.cache = cache if (self.source is not None and self.source.cacheable) else None
        self.num_regions = int(num_regions)
        self.train = train
        self.transform = (JointRandomResizedCrop(image_size, scale, ratio, hflip) if train
                          else JointCenterCrop(image_size, crop_pct))
        self.min_region_size = min_region_size
        self.min_region_patches = min_region_patches
        self.patch_size = patch_size
        self.normalize = normalize
        self.seed = int(seed)
        self.epoch = 0
        # Build per-process resources (the scenes texture bank) here, in the main process, so
        # forked DataLoader workers inherit them instead of rebuilding them every epoch.
        base.prepare()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (must be set in the main process before
        the workers start, i.e. before iterating a fresh DataLoader)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def skips(self):
        return self.base.skips

    def summary(self) -> str:
        return self.base.summary()

    def _load(self, index: int) -> Sample:
        sample = self.base.load(index)
        if self.source is not None:
            # Full-resolution maps, before the crop: "computed once per image" and cacheable.
            sample["_regions"] = self.source(sample, self.cache)
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        if get_worker_info() is not None:
            # In a DataLoader worker a user error (no readable file left, a missing region
            # map…) travels to the main process as data and is raised there as itself:
            # torch would re-raise it with the worker's traceback pasted into its message.
            try:
                return self._item(index)
            except UserError as err:
                return {"_error": err}
        return self._item(index)

    def _item(self, index: int) -> dict[str, Any]:
        sample = self.base.get_with_fallback(index, self._load)
        rng = np.random.default_rng([_SALT, self.seed, self.epoch, int(index)])
        maps: dict[str, np.ndarray] = {}
        if "_regions" in sample:
            maps["regions"] = sample["_regions"]
        for k in ("instances", "classes"):
            if k in sample:
                maps[k] = sample[k]
        image, maps = self.transform(sample["image"], maps, rng)
        item: dict[str, Any] = {"image": to_tensor(image, self.normalize),
                                "index": int(sample["index"]), "key": sample.get("key", ""),
                                "skipped": sample.get("skipped", [])}
        if "regions" in maps:
            regions, n = sample_regions(maps["regions"], self.num_regions, rng,
                                        self.min_region_size, self.min_region_patches,
                                        self.patch_size)
            item["regions"] = torch.from_numpy(regions)
            item["num_segments"] = n
        for k in ("instances", "classes"):
            if k in maps:
                item[k] = torch.from_numpy(maps[k].astype(np.int64))
        if "label" in sample:
            item["label"] = int(sample["label"])
        return item


def collate_regions(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack :class:`RegionDataset` items into a batch (see module docstring for shapes)."""
    errors = [it["_error"] for it in items if "_error" in it]
    if errors:
        return {"_error": errors[0]}
    batch: dict[str, Any] = {"images": torch.stack([it["image"] for it in items])}
    if all("regions" in it for it in items):
        batch["regions"] = torch.stack([it["regions"] for it in items]).float()
        batch["num_segments"] = torch.tensor([it["num_segments"] for it in items])
    for k in ("instances", "classes"):
        if all(k in it for it in items):
            batch[k] = torch.stack([it[k] for it in items])
    if all("label" in it for it in items):
        batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    batch["keys"] = [it["key"] for it in items]
    batch["skipped"] = [p for it in items for p in it["skipped"]]
    return batch


def end_with_parent() -> None:
    """Have the kernel kill this worker the moment its parent dies (Linux ``PR_SET_PDEATHSIG``).

    torch's own watchdog notices a dead parent only between items, every 5 s; a worker busy
    segmenting a large image would outlive a killed trainer by that long. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before the call
        os._exit(0)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: end with the parent (:func:`end_with_parent`); seed Python's and
    numpy's global RNGs from torch's per-worker seed (itself derived from the loader's
    ``generator``), for any code that uses them."""
    end_with_parent()
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class RegionLoader:
    """The one loader over a :class:`RegionDataset`: training, fine-tuning, evaluation, analysis.

    Each ``iter()`` is one epoch: it sets the dataset's epoch, seeds the shuffle with
    ``(seed, epoch)``, and merges the files that workers skipped into ``dataset.skips`` so
    ``dataset.summary()`` in the main process is complete. ``forever()`` chains epochs (for
    step-based training). Workers are not persistent, so the epoch reaches them.

    ``batch_plan(epoch) → list of index lists`` replaces shuffling and batching with explicit
    batches (the trainer's per-step plan, which makes resumed and multi-process runs see the
    same data). :func:`evaluation_loader` builds the deterministic, in-order variant.
    """

    def __init__(self, dataset: RegionDataset, batch_size: int = 1, shuffle: bool = True,
                 num_workers: int = 0, seed: int = 0, drop_last: bool = True,
                 pin_memory: bool = False, start_epoch: int = 0,
                 prefetch_factor: int | None = None,
                 batch_plan: Callable[[int], list[list[int]]] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = int(seed)
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.epoch = start_epoch
        self.prefetch_factor = prefetch_factor
        self.batch_plan = batch_plan

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _loader(self) -> DataLoader:
        extra: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            extra["prefetch_factor"] = self.prefetch_factor
        common = dict(num_workers=self.num_workers, collate_fn=collate_regions, worker_init_fn=seed_worker,
                      pin_memory=self.pin_memory, **extra)
        if self.batch_plan is not None:
            return DataLoader(self.dataset, batch_sampler=self.batch_plan(self.epoch), **common)
        g = torch.Generator()
        # SeedSequence, not hash(): string hashing is randomised per Python process.
        g.manual_seed(int(np.random.SeedSequence([_SALT, self.seed, self.epoch]).generate_state(1)[0]))
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle, generator=g,
                          drop_last=self.drop_last, **common)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.set_epoch(self.epoch)
        loader = self._loader()
        self.epoch += 1
        for batch in loader:
            if "_error" in batch:
                raise batch["_error"]
            self.dataset.skips.merge(batch["skipped"])
            yield batch

    def forever(self) -> Iterator[dict[str, Any]]:
        while True:
            yielded = False
            for batch in self:
                yielded = True
                yield batch
            if not yielded:
                raise ValueError(f"dataset of {len(self.dataset)} is smaller than one batch of "
                                 f"{self.batch_size}; lower batch_size or set drop_last=False")


def evaluation_loader(data: Any, image_size: int | tuple[int, int], *, batch_size: int = 64,
                      seed: int = 0, crop_pct: float = 1.0, num_workers: int = 0, limit: int | None = None,
                      source: RegionSource | str | None = None, num_regions: int = 8,
                      patch_size: int = 16) -> RegionLoader:
    """Deterministic, in-order batches of a data spec (or raw dataset) at a model's input size:
    the loader every evaluation uses (fine-tuning validation, analysis, probes' features).

    Images are centre-cropped by ``crop_pct`` and resized (``scenes`` are generated at the size);
    ground-truth maps are resized with nearest neighbours alike. ``limit`` keeps the first N.
    """
    from .specs import build_dataset

    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    base = data if isinstance(data, BaseDataset) else build_dataset(data, image_size=max(hw), seed=seed)
    ds = RegionDataset(base, source=source, cache=None, image_size=hw, train=False, crop_pct=crop_pct,
                       num_regions=num_regions, patch_size=patch_size, seed=seed)
    loader = RegionLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False)
    if limit is not None and limit < len(ds):
        loader.batch_plan = lambda _epoch, n=int(limit), b=batch_size: [list(range(i, min(i + b, n)))
                                                                        for i in range(0, n, b)]
    return loader
