"""Study throughput: the same small runs scheduled as one-thread parallel jobs (what `rmae study`
does) against one after another with torch's default threads; and the share of a study's time
spent analysing.

    .venv/bin/python benchmarks/bench_study.py              # ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_study.py --runs 4 --steps 40

1. runs per hour: N trainings of the demo model (ViT-Tiny/8, 64²) for S steps each,
   (a) sequentially, each process with the default intra-op threads (all cores),
   (b) `parallel = cores` one-thread processes (analysis.study.runner.run_jobs);
2. a whole tiny `rmae study` (2 families × 2 seeds): wall time of training and of analysis, and
   the share of the study spent in analysis.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from analysis.study.runner import Job, rmae_command, run_jobs


def train_args(out: Path, seed: int, steps: int, cache: Path) -> list[str]:
    return rmae_command("pretrain", "--config", "demo", "--out", str(out), "--no-progress", "model=mae_vit_tiny_patch8",
                        f"seed={seed}", f"steps={steps}", f"checkpoint_every={steps}", "figure_every=0",
                        "num_workers=0", "data=scenes:train:1024", f"region_cache={cache}")


def sequential(root: Path, n: int, steps: int, cache: Path) -> float:
    t0 = time.time()
    for i in range(n):
        subprocess.run(train_args(root / f"seq{i}", i, steps, cache), check=True, capture_output=True)
    return time.time() - t0


def parallel(root: Path, n: int, steps: int, cache: Path, jobs: int) -> float:
    t0 = time.time()
    done = run_jobs([Job(f"par{i}", train_args(root / f"par{i}", i, steps, cache), root / f"par{i}.log", threads=1)
                     for i in range(n)], jobs, progress=False)
    assert all(j.returncode == 0 for j in done), [j.tail for j in done]
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="rmae-bench-study-"))
    cache = root / "cache"
    try:
        print(f"1. {args.runs} trainings × {args.steps} steps (ViT-Tiny/8 MAE, 64², batch 64), {cores} cores")
        seq = sequential(root, args.runs, args.steps, cache)
        par = parallel(root, args.runs, args.steps, cache, cores)
        print(f"  one after another, default threads: {seq:7.1f} s  → {3600 * args.runs / seq:6.1f} runs/hour")
        print(f"  {cores} one-thread jobs at a time:    {par:7.1f} s  → {3600 * args.runs / par:6.1f} runs/hour")
        print(f"  parallel / sequential throughput: {seq / par:.2f}×")

        print("\n2. a tiny study (mae, rmae × 2 seeds, 40 steps, 64 eval images, linear probe)")
        out = root / "study"
        t0 = time.time()
        subprocess.run(rmae_command("study", "--config", "demo", "--out", str(out), "--seeds", "2", "--families",
                                    "mae,rmae", "--no-progress", "steps=40", "checkpoint_every=40", "figure_every=0",
                                    "data=scenes:train:1024", "eval_data=scenes:val:64", "probes=linear",
                                    "probe_train=scenes:train:256", "clicks=1,2", "controls=false",
                                    f"region_cache={cache}"), check=True, capture_output=True)
        wall = time.time() - t0
        timing = json.loads((out / "results.json").read_text())["timing"]
        train, analysis = timing["train_seconds"], timing["analysis_seconds"]
        print(f"  wall {wall:.0f} s: training {train:.0f} s, analysis {analysis:.0f} s "
              f"({100 * analysis / (train + analysis):.0f} % of the study in analysis)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
