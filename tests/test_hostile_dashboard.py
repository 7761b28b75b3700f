"""The dashboard against hostile input (issue 13): a runs root built to lead it outside the root,
block it or exhaust it, and the server's own boundaries.

- **The corpus** (:data:`RUN_CASES`, :data:`REPORT_CASES`, …): one test id per bad input, each
  asserting the exact message on the page and that the rest of the page renders (the good run's
  maps, the report's table, the compute form), under the time bound of an ``AppTest`` run.
- **Nothing outside the root is opened**: one ``AppTest`` session over the whole corpus in a
  subprocess with an audit hook (``open`` — raised by ``open()``, ``io.open`` and ``os.open`` —,
  ``os.listdir``, ``os.scandir``, ``glob.glob``) and the safetensors entry points (which open
  files in Rust, unseen by audit hooks) wrapped to record their paths; every recorded path under
  the test's folder must resolve inside the root. A control in the same process shows the seam
  sees an outside read when there is one.
- **The server ends with its parent**: ``rmae dashboard`` stopped with SIGTERM / SIGINT frees its
  port and leaves no Streamlit process and no background job behind.
- **WebSocket Origin / Host**: a handshake from another origin, or with another site's Host (DNS
  rebinding), is refused; a same-origin one is accepted.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import PY, ROOT, make_run, subprocess_env

from analysis.results import Results
from dashboards import images as I
from rmae.errors import UserError
from rmae.runfolder import RunFolder
from rmae.settings import load_yaml_file

APP = str(ROOT / "dashboards" / "app.py")
PAGES = {"attention": "views/attention.py", "runs": "views/runs.py", "metrics": "views/metrics.py"}
SYMLINK_OUT = "a symlink leaving the runs root (refused: the dashboard reads only files under the runs root)"
NOT_REGULAR = "not a regular file (a FIFO, device or socket); refused"
GOOD = "good"


# ------------------------------------------------------------------------------------------
# the hostile runs root


def _png(path: Path, value: int = 128) -> None:
    path.write_bytes(I.png_bytes(np.full((32, 32, 3), value, np.uint8)))


def _owner_message(fn, root: Path) -> str:
    """The message an owner (rmae) gives for a bad file, as the dashboard shows it (root-relative)."""
    try:
        fn()
    except UserError as e:
        return str(e).replace(str(root.resolve()) + os.sep, "")
    raise AssertionError("expected the owner to refuse the file")


def _report(runs: dict, **extra) -> dict:
    return {"version": 1, "data": "scenes:val:8", "n_images": 8, "seed": 0, "runs": runs, **extra}


def _layer(vals: list[float]) -> dict:
    return {"value": vals[-1], "ci": [vals[-1] - 0.1, vals[-1] + 0.1], "per_layer": vals,
            "per_layer_ci": [[v - 0.1, v + 0.1] for v in vals]}


def build(base: Path) -> tuple[Path, dict[str, str]]:
    """The hostile root under ``base/root`` and its bait under ``base/outside``; returns the root
    and the expected message of every case."""
    root, out = base / "root", base / "outside"
    root.mkdir(parents=True)
    # bait: regular, readable files outside the root — reading any of them is the failure
    bait_run = make_run(out / "run", name="mae_vit_tiny_patch8")
    (out / "results.json").write_text(json.dumps(_report({"bait": {"metrics": {}}})))
    _png(out / "fig.png")
    _png(out / "image.png")
    (out / "probe.json").write_text(json.dumps({"probe": "bait", "metric": "accuracy", "value": 1.0}))
    (out / "latest.json").write_text(json.dumps({"step": 1, "weights": "step_000001.safetensors"}))
    (out / "ckpts").mkdir()
    (out / "ckpts" / "step_000001.safetensors").write_bytes((bait_run / "model.safetensors").read_bytes())
    (out / "figs").mkdir()
    _png(out / "figs" / "recon_step_000001.png")
    expected: dict[str, str] = {}

    good = make_run(root / GOOD)  # the run that must keep rendering
    (good / "metrics.jsonl").write_text('{"step": 1, "loss": 1.5}\n')
    (good / "figures").mkdir(exist_ok=True)
    _png(good / "figures" / "recon_step_000001.png", 200)
    probes = good / "analysis" / "probes"
    probes.mkdir(parents=True)
    (probes / "linear.json").write_text(json.dumps({"probe": "linear", "metric": "accuracy", "value": 0.625,
                                                    "layer": 1, "pool": "cls"}))

    def run(name: str, **kw) -> Path:
        return make_run(root / name, **kw)

    # runs
    r = run("latest_escape")
    (r / "checkpoints").mkdir(exist_ok=True)
    (r / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "weights": "../../../outside/run/model.safetensors"}))
    expected["latest_escape"] = _owner_message(RunFolder(r).latest, root)
    r = run("latest_symlink")
    (r / "checkpoints").mkdir(exist_ok=True)
    (r / "checkpoints" / "latest.json").symlink_to(out / "latest.json")
    expected["latest_symlink"] = f"latest_symlink/checkpoints/latest.json: {SYMLINK_OUT}"
    r = run("weights_symlink")
    (r / "model.safetensors").unlink()
    (r / "model.safetensors").symlink_to(bait_run / "model.safetensors")
    expected["weights_symlink"] = f"weights_symlink/model.safetensors: {SYMLINK_OUT}"
    r = run("checkpoints_symlink")
    (r / "model.safetensors").unlink()
    (r / "checkpoints").rmdir()
    (r / "checkpoints").symlink_to(out / "ckpts", target_is_directory=True)
    expected["checkpoints_symlink"] = f"checkpoints_symlink/checkpoints: {SYMLINK_OUT}"
    r = run("config_symlink")
    (r / "config.yaml").unlink()
    (r / "config.yaml").symlink_to(bait_run / "config.yaml")
    expected["config_symlink"] = f"config_symlink/config.yaml: {SYMLINK_OUT}"
    r = run("weights_fifo")
    (r / "model.safetensors").unlink()
    os.mkfifo(r / "model.safetensors")
    expected["weights_fifo"] = f"weights_fifo/model.safetensors: {NOT_REGULAR}"
    r = run("config_fifo")
    (r / "config.yaml").unlink()
    os.mkfifo(r / "config.yaml")
    expected["config_fifo"] = f"config_fifo/config.yaml: {NOT_REGULAR}"
    r = run("latest_fifo")
    (r / "checkpoints").mkdir(exist_ok=True)
    os.mkfifo(r / "checkpoints" / "latest.json")
    expected["latest_fifo"] = f"latest_fifo/checkpoints/latest.json: {NOT_REGULAR}"
    r = run("config_latin1")
    (r / "config.yaml").write_bytes(b"model: caf\xe9\n")
    expected["config_latin1"] = _owner_message(lambda: load_yaml_file(r.resolve() / "config.yaml", "run config"), root)
    assert expected["config_latin1"] == "config_latin1/config.yaml: not UTF-8 text; a run config is a YAML file"
    r = run("config_alias")
    (r / "config.yaml").write_text("a: &x [1, 2]\nb: *x\n")
    expected["config_alias"] = _owner_message(lambda: load_yaml_file(r.resolve() / "config.yaml", "run config"), root)
    r = run("config_huge")
    with open(r / "config.yaml", "r+b") as f:
        f.truncate(2 * 2**20)
    expected["config_huge"] = "config_huge/config.yaml: 2.0 MiB, more than the 1.0 MiB the dashboard reads for a run config (refused)"
    (root / "run_escape").symlink_to(bait_run, target_is_directory=True)
    expected["run_escape"] = f"Ignored a symlink leaving the runs root: run_escape → {bait_run.resolve()}"
    crowd = root / "crowd"
    crowd.mkdir()
    for i in range(2001):
        (crowd / f"n{i:04d}").touch()
    expected["crowd"] = "crowd has more than 2000 entries; only 2000 were searched (move runs into sub-folders)"

    # figures (Runs page)
    r = run("figs_link")
    (r / "figures").mkdir(exist_ok=True)
    _png(r / "figures" / "recon_step_000001.png")
    (r / "figures" / "recon_step_000002.png").symlink_to(out / "fig.png")
    later = time.time_ns() + 10**12
    os.utime(r / "figures" / "recon_step_000002.png", ns=(later, later), follow_symlinks=False)  # the newest
    expected["figure_symlink"] = ("Run **figs_link**: its latest figure cannot be shown: "
                                  f"figs_link/figures/recon_step_000002.png: {SYMLINK_OUT}")
    r = run("figs_dir")
    (r / "figures").rmdir()
    (r / "figures").symlink_to(out / "figs", target_is_directory=True)
    expected["figures_dir_symlink"] = f"Run **figs_dir**: its latest figure cannot be shown: figs_dir/figures: {SYMLINK_OUT}"

    # probe files of the good run (Metrics page)
    (probes / "evil.json").symlink_to(out / "probe.json")
    expected["probe_symlink"] = f"Run **good**: good/analysis/probes/evil.json: {SYMLINK_OUT}"
    (probes / "latin1.json").write_bytes(b'{"probe": "caf\xe9"}')
    expected["probe_latin1"] = "Run **good**: good/analysis/probes/latin1.json: not UTF-8 text"
    os.mkfifo(probes / "fifo.json")
    expected["probe_fifo"] = f"Run **good**: good/analysis/probes/fifo.json: {NOT_REGULAR}"
    (probes / "list.json").write_text("[1, 2]")
    expected["probe_not_object"] = "Run **good**: good/analysis/probes/list.json: not a probe result (a JSON object); left out"

    # images (sidebar, folder source)
    (root / "images").mkdir()
    _png(root / "images" / "ok.png")
    (root / "images" / "evil.png").symlink_to(out / "image.png")
    expected["image_symlink"] = f"images/evil.png: {SYMLINK_OUT}"
    os.mkfifo(root / "images" / "fifo.png")
    expected["image_fifo"] = f"images/fifo.png: {NOT_REGULAR}"

    # reports (Metrics page)
    def report(name: str) -> Path:
        d = root / "reports" / name
        d.mkdir(parents=True)
        return d / "results.json"

    report("results_symlink").symlink_to(out / "results.json")
    expected["results_symlink"] = f"reports/results_symlink/results.json: {SYMLINK_OUT}"
    os.mkfifo(report("results_fifo"))
    expected["results_fifo"] = f"reports/results_fifo/results.json: {NOT_REGULAR}"
    with open(report("results_sparse_200mb"), "wb") as f:
        f.truncate(200 * 2**20)
    expected["results_sparse_200mb"] = ("reports/results_sparse_200mb/results.json: 200.0 MiB, more than the 16.0 MiB "
                                        "the dashboard reads for a results file (refused)")
    report("results_deep").write_text("[" * 200_000 + "]" * 200_000)
    expected["results_deep"] = "reports/results_deep/results.json: nested too deeply to be analysis results"
    report("results_latin1").write_bytes(b'{"version": 1, "runs": {"caf\xe9": {}}}')
    expected["results_latin1"] = "reports/results_latin1/results.json: not UTF-8 text; re-run `rmae analyze`"
    wrong = report("results_wrong_types")
    wrong.write_text(json.dumps(_report({"good": {"metrics": {"linear_probe": {"value": "high"}, "knn": {"value": 0.5}},
                                                  "config": 5}, "junk": 7},
                                        differences="none", n_images="many", cka=[1])))
    problems = Results.load(wrong).problems
    assert problems
    expected["results_wrong_types"] = ("reports/results_wrong_types/results.json has entries of the wrong type; they are "
                                       "left out and the rest is shown (re-run `rmae analyze` to rewrite it):\n"
                                       + "\n".join(f"- {p}" for p in problems))
    report("results_paths_outside").write_text(json.dumps(_report({
        "good": {"path": str(good), "family": "rmae", "metrics": {"knn": {"value": 0.5}}},
        "far": {"path": "../../outside/run", "family": "mae", "metrics": {"knn": {"value": 0.4}}},
        "abs": {"path": str(bait_run), "family": "mae", "metrics": {"knn": {"value": 0.3}}}})))
    expected["results_paths_outside"] = ("Recorded run paths outside the runs root (not linked to a run folder, not "
                                         f"read): far → ../../outside/run; abs → {bait_run}")
    expected["report_name_dotdot"] = ("report name '../../outside': use letters, digits, '_', '-' or '.' (up to 64), "
                                      "e.g. mae-vs-rmae")

    # a study whose run folders and seed analyses lead outside
    study = root / "studies" / "hostile"
    (study / "runs").mkdir(parents=True)
    (study / "study.json").write_text("{}")
    make_run(study / "runs" / "mae-s0", name="mae_vit_tiny_patch8")
    (study / "runs" / "mae-s3").symlink_to(bait_run, target_is_directory=True)
    (study / "runs" / "rmae-s0").write_text("a file where a run folder belongs")
    make_run(study / "runs" / "rmae-s1")
    (study / "analysis" / "mae-s0").mkdir(parents=True)
    (study / "analysis" / "mae-s0" / "results.json").write_text(json.dumps(_report(
        {"mae-s0": {"metrics": {"attention_distance": _layer([9.0, 11.0])}}})))
    (study / "analysis" / "rmae-s1").mkdir(parents=True)
    (study / "analysis" / "rmae-s1" / "results.json").symlink_to(out / "results.json")

    def config(family, folders, per_seed):
        return {"path": "x", "family": family, "model": family, "role": "configuration", "config": {"family": family},
                "seeds": list(range(len(folders))), "run_folders": folders,
                "metrics": {"attention_distance": {**_layer([9.0, 11.0]), "per_seed": per_seed,
                                                   "n_seeds": len(per_seed), "scope": "method"}}}

    (study / "results.json").write_text(json.dumps(_report({
        "mae": config("mae", ["/elsewhere/studies/hostile/runs/mae-s0", str(bait_run), "../../../outside/runs/ghost",
                              "x/runs/mae-s3"], [11.0, 11.2, 10.8, 11.0]),
        "rmae": config("rmae", ["runs/rmae-s0", "runs/rmae-s1"], [8.0, 8.5])}, kind="study", seeds=[0, 1, 2, 3])))
    expected["study_run_folder_elsewhere"] = (f"Seed 1 of **mae**: {bait_run}: not a run folder of this study (its runs "
                                              "are studies/hostile/runs/NAME); left out")
    expected["study_run_folder_dotdot"] = "Seed 2 of **mae**: studies/hostile/runs/ghost: no such folder"
    expected["study_run_folder_symlink"] = f"Seed 3 of **mae**: studies/hostile/runs/mae-s3: {SYMLINK_OUT}"
    expected["study_run_folder_is_file"] = "Seed 0 of **rmae**: studies/hostile/runs/rmae-s0: not a folder"
    expected["study_seed_analysis_symlink"] = (f"Seed 1 of **rmae**: its analysis cannot be read (studies/hostile/"
                                               f"analysis/rmae-s1/results.json: {SYMLINK_OUT}); its per-layer lines are "
                                               "left out")
    wt = root / "studies" / "wrongtypes"
    wt.mkdir(parents=True)
    (wt / "study.json").write_text("{}")
    (wt / "results.json").write_text(json.dumps(_report({
        "mae": {"role": "configuration", "family": "mae", "run_folders": 5, "seeds": "0,1",
                "metrics": {"knn": {"value": 0.5, "ci": [0.4, 0.6], "per_seed": "abc"},
                            "linear_probe": {"value": 0.6, "ci": [0.5, 0.7], "per_seed": [0.55, "x", 0.65]}}}},
        kind="study", seeds={"not": "a list"})))
    expected["study_wrong_types"] = (
        "studies/wrongtypes/results.json has study entries of the wrong type; they are left out and the rest is shown:\n"
        "- configuration mae: run_folders is not a list; its runs are not listed\n"
        "- configuration mae: seeds is not a list matching run_folders; seeds are numbered instead\n"
        "- configuration mae / knn: per_seed is not a list; its seed points are left out\n"
        "- configuration mae / linear_probe: per_seed holds values that are not numbers; they are left out")
    return root, expected


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    root, expected = build(base)
    yield base, root, expected
    for fifo in root.rglob("*"):  # unblock any reader a regression left waiting on a FIFO
        if fifo.is_fifo():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass


def _session(root: Path, monkeypatch, page: str | None = None, runs: list[str] | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("RMAE_DASHBOARD_RUNS", str(root))
    monkeypatch.setenv("RMAE_DASHBOARD_DEBUG", "1")  # page errors raise: a message must come from a handler
    at = AppTest.from_file(APP, default_timeout=60)  # the time bound of every step
    at.run()
    assert not at.exception, at.exception
    if runs is not None:
        at.sidebar.multiselect(key="runs").set_value(runs).run()
    if page is not None:
        at.switch_page(PAGES[page]).run()
    assert not at.exception, at.exception
    return at


def _good_run_renders(at) -> None:
    assert [s.value.split(" — ")[0] for s in at.subheader][:1] == [GOOD]
    captions = [img.proto.imgs[0].caption for img in at.get("image")]
    assert len(captions) == 3 and captions[0].startswith("patch query")


RUN_CASES = ["latest_escape", "latest_symlink", "weights_symlink", "checkpoints_symlink", "config_symlink",
             "weights_fifo", "config_fifo", "latest_fifo", "config_latin1", "config_alias", "config_huge"]


@pytest.mark.parametrize("case", RUN_CASES)
def test_hostile_run(hostile, monkeypatch, case):
    """The run is listed as unreadable with the reason on the Runs page; selected next to a good
    run, it is one error and the good run's maps are drawn."""
    _, root, expected = hostile
    at = _session(root, monkeypatch)
    assert f"{case}  (unreadable)" in at.sidebar.multiselect(key="runs").options  # labels, as shown
    at.sidebar.multiselect(key="runs").set_value([case, GOOD]).run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == [f"Run **{case}** cannot be used: {expected[case]}"]
    _good_run_renders(at)
    at.switch_page(PAGES["runs"]).run()
    table = at.dataframe[0].value
    assert table.loc[case, "status"] == expected[case] and table.loc[GOOD, "status"] == "ok"


@pytest.mark.parametrize("case", ["run_escape", "crowd"])
def test_hostile_folders_in_discovery(hostile, monkeypatch, case):
    """An escaping run-folder symlink is ignored with a warning; a folder of 2001 entries is
    searched up to the bound, with a warning; the good run renders."""
    _, root, expected = hostile
    at = _session(root, monkeypatch, runs=[GOOD])
    assert expected[case] in [w.value for w in at.sidebar.warning]
    assert not [o for o in at.sidebar.multiselect(key="runs").options if o.startswith(case)]
    _good_run_renders(at)


@pytest.mark.parametrize("case", ["figure_symlink", "figures_dir_symlink"])
def test_hostile_figures(hostile, monkeypatch, case):
    _, root, expected = hostile
    run = {"figure_symlink": "figs_link", "figures_dir_symlink": "figs_dir"}[case]
    at = _session(root, monkeypatch, page="runs", runs=[run, GOOD])
    assert [e.value for e in at.error] == [expected[case]]
    shown = [img.proto.imgs[0].caption for img in at.get("image")]
    assert shown == [f"{GOOD}: recon_step_000001.png"]  # the good run's figure is shown
    status = at.dataframe[0].value["status"]
    assert status[run] == "no metrics.jsonl" and status[GOOD] == "ok"  # listed as usual


@pytest.mark.parametrize("case", ["probe_symlink", "probe_latin1", "probe_fifo", "probe_not_object"])
def test_hostile_probe_files(hostile, monkeypatch, case):
    _, root, expected = hostile
    at = _session(root, monkeypatch, page="metrics", runs=[GOOD])
    assert expected[case] in [w.value for w in at.warning]
    probes = [d.value for d in at.dataframe if "probe" in d.value.columns][0]
    assert probes.to_dict("records")[0]["value"] == 0.625 and len(probes) == 1  # the readable file is shown


@pytest.mark.parametrize("case", ["image_symlink", "image_fifo"])
def test_hostile_images(hostile, monkeypatch, case):
    _, root, expected = hostile
    at = _session(root, monkeypatch, runs=[GOOD])
    at.sidebar.radio(key="src").set_value("folder").run()
    name = {"image_symlink": "images/evil.png", "image_fifo": "images/fifo.png"}[case]
    at.sidebar.selectbox(key="folder_file").set_value(name).run()
    assert not at.exception, at.exception
    assert [e.value for e in at.sidebar.error] == [expected[case]]
    assert "Choose an image in the sidebar." in [i.value for i in at.info]
    at.sidebar.selectbox(key="folder_file").set_value("images/ok.png").run()  # the next image works
    _good_run_renders(at)


REPORT_CASES = ["results_symlink", "results_fifo", "results_sparse_200mb", "results_deep", "results_latin1"]


def _metrics(root: Path, monkeypatch, report: str, exceptions: bool = False):
    at = _session(root, monkeypatch, page="metrics", runs=[GOOD])
    at.selectbox(key="report").set_value(report).run()
    if exceptions:
        return at
    assert not at.exception, at.exception
    assert not at.button(key="an_go").disabled  # the compute form renders below any report
    assert any(m.value.startswith("Missing from this report") for m in at.markdown)
    return at


@pytest.mark.parametrize("case", REPORT_CASES)
def test_hostile_report(hostile, monkeypatch, case):
    _, root, expected = hostile
    at = _metrics(root, monkeypatch, f"reports/{case}")
    assert [e.value for e in at.error] == [expected[case]]
    assert [d.value for d in at.dataframe if "probe" in d.value.columns]  # the probe files still show


def test_hostile_report_wrong_types(hostile, monkeypatch):
    _, root, expected = hostile
    at = _metrics(root, monkeypatch, "reports/results_wrong_types")
    assert expected["results_wrong_types"] in [w.value for w in at.warning]
    table = [d.value for d in at.dataframe if "Linear probe" in d.value.columns][0]
    assert table.loc["good", "k-NN"] == "0.500" and table.loc["good", "Linear probe"] == "—"


def test_hostile_report_run_paths_outside(hostile, monkeypatch):
    _, root, expected = hostile
    at = _metrics(root, monkeypatch, "reports/results_paths_outside")
    assert expected["results_paths_outside"] in [c.value for c in at.caption]
    table = [d.value for d in at.dataframe if "k-NN" in d.value.columns][0]
    assert list(table["k-NN"]) == ["0.500", "0.400", "0.300"]
    md = [m.value for m in at.markdown if m.value.startswith("Missing from this report")][0]
    assert "- **good**: " in md and "knn" not in md.split("- **good**: ")[1].split("\n")[0]  # linked by its path


def test_hostile_report_name(hostile, monkeypatch):
    _, root, expected = hostile
    at = _metrics(root, monkeypatch, "reports/results_paths_outside")
    at.text_input(key="an_name").set_value("../../outside").run()
    at.button(key="an_go").click().run()
    assert [e.value for e in at.error] == [expected["report_name_dotdot"]]
    assert not (root.parent / "outside" / "analyze.log").exists()


def test_a_report_that_fails_to_render_is_one_message(hostile, monkeypatch):
    """Outside test mode, a report whose view raises (here: the table, made to fail) is one error
    naming the report, and the page goes on (probe files, the compute form)."""
    from dashboards import results as R

    _, root, _ = hostile

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(R, "scalar_table", boom)
    at = _metrics(root, monkeypatch, "reports/results_paths_outside", exceptions=True)  # in test mode it raises…
    assert [str(e.value) for e in at.exception] == ["boom"]
    monkeypatch.delenv("RMAE_DASHBOARD_DEBUG")  # …as a user runs it, it is one message
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == ["reports/results_paths_outside: cannot be shown (RuntimeError: boom); "
                                           "the rest of the page is below."]
    assert [d.value for d in at.dataframe if "probe" in d.value.columns]
    assert not at.button(key="an_go").disabled


def test_compute_rechecks_the_runs_it_hands_to_analyze(hostile):
    """``rmae analyze`` reads the runs in its own process: "Compute" checks each run's config and
    weights when it starts the job, not only when the runs were discovered."""
    from dashboards.runs import RunsRoot
    from dashboards.views.metrics import _checked_run

    _, root, expected = hostile
    rr = RunsRoot(root)
    assert _checked_run(rr, GOOD) == (root / GOOD).resolve()
    for case in ("weights_symlink", "config_fifo", "latest_escape"):
        with pytest.raises(UserError) as e:
            _checked_run(rr, case)
        assert rr.relativize(str(e.value)) == expected[case]


STUDY_CASES = ["study_run_folder_elsewhere", "study_run_folder_dotdot", "study_run_folder_symlink",
               "study_run_folder_is_file", "study_seed_analysis_symlink"]


@pytest.mark.parametrize("case", STUDY_CASES)
def test_hostile_study(hostile, monkeypatch, case):
    """Each seed whose run folder or analysis leads outside (or is not a folder) is one warning;
    the seeds that are fine, and the figures across seeds, render."""
    _, root, expected = hostile
    at = _metrics(root, monkeypatch, "studies/hostile")
    assert expected[case] in [w.value for w in at.warning]
    runs = [d.value for d in at.dataframe if "run folder" in d.value.columns][0]
    assert runs.set_index(["configuration", "seed"]).loc[("mae", "0"), "run folder"] == "studies/hostile/runs/mae-s0"
    specs = [json.loads(ch.proto.spec) for ch in at.get("plotly_chart")]
    seeds = [s for s in specs if s["layout"]["title"]["text"].startswith("Mean attention distance — last layer")][0]
    assert [len(t["y"]) for t in seeds["data"] if t["name"].endswith(": seeds")] == [4, 2]
    layers = [s for s in specs if s["layout"]["title"]["text"] == "Mean attention distance"][0]
    thin = [t for t in layers["data"] if t["name"].endswith("seed line")]
    assert [t["y"] for t in thin] == [[9.0, 11.0]]  # mae-s0's own analysis; the others are left out


def test_hostile_study_wrong_types(hostile, monkeypatch):
    _, root, expected = hostile
    at = _metrics(root, monkeypatch, "studies/wrongtypes")
    assert expected["study_wrong_types"] in [w.value for w in at.warning]
    specs = {json.loads(ch.proto.spec)["layout"]["title"]["text"]: json.loads(ch.proto.spec)
             for ch in at.get("plotly_chart")}
    linear = specs["Linear probe (↑ better)"]["data"]
    assert [t["y"] for t in linear if t["name"] == "mae: seeds"] == [[0.55, 0.65]]  # the non-number left out
    assert not [t for t in specs["k-NN (↑ better)"]["data"] if t["name"] == "mae: seeds"]
    assert [t["y"] for t in specs["k-NN (↑ better)"]["data"] if t["name"].startswith("mae: mean")] == [[0.5]]
    assert "This study's results list no run folders." in [c.value for c in at.caption]


# ------------------------------------------------------------------------------------------
# nothing outside the root is opened

AUDIT = r'''
import json, os, sys
from pathlib import Path

base, root, app, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
events, recording = [], [False]
EVENTS = {"open", "os.listdir", "os.scandir", "glob.glob"}


def hook(event, args):
    if recording[0] and event in EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        events.append((event, os.fsdecode(args[0]), os.getcwd()))


sys.addaudithook(hook)
import safetensors
import rmae.checkpoint as checkpoint

def wrap(name, fn):
    def recorded(path, *a, **k):
        if recording[0]:
            events.append((name, os.fsdecode(path), os.getcwd()))
        return fn(path, *a, **k)
    return recorded

checkpoint.load_file = wrap("safetensors.load_file", checkpoint.load_file)
safetensors.safe_open = wrap("safetensors.safe_open", safetensors.safe_open)

# control: the seam sees an outside read when there is one
import rmae
recording[0] = True
rmae.load_model(base / "outside" / "run")
open(base / "outside" / "probe.json").close()
recording[0] = False
control, events[:] = list(events), []

os.environ["RMAE_DASHBOARD_RUNS"] = str(root)
os.environ["RMAE_DASHBOARD_DEBUG"] = "1"
from streamlit.testing.v1 import AppTest
from dashboards.discovery import discover
from dashboards.runs import RunsRoot

disc = discover(RunsRoot(root))  # the widgets' values (their options are shown as labels)
names, reports, images = [r.name for r in disc.runs], disc.reports, RunsRoot(root).images_in("images")

at = AppTest.from_file(app, default_timeout=120)
recording[0] = True
at.run()
steps = []
def step(what):
    steps.append([what, [str(e.value) for e in at.exception]])

at.sidebar.multiselect(key="runs").set_value(names).run(); step("attention, every run")
at.sidebar.radio(key="src").set_value("folder").run()
for f in images:
    at.sidebar.selectbox(key="folder_file").set_value(f).run(); step(f"image {f}")
for page in ("views/reconstruction.py", "views/segmentation.py", "views/runs.py", "views/metrics.py"):
    at.switch_page(page).run(); step(page)
for report in reports:
    at.selectbox(key="report").set_value(report).run(); step(f"report {report}")
at.sidebar.button(key="study_select").click().run(); step("study runs")
at.switch_page("views/runs.py").run(); step("runs page, study runs")
recording[0] = False
out.write_text(json.dumps({"events": events, "control": control, "steps": steps}))
'''


def _outside(events: list, root: Path, base: Path) -> list:
    """Recorded paths under ``base`` that do not resolve inside ``root``."""
    bad = []
    for event, path, cwd in events:
        p = Path(path) if os.path.isabs(path) else Path(cwd) / path
        if not p.is_relative_to(base) and not Path(os.path.realpath(p)).is_relative_to(base):
            continue  # Python's own files, Streamlit's, the model cache: not the test's folder
        real = Path(os.path.realpath(p))
        if not (real == root or real.is_relative_to(root)):
            bad.append((event, path, str(real)))
    return bad


def test_no_file_outside_the_root_is_opened(hostile, tmp_path):
    base, root, _ = hostile
    out = tmp_path / "audit.json"
    script = tmp_path / "audit.py"
    script.write_text(AUDIT)
    proc = subprocess.run([PY, str(script), str(base), str(root.resolve()), APP, str(out)], capture_output=True,
                          text=True, env=subprocess_env(tmp_path), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    real_root, real_base = root.resolve(), base.resolve()
    # the seam works: the control's outside reads are caught, through Python and through safetensors
    caught = _outside(rec["control"], real_root, real_base)
    assert {e for e, _, _ in caught} >= {"open", "safetensors.safe_open", "safetensors.load_file"}
    assert not [s for s in rec["steps"] if s[1]], rec["steps"]  # every step rendered without an exception
    # the session read the root (weights through safetensors, configs and reports through open) …
    seen = {(e, str(Path(os.path.realpath(p)).relative_to(real_root))) for e, p, _ in rec["events"]
            if Path(os.path.realpath(p)).is_relative_to(real_root)}
    assert ("safetensors.load_file", "good/model.safetensors") in seen
    assert ("open", "good/config.yaml") in seen and ("open", "reports/results_paths_outside/results.json") in seen
    assert ("open", "studies/hostile/analysis/mae-s0/results.json") in seen
    # … and nothing outside it
    assert _outside(rec["events"], real_root, real_base) == []


# ------------------------------------------------------------------------------------------
# the server: ends with its parent, checks Origin and Host


def _server(runs: Path, tmp: Path, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """``python -m rmae dashboard --runs RUNS --port 0``, up and answering; (process, port)."""
    log = open(tmp / "dashboard.log", "w")
    proc = subprocess.Popen([PY, "-m", "rmae", "dashboard", "--runs", str(runs), "--port", "0"], stdout=log,
                            stderr=subprocess.STDOUT, env=env or subprocess_env(tmp), start_new_session=True)
    deadline = time.time() + 120
    port = None
    while True:
        assert proc.poll() is None, (tmp / "dashboard.log").read_text()
        assert time.time() < deadline, "the dashboard did not start: " + (tmp / "dashboard.log").read_text()
        if port is None:
            text = (tmp / "dashboard.log").read_text()
            if "open http://127.0.0.1:" in text:
                port = int(text.split("open http://127.0.0.1:")[1].split()[0])
        if port is not None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, port
            except OSError:
                pass
        time.sleep(0.3)


def _processes_with(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmd and state != "Z":
                pids.append(int(d.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


SITE = r'''
import os, sys
if any(a.endswith("dashboards/app.py") for a in sys.argv):  # the server process: a background job, as "Compute" starts
    from pathlib import Path
    from dashboards.jobs import JobBoard
    _board = JobBoard()
    _job = _board.start(Path(os.environ["RMAE_TEST_JOBS"]), [sys.executable, "-c", "import time; time.sleep(600)"])
    Path(os.environ["RMAE_TEST_JOBS"], "job.pid").write_text(str(_job.proc.pid))
'''


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_server_ends_with_its_parent(tmp_path, sig):
    """``rmae dashboard`` stopped by a signal frees its port, leaves no Streamlit process of its
    command and ends its background analysis job."""
    runs = tmp_path / f"runs-{sig.name}"
    runs.mkdir()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    env = subprocess_env(tmp_path)
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    env["RMAE_TEST_JOBS"] = str(tmp_path / "jobs")
    proc, port = _server(runs, tmp_path, env)
    try:
        job = int((tmp_path / "jobs" / "job.pid").read_text())
        assert _alive(job) and _processes_with(str(runs))
        proc.send_signal(sig)  # what a supervisor or `kill PID` (or Ctrl-C) sends to the command
        proc.wait(60)
        deadline = time.time() + 30
        while _processes_with(str(runs)) or _alive(job):
            assert time.time() < deadline, (_processes_with(str(runs)), _alive(job))
            time.sleep(0.2)
        with socket.socket() as s:  # nothing listens on the port any more (TIME_WAIT of old connections aside)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        for pid in _processes_with(str(runs)):
            os.kill(pid, signal.SIGKILL)


def _handshake(port: int, host: str, origin: str | None) -> str:
    """The status line the server answers a WebSocket upgrade of ``/_stcore/stream`` with."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET /_stcore/stream HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"] + ([f"Origin: {origin}"] if origin else [])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = s.recv(4096).decode(errors="replace")
    return data.splitlines()[0] if data else "closed"


def test_websocket_checks_origin_and_host(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    proc, port = _server(runs, tmp_path)
    try:
        here = f"127.0.0.1:{port}"
        assert _handshake(port, here, f"http://{here}") == "HTTP/1.1 101 Switching Protocols"
        assert _handshake(port, f"localhost:{port}", f"http://localhost:{port}") == "HTTP/1.1 101 Switching Protocols"
        assert _handshake(port, here, "http://evil.example") == "HTTP/1.1 403 Forbidden"  # a foreign page
        # DNS rebinding: evil.example resolves to 127.0.0.1; Host and Origin are both the attacker's
        assert _handshake(port, f"evil.example:{port}", f"http://evil.example:{port}") == "HTTP/1.1 403 Forbidden"
        assert _handshake(port, f"evil.example:{port}", None) == "HTTP/1.1 403 Forbidden"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        for pid in _processes_with(str(runs)):
            os.kill(pid, signal.SIGKILL)
