"""``rmae study``: train every (configuration, seed), analyse every run on the same images, report
across seeds. Rerunning the same command continues the study: finished runs are skipped, killed
runs resume from their last checkpoint, analyses already made for the current weights are kept.

The layout of a study folder is in :mod:`analysis.study.plan`; the statistics in
:mod:`analysis.study.aggregate`; the scheduling in :mod:`analysis.study.runner`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rmae.errors import UserError
from rmae.io import atomic_write_json, atomic_write_text, read_text
from rmae.runfolder import RunFolder
from rmae.settings import ConfigError, setting

from ..registry import PROBE_KEYS
from ..results import MAX_RESULTS_BYTES
from .plan import PlannedRun, parse_grid, plan
from .runner import Job, rmae_command, run_jobs

STUDY_FILE = "study.json"


@dataclass
class StudyConfig:
    seeds: int = setting(3, "seeds per configuration (the unit of evidence: ≥ 2 to compare methods)", low=1, high=1000)
    first_seed: int = setting(0, "the first seed; seeds are first_seed, first_seed+1, …", low=0)
    families: tuple[str, ...] = setting(("mae", "rmae"), "families: mae, rae, rmae, scratch (untrained encoder)")
    parallel: int = setting(0, "jobs at once (0 = one per CPU core)", low=0, high=256)
    threads: int = setting(1, "intra-op threads of each job", low=1, high=256)
    eval_data: str = setting("scenes:val:200", "the images every run is analysed on")
    probes: tuple[str, ...] = setting(("linear", "knn", "dense"), "probes of every run (linear, knn, attentive, dense, or none)")
    probe_train: str | None = setting(None, "probe training data (default: scenes:train of twice the eval size)")
    clicks: tuple[int, ...] = setting((1, 2, 4, 8), "interactive-segmentation click counts (region runs)", low=1)
    controls: bool = setting(True, "analyse the controls (content-free, local, random-init, oracle) once")
    analyze: bool = setting(True, "analyse the runs after training (false: train only)")

    def __post_init__(self) -> None:
        bad = [p for p in self.probes if p not in PROBE_KEYS]
        if bad:
            raise ConfigError(f"probes: unknown {', '.join(bad)}; choose from {', '.join(PROBE_KEYS)} (or none)")


def _model_for(model: str, family: str) -> str:
    """``rmae_vit_tiny_patch8`` + family ``mae`` → ``mae_vit_tiny_patch8`` (scratch: the MAE encoder)."""
    from rmae.models.config import parse_model_name

    _, size, patch = parse_model_name(model)
    return f"{'mae' if family == 'scratch' else family}_vit_{size}_patch{patch}"


def _train_words(run: PlannedRun, base_model: str, overrides: dict[str, Any]) -> list[str]:
    values = {**overrides, **run.configuration.overrides(), "model": _model_for(base_model, run.configuration.family),
              "seed": run.seed}
    return [f"{k}={json.dumps(list(v)) if isinstance(v, tuple) else v}" for k, v in values.items()]


def _finished(run: PlannedRun, steps: int | None) -> bool:
    folder = RunFolder(run.folder)
    if not folder.is_run():
        return False
    try:
        latest = folder.latest()
    except UserError:
        return False
    if run.configuration.family == "scratch":
        return folder.model_path.is_file()
    return latest is not None and steps is not None and latest["step"] >= steps


def _make_scratch(run: PlannedRun, preset: str, base_model: str, overrides: dict[str, Any]) -> None:
    """The from-scratch reference: the MAE encoder at its (seeded) initialisation, as a run folder."""
    import rmae
    from rmae.train.config import load_config

    cfg = load_config(preset, _train_words(run, base_model, overrides))
    torch.manual_seed(cfg.seed)
    model = rmae.create_model(cfg.model, **cfg.model_args)
    folder = RunFolder(run.folder)
    with folder.lock():
        folder.create("scratch")  # the marker says what it is; config.yaml stays a valid training config
        folder.write_config(cfg.to_flat_dict(), model.config.to_dict())
        rmae.save_model(model, folder.model_path)


def _analysis_current(run: PlannedRun, settings: dict[str, Any]) -> bool:
    """An analysis made for the run's current weights with the current settings."""
    f = run.analysis / "results.json"
    stamp = run.analysis / "study-analysis.json"
    if not f.is_file() or not stamp.is_file():
        return False
    try:
        weights = RunFolder(run.folder).weights_path()
        current = {**settings, "weights": str(weights), "mtime": weights.stat().st_mtime_ns}
        return json.loads(read_text(stamp, 1 << 20)) == json.loads(json.dumps(current))  # tuples as JSON lists
    except (UserError, OSError, ValueError):
        return False


def _analysis_words(cfg: StudyConfig, with_clicks: bool) -> list[str]:
    words = ["--data", cfg.eval_data, "--probes", ",".join(cfg.probes) or "none", "--no-cka", "--no-progress",
             "--device", "cpu", "clicks=" + (",".join(map(str, cfg.clicks)) if with_clicks and cfg.clicks else "none"),
             "attributions=0", "feature_maps=none", "embedding=none"]  # the study's numbers, not its pictures
    if cfg.probe_train:
        words += ["--probe-train", cfg.probe_train]
    return words


def run_study(preset: str, out: str | Path, cfg: StudyConfig, grid_words: list[str] | None = None,
              train_overrides: dict[str, Any] | None = None, progress: bool = True):
    """Train, analyse and aggregate (see module docstring); returns the study's Results."""
    from rmae.train.config import load_config

    from .aggregate import aggregate
    from .report import write_study_report

    root = Path(out)
    overrides = dict(train_overrides or {})
    grid = parse_grid(grid_words)
    base = load_config(preset, [f"{k}={v}" for k, v in overrides.items()])  # fails early on a bad preset / key
    planned = plan(root, list(cfg.families), grid, cfg.seeds, cfg.first_seed)
    for run in planned:  # every configuration's settings, validated before anything runs
        load_config(preset, _train_words(run, base.model, overrides))
    record = {"preset": preset, "families": list(cfg.families), "grid": grid, "overrides": overrides}
    study_file = root / STUDY_FILE
    if study_file.is_file():
        old = json.loads(read_text(study_file, 1 << 20))
        diff = [k for k in record if old.get(k) != json.loads(json.dumps(record[k]))]
        if diff:
            raise ConfigError(f"{root} holds a study with other {', '.join(diff)} ({', '.join(f'{k}={old.get(k)}' for k in diff)}); "
                              "use another --out for a different study")
    elif root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root}: a folder with files that is not a study; choose a new or empty folder for --out")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(study_file, {**record, "study_settings": asdict(cfg)})
    parallel = cfg.parallel or (os.cpu_count() or 1)
    timing: dict[str, Any] = {"parallel": parallel, "threads": cfg.threads}

    # 1. train
    t0 = time.time()
    todo = [r for r in planned if not _finished(r, base.steps)]
    for r in [r for r in todo if r.configuration.family == "scratch"]:
        _make_scratch(r, preset, base.model, overrides)
    jobs = [Job(r.name, rmae_command("pretrain", "--config", preset, "--out", str(r.folder), "--no-progress",
                                     *_train_words(r, base.model, overrides)), r.folder.parent.parent / "logs" / f"train-{r.name}.log",
                cfg.threads) for r in todo if r.configuration.family != "scratch"]
    if progress:
        print(f"study {root}: {len(planned)} runs ({len(planned) - len(todo)} already trained), "
              f"{len(jobs)} to train, {parallel} at a time", flush=True)
    run_jobs(jobs, parallel, progress, "trainings")
    timing["train_seconds"] = round(time.time() - t0, 1)
    timing["train_seconds_per_run"] = {j.name: round(j.seconds, 1) for j in jobs}
    failed = [j for j in jobs if j.returncode != 0]
    if failed:
        raise StudyError(f"{len(failed)} training(s) failed: " + "; ".join(f"{j.name}: {j.tail} (log {j.log})" for j in failed))
    if not cfg.analyze:
        return None

    # 2. analyse every run on the same images (and the controls once)
    t1 = time.time()
    settings = {k: v for k, v in asdict(cfg).items() if k in ("eval_data", "probes", "probe_train", "clicks")}
    jobs = []
    for r in planned:
        if _analysis_current(r, settings):
            continue
        words = _analysis_words(cfg, r.configuration.has_regions)
        jobs.append(Job(f"analyze {r.name}", rmae_command("analyze", str(r.folder), "--out", str(r.analysis), *words),
                        root / "logs" / f"analyze-{r.name}.log", cfg.threads))
    controls_dir = root / "analysis" / "controls"
    if cfg.controls and not (controls_dir / "results.json").is_file():
        ref = planned[0]
        jobs.append(Job("controls", rmae_command("analyze", str(ref.folder), "--out", str(controls_dir), "--controls",
                                                 "--data", cfg.eval_data, "--probes", "none", "clicks=none", "--no-cka",
                                                 "--no-progress", "--device", "cpu"),
                        root / "logs" / "analyze-controls.log", cfg.threads))
    run_jobs(jobs, parallel, progress, "analyses")
    failed = [j for j in jobs if j.returncode != 0]
    if failed:
        raise StudyError(f"{len(failed)} analysis job(s) failed: " + "; ".join(f"{j.name}: {j.tail} (log {j.log})" for j in failed))
    for r in planned:
        weights = RunFolder(r.folder).weights_path()
        atomic_write_json(r.analysis / "study-analysis.json",
                          {**settings, "weights": str(weights), "mtime": weights.stat().st_mtime_ns})
    timing["analysis_seconds"] = round(time.time() - t1, 1)
    timing["analysis_seconds_per_job"] = {j.name: round(j.seconds, 1) for j in jobs}

    # 3. across seeds, and whether each run learned at this budget
    results = aggregate(planned, seed=0)
    from ..learning import learning_check

    checks = {}
    for r in planned:
        if r.configuration.family == "scratch":
            continue  # untrained by design: the from-scratch reference has nothing to have learned
        ent = results.runs[r.configuration.label].metrics.get("attention_entropy")
        per_seed = (ent.extra.get("per_seed") or []) if ent else []
        idx = results.runs[r.configuration.label].extra["seeds"].index(r.seed)
        checks[r.name] = learning_check(r.folder, entropy=per_seed[idx] if idx < len(per_seed) else None).to_json()
    results.meta["learning"] = checks
    if cfg.controls and (controls_dir / "results.json").is_file():
        from ..results import Results

        for name, run in Results.load(controls_dir / "results.json").runs.items():
            if run.role == "control":
                results.runs[name] = run
    results.meta["timing"] = _with_earlier_timing(root / "results.json", timing)
    results.meta["study"] = {**record, "seeds": cfg.seeds, "first_seed": cfg.first_seed}
    results.save(root / "results.json")
    atomic_write_text(root / "report.md", write_study_report(results))
    return results


def _with_earlier_timing(previous: Path, timing: dict[str, Any]) -> dict[str, Any]:
    """This invocation's timing plus what earlier invocations of the same study spent: a rerun that
    continues a study (or only re-aggregates it) keeps the times of the runs trained before."""
    try:
        old = json.loads(read_text(previous, MAX_RESULTS_BYTES)).get("timing") or {}
    except (OSError, ValueError, UserError, AttributeError):
        old = {}
    out = dict(timing)
    for key in ("train_seconds", "analysis_seconds"):
        if isinstance(old.get(key), (int, float)):
            out[key] = round(float(old[key]) + float(timing.get(key, 0.0)), 1)
    for key in ("train_seconds_per_run", "analysis_seconds_per_job"):
        if isinstance(old.get(key), dict):
            out[key] = {**{k: v for k, v in old[key].items() if isinstance(v, (int, float))}, **timing.get(key, {})}
    return out


class StudyError(UserError, RuntimeError):
    """A study step failed; the message names the runs and their logs."""
