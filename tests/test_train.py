"""Training engine: exact resume after SIGKILL, DDP equivalence, atomic checkpoints, NaN stop,
configs, schedule, CLI, fine-tuning."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import rmae
from rmae.io import atomic_write
from rmae.train.config import ConfigError, load_config
from rmae.train.optim import lr_at, param_groups
from rmae.runfolder import RunFolder
from rmae.train.trainer import TrainingDiverged, pretrain

PY = sys.executable
TINY = ["model=rmae_vit_tiny_patch8", "img_size=32", "depth=2", "decoder_depth=1", "data=scenes:train:64",
        "batch_size=16", "num_workers=0", "log_every=1", "warmup_steps=2", "base_lr=1e-3"]


def _cli(*args: str, cwd: Path, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "rmae", *args], cwd=cwd, env=env or _env(cwd), capture_output=True, text=True, **kw)


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env["RMAE_CACHE"] = str(tmp / "cache")
    env["OMP_NUM_THREADS"] = "1"  # tests run processes side by side on 2 cores
    return env


def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    return load_file(run / "checkpoints" / latest["weights"])


def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path):
    common = ["pretrain", "--config", "demo", "--no-progress", *TINY, "steps=30", "checkpoint_every=5",
              f"region_cache={tmp_path / 'cache'}"]
    ref = _cli(*common, "--out", str(tmp_path / "ref"), cwd=tmp_path, timeout=600)
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen([PY, "-m", "rmae", *common, "--out", str(run)], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = run / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and 5 <= json.loads(pointer.read_text())["step"] < 30:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(pointer.read_text())["step"]
    assert killed_at < 30

    resumed = _cli(*common, "--out", str(run), cwd=tmp_path, timeout=600)  # same command: resumes
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from step {killed_at}" in resumed.stdout
    a, b = _weights(tmp_path / "ref"), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    # metrics.jsonl of the resumed run has each step once, and the same losses
    ref_m = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    res_m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in res_m] == list(range(1, 31))
    assert all(math.isclose(x["loss"], y["loss"], rel_tol=1e-6) for x, y in zip(ref_m, res_m))


def test_torchrun_two_processes_match_one_process(tmp_path):
    common = ["pretrain", "--config", "demo", "--no-progress", *TINY, "steps=4", "checkpoint_every=4",
              f"region_cache={tmp_path / 'cache'}"]
    one = _cli(*common, "--out", str(tmp_path / "one"), cwd=tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          "-m", "rmae", *common, "--out", str(tmp_path / "two")],
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3, 4]
    # Same samples and masks on both; only float summation order differs (gradient all-reduce
    # averages two half-batch means), so losses agree to 1e-4 relative over 4 steps.
    for r1, r2 in zip(m1, m2):
        for k in ("loss", "loss_pixel", "loss_region"):
            assert math.isclose(r1[k], r2[k], rel_tol=1e-4), (r1["step"], k, r1[k], r2[k])
    assert m1[-1]["loss"] != m1[0]["loss"]  # it trained


_SAVER = """
import sys, torch, rmae
from rmae.runfolder import RunFolder
run = RunFolder(sys.argv[1]).create()
model = rmae.create_model("rmae_vit_small_patch16", img_size=64)
step = 0
while True:
    step += 1
    with torch.no_grad():
        model.norm.weight.fill_(float(step))
    run.save_checkpoint(model, {"step": step, "optimizer": {}, "rng": {}, "payload": torch.randn(2_000_000)}, step, keep=2)
    print(step, flush=True)
"""


@pytest.mark.parametrize("delay", [0.7, 1.3, 2.1])
def test_a_killed_save_never_leaves_a_corrupt_latest_checkpoint(tmp_path, delay):
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    proc = subprocess.Popen([PY, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(tmp_path))
    time.sleep(delay + 3.0)  # imports take a moment; then it saves continuously
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = RunFolder(tmp_path / "run")
    latest = run.latest()
    assert latest is not None
    weights, state = run.load_state()  # both files of the pair are complete
    model = rmae.load_model(tmp_path / "run")
    assert float(model.norm.weight[0].detach()) == latest["step"] == state["step"]
    # what the kill interrupted stays a hidden temp file (ours, and safetensors' own), never a
    # checkpoint name; clean_partial (run when training resumes) removes exactly those
    hidden = {p.name for p in run.checkpoints.iterdir() if p.name.startswith(".")}
    assert all(n.endswith(".tmp") or n.startswith(".tmp") for n in hidden), hidden
    assert set(run.clean_partial()) == hidden
    assert not [p for p in run.checkpoints.iterdir() if p.name.startswith(".")]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def crash(tmp):
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = load_config("demo", [*TINY, "steps=40", "checkpoint_every=1", "base_lr=1e9", "warmup_steps=0",
                               f"region_cache={tmp_path / 'cache'}"])
    with pytest.raises(TrainingDiverged, match=r"not finite at step \d+.*last good checkpoint is step \d+") as e:
        pretrain(cfg, tmp_path / "run", progress=False)
    step = int(str(e.value).split("last good checkpoint is step ")[1].split()[0])
    run = RunFolder(tmp_path / "run")
    assert run.latest()["step"] == step
    model = rmae.load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the CLI reports it in one line and exits non-zero
    r = _cli("pretrain", "--config", "demo", "--no-progress", *TINY, "steps=40", "base_lr=1e9", "warmup_steps=0",
             "--out", str(tmp_path / "run2"), cwd=tmp_path, timeout=600)
    assert r.returncode == 2 and "loss is not finite" in r.stderr and "Traceback" not in r.stderr


def test_config_errors_name_the_file_and_the_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: rmae_vit_tiny_patch8\nbatchsize: 3\nsteps: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key\(s\) batchsize \(did you mean batch_size\?\)"):
        load_config(bad)
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file.*preset"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not key=value"):
        load_config("demo", ["steps"])
    cfg = load_config("demo", ["steps=7", "region_variant=batch", "betas=[0.9, 0.99]", "clip_grad=1.0"])
    assert cfg.steps == 7 and cfg.model_args["region_variant"] == "batch" and cfg.betas == (0.9, 0.99)
    for preset in ("demo", "small", "base"):
        c = load_config(preset)
        rmae.models.config_from_name(c.model, **c.model_args)  # every preset builds its model


def test_a_run_folder_with_another_config_is_not_silently_resumed(tmp_path):
    cfg = load_config("demo", [*TINY, "steps=2", "checkpoint_every=2", f"region_cache={tmp_path / 'cache'}"])
    pretrain(cfg, tmp_path / "run", progress=False)
    other = load_config("demo", [*TINY, "steps=2", "seed=5", f"region_cache={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match=r"different config \(seed: 0 → 5\)"):
        pretrain(other, tmp_path / "run", progress=False)
    longer = load_config("demo", [*TINY, "steps=3", "checkpoint_every=2", f"region_cache={tmp_path / 'cache'}"])
    assert pretrain(longer, tmp_path / "run", progress=False).step == 3  # extending is a resume
    doc = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert doc["model_config"]["depth"] == 2 and doc["steps"] == 3


def test_lr_schedule_and_param_groups():
    assert lr_at(0, 100, 1.0, 10) == 0.0
    assert lr_at(5, 100, 1.0, 10) == pytest.approx(0.5)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, 10, min_lr=0.1) == pytest.approx(0.1)
    model = rmae.create_model("rmae_vit_tiny_patch8", img_size=32, depth=1)
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= undecayed
    assert "pos_embed" not in decayed | undecayed  # frozen sin-cos table: not optimised at all


def test_run_folder_contents_and_figure(tmp_path):
    cfg = load_config("demo", [*TINY, "steps=3", "checkpoint_every=3", "figure_every=3",
                               f"region_cache={tmp_path / 'cache'}"])
    pretrain(cfg, tmp_path / "run", progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]) >= {"step", "epoch", "loss", "loss_pixel", "loss_region", "lr", "images_per_s"}
    fig = tmp_path / "run" / "figures" / "recon_step_000003.png"
    assert fig.exists() and fig.stat().st_size > 5000
    state = torch.load(next((tmp_path / "run" / "checkpoints").glob("*.state.pt")), weights_only=True)
    assert state["step"] == 3 and "exp_avg" in next(iter(state["optimizer"]["state"].values()))
    # the run folder loads with the config it was trained with
    assert rmae.load_model(tmp_path / "run").config.depth == 2


def test_every_command_explains_itself():
    for cmd in ([], ["pretrain"], ["finetune"], ["import"], ["export"], ["demo"], ["regions", "precompute"], ["models"]):
        r = subprocess.run([PY, "-m", "rmae", *cmd, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (cmd, r.stderr)
        if cmd != ["models"]:
            assert "example" in r.stdout, cmd


def test_import_export_cli_round_trip(tmp_path):
    model = rmae.create_model("rmae_vit_tiny_patch8", img_size=32, depth=2)
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "official.pth")
    r = _cli("import", str(tmp_path / "official.pth"), "--out", str(tmp_path / "imp"), "num_regions=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "R-MAE" in r.stdout
    loaded = rmae.load_model(tmp_path / "imp")
    assert loaded.config.num_regions == 4 and torch.equal(loaded.blocks[1].mlp.fc2.weight, model.blocks[1].mlp.fc2.weight)
    r = _cli("export", str(tmp_path / "imp"), "--format", "timm", "--out", str(tmp_path / "enc.safetensors"), cwd=tmp_path)
    assert r.returncode == 0 and "vit_tiny_patch16_224" in r.stdout
    r = _cli("import", str(tmp_path / "nothing.pth"), "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_finetune_writes_scores(tmp_path):
    cfg = load_config("demo", [*TINY, "steps=2", "checkpoint_every=2", f"region_cache={tmp_path / 'cache'}"])
    pretrain(cfg, tmp_path / "run", progress=False)
    from rmae.train.finetune import FinetuneConfig, finetune

    for task, key in (("classify", "val_accuracy"), ("segment", "val_miou")):
        res = finetune(tmp_path / "run", FinetuneConfig(task=task, data="scenes:train:64", val_data="scenes:val:32",
                                                        steps=3, batch_size=16, num_workers=0), progress=False)
        assert 0.0 <= res[key] <= 1.0
        saved = json.loads((tmp_path / "run" / f"finetune-{task}" / "results.json").read_text())
        assert saved[key] == res[key] and saved["num_classes"] >= 2


def test_layer_decay_scales():
    from rmae.train.finetune import FinetuneModel

    enc = rmae.create_model("mae_vit_tiny_patch8", img_size=32, depth=2)
    scales = FinetuneModel(enc, "classify", 5).layer_scales(0.5)
    assert scales["encoder.patch_embed.proj.weight"] == 0.5**3
    assert scales["encoder.blocks.0.attn.qkv.weight"] == 0.5**2
    assert scales["encoder.blocks.1.attn.qkv.weight"] == 0.5
    assert scales["head.weight"] == 1.0


@pytest.mark.slow
def test_demo_preset_learns_regions_better_than_all_background(tmp_path):
    cfg = load_config("demo", ["model=rmae_vit_tiny_patch8", f"region_cache={tmp_path / 'cache'}"])
    result = pretrain(cfg, tmp_path / "rmae", progress=False)
    records = [json.loads(x) for x in (tmp_path / "rmae" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    # held-out BCE of the region reconstruction vs predicting "background" (logit −∞ clipped) everywhere
    from rmae.train.trainer import build_train_dataset
    from rmae.data import collate_regions

    model = rmae.load_model(result.run).eval()
    ds = build_train_dataset(cfg, model, train=False, data="scenes:val:128")
    batch = collate_regions([ds[i] for i in range(128)])
    with torch.no_grad():
        out = model(batch["images"], regions=batch["regions"], noise=torch.rand(128, model.num_patches,
                                                                               generator=torch.Generator().manual_seed(0)))
    target = model.patchify(batch["regions"].flatten(0, 1).unsqueeze(1)).reshape(out.pred_region.shape)
    # the best constant predictor is the mean foreground rate — stronger than all-background
    rate = target.mean().clamp(1e-4, 1 - 1e-4)
    const = torch.nn.functional.binary_cross_entropy(rate.expand_as(target), target, reduction="none")
    const = (const.mean(-1).mean(1) * out.mask).sum() / out.mask.sum()
    assert out.loss_region < 0.9 * const, (out.loss_region.item(), const.item())
