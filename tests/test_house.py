"""The house (issue 9): one encoder surface, one configuration convention, a device that flows,
TensorBoard for real, dependencies that point one way, presets inside the package."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

import rmae
from conftest import IMG, PY, ROOT, TINY_TRAIN, make_run, subprocess_env, tiny_model


def _timm_twin(model, tmp_path: Path) -> torch.nn.Module:
    """timm's VisionTransformer holding our encoder's exported weights."""
    name, kwargs = rmae.export_timm(model, tmp_path / "enc.safetensors")
    vit = timm.create_model(name, **kwargs)
    vit.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=True)
    return vit.eval()


# ------------------------------------------------------------------------------------------
# one encoder surface


@pytest.mark.parametrize("indices", [None, 1, [0, -1], (1,)])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("prefix", [False, True])
def test_forward_intermediates_equals_timm_on_exported_weights(tmp_path, indices, norm, prefix):
    ours = tiny_model("rmae_vit_tiny_patch8", depth=3)
    vit = _timm_twin(ours, tmp_path)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        for fmt in ("NCHW", "NLC"):
            a = ours.forward_intermediates(x, indices, return_prefix_tokens=prefix, norm=norm, output_fmt=fmt)
            b = vit.forward_intermediates(x, indices, return_prefix_tokens=prefix, norm=norm, output_fmt=fmt)
            torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
            assert len(a[1]) == len(b[1]) > 0
            for ya, yb in zip(a[1], b[1]):
                if prefix:
                    assert ya[1].shape == (2, 1, 192)
                    torch.testing.assert_close(ya[1], yb[1], atol=1e-5, rtol=1e-5)
                    ya, yb = ya[0], yb[0]
                torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
            only = ours.forward_intermediates(x, indices, norm=norm, output_fmt=fmt, intermediates_only=True)
            assert [t.shape for t in only] == [t.shape for t in (y[0] if prefix else y for y in a[1])]


def test_get_intermediate_layers_pool_and_prefix_count_equal_timm(tmp_path):
    ours = tiny_model("mae_vit_tiny_patch8", depth=3)
    vit = _timm_twin(ours, tmp_path)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        for n in (1, 2, [0, 2]):
            for reshape in (False, True):
                a = ours.get_intermediate_layers(x, n, reshape=reshape, norm=True)
                b = vit.get_intermediate_layers(x, n, reshape=reshape, norm=True)
                for ya, yb in zip(a, b, strict=True):
                    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
        f_ours, f_vit = ours.forward_features(x), vit.forward_features(x)
        for pool in ("token", "avg", "max"):
            torch.testing.assert_close(ours.pool(f_ours, pool), vit.pool(f_vit, pool), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.forward_head(f_ours), vit.forward_head(f_vit), atol=1e-5, rtol=1e-5)
    assert ours.num_prefix_tokens == vit.num_prefix_tokens == 1
    # stop_early stops after the last wanted block: same intermediates, fewer blocks run
    calls = []
    handles = [b.register_forward_hook(lambda *_: calls.append(1)) for b in ours.blocks]
    ours.forward_intermediates(x, [0], stop_early=True, intermediates_only=True)
    for h in handles:
        h.remove()
    assert len(calls) == 1


def test_analysis_gives_equal_results_for_our_model_and_its_timm_twin(tmp_path):
    from analysis.analyze import attention_metrics
    from analysis.encoder import block_tokens, describe
    from rmae.data import evaluation_loader

    ours = tiny_model("mae_vit_tiny_patch8", depth=2)
    vit = _timm_twin(ours, tmp_path)
    a, b = describe(ours), describe(vit)
    assert (a.grid, a.patch_size, a.depth, a.heads, a.num_prefix_tokens) == (b.grid, b.patch_size, b.depth, b.heads,
                                                                              b.num_prefix_tokens)
    loader = evaluation_loader("scenes:val:8", IMG, batch_size=4)
    vals = attention_metrics({"ours": ours, "timm": vit}, loader)
    assert set(vals["ours"]) == set(vals["timm"]) >= {"attention_distance", "instance_mass", "cls_jaccard", "corloc"}
    for key in vals["ours"]:
        np.testing.assert_allclose(vals["ours"][key], vals["timm"][key], atol=1e-6, err_msg=key)
    x = next(iter(loader))["images"]
    with torch.no_grad():
        for ya, yb in zip(block_tokens(ours, x, [0, -1]), block_tokens(vit, x, [0, -1])):
            torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# the device flows


def test_every_analysis_tensor_follows_the_model_device(tmp_path, monkeypatch):
    """Models and data stay on the CPU while the *default* device is ``meta``: any tensor an
    analysis creates without saying where (instead of on the model's / data's device) lands on
    meta, and mixing it with real tensors fails. The whole analysis must still run."""
    from analysis.analyze import AnalyzeConfig, analyze
    from rmae.data import RegionLoader

    # The data pipeline is the one place that makes tensors on the CPU by design (torch's
    # DataLoader, decoding, collate): batches come out of it under a CPU default; everything
    # downstream of the loader runs with meta as the default.
    load_batches = RegionLoader.__iter__

    def batches_on_cpu(self):
        it = load_batches(self)
        while True:
            with torch.device("cpu"):
                batch = next(it, None)
            if batch is None:
                return
            yield batch

    monkeypatch.setattr(RegionLoader, "__iter__", batches_on_cpu)
    runs = [make_run(tmp_path / n, name=f"{n}_vit_tiny_patch8") for n in ("mae", "rmae")]
    cfg = AnalyzeConfig(data="scenes:val:8", batch_size=4, probes=(), clicks=(1, 2), device="cpu")
    reference = analyze(runs, cfg, progress=False)
    with torch.device("meta"):
        meta = analyze(runs, cfg, progress=False)
    for run in reference.runs:
        for key, e in reference.runs[run].metrics.items():
            assert meta.runs[run].metrics[key].value == pytest.approx(e.value, abs=1e-9), (run, key)


def test_a_missing_device_is_one_line_for_every_command(tmp_path):
    missing = "cuda:97" if torch.cuda.is_available() else "cuda"
    run = make_run(tmp_path / "run", name="mae_vit_tiny_patch8")
    env = subprocess_env(tmp_path)
    commands = [
        ["pretrain", "--config", "demo", *TINY_TRAIN, "steps=1", f"device={missing}", "--out", str(tmp_path / "p")],
        ["analyze", str(run), "--data", "scenes:val:4", "--out", str(tmp_path / "a"), "--device", missing],
        ["finetune", str(run), "--task", "classify", f"device={missing}"],
        ["pretrain", "--config", "demo", *TINY_TRAIN, "steps=1", "device=tpu", "--out", str(tmp_path / "q")],
    ]
    for cmd in commands:
        r = subprocess.run([PY, "-m", "rmae", *cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (cmd, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert re.match(rf"rmae {cmd[0]}: error: (.*: )?device=(cuda|tpu)", r.stderr), r.stderr
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------
# one configuration convention


def test_finetune_takes_typed_key_value_settings(tmp_path):
    run = make_run(tmp_path / "run", name="mae_vit_tiny_patch8")
    env = subprocess_env(tmp_path)
    base = [PY, "-m", "rmae", "finetune", str(run), "--task", "classify", "--no-progress", "data=scenes:train:32",
            "val_data=scenes:val:16", "batch_size=16", "steps=2", "num_workers=0"]
    r = subprocess.run([*base, "base_lr=1e-3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    saved = yaml_load(run / "finetune-classify" / "config.yaml")
    assert saved["base_lr"] == 1e-3 and isinstance(saved["base_lr"], float) and saved["steps"] == 2
    assert json.loads((run / "finetune-classify" / "results.json").read_text())["steps"] == 2
    for bad, words in (("base_lr=fast", "base_lr='fast' is not a valid float"),
                       ("layer_decay=2", "layer_decay=2.0 is out of range"),
                       ("bsize=4", "unknown key(s) bsize")):
        r = subprocess.run([*base, bad], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_the_same_machinery_parses_every_subcommand():
    from rmae.settings import ConfigError, build, parse_override
    from rmae.train.config import TrainConfig
    from rmae.train.finetune import FinetuneConfig

    from analysis.analyze import AnalyzeConfig

    for cls in (TrainConfig, FinetuneConfig, AnalyzeConfig):
        with pytest.raises(ConfigError, match=r"src: unknown key\(s\) sed \(did you mean seed\?\)"):
            build(cls, {"sed": 1}, "src")
        with pytest.raises(ConfigError, match=r"src: seed=-3 is out of range; it must be >= 0"):
            build(cls, {"seed": -3}, "src")
        assert build(cls, {"seed": "7"}, "src").seed == 7
    cfg = build(AnalyzeConfig, dict([parse_override("clicks=1,4"), parse_override("probes=none")]), "cli")
    assert cfg.clicks == (1, 4) and cfg.probes == ()
    with pytest.raises(ConfigError, match="aliases"):
        parse_override("x=*a")


def test_presets_ship_inside_the_package_and_a_non_editable_install_finds_them(tmp_path):
    dist, target, src = tmp_path / "dist", tmp_path / "site", tmp_path / "src"
    # build from a copy: setuptools writes build/ and *.egg-info into the tree it builds
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "runs", "reports",
                                                             "studies", "__pycache__", ".pytest_cache"))
    r = subprocess.run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wheel = next(dist.glob("rmae-*.whl"))
    r = subprocess.run([PY, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    code = textwrap.dedent("""
        import rmae, sys
        from rmae.settings import list_presets
        from rmae.train.config import load_config
        assert rmae.__file__.startswith(sys.argv[1]), rmae.__file__
        cfg = load_config("demo", ["steps=1"])
        print(list_presets(), cfg.model, cfg.steps)
    """)
    env = subprocess_env(tmp_path)
    env["PYTHONPATH"] = str(target)  # the installed copy only, from a folder far from the checkout
    r = subprocess.run([PY, "-c", code, str(target)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "['base', 'demo', 'small', 'study'] rmae_vit_tiny_patch8 1" in r.stdout


# ------------------------------------------------------------------------------------------
# TensorBoard, dependencies


def test_training_writes_tensorboard_events_that_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rmae.train import load_config, pretrain

    cfg = load_config("demo", ["model=rmae_vit_tiny_patch8", *TINY_TRAIN, "steps=4", "log_every=2",
                               "checkpoint_every=4", "figure_every=2", f"region_cache={tmp_path / 'cache'}"])
    run = pretrain(cfg, tmp_path / "run", progress=False).run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/loss_pixel", "train/loss_region", "train/lr", "train/images_per_s"):
        assert [e.step for e in acc.Scalars(tag)] == [2, 4], tag
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert "reconstruction" in tags["images"] and [e.step for e in acc.Images("reconstruction")] == [2, 4]


def test_dependencies_point_one_way():
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import rmae
        for m in pkgutil.walk_packages(rmae.__path__, "rmae."):
            if m.name not in ("rmae.__main__",):
                importlib.import_module(m.name)
        bad = sorted(k for k in sys.modules if k.split(".")[0] in ("analysis", "dashboards", "streamlit"))
        print("BAD", bad)
    """)
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "BAD []" in r.stdout, r.stdout
