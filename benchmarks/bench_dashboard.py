"""Dashboard latency: what a user waits for after changing layer, head or query.

For ViT-Tiny/8 at 64² (depth 12, the demo size) and ViT-B/16 at 224², with two randomly
initialised run folders (an MAE and an R-MAE; weights do not change the cost):

1. cold costs: model load, attention of every layer for one image (the first view of an image);
2. the render path on a cache hit, timed function by function — the ``st.cache_data`` round
   trip of the attention array (pickle), the three maps (patch query, CLS, rollout), the
   instance-awareness numbers, the overlays and their PNG encoding — per run and for two runs;
3. whole-app re-runs with ``streamlit.testing.v1.AppTest`` after changing layer, head and the
   query row (the script re-executes top to bottom, as in a browser session, minus the
   websocket and the browser's own drawing);
4. the runs root: discovery of a large root (hundreds of runs, a study, a folder of 20 000
   files — searched up to its bound), the per-open confinement check, a run's checks before its
   model loads, and a study's figures.

    .venv/bin/python benchmarks/bench_dashboard.py [--sizes tiny,base] [--repeats 7] [--no-apptest] [--no-root]

Timings on a shared CPU are noisy: the script prints the load average next to the numbers;
medians are reported.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import rmae
from analysis.encoder import EncoderInfo, describe
from dashboards import compute as C
from dashboards import images as I
from rmae.data import build_dataset
from rmae.runfolder import RunFolder

SIZES = {
    "tiny": {"models": ["mae_vit_tiny_patch8", "rmae_vit_tiny_patch8"], "img_size": 64, "label": "ViT-Tiny/8 64²"},
    "base": {"models": ["mae_vit_base_patch16", "rmae_vit_base_patch16"], "img_size": 224, "label": "ViT-B/16 224²"},
}


def make_runs(root: Path, models: list[str], img_size: int) -> list[Path]:
    """Run folders as ``rmae import`` writes them (through :class:`RunFolder`)."""
    out = []
    for name in models:
        torch.manual_seed(0)
        model = rmae.create_model(name, img_size=img_size)
        run = RunFolder(root / name).create("import")
        run.write_config({"model": name}, model.config.to_dict())
        rmae.save_model(model, run.model_path)
        out.append(run.root)
    return out


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def render_once(attn_pickled: bytes, prepared: I.Prepared, layer: int, how: str, query: int, info: EncoderInfo) -> None:
    """What the explorer does per run on a cache hit."""
    attn = pickle.loads(attn_pickled)  # st.cache_data hands back a copy (unpickled)
    views = C.attention_views(attn, layer, how, query, info)
    C.instance_stats(C.query_row(attn, layer, how, query, info.num_prefix_tokens), prepared.instances,
                     info.patch_size, query)
    box = I.patch_box(query, info.grid)
    for name, amap in views.items():
        I.png_bytes(I.overlay(prepared.image, amap, 0.6, box=box if name != "CLS" else None))


def bench_functions(size: str, runs: list[Path], repeats: int) -> dict:
    spec = SIZES[size]
    ds = build_dataset("scenes:val:8", image_size=spec["img_size"])
    s = ds.load(0)
    res = {}
    t = time.perf_counter()
    models = [rmae.load_model(r).eval() for r in runs]
    res["load 2 models (s)"] = time.perf_counter() - t
    prepared = I.prepare(s["image"], s["instances"], spec["img_size"])
    t = time.perf_counter()
    stacks = [C.attention_stack(m, prepared) for m in models]
    res["attention, all layers, 2 runs, first view (ms)"] = (time.perf_counter() - t) * 1000
    blobs = [pickle.dumps(a, protocol=pickle.HIGHEST_PROTOCOL) for a in stacks]
    res["attention array per run (MiB)"] = stacks[0].nbytes / 2**20
    info = describe(models[0])
    depth, L = info.depth, info.grid[0] * info.grid[1]
    res["cache hit: unpickle attention (ms/run)"] = median_ms(lambda: pickle.loads(blobs[0]), repeats)
    rng = np.random.default_rng(0)
    changes = [(int(rng.integers(depth)), str(rng.choice(["mean", "max", "0"])), int(rng.integers(L)))
               for _ in range(repeats)]
    it = iter(changes * 2)

    def two_runs():
        layer, how, q = next(it)
        for b in blobs:
            render_once(b, prepared, layer, how, q, info)

    res["render path, 2 runs, changed layer/head/query (ms)"] = median_ms(two_runs, repeats)
    attn = stacks[0]
    res["  of which 3 maps incl. rollout (ms/run)"] = median_ms(
        lambda: C.attention_views(attn, depth - 1, "mean", 5, info), repeats)
    res["  of which instance numbers (ms/run)"] = median_ms(
        lambda: C.instance_stats(C.query_row(attn, depth - 1, "mean", 5, info.num_prefix_tokens), prepared.instances,
                                 info.patch_size, 5), repeats)
    views = C.attention_views(attn, depth - 1, "mean", 5, info)
    res["  of which 3 overlays + PNG (ms/run)"] = median_ms(
        lambda: [I.png_bytes(I.overlay(prepared.image, a, 0.6)) for a in views.values()], repeats)
    return res


def bench_apptest(root: Path, repeats: int) -> dict:
    from streamlit.testing.v1 import AppTest

    os.environ["RMAE_DASHBOARD_RUNS"] = str(root)
    app = Path(__file__).resolve().parents[1] / "dashboards" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=600)
    t = time.perf_counter()
    at.run()
    res = {"AppTest first run: imports + 2 model loads + attention (s)": time.perf_counter() - t}
    if at.exception:
        raise RuntimeError(at.exception[0].message)
    depth = at.slider(key="layer").max
    heads = ["mean", "max", "0"]
    rows = at.number_input(key="q_row").max + 1
    timings = {"layer": [], "head": [], "query": []}
    for i in range(repeats):
        for what in timings:
            if what == "layer":
                w = at.slider(key="layer").set_value(1 + (i % depth))
            elif what == "head":
                w = at.selectbox(key="head").set_value(heads[i % 3])
            else:
                w = at.number_input(key="q_row").set_value((i * 3 + 1) % rows)
            t = time.perf_counter()
            w.run()
            timings[what].append((time.perf_counter() - t) * 1000)
            if at.exception:
                raise RuntimeError(at.exception[0].message)
    for what, ts in timings.items():
        res[f"AppTest re-run after changing {what} (ms, median)"] = statistics.median(ts)
    res["app's own render time, last re-run (ms)"] = at.session_state["_render_ms"]
    return res


def bench_root(repeats: int, n_runs: int = 300, crowd: int = 20_000) -> dict:
    """Discovery and confinement on a large root (the copies' weights are placeholders: discovery
    checks them, it does not read them)."""
    from analysis.results import Results
    from dashboards import study as S
    from dashboards.discovery import discover
    from dashboards.runs import RunsRoot

    with tempfile.TemporaryDirectory(prefix="rmae-bench-root-") as d:
        root = Path(d)
        first = make_runs(root / "runs", ["rmae_vit_tiny_patch8"], 64)[0]
        config, weights = (first / "config.yaml").read_bytes(), b"placeholder"
        for i in range(n_runs):
            run = RunFolder(root / "runs" / f"r{i:04d}").create("import")
            run.config_path.write_bytes(config)
            run.model_path.write_bytes(weights)
        study = root / "studies" / "s"
        (study / "runs").mkdir(parents=True)
        (study / "study.json").write_text("{}")
        for i in range(24):
            run = RunFolder(study / "runs" / f"mae-s{i}").create("pretrain")
            run.config_path.write_bytes(config)
            run.model_path.write_bytes(weights)
        (root / "crowd").mkdir()
        for i in range(crowd):
            (root / "crowd" / f"f{i:05d}").touch()
        rr = RunsRoot(root)
        res = {}
        t = time.perf_counter()
        disc = discover(rr, limit=10_000)
        res[f"discover: {len(disc.runs)} runs, a study, a folder of {crowd} files (ms, cold)"] = \
            (time.perf_counter() - t) * 1000
        res["discover, again (ms, median)"] = median_ms(lambda: discover(rr, limit=10_000), repeats)
        res["RunsRoot.file: resolve + confine + stat (µs, median)"] = \
            median_ms(lambda: [rr.file(first / "config.yaml", "run config") for _ in range(1000)], repeats)
        folder = rr.run_folder("runs/r0000")
        res["a run's checks before its model loads: config + weights (ms, median)"] = \
            median_ms(lambda: (rr.run_config(folder), rr.weights(folder)), repeats)
        doc = {"kind": "study", "runs": {f"c{k}": {"role": "configuration", "metrics": {"knn": {
            "value": 0.5, "ci": [0.4, 0.6], "per_seed": [0.4 + 0.01 * s for s in range(5)]}}} for k in range(6)}}
        results = Results.from_json(doc)
        res["a study's seed figure: 6 configurations × 5 seeds (ms, median)"] = \
            median_ms(lambda: S.seed_figure(results, "knn", S.configurations(results)), repeats)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,base")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-apptest", action="store_true")
    ap.add_argument("--no-root", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    if not args.no_root:
        print("\n== runs root ==")
        for k, v in bench_root(args.repeats).items():
            print(f"  {k:58s} {v:9.2f}")
    for size in args.sizes.split(","):
        spec = SIZES[size]
        with tempfile.TemporaryDirectory(prefix="rmae-bench-dash-") as d:
            root = Path(d)
            runs = make_runs(root, spec["models"], spec["img_size"])
            print(f"\n== {spec['label']} ({', '.join(spec['models'])}) ==")
            for k, v in bench_functions(size, runs, args.repeats).items():
                print(f"  {k:58s} {v:9.2f}")
            if not args.no_apptest:
                for k, v in bench_apptest(root, args.repeats).items():
                    print(f"  {k:58s} {v:9.2f}")
        print(f"  load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
