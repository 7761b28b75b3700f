"""``rmae probe``: linear / k-NN / attentive / dense probes of one or more run folders.

Wired into the ``rmae`` command through the ``rmae.commands`` entry point
(``probe = "analysis.probes.cli:register"`` in pyproject.toml); rmae never imports this module.
Every setting is a :class:`~analysis.probes.config.ProbeConfig` field, given as a ``--flag`` or
as ``key=value`` and parsed by :mod:`rmae.settings`; errors are ``rmae.errors.UserError`` s,
which the ``rmae`` command prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from typing import Any

from rmae.settings import add_arguments, fields_of, from_args, keys_help

from .config import TOKEN_PROBES, ProbeConfig, ProbeError
from .run import run_probe

EPILOG = """\
examples:
  rmae probe runs/mae --probe linear --data scenes:train:2000        # evaluated on scenes:val:1000
  rmae probe runs/mae runs/rmae --probe linear,knn,attentive,dense --data scenes:train:2000
  rmae probe runs/mae --probe knn --data folder:/data/imagenet/train --eval-data folder:/data/imagenet/val
  rmae probe runs/mae --probe linear --layer 6 --pool mean --data scenes:train:2000
  rmae probe runs/mae --probe linear --solver sklearn --data scenes:train:2000
  rmae probe runs/mae --probe dense --data scenes:train:1000 --epochs 30 --lrs 0.01,0.1,1
  rmae probe runs/mae --probe attentive --data scenes:train:1000 epochs=20 device=cpu

probes (score on the eval data, a fraction in [0, 1]; results.json name in brackets):
  linear     BatchNorm(affine=False) + Linear on the cls token (MAE)          accuracy [linear_probe]
  knn        weighted k-NN, cosine, k=20, T=0.07 (DINO)                       accuracy [knn]
  attentive  AIM-style learned-query cross-attention over patch tokens,       accuracy [attentive_probe]
             then LayerNorm + Linear (AIM's head has no value bias and no LayerNorm)
  dense      per-patch linear classifier, logits upsampled to pixels          mIoU [dense_miou]

Features are extracted once per run, data, layer and pooling and cached in
RUN/analysis/features/ (keyed by the weights' content: retraining invalidates them), so a
second probe of the same run only trains. Every --lrs value trains its own head in the same
pass; the head best on a held-out --holdout part of the training data is scored on the eval
data. Results: RUN/analysis/probes/<probe>_<train>__<eval>_L<layer>_<pool>.json.

--eval-data defaults to scenes:val (at most as many images as the training spec names) when
--data is scenes:train; other data need --eval-data. Layers: 0..depth-1 or negative from the
end; the last block (-1) includes the encoder's final norm. --pool applies to linear and knn;
attentive and dense always read the patch tokens. Lists (--probe, --lrs, --C) are
comma-separated (lrs=0.01,0.1) or YAML ([0.01, 0.1]).

settings (key=value; the flags above set the same keys):
"""

FLAGS = ("probe", "data", "eval_data", "layer", "pool", "solver", "epochs", "lrs", "optimizer", "weight_decay",
         "batch_size", "holdout", "Cs", "attn_heads", "num_queries", "upsample", "threads", "k", "temperature",
         "seed", "data_seed", "crop_pct", "device", "num_workers", "extract_batch_size")
SOURCE = "probe settings"


def register(subparsers: Any) -> None:
    """Add ``probe`` to the ``rmae`` command's subparsers (the ``rmae.commands`` entry point)."""
    p = subparsers.add_parser(
        "probe", help="linear / k-NN / attentive / dense probes of run folders",
        description="Probe the frozen encoder of one or more run folders on the same data and "
                    "print a table (results are also written as JSON into each run folder).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG + keys_help(ProbeConfig))
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) (rmae import turns any checkpoint into one)")
    add_arguments(p, ProbeConfig, flags=FLAGS)
    p.add_argument("--no-cache", dest="setting__cache", action="store_const", const=False, default=None,
                   help="extract features without reading or writing the cache (cache=false)")
    p.add_argument("--json", action="store_true", help="print one JSON result per line instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=probe_command)


# ---------------------------------------------------------------------------------------------
# from the command line to ProbeConfigs


def _key(word: str) -> str:
    return word.partition("=")[0].strip()


def _split_words(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(run folders, key=value overrides). argparse gives ``RUN key=value`` words that come
    before the first option to the runs: a word whose key is a setting is an override."""
    keys = fields_of(ProbeConfig)
    runs = [w for w in args.runs if "=" not in w or _key(w) not in keys]
    return runs, [w for w in args.runs if w not in runs] + list(args.overrides or [])


def probe_configs(args: argparse.Namespace) -> list[ProbeConfig]:
    """One :class:`ProbeConfig` per requested probe (``--probe linear,knn``), from parsed
    ``rmae probe`` arguments; every other setting is typed by :func:`rmae.settings.from_args`
    (which also reads comma lists such as ``--lrs 0.01,0.1``). ``pool`` is the setting of the
    probes that pool (linear, knn); the token probes (attentive, dense) read the patch tokens
    whatever it says."""
    ns = copy.copy(args)
    probe_words = [w for w in ns.overrides if _key(w) == "probe"]
    ns.overrides = [w for w in ns.overrides if _key(w) != "probe"]
    raw = ns.setting__probe or (probe_words[-1].partition("=")[2] if probe_words else "")
    names = [n.strip() for n in str(raw).strip().strip("[]").split(",") if n.strip()]
    if not names:
        raise ProbeError("give the probe(s) to run: --probe NAME[,NAME] (linear, knn, attentive, dense)")
    if ns.setting__data is None and not any(_key(w) == "data" for w in ns.overrides):
        raise ProbeError("give the training data: --data SPEC (e.g. scenes:train:2000)")
    configs = []
    for name in dict.fromkeys(n.lower() for n in names):
        one = copy.copy(ns)
        one.setting__probe = name  # the flag wins over any probe= word (rmae.settings.from_args)
        if name in TOKEN_PROBES:
            one.setting__pool = None
            one.overrides = [w for w in ns.overrides if _key(w) != "pool"]
        configs.append(from_args(ProbeConfig, one, SOURCE))
    return configs


# ---------------------------------------------------------------------------------------------
# the command


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Results of :func:`analysis.probes.run_probe` as an aligned text table."""
    head = ("run", "probe", "metric", "value", "chance", "best lr", "layer", "train", "eval", "cached", "s")
    body = []
    for r in rows:
        body.append((r["run"], r["probe"] + ("-sklearn" if r.get("solver") == "sklearn" else ""), r["metric"],
                     "—" if r["value"] is None else f"{r['value']:.4f}",
                     "—" if r.get("chance") is None else f"{r['chance']:.4f}",
                     f"C={r['best_C']:g}" if r.get("best_C") is not None
                     else "—" if r.get("best_lr") is None else f"{r['best_lr']:g}",
                     str(r["layer"]), str(r["n_train"]), str(r["n_eval"]),
                     "yes" if r["feature_cache_hit"] else "no", f"{r['seconds']:.1f}"))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'>' if i >= 3 else '<'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])


def probe_command(args: argparse.Namespace) -> int:
    """Run every requested probe on every run; print a table (or JSON lines). Problems the user
    can fix raise ``UserError`` s, which the ``rmae`` command prints as one line (exit 2)."""
    runs, overrides = _split_words(args)
    if not runs:
        raise ProbeError("give at least one run folder: rmae probe RUN --probe NAME --data SPEC")
    configs = probe_configs(argparse.Namespace(**{**vars(args), "overrides": overrides}))
    rows = []
    for run in runs:
        for cfg in configs:
            r = run_probe(run, cfg, progress=not args.quiet)
            rows.append(r)
            if args.json:
                print(json.dumps(r), flush=True)
    if not args.json:
        print(format_table(rows))
        print(f"results: {len(rows)} JSON file(s) under RUN/analysis/probes/ (e.g. {rows[-1]['path']})")
    return 0
