"""Foreign encoders through every door: clear one-line refusals from ``rmae import``, ``rmae
export`` of a foreign run (timm reads it; rmae reads it back), the image size chosen at import or
at load, run-folder identity, the feature cache, and the dashboard's attention explorer with a
DINOv2-with-registers run beside an MAE run."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import foreign_layouts as L
import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import PY, make_run, subprocess_env
from foreign_layouts import D, HEADS
from safetensors.torch import load_file

import rmae
from analysis.encoder import block_tokens, describe
from rmae.runfolder import RunFolder

APP = str(Path(__file__).resolve().parents[1] / "dashboards" / "app.py")


def _dinov2_reg4() -> dict[str, torch.Tensor]:
    extra = {"mask_token": (1, D), "register_tokens": (1, 4, D)}
    return L.values(L.encoder(14, 3, style="dinov2", extra=extra), 7)


def _dino_release() -> dict[str, torch.Tensor]:
    return L.values(L.encoder(8, 4), 8)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("foreign-files")
    out = {"dinov2": root / "dinov2_vits14_reg4_pretrain.pth", "dino": root / "dino_deitsmall8_pretrain.pth",
           "dino_train": root / "checkpoint.pth", "resnet": root / "resnet50.pth", "moco_conv": root / "moco_conv.pth.tar",
           "layerscale": root / "vit_ls.pth"}
    torch.save(_dinov2_reg4(), out["dinov2"])
    torch.save(_dino_release(), out["dino"])
    torch.save({"teacher": L.prefixed(_dino_release(), "backbone."), "student": L.prefixed(_dino_release(), "module.backbone."),
                "epoch": 1, "args": argparse.Namespace(arch="vit_small")}, out["dino_train"])
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 2048)}, out["resnet"])
    conv_stem = {"patch_embed.proj.0.weight": torch.zeros(6, 3, 3, 3), "cls_token": torch.zeros(1, 1, D)}
    torch.save({"arch": "vit_conv_small", "state_dict": L.prefixed(conv_stem, "module.base_encoder.")}, out["moco_conv"])
    # LayerScale without DINOv2's mask token: no project's signature
    torch.save(L.values(L.encoder(8, 4, style="dinov2"), 9), out["layerscale"])
    return out


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory) -> dict[str, Path]:
    """Runs made by the `rmae import` / `rmae export` commands (one interpreter for all)."""
    root = tmp_path_factory.mktemp("foreign-runs")
    r = {"dinov2": root / "dinov2-reg4", "dinov2_56": root / "dinov2-reg4-56", "reimported": root / "reimported",
         "by_arch": root / "by-arch"}
    exported = root / "dinov2_reg4_timm.safetensors"
    argvs = [["import", str(files["dinov2"]), "--out", str(r["dinov2"]), f"num_heads={HEADS}"],
             ["import", str(files["dinov2"]), "--out", str(r["dinov2_56"]), f"num_heads={HEADS}", "img_size=56"],
             ["export", str(r["dinov2"]), "--format", "timm", "--out", str(exported)],
             ["import", str(exported), "--out", str(r["reimported"])],
             ["import", str(files["layerscale"]), "--out", str(r["by_arch"]), "arch=vit_small_patch16_224",
              f"num_heads={HEADS}"]]
    for argv, (rc, out, err) in zip(argvs, L.run_commands(argvs, PY, subprocess_env(root))):
        assert rc == 0, (argv, err)
    r["exported"] = exported
    return r


def test_refusals_are_one_clear_line(files, tmp_path):
    ours = tmp_path / "ours.safetensors"
    rmae.save_model(rmae.create_model("mae_vit_tiny_patch8", img_size=32, depth=1), ours)
    cases = [
        ([str(files["resnet"])], ["resnet50.pth", "not a ViT state dict", "conv1.weight"]),
        ([str(files["dino"])], ["dino_deitsmall8_pretrain.pth", "width 48 is not a standard ViT size", "num_heads=N"]),
        ([str(files["dino"]), "num_heads=3", "norm_pix_loss=false"], ["DINO release", "norm_pix_loss do not apply"]),
        ([str(files["dino_train"]), "num_heads=3", "checkpoint_key=momentum"],
         ["has teacher and student, not 'momentum'", "checkpoint_key=teacher"]),
        ([str(files["dino"]), "num_heads=3", "checkpoint_key=student"], ["applies to training checkpoints"]),
        ([str(files["moco_conv"])], ["convolutional stem", "vit_conv_"]),
        ([str(files["layerscale"])], ["LayerScale", "pass source=KIND", "arch=TIMM_NAME", "ViT encoder width 48"]),
        ([str(files["dino"]), "num_heads=3", "arch=vit_nonexistent_patch8"], ["arch=vit_nonexistent_patch8", "Unknown model"]),
        ([str(files["dino"]), "num_heads=3", "source=beit"],
         ["dino_deitsmall8_pretrain.pth: the beit weights do not fit timm's beit_base_patch16_224", "arch=TIMM_NAME"]),
        ([str(ours), "checkpoint_key=student"], ["apply to foreign encoders", "rmae's own"]),
        ([str(files["dino"]), "interpolate_offset=0"], ["interpolate_offset", "DINOv2"]),
        ([str(files["dino"]), "img_size=30", "num_heads=3"],
         ["dino_deitsmall8_pretrain.pth: img_size (30, 30) is not a multiple of the patch size 8"]),
    ]
    argvs = [["import", *args[:1], "--out", str(tmp_path / f"run{i}"), *args[1:]] for i, (args, _) in enumerate(cases)]
    for (args, needles), (rc, out, err) in zip(cases, L.run_commands(argvs, PY, subprocess_env(tmp_path))):
        assert rc == 2 and not out, (args, out, err)
        assert err.startswith("rmae import: error: ") and err.count("\n") == 1, err  # one line, no traceback
        for needle in needles:
            assert needle in err, (needle, err)
    assert not any((tmp_path / f"run{i}" / "model.safetensors").exists() for i in range(len(cases)))


def _features(model: torch.nn.Module, size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        return model.forward_features(x), block_tokens(model, x, [0, 1])


def test_export_is_timm_loadable_and_reimports_to_the_same_encoder(runs):
    run = rmae.load_model(runs["dinov2"])
    meta = __import__("safetensors").safe_open(str(runs["exported"]), "pt").metadata()
    vit = timm.create_model(meta["timm_model"], pretrained=False, **yaml.safe_load(meta["timm_kwargs"])).eval()
    vit.load_state_dict(load_file(runs["exported"]), strict=True)  # timm alone reads the export
    back = rmae.load_model(runs["reimported"])
    assert back.source_kind == run.source_kind == "dinov2" and back.num_prefix_tokens == 5
    ref, ref_blocks = _features(run, 42)
    for other in (vit, back):
        ff, blocks = _features(other, 42)
        assert torch.equal(ff, ref) and all(torch.equal(a, b) for a, b in zip(blocks, ref_blocks))
    # the re-imported run keeps DINOv2's own resampling rule (from the export's metadata)
    assert torch.equal(_features(rmae.load_model(runs["reimported"], img_size=28), 28)[0],
                       _features(rmae.load_model(runs["dinov2"], img_size=28), 28)[0])


def test_arch_imports_a_timm_layout_no_signature_names(runs, files):
    """A ViT with LayerScale but no project's signature is refused (see above) unless arch= names it."""
    model = rmae.load_model(runs["by_arch"])
    cfg = yaml.safe_load((runs["by_arch"] / "config.yaml").read_text())
    assert model.source_kind == "timm" and cfg["arch"]["timm"] == "vit_small_patch16_224"
    assert cfg["arch"]["resample"] == {"pos_embed": "timm"}
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=D, depth=2,
                            num_heads=HEADS, init_values=1.0, num_classes=0).eval()
    vit.load_state_dict(torch.load(files["layerscale"]), strict=True)
    assert torch.equal(_features(model, 32)[0], _features(vit, 32)[0])


def test_half_precision_weights_run_in_float32(files, tmp_path):
    sd = torch.load(files["dinov2"])
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / "half.pth")
    model = rmae.load_model(tmp_path / "half.pth", num_heads=HEADS)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    widened = tmp_path / "widened.pth"
    torch.save({k: v.half().float() for k, v in sd.items()}, widened)
    assert torch.equal(_features(model, 42)[0], _features(rmae.load_model(widened, num_heads=HEADS), 42)[0])


def test_image_size_at_import_or_at_load_is_the_same_encoder(runs, files):
    cfg = yaml.safe_load((runs["dinov2_56"] / "config.yaml").read_text())
    assert cfg["arch"]["img_size"] == [56, 56] and cfg["arch"]["kwargs"]["img_size"] == 42  # weights stay native
    assert load_file(runs["dinov2_56"] / "model.safetensors")["pos_embed"].shape == (1, 9, D)
    at_import = rmae.load_model(runs["dinov2_56"])
    at_load = rmae.load_model(runs["dinov2"], img_size=56)
    from_file = rmae.load_model(files["dinov2"], num_heads=HEADS, img_size=56)
    assert describe(at_import).input_size == (56, 56) and describe(at_import).grid == (4, 4)
    ref = _features(at_load, 56)[0]
    assert torch.equal(_features(at_import, 56)[0], ref) and torch.equal(_features(from_file, 56)[0], ref)
    assert from_file.source == str(files["dinov2"]) and not from_file.training
    with pytest.raises(rmae.CheckpointError, match="norm_pix_loss do not apply; img_size does"):
        rmae.load_model(runs["dinov2"], norm_pix_loss=False)


def test_run_identity_and_feature_cache_follow_the_recorded_architecture(runs, tmp_path):
    from analysis.feature_cache import resolve_run

    copy = tmp_path / "copy"
    shutil.copytree(runs["dinov2"], copy)
    assert RunFolder(copy).digest() == RunFolder(runs["dinov2"]).digest()
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["arch"]["img_size"] = [56, 56]  # same weights file, another size: another encoder
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert RunFolder(copy).digest() != RunFolder(runs["dinov2"]).digest()
    w = resolve_run(copy)
    assert (w.depth, w.image_size, w.digest) == (2, 56, RunFolder(copy).digest())


def test_analyze_dinov2_with_registers_beside_mae_at_one_size(runs, tmp_path):
    """Patch 14 and patch 8 at 56²: every metric per run on its own grid, paired differences, and
    layer CKA over each image's mean patch token (token CKA needs one grid)."""
    from analysis import metrics as M
    from analysis.analyze import AnalyzeConfig, analyze
    from rmae.data import evaluation_loader

    mae = make_run(tmp_path / "mae", name="mae_vit_tiny_patch8", img_size=56)
    res = analyze([mae, runs["dinov2_56"]], AnalyzeConfig(data="scenes:val:8", probes=(), batch_size=8), progress=False)
    other = runs["dinov2_56"].name
    assert res.reference == "mae" and res.runs[other].family == "dinov2"
    diff = res.differences[f"{other} − mae"]
    assert {"attention_distance", "instance_mass", "cls_jaccard", "corloc"} <= set(diff)
    cka = res.cka[other]
    models = [rmae.load_model(p) for p in (mae, runs["dinov2_56"])]
    loader = evaluation_loader("scenes:val:8", 56, batch_size=8, seed=0, limit=128)
    assert cka["tokens"] == "mean"
    assert np.allclose(cka["matrix"], M.layer_cka(*models, loader, tokens="mean").numpy())
    with pytest.raises(ValueError, match="different patch grids"):
        M.layer_cka(*models, loader, tokens="patch")


def test_hugging_face_folder_imports_as_it_was_saved(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=4 * D,
                       image_size=32, patch_size=8, layer_norm_eps=1e-5, decoder_num_hidden_layers=1,
                       decoder_hidden_size=32, decoder_num_attention_heads=2, decoder_intermediate_size=64)
    ViTMAEForPreTraining(cfg).save_pretrained(tmp_path / "hf")
    model = rmae.load_model(tmp_path / "hf")  # the save_pretrained folder itself; heads and eps from config.json
    assert model.source_kind == "hf-vitmae" and model.blocks[0].attn.num_heads == HEADS
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}


@pytest.fixture
def dashboard(runs, tmp_path, monkeypatch):
    """The dashboard on a root holding an MAE run (32², patch 8) and a DINOv2-with-registers run
    (42², patch 14, five prefix tokens)."""
    from streamlit.testing.v1 import AppTest

    root = tmp_path / "runs"
    make_run(root / "mae", name="mae_vit_tiny_patch8")
    shutil.copytree(runs["dinov2"], root / "dinov2-reg4")
    monkeypatch.setenv("RMAE_DASHBOARD_RUNS", str(root))
    monkeypatch.setenv("RMAE_DASHBOARD_DEBUG", "1")  # page errors raise instead of st.error
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    return at


def test_dashboard_attention_explorer_shows_dinov2_registers_beside_mae(dashboard):
    at = dashboard
    at.sidebar.radio(key="src").set_value("photos").run()
    assert not at.exception, at.exception
    titles = [s.value for s in at.subheader[:2]]
    assert titles[0].startswith("mae — mae_vit_tiny_patch8 · mae · 32²/p8"), titles
    assert titles[1].startswith("dinov2-reg4 — vit_small_patch14_reg4_dinov2 · dinov2 · 42²/p14"), titles
    captions = [i.proto.imgs[0].caption for i in at.get("image")]
    assert len(captions) == 6  # patch query, CLS and rollout maps for each run
    # the same point (the image centre) is patch (2, 2) of MAE's 4×4 grid and (1, 1) of DINOv2's 3×3
    assert captions[0].startswith("patch query (2, 2) · layer 2") and captions[3].startswith("patch query (1, 1) · layer 2")
    assert captions[4].startswith("CLS → patches · layer 2") and captions[5].startswith("rollout from the query · layers 1–2")
    urls = [i.proto.imgs[0].url for i in at.get("image")]
    at.slider(key="layer").set_value(1).run()
    assert not at.exception, at.exception
    assert at.get("image")[3].proto.imgs[0].caption.startswith("patch query (1, 1) · layer 1")
    assert [i.proto.imgs[0].url for i in at.get("image")] != urls


def test_dashboard_instance_summary_with_runs_of_different_grids(dashboard):
    at = dashboard  # the default image is a scene with instances; its centre is background in one grid only
    assert not at.exception, at.exception[0].message
    table = at.dataframe[0].value
    assert list(table.index) == ["mae", "dinov2-reg4"] and table["instance mass"].isna().sum() == 1
