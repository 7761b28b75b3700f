"""`rmae analyze`: the same images for every run, results.json names, report, CLI, intervals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
import pytest

from analysis.analyze import AnalysisError, AnalyzeConfig, analyze
from analysis.report import verdict
from analysis.results import Estimate, Results
from analysis.stats import bootstrap_ci, excludes_zero, paired_difference_ci, wilson_ci

NAMES = {"attention_distance", "attention_entropy", "attention_nmi", "instance_mass", "instance_leak",
         "instance_jaccard", "cls_jaccard", "corloc", "linear_probe", "knn", "attentive_probe", "dense_miou"}


def test_analyze_writes_every_metric_and_a_report(trained_runs, tmp_path):
    runs = trained_runs
    cfg = AnalyzeConfig(data="scenes:val:24", batch_size=8, probes=("linear", "knn", "attentive", "dense"),
                        probe_train="scenes:train:48", clicks=(1, 2), interactive_min_pairs=5, device="cpu")
    res = analyze([runs["mae"], runs["rmae"]], cfg, tmp_path / "rep", progress=False)
    on_disk = Results.load(tmp_path / "rep" / "results.json")
    assert on_disk.to_json() == json.loads(json.dumps(res.to_json())) and not on_disk.problems
    assert res.reference == "mae" and res.n_images == 24
    for name in ("mae", "rmae"):
        metrics = res.runs[name].metrics
        assert NAMES <= set(metrics), NAMES - set(metrics)
        assert len(metrics["instance_mass"].per_layer) == 2
        for key in ("instance_mass", "instance_leak", "instance_jaccard", "cls_jaccard"):
            v, (lo, hi) = metrics[key].value, metrics[key].ci
            assert 0 <= lo <= v <= hi <= 1, (key, v, lo, hi)
        assert metrics["attention_distance"].extra["unit"] == "px"
    assert "interactive_iou" in res.runs["rmae"].metrics and "interactive_iou" not in res.runs["mae"].metrics
    assert set(res.baselines["interactive_iou"]) == {"fh", "paste_only"}
    inter = res.runs["rmae"].metrics["interactive_iou"]
    pairs = res.meta["interactive_protocol"]["pairs"]
    assert inter.extra["n_pairs"] == [pairs] * len(inter.extra["clicks"])  # every point: the same pairs
    table = res.per_image["rmae"]["interactive_iou"]
    best = [max(res.baselines["interactive_iou"], key=lambda b: res.baselines["interactive_iou"][b].extra["per_click"][j])
            for j in range(table.shape[1])]
    assert inter.extra["best_baseline"] == best
    for j, b in enumerate(best):  # the gain is paired over the same pairs
        gain = np.mean(table[:, j] - res.per_image[f"baseline:{b}"]["interactive_iou"][:, j])
        assert inter.extra["gain_over_best_baseline"][j] == pytest.approx(gain, abs=1e-9)
    diff = res.differences["rmae − mae"]
    a = res.runs["mae"].metrics["instance_mass"].value
    b = res.runs["rmae"].metrics["instance_mass"].value
    assert diff["instance_mass"].value == pytest.approx(b - a, abs=1e-9)  # paired over the same images
    assert all(e.extra["scope"] == "checkpoint" for e in diff.values())
    assert len(res.cka["rmae"]["matrix"]) == 2
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Differences: rmae − mae" in md and "instance_mass" in md
    # one checkpoint per side: the report never calls a difference better or worse
    assert " better" not in md and " worse" not in md and "one checkpoint per side" in md
    for f in ("per_layer.csv", "summary.csv", "differences.csv", "figures/instance_mass.png",
              "figures/instance_mass.html", "figures/attention_overlays.png", "figures/interactive_iou.png",
              "figures/cka_rmae.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 100, f


def test_analyze_completes_with_what_the_data_supports(trained_runs, tmp_path):
    """Photos have no instance masks and no labels: the attention metrics are still computed,
    everything else is named as skipped, with the reason."""
    res = analyze([trained_runs["mae"], trained_runs["rmae"]], AnalyzeConfig(data="photos", batch_size=4, device="cpu"),
                  tmp_path / "rep", progress=False)
    metrics = res.runs["rmae"].metrics
    assert {"attention_distance", "attention_entropy", "attention_nmi"} <= set(metrics)
    assert not {"instance_mass", "corloc", "interactive_iou", "linear_probe"} & set(metrics)
    skipped = res.meta["skipped"]
    assert "no instance masks" in skipped["instance_mass"] and "probe-train" in skipped["linear_probe"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Not measured" in md and "no instance masks" in md


def test_cli_and_clear_errors(trained_runs, tmp_path):
    runs = trained_runs
    r = subprocess.run([sys.executable, "-m", "rmae", "analyze", str(runs["mae"]), str(runs["rmae"]), "--data",
                        "scenes:val:8", "--out", str(tmp_path / "cli"), "--probes", "none", "--clicks", "1",
                        "--no-progress", "--no-cka", "batch_size=4"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "report.md" in r.stdout and (tmp_path / "cli" / "report.md").exists()
    res = Results.load(tmp_path / "cli" / "results.json")
    assert not res.cka and res.runs["rmae"].metrics["interactive_iou"].extra["clicks"] == [1]
    r = subprocess.run([sys.executable, "-m", "rmae", "analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "rmae", "analyze", str(runs["mae"]), "--out", str(tmp_path / "x"),
                        "--clicks", "one"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "clicks" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(AnalysisError, match="at least one run"):
        analyze([], AnalyzeConfig(data="scenes:val:8", probes=()), progress=False)


def test_runs_of_different_input_sizes_see_the_same_images_resized(trained_runs, tmp_path):
    """Each model gets the same images at its own input size (masks resized alike): the per-image
    values are paired over the same images, and CKA compares image-level features of those images."""
    import rmae

    torch.manual_seed(0)
    big = rmae.create_model("mae_vit_tiny_patch8", img_size=64, depth=2)
    rmae.save_model(big, tmp_path / "big.safetensors")
    res = analyze([trained_runs["mae"], tmp_path / "big.safetensors"],
                  AnalyzeConfig(data="scenes:val:8", batch_size=4, probes=(), clicks=(), device="cpu"),
                  tmp_path / "rep", progress=False)
    assert res.meta["input_sizes"] == {"mae": [32, 32], "big.safetensors": [64, 64]}
    assert res.per_image["big.safetensors"]["instance_mass"].shape == res.per_image["mae"]["instance_mass"].shape == (8, 2)
    # the 64² model on the 64² rendering equals analysing it alone at 64²
    alone = analyze([tmp_path / "big.safetensors"], AnalyzeConfig(data="scenes:val:8", batch_size=4, probes=(),
                                                                   clicks=(), cka=False, device="cpu"), progress=False)
    np.testing.assert_allclose(res.per_image["big.safetensors"]["attention_distance"],
                               alone.per_image["big.safetensors"]["attention_distance"])
    assert "big.safetensors − mae" in res.differences and not any(k.startswith("cka") for k in res.meta["skipped"])
    cka = res.cka["big.safetensors"]
    assert cka["tokens"] == "mean" and cka["inputs"] == "same images at 32x32 and 64x64"
    assert np.asarray(cka["matrix"]).shape == (2, 2)  # mae has 2 blocks (TINY), big 2
    assert (tmp_path / "rep" / "figures" / "attention_overlays.png").stat().st_size > 100


def test_verdicts_follow_the_scope_of_the_evidence():
    checkpoint = Estimate(-0.1, (-0.2, -0.05), extra={"scope": "checkpoint"})
    method = Estimate(-0.1, (-0.2, -0.05), extra={"scope": "method"})
    assert "better" not in verdict("instance_leak", checkpoint) and "these checkpoints" in verdict("instance_leak", checkpoint)
    assert verdict("corloc", Estimate(0.1, (0.02, 0.2), extra={"scope": "method"})) == "higher — better"
    assert verdict("corloc", method) == "lower — worse"
    assert verdict("attention_distance", method) == "lower (descriptive)"  # no direction is better
    assert verdict("corloc", Estimate(0.1, (-0.01, 0.2), extra={"scope": "method"})).startswith("no clear difference")
    assert verdict("corloc", Estimate(None, None)) == "not measured"


def test_bootstrap_and_wilson_intervals():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.0, size=400)
    m, (lo, hi) = bootstrap_ci(x)
    assert lo < 2.0 < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.2)  # ≈ ±1.96 σ/√n
    per_layer, (lo2, hi2) = bootstrap_ci(np.stack([x, x + 1], axis=1))
    assert per_layer[1] - per_layer[0] == pytest.approx(1.0)
    noisy = x + rng.normal(0, 0.05, size=400)
    d, ci = paired_difference_ci(x, noisy + 0.1)
    assert excludes_zero(ci) and d == pytest.approx(0.1, abs=0.02)  # pairing removes the shared spread
    assert wilson_ci(0, 10)[1][0] == pytest.approx(0.0) and wilson_ci(10, 10)[1][1] == pytest.approx(1.0)
    p, (lo, hi) = wilson_ci(50, 100)
    assert p == 0.5 and lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    # any alpha, not only three tabulated ones: z(0.2) = 1.2816, z(0.5) = 0.6745 (normal quantiles)
    for alpha, z in ((0.2, 1.2815515655446004), (0.5, 0.6744897501960817), (0.05, 1.959963984540054)):
        p, (lo, hi) = wilson_ci(30, 100, alpha=alpha)
        centre = (0.3 + z * z / 200) / (1 + z * z / 100)
        half = z * (0.3 * 0.7 / 100 + z * z / 40000) ** 0.5 / (1 + z * z / 100)
        assert (lo, hi) == (pytest.approx(centre - half, abs=1e-12), pytest.approx(centre + half, abs=1e-12)), alpha
    assert wilson_ci(30, 100, alpha=0.2)[1][1] - wilson_ci(30, 100, alpha=0.2)[1][0] < hi - lo  # narrower at 80 %

