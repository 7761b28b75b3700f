"""``rmae probe``: linear / k-NN / attentive / dense probes of one or more run folders.

Wired into the ``rmae`` command through the ``rmae.commands`` entry point
(``probe = "analysis.probe_cli:register"`` in pyproject.toml); rmae never imports this module.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .probes import DEFAULT_BATCH, DEFAULT_EPOCHS, PROBES, ProbeError, run_probe

EPILOG = """\
examples:
  rmae probe runs/mae --probe linear --data scenes:train:2000        # evaluated on scenes:val:1000
  rmae probe runs/mae runs/rmae --probe linear,knn,attentive,dense --data scenes:train:2000
  rmae probe runs/mae --probe knn --data folder:/data/imagenet/train --eval-data folder:/data/imagenet/val
  rmae probe runs/mae --probe linear --layer 6 --pool mean --data scenes:train:2000
  rmae probe runs/mae --probe linear --solver sklearn --data scenes:train:2000
  rmae probe runs/mae --probe dense --data scenes:train:1000 --epochs 30 --lrs 0.01,0.1,1

probes (score on the eval data, a fraction in [0, 1]; results.json name in brackets):
  linear     BatchNorm(affine=False) + Linear on the cls token (MAE)          accuracy [linear_probe]
  knn        weighted k-NN, cosine, k=20, T=0.07 (DINO)                       accuracy [knn]
  attentive  learned-query cross-attention over patch tokens + LN + Linear    accuracy [attentive_probe]
             (AIM)
  dense      per-patch linear classifier, logits upsampled to pixels          mIoU [dense_miou]

Features are extracted once per run, data, layer and pooling and cached in
RUN/analysis/features/ (keyed by the weights' content: retraining invalidates them), so a
second probe of the same run only trains. Every --lrs value trains its own head in the same
pass; the head best on a held-out --holdout part of the training data is scored on the eval
data. Results: RUN/analysis/probes/<probe>_<train>__<eval>_L<layer>_<pool>.json.

--eval-data defaults to scenes:val (at most as many images as the training spec names) when
--data is scenes:train; other data need --eval-data. Layers: 0..depth-1 or negative from the
end; the last block (-1) includes the encoder's final norm.
"""


def register(subparsers: Any) -> None:
    """Add ``probe`` to the ``rmae`` command's subparsers (the ``rmae.commands`` entry point)."""
    p = subparsers.add_parser(
        "probe", help="linear / k-NN / attentive / dense probes of run folders",
        description="Probe the frozen encoder of one or more run folders on the same data and "
                    "print a table (results are also written as JSON into each run folder).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) (rmae import turns any checkpoint into one)")
    p.add_argument("--probe", required=True, metavar="NAME[,NAME]",
                   help=f"one or more of {', '.join(PROBES)} (comma-separated)")
    p.add_argument("--data", required=True, metavar="SPEC", help="training data spec, e.g. scenes:train:2000")
    p.add_argument("--eval-data", metavar="SPEC", help="eval data spec (default: see below)")
    p.add_argument("--layer", type=int, default=-1, help="encoder block (default -1: last, with final norm)")
    p.add_argument("--pool", choices=("cls", "mean"),
                   help="image vector for linear/knn (default cls); attentive/dense always use patch tokens")
    g = p.add_argument_group("training (linear, attentive, dense)")
    g.add_argument("--epochs", type=int, help="epochs over the cached features (default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items()) + ")")
    g.add_argument("--lrs", metavar="LR[,LR]", help="learning-rate grid (default: sgd 1e-3…1, adamw 1e-4…1e-2)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), help="default sgd (linear, dense), adamw (attentive)")
    g.add_argument("--weight-decay", type=float, help="default 0 (sgd), 0.05 (adamw)")
    g.add_argument("--batch-size", type=int, help="minibatch (default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH.items()) + "; dense counts images)")
    g.add_argument("--holdout", type=float, default=0.2, help="fraction of training data that picks the lr (0.2)")
    g.add_argument("--solver", choices=("torch", "sklearn"), default="torch",
                   help="linear only: sklearn = LogisticRegression over a grid of C")
    g.add_argument("--C", dest="Cs", metavar="C[,C]", help="sklearn C grid (default 0.01,0.1,1,10,100)")
    g.add_argument("--attn-heads", type=int, help="attentive: attention heads (default D/64)")
    g.add_argument("--queries", type=int, default=1, help="attentive: learned queries (1)")
    g.add_argument("--upsample", choices=("bilinear", "nearest", "bicubic"), default="bilinear",
                   help="dense: how patch logits reach pixels (bilinear)")
    g.add_argument("--threads", type=int, help="intra-op threads while training (default: 1 for small steps)")
    g = p.add_argument_group("k-NN")
    g.add_argument("--k", type=int, default=20, help="neighbours (20)")
    g.add_argument("--temperature", type=float, default=0.07, help="T in exp(sim / T) (0.07)")
    g = p.add_argument_group("data and running")
    g.add_argument("--seed", type=int, default=0, help="probe seed: init, minibatches, held-out split")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the generated scenes")
    g.add_argument("--crop-pct", type=float, default=1.0, help="centre-crop fraction before resizing (1.0)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    g.add_argument("--workers", type=int, default=0, help="data-loader workers for extraction")
    g.add_argument("--extract-batch-size", type=int, default=64, help="images per encoder batch (64)")
    g.add_argument("--no-cache", action="store_true", help="extract features without reading or writing the cache")
    g.add_argument("--json", action="store_true", help="print one JSON result per line instead of a table")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=probe_command)


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ProbeError(f"{what} must be comma-separated numbers, e.g. 0.01,0.1,1; got {text!r}") from None
    if not vals:
        raise ProbeError(f"{what} is empty")
    return vals


def _probe_names(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in PROBES]
    if bad or not names:
        raise ProbeError(f"unknown probe {', '.join(bad) or repr(text)}; choose from {', '.join(PROBES)}")
    return list(dict.fromkeys(names))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Results of :func:`analysis.probes.run_probe` as an aligned text table."""
    head = ("run", "probe", "metric", "value", "chance", "best lr", "layer", "train", "eval", "cached", "s")
    body = []
    for r in rows:
        body.append((r["run"], r["probe"] + ("-sklearn" if r.get("solver") == "sklearn" else ""), r["metric"],
                     "—" if r["value"] is None else f"{r['value']:.4f}",
                     "—" if r.get("chance") is None else f"{r['chance']:.4f}",
                     "—" if r.get("best_lr") is None else (f"C={r['best_C']:g}" if "best_C" in r else f"{r['best_lr']:g}"),
                     str(r["layer"]), str(r["n_train"]), str(r["n_eval"]),
                     "yes" if r["feature_cache_hit"] else "no", f"{r['seconds']:.1f}"))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'>' if i >= 3 else '<'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])


def probe_command(args: argparse.Namespace) -> int:
    """Run every requested probe on every run; print a table (or JSON lines). Exit 0, or 2 with
    one ``rmae probe: error: …`` line on a problem the user can fix."""
    from rmae import CheckpointError
    from rmae.data import DataError

    rows = []
    try:
        names = _probe_names(args.probe)
        lrs, Cs = _floats(args.lrs, "--lrs"), _floats(args.Cs, "--C")
        for n in ("epochs", "batch_size", "k", "extract_batch_size", "queries"):
            v = getattr(args, n)
            if v is not None and v < 1:
                raise ProbeError(f"--{n.replace('_', '-')} must be at least 1, got {v}")
        if args.solver == "sklearn" and names != ["linear"]:
            raise ProbeError("--solver sklearn applies to --probe linear only")
        for run in args.runs:
            for name in names:
                r = run_probe(run, name, args.data, args.eval_data, args.layer,
                              pool=args.pool if name in ("linear", "knn") else None, solver=args.solver,
                              epochs=args.epochs, lrs=lrs, optimizer=args.optimizer,
                              weight_decay=args.weight_decay, batch_size=args.batch_size, holdout=args.holdout,
                              k=args.k, temperature=args.temperature, Cs=Cs, attn_heads=args.attn_heads,
                              num_queries=args.queries, upsample=args.upsample, seed=args.seed,
                              data_seed=args.data_seed, crop_pct=args.crop_pct, device=args.device,
                              extract_batch_size=args.extract_batch_size, num_workers=args.workers,
                              threads=args.threads, cache=not args.no_cache, progress=not args.quiet)
                rows.append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
    except (ProbeError, CheckpointError, DataError, ValueError, RuntimeError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"rmae probe: error: {msg}", file=sys.stderr)
        return 2
    if not args.json:
        print(format_table(rows))
        print(f"results: {len(rows)} JSON file(s) under RUN/analysis/probes/ "
              f"(e.g. {rows[-1]['path']})" if rows else "no results")
    return 0
