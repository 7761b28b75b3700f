"""``rmae regions …`` — the data package's part of the command line.

The CLI owner registers it with ``add_regions_subcommand(subparsers)``; the parsed namespace
carries ``func`` (call ``args.func(args)``, it returns an exit code).
"""

from __future__ import annotations

import argparse
import sys

from .base import DataError

EPILOG = """\
region sources:
  fh                 Felzenszwalb-Huttenlocher, scales 500,1000,1500 made relative to image size
  fh:500,1000,1500   FH at these scales (relative); fh:1000:abs or fh:paper = literal paper values
  slic[:16,48]       SLIC superpixels at these segment counts
  gt                 ground-truth instances (scenes, coco:…)
  panoptic           ground-truth instances + FH segments of the background
  labelmaps[:DIR]    label-map PNGs saved by you (e.g. SAM); default DIR = <images>_labelmaps

examples:
  rmae regions precompute --data scenes:train:10000 --source fh --workers 2
  rmae regions precompute --data folder:/data/imagenet/train --source fh:paper --workers 16
  rmae regions precompute --data coco:/data/coco/train2017:/data/coco/annotations/instances_train2017.json \\
      --source panoptic --cache /scratch/rmae-cache
  rmae regions precompute --data folder:/data/photos --source labelmaps:/data/sam_masks

The cache (default $RMAE_CACHE or ~/.cache/rmae/regions) is keyed by image content and source
parameters; training with the same --source and cache reads it back and computes any miss.
"""


def add_regions_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``regions precompute`` on an argparse sub-parser collection."""
    regions = subparsers.add_parser(
        "regions", help="compute and cache region maps (FH, SLIC, ground truth, label maps)",
        description="Region maps for R-MAE: compute them once and cache them on disk.",
    )
    sub = regions.add_subparsers(dest="regions_command", metavar="{precompute}")
    sub.required = True
    p = sub.add_parser(
        "precompute", help="fill the region cache for a dataset, in parallel",
        description="Compute the region maps of every image of a dataset into the cache.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="data spec: scenes[:split][:N], photos, folder:PATH, coco:IMAGES:JSON")
    p.add_argument("--source", default="fh", metavar="SOURCE",
                   help="fh | fh:S1,S2 | fh:paper | slic[:N1,N2] | gt | panoptic | "
                        "labelmaps[:DIR] (default: fh)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="cache folder (default: $RMAE_CACHE or ~/.cache/rmae/regions)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="parallel processes (default: 1)")
    p.add_argument("--image-size", type=int, default=64, metavar="PX",
                   help="resolution of generated scenes (other datasets keep theirs; default 64)")
    p.add_argument("--seed", type=int, default=0, help="scenes stream (default 0)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable file instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_precompute)
    return regions


def run_precompute(args: argparse.Namespace) -> int:
    """Run ``regions precompute`` from parsed arguments; returns the exit code."""
    from .precompute import precompute_regions

    for flag, value, low, high in (("--workers", args.workers, 1, 256), ("--image-size", args.image_size, 8, 4096),
                                   ("--limit", args.limit, 1, None)):
        if value is not None and (value < low or (high is not None and value > high)):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            print(f"rmae regions precompute: error: {flag} {value}: must be {bound}", file=sys.stderr)
            return 2
    try:
        stats = precompute_regions(args.data, args.source, args.cache, args.workers,
                                   image_size=args.image_size, seed=args.seed, limit=args.limit,
                                   strict=args.strict, progress=not args.no_progress)
    except DataError as err:
        print(f"rmae regions precompute: error: {err}", file=sys.stderr)
        return 2
    print(stats)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m rmae.data.cli regions precompute …``)."""
    parser = argparse.ArgumentParser(prog="rmae")
    add_regions_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
