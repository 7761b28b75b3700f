"""The Attributions and Feature maps pages under ``streamlit.testing`` (switched as ``st.navigation``
files, as tests/test_dashboard.py does), asserting on the values shown against the analysis
functions run independently; their Streamlit-free computations; and a real browser (Debian
chromium + Playwright) opening both pages on ``rmae dashboard``, with screenshots kept for a look."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMG, scene, dashboard_in_browser, keep_screenshots, needs_chromium

import rmae
from analysis import attribution_views as V
from analysis.attribution import HeadLogits
from analysis.encoder import pool_tokens
from analysis.feature_cache import load_features
from analysis.featuremaps import embed_2d, feature_pca, patch_features
from dashboards import attributions as DA
from dashboards import featuremaps as DF
from rmae.data import build_dataset, to_tensor

APP = str(Path(__file__).resolve().parents[1] / "dashboards" / "app.py")
PAGES = {"Attributions": "views/attribution.py", "Feature maps": "views/featuremaps.py"}
TRAIN = "scenes:train:60"


@pytest.fixture(scope="module")
def runs_root(trained_runs, tmp_path_factory) -> Path:
    """The session's two trained tiny runs, copied into a runs root of their own (their feature
    caches are written there)."""
    root = tmp_path_factory.mktemp("views") / "runs"
    for name, run in trained_runs.items():
        shutil.copytree(run, root / name)
    return root


@pytest.fixture
def app(runs_root, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("RMAE_DASHBOARD_RUNS", str(runs_root))
    monkeypatch.setenv("RMAE_DASHBOARD_DEBUG", "1")
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    return at


def _page(at, name):
    at.switch_page(PAGES[name]).run()
    assert not at.exception, at.exception
    return at


def _expected_probe(run: Path, image: np.ndarray) -> tuple[str, float, float]:
    """Independently of dashboards.*: the run's probe head fitted on TRAIN, its predicted class for
    the image, that logit, and the cosine to the class mean."""
    model = rmae.load_model(run).eval()
    feats = load_features(run, TRAIN, layer=-1, pool="cls", device="cpu", progress=False)
    targets = V.fit_targets(feats.features, feats.labels, pool="cls", about="", class_names=feats.class_names)
    x = to_tensor(image)[None]
    with torch.no_grad():
        emb = pool_tokens(model.forward_features(x), "cls", 1)
        logits = HeadLogits(model, targets.head)(x)[0]
    k = int(logits.argmax())
    cls = targets.classes[k]
    cos = torch.nn.functional.cosine_similarity(emb[0], targets.class_means[cls], dim=0)
    return targets.name(cls), float(logits[k]), float(cos)


def _captions(at) -> list[str]:
    return [img.proto.imgs[0].caption for img in at.get("image")]


# ------------------------------------------------------------------------------------------
# AppTest


def test_attribution_page_explains_both_scores(app, runs_root):
    at = _page(app, "Attributions")
    at.number_input(key="att_train").set_value(60).run()
    at.selectbox(key="att_steps").set_value(8).run()
    assert not at.exception, at.exception
    caps = _captions(at)
    assert len(caps) == 12  # 2 runs × 2 scores × IG, occlusion, Grad-CAM
    assert [c.split(" — ")[0] for c in caps[:6]] == [f"{t} · {m}" for t in V.TARGETS for m in V.METHODS]
    image, _ = scene(0)
    for i, name in enumerate(("mae", "rmae")):
        cls, logit, cos = _expected_probe(runs_root / name, image)
        probe, sim = caps[6 * i], caps[6 * i + 3]
        assert probe.endswith(f"— logit of {cls} (predicted) (score {logit:.3f})"), (probe, logit)
        assert sim.endswith(f"— cosine to the mean of {cls} (score {cos:.3f})"), (sim, cos)
    assert [c.value for c in at.caption].count(
        f"Scores: linear head on the cls embedding, fitted on 60 labelled images of {TRAIN}.") == 2
    urls = [img.proto.imgs[0].url for img in at.get("image")]
    at.sidebar.number_input(key="scene").set_value(3).run()
    assert not at.exception and [img.proto.imgs[0].url for img in at.get("image")] != urls


def test_feature_maps_page_pca_and_embedding(app, runs_root):
    at = _page(app, "Feature maps")
    assert at.slider(key="fm_layer").value == 2 and at.number_input(key="fm_images").value == 4
    caps = [c.value for c in at.caption]
    assert any(c.startswith("Layer 2: first three principal components of the patch features → RGB, one PCA over "
                            "4 image(s) × 2 run(s); background (first component ≤ 0) black.") for c in caps), caps
    assert _captions(at).count("PCA · layer 2 · image 4") == 2 and len(at.get("image")) == 16  # 2 runs × 4 × (image, map)
    urls = [img.proto.imgs[0].url for img in at.get("image")]
    at.slider(key="fm_layer").set_value(1).run()
    assert [img.proto.imgs[0].url for img in at.get("image")][1] != urls[1]  # another layer, another map
    at.checkbox(key="fm_joint").uncheck().run()
    at.checkbox(key="fm_bg").uncheck().run()
    assert any("one PCA per run; every patch kept" in c.value for c in at.caption)
    assert not at.get("plotly_chart")  # the embedding waits to be asked for
    at.number_input(key="emb_n").set_value(20).run()
    at.toggle(key="emb_on").set_value(True).run()
    assert not at.exception, at.exception
    specs = [json.loads(ch.proto.spec) for ch in at.get("plotly_chart")]
    assert [s["layout"]["title"]["text"] for s in specs] == ["mae: t-SNE of 20 images", "rmae: t-SNE of 20 images"]
    names = list(build_dataset("scenes:val:20", image_size=IMG).class_names)
    labels = [build_dataset("scenes:val:20", image_size=IMG).load(i)["label"] for i in range(20)]
    assert {t["name"] for t in specs[0]["data"]} == {names[c] for c in labels}
    assert sum(len(t["x"]) for t in specs[0]["data"]) == 20


def test_feature_maps_page_with_one_photo(app):
    at = app
    at.sidebar.radio(key="src").set_value("photos").run()
    at = _page(at, "Feature maps")
    assert at.number_input(key="fm_images").value == 1 and at.number_input(key="fm_images").max == 1
    assert any("one PCA over 1 image(s) × 2 run(s)" in c.value for c in at.caption)


# ------------------------------------------------------------------------------------------
# the Streamlit-free computations


def test_dashboard_attribution_view_is_the_analysis_maps(runs_root):
    from dashboards.images import prepare

    model = rmae.load_model(runs_root / "rmae").eval()
    image, inst = scene(2)
    p = prepare(image, inst, (IMG, IMG))
    targets = DA.probe_targets(runs_root / "rmae", model, TRAIN)
    got = DA.attribution_view(model, p, targets, ig_steps=4)
    ref = V.attribution_maps(model, p.tensor(), targets, None, ig_steps=4)
    for t in V.TARGETS:
        for m in V.METHODS:
            np.testing.assert_array_equal(got.maps[t][m], ref.maps[t][m][0])
        assert got.explained[t] == ref.explained[t][0] and got.scores[t] == pytest.approx(float(ref.scores[t][0]))


def test_dashboard_pca_and_embedding_are_the_analysis_ones(runs_root):
    from dashboards.images import prepare

    models = [rmae.load_model(runs_root / n).eval() for n in ("mae", "rmae")]
    prepared = [prepare(*scene(i), (IMG, IMG)) for i in range(3)]
    feats = [DF.run_patch_features(m, prepared, 1) for m in models]
    x = torch.cat([p.tensor() for p in prepared])
    for f, m in zip(feats, models):
        np.testing.assert_array_equal(f, patch_features(m, x, [1])[0].numpy())
    rgb, how = DF.pca_rgb(feats)
    view = feature_pca([torch.from_numpy(f) for f in feats])
    np.testing.assert_array_equal(rgb[1], (view.rgb[1].numpy() * 255).round().astype(np.uint8))
    assert how == "one PCA over 3 image(s) × 2 run(s); background (first component ≤ 0) black"
    assert DF.pca_rgb([feats[0], feats[1][..., :64]])[1].startswith("one PCA per run: their widths differ (192, 64)")
    xy, labels, names = DF.image_embedding(models[0], "scenes:val:12", "tsne")
    assert xy.shape == (12, 2) and labels.shape == (12,) and names[0] == "disk"
    from analysis.featuremap_views import pooled_features
    from rmae.data import evaluation_loader

    pooled, _ = pooled_features(models[0], evaluation_loader("scenes:val:12", IMG, batch_size=64))
    np.testing.assert_allclose(xy, embed_2d(pooled, "tsne", 0), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# real browser


@needs_chromium
def test_browser_opens_the_attribution_and_feature_map_pages(runs_root, tmp_path):
    """Both pages render their maps in a real browser; full-page screenshots are kept in
    ``tmp_path`` (and under $RMAE_SCREENSHOTS when set) for a person to look at."""
    shots = []
    with dashboard_in_browser(runs_root, tmp_path) as (page, base):
        for url, first, text in (("attributions", ".st-key-att-1-embedding-similarity img", "probe logit · IG"),
                                 ("feature-maps", ".st-key-pca-1 img", "PCA · layer 2 · image 4")):
            page.goto(f"{base}/{url}", timeout=60_000)
            page.locator(first).first.wait_for(timeout=240_000)
            page.wait_for_selector("[data-testid=stStatusWidget]", state="detached", timeout=240_000)
            assert page.get_by_text(text, exact=False).first.is_visible()
            images = page.locator(f"{first.split()[0]} img")
            assert images.count() >= 3
            src = images.first.get_attribute("src")
            body = page.request.get(page.url.split(f"/{url}")[0] + src if src.startswith("/") else src).body()
            assert body[:8] == b"\x89PNG\r\n\x1a\n"
            time.sleep(0.5)
            shot = tmp_path / f"{url}.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            shots.append(shot)
        # the 2-D embedding, when asked for: a plotly chart per run
        page.get_by_label("Scenes (scenes:val)").fill("40")
        page.get_by_label("Scenes (scenes:val)").press("Enter")
        page.wait_for_selector("[data-testid=stStatusWidget]", state="detached", timeout=240_000)
        page.get_by_text("Show the embedding").click()
        page.locator(".js-plotly-plot").nth(1).wait_for(timeout=240_000)
        page.wait_for_selector("[data-testid=stStatusWidget]", state="detached", timeout=240_000)
        assert page.get_by_text("rmae: t-SNE of 40 images").first.is_visible()
        page.locator(".js-plotly-plot").nth(1).scroll_into_view_if_needed()  # the page scrolls inside
        time.sleep(1.0)
        shot = tmp_path / "feature-maps-embedding.png"
        page.screenshot(path=str(shot))
        shots.append(shot)
    keep_screenshots(shots)
