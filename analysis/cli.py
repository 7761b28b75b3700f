"""``rmae analyze`` (wired through the ``rmae.commands`` entry point; rmae never imports this)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
examples:
  rmae analyze runs/demo-mae runs/demo-rmae --data scenes:val:200 --out reports/demo
  rmae analyze runs/mae runs/rmae runs/rae --data scenes:val:500 --out reports/k8 --probes linear,knn
  rmae analyze runs/mae-official runs/rmae-official --data coco:/coco/val2017:/coco/annotations/instances_val2017.json \\
      --out reports/coco --probes none
  rmae analyze runs/mae runs/rmae --data scenes:val:100 --out reports/quick --probes none --clicks 1,4,16

writes OUT/results.json, OUT/report.md, OUT/per_layer.csv, OUT/summary.csv, OUT/differences.csv and
OUT/figures/ (per-layer curves PNG + HTML, attention overlays, interactive curves, CKA).
The first MAE run is the reference: differences read "run − reference", paired over the same images.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "analyze", help="compare runs: attention, instance-awareness, probes, interactive segmentation → report",
        description="Compute every analysis on the same images for each run and write a report with "
                    "bootstrap 95 % intervals and run − reference differences.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or checkpoints rmae can load)")
    p.add_argument("--data", default="scenes:val:200", help="evaluation images (default scenes:val:200)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--probes", default="linear,knn,attentive,dense",
                   help="comma-separated subset of linear,knn,attentive,dense, or 'none'")
    p.add_argument("--probe-train", help="training data for probes (default: scenes:train of twice the eval size)")
    p.add_argument("--clicks", default="1,2,4,8,16", help="click counts for interactive segmentation ('' = skip)")
    p.add_argument("--interactive-images", type=int, default=None, help="limit images for interactive segmentation")
    p.add_argument("--negative-clicks", type=int, default=0,
                   help="patches outside the instance also visible in interactive segmentation (default 0)")
    p.add_argument("--interactive-image", choices=["all", "clicks"], default="all",
                   help="what the pixel encoder sees during interactive segmentation (default: the whole image)")
    p.add_argument("--no-cka", action="store_true", help="skip the layer × layer CKA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from rmae.checkpoint import CheckpointError
    from rmae.data import DataError

    from .report import AnalysisError, analyze

    probes = [] if args.probes.strip().lower() in ("", "none") else [s.strip() for s in args.probes.split(",")]
    try:
        clicks = [int(c) for c in args.clicks.split(",") if c.strip()]
    except ValueError:
        print(f"rmae analyze: error: --clicks must be integers like 1,2,4, got {args.clicks!r}", file=sys.stderr)
        return 2
    try:
        from .probes import ProbeError
    except ImportError:  # pragma: no cover - probes are part of the package
        ProbeError = AnalysisError
    try:
        results = analyze(args.runs, args.data, args.out, batch_size=args.batch_size, probes=probes,
                          probe_train=args.probe_train, clicks=clicks, interactive_images=args.interactive_images,
                          negative_clicks=args.negative_clicks, interactive_image=args.interactive_image,
                          cka=not args.no_cka, seed=args.seed, device=args.device, progress=not args.no_progress)
    except (AnalysisError, CheckpointError, DataError, ProbeError) as e:
        print(f"rmae analyze: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"analysed {len(results['runs'])} run(s) on {results['n_images']} images of {results['data']} "
          f"in {results['seconds']:.0f} s")
    print(f"  report:  {out / 'report.md'}\n  results: {out / 'results.json'}\n  figures: {out / 'figures'}")
    return 0


def demo_hook(runs: dict[str, Path], out: Path) -> list[str]:
    """Called by ``rmae demo`` after training: compare the demo runs. Returns lines to print."""
    from .report import analyze

    report = out / "reports" / "demo"
    results = analyze([runs["mae"], runs["rmae"]], "scenes:val:200", report, probes=("linear", "knn", "dense"),
                      probe_train="scenes:train:1000", interactive_images=100, progress=True)
    lines = [f"comparison: {report / 'report.md'}"]
    diff = next(iter(results["differences"].values()), {})
    for key in ("instance_mass", "instance_leak", "instance_jaccard", "attention_distance"):
        if key in diff and diff[key].get("value") is not None:
            lo, hi = diff[key]["ci"] or (float("nan"), float("nan"))
            lines.append(f"  R-MAE − MAE {key} (last layer): {diff[key]['value']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return lines
