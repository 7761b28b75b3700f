"""Foreign encoders, one per format, in the exact layout its project saves (key names and nesting
written here from the projects' sources, random weights): ``rmae import`` (the CLI) makes a run
folder whose features equal a reference implementation's at the native image size and at another
size, and ``analyze`` gives every attention metric on it.

References are independent of ``rmae.foreign``: timm's model built from the original layout by
timm's own ``checkpoint_filter_fn`` (the documented path), or ``transformers``' ViTMAE. At the
other size the reference's position tables come from the original projects' interpolation calls,
transcribed in ``foreign_layouts.py`` (DINO's ``scale_factor = (g + 0.1) / g0``; DINOv2's offset / antialias; the
bicubic ``size=`` of DeiT's, MAE's and BEiT's loaders and of Hugging Face; MoCo v3's sin-cos
formula; BEiT's geometric offsets interpolated by SciPy's ``RegularGridInterpolator(cubic)``, an
implementation of the interpolating cubic spline other than the one rmae uses). Parity against
the original projects' own code was checked outside this repository (their code is not ours
to ship).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import foreign_layouts as L
import pytest
import timm
import torch
import yaml
from conftest import PY, subprocess_env
from foreign_layouts import D, DEPTH, HEADS

import rmae
from analysis.encoder import block_tokens, describe

LAYERS = [0, 1]


# ------------------------------------------------------------------------------------------
# the formats


@dataclass
class Case:
    name: str
    kind: str  # the expected source_kind
    write: Callable[[Path], Path]  # writes the file(s), returns the path given to `rmae import`
    reference: Callable[[int], Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]]
    native: int
    other: int
    keys: list[str] = field(default_factory=list)  # key=value words for `rmae import`
    prefix: int = 1


def _hooked(model: torch.nn.Module, blocks, norm) -> Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
    """A reference's (final-norm tokens, [block 0 output, normed block 1 output]) by forward hooks."""

    def run(x: torch.Tensor):
        outs = {}
        hs = [b.register_forward_hook(lambda _m, _a, o, i=i: outs.__setitem__(i, o)) for i, b in enumerate(blocks)]
        with torch.no_grad():
            model.forward_features(x)
        for h in hs:
            h.remove()
        last = len(blocks) - 1
        return norm(outs[last]), [norm(outs[i]) if i == last else outs[i] for i in LAYERS]

    return run


def _timm_ref(name: str, size: int, sd: dict[str, torch.Tensor], filter_module, **kw):
    """timm's model at ``size`` loaded from an original layout through timm's checkpoint_filter_fn."""
    model = timm.create_model(name, pretrained=False, img_size=size, embed_dim=D, depth=DEPTH, num_heads=HEADS, **kw).eval()
    model.load_state_dict(filter_module.checkpoint_filter_fn(dict(sd), model), strict=True)
    return _hooked(model, model.blocks, model.norm)


def _vit_ref(encoder: Callable[[], dict[str, torch.Tensor]], patch: int, native: int, resample, **kw):
    from timm.models import vision_transformer as tv

    def at(size: int):
        sd = dict(encoder())
        if size != native:
            sd["pos_embed"] = resample(sd["pos_embed"], size // patch)
        return _timm_ref("vit_small_patch16_224", size, sd, tv, patch_size=patch, **kw)

    return at


def _save(obj: Any, name: str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        torch.save(obj() if callable(obj) else obj, folder / name)
        return folder / name

    return write


def _cases() -> list[Case]:
    cases = []
    dino_sd = lambda: L.values(L.encoder(8, 4), 1)  # noqa: E731
    dino_scale = lambda pos, g: L.interp_scale(pos, g, 0.1)  # noqa: E731
    cases.append(Case("dino-release", "dino", _save(dino_sd, "dino_deitsmall8_pretrain.pth"),
                      _vit_ref(dino_sd, 8, 32, dino_scale, num_classes=0), 32, 48, [f"num_heads={HEADS}"]))

    student_sd = lambda: L.values(L.encoder(8, 4), 2)  # noqa: E731
    dino_train = lambda: {  # noqa: E731 - main_dino.py's save_dict
        "student": {**L.prefixed(student_sd(), "module.backbone."), **L.prefixed(L.dino_head(3), "module.head.")},
        "teacher": {**L.prefixed(dino_sd(), "backbone."), **L.prefixed(L.dino_head(4), "head.")},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}, "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=8, out_dim=64), "dino_loss": {"center": torch.zeros(1, 64)}}
    cases.append(Case("dino-training-teacher", "dino", _save(dino_train, "checkpoint.pth"),
                      _vit_ref(dino_sd, 8, 32, dino_scale, num_classes=0), 32, 48, [f"num_heads={HEADS}"]))
    cases.append(Case("dino-training-student", "dino", _save(dino_train, "checkpoint.pth"),
                      _vit_ref(student_sd, 8, 32, dino_scale, num_classes=0), 32, 24,
                      [f"num_heads={HEADS}", "checkpoint_key=student"]))

    ibot_sd = lambda: L.values(L.encoder(8, 4), 5)  # noqa: E731
    cases.append(Case("ibot-teacher", "ibot", _save(lambda: {"state_dict": ibot_sd()}, "checkpoint_teacher.pth"),
                      _vit_ref(ibot_sd, 8, 32, dino_scale, num_classes=0), 32, 48, [f"num_heads={HEADS}"]))
    ibot_student = lambda: L.values(L.encoder(8, 4, extra={"masked_embed": (1, D)}), 6)  # noqa: E731
    ibot_head = {"mlp.0.weight": (32, D), "mlp.0.bias": (32,), "last_layer.weight_g": (64, 1),
                 "last_layer.weight_v": (64, 32), "last_layer2.weight_g": (64, 1), "last_layer2.weight_v": (64, 32)}
    ibot_full = lambda: {  # noqa: E731 - main_ibot.py's save_dict
        "student": {**L.prefixed(ibot_student(), "module.backbone."), **L.prefixed(L.values(ibot_head, 7), "module.head.")},
        "teacher": {**L.prefixed(ibot_sd(), "backbone."), **L.prefixed(L.values(ibot_head, 8), "head.")},
        "optimizer": {"state": {}, "param_groups": []}, "epoch": 10, "args": argparse.Namespace(arch="vit_small"),
        "ibot_loss": {"center": torch.zeros(1, 64), "center2": torch.zeros(1, 1, 64)}}
    ibot_student_enc = lambda: {k: v for k, v in ibot_student().items() if k != "masked_embed"}  # noqa: E731
    cases.append(Case("ibot-training-student", "ibot", _save(ibot_full, "checkpoint.pth"),
                      _vit_ref(ibot_student_enc, 8, 32, dino_scale, num_classes=0), 32, 48,
                      [f"num_heads={HEADS}", "checkpoint_key=student"]))

    for registers in (0, 4):
        def dv2_sd(registers=registers):
            extra = {"mask_token": (1, D), **({"register_tokens": (1, registers, D)} if registers else {})}
            return L.values(L.encoder(14, 3, style="dinov2", extra=extra), 10 + registers)

        def dv2_ref(size, registers=registers, dv2_sd=dv2_sd):
            from timm.models import vision_transformer as tv

            sd = dv2_sd()
            if size != 42:
                sd["pos_embed"] = L.interp_scale(sd["pos_embed"], size // 14, 0.0 if registers else 0.1, bool(registers))
            kw = dict(reg_tokens=registers, no_embed_class=True) if registers else {}
            return _timm_ref(f"vit_small_patch14{'_reg4' if registers else ''}_dinov2", size, sd, tv, num_classes=0, **kw)

        # with registers the hub interpolates with antialias: shrinking (42 → 28) is where it shows
        cases.append(Case(f"dinov2-reg{registers}", "dinov2", _save(dv2_sd, f"dinov2_vits14_reg{registers}_pretrain.pth"),
                          dv2_ref, 42, 28 if registers else 56, [f"num_heads={HEADS}"], prefix=1 + registers))

    def moco_encoder(seed):
        sd = L.values(L.encoder(8, 4, classes=0), seed)
        sd["pos_embed"] = L.mocov3_sincos(4, 4, D)  # fixed, never trained
        return sd

    projector = {"head.0.weight": (32, D), "head.1.weight": (32,), "head.1.bias": (32,), "head.3.weight": (16, 32)}
    moco_ck = lambda: {  # noqa: E731 - main_moco.py's save_checkpoint of the DDP-wrapped MoCo_ViT
        "epoch": 300, "arch": "vit_small", "optimizer": {"state": {}, "param_groups": []}, "scaler": {"scale": 65536.0},
        "state_dict": {**L.prefixed({**moco_encoder(20), **L.values(projector, 21)}, "module.base_encoder."),
                       **L.prefixed({**moco_encoder(22), **L.values(projector, 23)}, "module.momentum_encoder."),
                       **L.prefixed(L.values({"0.weight": (32, 16), "1.weight": (32,), "3.weight": (16, 32)}, 24),
                                   "module.predictor.")}}
    cases.append(Case("moco-v3", "moco-v3", _save(moco_ck, "checkpoint_0299.pth.tar"),
                      _vit_ref(lambda: moco_encoder(20), 8, 32, lambda pos, g: L.mocov3_sincos(g, g, D), num_classes=0),
                      32, 48, [f"num_heads={HEADS}"]))

    deit_sd = lambda: L.values(L.encoder(8, 4, classes=10), 30)  # noqa: E731
    cases.append(Case("deit", "deit", _save(lambda: {"model": deit_sd()}, "deit_small_patch16_224.pth"),
                      _vit_ref(deit_sd, 8, 32, L.interp_size, num_classes=10), 32, 48, [f"num_heads={HEADS}"]))

    distilled = lambda: L.values(L.encoder(8, 4, prefix=2, classes=10, extra={  # noqa: E731
        "dist_token": (1, 1, D), "head_dist.weight": (10, D), "head_dist.bias": (10,)}), 31)

    def distilled_ref(size):
        from timm.models import deit as tdeit

        sd = distilled()
        if size != 32:
            sd["pos_embed"] = L.interp_size(sd["pos_embed"], size // 8, extra=2)
        return _timm_ref("deit_small_distilled_patch16_224", size, sd, tdeit, patch_size=8, num_classes=10)

    cases.append(Case("deit-distilled", "deit-distilled", _save(lambda: {"model": distilled()}, "deit_distilled.pth"),
                      distilled_ref, 32, 48, [f"num_heads={HEADS}"], prefix=2))

    mae_ft = lambda: L.values(L.encoder(8, 4, final="fc_norm", classes=10), 32)  # noqa: E731 - models_vit, global_pool
    cases.append(Case("mae-finetuned", "mae-finetuned", _save(lambda: {"model": mae_ft()}, "mae_finetuned_vit_base.pth"),
                      _vit_ref(mae_ft, 8, 32, L.interp_size, num_classes=10, global_pool="avg", fc_norm=True), 32, 48,
                      [f"num_heads={HEADS}"]))

    def beit_sd(version, pretrain):
        if pretrain:  # modeling_pretrain: shared table, mask token, lm head (+ cls_pt_layers in v2)
            extra = {"mask_token": (1, 1, D), **L.rel_table("rel_pos_bias.", 4), "lm_head.weight": (64, D),
                     "lm_head.bias": (64,)}
            if version == 2:
                extra.update({f"cls_pt_layers.0.{k}": s for k, s in L.block("beit").items()})
            return L.values(L.encoder(8, 4, style="beit", pos=False, extra=extra), 40 + version)
        # modeling_finetune with an absolute embedding, a table per block, mean pooling and a head
        return L.values(L.encoder(8, 4, style="beit", final="fc_norm", classes=10, window=4), 42 + version)

    def beit_ref(version, pretrain):
        def at(size):
            from timm.models import beit as tbeit

            sd = {k: v for k, v in beit_sd(version, pretrain).items() if not k.startswith(("mask_token", "lm_head", "cls_pt"))}
            if size != 32:
                for k in [k for k in sd if k.endswith("relative_position_bias_table")]:
                    sd[k] = L.beit_table(sd[k], 4, size // 8)
                if "pos_embed" in sd:
                    sd["pos_embed"] = L.interp_size(sd["pos_embed"], size // 8)
            kw = (dict(use_abs_pos_emb=False, use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_fc_norm=False,
                       num_classes=0) if pretrain else
                  dict(use_abs_pos_emb=True, use_rel_pos_bias=True, use_fc_norm=True, num_classes=10))
            model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=size, patch_size=8, embed_dim=D,
                                      depth=DEPTH, num_heads=HEADS, init_values=0.1, **kw).eval()
            model.load_state_dict(tbeit.checkpoint_filter_fn(sd, model), strict=True)
            run = _hooked(model, model.blocks, model.norm)
            if version == 2:
                return run
            # BEiT v1 was trained on (x - 0.5) / 0.5; rmae feeds ImageNet-normalised images
            imagenet_mean, imagenet_std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
            return lambda x: run((x * imagenet_std.view(1, 3, 1, 1) + imagenet_mean.view(1, 3, 1, 1) - 0.5) / 0.5)

        return at

    beit_files = {(1, True): "beit_base_patch16_224_pt22k.pth", (2, True): "beitv2_base_patch16_224_pt1k.pth",
                  (2, False): "beitv2_base_patch16_224_pt1k_ft1k.pth"}
    for (version, pretrain), fname in beit_files.items():
        keys = [] if pretrain else ["source=beit-v2"]  # a fine-tuned file cannot tell v1 from v2
        cases.append(Case(f"beit{version}-{'pretrain' if pretrain else 'finetuned'}", "beit" if version == 1 else "beit-v2",
                          _save(lambda v=version, p=pretrain: {"model": beit_sd(v, p)}, fname), beit_ref(version, pretrain),
                          32, 48, keys))

    for pretraining in (True, False):
        cases.append(Case(f"hf-vitmae-{'pretraining' if pretraining else 'model'}", "hf-vitmae", _hf_writer(pretraining),
                          _hf_ref(pretraining), 32, 48, [] if pretraining else [f"num_heads={HEADS}"]))
    return cases


def _hf_model(pretraining: bool):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

    torch.manual_seed(50)
    cfg = ViTMAEConfig(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * D,
                       image_size=32, patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                       decoder_num_attention_heads=2, decoder_intermediate_size=64, mask_ratio=0.0)
    model = (ViTMAEForPreTraining if pretraining else ViTMAEModel)(cfg).eval()
    with torch.no_grad():  # non-trivial biases, norms and position embeddings (transformers 5 leaves them 0)
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(0.1 * torch.randn_like(v))
    return model


def _hf_writer(pretraining: bool) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        model = _hf_model(pretraining)
        if pretraining:  # save_pretrained: model.safetensors + config.json (transformers < 5 key names)
            model.save_pretrained(folder / "vit-mae")
            return folder / "vit-mae" / "model.safetensors"
        torch.save(model.state_dict(), folder / "vitmae_state_dict.bin")  # transformers ≥ 5 names, no config
        return folder / "vitmae_state_dict.bin"

    return write


def _hf_ref(pretraining: bool):
    def at(size: int):
        model = _hf_model(pretraining)
        encoder = model.vit if pretraining else model

        def run(x):
            L = (size // 8) ** 2
            with torch.no_grad():  # noise = arange keeps the patch order; mask_ratio 0 keeps all patches
                out = encoder(pixel_values=x, noise=torch.arange(L, dtype=torch.float32).expand(len(x), L),
                              interpolate_pos_encoding=True, output_hidden_states=True)
            return out.last_hidden_state, [out.hidden_states[1], out.last_hidden_state]

        return run

    return at


CASES = _cases()


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Every case written in its layout and imported by the ``rmae import`` command:
    name → (run folder, the command's output)."""
    root = tmp_path_factory.mktemp("foreign")
    argvs, runs = [], {}
    for case in CASES:
        folder = root / case.name
        folder.mkdir()
        src = case.write(folder)
        runs[case.name] = root / "runs" / case.name
        argvs.append(["import", str(src), "--out", str(runs[case.name]), *case.keys])
    results = L.run_commands(argvs, PY, subprocess_env(root))
    for case, (rc, out, err) in zip(CASES, results):
        assert rc == 0 and not err.strip(), f"{case.name}: exit {rc}: {err}"
    return {case.name: (runs[case.name], out) for case, (_, out, _) in zip(CASES, results)}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_import_features_equal_the_reference(case: Case, imported):
    run, out = imported[case.name]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["source_kind"] == case.kind and "model_config" not in cfg
    assert cfg["arch"]["img_size"] == [case.native, case.native]
    assert f": {case.kind} as timm {cfg['arch']['timm']}" in out
    for size in (case.native, case.other):
        model = rmae.load_model(run, img_size=size)
        info = describe(model)
        assert (model.training, info.family, info.input_size, info.num_prefix_tokens, info.heads) == \
               (False, case.kind, (size, size), case.prefix, HEADS)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        ref_ff, ref_blocks = case.reference(size)(x)
        with torch.no_grad():
            ff, blocks = model.forward_features(x), block_tokens(model, x, LAYERS)
        assert ff.shape == (2, case.prefix + (size // info.patch_size) ** 2, D)
        torch.testing.assert_close(ff, ref_ff, atol=2e-5, rtol=1e-5, msg=f"{case.name} at {size}²")
        for i, (a, b) in enumerate(zip(blocks, ref_blocks)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=f"{case.name} block {i} at {size}²")


ATTENTION_METRICS = sorted(k for k, m in __import__("analysis.registry", fromlist=["METRICS"]).METRICS.items()
                           if m.group in ("attention", "instance", "localization"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_analyze_gives_every_attention_metric(case: Case, imported):
    """``rmae analyze RUN --data scenes:val:8 --probes none`` on each foreign run (in-process)."""
    from analysis.analyze import AnalyzeConfig, analyze

    run, _ = imported[case.name]
    res = analyze([run], AnalyzeConfig(data="scenes:val:8", probes=(), cka=False, batch_size=8), progress=False)
    entry = res.runs[case.name]
    assert entry.family == case.kind and entry.model == yaml.safe_load((run / "config.yaml").read_text())["arch"]["timm"]
    assert sorted(k for k in entry.metrics if k in ATTENTION_METRICS) == ATTENTION_METRICS
    for key in ATTENTION_METRICS:
        est = entry.metrics[key]
        assert est.value is not None and math.isfinite(est.value), (case.name, key)
        if key in ("attention_distance", "attention_entropy", "attention_nmi"):
            assert len(est.per_layer) == DEPTH and all(v is not None for v in est.per_layer), (case.name, key)
    assert 0 < entry.metrics["attention_distance"].value < case.native * math.sqrt(2)
    assert set(res.meta["skipped"]) == {"interactive_iou"}  # no region decoder: the only thing skipped
