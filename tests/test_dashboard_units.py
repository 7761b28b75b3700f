"""The dashboard's plain-Python parts: path safety, discovery, the render-path functions (checked
against :mod:`analysis`), upload limits, results tables/figures and the CLI. No Streamlit."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import rmae
from analysis.attention import AttentionExtractor, aggregate_heads, cls_maps, patch_query_maps, rollout_maps
from analysis.metrics import instance_awareness
from dashboards import compute as C
from dashboards import results as R
from dashboards.runs import RunsRoot, UnsafePathError, read_metrics
from rmae.data import build_dataset


def _run(folder: Path, name: str = "rmae_vit_tiny_patch8", img_size: int = 32, depth: int = 2) -> Path:
    torch.manual_seed(0)
    model = rmae.create_model(name, img_size=img_size, depth=depth)
    folder.mkdir(parents=True, exist_ok=True)
    rmae.save_model(model, folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": name, "model_config": model.config.to_dict()}))
    return folder


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
    for bad in ("..", "../secret", "a/../../secret", str(tmp_path / "secret"), "/etc", "link", "link/x"):
        with pytest.raises(UnsafePathError, match="outside the runs root"):
            rr.inside(bad)
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65):
        with pytest.raises(UnsafePathError):
            rr.report_dir(bad)
    assert rr.report_dir("mae-vs-rmae_1.0") == (root / "reports" / "mae-vs-rmae_1.0").resolve()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        RunsRoot(tmp_path / "missing")


def test_discovery(tmp_path):
    root = tmp_path / "root"
    _run(root / "demo" / "rmae")
    _run(tmp_path / "outside", "mae_vit_tiny_patch8")
    (root / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    # a run folder whose checkpoint is a symlink leaving the root
    (root / "sneaky" / "checkpoints").mkdir(parents=True)
    (root / "sneaky" / "checkpoints" / "step_1.safetensors").symlink_to(tmp_path / "outside" / "model.safetensors")
    (root / "bad").mkdir()
    (root / "bad" / "config.yaml").write_text("a: [1,\n")
    (root / "pics" / "sub").mkdir(parents=True)
    (root / "pics" / "x.png").write_bytes(C.png_bytes(np.zeros((4, 4, 3), np.uint8)))
    (root / "pics" / "notes.txt").write_text("hi")
    (root / "reports" / "r1").mkdir(parents=True)
    (root / "reports" / "r1" / "results.json").write_text("{}")
    (root / ".hidden").mkdir()
    _run(root / ".hidden" / "run")
    disc = RunsRoot(root).discover()
    names = {r.name: r for r in disc.runs}
    assert set(names) == {"bad", "demo/rmae", "sneaky"}
    assert names["demo/rmae"].family == "rmae" and names["demo/rmae"].img_size == 32 and not names["demo/rmae"].problem
    assert "symlink leaving the runs root" in names["sneaky"].problem
    assert "not valid YAML" in names["bad"].problem
    assert disc.image_folders == ["pics"]
    assert disc.reports == ["reports/r1"]
    assert len(disc.rejected) == 1 and disc.rejected[0].startswith("escape")
    assert RunsRoot(root).images_in("pics") == ["pics/x.png"]


def test_read_metrics_skips_a_partial_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    rows, bad = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and bad == 1


# ------------------------------------------------------------------------------------------
# render path


@pytest.fixture(scope="module")
def model_and_image():
    torch.manual_seed(0)
    model = rmae.create_model("rmae_vit_tiny_patch8", img_size=64, depth=3).eval()
    s = build_dataset("scenes:val:4", image_size=64).load(1)
    return model, C.prepare(s["image"], s["instances"], 64)


def test_prepare_resizes_image_and_instances_together():
    s = build_dataset("scenes:val:2", image_size=96).load(0)
    p = C.prepare(s["image"], s["instances"], 64)
    assert p.image.shape == (64, 64, 3) and p.image.dtype == np.uint8
    assert p.instances.shape == (64, 64) and set(np.unique(p.instances)) <= set(np.unique(s["instances"]))
    assert p.tensor().shape == (1, 3, 64, 64)
    assert C.prepare(s["image"], s["instances"], 64).digest == p.digest != C.prepare(s["image"], None, 64).digest


def test_points_clicks_and_boxes():
    grid = (4, 8)
    assert C.point_to_patch((0.0, 0.0), grid) == 0
    assert C.point_to_patch((0.999, 0.999), grid) == 31
    assert C.point_to_patch(C.patch_center(2, 5, grid), grid) == 2 * 8 + 5
    assert C.click_to_point({"x": 128, "y": 64, "width": 256, "height": 256}) == (0.25, 0.5)
    assert C.click_to_point({"x": 999, "y": -3, "width": 256, "height": 256})[0] == 0.0
    assert C.click_to_point(None) is None
    assert C.patch_box(9, grid, 256) == (64, 32, 128, 64)
    img = C.draw_box(np.zeros((256, 256, 3), np.uint8), (64, 32, 128, 64))
    assert (img[64, 40] == C.QUERY_COLOR).all() and (img[100, 50] == 0).all()


def test_attention_views_are_the_analysis_maps(model_and_image):
    model, p = model_and_image
    attn = C.attention_stack(model, p)
    assert attn.shape == (3, 3, 65, 65)
    ref = AttentionExtractor(model)(p.tensor())
    grid = C.grid_of(model)
    for how in ("mean", "max", "1"):
        v = C.attention_views(attn, 1, how, 13, grid)
        h = int(how) if how.isdigit() else how
        torch.testing.assert_close(torch.from_numpy(v["patch query"]), aggregate_heads(patch_query_maps(ref[1], 13, grid), h)[0])
        torch.testing.assert_close(torch.from_numpy(v["CLS"]), aggregate_heads(cls_maps(ref[1], grid), h)[0])
        torch.testing.assert_close(torch.from_numpy(v["rollout"]), rollout_maps(ref[:2], grid, query=13, head_fusion=h)[0])
    assert "patch query" not in C.attention_views(attn, 0, "mean", None, grid)


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
    out = C.overlay(p.image, amap, 0.6, box=C.patch_box(0, (8, 8)))
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert not np.array_equal(C.overlay(p.image, amap), C.overlay(p.image, amap[::-1]))
    assert C.overlay(p.image, np.zeros((8, 8))).shape == (256, 256, 3)  # a flat map does not divide by zero
    assert C.png_bytes(out)[:8] == b"\x89PNG\r\n\x1a\n"
    assert C.overlay(p.image, np.ones((14, 14)), size=224).shape == (224, 224, 3)  # non-dividing grid


def test_reconstruction_and_clicks(model_and_image):
    model, p = model_and_image
    regions = C.region_stack(p.instances, C.region_list(p.instances)[0][0], 8)
    assert regions.shape == (8, 64, 64) and regions[0].sum() == C.region_list(p.instances)[0][1]
    panels = C.reconstruct(model, p, regions, 0.75, seed=3)
    assert list(panels) == ["masked image", "pixel reconstruction", "original", "masked region",
                            "region reconstruction", "original region"]
    assert all(v.shape == (64, 64, 3) and v.dtype == np.uint8 for v in panels.values())
    again = C.reconstruct(model, p, regions, 0.75, seed=3)
    other = C.reconstruct(model, p, regions, 0.75, seed=4)
    assert np.array_equal(again["masked image"], panels["masked image"])
    assert not np.array_equal(other["masked image"], panels["masked image"])
    # clicks: with ground truth the target is the instance under the first click
    from analysis.interactive import patch_ownership

    own = patch_ownership(torch.from_numpy(p.instances)[None].long(), 8)[0]
    q = int(torch.nonzero(own > 0)[0])
    target, inst, how = C.target_for_clicks(p, [q], 8, (8, 8))
    assert inst == int(own[q]) and how == "ground truth" and np.array_equal(target, p.instances == inst)
    prob = C.segment_from_clicks(model, p, target, [q])
    assert prob.shape == (64, 64) and ((prob >= 0) & (prob <= 1)).all()
    r, c = divmod(q, 8)
    assert np.array_equal(prob[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8], target[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8])
    base = C.baselines(p, [q], 8, (8, 8))
    assert base["clicked"].sum() == 64 and base["fh"][r * 8 + 4, c * 8 + 4]
    # without ground truth: FH segments under the clicks
    p2 = C.Prepared(p.image, None, "x")
    target2, inst2, how2 = C.target_for_clicks(p2, [q], 8, (8, 8))
    assert inst2 is None and "FH" in how2 and target2[r * 8 + 4, c * 8 + 4]


def test_upload_limits(tmp_path, monkeypatch):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(buf, format="PNG")
    assert C.decode_upload(buf.getvalue(), "a.png").shape == (40, 30, 3)
    with pytest.raises(ValueError, match="upload limit"):
        C.decode_upload(b"\x00" * (C.MAX_UPLOAD_BYTES + 1), "big.png")
    big = io.BytesIO()
    Image.new("L", (4100, 4100)).save(big, format="PNG")  # compresses to a few KB, 16.8 Mpx
    assert len(big.getvalue()) < C.MAX_UPLOAD_BYTES
    with pytest.raises(Exception, match="max_pixels|decompression bomb"):
        C.decode_upload(big.getvalue(), "bomb.png")
    with pytest.raises(Exception, match="not an image|cannot"):
        C.decode_upload(b"GIF89a garbage" * 10, "x.gif")


# ------------------------------------------------------------------------------------------
# results


def test_results_tables_and_figures(tmp_path):
    data = {"version": 1, "runs": {
        "a": {"family": "mae", "metrics": {"attention_entropy": {"per_layer": [1.0, 2.0], "per_layer_ci": [[0.9, 1.1], None],
                                                                  "value": 2.0, "ci": None},
                                           "knn": {"value": float("nan")}, "linear_probe": None}},
        "b": {"metrics": {}}},
        "cka": {"b": {"a": "a", "b": "b", "matrix": [[1.0]]}}}
    (tmp_path / "results.json").write_text(json.dumps(data))
    loaded = R.load_results(tmp_path / "results.json")
    t = R.scalar_table(loaded, ["a", "b"])
    assert t.loc["a", "Attention entropy"] == "2.000" and t.loc["a", "k-NN"] == "—" and t.loc["b", "family"] == "—"
    assert R.layer_metrics_present(loaded, ["a", "b"]) == ["attention_entropy"]
    fig = R.layer_figure(loaded, "attention_entropy", ["a", "b"])
    assert [tr.name for tr in fig.data] == ["a 95 % CI", "a"]  # band only where the CI exists
    assert list(fig.data[0].x) == [1, 1]
    assert R.interactive_figure(loaded, ["a"]) is None
    assert len(R.cka_entries(loaded)) == 1 and len(R.cka_entries({"cka": {"a": "x", "b": "y", "matrix": [[1]]}})) == 1
    assert R.fmt(0.12345, [0.1, 0.2]) == "0.123 [0.100, 0.200]" and R.fmt(None) == "—" and R.fmt(True) == "—"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(R.ResultsError, match="not valid JSON"):
        R.load_results(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(R.ResultsError, match="not an `rmae analyze` results file"):
        R.load_results(tmp_path / "other.json")


def test_config_table_only_differences():
    t = R.config_table({"a": {"x": 1, "m": {"k": [1, 2]}}, "b": {"x": 1, "m": {"k": [1, 3]}, "y": None}})
    assert t.loc["m.k", "a"] == "[1, 2]" and t.loc["y", "a"] == "—" and t.loc["y", "b"] == "—"
    d = R.config_table({"a": {"x": 1, "m": {"k": [1, 2]}}, "b": {"x": 1, "m": {"k": [1, 3]}}}, only_differences=True)
    assert list(d.index) == ["m.k"]


# ------------------------------------------------------------------------------------------
# CLI


def test_cli_command_and_errors(tmp_path, capsys):
    from importlib.metadata import entry_points

    from dashboards import cli

    assert any(ep.name == "dashboard" and ep.value == "dashboards.cli:register" for ep in entry_points(group="rmae.commands"))
    cmd = cli.build_command(tmp_path, 8123)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("dashboards/app.py")
    opts = dict(zip(cmd[5:-3:2], cmd[6:-3:2]))
    assert opts["--server.address"] == "127.0.0.1" and opts["--server.port"] == "8123"
    assert opts["--server.headless"] == "true" and opts["--browser.gatherUsageStats"] == "false"
    assert cmd[-3:] == ["--", "--runs", str(tmp_path)]
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["dashboard", "--runs", str(tmp_path / "nope")])
    assert args.host == "127.0.0.1" and args.port == 8501
    assert args.func(args) == 2
    assert "not a folder" in capsys.readouterr().err
