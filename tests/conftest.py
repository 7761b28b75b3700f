"""Shared fixtures: tiny models, run folders of them, and briefly trained runs.

Sizes are the smallest that still exercise every code path: ViT-Tiny/8 at 32² (a 4×4 grid),
depth 2, one decoder block. Test files build on these instead of re-declaring their own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import rmae

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
IMG = 32  # ViT-Tiny/8 at 32²: a 4×4 patch grid
TINY = {"img_size": IMG, "depth": 2, "decoder_depth": 1}
#: key=value words that make any preset tiny and quick (used with load_config / `rmae pretrain`)
TINY_TRAIN = [f"img_size={IMG}", "depth=2", "decoder_depth=1", "data=scenes:train:64", "batch_size=16",
              "num_workers=0"]


def tiny_model(name: str = "rmae_vit_tiny_patch8", seed: int = 0, **keywords: Any) -> rmae.MaskedAutoencoderViT:
    """A randomly initialised tiny model (deterministic for a seed), in eval mode."""
    torch.manual_seed(seed)
    return rmae.create_model(name, **{**TINY, **keywords}).eval()


def tiny_timm_vit(reg_tokens: int = 4, seed: int = 0, **keywords: Any) -> torch.nn.Module:
    """A randomly initialised tiny timm ViT (32², patch 8, depth 2, 48-d, 3 heads) with a cls token
    and ``reg_tokens`` registers — ``num_prefix_tokens = 1 + reg_tokens`` — in eval mode: the
    foreign encoder whose prefix is not just a cls token."""
    import timm

    torch.manual_seed(seed)
    kw = {"img_size": IMG, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3, "num_classes": 0,
          "reg_tokens": reg_tokens, **keywords}
    return timm.create_model("vit_small_patch16_224", pretrained=False, **kw).eval()


def make_run(folder: Path, model: torch.nn.Module | None = None, name: str = "rmae_vit_tiny_patch8",
             **keywords: Any) -> Path:
    """A run folder holding ``model`` (or a fresh tiny one), as ``rmae import`` writes it."""
    from rmae.runfolder import RunFolder

    model = model if model is not None else tiny_model(name, **keywords)
    run = RunFolder(folder).create("import")
    run.write_config({"model": model.config.name or name}, model.config.to_dict())
    rmae.save_model(model, run.model_path)
    return folder


def subprocess_env(tmp: Path) -> dict[str, str]:
    """Environment for `python -m rmae …` subprocesses: this checkout first on the path, a private
    region cache, one thread (the machine has two cores and pytest uses them)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["RMAE_CACHE"] = str(tmp / "rmae-cache")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def scene(index: int, size: int = IMG):
    """Scene ``index`` of scenes:val at ``size``: (image HWC uint8, instance map [H, W] int32),
    cropped as the dashboard crops it."""
    import numpy as np

    from rmae.data import JointCenterCrop, build_dataset

    s = build_dataset("scenes:val:1000", image_size=size).load(index)
    img, maps = JointCenterCrop(size, crop_pct=1.0)(s["image"], {"instances": s["instances"].astype(np.int32)})
    return img, maps["instances"]


@pytest.fixture
def tiny() -> Callable[..., rmae.MaskedAutoencoderViT]:
    """``tiny(name="rmae_vit_tiny_patch8", seed=0, **keywords)`` → a tiny model in eval mode."""
    return tiny_model


@pytest.fixture
def run_factory(tmp_path) -> Callable[..., Path]:
    """``run_factory("name", model=None, **keywords)`` → a run folder under ``tmp_path``."""

    def make(sub: str = "run", model: torch.nn.Module | None = None, **keywords: Any) -> Path:
        return make_run(tmp_path / sub, model, **keywords)

    return make


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory) -> dict[str, Path]:
    """MAE and R-MAE tiny runs trained for a few steps with the real trainer (shared by the
    analysis, probe, dashboard and notebook tests). Treat them as read-only."""
    from rmae.train import load_config, pretrain

    root = tmp_path_factory.mktemp("trained")
    out = {}
    for fam in ("mae", "rmae"):
        cfg = load_config("demo", [f"model={fam}_vit_tiny_patch8", *TINY_TRAIN, "steps=3", "checkpoint_every=3",
                                   f"region_cache={root / 'cache'}"])
        out[fam] = pretrain(cfg, root / fam, progress=False).run
    return out


# ---------------------------------------------------------------------------------------------
# the dashboard in a real browser (chromium + Playwright), shared by the browser tests

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason=f"{CHROMIUM} is absent (`make setup` installs Debian's chromium)")


@contextlib.contextmanager
def dashboard_in_browser(runs_root: Path, log_dir: Path, height: int = 1600):
    """``rmae dashboard --runs RUNS_ROOT`` on a free port, and a chromium page: yields
    ``(page, base_url)``. The server is started in its own process group and ended (SIGTERM, then
    SIGKILL) whatever the test does; its output is in ``log_dir/dashboard.log``."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = log_dir / "dashboard.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("rmae")), "dashboard", "--runs", str(runs_root),
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 90
            while True:  # the server answers its health check once it listens
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert proc.poll() is None, log_path.read_text()
                assert time.time() < deadline, "dashboard did not start"
                time.sleep(0.5)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                    "--no-first-run"])
                try:
                    yield browser.new_page(viewport={"width": 1400, "height": height}), f"http://127.0.0.1:{port}"
                finally:
                    browser.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def keep_screenshots(shots: list[Path]) -> None:
    """Copy screenshots to $RMAE_SCREENSHOTS when it is set (for a person to look at)."""
    keep = os.environ.get("RMAE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, Path(keep) / shot.name)
