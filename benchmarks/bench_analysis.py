"""Analysis throughput, memory over a long stream, and the value of the feature cache.

    .venv/bin/python benchmarks/bench_analysis.py             # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_analysis.py --images 300

1. images/s of attention extraction + every attention metric (distance, entropy, NMI,
   instance-awareness, CLS Jaccard, TokenCut CorLoc) at ViT-Tiny/8 64² and ViT-B/16 224²,
   against the bare forward pass of the same encoder (ratio printed);
2. resident memory while streaming N scenes (default 1,000) through the same analysis: sampled
   every 100 images; it must stay flat (only per-image scalars are kept);
3. linear probe, first run (feature extraction + training) vs second run (cache hit).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import rmae
from analysis.analyze import attention_metrics
from rmae.data import evaluation_loader


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def loader(size: int, n: int, batch: int):
    return evaluation_loader(f"scenes:val:{n}", size, batch_size=batch)


def throughput(name: str, size: int, n: int, batch: int) -> None:
    model = rmae.create_model(name, img_size=size).eval()
    batches = list(loader(size, n, batch))
    with torch.no_grad():
        model.forward_features(batches[0]["images"])
        t = time.perf_counter()
        for b in batches:
            model.forward_features(b["images"])
        bare = n / (time.perf_counter() - t)
    t = time.perf_counter()
    attention_metrics({"m": model}, batches)
    full = n / (time.perf_counter() - t)
    print(f"{name:<24}{size:>5}²{bare:>12.1f}{full:>14.1f}{full / bare:>9.3f}")


class Sampled:
    """Wrap a loader and record RSS every ``every`` images."""

    def __init__(self, inner, every: int = 100):
        self.inner, self.every, self.samples = inner, every, []

    def __iter__(self):
        seen = 0
        for b in self.inner:
            yield b
            seen += b["images"].shape[0]
            if seen % self.every < b["images"].shape[0]:
                self.samples.append((seen, rss_mb()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
    print("1. attention + all attention metrics vs bare forward (images/s)")
    print(f"{'model':<24}{'img':>6}{'forward':>12}{'+ metrics':>14}{'ratio':>9}")
    throughput("rmae_vit_tiny_patch8", 64, 256, 32)
    throughput("rmae_vit_base_patch16", 224, 16, 8)

    print(f"\n2. resident memory while streaming {args.images} images (ViT-Tiny/8 64², batch 32)")
    model = rmae.create_model("rmae_vit_tiny_patch8", img_size=64).eval()
    sampled = Sampled(loader(64, args.images, 32))
    attention_metrics({"m": model}, sampled)
    for seen, mb in sampled.samples:
        print(f"  after {seen:>5} images: {mb:8.1f} MB")
    first, last = sampled.samples[1][1], sampled.samples[-1][1]  # skip the allocator's first growth
    print(f"  growth from {sampled.samples[1][0]} to {sampled.samples[-1][0]} images: {last - first:+.1f} MB")

    print("\n3. feature cache: linear probe, first vs second run (ViT-Tiny/8 64², 400 train / 200 val)")
    from analysis.probes import ProbeConfig, run_probe
    from rmae.runfolder import RunFolder

    run = RunFolder(Path(tempfile.mkdtemp(prefix="rmae-bench-analysis-")) / "run").create("import")
    run.write_config({"model": model.config.name}, model.config.to_dict())
    rmae.save_model(model, run.model_path)
    probe = ProbeConfig(probe="linear", data="scenes:train:400", eval_data="scenes:val:200", device="cpu")
    t = time.perf_counter()
    a = run_probe(run.root, probe, progress=False)
    first = time.perf_counter() - t
    t = time.perf_counter()
    b = run_probe(run.root, probe, progress=False)
    second = time.perf_counter() - t
    assert b["feature_cache_hit"] and a["value"] == b["value"]
    print(f"  first {first:.2f} s, second {second:.2f} s (cache hit): {first / second:.1f}× faster")


if __name__ == "__main__":
    main()
