"""The dashboard's plain-Python parts: path confinement, discovery, the render path (checked against
:mod:`analysis`), upload limits, results tables/figures, background jobs, the CLI, and the rule
that ``dashboards`` never imports ``rmae.train``. No Streamlit sessions here."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMG, PY, ROOT, make_run, subprocess_env, tiny_model

from analysis.attention import aggregate_heads, cls_maps, patch_query_maps, rollout_maps
from analysis.encoder import attention_pass, describe
from analysis.groundtruth import patch_ownership
from analysis.metrics import instance_awareness
from analysis.results import Results
from dashboards import compute as C
from dashboards import images as I
from dashboards import results as R
from dashboards.jobs import JobBoard, JobBusyError, analyze_command, last_line
from dashboards.discovery import discover
from dashboards.runs import RootFileError, RunsRoot, UnsafePathError
from rmae.data import build_dataset

# ------------------------------------------------------------------------------------------
# runs root


def test_inside_refuses_paths_leaving_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret", target_is_directory=True)
    (root / "inner").symlink_to(root / "a", target_is_directory=True)
    rr = RunsRoot(root)
    assert rr.inside("a") == (root / "a").resolve()
    assert rr.inside("inner") == (root / "a").resolve()  # a symlink that stays inside is fine
    for bad in ("..", "../secret", "a/../../secret", str(tmp_path / "secret"), "/etc"):
        with pytest.raises(UnsafePathError, match=f"^{bad}: outside the runs root {root} \\(refused\\)$"):
            rr.inside(bad)
    for bad, shown in (("link", "link"), ("link/x", "link/x"), ("inner/../link", "link")):
        with pytest.raises(UnsafePathError, match=f"^{shown}: a symlink leaving the runs root \\(refused"):
            rr.inside(bad)
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65):
        with pytest.raises(UnsafePathError):
            rr.report_dir(bad)
    assert rr.report_dir("mae-vs-rmae_1.0") == (root / "reports" / "mae-vs-rmae_1.0").resolve()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        RunsRoot(tmp_path / "missing")


def test_discovery(tmp_path):
    root = tmp_path / "root"
    make_run(root / "demo" / "rmae")
    make_run(tmp_path / "outside", name="mae_vit_tiny_patch8")
    (root / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    # a run folder whose checkpoint is a symlink leaving the root
    (root / "sneaky" / "checkpoints").mkdir(parents=True)
    (root / "sneaky" / "checkpoints" / "step_000001.safetensors").symlink_to(tmp_path / "outside" / "model.safetensors")
    (root / "bad").mkdir()
    (root / "bad" / ".rmae-run").write_text("{}")  # an rmae run whose config.yaml was damaged
    (root / "bad" / "config.yaml").write_text("a: [1,\n")
    (root / "users").mkdir()
    (root / "users" / "config.yaml").write_text("a: 1\n")  # a user's own config: not a run
    (root / "pics" / "sub").mkdir(parents=True)
    (root / "pics" / "x.png").write_bytes(I.png_bytes(np.zeros((4, 4, 3), np.uint8)))
    (root / "pics" / "notes.txt").write_text("hi")
    (root / "reports" / "r1").mkdir(parents=True)
    (root / "reports" / "r1" / "results.json").write_text("{}")
    (root / ".hidden").mkdir()
    make_run(root / ".hidden" / "run")
    disc = discover(RunsRoot(root))
    names = {r.name: r for r in disc.runs}
    assert set(names) == {"bad", "demo/rmae", "sneaky"}
    assert names["demo/rmae"].family == "rmae" and names["demo/rmae"].img_size == IMG and not names["demo/rmae"].problem
    assert names["sneaky"].problem.startswith("sneaky/checkpoints/step_000001.safetensors: a symlink leaving the "
                                              "runs root (refused")
    assert "not valid YAML" in names["bad"].problem and names["bad"].problem.startswith("bad/config.yaml")
    assert disc.image_folders == ["pics"]
    assert disc.reports == ["reports/r1"]
    assert len(disc.rejected) == 1 and disc.rejected[0].startswith("escape")
    assert RunsRoot(root).images_in("pics") == ["pics/x.png"]


def test_discovery_of_studies(tmp_path):
    """A folder holding study.json is a study: its runs/ are its runs (grouped under it, found
    below the depth other folders are searched to), its results.json a report; its analysis/
    (one results.json per seed) is not a list of reports; a run symlinked out of it is rejected."""
    root = tmp_path / "root"
    study = root / "a" / "b" / "studies" / "x"  # runs at depth 6
    (study / "runs").mkdir(parents=True)
    (study / "study.json").write_text("{}")
    (study / "results.json").write_text("{}")
    make_run(study / "runs" / "mae-s0", name="mae_vit_tiny_patch8")
    make_run(study / "runs" / "rmae-s0")
    (study / "runs" / "notes.txt").write_text("not a run")
    (study / "analysis" / "mae-s0").mkdir(parents=True)
    (study / "analysis" / "mae-s0" / "results.json").write_text("{}")
    make_run(tmp_path / "outside")
    (study / "runs" / "escape-s1").symlink_to(tmp_path / "outside", target_is_directory=True)
    make_run(root / "plain")
    disc = discover(RunsRoot(root))
    assert [(r.name, r.study, r.short) for r in disc.runs] == [
        ("a/b/studies/x/runs/mae-s0", "a/b/studies/x", "mae-s0"), ("a/b/studies/x/runs/rmae-s0", "a/b/studies/x", "rmae-s0"),
        ("plain", None, "plain")]
    assert disc.runs[0].label == "x › mae-s0  (mae_vit_tiny_patch8)" and disc.runs[2].label.startswith("plain  (")
    assert list(disc.studies) == ["a/b/studies/x"] and disc.studies["a/b/studies/x"].has_results
    assert disc.studies["a/b/studies/x"].runs == ["a/b/studies/x/runs/mae-s0", "a/b/studies/x/runs/rmae-s0"]
    assert disc.reports == ["a/b/studies/x"]
    assert [r.split(" → ")[0] for r in disc.rejected] == ["a/b/studies/x/runs/escape-s1"]
    # the recorded run folders of its results.json, looked up in its own runs/
    rr = RunsRoot(root)
    x = "a/b/studies/x"
    ok = rr.study_run(x, "mae", 0, "/another/machine/studies/x/runs/mae-s0")
    assert (ok.run, ok.name, ok.problem) == (f"{x}/runs/mae-s0", "mae-s0", None)
    assert rr.study_run(x, "mae", 1, str(tmp_path / "outside")).problem == (
        f"{tmp_path / 'outside'}: not a run folder of this study (its runs are {x}/runs/NAME); left out")
    assert rr.study_run(x, "mae", 1, "runs/escape-s1").problem.startswith(
        f"{x}/runs/escape-s1: a symlink leaving the runs root (refused")
    assert rr.study_run(x, "mae", 1, "../../runs/ghost").problem == f"{x}/runs/ghost: no such folder"
    assert rr.study_run(x, "mae", 1, "runs/..").problem.endswith("left out")
    assert rr.study_run(x, "mae", 1, 7).problem == "run folder '7' is not a path; left out"
    (study / "runs" / "empty").mkdir()
    assert rr.study_run(x, "mae", 1, "runs/empty").problem == f"{x}/runs/empty: not a run folder (no config.yaml, marker or weights)"
    assert rr.study_analysis(x, "mae-s0") == f"{x}/analysis/mae-s0/results.json"


def test_run_folders_through_the_root(tmp_path):
    """Logs, configs and weights are read through the root, which checks each file as it is
    opened: a symlink out of the root is refused however many entries sit before it (there is no
    scan window to hide behind), and a run folder that became a file is refused too."""
    root = tmp_path / "root"
    run = make_run(root / "run")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    rr = RunsRoot(root)
    folder = rr.run_folder("run")
    assert folder.root == run.resolve()
    rows, bad = rr.run_metrics(folder)
    assert [r["step"] for r in rows] == [1, 2] and bad == 1
    assert rr.run_config(folder)["model_config"]["family"] == "rmae"
    assert rr.weights(folder) == (run / "model.safetensors").resolve()
    # a run whose newest checkpoint is a symlink out of the root, hidden behind 5000 other entries
    make_run(tmp_path / "outside")
    far = root / "far"
    (far / "checkpoints").mkdir(parents=True)
    for i in range(5000):
        (far / "checkpoints" / f"a{i:04d}.txt").write_text("")
    (far / "checkpoints" / "step_000009.safetensors").symlink_to(tmp_path / "outside" / "model.safetensors")
    folder = rr.run_folder("far")
    with pytest.raises(UnsafePathError, match="^far/checkpoints/step_000009.safetensors: a symlink leaving the runs "
                                              "root \\(refused"):
        rr.weights(folder)
    # …and its config and log, symlinked out, are refused when read
    (far / "config.yaml").symlink_to(tmp_path / "outside" / "config.yaml")
    (far / "metrics.jsonl").symlink_to(run / "metrics.jsonl")  # a symlink that stays inside is fine
    with pytest.raises(UnsafePathError, match="^far/config.yaml: a symlink leaving the runs root"):
        rr.run_config(folder)
    assert [r["step"] for r in rr.run_metrics(folder)[0]] == [1, 2]
    with pytest.raises(UnsafePathError, match="^../outside: outside the runs root"):
        rr.run_folder("../outside")
    (root / "plain").write_text("not a folder")
    with pytest.raises(RootFileError, match="^plain: not a folder$"):
        rr.run_folder("plain")
    with pytest.raises(RootFileError, match="^nothing: no such folder$"):
        rr.run_folder("nothing")


def test_root_files_are_regular_and_bounded(tmp_path):
    """What :meth:`RunsRoot.file` refuses, with the message shown on the page."""
    root = tmp_path / "root"
    root.mkdir()
    rr = RunsRoot(root)
    (root / "ok.json").write_text('{"a": 1}')
    assert rr.read_json("ok.json") == {"a": 1}
    os.mkfifo(root / "fifo.json")
    with pytest.raises(RootFileError, match=r"^fifo.json: not a regular file \(a FIFO, device or socket\); refused$"):
        rr.read_json("fifo.json")
    with open(root / "big.json", "wb") as f:  # sparse: 70 MiB of nothing
        f.truncate(70 * 2**20)
    with pytest.raises(RootFileError, match=r"^big.json: 70.0 MiB, more than the 16.0 MiB the dashboard reads for a "
                                            r"results file \(refused\)$"):
        rr.read_json("big.json", "results file")
    (root / "latin1.json").write_bytes(b'{"caf\xe9": 1}')
    with pytest.raises(RootFileError, match="^latin1.json: not UTF-8 text$"):
        rr.read_json("latin1.json")
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RootFileError, match="^deep.json: nested too deeply to read$"):
        rr.read_json("deep.json")
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(RootFileError, match="^loop: a symlink loop"):
        rr.read_json("loop")
    (root / "sub").mkdir()
    with pytest.raises(RootFileError, match="^sub: is a folder, not a file$"):
        rr.file("sub")
    with pytest.raises(RootFileError, match="^gone.json: no such file$"):
        rr.file("gone.json")
    for i in range(30):
        (root / "sub" / f"f{i:02d}").write_text("")
    entries, more = rr.listdir("sub", limit=10)
    assert len(entries) == 10 and more and all(e.parent == (root / "sub").resolve() for e in entries)
    assert rr.listdir("sub")[0] == sorted((root / "sub").resolve().iterdir())


# ------------------------------------------------------------------------------------------
# render path


@pytest.fixture(scope="module")
def model_and_image():
    model = tiny_model(img_size=64, depth=3)
    s = build_dataset("scenes:val:4", image_size=64).load(1)
    return model, I.prepare(s["image"], s["instances"], 64)


def test_prepare_resizes_image_and_instances_together():
    s = build_dataset("scenes:val:2", image_size=96).load(0)
    p = I.prepare(s["image"], s["instances"], 64)
    assert p.image.shape == (64, 64, 3) and p.image.dtype == np.uint8 and p.size == (64, 64)
    assert p.instances.shape == (64, 64) and set(np.unique(p.instances)) <= set(np.unique(s["instances"]))
    assert p.tensor().shape == (1, 3, 64, 64)
    assert I.prepare(s["image"], s["instances"], 64).digest == p.digest != I.prepare(s["image"], None, 64).digest
    assert I.prepare(s["image"], None, (32, 48)).image.shape == (32, 48, 3)


def test_points_clicks_and_boxes():
    grid = (4, 8)
    assert I.point_to_patch((0.0, 0.0), grid) == 0
    assert I.point_to_patch((0.999, 0.999), grid) == 31
    assert I.point_to_patch(I.patch_center(2, 5, grid), grid) == 2 * 8 + 5
    assert I.click_to_point({"x": 128, "y": 64, "width": 256, "height": 256}) == (0.25, 0.5)
    assert I.click_to_point({"x": 999, "y": -3, "width": 256, "height": 256})[0] == 0.0
    assert I.click_to_point(None) is None
    assert I.patch_box(9, grid, 256) == (64, 32, 128, 64)
    img = I.draw_box(np.zeros((256, 256, 3), np.uint8), (64, 32, 128, 64))
    assert (img[64, 40] == I.QUERY_COLOR).all() and (img[100, 50] == 0).all()


def test_attention_views_are_the_analysis_maps(model_and_image):
    model, p = model_and_image
    attn = C.attention_stack(model, p)
    assert attn.shape == (3, 3, 65, 65)
    _, rec = attention_pass(model, p.tensor())
    ref = rec.weights
    info = describe(model)
    grid = info.grid
    for how in ("mean", "max", "1"):
        v = C.attention_views(attn, 1, how, 13, info)
        h = int(how) if how.isdigit() else how
        torch.testing.assert_close(torch.from_numpy(v["patch query"]), aggregate_heads(patch_query_maps(ref[1], 13, grid), h)[0])
        torch.testing.assert_close(torch.from_numpy(v["CLS"]), aggregate_heads(cls_maps(ref[1], grid), h)[0])
        torch.testing.assert_close(torch.from_numpy(v["rollout"]), rollout_maps(ref[:2], grid, query=13, head_fusion=h)[0])
    assert "patch query" not in C.attention_views(attn, 0, "mean", None, info)


def test_attention_of_a_timm_vit_with_registers():
    """A timm ViT with a cls token and 2 registers (3 prefix tokens): the maps and the query row
    skip every prefix token — known answers sliced by hand from the recorded weights."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=IMG, patch_size=8, embed_dim=48, depth=2, num_heads=3, reg_tokens=2,
                            num_classes=0).eval()
    info = describe(vit)
    assert info.num_prefix_tokens == 3 and info.grid == (4, 4)
    s = build_dataset("scenes:val:2", image_size=IMG).load(0)
    p = I.prepare(s["image"], s["instances"], info.input_size)
    attn = C.attention_stack(vit, p)
    assert attn.shape == (2, 3, 19, 19)
    q = 6
    views = C.attention_views(attn, 1, "0", q, info)
    np.testing.assert_allclose(views["patch query"], attn[1, 0, 3 + q, 3:].reshape(4, 4), rtol=1e-6)
    np.testing.assert_allclose(views["CLS"], attn[1, 0, 0, 3:].reshape(4, 4), rtol=1e-6)
    row = C.query_row(attn, 1, "0", q, num_prefix=3)
    expected = attn[1, 0, 3 + q, 3:].astype(np.float64)
    np.testing.assert_allclose(row, expected / expected.sum(), rtol=1e-9)


def test_query_instance_numbers_average_to_analysis_metrics(model_and_image):
    """The per-query numbers shown, averaged over the image's valid queries, are
    analysis.metrics.instance_awareness (heads averaged)."""
    model, p = model_and_image
    attn = C.attention_stack(model, p)
    ref = instance_awareness(torch.from_numpy(attn[2])[None], torch.from_numpy(p.instances)[None].long(), 8)
    stats = [C.instance_stats(C.query_row(attn, 2, "mean", q), p.instances, 8, q) for q in range(64)]
    valid = [s for s in stats if s["valid"]]
    assert len(valid) == int(ref.num_queries[0]) > 0
    for key in ("mass", "leak", "background", "jaccard"):
        assert np.mean([s[key] for s in valid]) == pytest.approx(float(getattr(ref, key).reshape(-1)[0]), abs=1e-9)
    for s in stats:
        assert s["mass"] + s["leak"] + s["background"] == pytest.approx(1.0)


def test_overlay_and_images(model_and_image):
    _, p = model_and_image
    amap = np.arange(64, dtype=np.float32).reshape(8, 8)
    out = I.overlay(p.image, amap, 0.6, box=I.patch_box(0, (8, 8)))
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert not np.array_equal(I.overlay(p.image, amap), I.overlay(p.image, amap[::-1]))
    assert I.overlay(p.image, np.zeros((8, 8))).shape == (256, 256, 3)  # a flat map does not divide by zero
    assert I.png_bytes(out)[:8] == b"\x89PNG\r\n\x1a\n"
    assert I.overlay(p.image, np.ones((14, 14)), size=224).shape == (224, 224, 3)  # non-dividing grid


def test_reconstruction_and_clicks(model_and_image):
    model, p = model_and_image
    first = C.region_list(p.instances)[0]
    regions = C.region_stack(p.instances, first[0], 8)
    assert regions.shape == (8, 64, 64) and regions[0].sum() == first[1]
    panels = C.reconstruct(model, p, p.instances, first[0], 0.75, seed=3)
    assert list(panels) == ["masked image", "pixel reconstruction", "original", "masked region",
                            "region reconstruction", "original region"]
    assert all(v.shape == (64, 64, 3) and v.dtype == np.uint8 for v in panels.values())
    assert np.array_equal(panels["original region"][..., 0] > 127, p.instances == first[0])  # region `first` is shown
    again = C.reconstruct(model, p, p.instances, first[0], 0.75, seed=3)
    other = C.reconstruct(model, p, p.instances, first[0], 0.75, seed=4)
    assert np.array_equal(again["masked image"], panels["masked image"])
    assert not np.array_equal(other["masked image"], panels["masked image"])
    empty = C.reconstruct(model, p, None, 0, 0.75, seed=3)  # no regions in the image: empty maps
    assert (empty["original region"] == 0).all() and np.array_equal(empty["original"], panels["original"])
    # clicks: with ground truth the target is the instance under the first click
    own = patch_ownership(torch.from_numpy(p.instances).long(), 8)[0].reshape(-1)
    q = int(torch.nonzero(own > 0)[0])
    target, inst, how = C.target_for_clicks(p, [q], 8, (8, 8))
    assert inst == int(own[q]) and how == "ground truth" and np.array_equal(target, p.instances == inst)
    prob = C.segment_from_clicks(model, p, target, [q])
    assert prob.shape == (64, 64) and ((prob >= 0) & (prob <= 1)).all()
    r, c = divmod(q, 8)
    assert np.array_equal(prob[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8], target[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8])
    base = C.baselines(p, [q], 8, (8, 8))
    assert base["clicked"].sum() == 64 and base["clicked"][r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].all()
    assert base["fh"][r * 8 + 4, c * 8 + 4] and (base["fh"] >= base["clicked"]).all()
    assert C.iou(base["clicked"], base["clicked"]) == 1.0 and C.iou(base["clicked"], ~base["clicked"]) == 0.0
    # without ground truth: FH segments under the clicks
    p2 = I.Prepared(p.image, None, "x")
    target2, inst2, how2 = C.target_for_clicks(p2, [q], 8, (8, 8))
    seg = C.fh_segments(p.image)
    assert inst2 is None and "FH" in how2 and np.array_equal(target2, seg == seg[r * 8 + 4, c * 8 + 4])


def test_compute_follows_the_model_device(model_and_image):
    """Every tensor the render path makes follows the model (here on the CPU) or the data: under
    a ``meta`` default device, one made on the default device instead fails when it meets them."""
    model, p = model_and_image
    q = int(torch.nonzero(patch_ownership(torch.from_numpy(p.instances).long(), 8)[0].reshape(-1) > 0)[0])
    target = C.target_for_clicks(p, [q], 8, (8, 8))[0]
    torch.set_default_device("meta")
    try:
        attn = C.attention_stack(model, p)
        views = C.attention_views(attn, 1, "mean", q, describe(model))
        stats = C.instance_stats(C.query_row(attn, 1, "max", q), p.instances, 8, q)
        panels = C.reconstruct(model, p, p.instances, 1, 0.75, seed=0)
        prob = C.segment_from_clicks(model, p, target, [q])
        base = C.baselines(p, [q], 8, (8, 8))
    finally:
        torch.set_default_device("cpu")
    assert attn.shape == (3, 3, 65, 65) and np.isfinite(attn).all() and views["rollout"].shape == (8, 8)
    assert stats["mass"] + stats["leak"] + stats["background"] == pytest.approx(1.0)
    assert panels["original"].shape == (64, 64, 3) and prob.shape == (64, 64) and base["fh"].shape == (64, 64)


def test_prepared_input_does_not_depend_on_the_default_device(model_and_image):
    _, p = model_and_image
    expected = p.tensor()
    torch.set_default_device("meta")
    try:
        got = p.tensor()
    finally:
        torch.set_default_device("cpu")
    torch.testing.assert_close(got, expected)


def test_upload_limits():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(buf, format="PNG")
    assert I.decode_upload(buf.getvalue(), "a.png").shape == (40, 30, 3)
    with pytest.raises(ValueError, match="upload limit"):
        I.decode_upload(b"\x00" * (I.MAX_UPLOAD_BYTES + 1), "big.png")
    big = io.BytesIO()
    Image.new("L", (4100, 4100)).save(big, format="PNG")  # compresses to a few KB, 16.8 Mpx
    assert len(big.getvalue()) < I.MAX_UPLOAD_BYTES
    with pytest.raises(Exception, match="max_pixels|decompression bomb"):
        I.decode_upload(big.getvalue(), "bomb.png")
    with pytest.raises(Exception, match="not an image|cannot"):
        I.decode_upload(b"GIF89a garbage" * 10, "x.gif")


# ------------------------------------------------------------------------------------------
# results


def test_results_tables_and_figures(tmp_path):
    from analysis.registry import metric

    doc = {"version": 1, "runs": {
        "a": {"family": "mae", "metrics": {"attention_entropy": {"per_layer": [1.0, 2.0], "per_layer_ci": [[0.9, 1.1], None],
                                                                  "value": 2.0, "ci": None},
                                           "knn": {"value": float("nan")}, "linear_probe": {"value": 0.71234, "ci": [0.7, 0.72]}}},
        "b": {"metrics": {}}},
        "differences": {"b − a": {"knn": {"value": 0.1, "ci": [0.05, 0.15], "scope": "checkpoint"},
                                  "linear_probe": {"value": -0.01, "ci": [-0.02, 0.01]}}},
        "cka": {"b": {"a": "a", "b": "b", "matrix": [[1.0]]}, "c": {"matrix": "junk"}}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    loaded = Results.load(tmp_path / "results.json")
    t = R.scalar_table(loaded, ["a", "b"])
    entropy, knn, linear = (metric(k).title for k in ("attention_entropy", "knn", "linear_probe"))
    assert t.loc["a", entropy] == "2.000" and t.loc["a", knn] == "—" and t.loc["b", "family"] == "—"
    assert t.loc["a", linear] == "0.712 [0.700, 0.720]" and t.loc["b", linear] == "—"
    assert list(t.columns[2:]) == [metric(k).title for k in R.TABLE_METRICS]
    assert R.layer_metrics_present(loaded, ["a", "b"]) == ["attention_entropy"]
    fig = R.layer_figure(loaded, "attention_entropy", ["a", "b"])
    assert [tr.name for tr in fig.data] == ["a 95 % CI", "a"]  # band only where the CI exists
    assert list(fig.data[0].x) == [1, 1] and list(fig.data[1].y) == [1.0, 2.0]
    assert fig.layout.title.text == metric("attention_entropy").title and fig.layout.yaxis.title.text == "nats"
    assert R.figure_title("cls_jaccard") == f"{metric('cls_jaccard').title} (↑ better)"  # a direction gets an arrow
    assert R.interactive_figure(loaded, ["a"]) is None
    assert [e["b"] for e in R.cka_entries(loaded)] == ["b"]  # the malformed entry is left out
    assert len(R.cka_entries(Results.from_json({"runs": {}, "cka": {"a": "x", "b": "y", "matrix": [[1]]}}))) == 1
    diff = R.differences_table(loaded).set_index("metric")
    assert diff.loc["knn", "value [95 % CI]"] == "0.100 [0.050, 0.150]" and diff.loc["knn", "CI excludes 0"] == "yes"
    assert diff.loc["knn", "scope"] == "checkpoint" and diff.loc["linear_probe", "CI excludes 0"] == "no"
    assert R.direction("linear_probe") == "higher is better" and R.direction("attention_distance") == "descriptive"
    assert R.metric_help("linear_probe") == f"{metric('linear_probe').description} — higher is better."


def test_interactive_figure_runs_and_baselines():
    doc = {"runs": {"r": {"metrics": {"interactive_iou": {"value": 0.4, "clicks": [1, 2, 4], "per_click": [0.3, 0.4, "x"],
                                                          "per_click_ci": [[0.2, 0.4], None, [0.5, 0.6]]}}},
                    "m": {"metrics": {"interactive_iou": {"value": 0.1, "clicks": [1, 2], "per_click": [0.1]}}}},
           "baselines": {"interactive_iou": {"fh": {"clicks": [1, 2, 4], "per_click": [0.2, 0.25, 0.3]}}}}
    fig = R.interactive_figure(Results.from_json(doc), ["r", "m"])
    lines = {t.name: list(t.y) for t in fig.data if t.mode == "lines+markers"}
    assert lines == {"r": [0.3, 0.4, None], "baseline: fh": [0.2, 0.25, 0.3]}  # m's curve is malformed: left out
    band = [t for t in fig.data if t.fill == "toself"][0]
    assert list(band.x) == [1, 4, 4, 1] and list(band.y) == [0.4, 0.6, 0.5, 0.2]


def test_config_table_only_differences():
    t = R.config_table({"a": {"x": 1, "m": {"k": [1, 2]}}, "b": {"x": 1, "m": {"k": [1, 3]}, "y": None}})
    assert t.loc["m.k", "a"] == "[1, 2]" and t.loc["y", "a"] == "—" and t.loc["y", "b"] == "—"
    d = R.config_table({"a": {"x": 1, "m": {"k": [1, 2]}}, "b": {"x": 1, "m": {"k": [1, 3]}}}, only_differences=True)
    assert list(d.index) == ["m.k"]


def _study_doc() -> dict:
    """A study's results.json: two configurations (3 and 1 seeds), a control, a difference."""
    def est(per_seed, per_layer=None):
        v = float(np.mean(per_seed))
        d = {"value": v, "ci": [min(per_seed), max(per_seed)], "per_seed": per_seed, "n_seeds": len(per_seed),
             "scope": "method" if len(per_seed) > 1 else "checkpoint"}
        if per_layer:
            d.update(per_layer=per_layer, per_layer_ci=[[x - 1, x + 1] for x in per_layer])
        return d

    return {"version": 1, "kind": "study", "seeds": [0, 1, 2], "runs": {
        "mae": {"role": "configuration", "family": "mae", "seeds": [0, 1, 2], "run_folders": ["r/runs/a", "r/runs/b", "r/runs/c"],
                "metrics": {"knn": est([0.5, 0.6, 0.7]), "attention_entropy": est([3.0, 3.2, 3.4], [2.0, 3.2])}},
        "rmae-k=1": {"role": "configuration", "family": "rmae", "seeds": [0], "run_folders": ["r/runs/d"],
                     "metrics": {"knn": est([0.4])}},
        "content-free": {"role": "control", "metrics": {"knn": {"value": 0.1, "ci": [0.05, 0.15]}}}},
        "differences": {"rmae-k=1 − mae": {"knn": {**est([-0.1]), "seeds": [0]}}}}


def test_study_figures_known_answers():
    from dashboards import study as S

    res = Results.from_json(_study_doc())
    assert S.is_study(res) and S.configurations(res) == ["mae", "rmae-k=1"] and S.controls(res) == ["content-free"]
    assert S.metrics_present(res, ["mae", "rmae-k=1"]) == ["attention_entropy", "knn"]  # registry order
    assert S.jitter(1) == [0.0] and S.jitter(3) == pytest.approx([-S.JITTER, 0.0, S.JITTER])
    fig = S.seed_figure(res, "knn", ["mae", "rmae-k=1"])
    by = {t.name: t for t in fig.data}
    assert list(by) == ["mae: seeds", "mae: mean, 95 % CI over seeds", "rmae-k=1: seeds",
                        "rmae-k=1: mean, 95 % CI over seeds", "control: content-free"]
    assert list(by["mae: seeds"].y) == [0.5, 0.6, 0.7] and list(by["mae: seeds"].customdata) == ["0", "1", "2"]
    assert list(by["rmae-k=1: seeds"].x) == [1.0] and list(by["rmae-k=1: seeds"].y) == [0.4]
    m = by["mae: mean, 95 % CI over seeds"]
    assert list(m.y) == pytest.approx([0.6]) and list(m.error_y.array) == pytest.approx([0.1])
    assert list(m.error_y.arrayminus) == pytest.approx([0.1])
    assert list(by["control: content-free"].x) == [2] and list(fig.layout.xaxis.ticktext) == [
        "mae", "rmae-k=1", "control: content-free"]
    assert [t.name for t in S.seed_figure(res, "knn", ["mae"], with_controls=False).data] == [
        "mae: seeds", "mae: mean, 95 % CI over seeds"]
    assert S.seed_figure(res, "attention_entropy", ["mae"]).layout.title.text.endswith("— last layer")
    lf = S.seed_layer_figure(res, "attention_entropy", ["mae"], {"mae": [[1.0, 3.0], [2.0, "x"], [None, None]]})
    assert [(t.name, list(t.y)) for t in lf.data if t.name.endswith("seed line")] == [
        ("mae: seed line", [1.0, 3.0]), ("mae: seed line", [2.0, None])]  # an empty line is left out
    assert [list(t.y) for t in lf.data if t.name == "mae"] == [[2.0, 3.2]]
    band = [t for t in lf.data if t.fill == "toself"][0]
    assert list(band.x) == [1, 2, 2, 1] and list(band.y) == [3.0, 4.2, 2.2, 1.0]
    table = S.differences_table(res).set_index("metric")
    assert table.loc["knn", "scope"] == "checkpoint" and table.loc["knn", "seeds paired"] == 1
    assert table.loc["knn", "per seed"] == "-0.100" and table.loc["knn", "CI excludes 0"] == "yes"
    dfig = S.difference_figure(res, "knn")
    assert [t.name for t in dfig.data] == ["rmae-k=1 − mae: seeds", "rmae-k=1 − mae: mean, 95 % CI (checkpoint)"]
    assert S.difference_figure(res, "attention_entropy") is None
    assert S.seeds_of(res, "mae") == [(0, "r/runs/a"), (1, "r/runs/b"), (2, "r/runs/c")]
    assert S.problems(res) == []


def _leaves(doc, path=()):
    """Every position in a JSON document (for the wrong-types sweep)."""
    yield path
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from _leaves(v, (*path, k))


def test_study_and_report_views_take_any_wrong_type():
    """Every position of a study's results.json replaced by each kind of junk: the tables and
    figures the metrics page draws are built without an exception (a report with wrong types is one
    warning, never a page failure)."""
    import copy

    from dashboards import study as S

    doc = _study_doc()
    junk = [None, "x", {}, [["x"]], True]
    count = 0
    for path in list(_leaves(doc))[1:]:
        for value in junk:
            bad = copy.deepcopy(doc)
            target = bad
            for k in path[:-1]:
                target = target[k]
            target[path[-1]] = value
            try:
                res = Results.from_json(bad)
            except Exception:  # noqa: BLE001 - ResultsError only: not a results file at all
                continue
            configs = S.configurations(res)
            S.problems(res)
            for name in S.metrics_present(res, configs):
                S.seed_figure(res, name, configs)
                S.seed_layer_figure(res, name, configs, {c: [[1.0, 2.0]] for c in configs})
                S.difference_figure(res, name)
            S.differences_table(res)
            R.scalar_table(res, list(res.runs))
            R.interactive_figure(res, list(res.runs))
            [S.seeds_of(res, c) for c in configs]
            count += 1
    assert count > 150


def test_choice_kept_across_reports():
    from dashboards.state import still_there

    assert still_there(None, ["a", "b"]) == ["a", "b"]  # first time: everything
    assert still_there(["b", "x"], ["a", "b"]) == ["b"]  # what still exists
    assert still_there(["x"], ["a", "b"]) == ["a", "b"]  # another report's choice: everything
    assert still_there([], ["a", "b"]) == []  # cleared by the user: stays cleared


def test_probe_files_table_is_typed():
    t = R.probe_files_table({"r": [{"probe": {"a": 1}, "metric": 3, "value": "0.5", "layer": 1.5, "n_train": True,
                                    "pool": None, "chance": [1]}, {"probe": "linear", "value": 0.7, "layer": 2}]})
    row = t.to_dict("records")
    assert row[0]["probe"] == '{"a": 1}' and row[0]["metric"] == "3" and row[0]["value"] == 0.5
    assert row[0]["pool"] == "—" and row[0]["chance"] is None or np.isnan(row[0]["chance"])
    assert t["layer"].tolist()[1] == 2 and (t["layer"].isna().tolist()[0])
    assert row[1]["probe"] == "linear" and row[1]["value"] == 0.7


# ------------------------------------------------------------------------------------------
# background jobs


def _wait(job, seconds: float = 60.0):
    deadline = time.time() + seconds
    while (status := job.status()).running:
        assert time.time() < deadline, "job did not end"
        time.sleep(0.05)
    return status


def test_analyze_command():
    cmd = analyze_command([Path("/r/mae"), "/r/rmae"], Path("/r/reports/x"), 8, [])
    assert cmd == [sys.executable, "-m", "rmae", "analyze", "/r/mae", "/r/rmae", "--data", "scenes:val:8",
                   "--out", "/r/reports/x", "--probes", "none", "--no-progress"]
    assert analyze_command(["a"], "o", 16, ["linear", "knn"])[-3:] == ["--probes", "linear,knn", "--no-progress"]


def test_jobs_log_status_and_one_per_report(tmp_path):
    board = JobBoard()
    report = tmp_path / "reports" / "x"
    sleeper = [PY, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    job = board.start(report, sleeper, label="sleeping")
    assert job.status().running and board.get(report) is job and job.label == "sleeping"
    assert os.getpgid(job.proc.pid) == os.getpgid(0)  # the dashboard's process group: Ctrl-C reaches it
    with pytest.raises(JobBusyError, match="already running"):
        board.start(report, sleeper)
    with pytest.raises(JobBusyError):  # another board (another dashboard process) is refused too: the flock
        JobBoard().start(report, sleeper)
    deadline = time.time() + 30
    while "started" not in (report / "analyze.log").read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    board.terminate_all()
    status = job.status()
    assert status.state == "failed" and "stopped by signal" in status.message and "started" in status.message
    # the folder is free again; a failing command reports its last line
    failing = [PY, "-c", "import sys; print('working'); print('rmae analyze: error: no such run', file=sys.stderr); "
                         "sys.exit(2)"]
    status = _wait(board.start(report, failing))
    assert status.state == "failed" and status.message == "rmae analyze: error: no such run"
    status = _wait(board.start(report, [PY, "-c", "print('fine')"]))
    assert status.state == "done" and status.message == "" and (report / "analyze.log").read_text() == "fine\n"
    assert last_line(tmp_path / "nothing.log") == ""
    os.mkfifo(tmp_path / "fifo.log")  # would block a plain open()
    assert last_line(tmp_path / "fifo.log") == ""
    (tmp_path / "link.log").symlink_to(report / "analyze.log")  # not followed
    assert last_line(tmp_path / "link.log") == "" and last_line(report / "analyze.log") == "fine"
    # a log planted as a symlink out of the report folder is refused, not followed
    (report / "analyze.log").unlink()
    (report / "analyze.log").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(OSError):
        board.start(report, [PY, "-c", "print('x')"])
    assert not (tmp_path / "elsewhere.txt").exists()
    (report / "analyze.log").unlink()
    assert _wait(board.start(report, [PY, "-c", "pass"])).state == "done"  # the failed start freed the lock


def test_jobs_end_with_the_dashboard_process(tmp_path):
    """A dashboard process that exits (Streamlit stops this way on SIGTERM / Ctrl-C) takes its
    running jobs with it."""
    code = ("import sys, time\n"
            "from dashboards.jobs import JobBoard\n"
            f"job = JobBoard().start(__import__('pathlib').Path({str(tmp_path / 'r')!r}), "
            "[sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print(job.proc.pid, flush=True)\n")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    deadline = time.time() + 30
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.time() < deadline, "the job outlived the dashboard process"
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------
# dependencies and CLI


def test_dashboards_never_import_rmae_train(tmp_path):
    code = ("import pkgutil, importlib, sys, dashboards\n"
            "names = [m.name for m in pkgutil.walk_packages(dashboards.__path__, 'dashboards.')]\n"
            "for n in names: importlib.import_module(n)\n"
            "print(len(names), sorted(m for m in sys.modules if m == 'rmae.train' or m.startswith('rmae.train.')))\n")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=subprocess_env(tmp_path), cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    count, leaked = out.stdout.strip().split(" ", 1)
    assert int(count) >= 13  # app, cli, compute, images, jobs, results, runs, state, pages + its five pages
    assert leaked == "[]", f"dashboards imports {leaked}"


def test_cli_command_and_errors(tmp_path, capsys):
    from importlib.metadata import entry_points

    from dashboards import cli

    assert any(ep.name == "dashboard" and ep.value == "dashboards.cli:register" for ep in entry_points(group="rmae.commands"))
    cmd = cli.build_command(tmp_path, 8123)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("dashboards/app.py")
    opts = dict(zip(cmd[5:-5:2], cmd[6:-5:2]))
    assert opts["--server.address"] == "127.0.0.1" and opts["--server.port"] == "8123"
    assert opts["--server.headless"] == "true" and opts["--browser.gatherUsageStats"] == "false"
    assert cmd[-5:] == ["--", "--runs", str(tmp_path), "--device", "auto"]
    assert opts["--server.enableCORS"] == "true" and opts["--server.enableXsrfProtection"] == "true"
    assert [cmd[i + 1] for i, w in enumerate(cmd) if w == "--server.allowedHosts"] == ["localhost", "127.0.0.1", "::1"]
    assert cli.allowed_hosts("localhost") == ["localhost", "127.0.0.1", "::1"]
    assert cli.allowed_hosts("192.168.1.5") == ["192.168.1.5", "localhost", "127.0.0.1", "::1"]
    assert cli.allowed_hosts("0.0.0.0") == [] and cli.allowed_hosts("::") == []
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["dashboard", "--runs", str(tmp_path / "nope")])
    assert args.host == "127.0.0.1" and args.port == 8501 and args.device == "auto"
    assert args.func(args) == 2
    assert "not a folder" in capsys.readouterr().err
    args = parser.parse_args(["dashboard", "--runs", str(tmp_path), "--device", "cuda:99"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("rmae dashboard: error: device=cuda:99") and len(err.strip().splitlines()) == 1
