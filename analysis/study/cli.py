"""``rmae study`` (an ``rmae.commands`` plugin; rmae never imports this)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rmae.settings import ConfigError, add_arguments, build, fields_of, keys_help, parse_overrides

from .study import StudyConfig

EPILOG = """\
examples:
  rmae study --config study --out studies/paper --seeds 3 --families mae,rmae,rae,scratch \\
      --grid rmae:region_source=fh,gt          # the paper's comparison (FAMILY: limits an axis)
  rmae study --config study --out studies/k --seeds 3 --families rmae --grid num_regions=1,8
  rmae study --config study --out studies/variants --families rmae --grid region_variant=length,batch,channel
  rmae study --config demo --out studies/quick --seeds 2 steps=50 probes=linear   # any training key too

Every (configuration, seed) trains into studies/NAME/runs/<label>-s<seed>; rerunning the same command
continues: finished runs are skipped, killed runs resume. Every run is then analysed on the same images
(studies/NAME/analysis/), and studies/NAME/results.json + report.md give each metric across seeds (mean,
interval over seeds with images nested, per-seed values), seed-paired differences between configurations
("better"/"worse" only with ≥ 2 seeds per side), the controls, and the paper's claims as reproduced /
not reproduced / undecided at this budget.

key=value: the study settings below, or any training key / model keyword of the preset (steps=…).
study settings:
"""


def register(sub) -> None:
    p = sub.add_parser(
        "study", help="train several seeds of several configurations, analyse them alike, report across seeds",
        description="A study across seeds: the evidence a method comparison needs.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG + keys_help(StudyConfig))
    p.add_argument("--config", default="study", help="training preset or YAML (default: the study preset)")
    p.add_argument("--out", required=True, help="study folder, e.g. studies/NAME")
    p.add_argument("--grid", action="append", metavar="[FAMILY:]KEY=V1,V2",
                   help="an axis of the study (repeatable); FAMILY: limits it to one family")
    p.add_argument("--no-progress", action="store_true")
    add_arguments(p, StudyConfig, flags=("seeds", "families", "parallel", "eval_data"))
    p.set_defaults(func=run)


def run(args) -> int:
    from .study import run_study

    words = parse_overrides(args.overrides or [])
    study_keys = set(fields_of(StudyConfig))
    study_values = {k: v for k, v in words.items() if k in study_keys}
    for key in study_keys:
        raw = getattr(args, f"setting__{key}", None)
        if raw is not None:
            study_values[key] = parse_overrides([f"{key}={raw}"])[key]
    cfg = build(StudyConfig, study_values, "study settings")
    train = {k: v for k, v in words.items() if k not in study_keys}
    results = run_study(args.config, args.out, cfg, args.grid, train, progress=not args.no_progress)
    out = Path(args.out)
    if results is None:
        print(f"trained {out / 'runs'} (analysis skipped: analyze=false)")
        return 0
    print(f"study {out}: {len(results.run_names('configuration'))} configurations × {cfg.seeds} seeds")
    print(f"  report:  {out / 'report.md'}\n  results: {out / 'results.json'}")
    return 0


__all__ = ["ConfigError", "register", "run"]
