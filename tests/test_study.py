"""`rmae study`: configurations × seeds, resumable, analysed alike, reported across seeds."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from analysis.results import Estimate, Results
from analysis.stats import nested_bootstrap_ci
from analysis.study import configurations, parse_grid, plan
from analysis.study.report import PAPER_CLAIMS, claim_status
from conftest import IMG, PY, subprocess_env

TINY = [f"img_size={IMG}", "depth=2", "decoder_depth=1", "data=scenes:train:32", "batch_size=16", "steps=2",
        "checkpoint_every=2", "log_every=1"]


def test_grid_makes_the_product_of_axes_without_duplicate_mae_configurations(tmp_path):
    grid = parse_grid(["num_regions=1,8", "region_source=fh,gt", "mask_ratio=0.5,0.75"])
    assert grid == {"num_regions": [1, 8], "region_source": ["fh", "gt"], "mask_ratio": [0.5, 0.75]}
    configs = configurations(["mae", "rmae"], grid)
    labels = [c.label for c in configs]
    # rmae: 2 × 2 × 2; mae ignores the region axes: only mask_ratio makes configurations
    assert labels[:2] == ["mae-mask_ratio=0.5", "mae-mask_ratio=0.75"] and len(labels) == 2 + 8
    assert "rmae-num_regions=8-region_source=gt-mask_ratio=0.5" in labels
    runs = plan(tmp_path, ["mae", "rmae"], grid, seeds=3)
    assert len(runs) == 30 and len({r.folder for r in runs}) == 30
    assert runs[0].folder == tmp_path / "runs" / "mae-mask_ratio=0.5-s0"
    for bad in (["num_regions"], ["num_regions="], ["k=1,1"]):
        with pytest.raises(Exception, match="num_regions|value|repeated"):
            parse_grid(bad)
    # an axis limited to one family: R-MAE on FH and gt regions, RAE alone on the preset's
    scoped = configurations(["mae", "rmae", "rae"], parse_grid(["rmae:region_source=fh,gt", "mask_ratio=0.5,0.75"]))
    assert [c.label for c in scoped] == [
        "mae-mask_ratio=0.5", "mae-mask_ratio=0.75", "rmae-region_source=fh-mask_ratio=0.5",
        "rmae-region_source=fh-mask_ratio=0.75", "rmae-region_source=gt-mask_ratio=0.5",
        "rmae-region_source=gt-mask_ratio=0.75", "rae-mask_ratio=0.5", "rae-mask_ratio=0.75"]
    assert dict(scoped[2].axes) == {"region_source": "fh", "mask_ratio": 0.5}  # the setting, without its scope
    with pytest.raises(Exception, match="'vit' is not a family"):
        parse_grid(["vit:region_source=fh,gt"])
    with pytest.raises(Exception, match="given twice"):
        parse_grid(["region_source=fh", "rmae:region_source=gt"])


def test_nested_bootstrap_carries_the_spread_between_seeds():
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, size=200)
    close = np.stack([images + 0.01 * s for s in range(3)])  # seeds agree: interval ≈ the images' one
    far = np.stack([images + 2.0 * s for s in range(3)])  # seeds disagree: interval must widen
    m1, (lo1, hi1) = nested_bootstrap_ci(close)
    m2, (lo2, hi2) = nested_bootstrap_ci(far)
    assert m1 == pytest.approx(images.mean() + 0.01) and m2 == pytest.approx(images.mean() + 2.0)
    assert hi2 - lo2 > 5 * (hi1 - lo1)
    assert lo2 <= images.mean() + 0.5 and hi2 >= images.mean() + 3.5  # spans the seeds' own means
    per_layer, (lo, hi) = nested_bootstrap_ci(np.stack([close, close + 1], axis=-1))
    assert per_layer.shape == (2,) and per_layer[1] - per_layer[0] == pytest.approx(1.0)


def _study(tmp_path, *extra, timeout=900):
    cmd = [PY, "-m", "rmae", "study", "--config", "demo", "--out", str(tmp_path / "s"), "--seeds", "2",
           "--families", "mae,rmae", "--no-progress", "eval_data=scenes:val:8", "probes=linear", "clicks=1",
           "probe_train=scenes:train:32", "controls=false", *TINY, *extra]
    return subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def test_a_tiny_study_gives_per_seed_values_across_seed_intervals_and_resumes(tmp_path):
    r = _study(tmp_path, "--families", "mae,rmae,scratch")
    assert r.returncode == 0, r.stderr + r.stdout
    res = Results.load(tmp_path / "s" / "results.json")
    assert res.run_names("configuration") == ["mae", "rmae", "scratch"] and res.reference == "mae"
    # the from-scratch reference is an untrained encoder: analysed, not checked for learning
    assert set(res.meta["learning"]) == {"mae-s0", "mae-s1", "rmae-s0", "rmae-s1"}
    assert res.runs["scratch"].metrics["linear_probe"].extra["n_seeds"] == 2
    for label in ("mae", "rmae"):
        m = res.runs[label].metrics
        for key in ("attention_distance", "instance_mass", "linear_probe"):
            e = m[key]
            assert e.extra["n_seeds"] == 2 and len(e.extra["per_seed"]) == 2 and e.extra["scope"] == "method"
            assert e.value == pytest.approx(np.mean(e.extra["per_seed"]), abs=1e-9)
            assert e.ci[0] <= e.value <= e.ci[1]
    assert m["interactive_iou"].extra["n_seeds"] == 2  # rmae has a region decoder
    gain = m["interactive_iou"].extra["gain"]  # over the strongest baseline, read from each seed's analysis
    assert gain["n_seeds"] == 2 and gain["best_baseline"][0] in ("fh", "paste_only") and len(gain["per_click"]) == 1
    d = res.differences["rmae − mae"]["attention_distance"]
    assert d.extra["scope"] == "method" and d.extra["seeds"] == [0, 1]
    per_seed = [b - a for a, b in zip(res.runs["mae"].metrics["attention_distance"].extra["per_seed"],
                                      res.runs["rmae"].metrics["attention_distance"].extra["per_seed"])]
    assert d.extra["per_seed"] == pytest.approx(per_seed, abs=1e-9)
    report = (tmp_path / "s" / "report.md").read_text()
    assert "## rmae − mae (seed-paired)" in report and "The paper's claims" in report
    assert "gain over the strongest baseline" in report
    # the same command again: nothing retrains (weights untouched), analyses kept
    weights = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "runs").glob("*/checkpoints/*.safetensors")}
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "logs").glob("*.log")}
    assert len(weights) == 4 and len(logs) == 4 + 6  # 4 trainings, 6 analyses
    r = _study(tmp_path, "--families", "mae,rmae,scratch")
    assert r.returncode == 0, r.stderr
    assert {p: p.stat().st_mtime_ns for p in weights} == weights  # nothing retrained
    assert {p: p.stat().st_mtime_ns for p in logs} == logs  # no job ran again: analyses were current
    timing = Results.load(tmp_path / "s" / "results.json").meta["timing"]  # earlier invocations' times kept
    assert timing["train_seconds_per_run"] == res.meta["timing"]["train_seconds_per_run"] and len(timing["train_seconds_per_run"]) == 4
    assert timing["train_seconds"] >= res.meta["timing"]["train_seconds"] > 0
    assert Results.load(tmp_path / "s" / "results.json").runs["rmae"].metrics["instance_mass"].value == \
        res.runs["rmae"].metrics["instance_mass"].value


def test_a_killed_study_resumes_without_retraining_finished_runs(tmp_path):
    # train seed 0 only, then ask for two seeds: seed 0's runs are skipped, seed 1's trained
    r = _study(tmp_path, "seeds=1", "analyze=false")
    assert r.returncode == 0, r.stderr
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "runs").glob("*-s0/checkpoints/*.safetensors")}
    assert len(first) == 2
    r = _study(tmp_path, "analyze=false")  # --seeds 2 now (the _study default)
    assert r.returncode == 0, r.stderr
    assert {p: p.stat().st_mtime_ns for p in first} == first
    assert len(list((tmp_path / "s" / "runs").glob("*-s1/checkpoints/*.safetensors"))) == 2
    # a study folder holding another study is refused
    r = _study(tmp_path, "--grid", "mask_ratio=0.5,0.75")
    assert r.returncode == 2 and "holds a study with other grid" in r.stderr


def test_claims_are_only_decided_at_method_scope():
    res = Results(reference="mae")
    from analysis.results import RunResult

    for label, fam in (("mae", "mae"), ("rmae", "rmae")):
        res.runs[label] = RunResult(label, family=fam, role="configuration", config={"family": fam})
    claim = next(c for c in PAPER_CLAIMS if c.metric == "attention_distance")  # mae − rmae > 0
    res.differences["rmae − mae"] = {"attention_distance": Estimate(-2.0, (-3.0, -1.0), extra={"scope": "method"})}
    assert claim_status(res, claim)[0] == "reproduced"
    res.differences["rmae − mae"] = {"attention_distance": Estimate(2.0, (1.0, 3.0), extra={"scope": "method"})}
    assert claim_status(res, claim)[0].startswith("not reproduced")
    res.differences["rmae − mae"] = {"attention_distance": Estimate(-2.0, (-3.0, 1.0), extra={"scope": "method"})}
    assert claim_status(res, claim)[0] == "undecided at this budget"
    res.differences["rmae − mae"] = {"attention_distance": Estimate(-2.0, (-3.0, -1.0), extra={"scope": "checkpoint"})}
    assert claim_status(res, claim)[0] == "undecided"
    rae = next(c for c in PAPER_CLAIMS if c.metric == "dense_miou")
    assert claim_status(res, rae)[0] == "not measured"
    # neither side is the reference: the pair's own seed-paired difference is read
    for label, fam in (("rae", "rae"), ("scratch", "scratch")):
        res.runs[label] = RunResult(label, family=fam, role="configuration", config={"family": fam})
    res.differences["rae − scratch"] = {"dense_miou": Estimate(0.02, (0.01, 0.03), extra={"scope": "method"})}
    assert claim_status(res, rae) == ("reproduced", "rae − scratch = 0.020 [0.010, 0.030]")


def test_interactive_gain_is_over_the_strongest_baseline_pair_by_pair():
    from analysis.study.aggregate import interactive_gain

    rng = np.random.default_rng(0)
    pairs, clicks = 40, [1, 2]
    weak = rng.uniform(0.0, 0.2, size=(pairs, 2))
    strong = rng.uniform(0.4, 0.6, size=(pairs, 2))
    strong[:, 1] = 0.1  # at 2 clicks the other baseline is the strongest
    tables = {"fh": strong, "paste_only": weak}
    # seed 0 adds 0.1 over each click's strongest baseline, seed 1 adds 0.3
    best = np.stack([strong[:, 0], weak[:, 1]], axis=1)
    stack = np.stack([best + 0.1, best + 0.3])
    g = interactive_gain(stack, [tables, tables], clicks, seed=0)
    assert g.extra["best_baseline"] == ["fh", "paste_only"]
    assert g.extra["per_click"] == pytest.approx([0.2, 0.2]) and g.value == pytest.approx(0.2)
    assert g.extra["per_seed"] == pytest.approx([0.1, 0.3]) and g.extra["scope"] == "method"
    assert g.ci[0] <= 0.1 + 1e-9 and g.ci[1] >= 0.3 - 1e-9  # the seeds' spread is in the interval
    # pairs must match: a baseline on other pairs gives no gain rather than a wrong one
    assert interactive_gain(stack, [tables, {"fh": strong[:10]}], clicks, seed=0) is None
    assert interactive_gain(stack, [tables, {}], clicks, seed=0) is None


def test_the_interactive_claim_reads_the_gain_over_the_strongest_baseline():
    from analysis.results import RunResult

    claim = next(c for c in PAPER_CLAIMS if c.metric == "interactive_iou")
    res = Results(reference="mae")
    res.runs["mae"] = RunResult("mae", family="mae", role="configuration", config={"family": "mae"})
    res.runs["rmae"] = RunResult("rmae", family="rmae", role="configuration", config={"family": "rmae"})
    assert claim_status(res, claim)[0] == "not measured"
    gain = Estimate(0.05, (0.02, 0.08), extra={"scope": "method"})
    res.runs["rmae"].metrics["interactive_iou"] = Estimate(0.6, (0.5, 0.7), extra={"gain": gain.to_json()})
    assert claim_status(res, claim)[0] == "reproduced"
    gain = Estimate(-0.05, (-0.08, -0.02), extra={"scope": "method"})
    res.runs["rmae"].metrics["interactive_iou"].extra["gain"] = gain.to_json()
    assert claim_status(res, claim)[0].startswith("not reproduced")
    gain = Estimate(0.05, (0.02, 0.08), extra={"scope": "checkpoint"})
    res.runs["rmae"].metrics["interactive_iou"].extra["gain"] = gain.to_json()
    assert claim_status(res, claim)[0] == "undecided"
