"""What the feature-map page computes, without Streamlit: models and prepared images in, numpy out
(tested directly; :mod:`dashboards.views.featuremaps` caches it). The PCA view and the 2-D
embeddings are :mod:`analysis.featuremaps`'; this module arranges them for one page.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from analysis.featuremaps import embed_2d, feature_pca, patch_features

from .images import Prepared


def run_patch_features(model: nn.Module, prepared: list[Prepared], layer: int) -> np.ndarray:
    """Patch features of block ``layer`` for images prepared at the run's size: float32
    ``[n, gh, gw, D]``."""
    images = torch.cat([p.tensor() for p in prepared])
    return patch_features(model, images, [layer])[0].numpy()


def pca_rgb(features: list[np.ndarray], background: bool = True, joint: bool = True) -> tuple[list[np.ndarray], str]:
    """The PCA view of several runs' ``[n, gh, gw, D]`` features → (per run ``uint8 [n, gh, gw, 3]``,
    the sentence that says how it was fitted)."""
    view = feature_pca([torch.from_numpy(f) for f in features], background=background, joint=joint)
    n = features[0].shape[0]
    if view.joint:
        how = f"one PCA over {n} image(s) × {len(features)} run(s)"
    elif joint:
        how = f"one PCA per run: their widths differ ({', '.join(str(f.shape[-1]) for f in features)})"
    else:
        how = "one PCA per run"
    how += "; background (first component ≤ 0) black" if background else "; every patch kept"
    return [(r.numpy() * 255).round().astype(np.uint8) for r in view.rgb], how


@torch.no_grad()
def image_embedding(model: nn.Module, data: str, method: str = "tsne", seed: int = 0,
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """2-D coordinates of the cls (or mean patch) embedding of every image of ``data`` → (``[N, 2]``,
    labels ``[N]`` or None, class names or None)."""
    from analysis.featuremap_views import pooled_features
    from analysis.encoder import input_size
    from rmae.data import evaluation_loader

    loader = evaluation_loader(data, input_size(model), batch_size=batch_size, seed=seed)
    x, y = pooled_features(model, loader, limit=len(loader.dataset))
    names = getattr(loader.dataset.base, "class_names", None)
    return embed_2d(x, method, seed), (y.numpy() if y is not None else None), (list(names) if names else None)
