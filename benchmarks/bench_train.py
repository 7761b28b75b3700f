"""Overhead of the training loop over a bare forward + backward + AdamW loop of the same model.

    .venv/bin/python benchmarks/bench_train.py            # demo preset shapes: ViT-Tiny/8, 64², batch 64
    .venv/bin/python benchmarks/bench_train.py --steps 40

Three rates per family (MAE, R-MAE), measured in this run, after warm-up steps:
  bare      the model's step on tensors already in memory (the ceiling);
  loop      `rmae.train.pretrain` with its data replaced by the same in-memory batches — the
            loop's own cost: schedule, per-step noise, loss checks, logging, metrics.jsonl,
            progress bar and checkpoints (every 20 steps here);
  pipeline  `rmae.train.pretrain` end to end on scenes with FH regions from a warm cache and 2
            DataLoader workers — what a user gets; on 2 cores the workers compete with the model.
Target: loop ≥ 0.90 × bare (≤ 10 % overhead).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import rmae
from rmae.train import load_config, pretrain
from rmae.train import trainer as trainer_mod


def bare_rate(cfg, batches, steps: int, warmup: int = 3) -> float:
    torch.manual_seed(0)
    model = rmae.create_model(cfg.model, **cfg.model_args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    L = model.num_patches
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        b = batches[i % len(batches)]
        out = model(b["images"], regions=b.get("regions"), noise=torch.rand(b["images"].shape[0], L))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def loop_rate(cfg, out: Path, batches=None, warmup: int = 3) -> float:
    original = trainer_mod._batches
    if batches is not None:  # the same loop, fed from memory
        def in_memory(ds, plan, start_step, num_workers):
            i = start_step
            while True:
                yield 0, batches[i % len(batches)]
                i += 1
        trainer_mod._batches = in_memory
    try:
        pretrain(cfg, out, progress=True)
    finally:
        trainer_mod._batches = original
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > warmup]
    span = timed[-1]["time"] - records[[r["step"] for r in records].index(warmup)]["time"]
    return (timed[-1]["step"] - warmup) * cfg.batch_size / span


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rmae-bench-train-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'family':<8}{'bare img/s':>12}{'loop img/s':>12}{'loop/bare':>11}{'pipeline img/s':>16}{'pipeline/bare':>15}")
    for family in ("mae", "rmae"):
        common = [f"model={family}_vit_tiny_patch8", f"steps={args.steps + 3}", "log_every=1", "checkpoint_every=20",
                  "figure_every=0", f"region_cache={tmp / 'cache'}", "data=scenes:train:1024", "num_workers=2"]
        cfg = load_config("demo", common)
        # in-memory batches from the real pipeline (and a warm region cache for the pipeline run)
        model = rmae.create_model(cfg.model, **cfg.model_args)
        ds = trainer_mod.build_train_dataset(cfg, model)
        from rmae.data import collate_regions

        batches = [collate_regions([ds[j] for j in range(i * cfg.batch_size, (i + 1) * cfg.batch_size)]) for i in range(4)]
        for j in range(len(ds)):  # warm the cache for the pipeline run
            ds[j]
        bare = bare_rate(cfg, batches, args.steps)
        loop = loop_rate(cfg, tmp / f"{family}-loop", batches)
        pipe = loop_rate(cfg, tmp / f"{family}-pipe")
        print(f"{family:<8}{bare:>12.1f}{loop:>12.1f}{loop / bare:>11.3f}{pipe:>16.1f}{pipe / bare:>15.3f}")


if __name__ == "__main__":
    main()
