"""Checkpoint formats: official MAE / R-MAE layouts, timm round trip, our format, refusals."""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

import rmae
from rmae.checkpoint import CheckpointError, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_KEYS = Path(os.environ.get("RMAE_SHARED", REPO.parent / "shared")) / "reference" / "official_keys.json"


@pytest.fixture(scope="module")
def official_layouts() -> dict[str, dict[str, list[int]]]:
    assert OFFICIAL_KEYS.exists(), f"{OFFICIAL_KEYS} is missing (set RMAE_SHARED to the shared/ folder)"
    data = json.loads(OFFICIAL_KEYS.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _random_state_dict(layout: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, generator=g) * 0.02 for k, shape in layout.items()}


def _assert_loaded(model: torch.nn.Module, sd: dict[str, torch.Tensor], keys=None) -> None:
    own = model.state_dict()
    for k in keys if keys is not None else sd:
        assert torch.equal(own[k], sd[k]), k


@pytest.fixture(scope="module")
def mae_sd(official_layouts):
    return _random_state_dict(official_layouts["mae_vit_base_patch16"], seed=1)


@pytest.fixture(scope="module")
def rmae_sd(official_layouts):
    return _random_state_dict(official_layouts["rmae_vit_base_patch16_k8_neck8"], seed=2)


def test_official_mae_whole_model(tmp_path, mae_sd):
    path = tmp_path / "mae_visualize_vit_base.pth"
    torch.save({"model": mae_sd}, path)
    model = rmae.load_model(path)
    c = model.config
    assert (c.family, c.embed_dim, c.depth, c.num_heads, c.patch_size, c.img_size) == ("mae", 768, 12, 12, 16, 224)
    assert (c.decoder_dim, c.decoder_depth, c.decoder_heads) == (512, 8, 16)
    assert set(model.state_dict()) == set(mae_sd)  # no missing, no unexpected
    _assert_loaded(model, mae_sd)
    assert model.source_kind.startswith("official MAE")


def test_official_mae_encoder_only_release(tmp_path, mae_sd):
    encoder = {k: v for k, v in mae_sd.items() if not k.startswith(("decoder_", "mask_token"))}
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": encoder}, path)
    model = rmae.load_model(path)
    _assert_loaded(model, encoder)
    assert "encoder only" in model.source_kind
    assert set(model.state_dict()) - set(encoder) == {k for k in model.state_dict() if k.startswith(("decoder_", "mask_token"))}


def test_official_mae_training_checkpoint_with_args_namespace(tmp_path, mae_sd):
    path = tmp_path / "checkpoint-799.pth"
    args = argparse.Namespace(model="mae_vit_base_patch16", input_size=224, mask_ratio=0.75, norm_pix_loss=False)
    torch.save({"model": mae_sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799,
                "scaler": {"scale": 65536.0}, "args": args}, path)
    model = rmae.load_model(path)
    assert model.config.norm_pix_loss is False  # read from args, not guessed
    _assert_loaded(model, mae_sd)
    assert rmae.load_model(path, norm_pix_loss=True).config.norm_pix_loss is True  # overrides win


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_rmae_trainer_checkpoint(tmp_path, rmae_sd, prefix):
    path = tmp_path / "model_144000.ckpt"
    config = {"model_config": {"rmae": {"mask_ratio": 0.75, "mae_vit": {"arch": "rmae_base_patch16", "params": {
        "num_region": 8, "norm_pix_loss": True, "bg_loss_weight": 1.0, "region_loss_weight": 1.0,
        "region_cross_layer": 8, "region_dec_num_heads": 8}}}}}
    torch.save({"model": {prefix + k: v for k, v in rmae_sd.items()}, "optimizer": {"state": {}, "param_groups": []},
                "update": 144000, "epoch": 4000, "lr_scheduler": {"last_epoch": 144000}, "config": config}, path)
    model = rmae.load_model(path)
    c = model.config
    assert (c.family, c.region_variant, c.num_regions, c.region_neck_depth, c.region_enc_dim, c.region_dec_depth) == \
        ("rmae", "length", 8, 8, 128, 1)
    assert set(model.state_dict()) == set(rmae_sd)
    _assert_loaded(model, rmae_sd)
    assert model.source_kind == "official R-MAE"


def test_official_rmae_bare_final_pth_and_its_forward(tmp_path, rmae_sd):
    path = tmp_path / "rmae_final.pth"
    torch.save({"module." + k: v for k, v in rmae_sd.items()}, path)
    model = rmae.load_model(path, img_size=224).eval()
    images, regions = torch.randn(1, 3, 224, 224), (torch.rand(1, 8, 224, 224) > 0.5).float()
    with torch.no_grad():
        out = model(images, regions=regions, noise=torch.rand(1, 196))
    assert out.pred_region.shape == (1, 8, 196, 256) and torch.isfinite(out.loss)


def test_official_rae_only_drops_the_unused_pixel_decoder_stem(tmp_path, rmae_sd):
    # use_mae_loss=False in the official code: no decoder_norm/decoder_pred, but the rest is built
    sd = {k: v for k, v in rmae_sd.items() if not k.startswith(("decoder_norm", "decoder_pred"))}
    path = tmp_path / "rae.pth"
    torch.save(sd, path)
    model = rmae.load_model(path)
    assert model.config.family == "rae" and not hasattr(model, "decoder_blocks")
    _assert_loaded(model, sd, [k for k in sd if k.startswith("region_")])


def test_timm_round_trip_same_features(tmp_path):
    torch.manual_seed(0)
    model = rmae.create_model("rmae_vit_tiny_patch8", img_size=64).eval()
    name, kwargs = rmae.export_timm(model, tmp_path / "enc.safetensors")
    vit = timm.create_model(name, **kwargs).eval()
    vit.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model.forward_features(images), vit.forward_features(images)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # … and back: the timm state dict loads into our model with the same features
    torch.save(vit.state_dict(), tmp_path / "timm.pth")
    back = rmae.load_model(tmp_path / "timm.pth").eval()
    assert back.config.img_size == 64 and back.config.patch_size == 8
    with torch.no_grad():
        assert torch.allclose(back.forward_features(images), theirs, atol=1e-5)


def test_timm_classifier_head_is_ignored_with_a_warning(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    torch.save(vit.state_dict(), tmp_path / "timm_cls.pth")
    with pytest.warns(UserWarning, match="classifier head"):
        model = rmae.load_model(tmp_path / "timm_cls.pth")
    _assert_loaded(model, vit.state_dict(), [k for k in vit.state_dict() if not k.startswith("head")])


def test_unsupported_timm_vit_is_refused_clearly(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, global_pool="avg", fc_norm=True)
    torch.save(vit.state_dict(), tmp_path / "gap.pth")
    with pytest.raises(CheckpointError, match="global-average-pool"):
        rmae.load_model(tmp_path / "gap.pth")


@pytest.mark.parametrize("variant", ["length", "batch", "channel"])
def test_our_format_round_trip(tmp_path, variant):
    torch.manual_seed(0)
    model = rmae.create_model("rmae_vit_tiny_patch8", img_size=32, region_variant=variant, num_regions=4,
                              depth=2, bg_loss_weight=0.5).eval()
    rmae.save_model(model, tmp_path / "m.safetensors")
    back = rmae.load_model(tmp_path / "m.safetensors").eval()
    assert back.config == model.config
    images, regions, noise = torch.randn(2, 3, 32, 32), (torch.rand(2, 4, 32, 32) > 0.5).float(), torch.rand(2, 16)
    with torch.no_grad():
        a, b = model(images, regions=regions, noise=noise), back(images, regions=regions, noise=noise)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.pred_region, b.pred_region)


def test_run_folder_loads_latest_checkpoint(tmp_path):
    model = rmae.create_model("mae_vit_tiny_patch8", img_size=32, depth=1)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "mae_vit_tiny_patch8", "model_config": model.config.to_dict()}))
    rmae.save_model(model, run / "checkpoints" / "step_000010.safetensors")
    with torch.no_grad():
        model.norm.weight.fill_(2.0)
    rmae.save_model(model, run / "checkpoints" / "step_000100.safetensors")
    loaded = rmae.load_model(run)
    assert torch.all(loaded.norm.weight == 2.0) and loaded.source.endswith("step_000100.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="without weights"):
        rmae.load_model(empty)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1)}, "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        rmae.load_model(path)
    assert not marker.exists()
    # a raw pickle (legacy format) with the same payload is refused too
    with open(tmp_path / "evil_legacy.pth", "wb") as f:
        pickle.dump(_Exploit(), f, protocol=2)
    with pytest.raises(CheckpointError):
        rmae.load_model(tmp_path / "evil_legacy.pth")
    assert not marker.exists()


def test_truncated_and_foreign_files_give_clear_errors(tmp_path, mae_sd):
    small = {k: v for k, v in mae_sd.items() if k.startswith(("cls_token", "pos_embed", "patch_embed"))}
    torch.save({"model": small}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated or corrupt"):
        rmae.load_model(tmp_path / "cut.pth")
    model = rmae.create_model("mae_vit_tiny_patch8", img_size=32, depth=1)
    rmae.save_model(model, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        rmae.load_model(tmp_path / "cut.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        rmae.load_model(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="no such file"):
        rmae.load_model(tmp_path / "missing.pth")


def test_mismatch_names_keys_and_describes_the_file(tmp_path, rmae_sd):
    sd = dict(rmae_sd)
    sd["foo.weight"] = torch.zeros(3)
    del sd["region_pred.1.bias"]
    torch.save({"model": sd}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as e:
        rmae.load_model(tmp_path / "odd.pth")
    msg = str(e.value)
    assert "odd.pth" in msg and "foo.weight" in msg and "region_pred.1.bias" in msg
    assert "ViT encoder width 768" in msg and "neck depth 8" in msg


def test_read_checkpoint_strips_wrappers(tmp_path):
    torch.save({"state_dict": {"module._orig_mod.cls_token": torch.zeros(1, 1, 4)}}, tmp_path / "w.pth")
    sd, _, fmt = read_checkpoint(tmp_path / "w.pth")
    assert list(sd) == ["cls_token"] and fmt == "torch"
