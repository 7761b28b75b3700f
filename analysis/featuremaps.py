"""Feature maps: the DINOv2-style PCA view of patch features, and 2-D embeddings of image features.

**PCA view** (Oquab et al. 2023, "DINOv2", Fig. 1 and Fig. 9: "the first three components of a PCA
over the patch features of the images shown, mapped to RGB; background removed by removing patches
with a negative score of the first PCA component"). Given patch features ``[n, gh, gw, D]`` of the
shown images (one such tensor per run):

1. one PCA over every patch of every image (and every run, when their widths match — ``joint``)
   gives the first component's score ``s`` of each patch;
2. the component's sign is arbitrary, so it is oriented such that most patches on the image
   border score negative (background touches the border, objects mostly do not); patches with
   ``s ≤ threshold`` (DINOv2: 0) are background;
3. a second PCA over the foreground patches alone (jointly, as in step 1) gives three components,
   each min–max scaled to [0, 1] over all those patches → RGB; background is black.

Fitting jointly is what makes colours comparable: the same part of two images, or of two runs,
gets the same colour only if one PCA placed both. Two encoders' features live in unrelated
spaces even at equal width, so before a joint fit each run's features are centred on their own
mean and divided by their own overall standard deviation (otherwise the first component would
just separate the runs — one run all background — and the larger-scaled run would own the
colours); nothing changes within a run. Runs of different widths cannot share a PCA: each is then
fitted on its own (``FeaturePCA.joint`` is False — say so next to the picture).

**2-D embeddings** (:func:`embed_2d`): t-SNE (scikit-learn) or UMAP (``umap-learn``, when
installed) of one vector per image (the cls token, or the mean patch token).

Features come from :func:`patch_features` (through :func:`analysis.encoder.block_tokens`: the last
block with the final norm, earlier blocks their raw residual stream). Everything here is a pure
function of tensors except that one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from . import encoder

Tensor = torch.Tensor

__all__ = ["EMBEDDINGS", "FeaturePCA", "border_mask", "embed_2d", "feature_pca", "patch_features",
           "principal_components", "umap_available"]

EMBEDDINGS = ("tsne", "umap")


# ------------------------------------------------------------------------------------------
# features


@torch.no_grad()
def patch_features(model: nn.Module, images: Tensor, layers: Sequence[int]) -> list[Tensor]:
    """Patch tokens of blocks ``layers`` on the grid: one float32 ``[B, gh, gw, D]`` per layer
    (prefix tokens dropped), on the CPU. ``images [B, 3, H, W]`` go to the model's device."""
    P, (gh, gw) = encoder.num_prefix_tokens(model), encoder.grid_size(model)
    tokens = encoder.block_tokens(model, images.to(encoder.model_device(model)), layers)
    return [t[:, P:].float().reshape(t.shape[0], gh, gw, -1).cpu() for t in tokens]


# ------------------------------------------------------------------------------------------
# PCA


def principal_components(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """PCA of the rows of ``x [M, D]`` (float64): (mean ``[D]``, the first ``k`` components ``[k, D]``
    as rows, their explained-variance ratios ``[k]``). Components beyond the rank of the centred
    data (at most ``min(M − 1, D)``) do not exist: they are zero rows with ratio 0.

    Signs are made deterministic (the SVD's are arbitrary): each component points so that the
    largest-magnitude projection of the data on it is positive.
    """
    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    rank = int((s > s.max().clamp_min(torch.finfo(torch.float64).tiny) * max(xc.shape) * 1e-12).sum()) if s.numel() else 0
    comps, s = vh[:min(k, rank)], s[:rank]
    scores = xc @ comps.T  # [M, k']
    extreme = scores.gather(0, scores.abs().argmax(0, keepdim=True))[0]  # the largest-magnitude score of each
    comps = comps * torch.where(extreme < 0, -1.0, 1.0).to(comps.dtype)[:, None]
    var = s**2
    ratio = var[:k] / var.sum().clamp_min(torch.finfo(torch.float64).tiny)
    if comps.shape[0] < k:  # fewer samples or dimensions than components
        comps = torch.cat([comps, comps.new_zeros(k - comps.shape[0], x.shape[1])])
        ratio = torch.cat([ratio, ratio.new_zeros(k - ratio.shape[0])])
    return mean, comps, ratio


def border_mask(grid: tuple[int, int]) -> Tensor:
    """bool ``[gh, gw]``: the patches on the grid's outer ring."""
    m = torch.zeros(grid, dtype=torch.bool)
    m[0], m[-1], m[:, 0], m[:, -1] = True, True, True, True
    return m


@dataclass
class FeaturePCA:
    """The PCA view of one or more runs' patch features (see the module docstring).

    Per run (lists in the runs' order): ``rgb`` float32 ``[n, gh, gw, 3]`` in [0, 1] (background
    black), ``foreground`` bool ``[n, gh, gw]``, ``first`` float32 ``[n, gh, gw]`` the oriented
    first-component scores. ``joint``: one fit over all runs (else one per run); ``explained``:
    per fit, the variance ratios of the three colour components among the foreground patches.
    """

    rgb: list[Tensor]
    foreground: list[Tensor]
    first: list[Tensor]
    joint: bool
    explained: list[list[float]]


def _fit(runs: list[Tensor], background: bool, threshold: float) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[float]]:
    """One PCA view fitted over ``runs`` (each ``[n, gh, gw, D]``, same D)."""
    flat = [f.reshape(-1, f.shape[-1]).double() for f in runs]
    x = torch.cat(flat)
    centre, first_dir, _ = principal_components(x, 1)
    firsts = [(f - centre) @ first_dir[0] for f in flat]
    on_border = torch.cat([border_mask(tuple(f.shape[1:3])).expand(f.shape[:3]).reshape(-1) for f in runs])
    border_scores = torch.cat(firsts)[on_border]
    if (border_scores > threshold).sum() > (border_scores <= threshold).sum():  # background must score low
        firsts = [-s for s in firsts]
    fgs = [(s > threshold) if background else torch.ones_like(s, dtype=torch.bool) for s in firsts]
    fg_all = torch.cat(fgs)
    rgb_flat = [torch.zeros(f.shape[0], 3, dtype=torch.float64) for f in flat]
    explained = [0.0, 0.0, 0.0]
    if fg_all.sum() >= 2:
        xf = x[fg_all]
        mean, comps, ratio = principal_components(xf, 3)
        scores = (xf - mean) @ comps.T  # [M_fg, 3]
        lo, hi = scores.min(0).values, scores.max(0).values
        scale = (hi - lo).clamp_min(torch.finfo(torch.float64).tiny)
        for f, fg, out in zip(flat, fgs, rgb_flat):
            out[fg] = (((f[fg] - mean) @ comps.T - lo) / scale).clamp(0, 1)
        explained = [float(r) for r in ratio]
    shapes = [f.shape[:3] for f in runs]
    return ([r.reshape(*s, 3).float() for r, s in zip(rgb_flat, shapes)], [g.reshape(s) for g, s in zip(fgs, shapes)],
            [v.reshape(s).float() for v, s in zip(firsts, shapes)], explained)


def feature_pca(features: Sequence[Tensor], *, background: bool = True, threshold: float = 0.0,
                joint: bool = True) -> FeaturePCA:
    """The DINOv2 PCA view of ``features`` — one ``[n, gh, gw, D]`` tensor per run (``n`` and the
    grid may differ between runs) — fitted jointly over every image, and over every run when
    ``joint`` and all widths ``D`` are equal (each run centred and scaled by its own mean and
    overall standard deviation first); otherwise one fit per run. ``background=False`` keeps every patch (no removal)."""
    if not features:
        raise ValueError("feature_pca needs the features of at least one run")
    for f in features:
        if f.ndim != 4:
            raise ValueError(f"features must be [n, gh, gw, D] per run, got {list(f.shape)}")
    widths = {int(f.shape[-1]) for f in features}
    together = joint and len(widths) == 1
    if together:
        centred = [f.double() - f.double().reshape(-1, f.shape[-1]).mean(0) for f in features]
        scaled = [f / f.std().clamp_min(torch.finfo(torch.float64).tiny) for f in centred]
        rgb, fg, first, explained = _fit(scaled, background, threshold)
        return FeaturePCA(rgb, fg, first, True, [explained])
    parts = [_fit([f.double()], background, threshold) for f in features]
    return FeaturePCA([p[0][0] for p in parts], [p[1][0] for p in parts], [p[2][0] for p in parts], False,
                      [p[3] for p in parts])


# ------------------------------------------------------------------------------------------
# 2-D embeddings


def umap_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("umap") is not None


def embed_2d(features: Tensor | np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """One vector per image ``[N, D]`` → 2-D coordinates ``float32 [N, 2]``, deterministic for a seed.

    ``"tsne"``: scikit-learn's t-SNE (PCA initialisation, perplexity ``min(30, (N − 1) / 3)``);
    ``"umap"``: umap-learn (``n_neighbors = min(15, N − 1)``), ValueError when it is not
    installed. Features are standardised per dimension first (so no dimension dominates by scale).
    """
    if method not in EMBEDDINGS:
        raise ValueError(f"method must be one of {', '.join(EMBEDDINGS)}, got {method!r}")
    x = np.asarray(features.numpy() if isinstance(features, Tensor) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"embed_2d needs [N, D] features of at least 3 images, got {list(x.shape)}")
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    n = x.shape[0]
    if method == "tsne":
        from sklearn.manifold import TSNE

        out = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(x)
    else:
        if not umap_available():
            raise ValueError("UMAP needs the umap-learn package (pip install umap-learn); use method 'tsne'")
        import umap

        out = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed).fit_transform(x)
    return np.asarray(out, dtype=np.float32)
