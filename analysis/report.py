"""The written report of an analysis: ``results.json``, ``report.md``, CSV tables and figures.

    OUT/results.json        :class:`analysis.results.Results` (names from :mod:`analysis.registry`)
    OUT/report.md           tables with intervals, differences with their scope, what was skipped
    OUT/per_layer.csv, summary.csv, differences.csv
    OUT/figures/            per-layer curves (PNG + HTML), attention overlays, interactive curves, CKA,
                            attributions_<run>.png, feature_pca_<layer>.png, embedding_2d.png

Verdict words follow the evidence: a difference between two checkpoints (``"scope":
"checkpoint"``, intervals over images) is reported as what it is — these checkpoints differ —
never as "better" or "worse"; only ``"scope": "method"`` (≥ 2 seeds per side, intervals across
seeds, from ``rmae study``) earns a direction word, and only for metrics with a direction.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from rmae.io import atomic_write_text

from .registry import LAYER_METRICS, METRICS, metric
from .results import Estimate, Results, format_value
from .stats import excludes_zero


def verdict(key: str, diff: Estimate | dict) -> str:
    """Plain words for a difference (run − reference) and its interval, at its scope."""
    d = diff if isinstance(diff, Estimate) else Estimate.from_json(diff, key, [])
    if d is None or d.value is None or d.ci is None:
        return "not measured"
    scope = d.extra.get("scope", "checkpoint")
    if not excludes_zero(d.ci):
        return "no clear difference (interval includes 0)"
    direction = "higher" if d.value > 0 else "lower"
    if scope != "method":
        return f"{direction} on these checkpoints (one per side; not a method verdict)"
    better = metric(key).better
    if better is None:
        return f"{direction} (descriptive)"
    return f"{direction} — {'better' if (d.value > 0) == (better > 0) else 'worse'}"


def _protocol_text(p: dict) -> str:
    image = "the whole image" if p.get("image", "all") == "all" else "only the clicked patches of the image"
    neg = p.get("negative_clicks", 0)
    return (f"The pixel encoder sees {image}; the region encoder sees n patches of one instance"
            + (f" plus {neg} patches outside it (negative clicks)" if neg else "")
            + "; the region decoder predicts the rest (clicked patches pasted back, threshold 0.5).")


def render_markdown(results: Results) -> str:
    runs = results.runs
    names = list(runs)
    lines = [f"# MAE vs R-MAE report — {results.data}", "",
             f"{results.n_images} images, seed {results.seed}; reference run: **{results.reference}**. "
             "Values are means over images with bootstrap 95 % intervals (1,000 resamples); probe accuracies "
             "carry Wilson intervals over eval images; differences are paired over the same images.", ""]
    lines += ["| run | family | model |", "|---|---|---|"]
    lines += [f"| {n} | {r.family} | {r.model} |" for n, r in runs.items()]
    lines.append("")
    keys = [k for k in METRICS if any(k in r.metrics for r in runs.values())]
    lines += ["## Summary (last layer for per-layer metrics)", "", "| metric | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for key in keys:
        cells = [(runs[n].metrics[key].formatted if key in runs[n].metrics else format_value(None)) for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    for key in keys:
        m = METRICS[key]
        ref = "; ".join(x for x in (f"null: {m.null}" if m.null else "", f"ceiling: {m.ceiling}" if m.ceiling else "") if x)
        lines.append(f"- **{key}**: {m.description}" + (f" ({ref})" if ref else ""))
    lines.append("")
    skipped = results.meta.get("skipped") or {}
    if skipped:
        lines += ["## Not measured", ""] + [f"- **{k}**: {why}" for k, why in skipped.items()] + [""]
    for comp, diff in results.differences.items():
        scope = {e.extra.get("scope", "checkpoint") for e in diff.values()}
        lines += [f"## Differences: {comp}", "", "| metric | difference [95 % CI] | reading |", "|---|---|---|"]
        for key in keys:
            if key in diff:
                lines.append(f"| {key} | {diff[key].formatted} | {verdict(key, diff[key])} |")
        lines.append("")
        if scope == {"checkpoint"}:
            lines += ["These intervals are over the images of **one checkpoint per side**: they say how these two "
                      "checkpoints differ, not whether one method beats the other (another seed of either would land "
                      "elsewhere). To compare methods, train several seeds of each and compare across seeds: "
                      "`rmae study --seeds 3 --families mae,rmae …`.", ""]
    lines += ["## Per-layer metrics", ""]
    for key in LAYER_METRICS:
        if not any(key in r.metrics and r.metrics[key].per_layer for r in runs.values()):
            continue
        depth = max(len(r.metrics[key].per_layer) for r in runs.values() if key in r.metrics and r.metrics[key].per_layer)
        lines += [f"### {key}", "", "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for layer in range(depth):
            cells = []
            for n in names:
                e = runs[n].metrics.get(key)
                if e is None or not e.per_layer or layer >= len(e.per_layer):
                    cells.append(format_value(None))
                    continue
                ci = e.per_layer_ci[layer] if e.per_layer_ci and layer < len(e.per_layer_ci) else None
                cells.append(format_value(e.per_layer[layer], ci))
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines += ["", f"![{key}](figures/{key}.png)", ""]
    inter = {n: r.metrics["interactive_iou"] for n, r in runs.items() if "interactive_iou" in r.metrics}
    base = results.baselines.get("interactive_iou", {})
    if inter:
        protocol = results.meta.get("interactive_protocol") or {}
        clicks = next(iter(inter.values())).extra.get("clicks") or []
        cols = {**inter, **{f"baseline: {k}": v for k, v in base.items()}}
        lines += ["## Interactive segmentation (IoU vs clicks)", "", _protocol_text(protocol),
                  f"Every point is over the same {protocol.get('pairs', '?')} (image, instance) pairs. Baselines get "
                  "exactly the model's information (the same image, the ground-truth pixels of the same visible "
                  "patches pasted in); the gain is each run minus the strongest baseline at that click count, "
                  "paired over the pairs.", ""]
        for n, why in (protocol.get("dropped_clicks") or {}).items():
            lines.append(f"- {n} clicks left out: {why}")
        lines += ["", "| clicks | " + " | ".join(cols) + " | " + " | ".join(f"{n}: gain over the strongest baseline"
                                                                      for n in inter) + " |",
                  "|---|" + "---|" * (len(cols) + len(inter))]
        for i, n in enumerate(clicks):
            cells = []
            for e in cols.values():
                pc, pci = e.extra.get("per_click") or [], e.extra.get("per_click_ci") or []
                cells.append(format_value(pc[i] if i < len(pc) else None, pci[i] if i < len(pci) else None))
            for e in inter.values():
                g, gci, best = (e.extra.get(k) or [] for k in ("gain_over_best_baseline", "gain_ci", "best_baseline"))
                cells.append(format_value(g[i] if i < len(g) else None, gci[i] if i < len(gci) else None)
                             + (f" (vs {best[i]})" if i < len(best) else ""))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "![interactive](figures/interactive_iou.png)", ""]
    if results.cka:
        lines += ["## CKA between layers", ""]
        for name, c in results.cka.items():
            mat = np.asarray(c["matrix"])
            diag = np.diag(mat) if mat.ndim == 2 and mat.shape[0] == mat.shape[1] else np.array([])
            how = {"patch": "patch tokens", "mean": "mean patch token per image", "cls": "cls token per image"}.get(
                str(c.get("tokens")), str(c.get("tokens")))
            lines.append(f"- {c['a']} vs {c['b']}: same-layer CKA " + ", ".join(f"{x:.2f}" for x in diag)
                         + f" ({how}; {c.get('inputs', 'same images')}; figure: figures/cka_{name}.png)")
        lines.append("")
    lines += _views_section(results)
    lines += ["## Attention overlays", "", "![overlays](figures/attention_overlays.png)", "",
              f"_Computed in {results.meta.get('seconds', 0):.0f} s on {results.meta.get('device', '?')}._", ""]
    return "\n".join(lines)


def _views_section(results: Results) -> list[str]:
    """Attributions and feature maps, when the analysis drew them (their own modules word them)."""
    lines: list[str] = []
    if results.meta.get("attributions"):
        from .attribution_views import markdown

        lines += markdown(results.meta["attributions"])
    if results.meta.get("feature_maps"):
        from .featuremap_views import markdown

        lines += markdown(results.meta["feature_maps"])
    return lines


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_tables(results: Results, out: Path) -> None:
    per_layer = [["run", "metric", "layer", "value", "ci_low", "ci_high"]]
    summary = [["run", "metric", "value", "ci_low", "ci_high"]]
    for run, r in results.runs.items():
        for key, e in r.metrics.items():
            summary.append([run, key, e.value, *(e.ci or (None, None))])
            for layer, (v, ci) in enumerate(zip(e.per_layer or [], e.per_layer_ci or [])):
                per_layer.append([run, key, layer, v, *(ci or (None, None))])
    diffs = [["comparison", "metric", "scope", "value", "ci_low", "ci_high"]]
    for comp, d in results.differences.items():
        for key, e in d.items():
            diffs.append([comp, key, e.extra.get("scope", "checkpoint"), e.value, *(e.ci or (None, None))])
    for name, rows in (("per_layer.csv", per_layer), ("summary.csv", summary), ("differences.csv", diffs)):
        atomic_write_text(out / name, _csv(rows))


def write_report(results: Results, out: Path, overlay=None) -> None:
    """Write every output of an analysis into ``out`` (see module docstring)."""
    from . import figures as F

    (out / "figures").mkdir(parents=True, exist_ok=True)
    results.save(out / "results.json")
    write_tables(results, out)
    F.layer_curves(results, out / "figures")
    F.interactive_curves(results, out / "figures")
    if overlay is not None:
        F.overlays(overlay, out / "figures")
    F.cka_maps(results, out / "figures")
    atomic_write_text(out / "report.md", render_markdown(results))
