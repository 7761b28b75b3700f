"""Frozen-encoder features (analysis.features) and their cache in run folders (analysis.feature_cache).

Extraction goes through the encoder surface, so a timm ViT with registers is checked beside our
model: pooling must skip every prefix token, not just the cls token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rmae
import rmae.data
from analysis.feature_cache import load_features, resolve_run
from analysis.features import FeatureError, extract_features
from analysis.groundtruth import patch_labels
from conftest import IMG, make_run, tiny_model


def _run(folder: Path, seed: int) -> Path:
    """A tiny MAE run folder (4×4 patch grid, 2 blocks) whose weights depend on ``seed``."""
    return make_run(folder, tiny_model("mae_vit_tiny_patch8", seed=seed))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("features") / "run", seed=0)


def _images(spec: str, n: int) -> torch.Tensor:
    """The images extraction sees for ``spec`` at the tiny models' size (the same loader)."""
    return next(iter(rmae.data.evaluation_loader(spec, IMG, batch_size=n)))["images"]


# ---------------------------------------------------------------------------------------------
# extraction


def test_patch_labels_majority_known_answer():
    """The per-patch targets of the dense probe: majority id, ties to the smaller id."""
    classes = torch.zeros(1, 4, 4, dtype=torch.long)
    classes[0, :2, :2] = torch.tensor([[2, 2], [2, 0]])  # patch 0: 3 of 4 pixels are 2
    classes[0, :2, 2:] = torch.tensor([[1, 1], [0, 0]])  # patch 1: tie 0/1 → 0 (smaller id)
    classes[0, 2:, 2:] = 3
    assert patch_labels(classes, 2).tolist() == [[2, 0, 0, 3]]


def test_layers_follow_the_norm_convention(run):
    """Last block (-1) = forward_features (final norm); block 0 = the raw first-block output."""
    model = rmae.load_model(run).eval()
    images = _images("scenes:val:4", 4)
    with torch.no_grad():
        full = model.forward_features(images)
        x = model.patch_embed(images) + model.pos_embed[:, 1:]
        x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(4, -1, -1), x], 1)
        first = model.blocks[0](x)
    def feats(layer: int, pool: str) -> torch.Tensor:
        return extract_features(model, "scenes:val:4", layer=layer, pool=pool, progress=False).features.float()

    assert torch.allclose(feats(-1, "cls"), full[:, 0], atol=1e-5)
    assert torch.allclose(feats(-1, "mean"), full[:, 1:].mean(1), atol=1e-5)
    assert torch.allclose(feats(-1, "tokens"), full[:, 1:], atol=2e-3)  # stored as float16
    assert torch.allclose(feats(0, "cls"), first[:, 0], atol=1e-5)  # no final norm
    assert torch.allclose(feats(0, "mean"), first[:, 1:].mean(1), atol=1e-5)
    assert not torch.allclose(feats(0, "cls"), model.norm(first)[:, 0], atol=1e-2)


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
    assert torch.equal(tok.patch_labels, patch_labels(tok.classes.long(), 8))
    with pytest.raises(FeatureError, match="out of range"):
        load_features(run, "scenes:train:16", layer=2, progress=False)
    with pytest.raises(FeatureError, match="pool"):
        load_features(run, "scenes:train:16", pool="max", progress=False)


def test_timm_vit_with_registers_pools_patch_tokens_only():
    """A timm ViT with a cls token and 2 registers (3 prefix tokens): "mean" averages the 16
    patch tokens only, "tokens" has exactly L = 16 rows, "cls" is token 0."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, reg_tokens=2, img_size=IMG,
                            patch_size=8, depth=2).eval()
    assert vit.num_prefix_tokens == 3
    with torch.no_grad():
        full = vit.forward_features(_images("scenes:val:4", 4))  # [4, 3 + 16, 192]
    mean = extract_features(vit, "scenes:val:4", pool="mean", progress=False)
    tokens = extract_features(vit, "scenes:val:4", pool="tokens", progress=False)
    cls = extract_features(vit, "scenes:val:4", pool="cls", progress=False)
    assert torch.allclose(mean.features, full[:, 3:].mean(1), atol=1e-5)
    assert not torch.allclose(mean.features, full[:, 1:].mean(1), atol=1e-3)  # registers would move it
    assert tokens.features.shape == (4, 16, 192) and tokens.grid == (4, 4)
    assert torch.allclose(tokens.features.float(), full[:, 3:], atol=2e-3)
    assert torch.allclose(cls.features, full[:, 0], atol=1e-5)
    assert tokens.patch_labels.shape == (4, 16) and tokens.meta["num_prefix_tokens"] == 3


def test_cls_pool_needs_a_cls_token():
    """Without a cls token, token 0 is a register: "cls" must refuse rather than pool it."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, class_token=False,
                            global_pool="avg", reg_tokens=2, img_size=IMG, patch_size=8, depth=2).eval()
    with pytest.raises(FeatureError, match="no cls token"):
        extract_features(vit, "scenes:val:2", pool="cls", progress=False)
    assert extract_features(vit, "scenes:val:2", pool="mean", progress=False).features.shape == (2, 192)


def test_extract_features_in_memory_matches_cache(run):
    model = rmae.load_model(run)
    mem = extract_features(model, "scenes:val:8", pool="tokens", progress=False)
    cached = load_features(run, "scenes:val:8", pool="tokens", progress=False)
    assert not mem.cache_hit and mem.path is None
    assert torch.equal(mem.features, cached.features) and torch.equal(mem.patch_labels, cached.patch_labels)
    assert mem.class_names == cached.class_names == list(rmae.data.SHAPES)


def test_extraction_runs_in_eval_mode_and_restores_the_mode():
    """Stochastic depth would make features random: extraction runs the model in eval mode and
    hands it back in the mode it came in."""
    model = tiny_model("mae_vit_tiny_patch8", drop_path_rate=0.5).train()
    a = extract_features(model, "scenes:val:4", pool="cls", progress=False)
    assert model.training
    b = extract_features(model, "scenes:val:4", pool="cls", progress=False)
    c = extract_features(model.eval(), "scenes:val:4", pool="cls", progress=False)
    assert torch.equal(a.features, b.features) and torch.equal(a.features, c.features)


# ---------------------------------------------------------------------------------------------
# the cache


def test_feature_cache_hit_and_invalidation(tmp_path):
    run = _run(tmp_path / "run", seed=0)
    first = load_features(run, "scenes:train:48", progress=False)
    second = load_features(run, "scenes:train:48", progress=False)
    assert not first.cache_hit and second.cache_hit
    assert torch.equal(first.features, second.features) and torch.equal(first.labels, second.labels)
    load_features(run, "scenes:val:24", progress=False)
    root = run / "analysis" / "features"
    entries = sorted(p.name for p in root.iterdir())
    assert len(entries) == 2  # train and eval, cls pooling
    before = first.features.clone()

    _run(run, seed=1)  # retrained: new weights in the same file
    after = load_features(run, "scenes:train:48", progress=False)
    assert not after.cache_hit and not torch.allclose(after.features, before)
    assert after.meta["key"]["weights"] != first.meta["key"]["weights"]
    assert load_features(run, "scenes:train:48", progress=False).cache_hit
    load_features(run, "scenes:val:24", progress=False)
    # the entries of the old weights were pruned, the new ones replace them
    assert len(list(root.iterdir())) == 2
    assert sorted(p.name for p in root.iterdir()) != entries


def test_feature_cache_survives_partial_and_corrupt_entries(tmp_path):
    run = _run(tmp_path / "run", seed=0)
    f = load_features(run, "scenes:val:8", progress=False)
    root = run / "analysis" / "features"
    assert f.path.parent == root
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
    (f.path / "meta.json").write_text("{ not json")
    assert not load_features(run, "scenes:val:8", progress=False).cache_hit
    assert load_features(run, "scenes:val:8", progress=False).cache_hit


def test_cache_off_reads_and_writes_nothing(tmp_path):
    run = _run(tmp_path / "run", seed=0)
    f = load_features(run, "scenes:val:8", cache=False, progress=False)
    assert not f.cache_hit and f.path is None and f.meta["key"]["layer"] == 1
    assert not (run / "analysis").exists()


def test_unwritable_cache_is_one_clear_error(tmp_path):
    run = _run(tmp_path / "run", seed=0)
    (run / "analysis").write_text("not a folder")  # where the cache folder would go
    with pytest.raises(FeatureError, match="cannot write the feature cache.*cache=false"):
        load_features(run, "scenes:val:4", progress=False)
    assert load_features(run, "scenes:val:4", cache=False, progress=False).features.shape == (4, 192)


def test_resolve_run_errors(tmp_path):
    with pytest.raises(rmae.CheckpointError, match="no such run folder"):
        resolve_run(tmp_path / "missing")
    run = _run(tmp_path / "run", seed=0)
    with pytest.raises(rmae.CheckpointError, match="not a run folder"):
        resolve_run(run / "model.safetensors")
    rw = resolve_run(run)
    assert rw.depth == 2 and rw.image_size == 32 and rw.path == run / "model.safetensors"


def test_load_features_device_cpu_never_touches_cuda(run, monkeypatch):
    """Asked for the CPU on a machine that (claims to) have CUDA, nothing goes to CUDA: any
    tensor sent there would fail here, where no driver exists."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    f = load_features(run, "scenes:val:4", pool="tokens", device="cpu", cache=False, progress=False)
    assert f.features.device.type == "cpu" and f.features.shape == (4, 16, 192)
