"""Probes (analysis.probes): what each can and cannot learn, their settings, and ``rmae probe``.

Synthetic features check what each probe can and cannot learn; a tiny real model run folder
checks run_probe's results and the ``rmae probe`` command end to end (extraction and the feature
cache are tested in test_features.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analysis.probes import (
    PROBES,
    RESULT_KEYS,
    ProbeConfig,
    ProbeError,
    attentive_probe,
    default_eval_data,
    dense_probe,
    knn_probe,
    linear_probe,
    run_probe,
)
from analysis.probes.fit import fit_grid, grid_accuracy, lr_factor, split_holdout
from analysis.probes.heads import AttentiveGrid, DenseGrid, LinearGrid
from conftest import make_run, tiny_model
from rmae.errors import UserError
from rmae.evaluation import iou_from_confusion


# ---------------------------------------------------------------------------------------------
# synthetic data


def blobs(n: int, num_classes: int = 4, dim: int = 32, seed: int = 0, spread: float = 8.0):
    """Gaussian blobs with unit noise whose centres are ~``spread`` apart: separable.
    → x float32 [n, dim], y int64 [n]."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    centres = centres / centres.norm(dim=1, keepdim=True) * spread
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def random_labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def one_token_sets(n: int, num_classes: int = 4, length: int = 16, dim: int = 32, seed: int = 0):
    """Token sets [n, L, D] (float16, like cached tokens) where only one token, at a random
    position, carries the class (its centre plus a marker direction); the rest are noise."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 2.0
    marker = torch.zeros(dim)
    marker[0] = 6.0
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randn(n, length, dim, generator=g)
    pos = torch.randint(0, length, (n,), generator=g)
    x[torch.arange(n), pos] += centres[y] + marker
    return x.half(), y


def patch_scenes(n: int, num_labels: int = 4, grid: int = 4, patch: int = 4, dim: int = 16, seed: int = 0,
                 random_features: bool = False):
    """Per-patch features whose blob gives the patch's category; pixel maps are each patch's
    category repeated over its p×p pixels. → tokens f16 [n, L, D], patch labels [n, L],
    maps [n, H, W]. With ``random_features`` the features carry no information."""
    centres = torch.randn(num_labels, dim, generator=torch.Generator().manual_seed(7)) * 3.0
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, (n, grid * grid), generator=g)
    noise = torch.randn(n, grid * grid, dim, generator=g)
    x = noise * 3.0 if random_features else centres[labels] + noise
    maps = labels.view(n, grid, grid).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    return x.half(), labels, maps


# ---------------------------------------------------------------------------------------------
# probes on synthetic features


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
def test_linear_probe_separable_and_chance(solver):
    xt, yt = blobs(400)
    xe, ye = blobs(400, seed=1)
    kw = dict(num_classes=4, solver=solver, epochs=10)
    r = linear_probe(xt, yt, xe, ye, **kw)
    assert r.value >= 0.98, r
    assert r.metric == "accuracy" and r.n_train == 400 and r.n_eval == 400
    # Labels independent of the features (train and eval): nothing to learn, nothing leaks.
    rr = linear_probe(xt, random_labels(400, 4, 5), xe, random_labels(400, 4, 6), **kw)
    assert abs(rr.value - 0.25) < 0.08, rr


def test_knn_probe_separable_and_chance():
    xt, yt = blobs(300)
    xe, ye = blobs(300, seed=1)
    r = knn_probe(xt, yt, xe, ye)
    assert r.value >= 0.98 and r.extra == {"k": 20, "temperature": 0.07}
    rr = knn_probe(xt, random_labels(300, 4, 5), xe, random_labels(300, 4, 6))
    assert abs(rr.value - 0.25) < 0.08, rr


def test_knn_votes_weighted_by_similarity():
    """Two near neighbours of class 0 outvote three farther ones of class 1 when exp(sim/T)
    weights apply — a plain majority vote of the 5 would say class 1."""
    from analysis.probes import knn_scores

    q = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[1.0, 0.02], [1.0, -0.02], [1.0, 0.5], [1.0, -0.5], [1.0, 0.6]])
    y = torch.tensor([0, 0, 1, 1, 1])
    scores = knn_scores(bank, y, q, k=5, temperature=0.07, num_classes=2)
    assert scores.argmax(1).item() == 0
    cos = torch.nn.functional.normalize(bank, dim=1) @ torch.nn.functional.normalize(q, dim=1).T
    expected0 = (cos[:2] / 0.07).exp().sum()
    assert torch.allclose(scores[0, 0], expected0, rtol=1e-5)


def test_attentive_probe_finds_the_one_token():
    xt, yt = one_token_sets(400)
    xe, ye = one_token_sets(300, seed=1)
    kw = dict(num_classes=4, epochs=25, lrs=(1e-3, 1e-2), attn_heads=2, batch_size=64)
    r = attentive_probe(xt, yt, xe, ye, **kw)
    assert r.value >= 0.95, r
    assert set(r.grid) == {"0.001", "0.01"} and r.extra["attn_heads"] == 2
    rr = attentive_probe(xt, random_labels(400, 4, 5), xe, random_labels(300, 4, 6), **kw)
    assert abs(rr.value - 0.25) < 0.09, rr


def test_attentive_grid_equals_explicit_cross_attention():
    """The key/value-free computation is exactly MultiheadAttention with a learned query."""
    D, H, L, B = 16, 4, 5, 3
    grid = AttentiveGrid(D, 3, 1, torch.Generator().manual_seed(0), attn_heads=H).eval()
    x = torch.randn(B, L, D)
    xn = grid.bn(x.reshape(-1, D)).view(B, L, D)
    q = grid.query[0]  # [1, D]
    k, v = xn @ grid.wk[0].T, xn @ grid.wv[0].T + grid.bv[0]
    dh = D // H
    qh, kh, vh = q.view(1, H, dh), k.view(B, L, H, dh), v.view(B, L, H, dh)
    att = torch.einsum("qhe,blhe->bhql", qh, kh).mul(dh**-0.5).softmax(-1)
    out = torch.einsum("bhql,blhe->bqhe", att, vh).reshape(B, 1, D).mean(1)
    out = torch.nn.functional.layer_norm(out, (D,), grid.ln_w[0], grid.ln_b[0], eps=1e-6)
    expected = out @ grid.fc_w[0].T + grid.fc_b[0]
    assert torch.allclose(grid(x)[0], expected, atol=1e-5)


@pytest.mark.parametrize("upsample,floor", [("nearest", 0.99), ("bilinear", 0.85)])
def test_dense_probe_separable_and_chance(upsample, floor):
    xt, lt, mt = patch_scenes(150)
    xe, _, me = patch_scenes(80, seed=1)
    kw = dict(grid_hw=(4, 4), num_labels=4, epochs=8, upsample=upsample)
    r = dense_probe(xt, lt, mt, xe, me, **kw)
    assert r.metric == "miou" and r.value >= floor, r
    assert len(r.extra["per_class_iou"]) == 4
    # Uninformative features: any prediction independent of the truth scores IoU ≤ ~0.14 per
    # class for 4 balanced classes, far below the separable case.
    xr, lr_, mr = patch_scenes(150, random_features=True, seed=2)
    xre, _, mre = patch_scenes(80, random_features=True, seed=3)
    rr = dense_probe(xr, lr_, mr, xre, mre, **kw)
    assert rr.value < 0.2, rr


def test_miou_from_confusion():
    """The dense probe's score (rmae.evaluation, shared with fine-tuning)."""
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 absent everywhere
    miou, per = iou_from_confusion(conf)
    assert per[0] == pytest.approx(3 / 4) and per[1] == pytest.approx(2 / 3) and per[2] is None
    assert miou == pytest.approx((3 / 4 + 2 / 3) / 2)


# ---------------------------------------------------------------------------------------------
# the learning-rate grid


def test_lr_grid_picks_the_best_heldout_lr():
    """Tiny lrs cannot move the heads in 3 epochs: the grid must choose the large one, on the
    held-out part of the training data."""
    xt, yt = blobs(300, spread=6.0)
    xe, ye = blobs(200, seed=1, spread=6.0)
    r = linear_probe(xt, yt, xe, ye, num_classes=4, lrs=(1e-7, 1e-6, 0.5), epochs=3)
    assert r.best_lr == 0.5
    assert r.grid["0.5"] >= 0.95 and r.grid["1e-07"] < 0.7
    assert max(r.grid, key=r.grid.get) == "0.5"
    assert r.value >= 0.95


def test_lr_choice_ignores_eval_labels():
    """With eval labels permuted (every eval label wrong for the true classes), a selection on
    eval data would pick a useless head; held-out selection still picks the learning one."""
    xt, yt = blobs(300)
    xe, ye = blobs(200, seed=1)
    r = linear_probe(xt, yt, xe, (ye + 1) % 4, num_classes=4, lrs=(1e-7, 0.5), epochs=3)
    assert r.best_lr == 0.5 and r.value < 0.05


def test_grid_heads_train_independently_in_one_pass():
    """Head g of a grid ends exactly where a lone head with lr_g and the same init ends: the
    summed loss gives each head its own gradient. And the grid runs one forward per step."""
    x, y = blobs(200, dim=8)
    lrs = [0.01, 0.3]
    grid = LinearGrid(8, 4, 2, torch.Generator().manual_seed(0))
    lone = LinearGrid(8, 4, 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        lone.weight[0].copy_(grid.weight[1])
    calls = []
    grid.register_forward_hook(lambda *a: calls.append(1))
    fit_grid(grid, x, y, lrs, epochs=4, batch_size=64, seed=3)
    fit_grid(lone, x, y, lrs[1:], epochs=4, batch_size=64, seed=3)
    assert torch.allclose(grid.weight[1], lone.weight[0], atol=1e-5)
    assert torch.allclose(grid.bias[1], lone.bias[0], atol=1e-5)
    assert not torch.allclose(grid.weight[0], grid.weight[1])
    assert len(calls) == 4 * 4  # 4 epochs × ceil(200 / 64) minibatches, not × heads


def test_dense_grid_shapes_and_holdout_split():
    grid = DenseGrid(8, 3, 2, torch.Generator().manual_seed(0))
    assert grid(torch.randn(5, 6, 8)).shape == (2, 5, 6, 3)
    fit, held = split_holdout(50, 0.2, seed=0)
    assert len(held) == 10 and len(fit) == 40 and not set(fit.tolist()) & set(held.tolist())
    assert torch.equal(split_holdout(50, 0.2, seed=0)[1], held)
    with pytest.raises(ProbeError):
        split_holdout(1, 0.2, seed=0)



def test_schedule_warms_up_from_the_first_step():
    """rmae.train.optim.lr_at's warmup + cosine, read so that step 0 already learns: the first
    of 10 warmup steps runs at 1/10 of the peak (lr_at itself gives 0 there), the last at the
    peak, then the cosine falls to half at the middle of the remaining steps."""
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(4, 100, 10) == pytest.approx(0.5)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10) < 0.001
    assert lr_factor(0, 5, 0) == pytest.approx(1.0)  # too short to warm up: cosine from the peak


# ---------------------------------------------------------------------------------------------
# settings


def test_probe_config_types_ranges_and_errors():
    from rmae.device import DeviceError
    from rmae.settings import ConfigError, build

    cfg = build(ProbeConfig, {"probe": "linear", "data": "scenes:train:64", "epochs": "2", "lrs": [0.1, "1e-2"],
                              "holdout": 0.25, "cache": "false"}, "test")
    assert cfg.epochs == 2 and cfg.lrs == (0.1, 0.01) and cfg.holdout == 0.25 and cfg.cache is False
    assert cfg.resolved_pool == "cls" and cfg.resolved_optimizer == "sgd" and cfg.device == "auto"
    d = ProbeConfig(probe="dense", data="scenes:train:8", lrs=[1, 0.1])
    assert d.resolved_pool == "tokens" and d.lrs == (1.0, 0.1)
    assert ProbeConfig(probe="attentive", data="x").resolved_optimizer == "adamw"
    assert issubclass(ProbeError, UserError) and issubclass(ProbeError, ValueError)
    with pytest.raises(ConfigError, match="test: epochs='abc' is not a valid int"):
        build(ProbeConfig, {"probe": "linear", "data": "scenes", "epochs": "abc"}, "test")
    with pytest.raises(ConfigError, match="did you mean epochs"):
        build(ProbeConfig, {"probe": "linear", "data": "scenes", "epoch": 2}, "test")
    with pytest.raises(ConfigError, match="probe='svm' is not one of linear, knn, attentive, dense"):
        build(ProbeConfig, {"probe": "svm", "data": "scenes"}, "test")
    # constructed directly (rmae analyze, notebooks): checked alike, UserErrors all
    bad = [({"probe": "svm"}, "unknown probe"), ({"probe": "dense", "pool": "cls"}, "tokens"),
           ({"probe": "linear", "pool": "tokens"}, "one vector per image"),
           ({"probe": "knn", "solver": "sklearn"}, "linear probe only"),
           ({"probe": "linear", "epochs": 0}, "epochs=0 is out of range"),
           ({"probe": "linear", "holdout": 1.0}, "holdout=1.0 is out of range"),
           ({"probe": "linear", "lrs": ()}, "lrs must be positive numbers"),
           ({"probe": "linear", "lrs": (0.1, -1.0)}, "out of range"),
           ({"probe": "linear", "device": "gpu"}, "not a device")]
    for kw, message in bad:
        with pytest.raises(UserError, match=message):
            ProbeConfig(data="scenes:train:8", **kw)
    with pytest.raises(DeviceError):
        ProbeConfig(probe="linear", data="x", device="tpu")


# ---------------------------------------------------------------------------------------------
# run folders


def _config(probe: str, data: str = "scenes:train:64", eval_data: str | None = "scenes:val:32",
            **kw) -> ProbeConfig:
    return ProbeConfig(probe=probe, data=data, eval_data=eval_data, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("probes") / "run", tiny_model("mae_vit_tiny_patch8"))


def test_run_probe_cache_hit_and_invalidation(tmp_path):
    run = make_run(tmp_path / "run", tiny_model("mae_vit_tiny_patch8", seed=0))
    cfg = _config("linear", "scenes:train:48", "scenes:val:24", epochs=3)
    first = run_probe(run, cfg, progress=False)
    second = run_probe(run, cfg, progress=False)
    assert not first["feature_cache_hit"] and second["feature_cache_hit"]
    for k in ("value", "best_lr", "grid", "chance", "n_train", "n_eval"):
        assert first[k] == second[k], k
    assert len(list((run / "analysis" / "features").iterdir())) == 2  # train and eval, cls pooling

    make_run(run, tiny_model("mae_vit_tiny_patch8", seed=1))  # retrained: new weights in the same file
    third = run_probe(run, cfg, progress=False)
    assert not third["feature_cache_hit"] and third["weights"] != first["weights"]
    assert len(list((run / "analysis" / "features").iterdir())) == 2  # old entries pruned


@pytest.mark.parametrize("probe", PROBES)
def test_run_probe_end_to_end(run, probe):
    r = run_probe(run, _config(probe, epochs=3), progress=False)
    assert r["probe"] == probe and r["key"] == RESULT_KEYS[probe]
    assert r["metric"] == ("miou" if probe == "dense" else "accuracy")
    assert 0.0 <= r["value"] <= 1.0 and 0.0 <= r["chance"] <= 1.0
    assert r["train"] == "scenes:train:64" and r["eval"] == "scenes:val:32"
    assert r["layer"] == 1 and r["n_train"] == 64 and r["n_eval"] == 32
    assert isinstance(r["feature_cache_hit"], bool) and r["seconds"] > 0
    if probe == "knn":
        assert r["best_lr"] is None and r["grid"] == {} and r["k"] == 20
    else:
        assert r["best_lr"] in [float(k) for k in r["grid"]]
        assert all(0.0 <= v <= 1.0 for v in r["grid"].values())
        assert r["grid"][format(r["best_lr"], "g")] == max(r["grid"].values())
    if probe == "dense":
        assert r["num_classes"] == 8 and len(r["per_class_iou"]) == 8
    else:
        assert r["num_classes"] == 7
    on_disk = json.loads(Path(r["path"]).read_text())
    assert on_disk == r and Path(r["path"]).parent == run / "analysis" / "probes"


def test_run_probe_sklearn_and_errors(run):
    r = run_probe(run, _config("linear", solver="sklearn"), progress=False)
    assert r["solver"] == "sklearn" and r["best_C"] in [float(c) for c in r["grid"]]
    assert Path(r["path"]).name.startswith("linear-sklearn_")
    assert default_eval_data("scenes:train:64") == "scenes:val:64"
    assert default_eval_data("scenes:train") == "scenes:val"
    with pytest.raises(ProbeError, match="--eval-data"):
        run_probe(run, _config("linear", "photos", None), progress=False)
    with pytest.raises(ProbeError, match="no image labels"):
        run_probe(run, _config("linear", "photos", "photos"), progress=False)
    with pytest.raises(ProbeError, match="no ground-truth category maps"):
        run_probe(run, _config("dense", "scenes:train:8", "photos"), progress=False)


def test_run_probe_refuses_mismatched_class_folders(run, tmp_path):
    """folder: data number their own sub-folders; a val folder missing a class would shift the
    labels, so run_probe must refuse it rather than score garbage."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in (("train", ("cat", "dog", "eel")), ("val", ("cat", "eel"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    train, val = f"folder:{tmp_path / 'train'}", f"folder:{tmp_path / 'val'}"
    with pytest.raises(ProbeError, match="same classes"):
        run_probe(run, _config("knn", train, val), progress=False)
    r = run_probe(run, _config("knn", train, train, k=1), progress=False)
    assert r["value"] == 1.0  # k=1 on the training images themselves: each finds itself


# ---------------------------------------------------------------------------------------------
# device


def test_device_cpu_never_touches_cuda(run, monkeypatch):
    """The issue's bug: probes took CUDA whenever it existed, even when asked for the CPU. Here
    CUDA claims to exist but has no driver, so any tensor sent there fails. (SGD throughout:
    AdamW's own graph-capture check queries the claimed CUDA device.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for probe in PROBES:
        cfg = _config(probe, epochs=1, optimizer=None if probe == "knn" else "sgd", device="cpu", cache=False)
        r = run_probe(run, cfg, progress=False, write=False)
        assert 0.0 <= r["value"] <= 1.0


# ---------------------------------------------------------------------------------------------
# the command


def _main(argv: list[str], capsys) -> tuple[int, list[str], list[str]]:
    from rmae.cli import main

    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out.strip().splitlines(), cap.err.strip().splitlines()


def test_cli_probe_table_and_errors(run, capsys):
    code, out, _ = _main(["probe", str(run), "--probe", "linear,knn", "--data", "scenes:train:64",
                          "--eval-data", "scenes:val:32", "--epochs", "2", "--quiet"], capsys)
    assert code == 0
    assert out[0].split()[:4] == ["run", "probe", "metric", "value"]
    assert any(" linear " in l and "accuracy" in l for l in out) and any(" knn " in l for l in out)

    code, _, err = _main(["probe", str(run), "--probe", "linear", "--data", "scenes:train:8", "--layer", "7",
                          "--quiet"], capsys)
    assert code == 2 and err[-1].startswith("rmae probe: error: layer 7 is out of range")
    code, _, err = _main(["probe", str(run), "--probe", "linear", "--data", "folder:/nonexistent/x",
                          "--eval-data", "photos"], capsys)
    assert code == 2 and err[-1].startswith("rmae probe: error:") and "/nonexistent/x" in err[-1]
    code, _, err = _main(["probe", str(run), "--probe", "linear", "--data", "scenes:train:8", "--lrs", "a,b"],
                         capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("rmae probe: error: probe settings: lrs")
    code, _, err = _main(["probe", str(run), "--probe", "linear,svm", "--data", "scenes:train:8"], capsys)
    assert code == 2 and len(err) == 1 and "probe='svm' is not one of linear, knn, attentive, dense" in err[0]
    code, _, err = _main(["probe", str(run), "--data", "scenes:train:8"], capsys)
    assert code == 2 and err == ["rmae probe: error: give the probe(s) to run: --probe NAME[,NAME] "
                                 "(linear, knn, attentive, dense)"]
    code, _, err = _main(["probe", str(run), "--probe", "knn", "--data", "scenes:train:8", "--device", "cuda"],
                         capsys)
    assert code == 2 and len(err) == 1 and "CUDA is not available" in err[0]


def test_cli_settings_as_key_value(run, capsys):
    """Every setting works as a flag or as key=value (typed by rmae.settings), comma lists in
    either form; a bad value is one line and exit 2, before anything runs."""
    opts = ["--data", "scenes:train:64", "--eval-data", "scenes:val:32", "--quiet", "--json"]
    base = ["probe", str(run), *opts]
    code, _, err = _main(["probe", str(run), "--probe", "linear", "--data", "scenes:train:64", "epochs=abc"], capsys)
    assert code == 2 and err == ["rmae probe: error: probe settings: epochs='abc' is not a valid int | None"]

    code, flag, _ = _main(base + ["--probe", "linear", "--epochs", "2", "--lrs", "0.01,0.1"], capsys)
    assert code == 0
    for argv in (base + ["--probe", "linear", "epochs=2", "lrs=0.01,0.1"],
                 base + ["probe=linear", "epochs=2", "lrs=[0.01, 0.1]"],
                 ["probe", str(run), "epochs=2", *opts, "--probe", "linear", "--lrs", "[0.01,0.1]"]):
        code, out, _ = _main(argv, capsys)
        words = argv[-4:]
        assert code == 0 and len(out) == 1, words
        a, b = json.loads(flag[0]), json.loads(out[0])
        assert b["epochs"] == 2 and set(b["grid"]) == {"0.01", "0.1"}, words
        assert (a["value"], a["grid"], a["path"]) == (b["value"], b["grid"], b["path"]), words

    code, out, _ = _main(base + ["probe=[linear, knn]", "--pool", "mean", "epochs=1", "Cs=1,10"], capsys)
    rows = [json.loads(l) for l in out]
    assert code == 0 and [r["probe"] for r in rows] == ["linear", "knn"] and {r["pool"] for r in rows} == {"mean"}
    code, out, _ = _main(base + ["--probe", "linear", "--solver", "sklearn", "--C", "1,10"], capsys)
    assert code == 0 and set(json.loads(out[0])["grid"]) == {"1", "10"}
    # --pool is for the probes that pool; the token probes read tokens whatever it says
    code, out, _ = _main(base + ["--probe", "dense", "--pool", "mean", "epochs=1", "--no-cache"], capsys)
    r = json.loads(out[0])
    assert code == 0 and r["pool"] == "tokens" and r["feature_cache_hit"] is False


def test_cli_help_teaches(capsys):
    from rmae.cli import main

    with pytest.raises(SystemExit) as e:
        main(["probe", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "examples:" in out and "rmae probe runs/mae" in out and "dense_miou" in out
    assert "AIM-style" in out and "no value bias and no LayerNorm" in out  # honest about the attentive probe
    assert "extract_batch_size" in out and "--no-cache" in out  # every key, and the flags


def test_probes_stop_when_the_held_out_score_stops_improving():
    """Epochs the held-out score no longer rewards are not spent; each head ends at its best check."""
    x, y = blobs(400)
    fit, held = split_holdout(400, 0.25, 0)
    heads = LinearGrid(x.shape[1], 4, 2, torch.Generator().manual_seed(0))
    checks = []

    def held_out():
        checks.append(grid_accuracy(heads, x[held], y[held]).tolist())
        return checks[-1]

    history = fit_grid(heads, x[fit], y[fit], [0.03, 0.3], epochs=100, batch_size=64, held_out=held_out, patience=3)
    assert len(history) < 30  # stopped long before 100 epochs: blobs are separated within a few
    best = [max(c[g] for c in checks) for g in range(2)]
    # it stopped because the last 3 checks improved no head
    assert all(c[g] <= max(k[g] for k in checks[:-3]) for c in checks[-3:] for g in range(2))
    assert grid_accuracy(heads, x[held], y[held]).tolist() == best  # every head restored to its best check
    full = LinearGrid(x.shape[1], 4, 2, torch.Generator().manual_seed(0))
    assert len(fit_grid(full, x[fit], y[fit], [0.03, 0.3], epochs=12, batch_size=64)) == 12  # no patience: all epochs
