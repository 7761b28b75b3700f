"""analysis.attribution_views and analysis.featuremap_views: the probe head and class means the two
scores are made of, maps checked against scores recomputed by hand (occlusion of one patch, the
explained logit, the class-mean cosine), and `rmae analyze` writing the figures and report sections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMG, tiny_model, tiny_timm_vit
from PIL import Image

from analysis import attribution as A
from analysis import attribution_views as V
from analysis.analyze import AnalyzeConfig, analyze
from analysis.encoder import pool_tokens
from analysis.featuremap_views import layer_name


def _blobs(n_per: int = 40, classes: int = 3, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(classes, d, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centres[y] + torch.randn(len(y), d, generator=g) * torch.linspace(0.2, 3, d)  # unequal scales
    return x, y


def test_linear_head_is_sklearns_logistic_regression_on_raw_features():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = _blobs()
    y = y * 2 + 1  # class ids 1, 3, 5: the head's columns name them
    head, classes = V.fit_linear_head(x, y)
    assert classes == [1, 3, 5] and head.weight.shape == (3, 6)
    scaler = StandardScaler().fit(x.double().numpy())
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(x.double().numpy()), y.numpy())
    with torch.no_grad():
        logits = head(x.float()).double()
    np.testing.assert_allclose(logits.numpy(), ref.decision_function(scaler.transform(x.double().numpy())),
                               rtol=1e-4, atol=1e-4)
    # two classes: one logit becomes the pair ∓z/2, the same probabilities
    two = y < 5
    head2, classes2 = V.fit_linear_head(x[two], y[two])
    assert classes2 == [1, 3]
    with torch.no_grad():
        p = head2(x[two].float()).softmax(-1)[:, 1].double().numpy()
    ref2 = LogisticRegression(C=1.0, max_iter=2000).fit(StandardScaler().fit_transform(x[two].double().numpy()),
                                                         y[two].numpy())
    np.testing.assert_allclose(p, ref2.predict_proba(StandardScaler().fit(x[two].double().numpy())
                                                     .transform(x[two].double().numpy()))[:, 1], atol=1e-5)


def test_targets_from_labelled_and_unlabelled_features():
    x, y = _blobs()
    t = V.fit_targets(x, y, pool="cls", about="blobs", class_names=["a", "b", "c"])
    assert t.head is not None and t.classes == [0, 1, 2]
    for c in range(3):
        torch.testing.assert_close(t.class_means[c], x[y == c].mean(0))
    torch.testing.assert_close(t.data_mean, x.mean(0))
    assert t.name(2) == "c" and t.name(7) == "class 7"
    for labels in (None, torch.full_like(y, -1), torch.zeros_like(y)):  # no labels, unknown, one class: no head
        u = V.fit_targets(x, labels, pool="mean", about="none")
        assert u.head is None and not u.class_means


@pytest.fixture(scope="module")
def setting():
    """A tiny timm ViT with two registers, targets fitted on its own embeddings of random images."""
    model = tiny_timm_vit(reg_tokens=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 3, IMG, IMG, generator=g)
    with torch.no_grad():
        emb = pool_tokens(model.forward_features(x), "cls", 3)
    y = (emb[:, 0] > emb[:, 0].median()).long()  # two classes the embedding separates
    targets = V.fit_targets(emb, y, pool="cls", about="own", class_names=["low", "high"])
    return model, targets, torch.randn(3, 3, IMG, IMG, generator=g)


def test_maps_explain_the_labelled_class_and_its_class_mean(setting):
    model, targets, images = setting
    labels = torch.tensor([1, -1, 0])
    maps = V.attribution_maps(model, images, targets, labels, ig_steps=4)
    assert set(maps.maps) == set(V.TARGETS)
    for t in V.TARGETS:
        assert set(maps.maps[t]) == set(V.METHODS)
        for m in V.METHODS:
            a = maps.maps[t][m]
            assert a.shape == (3, 4, 4) and a.dtype == np.float32 and (a >= 0).all() and np.isfinite(a).all()
    with torch.no_grad():
        logits = targets.head(pool_tokens(model.forward_features(images), "cls", 3))
    pred1 = targets.classes[int(logits[1].argmax())]
    cls = [1, pred1, 0]
    assert maps.explained["probe logit"] == ["logit of high (label)", f"logit of {targets.name(pred1)} (predicted)",
                                             "logit of low (label)"]
    assert maps.explained["embedding similarity"] == [f"cosine to the mean of {targets.name(c)}" for c in cls]
    np.testing.assert_allclose(maps.scores["probe logit"], logits[torch.arange(3), torch.tensor(cls)].numpy(), rtol=1e-5)
    # occlusion of one patch, recomputed by hand: the score drop when patch (1, 2) becomes 0 (the mean colour)
    occluded = images.clone()
    occluded[:, :, 8:16, 16:24] = 0
    sim = A.EmbeddingSimilarity(model, torch.stack([targets.class_means[c] for c in cls]))
    with torch.no_grad():
        drop = (sim(images) - sim(occluded))[:, 0]
        ldrop = (logits - targets.head(pool_tokens(model.forward_features(occluded), "cls", 3)))[torch.arange(3), cls]
    np.testing.assert_allclose(maps.maps["embedding similarity"]["occlusion"][:, 1, 2], drop.clamp_min(0).numpy(),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps.maps["probe logit"]["occlusion"][:, 1, 2], ldrop.clamp_min(0).numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps.scores["embedding similarity"], sim(images)[:, 0].detach().numpy(), rtol=1e-5)
    # Grad-CAM of the explained logit, on the tokens entering the last block
    cam = A.grad_cam(A.HeadLogits(model, targets.head), images, torch.tensor([targets.classes.index(c) for c in cls]),
                     upsample=None)
    np.testing.assert_allclose(maps.maps["probe logit"]["Grad-CAM"], cam.numpy(), rtol=1e-4, atol=1e-6)


def test_without_labels_only_the_similarity_to_the_data_mean(setting):
    model, targets, images = setting
    unlabelled = V.fit_targets(torch.randn(10, 48), None, pool="cls", about="none")
    maps = V.attribution_maps(model, images, unlabelled, ig_steps=4)
    assert list(maps.maps) == ["embedding similarity"]
    assert maps.explained["embedding similarity"] == ["cosine to the data mean"] * 3
    sim = A.EmbeddingSimilarity(model, unlabelled.data_mean)
    np.testing.assert_allclose(maps.scores["embedding similarity"], sim(images)[:, 0].detach().numpy(), rtol=1e-5)


def test_figure_has_a_column_per_map(setting, tmp_path):
    model, targets, images = setting
    maps = V.attribution_maps(tiny_model(), images, V.fit_targets(torch.randn(9, 192), torch.arange(9) % 3, pool="cls",
                                                                   about="x"), ig_steps=2)
    V.draw(np.random.rand(3, IMG, IMG, 3), maps, "title", tmp_path / "a.png")
    w, h = Image.open(tmp_path / "a.png").size
    assert w / h == pytest.approx((1.55 * 7) / (1.85 * 3 + 0.6), rel=0.02)  # 7 columns, 3 rows


def test_layer_names_of_the_pca_figures():
    assert layer_name(-1, [12, 12]) == "11" and layer_name(3, [12]) == "3"
    assert layer_name(-1, [12, 24]) == "last" and layer_name(-2, [2, 4]) == "-2"


def test_analyze_writes_attributions_and_feature_maps(trained_runs, tmp_path):
    runs = [trained_runs["mae"], trained_runs["rmae"]]
    cfg = AnalyzeConfig(data="scenes:val:12", batch_size=6, probes=(), clicks=(), cka=False, device="cpu",
                        probe_train="scenes:train:40", attributions=2, feature_maps=(0, -1))
    res = analyze(runs, cfg, tmp_path / "rep", progress=False)
    fig = tmp_path / "rep" / "figures"
    for f in ("attributions_mae.png", "attributions_rmae.png", "feature_pca_0.png", "feature_pca_1.png",
              "embedding_2d.png"):
        assert (fig / f).stat().st_size > 5000, f
    att = res.meta["attributions"]
    assert att["images"] == 2 and set(att["runs"]) == {"mae", "rmae"}
    assert "linear head on the cls embedding fitted on 40 labelled images of scenes:train:40" in att["runs"]["mae"]["about"]
    names = build_names()
    assert all(e.startswith("logit of ") and e.endswith("(label)") and e[9:-8] in names
               for e in att["runs"]["rmae"]["explained"]["probe logit"])
    fm = res.meta["feature_maps"]
    assert [p["layer"] for p in fm["pca"]] == ["0", "1"] and "one PCA over 4 images × 2 run(s)" in fm["pca"][0]["fit"]
    assert "t-SNE" in fm["embedding"]["what"] and "12 evaluation images" in fm["embedding"]["what"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Attributions" in md and "![attributions mae](figures/attributions_mae.png)" in md
    assert "## Feature maps" in md and "(figures/feature_pca_1.png)" in md and "(figures/embedding_2d.png)" in md
    # off: no figures, no sections
    off = analyze(runs, AnalyzeConfig(data="scenes:val:6", batch_size=6, probes=(), clicks=(), cka=False, device="cpu",
                                      attributions=0, feature_maps=(), embedding="none"), tmp_path / "off", progress=False)
    assert "attributions" not in off.meta and "feature_maps" not in off.meta
    assert not list((tmp_path / "off" / "figures").glob("attributions_*")) and "## Feature maps" not in \
        (tmp_path / "off" / "report.md").read_text()


def build_names() -> list[str]:
    from rmae.data import build_dataset

    return list(build_dataset("scenes:val:4", image_size=IMG).class_names)


def test_report_attributions_without_training_data_use_the_evaluation_mean(trained_runs, tmp_path):
    import rmae
    from rmae.data import evaluation_loader

    model = rmae.load_model(trained_runs["mae"]).eval()
    loader = evaluation_loader("scenes:val:6", IMG, batch_size=3)
    meta = V.report_attributions({"m": model}, {"m": trained_runs["mae"]}, loader, 2, None, tmp_path, seed=0,
                                 device="cpu", progress=False)
    run = meta["runs"]["m"]
    assert "no labelled training data: similarity to the mean cls embedding of 6 evaluation images" == run["about"]
    assert run["explained"] == {"embedding similarity": ["cosine to the data mean"] * 2}
    assert (tmp_path / "attributions_m.png").is_file()
    md = "\n".join(V.markdown(meta))
    assert "## Attributions" in md and f"Scores: {run['about']}." in md and "![attributions m](figures/attributions_m.png)" in md


def test_first_images_cross_batches():
    from rmae.data import evaluation_loader

    images, labels = V.first_images(evaluation_loader("scenes:val:6", IMG, batch_size=2), 3)
    whole = next(iter(evaluation_loader("scenes:val:6", IMG, batch_size=6)))
    torch.testing.assert_close(images, whole["images"][:3])
    assert labels.tolist() == whole["label"][:3].tolist()
