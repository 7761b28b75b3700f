"""The dashboard end to end: every page under ``streamlit.testing`` (pages switched as
``st.navigation`` files) on tiny runs trained by the real trainer, asserting on the values shown —
including a real ``rmae analyze`` background job started from the metrics page and polled until
it ends — and a real browser (Debian chromium + Playwright) clicking a query patch on
``rmae dashboard``.

The runs root built once for the module holds: two trained runs (``mae``, ``rmae``), a run
folder with a broken ``config.yaml``, a foreign folder whose "checkpoint" is not one, a symlink
to a run outside the root (must be ignored), an image folder and a hand-written
``results.json`` with known numbers.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMG, scene, TINY_TRAIN, dashboard_in_browser, keep_screenshots, make_run, needs_chromium

import rmae
from analysis.encoder import attention_pass
from analysis.groundtruth import patch_ownership
from analysis.interactive import predict_from_clicks
from analysis.metrics import keep_mass_threshold
from analysis.registry import metric
from rmae.data import build_dataset, to_tensor
from rmae.evaluation import binary_iou

APP = str(Path(__file__).resolve().parents[1] / "dashboards" / "app.py")
#: the page files (AppTest switches pages by file, relative to app.py)
PAGE_FILES = {"Attention explorer": "views/attention.py", "Reconstruction": "views/reconstruction.py",
              "Interactive segmentation": "views/segmentation.py", "Metrics and probes": "views/metrics.py",
              "Runs": "views/runs.py"}


def _train(out: Path, model: str, cache: Path) -> None:
    from rmae.train import load_config, pretrain

    # its own runs (not conftest's trained_runs): the Runs page is checked against a log of every step
    cfg = load_config("demo", [f"model={model}", *TINY_TRAIN, "data=scenes:train:16", "batch_size=8", "steps=3",
                               "checkpoint_every=3", "log_every=1", f"region_cache={cache}"])
    pretrain(cfg, out, progress=False)


def _results(root: Path) -> dict:
    def layer(vals, lo=0.01):
        return {"per_layer": vals, "per_layer_ci": [[v - lo, v + lo] for v in vals], "value": vals[-1],
                "ci": [vals[-1] - lo, vals[-1] + lo], "unit": "px"}

    data = {
        "version": 1, "data": "scenes:val:16", "n_images": 16, "seed": 0,
        "runs": {
            "mae": {"path": str(root / "mae"), "family": "mae", "model": "mae_vit_tiny_patch8",
                    "metrics": {"attention_distance": layer([9.5, 11.25]), "instance_mass": layer([0.31, 0.35]),
                                "linear_probe": {"value": 0.7124, "ci": [0.69, 0.735]},
                                "knn": {"value": 0.5, "ci": [0.45, 0.55]}, "dense_miou": {"value": 0.2, "ci": None},
                                "attentive_probe": None}},
            "rmae": {"path": str(root / "rmae"), "family": "rmae", "model": "rmae_vit_tiny_patch8",
                     "metrics": {"attention_distance": layer([7.0, 8.5]), "instance_mass": layer([0.41, 0.47]),
                                 "linear_probe": {"value": 0.612, "ci": [0.58, 0.64]},
                                 "interactive_iou": {"clicks": [1, 2, 4], "per_click": [0.3, 0.45, 0.6],
                                                     "per_click_ci": [[0.2, 0.4], [0.35, 0.55], [0.5, 0.7]],
                                                     "value": 0.45, "ci": [0.35, 0.55]}}},
        },
        "baselines": {"interactive_iou": {"fh": {"clicks": [1, 2, 4], "per_click": [0.25, 0.3, 0.4],
                                                 "per_click_ci": [[0.2, 0.3]] * 3}}},
        "cka": {"a": "mae", "b": "rmae", "matrix": [[0.9, 0.5], [0.4, 0.8]]},
        "differences": {"rmae − mae": {"instance_mass": {"value": 0.12, "ci": [0.08, 0.16]},
                                       "linear_probe": {"value": -0.1, "ci": [-0.13, -0.07]}}},
    }
    return data


#: the hand-made study: per configuration, each seed's per-layer mean attention distance (from its
#: own analysis) and linear-probe accuracy; the study's results.json aggregates them
STUDY_LAYERS = {"mae": [[9.0, 11.0], [9.5, 11.5], [10.0, 12.0]], "rmae": [[7.0, 8.0], [7.5, 8.5], [8.0, 9.0]]}
STUDY_LINEAR = {"mae": [0.70, 0.72, 0.74], "rmae": [0.60, 0.62, 0.61]}


def _study(root: Path) -> Path:
    """``studies/s``: 2 configurations × 3 seeds as ``rmae study`` lays them out (run folders, each
    seed's analysis, the aggregated results.json with per-seed values, differences and a control)."""
    study = root / "studies" / "s"
    study.mkdir(parents=True)
    (study / "study.json").write_text(json.dumps({"preset": "demo", "families": ["mae", "rmae"], "grid": {}}))
    configs, diffs = {}, {}
    for fam, curves in STUDY_LAYERS.items():
        folders = []
        for seed, curve in enumerate(curves):
            name = f"{fam}-s{seed}"
            folders.append(str(make_run(study / "runs" / name, name=f"{fam}_vit_tiny_patch8", seed=seed)))
            (study / "analysis" / name).mkdir(parents=True)
            (study / "analysis" / name / "results.json").write_text(json.dumps({
                "version": 1, "runs": {name: {"family": fam, "metrics": {"attention_distance": {
                    "value": curve[-1], "per_layer": curve}}}}}))
        mean = [float(np.mean([c[i] for c in curves])) for i in range(2)]
        lin = STUDY_LINEAR[fam]
        configs[fam] = {
            "path": str(study / "runs"), "family": fam, "model": fam, "role": "configuration", "config": {"family": fam},
            "seeds": [0, 1, 2], "run_folders": folders,
            "metrics": {
                "attention_distance": {"value": mean[-1], "ci": [min(c[-1] for c in curves), max(c[-1] for c in curves)],
                                       "per_layer": mean, "per_layer_ci": [[m - 0.5, m + 0.5] for m in mean],
                                       "per_seed": [c[-1] for c in curves], "n_seeds": 3, "scope": "method",
                                       "unit": "px"},
                "linear_probe": {"value": float(np.mean(lin)), "ci": [min(lin), max(lin)], "per_seed": lin,
                                 "n_seeds": 3, "scope": "method"}}}
    diffs["rmae − mae"] = {
        "linear_probe": {"value": -0.11, "ci": [-0.14, -0.08], "per_seed": [-0.10, -0.10, -0.13], "n_seeds": 3,
                         "scope": "method", "seeds": [0, 1, 2]},
        "attention_distance": {"value": -3.0, "ci": [-3.2, -2.8], "per_seed": [-3.0, -3.0, -3.0], "n_seeds": 3,
                               "scope": "method", "seeds": [0, 1, 2]}}
    configs["random-init"] = {"family": "mae", "role": "control", "metrics": {
        "linear_probe": {"value": 0.3, "ci": [0.28, 0.32]}, "attention_distance": {"value": 16.0, "ci": [15.9, 16.1]}}}
    (study / "results.json").write_text(json.dumps({
        "version": 1, "data": "scenes:val:16", "n_images": 16, "seed": 0, "reference": "mae", "runs": configs,
        "differences": diffs, "baselines": {}, "kind": "study", "seeds": [0, 1, 2]}))
    return study


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("dash")
    root = base / "runs"
    cache = base / "cache"
    _train(root / "mae", "mae_vit_tiny_patch8", cache)
    _train(root / "rmae", "rmae_vit_tiny_patch8", cache)
    (root / "broken").mkdir()
    (root / "broken" / ".rmae-run").write_text("{}")  # an rmae run whose config.yaml was damaged
    (root / "broken" / "config.yaml").write_text("model_config: {family: rmae\n  img_size: [32, oops\n")
    (root / "foreign" / "checkpoints").mkdir(parents=True)
    (root / "foreign" / "checkpoints" / "step_000001.safetensors").write_bytes(b"\x00not a checkpoint" * 8)
    outside = base / "outside_run"
    shutil.copytree(root / "mae", outside)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "images").mkdir()
    from PIL import Image

    Image.fromarray(build_dataset("scenes:val:4", image_size=48).load(2)["image"]).save(root / "images" / "scene.png")
    (root / "reports" / "fixture").mkdir(parents=True)
    (root / "reports" / "fixture" / "results.json").write_text(json.dumps(_results(root)))
    _study(root)
    return root


@pytest.fixture
def app(runs_root, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("RMAE_DASHBOARD_RUNS", str(runs_root))
    monkeypatch.setenv("RMAE_DASHBOARD_DEBUG", "1")  # page errors raise (at.exception) instead of st.error
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _df(at, column: str):
    """The first table on the page with this column (AppTest cannot look tables up by key)."""
    for d in at.dataframe:
        if column in d.value.columns:
            return d.value
    raise AssertionError(f"no table with a column {column!r}: {[list(d.value.columns) for d in at.dataframe]}")


def _page(at, name):
    at.switch_page(PAGE_FILES[name]).run()
    assert not at.exception, at.exception
    return at


def _inside_query(instances: np.ndarray, patch: int = 8) -> tuple[int, int]:
    """A patch whose owner is an instance and which is ≥ 75 % inside it."""
    owner, purity = patch_ownership(torch.from_numpy(instances).long(), patch)  # [gh, gw]
    cand = torch.nonzero((owner > 0) & (purity >= 0.75))
    assert len(cand), "fixture scene has no patch inside an instance"
    r, c = cand[0].tolist()
    return r, c


def _expected_instance_stats(run: Path, img, inst, layer: int, r: int, c: int, head="mean"):
    """Independent of dashboards.compute: attention pass → renormalised row → sums over the owner mask."""
    model = rmae.load_model(run).eval()
    attn = attention_pass(model, to_tensor(img)[None])[1].weights[layer][0]  # [h, N, N]
    gw = IMG // 8
    q = r * gw + c
    rows = attn[:, 1 + q, 1:].double()
    rows = rows / rows.sum(-1, keepdim=True)
    row = rows.mean(0) if head == "mean" else rows.max(0).values
    row = row / row.sum()
    owner, _ = patch_ownership(torch.from_numpy(inst).long(), 8)
    owner = owner.reshape(-1)
    same = owner == owner[q]
    mass = row[same].sum().item()
    leak = row[(owner > 0) & ~same].sum().item()
    bg = row[owner == 0].sum().item()
    kept = keep_mass_threshold(row, 0.6)
    jac = ((kept & same).sum() / (kept | same).sum()).item()
    return {"instance": int(owner[q]), "mass": mass, "leak": leak, "background": bg, "jaccard": jac}


# ------------------------------------------------------------------------------------------
# AppTest: every page, values shown


def test_attention_explorer_runs_maps_and_instance_numbers(app, runs_root):
    at = app
    assert [s.value.split(" — ")[0] for s in at.subheader[:2]] == ["mae", "rmae"]  # default: one MAE, one R-MAE
    captions = [img.proto.imgs[0].caption for img in at.get("image")]
    assert len(captions) == 6  # 3 maps × 2 runs
    assert captions[0].startswith("patch query (2, 2) · layer 2 · mean over heads")
    assert captions[1].startswith("CLS → patches · layer 2")
    assert captions[2].startswith("rollout from the query · layers 1–2")
    # pick a scene and a query inside an object through the non-click inputs
    at.sidebar.number_input(key="scene").set_value(5).run()
    img, inst = scene(5)
    r, c = _inside_query(inst)
    at.number_input(key="q_row").set_value(r).run()
    at.number_input(key="q_col").set_value(c).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert list(table.index) == ["mae", "rmae"]
    for name in ("mae", "rmae"):
        exp = _expected_instance_stats(runs_root / name, img, inst, 1, r, c)
        row = table.loc[name]
        assert row["query (row, col)"] == f"({r}, {c})"
        assert row["instance"] == exp["instance"] > 0
        assert row["instance mass"] == pytest.approx(exp["mass"], abs=1e-3)
        assert row["leak"] == pytest.approx(exp["leak"], abs=1e-3)
        assert row["background"] == pytest.approx(exp["background"], abs=1e-3)
        assert row["Jaccard (60 %)"] == pytest.approx(exp["jaccard"], abs=1e-3)
        assert row["instance mass"] + row["leak"] + row["background"] == pytest.approx(1, abs=1e-3)
        assert f"**{name}**: instance mass {exp['mass']:.3f}" in at.markdown[0].value


def test_attention_layer_and_head_change_the_maps(app, runs_root):
    at = app
    img, inst = scene(0)
    r, c = _inside_query(inst)
    at.number_input(key="q_row").set_value(r).run()
    at.number_input(key="q_col").set_value(c).run()
    urls = [i.proto.imgs[0].url for i in at.get("image")]
    at.slider(key="layer").set_value(1).run()
    assert not at.exception, at.exception
    urls_l1 = [i.proto.imgs[0].url for i in at.get("image")]
    assert urls_l1 != urls
    assert at.get("image")[0].proto.imgs[0].caption.startswith(f"patch query ({r}, {c}) · layer 1 · mean over heads")
    exp = _expected_instance_stats(runs_root / "rmae", img, inst, 0, r, c)
    assert at.dataframe[0].value.loc["rmae", "instance mass"] == pytest.approx(exp["mass"], abs=1e-3)
    at.selectbox(key="head").set_value("max").run()
    assert "max over heads" in at.get("image")[0].proto.imgs[0].caption
    exp = _expected_instance_stats(runs_root / "rmae", img, inst, 0, r, c, head="max")
    assert at.dataframe[0].value.loc["rmae", "instance mass"] == pytest.approx(exp["mass"], abs=1e-3)
    at.selectbox(key="head").set_value("2").run()
    assert "head 3" in at.get("image")[0].proto.imgs[0].caption


def test_attention_background_query_and_no_ground_truth(app):
    at = app
    img, inst = scene(0)
    owner, _ = patch_ownership(torch.from_numpy(inst).long(), 8)
    bg = torch.nonzero(owner == 0)
    if len(bg):
        r, c = bg[0].tolist()
        at.number_input(key="q_row").set_value(r).run()
        at.number_input(key="q_col").set_value(c).run()
        assert any("lies on background" in i.value for i in at.info)
        assert at.dataframe[0].value["instance mass"].isna().all()
    at.sidebar.radio(key="src").set_value("photos").run()
    assert not at.exception, at.exception
    assert not at.dataframe  # no ground truth → no instance table
    assert any("No ground-truth instances" in cpt.value for cpt in at.caption)
    assert len(at.get("image")) == 6


def test_image_folder_under_the_root(app):
    at = app
    at.sidebar.radio(key="src").set_value("folder").run()
    assert at.sidebar.selectbox(key="folder").options == ["images"]
    assert at.sidebar.selectbox(key="folder_file").value == "images/scene.png"
    assert not at.exception and len(at.get("image")) == 6
    assert "images/scene.png" in at.caption[0].value


def test_reconstruction_page(app):
    at = _page(app, "Reconstruction")
    caps = [c.value for c in at.caption]
    assert "4 of 16 patches visible (mask ratio 0.75, mask seed 0)" in caps
    names = [img.proto.imgs[0].caption for img in at.get("image")]
    assert names == ["masked image", "pixel reconstruction", "original",  # mae
                     "masked image", "pixel reconstruction", "original",  # rmae
                     "masked region", "region reconstruction", "original region"]
    before = [img.proto.imgs[0].url for img in at.get("image")]
    at.button(key="resample").click().run()
    assert "4 of 16 patches visible (mask ratio 0.75, mask seed 1)" in [c.value for c in at.caption]
    after = [img.proto.imgs[0].url for img in at.get("image")]
    assert after[0] != before[0] and after[2] == before[2]  # new mask, same original
    at.slider(key="mask_ratio").set_value(0.5).run()
    assert "8 of 16 patches visible (mask ratio 0.50, mask seed 1)" in [c.value for c in at.caption]
    at.radio(key="region_src").set_value("FH segments").run()
    assert not at.exception, at.exception


def test_interactive_segmentation_iou(app, runs_root):
    at = _page(app, "Interactive segmentation")
    assert any("mae" in c.value and "Without a region decoder" in c.value for c in at.caption)
    at.sidebar.number_input(key="scene").set_value(5).run()
    img, inst = scene(5)
    r, c = _inside_query(inst)
    at.multiselect(key="seg_patches").set_value([f"r{r}c{c}"]).run()
    assert not at.exception, at.exception
    # expected, straight from analysis.interactive
    model = rmae.load_model(runs_root / "rmae").eval()
    owner, _ = patch_ownership(torch.from_numpy(inst).long(), 8)
    target = torch.from_numpy(inst == int(owner[r, c]))[None]
    prob = predict_from_clicks(model, to_tensor(img)[None], target, torch.tensor([[r * 4 + c]]))
    expected = binary_iou(prob > 0.5, target).item()
    table = at.dataframe[0].value
    assert list(table.index) == ["rmae"]
    assert table.loc["rmae", "IoU"] == pytest.approx(expected, abs=1e-3)
    assert table.loc["rmae", "clicks"] == 1 and table.loc["rmae", "instance"] == int(owner[r, c])
    assert f"IoU {expected:.3f}" in at.markdown[0].value
    # a second click on the same instance (if it has one) changes the clicks count
    more = [tuple(x) for x in torch.nonzero(owner == owner[r, c]).tolist() if tuple(x) != (r, c)]
    if more:
        r2, c2 = more[0]
        at.multiselect(key="seg_patches").set_value([f"r{r}c{c}", f"r{r2}c{c2}"]).run()
        assert at.dataframe[0].value.loc["rmae", "clicks"] == 2
    at.button(key="seg_clear").click().run()
    assert at.multiselect(key="seg_patches").value == []
    assert any("Click a patch" in i.value for i in at.info)


def test_metrics_page_tables_and_curves(app):
    at = _page(app, "Metrics and probes")
    assert at.selectbox(key="report").value == "reports/fixture"
    linear, dense = metric("linear_probe").title, metric("dense_miou").title
    table = _df(at, linear)
    assert table.loc["rmae", linear] == "0.612 [0.580, 0.640]"
    assert table.loc["mae", linear] == "0.712 [0.690, 0.735]"
    assert table.loc["mae", dense] == "0.200"  # no CI
    assert table.loc["mae", metric("attentive_probe").title] == "—"  # null in the file
    assert table.loc["rmae", metric("knn").title] == "—"  # missing in the file
    assert table.loc["rmae", metric("attention_distance").title] == "8.500 [8.490, 8.510]"
    charts = at.get("plotly_chart")
    specs = [json.loads(ch.proto.spec) for ch in charts]
    titles = [s["layout"]["title"]["text"] for s in specs]
    assert metric("attention_distance").title in titles and metric("instance_mass").title in titles
    dist = specs[titles.index(metric("attention_distance").title)]
    lines = {t["name"]: t["y"] for t in dist["data"] if t.get("mode") == "lines+markers"}
    assert lines == {"mae": [9.5, 11.25], "rmae": [7.0, 8.5]}
    assert sum(1 for t in dist["data"] if t.get("fill") == "toself") == 2  # CI bands
    assert dist["layout"]["yaxis"]["title"]["text"] == metric("attention_distance").unit == "px"
    assert f"{metric('attention_distance').description} — descriptive." in [c.value for c in at.caption]
    inter = specs[titles.index("Interactive segmentation: IoU vs clicks")]
    assert [t["name"] for t in inter["data"] if t.get("mode") == "lines+markers"] == ["rmae", "baseline: fh"]
    assert any("CKA" in t for t in titles)
    diff = _df(at, "CI excludes 0")
    assert diff.set_index("metric").loc["linear_probe", "value [95 % CI]"] == "-0.100 [-0.130, -0.070]"
    assert diff.set_index("metric").loc["instance_mass", "CI excludes 0"] == "yes"
    at.multiselect(key="report_runs").set_value(["rmae"]).run()
    assert list(_df(at, linear).index) == ["rmae"]


def test_metrics_page_warns_about_wrong_types_and_shows_the_rest(app, runs_root):
    """A results.json with a string where a number belongs, a list where a mapping belongs and a
    per-layer list that is not one: a warning names them, and everything else is shown."""
    doc = _results(runs_root)
    doc["runs"]["mae"]["metrics"]["linear_probe"] = {"value": "high", "ci": [0.1, 0.2]}
    doc["runs"]["mae"]["metrics"]["instance_mass"]["per_layer"] = "rising"
    doc["runs"]["rmae"]["metrics"] = [1, 2, 3]
    doc["differences"] = ["not", "a", "mapping"]
    folder = runs_root / "reports" / "wrong-types"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(doc))
    at = _page(app, "Metrics and probes")
    at.sidebar.button(key="rescan").click().run()
    at.selectbox(key="report").set_value("reports/wrong-types").run()
    assert not at.exception, at.exception
    warning = [w.value for w in at.warning if "wrong type" in w.value]
    assert len(warning) == 1
    for part in ("run mae / linear_probe", "'high'", "run mae / instance_mass: per_layer is not a list",
                 "run rmae: metrics is not a mapping", "differences: not a mapping"):
        assert part in warning[0], (part, warning[0])
    table = _df(at, metric("linear_probe").title)
    assert table.loc["mae", metric("linear_probe").title] == "—"
    assert table.loc["mae", metric("knn").title] == "0.500 [0.450, 0.550]"  # the rest of the run stays
    assert table.loc["rmae", metric("attention_distance").title] == "—" and table.loc["rmae", "family"] == "rmae"
    specs = [json.loads(ch.proto.spec) for ch in at.get("plotly_chart")]
    titles = [sp["layout"]["title"]["text"] for sp in specs]
    dist = specs[titles.index(metric("attention_distance").title)]
    assert {t["name"] for t in dist["data"] if t.get("mode") == "lines+markers"} == {"mae"}
    assert metric("instance_mass").title not in titles  # its only per-layer list was junk
    assert any("CKA" in t for t in titles)
    assert not any("CI excludes 0" in d.value.columns for d in at.dataframe)  # no differences table
    shutil.rmtree(folder)


def _specs(at) -> dict[str, dict]:
    return {(sp := json.loads(ch.proto.spec))["layout"]["title"]["text"]: sp for ch in at.get("plotly_chart")}


def _traces(spec: dict, suffix: str) -> dict[str, dict]:
    return {t["name"]: t for t in spec["data"] if t["name"].endswith(suffix)}


def test_metrics_page_shows_a_study(app):
    """A study's report: each metric's per-seed points (n_seeds per configuration, spread around
    its position) with the mean and its across-seed interval; per-layer curves with their band and
    a thin line per seed (from each seed's own analysis); the control; the seed-paired differences
    with their scope; the runs of each configuration."""
    at = _page(app, "Metrics and probes")
    at.selectbox(key="report").set_value("studies/s").run()
    assert not at.exception, at.exception
    assert "studies/s  (study)" in at.selectbox(key="report").options
    assert any(c.value.startswith("Study `studies/s` · 2 configuration(s) · seeds 0, 1, 2 · data `scenes:val:16` · "
                                  "16 images") for c in at.caption)
    specs = _specs(at)
    linear = specs[f"{metric('linear_probe').title} (↑ better)"]
    seeds = _traces(linear, ": seeds")
    assert list(seeds) == ["mae: seeds", "rmae: seeds"]
    for i, fam in enumerate(("mae", "rmae")):
        t = seeds[f"{fam}: seeds"]
        assert t["y"] == STUDY_LINEAR[fam] and t["customdata"] == ["0", "1", "2"]  # one point per seed
        assert t["x"] == pytest.approx([i - 0.18, i, i + 0.18])  # spread around the configuration
        mean = _traces(linear, "mean, 95 % CI over seeds")[f"{fam}: mean, 95 % CI over seeds"]
        m = float(np.mean(STUDY_LINEAR[fam]))
        assert mean["x"] == [i] and mean["y"] == pytest.approx([m])
        assert mean["error_y"]["array"] == pytest.approx([max(STUDY_LINEAR[fam]) - m])
        assert mean["error_y"]["arrayminus"] == pytest.approx([m - min(STUDY_LINEAR[fam])])
    control = [t for t in linear["data"] if t["name"] == "control: random-init"][0]
    assert control["x"] == [2] and control["y"] == [0.3] and control["error_y"]["array"] == pytest.approx([0.02])
    assert linear["layout"]["xaxis"]["ticktext"] == ["mae", "rmae", "control: random-init"]
    last = specs[f"{metric('attention_distance').title} — last layer"]
    assert {k: t["y"] for k, t in _traces(last, ": seeds").items()} == {
        f"{fam}: seeds": [c[-1] for c in curves] for fam, curves in STUDY_LAYERS.items()}
    layers = specs[metric("attention_distance").title]
    for fam, curves in STUDY_LAYERS.items():
        thin = [t["y"] for t in layers["data"] if t["name"] == f"{fam}: seed line"]
        assert thin == curves  # each seed's own per-layer line, from its analysis
        assert [t["y"] for t in layers["data"] if t["name"] == fam] == [
            [float(np.mean([c[i] for c in curves])) for i in range(2)]]
    assert sum(1 for t in layers["data"] if t.get("fill") == "toself") == 2  # a band per configuration
    values, controls = [d.value for d in at.dataframe if metric("linear_probe").title in d.value.columns]
    assert list(values.index) == ["mae", "rmae"] and list(controls.index) == ["random-init"]
    assert values.loc["mae", metric("linear_probe").title] == "0.720 [0.700, 0.740]"
    assert controls.loc["random-init", metric("linear_probe").title] == "0.300 [0.280, 0.320]"
    diff = _df(at, "seeds paired").set_index("metric")
    assert diff.loc["linear_probe", "value [95 % CI]"] == "-0.110 [-0.140, -0.080]"
    assert diff.loc["linear_probe", "scope"] == "method" and diff.loc["linear_probe", "seeds paired"] == 3
    assert diff.loc["linear_probe", "per seed"] == "-0.100, -0.100, -0.130"
    assert diff.loc["linear_probe", "CI excludes 0"] == "yes"
    at.selectbox(key="study_diff").set_value("linear_probe").run()
    dfig = _specs(at)[f"Seed-paired differences: {metric('linear_probe').title}"]
    assert _traces(dfig, ": seeds")["rmae − mae: seeds"]["y"] == [-0.10, -0.10, -0.13]
    runs = _df(at, "run folder")
    assert list(runs["run folder"]) == [f"studies/s/runs/{f}-s{i}" for f in ("mae", "rmae") for i in range(3)]
    assert set(runs["status"]) == {"ok"} and not at.main.warning, [w.value for w in at.main.warning]
    at.multiselect(key="study_configs").set_value(["rmae"]).run()
    linear = _specs(at)[f"{metric('linear_probe').title} (↑ better)"]
    assert list(_traces(linear, ": seeds")) == ["rmae: seeds"]


def test_study_runs_are_grouped(app):
    """The sidebar labels a study's runs by study and selects them at once; the Runs page lists them
    in a table of their own under the study's name."""
    at = app
    names = [f"studies/s/runs/{f}-s{i}" for f in ("mae", "rmae") for i in range(3)]
    options = at.sidebar.multiselect(key="runs").options
    assert "s › mae-s0  (mae_vit_tiny_patch8)" in options and "s › rmae-s2  (rmae_vit_tiny_patch8)" in options
    assert at.sidebar.selectbox(key="study_pick").value == "studies/s"
    at.sidebar.button(key="study_select").click().run()
    assert at.sidebar.multiselect(key="runs").value == names
    at = _page(at, "Runs")
    assert [s.value for s in at.subheader if s.value.startswith("Study")] == ["Study studies/s"]
    tables = [d.value for d in at.dataframe if "steps logged" in d.value.columns]
    assert set(tables[0].index) == {"broken", "foreign", "mae", "rmae"}
    assert list(tables[1].index) == [n.split("/")[-1] for n in names]
    assert list(tables[1]["model"]) == ["mae_vit_tiny_patch8"] * 3 + ["rmae_vit_tiny_patch8"] * 3


def test_metrics_page_refuses_unsafe_report_names(app):
    at = _page(app, "Metrics and probes")
    at.text_input(key="an_name").set_value("../../etc").run()
    at.button(key="an_go").click().run()
    assert any("report name" in e.value for e in at.error)
    assert not at.exception


def _running(at) -> bool:
    return any(i.value.startswith("Analysing in the background") for i in at.info)


def test_metrics_page_computes_what_is_missing(app, runs_root):
    at = _page(app, "Metrics and probes")
    md = [m.value for m in at.markdown if m.value.startswith("Missing from this report")][0]
    assert "- **mae**: " in md and "- **rmae**: " in md
    rmae_line = md.split("- **rmae**: ")[1].split("\n")[0]
    assert "knn" in rmae_line and "linear_probe" not in rmae_line  # the fixture report has rmae's linear probe only
    assert "interactive_iou" not in md.split("- **mae**: ")[1].split("\n")[0]  # no region decoder: not expected
    at.number_input(key="an_n").set_value(8).run()
    at.text_input(key="an_name").set_value("fromapp").run()
    at.multiselect(key="an_probes").set_value([]).run()
    at.button(key="an_go").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    # the analysis runs in the background: the page comes back at once and says so
    report = runs_root / "reports" / "fromapp"
    deadline = time.time() + 600
    while _running(at):
        assert at.button(key="an_go").disabled  # one job per session at a time
        assert time.time() < deadline, (report / "analyze.log").read_text()
        time.sleep(1)
        at.run()
        assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error] + [(report / "analyze.log").read_text()]
    out = report / "results.json"
    assert out.is_file() and (report / "analyze.log").is_file()
    results = json.loads(out.read_text())
    assert set(results["runs"]) == {"mae", "rmae"} and results["n_images"] == 8
    assert any(s.value.startswith("Wrote reports/fromapp/results.json (mae, rmae, scenes:val:8)") for s in at.success)
    assert at.selectbox(key="report").value == "reports/fromapp"
    linear, distance = metric("linear_probe").title, metric("attention_distance").title
    table = _df(at, linear)
    m = results["runs"]["rmae"]["metrics"]["attention_distance"]
    assert table.loc["rmae", distance] == f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"
    assert table.loc["rmae", linear] == "—"  # probes were not asked for
    specs = [json.loads(ch.proto.spec) for ch in at.get("plotly_chart")]
    inter = [sp for sp in specs if sp["layout"]["title"]["text"].startswith("Interactive segmentation")][0]
    rmae_line = [t for t in inter["data"] if t.get("name") == "rmae"][0]
    assert rmae_line["y"] == results["runs"]["rmae"]["metrics"]["interactive_iou"]["per_click"]
    md = [m.value for m in at.markdown if m.value.startswith("Missing from this report")][0]
    assert "linear_probe" in md and "attention_distance" not in md
    assert not at.button(key="an_go").disabled


def test_metrics_page_shows_why_a_job_failed(app, runs_root):
    """A job whose `rmae analyze` fails (the foreign folder holds no checkpoint): the page says so
    with the log's last line, once, and no report appears."""
    at = app
    at.sidebar.multiselect(key="runs").set_value(["foreign"]).run()
    at = _page(at, "Metrics and probes")
    at.number_input(key="an_n").set_value(8).run()
    at.text_input(key="an_name").set_value("failing").run()
    at.multiselect(key="an_probes").set_value([]).run()
    at.button(key="an_go").click().run()
    deadline = time.time() + 300
    while _running(at):
        assert time.time() < deadline
        time.sleep(0.5)
        at.run()
    errors = [e.value for e in at.error]
    assert any(e.startswith("The analysis for reports/failing failed after") and
               "rmae analyze: error: " in e and "step_000001.safetensors: not a checkpoint" in e for e in errors), errors
    assert not (runs_root / "reports" / "failing" / "results.json").exists()
    at.run()
    assert not [e for e in at.error if "The analysis for" in e.value]  # said once
    shutil.rmtree(runs_root / "reports" / "failing")


def test_runs_page_curves_and_configs(app, runs_root):
    at = _page(app, "Runs")
    table = _df(at, "steps logged")
    assert set(table.index) == {"broken", "foreign", "mae", "rmae"}  # "escape" leaves the root
    last = json.loads((runs_root / "mae" / "metrics.jsonl").read_text().splitlines()[-1])
    assert table.loc["mae", "steps logged"] == 3 and table.loc["mae", "last step"] == 3
    assert table.loc["mae", "last loss"] == f"{last['loss']:.4f}"
    assert "not valid YAML" in table.loc["broken", "status"]
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert {t["name"] for t in spec["data"]} == {"mae", "rmae"}
    assert [round(y, 6) for y in spec["data"][0]["y"]] == [
        round(json.loads(l)["loss"], 6) for l in (runs_root / "mae" / "metrics.jsonl").read_text().splitlines()]
    at.selectbox(key="train_metric").set_value("lr").run()
    assert json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["title"]["text"] == "lr per step"
    cfg = _df(at, "mae")
    assert cfg.loc["model_config.family", "mae"] == "mae" and cfg.loc["model_config.family", "rmae"] == "rmae"
    assert cfg.loc["img_size", "mae"] == str(IMG)
    n_all = len(cfg)
    at.checkbox(key="cfg_diff").check().run()
    cfg = _df(at, "mae")
    assert 0 < len(cfg) < n_all and "img_size" not in cfg.index and "model" in cfg.index


def test_broken_foreign_and_escaping_runs_are_clear_errors(app, runs_root):
    at = app
    assert not [o for o in at.sidebar.multiselect(key="runs").options if o.startswith("escape")]  # labels, as shown
    assert any("symlink leaving the runs root" in w.value and "escape" in w.value for w in at.sidebar.warning)
    at.sidebar.multiselect(key="runs").set_value(["broken", "foreign", "rmae"]).run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert any(e.startswith("Run **broken** cannot be used") and "not valid YAML" in e for e in errors)
    assert any(e.startswith("Run **foreign** cannot be loaded") for e in errors)
    assert [s.value.split(" — ")[0] for s in at.subheader][:1] == ["rmae"]  # the good run still shows


def test_missing_root_is_an_error(monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("RMAE_DASHBOARD_RUNS", str(tmp_path / "nope"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception
    assert "is not a folder" in at.error[0].value
    monkeypatch.setenv("RMAE_DASHBOARD_RUNS", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception
    assert any("No run folders" in w.value for w in at.warning)


# ------------------------------------------------------------------------------------------
# real browser


@needs_chromium
def test_browser_click_changes_the_overlay(runs_root, tmp_path):
    with dashboard_in_browser(runs_root, tmp_path, height=1900) as (page, base):
        page.goto(f"{base}/", timeout=60_000)
        overlay = page.locator(".st-key-overlays-1 img").first  # the R-MAE run's patch-query map
        overlay.wait_for(timeout=120_000)
        page.wait_for_selector("[data-testid=stStatusWidget]", state="detached", timeout=120_000)
        src = overlay.get_attribute("src")
        before = page.request.get(page.url.rstrip("/") + src if src.startswith("/") else src).body()
        # click a patch inside an object, away from the starting query (the centre patch)
        _, inst = scene(0)
        owner, purity = patch_ownership(torch.from_numpy(inst).long(), 8)
        cells = [tuple(x) for x in torch.nonzero((owner > 0) & (purity >= 0.75)).tolist() if tuple(x) != (2, 2)]
        r, c = cells[0] if cells else (0, 0)
        frame = page.frame_locator("iframe[title*='streamlit_image_coordinates']").first
        target = frame.locator("img")
        target.wait_for(timeout=60_000)
        box = target.bounding_box()
        target.click(position={"x": (c + 0.5) * box["width"] / 4, "y": (r + 0.5) * box["height"] / 4})
        deadline = time.time() + 60
        while overlay.get_attribute("src") == src:
            assert time.time() < deadline, "the overlay did not change after the click"
            time.sleep(0.2)
        page.wait_for_selector("[data-testid=stStatusWidget]", state="detached", timeout=120_000)
        src2 = overlay.get_attribute("src")
        after = page.request.get(page.url.rstrip("/") + src2 if src2.startswith("/") else src2).body()
        assert after != before and after[:8] == b"\x89PNG\r\n\x1a\n"
        assert page.get_by_text(f"patch query ({r}, {c})").first.is_visible()
        assert page.get_by_label("Query row (0–3)").input_value() == str(r)
        assert page.get_by_label("Query column (0–3)").input_value() == str(c)
        if cells:  # the query is on an object: the instance-awareness numbers are shown
            assert page.get_by_text("instance mass", exact=False).first.is_visible()
        time.sleep(0.5)
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    keep_screenshots([shot])
