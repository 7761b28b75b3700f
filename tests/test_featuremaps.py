"""analysis.featuremaps against planted answers: features that are a known low-rank mixture (a
foreground offset and three part directions over a background) → the first component's threshold
keeps exactly the planted foreground, the PCA colours separate the planted parts and agree across
images and runs; PCA itself on known axes; t-SNE keeps planted clusters apart; patch features read
through the encoder surface (registers dropped)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMG, tiny_model, tiny_timm_vit

from analysis import featuremaps as FM

GRID = (6, 10)  # non-square: catches transposed reshapes
PARTS = 4  # three colour components carry the variance of four parts
D = 24


def _planted(n: int = 2, seed: int = 0, flip: bool = False):
    """Features ``[n, 6, 10, D]``: background ``b``, foreground ``b + 8·f + 3·c_k`` for part k
    (four 4×2 parts side by side away from the border, in another order in each image).
    Returns (features, foreground mask, part index map with -1 on background)."""
    g = torch.Generator().manual_seed(seed)
    b, f = torch.randn(D, generator=g), torch.randn(D, generator=g)
    f = f / f.norm()
    parts = torch.linalg.qr(torch.randn(D, PARTS, generator=g))[0].T  # orthonormal part directions
    feats = b + 0.05 * torch.randn(n, *GRID, D, generator=g)
    part = torch.full((n, *GRID), -1)
    for i in range(n):
        for k in range(PARTS):
            c = 1 + (k + i) % PARTS * 2
            part[i, 1:5, c:c + 2] = k
    fg = part >= 0
    for k in range(PARTS):
        feats[part == k] += 8 * f + 3 * parts[k]
    return (-feats if flip else feats), fg, part


def test_threshold_on_the_first_component_keeps_the_planted_foreground():
    feats, fg, _ = _planted()
    view = FM.feature_pca([feats])
    assert view.joint and torch.equal(view.foreground[0], fg)
    assert (view.first[0][fg] > 0).all() and (view.first[0][~fg] <= 0).all()
    assert view.rgb[0].shape == (2, *GRID, 3) and view.rgb[0].dtype == torch.float32
    assert (view.rgb[0][~fg] == 0).all()  # background is black
    # the component's sign is arbitrary: negated features give the same foreground (border rule)
    assert torch.equal(FM.feature_pca([_planted(flip=True)[0]]).foreground[0], fg)


def test_pca_colours_separate_the_planted_parts_across_images():
    feats, fg, part = _planted()
    rgb = FM.feature_pca([feats]).rgb[0]
    means = torch.stack([rgb[part == k].mean(0) for k in range(PARTS)])
    spread = max(float((rgb[part == k] - means[k]).norm(dim=-1).max()) for k in range(PARTS))
    gaps = [float((means[a] - means[b]).norm()) for a in range(PARTS) for b in range(a + 1, PARTS)]
    assert min(gaps) > 0.3 and spread < 0.1 * min(gaps)
    # one fit over both images: a part has the same colour in each, wherever it sits
    for k in range(PARTS):
        torch.testing.assert_close(rgb[0][part[0] == k].mean(0), rgb[1][part[1] == k].mean(0), atol=0.02, rtol=0)
    assert (rgb[fg] >= 0).all() and (rgb[fg] <= 1).all() and rgb[fg].amax(0).min() == 1  # each channel spans [0, 1]


def test_runs_are_fitted_jointly_when_their_widths_match():
    feats, fg, _ = _planted()
    view = FM.feature_pca([feats, 7.0 * feats])  # the same features at another scale: the same picture
    assert view.joint and len(view.explained) == 1
    torch.testing.assert_close(view.rgb[0], view.rgb[1])
    assert torch.equal(view.foreground[1], fg)
    other = _planted(seed=3)[0][..., :16]  # another width: one fit per run, said by joint=False
    view = FM.feature_pca([feats, other])
    assert not view.joint and len(view.explained) == 2
    torch.testing.assert_close(view.rgb[0], FM.feature_pca([feats]).rgb[0])
    assert not FM.feature_pca([feats, 2 * feats], joint=False).joint


def test_background_removal_can_be_turned_off():
    feats, _, _ = _planted()
    view = FM.feature_pca([feats], background=False)
    assert view.foreground[0].all() and (view.rgb[0].sum(-1) > 0).any(dim=-1).all()


def test_principal_components_on_known_axes():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0)
    z = torch.linalg.qr(z)[0] * (4000 ** 0.5)  # exactly uncorrelated, unit variance columns
    x = torch.zeros(4000, 5, dtype=torch.float64)
    x[:, 3], x[:, 0], x[:, 4] = 3 * z[:, 0], 2 * z[:, 1], 1 * z[:, 2]  # variances 9, 4, 1 on axes 3, 0, 4
    mean, comps, ratio = FM.principal_components(x + 5.0, 3)
    torch.testing.assert_close(mean, torch.full((5,), 5.0, dtype=torch.float64))
    torch.testing.assert_close(comps.abs(), torch.eye(5, dtype=torch.float64)[[3, 0, 4]], atol=1e-9, rtol=0)
    torch.testing.assert_close(ratio, torch.tensor([9, 4, 1], dtype=torch.float64) / 14)
    scores = (x @ comps.T)
    assert (scores.gather(0, scores.abs().argmax(0, keepdim=True)) > 0).all()  # deterministic signs
    _, few, r = FM.principal_components(x[:2], 3)  # two samples: one component, the rest zero
    assert few[1:].abs().sum() == 0 and r[1:].sum() == 0 and r[0] == pytest.approx(1.0)


def test_tsne_keeps_planted_clusters_apart_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    centres = 6 * torch.randn(3, 20, generator=g)
    labels = torch.arange(3).repeat_interleave(25)
    x = centres[labels] + torch.randn(75, 20, generator=g)
    y = FM.embed_2d(x, "tsne", seed=0)
    assert y.shape == (75, 2) and y.dtype == np.float32
    d = ((y[:, None] - y[None]) ** 2).sum(-1) + np.eye(75) * 1e9
    assert (labels.numpy()[d.argmin(1)] == labels.numpy()).all()  # every point's neighbour is in its cluster
    np.testing.assert_array_equal(FM.embed_2d(x, "tsne", seed=0), y)
    with pytest.raises(ValueError, match="method"):
        FM.embed_2d(x, "pca")
    with pytest.raises(ValueError, match="at least 3"):
        FM.embed_2d(x[:2])


def test_umap_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(FM, "umap_available", lambda: False)
    with pytest.raises(ValueError, match="umap-learn"):
        FM.embed_2d(torch.randn(10, 4), "umap")


@pytest.mark.slow  # numba compiles UMAP on first use (~20 s)
@pytest.mark.skipif(not FM.umap_available(), reason="umap-learn is not installed")
def test_umap_keeps_planted_clusters_apart():
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(3).repeat_interleave(30)
    x = (8 * torch.randn(3, 16, generator=g))[labels] + torch.randn(90, 16, generator=g)
    y = FM.embed_2d(x, "umap", seed=0)
    d = ((y[:, None] - y[None]) ** 2).sum(-1) + np.eye(90) * 1e9
    assert (labels.numpy()[d.argmin(1)] == labels.numpy()).all()


@pytest.mark.parametrize("which", ["ours", "timm-registers"])
def test_patch_features_are_the_grid_of_patch_tokens(which):
    model = tiny_model() if which == "ours" else tiny_timm_vit(reg_tokens=3)
    x = torch.randn(2, 3, IMG, IMG)
    last, first = FM.patch_features(model, x, [-1, 0])
    P = 1 if which == "ours" else 4
    with torch.no_grad():
        tokens = model.forward_features(x)
    assert last.shape == (2, 4, 4, tokens.shape[-1])
    torch.testing.assert_close(last, tokens[:, P:].reshape(2, 4, 4, -1))
    assert first.shape == last.shape and not torch.allclose(first, last)
