"""Probing a run folder: features from the cache, the probe, a JSON result in the run folder.

    from analysis.probes import ProbeConfig, run_probe
    r = run_probe("runs/mae", ProbeConfig(probe="linear", data="scenes:train:2000"))
    r["value"], r["best_lr"], r["grid"]      # eval accuracy, chosen lr, {lr: held-out accuracy}
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from rmae.device import resolve_device
from rmae.io import atomic_write_json
from rmae.runfolder import RunFolder

from ..feature_cache import load_features
from ..features import Features, data_slug
from .classify import attentive_probe, knn_probe, linear_probe
from .config import ProbeConfig, ProbeError
from .dense import dense_probe
from .result import ProbeResult


def default_eval_data(train_data: str) -> str:
    """The eval spec implied by a training spec: scenes → ``scenes:val`` (at most as many images
    as the training spec names, ≤ 1000); anything else has no implied eval split (ProbeError)."""
    from rmae.data import parse_data_spec

    spec = parse_data_spec(train_data)
    if spec.kind == "scenes" and spec.split == "train":
        return "scenes:val" + (f":{min(spec.length, 1000)}" if spec.length else "")
    raise ProbeError(f"no default eval data for '{train_data}': pass eval data (--eval-data SPEC), "
                     "e.g. folder:/data/imagenet/val")


def result_path(run_dir: str | os.PathLike, probe: str, train: str, eval_: str, layer: int, pool: str,
                solver: str = "torch") -> Path:
    """Where :func:`run_probe` writes:
    ``RUN/analysis/probes/<probe>[-sklearn]_<train>__<eval>_L<layer>_<pool>.json``."""
    from rmae.data import parse_data_spec

    name = probe + ("-sklearn" if solver == "sklearn" else "")
    slug = f"{name}_{data_slug(parse_data_spec(train))}__{data_slug(parse_data_spec(eval_))}_L{layer}_{pool}"
    return RunFolder(run_dir).analysis_dir("probes") / f"{slug}.json"


def _check_classes(tr: Features, ev: Features, cfg: ProbeConfig, eval_data: str) -> int:
    """Both splits labelled, with the same classes → the number of classes."""
    if not tr.has_labels or not ev.has_labels:
        which = cfg.data if not tr.has_labels else eval_data
        raise ProbeError(f"'{which}' has no image labels; the {cfg.probe} probe classifies images "
                         "(use scenes, or folder:PATH with one sub-folder per class)")
    # Compare names, not counts: folder: data index the sub-folders each folder has, so a
    # val folder missing one class would shift every later label by one.
    if (tr.class_names or tr.num_classes) != (ev.class_names or ev.num_classes):
        differ = sorted(set(tr.class_names or []) ^ set(ev.class_names or []))[:3]
        raise ProbeError(f"'{cfg.data}' and '{eval_data}' do not have the same classes "
                         f"({tr.num_classes} vs {ev.num_classes}"
                         + (f"; e.g. {differ}" if tr.class_names and ev.class_names else "")
                         + "); probe with data that share their class folders")
    return max(tr.num_classes, ev.num_classes)


def _probe(tr: Features, ev: Features, cfg: ProbeConfig, eval_data: str, device: Any,
           progress: bool) -> ProbeResult:
    """Run ``cfg.probe`` on the features of both splits."""
    train_kw: dict[str, Any] = dict(lrs=cfg.lrs, optimizer=cfg.resolved_optimizer, weight_decay=cfg.weight_decay,
                                    holdout=cfg.holdout, seed=cfg.seed, device=device, threads=cfg.threads,
                                    patience=cfg.patience, progress=progress)
    if cfg.epochs is not None:
        train_kw["epochs"] = cfg.epochs
    if cfg.batch_size is not None:
        train_kw["batch_size"] = cfg.batch_size
    if cfg.probe == "dense":
        if tr.classes is None or ev.classes is None or tr.patch_labels is None:
            which = cfg.data if tr.classes is None else eval_data
            raise ProbeError(f"'{which}' has no ground-truth category maps; the dense probe needs "
                             "them (use scenes, or coco:IMAGES:JSON)")
        return dense_probe(tr.features, tr.patch_labels, tr.classes, ev.features, ev.classes, grid_hw=tr.grid,
                           num_labels=max(tr.num_categories, ev.num_categories) + 1, upsample=cfg.upsample,
                           **train_kw)
    C = _check_classes(tr, ev, cfg, eval_data)
    if cfg.probe == "knn":
        return knn_probe(tr.features, tr.labels, ev.features, ev.labels, k=cfg.k, temperature=cfg.temperature,
                         num_classes=C, device=device)
    if cfg.probe == "attentive":
        return attentive_probe(tr.features, tr.labels, ev.features, ev.labels, num_classes=C,
                               attn_heads=cfg.attn_heads, num_queries=cfg.num_queries, **train_kw)
    if cfg.solver == "sklearn":
        return linear_probe(tr.features, tr.labels, ev.features, ev.labels, num_classes=C, solver="sklearn",
                            holdout=cfg.holdout, Cs=cfg.Cs, seed=cfg.seed)
    return linear_probe(tr.features, tr.labels, ev.features, ev.labels, num_classes=C, **train_kw)


def run_probe(run_dir: str | os.PathLike, config: ProbeConfig, *, progress: bool = True,
              write: bool = True) -> dict[str, Any]:
    """Probe run folder ``run_dir``'s encoder as ``config`` says: features of ``config.data``
    and ``config.eval_data`` (default :func:`default_eval_data`) at block ``config.layer``, from
    the feature cache when possible (:func:`analysis.feature_cache.load_features`), then the
    probe, all on ``config.device``. Returns a JSON-able dict and, with ``write``, stores it at
    :func:`result_path`::

        {"probe", "key" (results.json name), "metric" ("accuracy" | "miou"), "value",
         "best_lr", "grid" {lr: held-out score}, "chance", "train", "eval", "layer", "pool",
         "n_train", "n_eval", "num_classes", "feature_cache_hit", "seconds", "run", "weights",
         "seed", "data_seed", "path", + probe settings (epochs, optimizer, k, per_class_iou, …)}

    ``feature_cache_hit`` is True when both splits' features came from the cache. Raises
    :class:`ProbeError` and the other ``rmae.errors.UserError`` s (checkpoint, data, device)
    with one-line messages.
    """
    t0 = time.perf_counter()
    cfg = config
    device = resolve_device(cfg.device)  # a missing device fails here, before any work
    eval_data = cfg.eval_data or default_eval_data(cfg.data)
    pool = cfg.resolved_pool
    common = dict(layer=cfg.layer, pool=pool, data_seed=cfg.data_seed, crop_pct=cfg.crop_pct,
                  batch_size=cfg.extract_batch_size, num_workers=cfg.num_workers, device=device,
                  progress=progress, cache=cfg.cache)
    tr = load_features(run_dir, cfg.data, **common)
    ev = load_features(run_dir, eval_data, **common)
    res = _probe(tr, ev, cfg, eval_data, device, progress)
    out = res.to_dict()
    out.update(train=tr.spec, eval=ev.spec, layer=tr.layer, pool=pool,
               num_classes=res.extra.get("num_labels", max(tr.num_classes, ev.num_classes)),
               feature_cache_hit=bool(tr.cache_hit and ev.cache_hit), run=str(run_dir),
               weights=tr.meta["key"]["weights"][:16], seed=cfg.seed, data_seed=cfg.data_seed,
               seconds=round(time.perf_counter() - t0, 3))
    out = _jsonable(out)
    if write:
        path = result_path(run_dir, cfg.probe, tr.spec, ev.spec, tr.layer, pool, cfg.solver)
        out["path"] = str(path)
        atomic_write_json(path, out)
    return out


def _jsonable(obj: Any) -> Any:
    """NaN (e.g. mIoU of an empty eval set) → None, so results are strict JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
