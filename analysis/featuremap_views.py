"""Feature maps in the report: the PCA view of patch features per layer and the 2-D embedding of
image features (the maths: :mod:`analysis.featuremaps`).

    OUT/figures/feature_pca_<layer>.png   rows = images, columns = runs; one PCA fitted jointly over
                                          every image and run (per run when widths differ)
    OUT/figures/embedding_2d.png          one panel per run: t-SNE / UMAP of the cls (or mean patch)
                                          embedding of every evaluation image, coloured by class
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import encoder
from .attribution_views import first_images
from .featuremaps import embed_2d, feature_pca, patch_features


def layer_name(layer: int, depths: Sequence[int]) -> str:
    """A file-name label of ``layer`` for runs of ``depths``: the block index when every run has
    that depth (``-1`` of 12 blocks → ``"11"``), else the index as given (``-1`` → ``"last"``)."""
    if len(set(depths)) == 1:
        return str(encoder.normalize_layer(layer, depths[0]))
    return "last" if layer == -1 else str(layer)


def pca_figure(images: np.ndarray, runs: dict[str, nn.Module], tensors: torch.Tensor, layer: int, label: str,
               path: Path) -> str:
    """Draw the PCA view of ``layer`` of every run for ``tensors [n, 3, H, W]`` (shown as
    ``images [n, H, W, 3]``) → the sentence that says how it was fitted."""
    from matplotlib.figure import Figure

    names = list(runs)
    feats = [patch_features(m, tensors, [layer])[0] for m in runs.values()]
    view = feature_pca(feats)
    n = len(images)
    fig = Figure(figsize=(1.7 * (1 + len(names)), 1.7 * n + 0.6))
    axes = fig.subplots(n, 1 + len(names), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        for j, name in enumerate(names):
            axes[i, 1 + j].imshow(view.rgb[j][i].numpy(), interpolation="nearest")
            if i == 0:
                axes[i, 1 + j].set_title(name, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    how = (f"one PCA over {n} images × {len(names)} run(s)" if view.joint else
           f"one PCA per run (their widths differ: {', '.join(str(int(f.shape[-1])) for f in feats)})")
    fig.suptitle(f"patch features of layer {label}: first 3 components → RGB\n{how}\n"
                 "background (first component ≤ 0) black", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return how


@torch.no_grad()
def pooled_features(model: nn.Module, loader: Any, limit: int = 2000) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cls (or mean patch) embedding of up to ``limit`` images of ``loader`` → (``[N, D]``,
    labels ``[N]`` or None)."""
    pool = "cls" if encoder.has_cls_token(model) else "mean"
    P, device = encoder.num_prefix_tokens(model), encoder.model_device(model)
    feats, labels = [], []
    for batch in loader:
        tokens = model.forward_features(batch["images"].to(device))
        feats.append(encoder.pool_tokens(tokens, pool, P).float().cpu())
        if "label" in batch:
            labels.append(batch["label"])
        if sum(len(f) for f in feats) >= limit:
            break
    x = torch.cat(feats)[:limit]
    y = torch.cat(labels)[:limit] if len(labels) == len(feats) else None
    return x, (y if y is not None and bool((y >= 0).all()) else None)


def embedding_figure(runs: dict[str, nn.Module], loader: Any, method: str, class_names: Sequence[str] | None,
                     seed: int, path: Path) -> str:
    """One panel per run: the 2-D ``method`` embedding of its image features, coloured by class →
    the sentence that says what is shown."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(runs), 3.3))
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    n, labelled = 0, False
    for ax, (name, model) in zip(axes, runs.items()):
        x, y = pooled_features(model, loader)
        n, labelled = len(x), y is not None
        xy = embed_2d(x, method, seed)
        if y is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=6, color="C0")
        else:
            for c in sorted(set(y.tolist())):
                pick = (y == c).numpy()
                label = class_names[c] if class_names and c < len(class_names) else str(c)
                ax.scatter(xy[pick, 0], xy[pick, 1], s=6, label=label, color=f"C{c % 10}")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if labelled:
        axes[-1].legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    what = (f"{method.upper() if method == 'umap' else 't-SNE'} of the image embedding (cls token, or mean patch token) "
            f"of {n} evaluation images per run, " + ("coloured by class" if labelled else "one colour: the data have no labels"))
    fig.suptitle(what, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return what


def report_feature_maps(models: dict[str, nn.Module], loader: Any, layers: Sequence[int], embedding: str,
                        n_images: int, figures: Path, *, seed: int) -> dict[str, Any]:
    """``rmae analyze``'s feature-map figures → what the report says about them (``results.meta``)."""
    from rmae.data import denormalize

    figures.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"pca": [], "embedding": None}
    if layers:
        tensors, _ = first_images(loader, max(1, n_images))
        shown = denormalize(tensors).permute(0, 2, 3, 1).numpy()
        depths = [len(m.blocks) for m in models.values()]
        for layer in layers:
            name = layer_name(layer, depths)
            how = pca_figure(shown, models, tensors, layer, name, figures / f"feature_pca_{name}.png")
            meta["pca"].append({"layer": name, "figure": f"figures/feature_pca_{name}.png", "fit": how})
    if embedding != "none":
        base = loader.dataset.base
        names = getattr(base, "class_names", None)
        if len(loader.dataset) < 3:
            meta["embedding"] = {"skipped": f"{len(loader.dataset)} evaluation image(s): a 2-D embedding needs 3 or more"}
        else:
            what = embedding_figure(models, loader, embedding, names, seed, figures / "embedding_2d.png")
            meta["embedding"] = {"figure": "figures/embedding_2d.png", "what": what}
    return meta


def markdown(meta: dict[str, Any]) -> list[str]:
    """The report's feature-map section (from :func:`report_feature_maps`' meta)."""
    lines = ["## Feature maps", ""]
    for item in meta.get("pca") or []:
        lines += [f"- Layer {item['layer']}: first three principal components of the patch features → RGB, "
                  f"{item['fit']}; patches whose first-component score is ≤ 0 (oriented so the image border is "
                  "background) are black, as in DINOv2's figures.", "", f"![PCA layer {item['layer']}]({item['figure']})", ""]
    emb = meta.get("embedding") or {}
    if "skipped" in emb:
        lines += [f"- No 2-D embedding: {emb['skipped']}.", ""]
    elif emb:
        lines += [f"- {emb['what']}.", "", f"![embedding]({emb['figure']})", ""]
    return lines
