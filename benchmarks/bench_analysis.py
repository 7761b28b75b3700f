"""Analysis throughput against the bare forward, peak memory at real sizes, memory over a long
stream, and the value of the feature cache.

    .venv/bin/python benchmarks/bench_analysis.py             # ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_analysis.py --images 300 --threads 2

1. images/s of the analysis pass (explicit-attention forward + every per-image attention metric:
   distance, entropy, NMI, instance-awareness, selectivity, CLS Jaccard, TokenCut CorLoc — what
   ``rmae analyze`` computes per batch) against the bare (fused) forward of the same encoder, at
   ViT-Tiny/8 64² and ViT-B/16 224²; the ratio ``analysis / bare`` is printed. Best of three
   timings each, on ``--threads`` intra-op threads (default 1: on a shared 2-core machine two
   threads mostly measure the neighbours);
2. peak memory of the analysis pass of two images at ViT-L/16 224² and ViT-S/14 518² (DINOv2's
   layout, timm, random weights), each in a fresh process: the high-water mark of resident memory
   after the model is built (``VmHWM`` reset through ``/proc/self/clear_refs``), for the analysis
   pass and, for reference, the bare forward and the explicit-attention forward alone;
3. resident memory while streaming N scenes (default 1,000) through the same analysis: sampled
   every 100 images; it must stay flat (only per-image scalars are kept);
4. linear probe, first run (feature extraction + training) vs second run (cache hit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import rmae
from analysis.analyze import attention_metrics
from rmae.data import evaluation_loader

PEAK_CASES = [("mae_vit_large_patch16", 224), ("timm:vit_small_patch14_dinov2", 518)]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def loader(size: int, n: int, batch: int):
    return evaluation_loader(f"scenes:val:{n}", size, batch_size=batch)


def best_of(fn, repeats: int = 3) -> float:
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def throughput(name: str, size: int, n: int, batch: int) -> float:
    model = rmae.create_model(name, img_size=size).eval()
    batches = list(loader(size, n, batch))

    def bare() -> None:
        with torch.no_grad():
            for b in batches:
                model.forward_features(b["images"])

    tb, ta = best_of(bare), best_of(lambda: attention_metrics({"m": model}, batches))
    print(f"{name:<24}{size:>5}²{n / tb:>12.2f}{n / ta:>14.2f}{tb / ta:>9.3f}")
    return tb / ta


# ------------------------------------------------------------------------------------------
# peak memory, one process per case


def _high_water_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def peak_child(name: str, size: int, batch: int, mode: str) -> None:
    """In a fresh process: build the encoder, reset the high-water mark, run ``mode`` once, print JSON."""
    torch.set_num_threads(1)
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False, img_size=size, num_classes=0).eval()
    else:
        model = rmae.create_model(name, img_size=size).eval()
    batches = list(loader(size, batch, batch))
    base = rss_mb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the current resident set
    t = time.perf_counter()
    with torch.no_grad():
        if mode == "bare":
            model.forward_features(batches[0]["images"])
        elif mode == "explicit":
            from analysis.encoder import attention_pass

            attention_pass(model, batches[0]["images"], keys=[-1], reduce=lambda i, w: None, keep=[-1])
        else:
            attention_metrics({"m": model}, batches)
    print(json.dumps({"base": base, "peak": _high_water_mb(), "seconds": time.perf_counter() - t}))


def peak_memory(batch: int = 2) -> None:
    print(f"{'encoder':<32}{'img':>5}{'bare fwd':>11}{'explicit fwd':>14}{'analysis':>11}{'analysis s':>12}")
    for name, size in PEAK_CASES:
        row = {}
        for mode in ("bare", "explicit", "analysis"):
            out = subprocess.run([sys.executable, __file__, "--peak-child", name, str(size), str(batch), mode],
                                 capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        grow = {m: row[m]["peak"] - row[m]["base"] for m in row}
        print(f"{name:<32}{size:>4}²{grow['bare']:>9.0f} MiB{grow['explicit']:>10.0f} MiB{grow['analysis']:>7.0f} MiB"
              f"{row['analysis']['seconds']:>11.1f}")
    print(f"  (batch {batch}; resident memory above the built model, high-water mark of the pass)")


# ------------------------------------------------------------------------------------------


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
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the throughput timings")
    ap.add_argument("--peak-child", nargs=4, metavar=("NAME", "SIZE", "BATCH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_child:
        name, size, batch, mode = args.peak_child
        peak_child(name, int(size), int(batch), mode)
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU\n")
    print("1. analysis pass (explicit attention + every per-image attention metric) vs bare forward (images/s)")
    print(f"{'model':<24}{'img':>6}{'forward':>12}{'+ metrics':>14}{'ratio':>9}")
    throughput("rmae_vit_tiny_patch8", 64, 256, 32)
    throughput("rmae_vit_base_patch16", 224, 16, 8)

    print("\n2. peak memory of the analysis pass at real sizes (random weights)")
    peak_memory()

    print(f"\n3. resident memory while streaming {args.images} images (ViT-Tiny/8 64², batch 32)")
    model = rmae.create_model("rmae_vit_tiny_patch8", img_size=64).eval()
    sampled = Sampled(loader(64, args.images, 32))
    attention_metrics({"m": model}, sampled)
    for seen, mb in sampled.samples:
        print(f"  after {seen:>5} images: {mb:8.1f} MB")
    first, last = sampled.samples[1][1], sampled.samples[-1][1]  # skip the allocator's first growth
    print(f"  growth from {sampled.samples[1][0]} to {sampled.samples[-1][0]} images: {last - first:+.1f} MB")

    print("\n4. feature cache: linear probe, first vs second run (ViT-Tiny/8 64², 400 train / 200 val)")
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
