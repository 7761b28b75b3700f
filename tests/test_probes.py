"""Probes (analysis.probes) and their feature cache (analysis.features).

Synthetic features check what each probe can and cannot learn; a tiny real model run folder
checks extraction, the cache, run_probe's results and the ``rmae probe`` command end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rmae
import rmae.data
from analysis.features import block_tokens, load_features, patch_majority, resolve_run
from analysis.probes import (
    PROBES,
    RESULT_KEYS,
    DenseGrid,
    LinearGrid,
    ProbeError,
    attentive_probe,
    confusion_to_iou,
    default_eval_data,
    dense_probe,
    fit_grid,
    knn_probe,
    linear_probe,
    run_probe,
    split_holdout,
)


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
    from analysis.probes import AttentiveGrid

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
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 absent everywhere
    miou, per = confusion_to_iou(conf)
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


# ---------------------------------------------------------------------------------------------
# features: extraction and cache


def test_patch_majority():
    classes = torch.zeros(1, 4, 4, dtype=torch.long)
    classes[0, :2, :2] = torch.tensor([[2, 2], [2, 0]])  # patch 0: 3 of 4 pixels are 2
    classes[0, :2, 2:] = torch.tensor([[1, 1], [0, 0]])  # patch 1: tie 0/1 → 0 (smaller id)
    classes[0, 2:, 2:] = 3
    assert patch_majority(classes, 2, 4).tolist() == [[2, 0, 0, 3]]


def _make_run(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = rmae.create_model("mae_vit_tiny_patch8", img_size=32, depth=2)
    rmae.save_model(model, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("probes") / "run", seed=0)


def test_block_tokens_match_forward_features(run):
    model = rmae.load_model(run).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_features(images)
        x = model.patch_embed(images) + model.pos_embed[:, 1:]
        x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
        first = model.blocks[0](x)
    assert torch.allclose(block_tokens(model, images, 1), full, atol=1e-6)
    assert torch.allclose(block_tokens(model, images, 0), first, atol=1e-6)  # no final norm


def test_features_layers_pools_and_labels(run):
    cls = load_features(run, "scenes:train:16", layer=-1, pool="cls", progress=False)
    mean0 = load_features(run, "scenes:train:16", layer=0, pool="mean", progress=False)
    tok = load_features(run, "scenes:train:16", layer=1, pool="tokens", progress=False)
    assert cls.features.shape == (16, 192) and cls.features.dtype == torch.float32
    assert tok.features.shape == (16, 16, 192) and tok.features.dtype == torch.float16
    assert tok.classes.shape == (16, 32, 32) and tok.grid == (4, 4)
    assert cls.layer == tok.layer == 1 and mean0.layer == 0
    # layer -1 and layer 1 of a 2-block model are the same entry
    assert load_features(run, "scenes:train:16", layer=1, pool="cls", progress=False).cache_hit
    assert not torch.allclose(mean0.features, tok.features.float().mean(1), atol=1e-2)
    assert torch.allclose(tok.features.float().mean(1), load_features(
        run, "scenes:train:16", layer=1, pool="mean", progress=False).features, atol=2e-3)
    # labels: scenes' label is the largest object's class; patch labels come from the maps
    assert cls.has_labels and cls.labels.min() >= 0 and cls.labels.max() < 7 and cls.num_classes == 7
    assert torch.equal(tok.patch_labels, patch_majority(tok.classes.long(), 8, 8))
    with pytest.raises(ValueError, match="out of range"):
        load_features(run, "scenes:train:16", layer=2, progress=False)


def test_feature_cache_hit_and_invalidation(tmp_path):
    run = _make_run(tmp_path / "run", seed=0)
    kw = dict(epochs=3, progress=False)
    first = run_probe(run, "linear", "scenes:train:48", "scenes:val:24", **kw)
    second = run_probe(run, "linear", "scenes:train:48", "scenes:val:24", **kw)
    assert not first["feature_cache_hit"] and second["feature_cache_hit"]
    for k in ("value", "best_lr", "grid", "chance", "n_train", "n_eval"):
        assert first[k] == second[k], k
    entries = sorted(p.name for p in (run / "analysis" / "features").iterdir())
    assert len(entries) == 2  # train and eval, cls pooling
    before = load_features(run, "scenes:train:48", progress=False).features.clone()

    _make_run(run, seed=1)  # retrained: new weights in the same file
    third = run_probe(run, "linear", "scenes:train:48", "scenes:val:24", **kw)
    assert not third["feature_cache_hit"] and third["weights"] != first["weights"]
    after = load_features(run, "scenes:train:48", progress=False)
    assert after.cache_hit and not torch.allclose(after.features, before)
    # the entries of the old weights were pruned, the new ones replace them
    assert len(list((run / "analysis" / "features").iterdir())) == 2
    assert sorted(p.name for p in (run / "analysis" / "features").iterdir()) != entries


def test_feature_cache_survives_partial_and_corrupt_entries(tmp_path):
    run = _make_run(tmp_path / "run", seed=0)
    f = load_features(run, "scenes:val:8", progress=False)
    root = run / "analysis" / "features"
    # a killed extraction leaves a hidden temp folder: never read, never in the way
    (root / f".{f.path.name}.abc.tmp").mkdir()
    assert load_features(run, "scenes:val:8", progress=False).cache_hit
    # an entry whose arrays are gone or whose key does not match is rebuilt, not trusted
    (f.path / "features.npy").unlink()
    g = load_features(run, "scenes:val:8", progress=False)
    assert not g.cache_hit and torch.allclose(g.features, f.features)
    meta = json.loads((f.path / "meta.json").read_text())
    meta["key"]["layer"] = 0
    (f.path / "meta.json").write_text(json.dumps(meta))
    assert not load_features(run, "scenes:val:8", progress=False).cache_hit
    assert load_features(run, "scenes:val:8", progress=False).cache_hit


def test_resolve_run_errors(tmp_path):
    with pytest.raises(rmae.CheckpointError, match="no such run folder"):
        resolve_run(tmp_path / "missing")
    run = _make_run(tmp_path / "run", seed=0)
    with pytest.raises(rmae.CheckpointError, match="not a run folder"):
        resolve_run(run / "model.safetensors")
    rw = resolve_run(run)
    assert rw.depth == 2 and rw.image_size == 32 and rw.path == run / "model.safetensors"


# ---------------------------------------------------------------------------------------------
# end to end on a tiny model run folder


@pytest.mark.parametrize("probe", PROBES)
def test_run_probe_end_to_end(run, probe):
    r = run_probe(run, probe, "scenes:train:64", "scenes:val:32", epochs=3, progress=False)
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
    on_disk = json.loads(Path(r["path"]).read_text())
    assert on_disk == r and Path(r["path"]).parent == run / "analysis" / "probes"


def test_run_probe_sklearn_and_errors(run):
    r = run_probe(run, "linear", "scenes:train:64", "scenes:val:32", solver="sklearn", progress=False)
    assert r["solver"] == "sklearn" and r["best_C"] in [float(c) for c in r["grid"]]
    assert Path(r["path"]).name.startswith("linear-sklearn_")
    assert default_eval_data("scenes:train:64") == "scenes:val:64"
    assert default_eval_data("scenes:train") == "scenes:val"
    with pytest.raises(ProbeError, match="--eval-data"):
        run_probe(run, "linear", "photos", progress=False)
    with pytest.raises(ProbeError, match="no image labels"):
        run_probe(run, "linear", "photos", "photos", progress=False)
    with pytest.raises(ProbeError, match="tokens"):
        run_probe(run, "dense", "scenes:train:8", pool="cls", progress=False)
    with pytest.raises(ProbeError, match="unknown probe"):
        run_probe(run, "svm", "scenes:train:8", progress=False)


def test_cli_probe_table_and_errors(run, capsys):
    from rmae.cli import main

    code = main(["probe", str(run), "--probe", "linear,knn", "--data", "scenes:train:64",
                 "--eval-data", "scenes:val:32", "--epochs", "2", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["run", "probe", "metric", "value"]
    assert any(" linear " in l and "accuracy" in l for l in lines) and any(" knn " in l for l in lines)

    code = main(["probe", str(run), "--probe", "linear", "--data", "scenes:train:8", "--layer", "7", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("rmae probe: error: layer 7 is out of range")
    code = main(["probe", str(run), "--probe", "linear", "--data", "folder:/nonexistent/x", "--eval-data", "photos"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("rmae probe: error:") and "/nonexistent/x" in err[-1]
    code = main(["probe", str(run), "--probe", "linear", "--data", "scenes:train:8", "--lrs", "a,b"])
    assert code == 2 and "--lrs" in capsys.readouterr().err


def test_cli_help_teaches(capsys):
    from rmae.cli import main

    with pytest.raises(SystemExit) as e:
        main(["probe", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "examples:" in out and "rmae probe runs/mae" in out and "dense_miou" in out


def test_extract_features_in_memory_matches_cache(run):
    from analysis.features import extract_features

    model = rmae.load_model(run)
    mem = extract_features(model, "scenes:val:8", pool="tokens", progress=False)
    cached = load_features(run, "scenes:val:8", pool="tokens", progress=False)
    assert not mem.cache_hit and mem.path is None
    assert torch.equal(mem.features, cached.features) and torch.equal(mem.patch_labels, cached.patch_labels)
    assert mem.class_names == cached.class_names == list(rmae.data.SHAPES)


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
    with pytest.raises(ProbeError, match="same classes"):
        run_probe(run, "knn", f"folder:{tmp_path / 'train'}", f"folder:{tmp_path / 'val'}", progress=False)
    r = run_probe(run, "knn", f"folder:{tmp_path / 'train'}", f"folder:{tmp_path / 'train'}", k=1, progress=False)
    assert r["value"] == 1.0  # k=1 on the training images themselves: each finds itself
