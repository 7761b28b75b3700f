"""Data-pipeline benchmark: is the data side fast enough to feed R-MAE training on this machine?

    .venv/bin/python benchmarks/bench_data.py [--quick]

Measures (wall clock, this machine, whatever else is running — the load average is printed):
scenes generation rate; FH and SLIC cost per image at 64² and 224²; region-cache hit vs compute;
``precompute_regions`` with 2 processes vs 1; the DataLoader (2 workers, k = 8, 64²) rate with a
warm cache and without a cache, against one ViT-Tiny/8 R-MAE training step at 64²; and the
training loop fed by that loader end to end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rmae.data import (  # noqa: E402
    FelzenszwalbSource,
    RegionCache,
    RegionDataset,
    RegionLoader,
    ScenesDataset,
    SlicSource,
    build_dataset,
    precompute_regions,
)

ROWS: list[tuple[str, str, str]] = []


def row(name: str, value: str, target: str = "") -> None:
    ROWS.append((name, value, target))
    print(f"  {name:<52} {value:>16}  {target}", flush=True)


def per_item(fn, items, repeat: int = 1) -> float:
    """Median seconds per item over ``repeat`` passes."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for it in items:
            fn(it)
        times.append((time.perf_counter() - t) / len(items))
    return statistics.median(times)


def bench_scenes(n64: int, n224: int) -> None:
    for size, n in ((64, n64), (224, n224)):
        ds = ScenesDataset("train", size=size)
        ds.prepare()
        ds[0]
        s = per_item(lambda i: ds[i], range(1, n + 1))
        row(f"scenes generation {size}² (1 process)", f"{1 / s:,.0f} img/s",
            "target: thousands/s at 64²" if size == 64 else "")


def bench_sources(n64: int, n224: int) -> dict[int, list[dict]]:
    samples = {}
    for size, n in ((64, n64), (224, n224)):
        ds = ScenesDataset("val", size=size)
        samples[size] = [ds[i] for i in range(n)]
    for size in (64, 224):
        fh = FelzenszwalbSource()
        scales = ", ".join(f"{s:.0f}" for s in fh.effective_scales(size, size))
        s = per_item(fh.compute, samples[size])
        row(f"FH {size}², 3 scales ({scales})", f"{s * 1e3:.1f} ms/img")
        one = FelzenszwalbSource((1000,))
        s = per_item(one.compute, samples[size])
        row(f"FH {size}², 1 scale", f"{s * 1e3:.1f} ms/img")
        s = per_item(SlicSource().compute, samples[size])
        row(f"SLIC {size}², 2 scales (16, 48 segments)", f"{s * 1e3:.1f} ms/img")
    return samples


def bench_cache(samples: dict[int, list[dict]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        cache = RegionCache(d)
        src = FelzenszwalbSource()
        for size in (64, 224):
            items = samples[size]
            miss = per_item(lambda s: src(s, cache), items)  # compute + write
            hit = per_item(lambda s: src(s, cache), items, repeat=3)  # key + read
            row(f"FH cache {size}²: miss (compute+write) / hit",
                f"{miss * 1e3:.1f} / {hit * 1e3:.2f} ms", "")
            row(f"FH cache {size}²: hit speed-up over computing", f"{miss / hit:.0f}x",
                "target ≥ 20x")


def bench_precompute(n: int) -> None:
    times = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            st = precompute_regions(f"scenes:train:{n}", "fh", d, workers=workers,
                                    progress=False)
            assert st.computed == n, st
            times[workers] = st.seconds
            row(f"precompute FH, {n} scenes 64², {workers} process(es)",
                f"{n / st.seconds:,.0f} img/s")
    row("precompute speed-up, 2 processes vs 1", f"{times[1] / times[2]:.2f}x", "target ≥ 1.6x")


def make_model():
    try:
        import rmae

        model = rmae.create_model("rmae_vit_tiny_patch8", img_size=64, num_regions=8)

        def step(images, regions):
            out = model(images, regions=regions)
            out.loss.backward()

        return model, step, "rmae.create_model('rmae_vit_tiny_patch8', img_size=64, num_regions=8)"
    except (ImportError, AttributeError) as err:  # engine not there yet: timm stand-in
        import timm

        model = timm.create_model("vit_tiny_patch16_224", patch_size=8, img_size=64,
                                  num_classes=0)

        def step(images, regions):
            model(images).float().pow(2).mean().backward()

        return model, step, f"timm vit_tiny patch 8 fwd+bwd (rmae.create_model missing: {err})"


def bench_training(n_images: int, batch: int, model_steps: int) -> None:
    base = build_dataset(f"scenes:train:{n_images}", image_size=64)
    with tempfile.TemporaryDirectory() as d:
        precompute_regions(base, "fh", d, workers=2, progress=False)
        rates = {}
        for label, cache in (("warm cache", d), ("no cache: FH on the fly", None)):
            ds = RegionDataset(base, source="fh", cache=cache, num_regions=8, image_size=64)
            loader = RegionLoader(ds, batch_size=batch, num_workers=2, seed=0)
            it = iter(loader)
            next(it)  # worker start-up is not throughput
            t = time.perf_counter()
            n = 0
            for b in it:
                n += b["images"].shape[0]
            rates[label] = n / (time.perf_counter() - t)
            row(f"DataLoader 2 workers, k=8, 64², {label}", f"{rates[label]:,.0f} img/s")

        model, step, what = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ds = RegionDataset(base, source="fh", cache=d, num_regions=8, image_size=64)
        fixed = next(iter(RegionLoader(ds, batch_size=batch, num_workers=0)))
        images, regions = fixed["images"], fixed["regions"]

        def train_step(images, regions):
            step(images, regions)
            opt.step()
            opt.zero_grad(set_to_none=True)

        train_step(images, regions)  # warm-up
        t = time.perf_counter()
        for _ in range(model_steps):
            train_step(images, regions)
        model_rate = model_steps * batch / (time.perf_counter() - t)
        row(f"ViT-Tiny/8 R-MAE train step 64², batch {batch}", f"{model_rate:,.0f} img/s",
            "(model alone, fixed batch)")
        print(f"    model: {what}")
        row("loader (warm cache) / model rate", f"{rates['warm cache'] / model_rate:.1f}x",
            "≥ 1 ⇒ data keeps up")

        loader = RegionLoader(ds, batch_size=batch, num_workers=2, seed=1)
        it = loader.forever()
        b = next(it)  # worker start-up
        train_step(b["images"], b["regions"])
        t = time.perf_counter()
        for _ in range(model_steps):
            b = next(it)
            train_step(b["images"], b["regions"])
        e2e = model_steps * batch / (time.perf_counter() - t)
        row("train loop fed by loader (2 workers, warm cache)", f"{e2e:,.0f} img/s",
            f"{e2e / model_rate:.0%} of model alone")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images (noisier)")
    args = ap.parse_args()
    q = args.quick
    print(f"rmae data benchmark — {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    bench_scenes(500 if q else 2000, 50 if q else 200)
    samples = bench_sources(20 if q else 60, 8 if q else 24)
    bench_cache(samples)
    bench_precompute(120 if q else 400)
    bench_training(512 if q else 1024, 64, 3 if q else 6)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end\n")
    w = max(len(r[0]) for r in ROWS)
    print(f"| {'measure':<{w}} | {'value':>16} | note |")
    print(f"|{'-' * (w + 2)}|{'-' * 18}|------|")
    for name, value, target in ROWS:
        print(f"| {name:<{w}} | {value:>16} | {target} |")


if __name__ == "__main__":
    main()
