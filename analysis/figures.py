"""Figures of a report: matplotlib PNGs and plotly HTML, drawn from :class:`Results`, plus the
attention-overlay material collected during the analysis pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .registry import LAYER_METRICS, metric
from .results import Estimate, Results


class _Figures:
    """pyplot-like ``subplots`` on ``matplotlib.figure.Figure``: no global backend switch, so a
    notebook's inline backend is left alone, and figures need no closing."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, figsize=None, squeeze: bool = True):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(nrows, ncols, squeeze=squeeze)

    @staticmethod
    def close(fig) -> None:
        pass


def _plt():
    return _Figures


def _band(mean: list, ci: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = np.array([np.nan if v is None else v for v in mean], dtype=float)
    lo = np.array([np.nan if c is None else c[0] for c in ci], dtype=float)
    hi = np.array([np.nan if c is None else c[1] for c in ci], dtype=float)
    return m, lo, hi


def layer_curves(results: Results, out: Path) -> None:
    """One PNG + HTML per per-layer metric, every run with its 95 % band."""
    import plotly.graph_objects as go

    plt = _plt()
    for key in LAYER_METRICS:
        runs = {n: r.metrics[key] for n, r in results.runs.items() if key in r.metrics and r.metrics[key].per_layer}
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        pfig = go.Figure()
        for i, (name, e) in enumerate(runs.items()):
            mean, lo, hi = _band(e.per_layer, e.per_layer_ci or [None] * len(e.per_layer))
            x = np.arange(len(mean))
            line, = ax.plot(x, mean, marker="o", ms=3, label=name)
            ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
            from matplotlib.colors import to_hex

            color = to_hex(line.get_color())
            pfig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself",
                                      fillcolor=color, opacity=0.2, line=dict(width=0), hoverinfo="skip",
                                      showlegend=False, legendgroup=name))
            pfig.add_trace(go.Scatter(x=x, y=mean, mode="lines+markers", name=name, line=dict(color=color),
                                      legendgroup=name))
        unit = metric(key).unit
        ax.set_xlabel("layer")
        ax.set_ylabel(metric(key).title + (f" ({unit})" if unit else ""))
        ax.set_title(f"{metric(key).title} per layer (95 % CI)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{key}.png", dpi=120)
        plt.close(fig)
        pfig.update_layout(title=f"{metric(key).title} per layer (95 % CI)", xaxis_title="layer", yaxis_title=key,
                           template="plotly_white", height=420)
        pfig.write_html(out / f"{key}.html", include_plotlyjs="cdn")


def interactive_curves(results: Results, out: Path) -> None:
    import plotly.graph_objects as go

    curves: dict[str, Estimate] = {n: r.metrics["interactive_iou"] for n, r in results.runs.items()
                                   if "interactive_iou" in r.metrics}
    curves.update({f"baseline: {k}": v for k, v in results.baselines.get("interactive_iou", {}).items()})
    if not curves:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    pfig = go.Figure()
    for name, e in curves.items():
        mean, lo, hi = _band(e.extra.get("per_click") or [], e.extra.get("per_click_ci") or [])
        x = np.array(e.extra.get("clicks") or [], dtype=float)
        style = "--" if name.startswith("baseline") else "-"
        line, = ax.plot(x, mean, style, marker="o", ms=3, label=name)
        ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color())
        pfig.add_trace(go.Scatter(x=x, y=mean, mode="lines+markers", name=name,
                                  error_y=dict(type="data", symmetric=False, array=hi - mean, arrayminus=mean - lo),
                                  line=dict(dash="dash" if name.startswith("baseline") else "solid")))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clicks (visible region patches)")
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.set_title("interactive segmentation (95 % CI)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "interactive_iou.png", dpi=120)
    plt.close(fig)
    pfig.update_layout(title="interactive segmentation IoU vs clicks", xaxis_type="log", xaxis_title="clicks",
                       yaxis_title="IoU", yaxis_range=[0, 1], template="plotly_white", height=420)
    pfig.write_html(out / "interactive_iou.html", include_plotlyjs="cdn")


class OverlayMaterial:
    """Collects, from the first batch of the analysis pass, the images and for each run the
    last-layer CLS map and the patch-query map at the centre of each image's largest instance
    (``analysis.analyze.attention_metrics(on_batch=material.take)``)."""

    def __init__(self, n: int = 4) -> None:
        self.n = n
        self.images: np.ndarray | None = None
        self.maps: dict[str, dict[str, Any]] = {}

    def take(self, name: str, info, images: torch.Tensor, instances: torch.Tensor | None, rec) -> None:
        if name in self.maps:
            return
        from rmae.data import denormalize

        from .attention import aggregate_heads, cls_maps, normalise_for_display, patch_query_maps, upsample
        from .groundtruth import patch_ownership

        n, grid, P = min(self.n, images.shape[0]), info.grid, info.num_prefix_tokens
        last = rec.weights[-1][:n].float().cpu()
        size = tuple(images.shape[-2:])
        centre = grid[0] // 2 * grid[1] + grid[1] // 2
        queries = [centre] * n
        if instances is not None:
            owner, _ = patch_ownership(instances[:n].cpu(), info.patch_size)
            for b in range(n):
                ids, counts = torch.unique(owner[b][owner[b] > 0], return_counts=True)
                if len(ids):
                    cells = torch.nonzero(owner[b] == ids[counts.argmax()])
                    cell = cells[((cells.float() - cells.float().mean(0)) ** 2).sum(1).argmin()]
                    queries[b] = int(cell[0]) * grid[1] + int(cell[1])
        maps = {"queries": np.array(queries), "grid": tuple(grid)}
        if info.has_cls:
            maps["cls"] = normalise_for_display(upsample(aggregate_heads(cls_maps(last, grid, num_prefix=P)), size)).numpy()
        q = torch.tensor(queries, device=last.device)
        maps["query"] = normalise_for_display(upsample(aggregate_heads(
            patch_query_maps(last, q, grid, num_prefix=P)), size)).numpy()
        # each run's own view of the images (runs of different input sizes see them resized)
        maps["images"] = denormalize(images[:n].cpu()).permute(0, 2, 3, 1).clamp(0, 1).numpy()
        self.maps[name] = maps
        if self.images is None:
            self.images = maps["images"]


def overlays(material: OverlayMaterial, out: Path) -> None:
    """Rows = images; columns = image, then per run: CLS map and the patch-query map (query
    marked) of the last layer, overlaid on the image."""
    if not material.maps or material.images is None:
        return
    plt = _plt()
    images = material.images
    runs = list(material.maps)
    n = len(images)
    cols = 1 + 2 * len(runs)
    fig, axes = plt.subplots(n, cols, figsize=(1.7 * cols, 1.7 * n + 0.3), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        if i == 0:
            axes[i, 0].set_title("image", fontsize=7)
        for j, run in enumerate(runs):
            m = material.maps[run]
            for k, (kind, label) in enumerate((("cls", "CLS"), ("query", "patch query"))):
                ax = axes[i, 1 + 2 * j + k]
                ax.imshow(m["images"][i])
                if kind not in m:  # no cls token (e.g. a mean-pooled ViT)
                    continue
                ax.imshow(m[kind][i], cmap="inferno", alpha=0.6, vmin=0, vmax=1)
                if kind == "query":  # mark the query patch
                    ax.plot(*_query_centre(int(m["queries"][i]), m[kind][i].shape, m["grid"]), marker="+",
                            color="cyan", ms=8)
                if i == 0:
                    ax.set_title(f"{run}\n{label}", fontsize=6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "attention_overlays.png", dpi=110)
    plt.close(fig)


def _query_centre(q: int, shape: tuple[int, int], grid: tuple[int, int]) -> tuple[float, float]:
    """Pixel (x, y) of patch ``q``'s centre in a map of ``shape``."""
    h, w = shape
    gh, gw = grid
    y, x = divmod(q, gw)
    return (x + 0.5) * w / gw, (y + 0.5) * h / gh


def cka_maps(results: Results, out: Path) -> None:
    if not results.cka:
        return
    plt = _plt()
    for name, c in results.cka.items():
        mat = np.asarray(c["matrix"])
        fig, ax = plt.subplots(figsize=(3.6, 3.2))
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_xlabel(f"{c['b']} layer")
        ax.set_ylabel(f"{c['a']} layer")
        ax.set_title("linear CKA", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out / f"cka_{name}.png", dpi=120)
        plt.close(fig)
