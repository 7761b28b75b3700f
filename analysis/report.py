"""``rmae analyze``: every analysis on the same images for several runs, and a report.

Writes to ``OUT/``:
- ``results.json`` — per run, the metrics under their public names (``attention_distance``,
  ``attention_entropy``, ``attention_nmi``, ``instance_mass``, ``instance_leak``,
  ``instance_jaccard``, ``cls_jaccard``, ``corloc``, ``linear_probe``, ``knn``,
  ``attentive_probe``, ``dense_miou``, ``interactive_iou``), each ``{"value", "ci"}`` and,
  for per-layer metrics, ``"per_layer"``, ``"per_layer_ci"`` (``value`` = last layer);
  ``differences`` (each run minus the reference run, paired over the same images);
  ``baselines`` (interactive segmentation); ``cka`` (layer × layer, reference vs each run);
- ``per_layer.csv``, ``summary.csv``, ``differences.csv``;
- ``figures/``: per-layer curves with 95 % bands (PNG and interactive HTML), attention
  overlays, interactive-segmentation curves, CKA heat maps;
- ``report.md`` — tables with bootstrap 95 % intervals over images, differences with their
  intervals, and a plain list of where the region model does **not** win.

The reference run is the first MAE run given (else the first run): differences read
"run − reference", so with ``rmae analyze runs/mae runs/rmae`` they are R-MAE − MAE.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import rmae
from rmae.io import atomic_write
from rmae.data import RegionDataset, build_dataset, collate_regions, denormalize

from . import metrics as M
from .attention import AttentionExtractor, aggregate_heads, cls_maps, normalise_for_display, patch_query_maps, upsample
from .interactive import DEFAULT_CLICKS, interactive_curve
from .stats import bootstrap_ci, excludes_zero, paired_difference_ci, wilson_ci

LAYER_METRICS = ("attention_distance", "attention_entropy", "attention_nmi", "instance_mass", "instance_leak",
                 "instance_jaccard", "cls_jaccard")
UNITS = {"attention_distance": "px", "attention_entropy": "nats"}
# Which direction counts as "better" for the comparison verdicts; None = descriptive only.
BETTER = {"instance_mass": +1, "instance_leak": -1, "instance_jaccard": +1, "cls_jaccard": +1, "corloc": +1,
          "linear_probe": +1, "knn": +1, "attentive_probe": +1, "dense_miou": +1, "interactive_iou": +1,
          "attention_distance": None, "attention_entropy": None, "attention_nmi": None}
DESCRIPTIONS = {
    "attention_distance": "mean attention distance (px) of patch queries, heads averaged",
    "attention_entropy": "attention entropy (nats) of patch queries over patch keys",
    "attention_nmi": "NMI between query and key positions (low = queries attend alike, collapse)",
    "instance_mass": "attention mass of an instance's patch queries on the same instance",
    "instance_leak": "attention mass leaked to other instances",
    "instance_jaccard": "Jaccard of the 60 %-mass attention map with the query's instance",
    "cls_jaccard": "Jaccard of the 60 %-mass CLS map with the objects (DINO)",
    "corloc": "TokenCut object discovery, box IoU ≥ 0.5 (last-layer keys)",
    "linear_probe": "linear probe accuracy (cls token)",
    "knn": "weighted k-NN accuracy (cls token, k = 20, T = 0.07)",
    "attentive_probe": "attentive probe accuracy (patch tokens)",
    "dense_miou": "dense per-patch linear probe, mIoU",
    "interactive_iou": "interactive segmentation IoU at the most clicks",
}
PROBE_KEYS = {"linear": "linear_probe", "knn": "knn", "attentive": "attentive_probe", "dense": "dense_miou"}


class AnalysisError(ValueError):
    """Runs or data that cannot be analysed together; the message says why and what to do."""


def _names(runs: Sequence[str | Path]) -> list[str]:
    names, seen = [], defaultdict(int)
    for r in runs:
        base = Path(r).name or str(r)
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def _ci(lo, hi) -> list[float] | None:
    lo, hi = float(lo), float(hi)
    return None if not (math.isfinite(lo) and math.isfinite(hi)) else [lo, hi]


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _layer_entry(values: np.ndarray, unit: str | None, seed: int) -> dict[str, Any]:
    """values [n_images, layers] → {value (last layer), ci, per_layer, per_layer_ci}."""
    mean, (lo, hi) = bootstrap_ci(values, seed=seed)
    entry = {"value": _num(mean[-1]), "ci": _ci(lo[-1], hi[-1]), "per_layer": [_num(m) for m in mean],
             "per_layer_ci": [_ci(a, b) for a, b in zip(lo, hi)]}
    if unit:
        entry["unit"] = unit
    return entry


def _scalar_entry(values: np.ndarray, seed: int) -> dict[str, Any]:
    mean, (lo, hi) = bootstrap_ci(values, seed=seed)
    return {"value": _num(mean), "ci": _ci(lo, hi)}


@torch.no_grad()
def _attention_metrics(models: dict[str, torch.nn.Module], loader: DataLoader, progress: bool) -> tuple[dict, dict]:
    """Per-image values: {run: {metric: [n, layers] or [n]}} and overlay material."""
    per_image: dict[str, dict[str, list]] = {n: defaultdict(list) for n in models}
    overlays: dict[str, Any] = {}
    extractors = {n: AttentionExtractor(m) for n, m in models.items()}
    it = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc="attention metrics", unit="batch")
    for batch in it:
        images, inst = batch["images"], batch.get("instances")
        for name, model in models.items():
            p, grid = model.patch_size, tuple(model.patch_embed.grid_size)
            with M.recording_last_layer_keys(model) as keys:  # TokenCut's keys from the same pass
                attn = extractors[name](images)
            vals = per_image[name]
            vals["attention_distance"].append(M.mean_attention_distance(attn, grid, p).mean(-1))
            vals["attention_entropy"].append(M.attention_entropy(attn).mean(-1))
            vals["attention_nmi"].append(M.attention_nmi(attn).mean(-1))
            if inst is not None:
                ia = M.instance_awareness(attn, inst, p)
                vals["instance_mass"].append(ia.mass)
                vals["instance_leak"].append(ia.leak)
                vals["instance_jaccard"].append(ia.jaccard)
                vals["cls_jaccard"].append(M.cls_jaccard(attn, inst > 0, p))
                found = M.tokencut(keys[-1], grid, p)
                vals["corloc"].append(M.corloc(found.boxes, M.boxes_from_instances(inst)))
            if "images" not in overlays:  # the first batch: material for the overlay figure
                overlays.setdefault("maps", {})[name] = _overlay_maps(attn, grid, inst, p, images.shape[-2:])
        if "images" not in overlays:
            overlays["images"] = denormalize(images[:4]).permute(0, 2, 3, 1).numpy()
        del attn
    out = {n: {k: torch.cat(v).double().numpy() for k, v in vals.items()} for n, vals in per_image.items()}
    return out, overlays


def _overlay_maps(attn: list[torch.Tensor], grid, inst, patch: int, size) -> dict[str, np.ndarray]:
    """Last-layer CLS map and the patch-query map of each image's largest instance centre."""
    n = min(4, attn[-1].shape[0])
    last = attn[-1][:n]
    cls = normalise_for_display(upsample(aggregate_heads(cls_maps(last, grid)), tuple(size)))
    if inst is not None:
        owner, _ = M.patch_ownership(inst[:n], patch)
        queries = []
        for b in range(n):
            ids, counts = torch.unique(owner[b][owner[b] > 0], return_counts=True)
            if len(ids):
                cells = torch.nonzero(owner[b] == ids[counts.argmax()])
                centre = cells.float().mean(0)
                cell = cells[((cells.float() - centre) ** 2).sum(1).argmin()]
                queries.append(int(cell[0]) * grid[1] + int(cell[1]))
            else:
                queries.append(grid[0] // 2 * grid[1] + grid[1] // 2)
    else:
        queries = [grid[0] // 2 * grid[1] + grid[1] // 2] * n
    q = torch.tensor(queries)
    query = normalise_for_display(upsample(aggregate_heads(patch_query_maps(last, q, grid)), tuple(size)))
    return {"cls": cls.numpy(), "query": query.numpy(), "queries": np.array(queries), "grid": tuple(grid)}


def _probe_entries(runs: dict[str, Path], probes: Sequence[str], train: str, eval_: str, seed: int,
                   progress: bool) -> dict[str, dict[str, Any]]:
    from .probes import run_probe

    out: dict[str, dict[str, Any]] = defaultdict(dict)
    for name, path in runs.items():
        for probe in probes:
            res = run_probe(path, probe, train, eval_, seed=seed, progress=progress)
            entry = {"value": _num(res["value"]), "ci": None, "n_eval": res.get("n_eval"), "best_lr": res.get("best_lr"),
                     "train": res.get("train"), "eval": res.get("eval")}
            if res.get("metric") == "accuracy" and res.get("n_eval"):
                _, (lo, hi) = wilson_ci(round(res["value"] * res["n_eval"]), res["n_eval"])
                entry["ci"] = [lo, hi]
            out[name][PROBE_KEYS[probe]] = entry
    return out


def analyze(runs: Sequence[str | Path], data: str = "scenes:val:200", out: str | Path = "reports/compare", *,
            batch_size: int = 16, probes: Sequence[str] = ("linear", "knn", "attentive", "dense"),
            probe_train: str | None = None, clicks: Sequence[int] = DEFAULT_CLICKS, interactive_images: int | None = None,
            negative_clicks: int = 0, interactive_image: str = "all",
            cka: bool = True, seed: int = 0, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Analyse run folders on the same images; returns the results dict (also written)."""
    t0 = time.time()
    if not runs:
        raise AnalysisError("give at least one run folder")
    names = _names(runs)
    paths = dict(zip(names, (Path(r) for r in runs)))
    models = {n: rmae.load_model(p).eval().to(device) for n, p in paths.items()}
    sizes = {n: m.config.image_hw for n, m in models.items()}
    if len(set(sizes.values())) > 1:
        raise AnalysisError(f"runs were trained at different image sizes {sizes}; compare runs of one resolution "
                            "(the same images must be shown to every model)")
    ref = next((n for n, m in models.items() if m.config.family == "mae"), names[0])
    hw = next(iter(sizes.values()))
    ds = RegionDataset(build_dataset(data, image_size=hw[0], seed=seed), source=None, cache=None, image_size=hw,
                       train=False, crop_pct=1.0)
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate_regions)
    n_images = len(ds)

    per_image, overlays = _attention_metrics(models, loader, progress)
    results: dict[str, Any] = {"version": 1, "data": data, "n_images": n_images, "seed": seed, "reference": ref,
                               "runs": {}, "differences": {}, "baselines": {}}
    for name, model in models.items():
        c = model.config
        entry: dict[str, Any] = {"path": str(paths[name]), "family": c.family, "model": c.name or f"{c.family}_vit",
                                 "config": c.to_dict(), "metrics": {}}
        for key in LAYER_METRICS:
            if key in per_image[name]:
                entry["metrics"][key] = _layer_entry(per_image[name][key], UNITS.get(key), seed)
        if "corloc" in per_image[name]:
            entry["metrics"]["corloc"] = _scalar_entry(per_image[name]["corloc"], seed)
        results["runs"][name] = entry

    # differences: each run minus the reference, paired over the same images
    for name in names:
        if name == ref:
            continue
        diff: dict[str, Any] = {}
        for key, a in per_image[ref].items():
            b = per_image[name].get(key)
            if b is None or a.shape != b.shape:
                continue
            mean, (lo, hi) = paired_difference_ci(a, b, seed=seed)
            if a.ndim == 2:
                diff[key] = {"value": _num(mean[-1]), "ci": _ci(lo[-1], hi[-1]), "per_layer": [_num(x) for x in mean],
                             "per_layer_ci": [_ci(x, y) for x, y in zip(lo, hi)]}
            else:
                diff[key] = {"value": _num(mean), "ci": _ci(lo, hi)}
        results["differences"][f"{name} − {ref}"] = diff

    # interactive segmentation (models with a region decoder) and its baselines
    if clicks and any(m.config.has_region_branch for m in models.values()):
        sub = ds if interactive_images is None else torch.utils.data.Subset(ds, range(min(interactive_images, n_images)))
        iloader = DataLoader(sub, batch_size=batch_size, collate_fn=collate_regions)
        curve = interactive_curve(models, iloader, clicks=clicks, seed=seed, device=device,
                                  negatives=negative_clicks, image=interactive_image)
        results["interactive_protocol"] = {"negative_clicks": negative_clicks, "image": interactive_image}
        for name in list(curve.iou):
            per_click, cis = [], []
            for n in curve.clicks:
                m, (lo, hi) = bootstrap_ci(np.asarray(curve.iou[name][n], dtype=float), seed=seed)
                per_click.append(_num(m))
                cis.append(_ci(lo, hi))
            e = {"clicks": list(curve.clicks), "per_click": per_click, "per_click_ci": cis,
                 "n_pairs": len(curve.image_ids)}
            last = max((i for i, v in enumerate(per_click) if v is not None), default=None)
            e["value"], e["ci"] = (per_click[last], cis[last]) if last is not None else (None, None)
            if name in results["runs"]:
                results["runs"][name]["metrics"]["interactive_iou"] = e
            else:
                results["baselines"].setdefault("interactive_iou", {})[name] = e

    if probes:
        train = probe_train or _default_probe_train(data)
        for name, entries in _probe_entries(paths, probes, train, data, seed, progress).items():
            results["runs"][name]["metrics"].update(entries)

    if cka and len(models) > 1:
        cka_loader = DataLoader(torch.utils.data.Subset(ds, range(min(n_images, 128))), batch_size=batch_size,
                                collate_fn=collate_regions)
        for name in names:
            if name != ref:
                mat = M.layer_cka(models[ref], models[name], cka_loader)
                results.setdefault("cka", {})[name] = {"a": ref, "b": name, "matrix": mat.tolist()}

    results["seconds"] = round(time.time() - t0, 1)
    write_outputs(results, overlays, Path(out))
    return results


def _default_probe_train(data: str) -> str:
    from rmae.data import parse_data_spec

    spec = parse_data_spec(data)
    if spec.kind == "scenes":
        return f"scenes:train:{max(500, 2 * (spec.length or 1000))}"
    raise AnalysisError(f"probes need labelled training data distinct from {data}: pass --probe-train SPEC "
                        "(or --probes none)")


# ------------------------------------------------------------------------------------------
# outputs


def write_outputs(results: dict[str, Any], overlays: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    text = json.dumps(results, indent=1, allow_nan=False)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))
    _write_csv(results, out)
    from . import report_figures as F

    F.layer_curves(results, out / "figures")
    F.interactive_curves(results, out / "figures")
    F.overlays(overlays, out / "figures")
    F.cka_maps(results, out / "figures")
    md = render_markdown(results)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(md))


def _write_csv(results: dict[str, Any], out: Path) -> None:
    with open(out / "per_layer.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "metric", "layer", "value", "ci_low", "ci_high"])
        for run, r in results["runs"].items():
            for key, e in r["metrics"].items():
                for layer, (v, ci) in enumerate(zip(e.get("per_layer") or [], e.get("per_layer_ci") or [])):
                    w.writerow([run, key, layer, v, *(ci or [None, None])])
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "metric", "value", "ci_low", "ci_high"])
        for run, r in results["runs"].items():
            for key, e in r["metrics"].items():
                w.writerow([run, key, e.get("value"), *(e.get("ci") or [None, None])])
    with open(out / "differences.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["comparison", "metric", "value", "ci_low", "ci_high"])
        for comp, d in results["differences"].items():
            for key, e in d.items():
                w.writerow([comp, key, e.get("value"), *(e.get("ci") or [None, None])])


def _fmt(v: float | None, ci: list[float] | None = None, digits: int = 3) -> str:
    if v is None:
        return "–"
    s = f"{v:.{digits}f}"
    return s + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _protocol_text(p: dict[str, Any]) -> str:
    image = "the whole image" if p.get("image", "all") == "all" else "only the clicked patches of the image"
    neg = p.get("negative_clicks", 0)
    return (f"The pixel encoder sees {image}; the region encoder sees n patches of one instance"
            + (f" plus {neg} patches outside it (negative clicks)" if neg else "")
            + "; the region decoder predicts the rest (clicked patches pasted back, threshold 0.5).")


def verdict(key: str, diff: dict[str, Any]) -> str:
    """Plain words for a difference (run − reference) and its interval."""
    ci = diff.get("ci")
    if diff.get("value") is None or ci is None:
        return "not measured"
    if not excludes_zero(tuple(ci)):
        return "no clear difference (interval includes 0)"
    sign = 1 if diff["value"] > 0 else -1
    direction = "higher" if sign > 0 else "lower"
    better = BETTER.get(key)
    if better is None:
        return f"{direction} (descriptive)"
    return f"{direction} — {'better' if sign == better else 'worse'}"


def render_markdown(results: dict[str, Any]) -> str:
    runs = results["runs"]
    names = list(runs)
    lines = [f"# MAE vs R-MAE report — {results['data']}", "",
             f"{results['n_images']} images, seed {results['seed']}; reference run: **{results['reference']}**. "
             "Values are means over images with bootstrap 95 % intervals (1,000 resamples); probe accuracies "
             "carry Wilson intervals over eval images; differences are paired over the same images.", ""]
    lines += ["| run | family | model |", "|---|---|---|"]
    lines += [f"| {n} | {r['family']} | {r['model']} |" for n, r in runs.items()]
    lines.append("")
    keys = [k for k in DESCRIPTIONS if any(k in r["metrics"] for r in runs.values())]
    lines += ["## Summary (last layer for per-layer metrics)", "", "| metric | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for key in keys:
        cells = [_fmt(runs[n]["metrics"].get(key, {}).get("value"), runs[n]["metrics"].get(key, {}).get("ci")) for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    for key in keys:
        lines.append(f"- **{key}**: {DESCRIPTIONS[key]}")
    lines.append("")
    for comp, diff in results["differences"].items():
        lines += [f"## Differences: {comp}", "", "| metric | difference [95 % CI] | verdict |", "|---|---|---|"]
        for key in keys:
            if key in diff:
                lines.append(f"| {key} | {_fmt(diff[key]['value'], diff[key]['ci'])} | {verdict(key, diff[key])} |")
        lines.append("")
        not_winning = [k for k in keys if k in diff and BETTER.get(k) and not verdict(k, diff[k]).endswith("better")]
        # probes and interactive IoU are not paired per image here: compare their intervals
        run_name = comp.split(" − ")[0]
        for key in ("linear_probe", "knn", "attentive_probe", "dense_miou", "interactive_iou", "corloc"):
            a, b = runs[results["reference"]]["metrics"].get(key), runs[run_name]["metrics"].get(key)
            if a and b and a.get("value") is not None and b.get("value") is not None and key not in diff:
                if b["value"] <= a["value"]:
                    not_winning.append(key)
        if not_winning:
            lines += [f"**Where {run_name} does not win** against {results['reference']}: "
                      + ", ".join(sorted(set(not_winning))) + ".", ""]
        else:
            lines += [f"{run_name} is better than {results['reference']} on every measured metric with a direction.", ""]
    lines += ["## Per-layer metrics", ""]
    for key in LAYER_METRICS:
        if not any(key in r["metrics"] for r in runs.values()):
            continue
        depth = max(len(r["metrics"][key]["per_layer"]) for r in runs.values() if key in r["metrics"])
        lines += [f"### {key}", "", "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for layer in range(depth):
            cells = []
            for n in names:
                e = runs[n]["metrics"].get(key)
                if e and layer < len(e["per_layer"]):
                    cells.append(_fmt(e["per_layer"][layer], e["per_layer_ci"][layer]))
                else:
                    cells.append("–")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines += ["", f"![{key}](figures/{key}.png)", ""]
    inter = {n: r["metrics"]["interactive_iou"] for n, r in runs.items() if "interactive_iou" in r["metrics"]}
    inter.update({f"baseline: {k}": v for k, v in results.get("baselines", {}).get("interactive_iou", {}).items()})
    if inter:
        clicks = next(iter(inter.values()))["clicks"]
        lines += ["## Interactive segmentation (IoU vs clicks)", "",
                  _protocol_text(results.get("interactive_protocol", {})), "",
                  "| clicks | " + " | ".join(inter) + " |", "|---|" + "---|" * len(inter)]
        for i, n in enumerate(clicks):
            lines.append(f"| {n} | " + " | ".join(_fmt(e["per_click"][i], e["per_click_ci"][i]) for e in inter.values()) + " |")
        lines += ["", "![interactive](figures/interactive_iou.png)", ""]
    if results.get("cka"):
        lines += ["## CKA between layers", ""]
        for name, c in results["cka"].items():
            mat = np.asarray(c["matrix"])
            diag = np.diag(mat) if mat.shape[0] == mat.shape[1] else np.array([])
            lines.append(f"- {c['a']} vs {c['b']}: same-layer CKA " + ", ".join(f"{x:.2f}" for x in diag)
                         + f" (figure: figures/cka_{name}.png)")
        lines.append("")
    lines += ["## Attention overlays", "", "![overlays](figures/attention_overlays.png)", "",
              f"_Computed in {results.get('seconds', 0):.0f} s._", ""]
    return "\n".join(lines)
