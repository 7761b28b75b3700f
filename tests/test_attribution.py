"""analysis.attribution: planted signals that IG and Occlusion must localise, Grad-CAM's token
grid on real tiny ViTs (known answers, captum's LayerGradCam on the token grid, registers, the
timm export), and the headless-encoder score functions."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
from captum.attr import LayerGradCam
from safetensors.torch import load_file

import rmae
from analysis import attribution as A
from analysis import encoder
from analysis.encoder import pool_tokens
from conftest import tiny_model, tiny_timm_vit
from rmae.data import IMAGENET_MEAN, IMAGENET_STD

P = 8  # patch size
H, W = 24, 32  # non-square: a 3×4 patch grid catches transposed reshapes
PLANTED = [(1, 2), (2, 0)]  # class k looks only at patch PLANTED[k] (row, col)


class PlantedPatchModel(nn.Module):
    """Frozen scores that depend on one known patch each: ``s_k = g(⟨w_k, x⟩)`` with ``w_k`` zero
    outside patch ``PLANTED[k]``; ``g`` = identity (linear) or softplus·2 (nonlinear)."""

    def __init__(self, nonlinear: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.zeros(len(PLANTED), 3, H, W)
        for k, (r, c) in enumerate(PLANTED):
            w[k, :, r * P:(r + 1) * P, c * P:(c + 1) * P] = torch.rand(3, P, P, generator=g) + 0.5
        self.register_buffer("w", w)
        self.nonlinear = nonlinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.einsum("bchw,kchw->bk", x, self.w)
        return 2 * nn.functional.softplus(s / 10) if self.nonlinear else s


def _images(B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed)).abs() + 0.1


def _top_patch(attr: torch.Tensor, reduce: str = "sum") -> list[tuple[int, int]]:
    scores = A.patch_scores(attr, P, reduce=reduce, absolute=True)
    flat = scores.flatten(1).argmax(1)
    gw = scores.shape[-1]
    return [(int(i) // gw, int(i) % gw) for i in flat]


# ------------------------------------------------------------------------------------------
# Integrated Gradients and Occlusion localise a planted signal


@pytest.mark.parametrize("nonlinear", [False, True])
def test_integrated_gradients_localises_planted_patch(nonlinear):
    model = PlantedPatchModel(nonlinear)
    x = _images()
    for k in range(len(PLANTED)):
        attr, delta = A.integrated_gradients(model, x, target=k, steps=16, return_delta=True)
        assert attr.shape == x.shape
        assert _top_patch(attr) == [PLANTED[k]] * 2
        scores = A.patch_scores(attr, P)
        r, c = PLANTED[k]
        outside = scores.clone()
        outside[:, r, c] = 0
        assert outside.abs().max() < 1e-6  # nothing outside the planted patch
        gap = model(x)[:, k] - model(A.make_baseline(x, "black"))[:, k]
        assert (delta.abs() < 0.02 * gap.abs()).all()  # completeness, up to quadrature error
    # a per-image target picks a different planted patch per image
    attr = A.integrated_gradients(model, x, target=torch.tensor([0, 1]), steps=8)
    assert _top_patch(attr) == [PLANTED[0], PLANTED[1]]


def test_integrated_gradients_is_exact_for_a_linear_score():
    """IG of a linear score is (x − x')·w, whatever the steps: checks the baseline in normalised space."""
    model = PlantedPatchModel()
    x = _images()
    black = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    attr = A.integrated_gradients(model, x, target=1, steps=4, baseline="black")
    torch.testing.assert_close(attr, (x - black) * model.w[1], rtol=1e-5, atol=1e-5)
    attr = A.integrated_gradients(model, x, target=1, steps=4, baseline="black", mean=None, std=None)
    torch.testing.assert_close(attr, x * model.w[1], rtol=1e-5, atol=1e-5)
    blurred = A.make_baseline(x, "blur", blur_sigma=2.0)
    attr = A.integrated_gradients(model, x, target=0, steps=4, baseline="blur", blur_sigma=2.0)
    torch.testing.assert_close(attr, (x - blurred) * model.w[0], rtol=1e-5, atol=1e-5)
    chunked = A.integrated_gradients(model, x, target=0, steps=4, baseline="blur", blur_sigma=2.0,
                                     internal_batch_size=4)
    torch.testing.assert_close(chunked, attr)


@pytest.mark.parametrize("nonlinear", [False, True])
def test_occlusion_localises_planted_patch_with_patch_aligned_windows(nonlinear):
    model = PlantedPatchModel(nonlinear)
    x = _images()
    for k in range(len(PLANTED)):
        attr = A.occlusion(model, x, target=k, patch_size=P)
        assert attr.shape == x.shape
        assert _top_patch(attr, "mean") == [PLANTED[k]] * 2
        # patch-aligned: constant inside every patch (one window per token) …
        blocks = attr.reshape(2, 3, H // P, P, W // P, P)
        assert (blocks.amax(dim=(1, 3, 5)) - blocks.amin(dim=(1, 3, 5))).abs().max() < 1e-6
        # … equal to the score drop when exactly that patch becomes the baseline (0)
        r, c = PLANTED[k]
        occluded = x.clone()
        occluded[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P] = 0
        drop = model(x)[:, k] - model(occluded)[:, k]
        torch.testing.assert_close(A.patch_scores(attr, P, reduce="mean")[:, r, c], drop, rtol=1e-5, atol=1e-5)


def test_occlusion_mean_baseline_and_batching():
    model = PlantedPatchModel(nonlinear=True)
    x = _images()
    attr = A.occlusion(model, x, target=0, patch_size=P, baseline="mean")
    r, c = PLANTED[0]
    occluded = x.clone()
    occluded[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P] = x.mean(dim=(2, 3), keepdim=True)
    drop = model(x)[:, 0] - model(occluded)[:, 0]
    torch.testing.assert_close(A.patch_scores(attr, P, reduce="mean")[:, r, c], drop, rtol=1e-5, atol=1e-5)
    one_at_a_time = A.occlusion(model, x, target=0, patch_size=P, baseline="mean", perturbations_per_eval=1)
    torch.testing.assert_close(attr, one_at_a_time)
    with pytest.raises(ValueError, match="divisible"):
        A.occlusion(model, x, target=0, patch_size=7)


def test_baselines():
    x = _images()
    flat = torch.full((1, 3, 16, 16), 0.7)
    torch.testing.assert_close(A.make_baseline(flat, "blur"), flat)  # blur keeps a flat image
    blurred = A.make_baseline(x, "blur", blur_sigma=3.0)
    assert blurred.shape == x.shape and blurred.std() < 0.5 * x.std()
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), rtol=0.1, atol=0.05)
    assert A.make_baseline(x, "zero").abs().max() == 0
    torch.testing.assert_close(A.make_baseline(x, "mean")[..., 3, 5], x.mean(dim=(2, 3)))
    torch.testing.assert_close(A.make_baseline(x, 0.25), torch.full_like(x, 0.25))
    with pytest.raises(ValueError, match="baseline"):
        A.make_baseline(x, "white")


# ------------------------------------------------------------------------------------------
# Grad-CAM on the token grid


@pytest.fixture(scope="module")
def vit():
    return tiny_model("rmae_vit_tiny_patch8", img_size=(H, W))


class ReadOne(nn.Module):
    """Score = channel ``c`` of patch token ``t`` of the final tokens (a score module by hand)."""

    def __init__(self, model: nn.Module, t: int, c: int) -> None:
        super().__init__()
        self.model, self.t, self.c = model, t, c

    def score_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, encoder.num_prefix_tokens(self.model) + self.t, self.c:self.c + 1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.score_tokens(self.model.forward_features(images))


def test_grad_cam_peaks_at_the_token_the_score_reads(vit):
    """With the final norm removed, the final tokens are the last block's output. Score = channel c
    of patch token t there. Then every gradient is at token t, α = e_c / L and the (pre-ReLU)
    CAM(j) = A_{j,c} / L exactly: the map must equal channel c of the token grid, so a wrong
    reshape (transposed grid, tokens as channels, cls kept) cannot pass."""
    raw = copy.deepcopy(vit)
    raw.norm = nn.Identity()
    x = _images(2, seed=1)
    gh, gw = raw.patch_embed.grid_size
    t = 1 * gw + 2  # patch (1, 2)
    with torch.no_grad():
        acts = raw.forward_features(x)[:, 1:]  # [B, L, C]
    others = torch.cat([acts[:, :t], acts[:, t + 1:]], dim=1).amax(dim=1)
    c = int((acts[:, t] - others).amin(0).argmax())  # a channel where token t is the largest in both images
    assert (acts[:, t, c] > others[:, c]).all()
    score = ReadOne(raw, t, c)

    cam = A.grad_cam(score, x, layer=-1, at="output", relu=False, upsample=None)
    assert cam.shape == (2, gh, gw)
    expected = acts[..., c].reshape(2, gh, gw) / (gh * gw)
    torch.testing.assert_close(cam, expected, rtol=1e-4, atol=1e-6)
    relu = A.grad_cam(score, x, layer=-1, at="output", upsample=None)
    torch.testing.assert_close(relu, expected.clamp_min(0))
    assert [divmod(int(i), gw) for i in cam.flatten(1).argmax(1)] == [(1, 2), (1, 2)]
    up = A.grad_cam(score, x, layer=-1, at="output", relu=False, upsample="nearest")
    assert up.shape == (2, H, W)
    torch.testing.assert_close(up[:, P * 1:P * 2, P * 2:P * 3], cam[:, 1:2, 2:3].expand(2, P, P))


class _TokenGrid(nn.Module):
    """The token-grid formulation Grad-CAM used to run through captum: an identity that shows
    patch tokens ``[B, L, C]`` as ``[B, C, gh, gw]`` (the layer captum's LayerGradCam hooks)."""

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)


def _captum_grad_cam(score: nn.Module, x: torch.Tensor, target, layer: int, at: str) -> torch.Tensor:
    """Independent reference: captum's LayerGradCam on the token grid, routed through a (pre-)hook
    on ``blocks[layer]`` — the pre-surface implementation, kept here to pin the new one."""
    model = score.model
    P, grid = encoder.num_prefix_tokens(model), encoder.grid_size(model)
    to_grid = _TokenGrid(grid)

    def through(tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, :P], to_grid(tokens[:, P:]).flatten(2).transpose(1, 2)], dim=1)

    block = model.blocks[layer]
    handle = (block.register_forward_pre_hook(lambda _m, args: (through(args[0]), *args[1:])) if at == "input"
              else block.register_forward_hook(lambda _m, _a, out: through(out)))
    try:
        return LayerGradCam(score, to_grid).attribute(x, target=target, relu_attributions=False).detach()[:, 0]
    finally:
        handle.remove()


@pytest.mark.parametrize("which", ["ours", "timm with registers"])
def test_grad_cam_equals_captums_layer_grad_cam_on_the_token_grid(which):
    model = tiny_model(depth=3) if which == "ours" else tiny_timm_vit(reg_tokens=4, depth=3)
    torch.manual_seed(11)
    score = A.HeadLogits(model, nn.Linear(encoder.describe(model).embed_dim, 4), pool="mean")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    target = torch.tensor([1, 3])
    for layer, at in [(0, "output"), (1, "input"), (2, "output"), (-1, "input")]:
        ours = A.grad_cam(score, x, target, layer=layer, at=at, relu=False, upsample=None)
        ref = _captum_grad_cam(score, x, target, layer, at)
        assert ours.abs().max() > 1e-3, (layer, at)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7, msg=f"layer {layer}, {at}")


def test_grad_cam_input_of_block_equals_output_of_previous(vit):
    head = nn.Linear(vit.config.embed_dim, 4)
    score = A.HeadLogits(vit, head, pool="mean")
    x = _images(2, seed=2)
    a = A.grad_cam(score, x, target=3, layer=1, at="input", upsample=None)
    b = A.grad_cam(score, x, target=3, layer=0, at="output", upsample=None)
    torch.testing.assert_close(a, b)
    assert a.abs().max() > 0
    with pytest.raises(ValueError, match="block 0"):
        A.grad_cam(score, x, target=3, layer=0, at="input")
    with pytest.raises(ValueError, match="out of range"):
        A.grad_cam(score, x, target=3, layer=2)
    with pytest.raises(ValueError, match="target"):
        A.grad_cam(score, x)  # four logits, no target


def test_grad_cam_with_cls_pooling_needs_the_last_blocks_input(vit):
    """With cls pooling nothing after the last block mixes tokens: the gradient at its output patch
    tokens is exactly zero (blank map) — why the default is the block's input."""
    torch.manual_seed(3)
    score = A.HeadLogits(vit, nn.Linear(vit.config.embed_dim, 4), pool="cls")
    x = _images(2, seed=3)
    blank = A.grad_cam(score, x, target=1, layer=-1, at="output")
    assert blank.abs().max() == 0
    cam = A.grad_cam(score, x, target=1)  # default: input of the last block, upsampled
    assert cam.shape == (2, H, W) and torch.isfinite(cam).all() and (cam >= 0).all()
    assert cam.abs().max() > 0
    signed = A.grad_cam(score, x, target=1, relu=False, upsample=None)
    assert (signed < 0).any()  # ReLU is what removed the negative evidence


def test_grad_cam_on_timm_vit():
    torch.manual_seed(4)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=(H, W), patch_size=P, embed_dim=48, depth=2, num_heads=3, num_classes=0).eval()
    x = _images(2, seed=4)
    ref = _images(1, seed=9)
    with torch.no_grad():
        reference = pool_tokens(vit.forward_features(ref))[0]
    cam = A.grad_cam(A.EmbeddingSimilarity(vit, reference), x)
    assert cam.shape == (2, H, W) and torch.isfinite(cam).all() and cam.abs().max() > 0
    with pytest.raises(ValueError, match="score_tokens"):
        A.grad_cam(lambda images: vit.forward_features(images)[:, 0, :1], x)


def test_same_grad_cam_for_our_model_and_its_timm_export(tmp_path):
    ours = tiny_model()
    name, kwargs = rmae.export_timm(ours, tmp_path / "enc.safetensors")
    vit = timm.create_model(name, **kwargs).eval()
    vit.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        reference = pool_tokens(ours.forward_features(x.flip(0)), "mean")
    cams = [A.grad_cam(A.EmbeddingSimilarity(m, reference, pool="mean"), x, layer=layer, upsample=None)
            for m in (ours, vit) for layer in (1, -1)]
    torch.testing.assert_close(cams[0], cams[2], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(cams[1], cams[3], rtol=1e-4, atol=1e-7)
    assert cams[0].abs().max() > 0


def test_grad_cam_and_scores_follow_the_model_device():
    """Model and images on the CPU while new tensors default to the meta device: a tensor made
    without naming its device would land on meta and fail."""
    model = tiny_timm_vit(reg_tokens=2)
    head = nn.Linear(48, 3)
    x = torch.randn(2, 3, 32, 32)
    expected = A.grad_cam(A.HeadLogits(model, head), x, target=2)
    torch.set_default_device("meta")
    try:
        got = A.grad_cam(A.HeadLogits(model, head), x, target=2)
        sim = A.EmbeddingSimilarity(model, torch.ones(48, device="cpu"))(x)
    finally:
        torch.set_default_device(None)
    assert got.device.type == "cpu" and sim.device.type == "cpu"
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------------------
# score functions for headless encoders


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_embedding_similarity_with_own_embedding_is_one(vit, pool):
    x = _images(3, seed=5)
    with torch.no_grad():
        own = pool_tokens(vit.forward_features(x), pool)
        sim = A.EmbeddingSimilarity(vit, own, pool=pool)(x)
    assert sim.shape == (3, 1)
    torch.testing.assert_close(sim, torch.ones(3, 1), rtol=0, atol=1e-5)
    with torch.no_grad():
        other = A.EmbeddingSimilarity(vit, own[0], pool=pool)(x)  # one reference for all images
    assert other[0].item() == pytest.approx(1.0, abs=1e-5) and (other[1:] < 1 - 1e-4).all()


def test_per_image_reference_survives_captum_batch_expansion(vit):
    """captum evaluates [steps·B] batches; a per-image reference must follow its image."""
    x = _images(2, seed=6)
    with torch.no_grad():
        refs = pool_tokens(vit.forward_features(_images(2, seed=7)))
    both = A.integrated_gradients(A.EmbeddingSimilarity(vit, refs), x, steps=4, baseline="zero")
    for i in range(2):
        alone = A.integrated_gradients(A.EmbeddingSimilarity(vit, refs[i:i + 1]), x[i:i + 1], steps=4,
                                       baseline="zero")
        torch.testing.assert_close(both[i:i + 1], alone, rtol=1e-4, atol=1e-6)
    occ = A.occlusion(A.EmbeddingSimilarity(vit, refs), x, patch_size=P, perturbations_per_eval=5)
    assert occ.shape == x.shape and torch.isfinite(occ).all()


def test_head_logits_and_ig_completeness_on_real_vit(vit):
    torch.manual_seed(8)
    head = nn.Linear(vit.config.embed_dim, 5)
    score = A.HeadLogits(vit, head)
    x = _images(2, seed=8)
    assert score(x).shape == (2, 5)
    attr, delta = A.integrated_gradients(score, x, target=2, steps=32, baseline="black", return_delta=True)
    gap = score(x)[:, 2] - score(A.make_baseline(x, "black"))[:, 2]
    assert delta.abs().max() < 0.05 * gap.abs().max()
    torch.testing.assert_close(attr.sum(dim=(1, 2, 3)), gap.detach(), rtol=0.05, atol=0.05 * gap.abs().max().item())
