"""``rmae analyze`` (wired through the ``rmae.commands`` entry point; rmae never imports this)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rmae.settings import add_arguments, from_args, keys_help

from .analyze import AnalyzeConfig

EPILOG = """\
examples:
  rmae analyze runs/demo-mae runs/demo-rmae --data scenes:val:200 --out reports/demo
  rmae analyze runs/mae runs/rmae runs/rae --data scenes:val:500 --out reports/k8 --probes linear,knn
  rmae analyze runs/mae-official runs/rmae-official --out reports/coco --probes none \\
      --data coco:/coco/val2017:/coco/annotations/instances_val2017.json
  rmae analyze runs/mae runs/rmae --data scenes:val:100 --out reports/quick --probes none --clicks 1,4,16
  rmae analyze runs/mae runs/rmae --out reports/gpu device=cuda precision=bf16
  rmae analyze runs/mae runs/rmae --out reports/controls --controls --probes none   # with null and ceiling
  rmae analyze runs/mae runs/rmae --out reports/views attributions=8 feature_maps=0,6,-1 embedding=umap

writes OUT/results.json, OUT/report.md, OUT/per_layer.csv, OUT/summary.csv, OUT/differences.csv and
OUT/figures/ (per-layer curves PNG + HTML, attention overlays, interactive curves, CKA, attributions_<run>.png,
feature_pca_<layer>.png, embedding_2d.png — see the attributions, feature_maps and embedding settings). The first MAE
run is the reference: differences read "run − reference", paired over the same images, and describe
these checkpoints; a method comparison needs seeds (rmae study). What the data cannot support (no
instance masks, no labels for probes) is skipped and named in the report.

settings (flags above, or key=value):
"""

FLAGS = ("data", "batch_size", "probes", "probe_train", "clicks", "interactive_images", "negative_clicks",
         "interactive_image", "seed", "device", "precision")


def register(sub) -> None:
    p = sub.add_parser(
        "analyze", help="compare runs: attention, instance-awareness, probes, interactive segmentation → report",
        description="Compute every analysis on the same images for each run and write a report with "
                    "bootstrap 95 % intervals and run − reference differences.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG + keys_help(AnalyzeConfig))
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or checkpoints rmae can load)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--no-cka", action="store_true", help="skip the layer × layer CKA (same as cka=false)")
    p.add_argument("--controls", action="store_true",
                   help="also analyse the controls (content-free, local, random-init, oracle): where each metric's "
                        "null and ceiling lie (same as controls=true)")
    p.add_argument("--no-progress", action="store_true")
    add_arguments(p, AnalyzeConfig, flags=FLAGS)
    p.set_defaults(func=run)


def run(args) -> int:
    from .analyze import analyze

    switches = {**({"cka": False} if args.no_cka else {}), **({"controls": True} if args.controls else {})}
    cfg = from_args(AnalyzeConfig, args, "analyze settings", defaults=switches)
    results = analyze(args.runs, cfg, args.out, progress=not args.no_progress)
    out = Path(args.out)
    print(f"analysed {len(results.runs)} run(s) on {results.n_images} images of {results.data} "
          f"in {results.meta.get('seconds', 0):.0f} s")
    for key, why in (results.meta.get("skipped") or {}).items():
        print(f"  not measured: {key} — {why}")
    print(f"  report:  {out / 'report.md'}\n  results: {out / 'results.json'}\n  figures: {out / 'figures'}")
    return 0


def demo_hook(runs: dict[str, Path], out: Path) -> list[str]:
    """Called by ``rmae demo`` after training: compare the demo runs. Returns lines to print."""
    from .analyze import analyze

    report = out / "reports" / "demo"
    results = analyze([runs["mae"], runs["rmae"]], AnalyzeConfig(data="scenes:val:200", probes=("linear", "knn", "dense"),
                                                                 probe_train="scenes:train:1000", interactive_images=100),
                      report, progress=True)
    lines = [f"comparison: {report / 'report.md'}"]
    diff = next(iter(results.differences.values()), {})
    # the locality-corrected instance metric first: mass, leak and Jaccard reward locality alone
    for key in ("instance_selectivity", "cls_jaccard", "corloc", "attention_distance", "instance_mass"):
        e = diff.get(key)
        if e is not None and e.value is not None:
            lo, hi = e.ci or (float("nan"), float("nan"))
            lines.append(f"  R-MAE − MAE {key} (these two checkpoints): {e.value:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return lines
