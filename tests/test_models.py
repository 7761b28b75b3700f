"""Model contracts: shapes, masking convention, losses, variants, attention switch, training signal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import rmae
from rmae.models import explicit_attention

FAMILY_VARIANTS = [("mae", "length"), ("rae", "length"), ("rae", "batch"), ("rae", "channel"),
                   ("rmae", "length"), ("rmae", "batch"), ("rmae", "channel")]
SIZES = [("tiny", 8, 32), ("small", 16, 64)]  # (size, patch, img_size)


def _regions(B: int, k: int, H: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, k, H, H, generator=g) > 0.5).float()


def _small(name: str, img: int = 32, **kw) -> rmae.MaskedAutoencoderViT:
    kw.setdefault("depth", 2)
    return rmae.create_model(name, img_size=img, **kw)


@pytest.mark.parametrize("family,variant", FAMILY_VARIANTS)
@pytest.mark.parametrize("size,patch,img", SIZES)
def test_output_shapes(family, variant, size, patch, img):
    torch.manual_seed(0)
    model = rmae.create_model(f"{family}_vit_{size}_patch{patch}", img_size=img, region_variant=variant,
                              num_regions=4, depth=2)
    B, k, L, p = 2, 4, (img // patch) ** 2, patch
    out = model(torch.randn(B, 3, img, img), regions=_regions(B, k, img))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.mask.shape == (B, L)
    assert out.mask.sum(1).tolist() == [L - int(L * 0.25)] * B
    if family == "rae":
        assert out.pred_pixel is None and out.loss_pixel is None
    else:
        assert out.pred_pixel.shape == (B, L, p * p * 3)
    if family == "mae":
        assert out.pred_region is None and out.loss_region is None
    else:
        assert out.pred_region.shape == (B, k, L, p * p)
    if family == "rmae":
        lam = model.config.region_loss_weight
        assert torch.allclose(out.loss, out.loss_pixel + lam * out.loss_region)


def test_noise_fixes_the_mask_argsort_ascending_first_kept():
    model = _small("rmae_vit_tiny_patch8").eval()
    B, L = 3, 16
    noise = torch.rand(B, L)
    images, regions = torch.randn(B, 3, 32, 32), _regions(B, 8, 32)
    out = model(images, regions=regions, mask_ratio=0.75, noise=noise)
    keep = int(L * (1 - 0.75))
    expected = torch.ones(B, L)
    expected.scatter_(1, noise.argsort(dim=1)[:, :keep], 0.0)  # 0 is keep, 1 is remove
    assert torch.equal(out.mask, expected)
    again = model(images, regions=regions, mask_ratio=0.75, noise=noise)
    assert torch.equal(out.loss, again.loss) and torch.equal(out.pred_region, again.pred_region)
    # num_visible picks exactly the n smallest-noise patches
    clicks = model(images, regions=regions, noise=noise, num_visible=5)
    assert clicks.mask.sum(1).tolist() == [L - 5] * B


def test_bad_noise_and_images_give_clear_errors():
    model = _small("rmae_vit_tiny_patch8")
    with pytest.raises(ValueError, match=r"noise must have shape \[B, L\]"):
        model(torch.randn(2, 3, 32, 32), regions=_regions(2, 8, 32), noise=torch.rand(2, 7))
    with pytest.raises(ValueError, match="resize the input"):
        model(torch.randn(2, 3, 48, 48), regions=_regions(2, 8, 48))
    with pytest.raises(ValueError, match="needs regions"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        rmae.create_model("mae_vit_tiny_patch16", img_size=40)
    with pytest.raises(TypeError, match="unknown model keyword"):
        rmae.create_model("mae_vit_tiny_patch16", num_region=8)
    with pytest.raises(ValueError, match="unknown model"):
        rmae.create_model("vit_tiny_patch16")


def test_pixel_loss_matches_hand_computation():
    torch.manual_seed(0)
    model = _small("mae_vit_tiny_patch8", norm_pix_loss=True).eval()
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    out = model(images, noise=noise)
    # patches in (row, col) order, pixels (py, px, c) — build them with unfold, independently
    p = 8
    patches = images.unfold(2, p, p).unfold(3, p, p)  # [B, C, h, w, p, p]
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(2, 16, p * p * 3)
    t = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((out.pred_pixel - t) ** 2).mean(-1)
    expected = (per_patch * out.mask).sum() / out.mask.sum()
    assert torch.allclose(out.loss_pixel, expected, atol=1e-6)
    assert torch.equal(model.unpatchify(model.patchify(images)), images)


@pytest.mark.parametrize("bg", [1.0, 0.3])
def test_region_loss_matches_hand_computation(bg):
    torch.manual_seed(0)
    model = _small("rae_vit_tiny_patch8", bg_loss_weight=bg).eval()
    B, k, p = 2, 3, 8
    regions, noise = _regions(B, k, 32), torch.rand(B, 16)
    out = model(torch.randn(B, 3, 32, 32), regions=regions, noise=noise)
    target = regions.unfold(2, p, p).unfold(3, p, p).reshape(B, k, 16, p * p)
    bce = F.binary_cross_entropy_with_logits(out.pred_region, target, reduction="none")
    bce = bce * torch.where(target == 0, torch.tensor(bg), torch.tensor(1.0))
    per_patch = bce.mean(-1).mean(1)
    expected = (per_patch * out.mask).sum() / out.mask.sum()
    assert torch.allclose(out.loss_region, expected, atol=1e-6)
    assert torch.allclose(out.loss, model.config.region_loss_weight * out.loss_region)


@pytest.mark.parametrize("variant", ["length", "batch"])
def test_length_and_batch_are_equivariant_to_region_order_and_accept_any_k(variant):
    torch.manual_seed(0)
    model = _small("rae_vit_tiny_patch8", region_variant=variant, num_regions=8).eval()
    images, regions, noise = torch.randn(2, 3, 32, 32), _regions(2, 5, 32), torch.rand(2, 16)
    perm = torch.tensor([3, 0, 4, 1, 2])
    a = model(images, regions=regions, noise=noise)
    b = model(images, regions=regions[:, perm], noise=noise)
    assert a.pred_region.shape[1] == 5  # k read from the input, not the config
    assert torch.allclose(a.pred_region[:, perm], b.pred_region, atol=1e-5)
    assert torch.allclose(a.loss, b.loss, atol=1e-6)


def test_channel_variant_fixes_k_and_says_so():
    model = _small("rae_vit_tiny_patch8", region_variant="channel", num_regions=4)
    assert model.region_patch_embed.proj.weight.shape[1] == 4
    with pytest.raises(ValueError, match="num_regions=4"):
        model(torch.randn(2, 3, 32, 32), regions=_regions(2, 6, 32))


def _region_branch_flops(variant: str, k: int) -> float:
    model = rmae.create_model("rae_vit_tiny_patch8", img_size=32, region_variant=variant, num_regions=k, depth=1)
    images, regions = torch.randn(1, 3, 32, 32), _regions(1, k, 32)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(images, regions=regions)
    return fc.get_total_flops()


def test_batch_variant_cost_grows_with_k_channel_stays_flat():
    # FLOPs added per extra region (counted, not timed). The batch variant runs a full decoder
    # pass per region; length adds one query + its spatial expansion; channel only widens the
    # patch embedding and the prediction layer.
    slope = {v: (_region_branch_flops(v, 16) - _region_branch_flops(v, 1)) / 15 for v in ("length", "batch", "channel")}
    assert slope["batch"] > 2 * slope["length"], slope
    assert slope["channel"] < 0.25 * slope["batch"], slope


@pytest.mark.parametrize("family,variant", FAMILY_VARIANTS)
def test_fused_and_explicit_attention_agree(family, variant):
    torch.manual_seed(0)
    model = _small(f"{family}_vit_tiny_patch8", region_variant=variant, num_regions=4).eval()
    images, regions, noise = torch.randn(2, 3, 32, 32), _regions(2, 4, 32), torch.rand(2, 16)
    with torch.no_grad():
        fused = model(images, regions=regions, noise=noise)
        with explicit_attention(model) as attn:
            explicit = model(images, regions=regions, noise=noise)
    assert len(attn) > 0
    for a in attn:
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)
    for name in ("loss", "pred_pixel", "pred_region"):
        x, y = getattr(fused, name), getattr(explicit, name)
        if x is not None:
            assert torch.allclose(x, y, atol=1e-5), name


def test_forward_features_whole_image_and_attention_weights():
    torch.manual_seed(0)
    model = _small("rmae_vit_tiny_patch8", depth=3).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(images)
        feats2, attn = model.forward_features(images, return_attention=True)
        all_visible = model.forward_encoder(images, torch.arange(16).expand(2, 16))
    assert feats.shape == (2, 17, 192)
    assert torch.allclose(feats, feats2, atol=1e-5)
    assert torch.allclose(feats, all_visible, atol=1e-6)
    assert len(attn) == 3 and all(a.shape == (2, 3, 17, 17) for a in attn)
    # the recorder is detached afterwards: fused kernels again, and a plain forward records nothing
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    assert all(not m.attn_drop._forward_hooks for m in model.modules() if hasattr(m, "attn_drop"))


@pytest.mark.parametrize("family,variant", [("mae", "length"), ("rae", "length"), ("rmae", "length"),
                                            ("rmae", "batch"), ("rmae", "channel")])
def test_overfitting_one_batch_lowers_each_loss(family, variant):
    torch.manual_seed(0)
    model = _small(f"{family}_vit_tiny_patch8", region_variant=variant, num_regions=4, decoder_depth=1)
    images = torch.rand(4, 3, 32, 32)
    regions = torch.zeros(4, 4, 32, 32)
    regions[:, 0, :16], regions[:, 1, 16:], regions[:, 2, :, :16], regions[:, 3, 8:24, 8:24] = 1, 1, 1, 1
    noise = torch.rand(4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(60):
        out = model(images, regions=regions, noise=noise)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append([None if t is None else t.item() for t in (out.loss_pixel, out.loss_region)])
    first, last = history[0], history[-1]
    for term in (0, 1):  # every branch the family has must learn, not just the sum
        if first[term] is not None:
            assert last[term] < 0.6 * first[term], [h[term] for h in history[::10]]


def test_initialisation_follows_mae():
    model = _small("rmae_vit_tiny_patch8")
    assert torch.all(model.pos_embed[0, 0] == 0)  # cls position of the sin-cos table
    assert not model.pos_embed.requires_grad and not model.region_pos_embed.requires_grad
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.5)
    assert torch.all(model.blocks[0].norm1.weight == 1) and torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert model.blocks[0].norm1.eps == 1e-6
    nwd = model.no_weight_decay()
    assert {"cls_token", "pos_embed", "mask_token", "region_cross_mask_token"} <= nwd


def test_registry_names():
    names = rmae.list_models()
    assert "rmae_vit_base_patch16" in names and "mae_vit_huge_patch14" in names and "rae_vit_tiny_patch8" in names
    cfg = rmae.create_model("mae_vit_small_patch16", img_size=32, depth=1).config
    assert (cfg.embed_dim, cfg.num_heads, cfg.patch_size) == (384, 6, 16)


def test_separate_region_mask_shares_the_permutation():
    torch.manual_seed(0)
    model = _small("rmae_vit_tiny_patch8").eval()
    images, regions, noise = torch.randn(2, 3, 32, 32), _regions(2, 2, 32), torch.rand(2, 16)
    with torch.no_grad():
        shared = model(images, regions=regions, noise=noise)
        assert torch.equal(shared.region_mask, shared.mask)
        # interactive use: the whole image visible, 3 region patches visible ("clicks")
        clicks = model(images, regions=regions, noise=noise, mask_ratio=0.0, num_visible_regions=3)
    assert clicks.mask.sum() == 0 and clicks.loss_pixel == 0  # nothing masked: 0, not NaN
    first3 = noise.argsort(1)[:, :3]
    expected = torch.ones(2, 16).scatter_(1, first3, 0.0)
    assert torch.equal(clicks.region_mask, expected)
    assert torch.isfinite(clicks.loss_region)
    ratio = rmae.create_model("rmae_vit_tiny_patch8", img_size=32, depth=1, region_mask_ratio=0.5)
    out = ratio(images, regions=regions, noise=noise)
    assert out.mask.sum(1).tolist() == [12, 12] and out.region_mask.sum(1).tolist() == [8, 8]
