"""``rmae analyze``: every analysis on the same images for several runs → :class:`Results`.

    from analysis.analyze import AnalyzeConfig, analyze
    res = analyze(["runs/demo-mae", "runs/demo-rmae"], AnalyzeConfig(data="scenes:val:200"), out="reports/demo")
    res.metric("demo-rmae", "attention_distance").per_layer

What is computed, per run (names from :mod:`analysis.registry`): attention distance / entropy / NMI
per layer; with instance masks, instance mass / leak / Jaccard, CLS Jaccard and TokenCut CorLoc;
interactive segmentation for runs with a region decoder; linear / k-NN / attentive / dense probes;
layer × layer CKA against the reference run. Whatever the data cannot support is skipped and named,
with the reason, in ``results.meta["skipped"]`` — the rest is still computed.

Every model sees the same images, each resized to the model's own input size (ground-truth masks
resized alike, nearest neighbour; ``scenes`` are generated once at the largest size), so runs of
different resolutions or patch sizes (an imported DINOv2/14 beside an MAE/16) are compared image by
image; CKA between runs of different sizes compares image-level features (mean patch token) of the
same images resized.

Intervals: bootstrap over images (one checkpoint per run), Wilson for probe accuracies.
``differences`` are each run minus the reference, paired over the same images; they describe
these checkpoints (``"scope": "checkpoint"``) — a statement about a *method* needs seeds
(``rmae study``). The reference is the first MAE run (else the first run).

Every tensor follows the device the models were put on (``device``, default ``auto``);
``precision="bf16"`` runs the attention pass under bf16 autocast (faster on GPUs; weights are
not exact to float32 rounding, so the default is fp32).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmae.data import build_dataset, evaluation_loader, parse_data_spec
from rmae.device import resolve_device
from rmae.errors import UserError
from rmae.settings import replace, setting

from . import metrics as M
from .encoder import attention_pass, describe, load_encoder, model_device
from .registry import LAYER_METRICS, METRICS, PROBE_KEYS
from .results import Estimate, Results, RunResult
from .stats import bootstrap_ci, paired_difference_ci, wilson_ci

PROBES = tuple(PROBE_KEYS)


class AnalysisError(UserError, ValueError):
    """Runs or data that cannot be analysed together; the message says why and what to do."""


@dataclass
class AnalyzeConfig:
    data: str = setting("scenes:val:200", "evaluation images (a data spec)")
    batch_size: int = setting(16, "images per forward pass", low=1, high=4096)
    probes: tuple[str, ...] = setting(PROBES, "probes to run (linear, knn, attentive, dense), or none", choices=None)
    probe_train: str | None = setting(None, "training data of the probes (default: scenes:train of twice the eval size)")
    clicks: tuple[int, ...] = setting((1, 2, 4, 8, 16), "click counts of interactive segmentation (empty = skip)",
                                      low=1, high=4096)
    interactive_images: int | None = setting(None, "at most this many images for interactive segmentation", low=1)
    interactive_min_pairs: int = setting(30, "click counts are dropped from the top until at least this many "
                                                 "(image, instance) pairs own that many patches", low=1)
    negative_clicks: int = setting(0, "patches outside the instance also visible in interactive segmentation", low=0)
    interactive_image: str = setting("all", "what the pixel encoder sees in interactive segmentation: all | clicks",
                                     choices=("all", "clicks"))
    cka: bool = setting(True, "layer × layer CKA against the reference run")
    controls: bool = setting(False, "also run the controls (content-free, local, random-init, oracle) through the "
                                    "attention metrics, so the report shows each metric's null and ceiling")
    attributions: int = setting(4, "images per run whose IG / occlusion / Grad-CAM maps (probe logit and embedding "
                                   "similarity) the report shows (0 = none)", low=0, high=64)
    feature_maps: tuple[int, ...] = setting((-1,), "layers whose PCA feature maps the report shows (-1 = last; "
                                                   "empty = none)")
    embedding: str = setting("tsne", "2-D embedding of the image features in the report: tsne | umap | none",
                             choices=("tsne", "umap", "none"))
    seed: int = setting(0, "seed of the images (scenes), bootstrap and clicks", low=0)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps")
    precision: str = setting("fp32", "fp32 | bf16 (autocast for the attention pass where exact weights are not needed)",
                             choices=("fp32", "bf16"))
    num_workers: int = setting(0, "data-loader workers", low=0, high=64)

    def __post_init__(self) -> None:
        bad = [p for p in self.probes if p not in PROBES]
        if bad:
            from rmae.settings import ConfigError

            raise ConfigError(f"probes: unknown {', '.join(bad)}; choose from {', '.join(PROBES)} (or none)")


# ------------------------------------------------------------------------------------------
# entries


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _ci(lo: Any, hi: Any) -> tuple[float, float] | None:
    lo, hi = float(lo), float(hi)
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def layer_estimate(values: np.ndarray, seed: int, unit: str = "") -> Estimate:
    """Per-image values ``[n_images, layers]`` → value / CI of the last layer and the per-layer curve."""
    mean, (lo, hi) = bootstrap_ci(values, seed=seed)
    return Estimate(_num(mean[-1]), _ci(lo[-1], hi[-1]), [_num(m) for m in mean],
                    [_ci(a, b) for a, b in zip(lo, hi)], {"unit": unit} if unit else {})


def scalar_estimate(values: np.ndarray, seed: int) -> Estimate:
    mean, (lo, hi) = bootstrap_ci(values, seed=seed)
    return Estimate(_num(mean), _ci(lo, hi))


def difference(a: np.ndarray, b: np.ndarray, seed: int) -> Estimate:
    """``mean(b) − mean(a)`` paired over the same images: a statement about these checkpoints."""
    mean, (lo, hi) = paired_difference_ci(a, b, seed=seed)
    if np.ndim(mean) == 1:
        est = Estimate(_num(mean[-1]), _ci(lo[-1], hi[-1]), [_num(x) for x in mean], [_ci(x, y) for x, y in zip(lo, hi)])
    else:
        est = Estimate(_num(mean), _ci(lo, hi))
    est.extra["scope"] = "checkpoint"
    return est


# ------------------------------------------------------------------------------------------
# the per-image attention pass


@torch.no_grad()
def attention_metrics(models: dict[str, torch.nn.Module], loader, *, precision: str = "fp32",
                      progress: bool = False, on_batch=None) -> dict[str, dict[str, np.ndarray]]:
    """One explicit-attention pass per batch and model → per-image values
    ``{run: {metric: [n] or [n, layers]}}`` (:class:`analysis.metrics.stream.ImageMetrics`: each
    layer is reduced to its metric values as soon as it has run, so memory holds one layer's
    weights at a time). ``on_batch(name, info, images, instances, rec)`` sees each batch's
    recording, which keeps the last layer's weights and keys (the report's overlay figure takes
    its material there)."""
    from .metrics.stream import ImageMetrics

    infos = {n: describe(m) for n, m in models.items()}
    per_image: dict[str, dict[str, list]] = {n: defaultdict(list) for n in models}
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="attention metrics", unit="batch")
    for batch in batches:
        inst = batch.get("instances")
        for name, model in models.items():
            info = infos[name]
            if hasattr(model, "observe"):  # the oracle control is shown the ground truth it is built from
                model.observe(batch)
            reducer = ImageMetrics(info, inst.to(model_device(model)) if inst is not None else None)
            _, rec = attention_pass(model, batch["images"], keys=[-1], precision=precision, reduce=reducer, keep=[-1])
            for key, value in reducer.finish(rec.keys[-1]).items():
                per_image[name][key].append(value.cpu())
            if on_batch is not None:
                on_batch(name, info, batch["images"], inst, rec)
            del rec
    return {n: {k: torch.cat(v).double().numpy() for k, v in vals.items()} for n, vals in per_image.items()}


# ------------------------------------------------------------------------------------------
# the pipeline


def run_names(runs: Sequence[str | Path]) -> list[str]:
    """Folder names, made unique (``a``, ``a-2``…): the keys of ``results.runs``."""
    names, seen = [], defaultdict(int)
    for r in runs:
        base = Path(r).name or str(r)
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def analyze(runs: Sequence[str | Path], config: AnalyzeConfig | None = None, out: str | Path | None = None, *,
            progress: bool = True, **overrides: Any) -> Results:
    """Analyse run folders (or checkpoints) on the same images; returns :class:`Results` and, with
    ``out``, writes ``results.json``, ``report.md``, CSVs and figures there (:mod:`analysis.report`)."""
    t0 = time.time()
    cfg = replace(config or AnalyzeConfig(), overrides, "analyze settings") if overrides else (config or AnalyzeConfig())
    if not runs:
        raise AnalysisError("give at least one run folder")
    device = resolve_device(cfg.device)
    paths = dict(zip(run_names(runs), (Path(r) for r in runs)))
    models = {n: load_encoder(p, device) for n, p in paths.items()}
    infos = {n: describe(m) for n, m in models.items()}
    sizes = {n: i.input_size for n, i in infos.items()}
    depth = min(i.depth for i in infos.values())
    if any(not -depth <= layer < depth for layer in cfg.feature_maps):
        raise AnalysisError(f"feature_maps: layers must be in 0..{depth - 1} (or negative from the end) for these runs, "
                            f"got {','.join(map(str, cfg.feature_maps))}")
    ref = next((n for n, i in infos.items() if i.family == "mae"), next(iter(models)))
    # The same images for every model, each resized to the model's own input size (masks alike,
    # nearest neighbour): one raw dataset, one loader per input size.
    base = build_dataset(cfg.data, image_size=max(max(hw) for hw in sizes.values()), seed=cfg.seed)
    loaders = {hw: evaluation_loader(base, hw, batch_size=cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers)
               for hw in dict.fromkeys(sizes.values())}
    loader = loaders[sizes[ref]]
    has_instances = bool(getattr(base, "has_instances", False))
    skipped: dict[str, str] = {}

    from .figures import OverlayMaterial

    controls = {}
    if cfg.controls:
        from .controls import build_controls

        controls = build_controls(models[ref], cfg.seed)
        if not has_instances:
            controls.pop("control:oracle")
    overlay = OverlayMaterial()
    per_image: dict[str, dict[str, np.ndarray]] = {}
    for hw, group_loader in loaders.items():
        group = {n: m for n, m in models.items() if sizes[n] == hw}
        group.update(controls if hw == sizes[ref] else {})
        per_image.update(attention_metrics(group, group_loader, precision=cfg.precision, progress=progress,
                                           on_batch=lambda name, *a: None if name in controls else overlay.take(name, *a)))
    if not has_instances:
        for key in ("instance_mass", "instance_leak", "instance_jaccard", "instance_selectivity", "cls_jaccard", "corloc",
                    "interactive_iou"):
            skipped[key] = f"{cfg.data} has no instance masks (use scenes:… or coco:…)"
    res = Results(data=str(cfg.data), n_images=len(loader.dataset), seed=cfg.seed, reference=ref,
                  per_image={n: dict(v) for n, v in per_image.items()})
    for name, model in {**models, **controls}.items():
        info = infos.get(name) or describe(model)
        c = getattr(model, "config", None)
        entry = RunResult(name, str(paths.get(name, "")), "control" if name in controls else info.family,
                          name if name in controls else info.name, role="control" if name in controls else "run",
                          config=c.to_dict() if hasattr(c, "to_dict") else {})
        for key, values in per_image[name].items():
            entry.metrics[key] = (layer_estimate(values, cfg.seed, METRICS[key].unit if METRICS[key].unit in ("px", "nats") else "")
                                  if key in LAYER_METRICS else scalar_estimate(values, cfg.seed))
        res.runs[name] = entry
    for name in models:
        if name != ref:
            res.differences[f"{name} − {ref}"] = {
                key: difference(a, per_image[name][key], cfg.seed) for key, a in per_image[ref].items()
                if key in per_image[name] and per_image[name][key].shape == a.shape}

    region_models = {n: m for n, m in models.items() if infos[n].has_region_decoder}
    if cfg.clicks and has_instances and region_models:
        for hw, group_loader in loaders.items():
            group = {n: m for n, m in region_models.items() if sizes[n] == hw}
            if group:  # several sizes: each size's baselines under their own name
                _interactive(res, group, group_loader, cfg, device, suffix=f"@{hw[0]}x{hw[1]}" if len(loaders) > 1 else "")
    elif cfg.clicks and has_instances:
        skipped["interactive_iou"] = "no run has a region decoder (rae_* / rmae_*)"
    if cfg.probes:
        _probes(res, paths, cfg, skipped, progress)
    if cfg.cka and len(models) > 1:
        for name in models:
            if name == ref:
                continue
            cka_loader = evaluation_loader(base, sizes[ref], batch_size=cfg.batch_size, seed=cfg.seed, limit=128)
            # token CKA needs one patch grid; across grids (patch 14 vs 16, or another input size)
            # the examples are images: each image's mean patch token, the same images resized to
            # each model's size (as every other metric here sees them)
            same_size = sizes[name] == sizes[ref]
            tokens = "patch" if same_size and infos[name].grid == infos[ref].grid else "mean"
            other = None if same_size else evaluation_loader(base, sizes[name], batch_size=cfg.batch_size,
                                                             seed=cfg.seed, limit=128)
            mat = M.layer_cka(models[ref], models[name], cka_loader, tokens=tokens, batches_b=other)
            res.cka[name] = {"a": ref, "b": name, "matrix": mat.tolist(), "tokens": tokens,
                             "inputs": "same images" if same_size else
                             f"same images at {sizes[ref][0]}x{sizes[ref][1]} and {sizes[name][0]}x{sizes[name][1]}"}
    res.meta["input_sizes"] = {n: list(hw) for n, hw in sizes.items()}
    if out is not None:
        _views(res, models, paths, loaders, sizes, cfg, Path(out) / "figures", device, progress, skipped)
    res.meta.update(seconds=round(time.time() - t0, 1), skipped=skipped, device=str(device), precision=cfg.precision)
    if out is not None:
        from .report import write_report

        write_report(res, Path(out), overlay)
    return res


def _views(res: Results, models: dict[str, torch.nn.Module], paths: dict[str, Path], loaders: dict, sizes: dict,
           cfg: AnalyzeConfig, figures: Path, device: torch.device, progress: bool, skipped: dict[str, str]) -> None:
    """The report's attribution and feature-map figures (:mod:`analysis.attribution_views`,
    :mod:`analysis.featuremap_views`), each model on its own input size; what they show goes to
    ``results.meta``. Feature maps are fitted jointly, so they are drawn for the runs of the
    reference's input size."""
    ref_size = sizes[res.reference]
    if cfg.attributions:
        from .attribution_views import report_attributions

        shown: dict[str, Any] = {}
        for hw, loader in loaders.items():
            group = {n: m for n, m in models.items() if sizes[n] == hw}
            meta = report_attributions(group, paths, loader, cfg.attributions,
                                       cfg.probe_train or default_probe_train(cfg.data), figures,
                                       seed=cfg.seed, device=device, progress=progress)
            shown = {**meta, "runs": {**shown.get("runs", {}), **meta["runs"]}}
        res.meta["attributions"] = shown
    if cfg.feature_maps or cfg.embedding != "none":
        from .featuremap_views import report_feature_maps

        group = {n: m for n, m in models.items() if sizes[n] == ref_size}
        for n in models:
            if n not in group:
                skipped[f"feature maps ({n})"] = f"{n} takes {sizes[n]} images; the joint PCA is drawn at {ref_size}"
        res.meta["feature_maps"] = report_feature_maps(group, loaders[ref_size], cfg.feature_maps, cfg.embedding, 4,
                                                       figures, seed=cfg.seed)


def _interactive(res: Results, models: dict[str, torch.nn.Module], loader, cfg: AnalyzeConfig,
                 device: torch.device, suffix: str = "") -> None:
    """IoU vs clicks on one fixed set of pairs; each run's gain over the strongest baseline (given
    exactly its information) at each click count, paired over the pairs."""
    from .interactive import interactive_curve

    n = len(loader.dataset)
    iloader = loader if cfg.interactive_images is None else evaluation_loader(
        loader.dataset.base, describe(next(iter(models.values()))).input_size, batch_size=cfg.batch_size,
        seed=cfg.seed, limit=min(cfg.interactive_images, n))
    curve = interactive_curve(models, iloader, clicks=cfg.clicks, min_pairs=cfg.interactive_min_pairs, seed=cfg.seed,
                              device=device, negatives=cfg.negative_clicks, image=cfg.interactive_image)
    res.meta["interactive_protocol"] = {"negative_clicks": cfg.negative_clicks, "image": cfg.interactive_image,
                                        "pairs": curve.n_pairs, "min_pairs": cfg.interactive_min_pairs,
                                        "dropped_clicks": {str(k): v for k, v in curve.dropped.items()}}
    strongest = curve.strongest_baseline()

    def curve_estimate(table: np.ndarray) -> Estimate:
        per_click, cis = [], []
        for j in range(table.shape[1]):
            m, (lo, hi) = bootstrap_ci(table[:, j], seed=cfg.seed)
            per_click.append(_num(m))
            cis.append(_ci(lo, hi))
        return Estimate(per_click[-1] if per_click else None, cis[-1] if cis else None, extra={
            "clicks": list(curve.clicks), "per_click": per_click, "per_click_ci": [list(c) if c else None for c in cis],
            "n_pairs": [curve.n_pairs] * len(curve.clicks)})

    for name in curve.iou:
        table = curve.table(name)
        est = curve_estimate(table)
        if name in res.runs:
            gains, gain_cis = [], []
            for j, b in enumerate(strongest):
                m, (lo, hi) = paired_difference_ci(curve.table(b)[:, j], table[:, j], seed=cfg.seed)
                gains.append(_num(m))
                gain_cis.append(list(c) if (c := _ci(lo, hi)) else None)
            est.extra.update(gain_over_best_baseline=gains, gain_ci=gain_cis, best_baseline=[b + suffix for b in strongest])
            res.runs[name].metrics["interactive_iou"] = est
            res.per_image.setdefault(name, {})["interactive_iou"] = table  # [pairs, clicks]
        else:
            res.baselines.setdefault("interactive_iou", {})[name + suffix] = est
            res.per_image.setdefault(f"baseline:{name}{suffix}", {})["interactive_iou"] = table


def default_probe_train(data: str) -> str | None:
    """Labelled training data distinct from the eval data: scenes:train of twice the eval size
    (at least 500); None when the eval data imply no training split."""
    spec = parse_data_spec(data)
    if spec.kind == "scenes":
        return f"scenes:train:{max(500, 2 * (spec.length or 1000))}"
    return None


def _probes(res: Results, paths: dict[str, Path], cfg: AnalyzeConfig, skipped: dict[str, str], progress: bool) -> None:
    train = cfg.probe_train or default_probe_train(cfg.data)
    if train is None:
        for p in cfg.probes:
            skipped[PROBE_KEYS[p]] = (f"no labelled training data for {cfg.data}: pass --probe-train SPEC "
                                      "(e.g. folder:/data/train with class sub-folders)")
        return
    from .probes import ProbeConfig, run_probe

    for name, path in paths.items():
        if not path.is_dir():
            for p in cfg.probes:
                skipped[PROBE_KEYS[p]] = f"{path} is a checkpoint file; probes cache features in run folders (rmae import it)"
            continue
        for probe in cfg.probes:
            try:
                r = run_probe(path, ProbeConfig(probe=probe, data=train, eval_data=cfg.data, seed=cfg.seed,
                                                device=cfg.device), progress=progress)
            except UserError as e:  # data without labels / category maps: skip this probe, say why
                skipped[PROBE_KEYS[probe]] = " ".join(str(e).split())
                continue
            est = Estimate(_num(r["value"]) if r.get("value") is not None else None, None,
                           extra={k: r.get(k) for k in ("n_eval", "best_lr", "train", "eval", "chance", "metric")})
            if r.get("metric") == "accuracy" and r.get("n_eval"):
                _, (lo, hi) = wilson_ci(round(r["value"] * r["n_eval"]), r["n_eval"])
                est.ci = (lo, hi)
            res.runs[name].metrics[PROBE_KEYS[probe]] = est
