"""analysis.metrics.discovery: TokenCut on planted keys, CorLoc, and discover_objects reading the
last layer's patch keys of our model and of timm ViTs (QK-norm, registers)."""

from __future__ import annotations

import timm
import torch

from analysis import encoder
from analysis import metrics as M
from analysis.metrics.discovery import _seed_component
from conftest import IMG, tiny_model, tiny_timm_vit

P = 8  # patch size used by the hand-built cases


def test_tokencut_finds_planted_object():
    torch.manual_seed(4)
    gh, gw, D = 6, 8, 64
    u, v = torch.randn(D), torch.randn(D)
    keys = v + 0.1 * torch.randn(2, gh * gw, D)
    grid = keys.view(2, gh, gw, D)
    grid[0, 1:4, 2:6] = u + 0.1 * torch.randn(3, 4, D)  # planted object, rows 1-3, cols 2-5
    grid[1, 3:6, 0:2] = u + 0.1 * torch.randn(3, 2, D)  # another, at the border
    res = M.tokencut(keys, (gh, gw), P)
    expected = torch.tensor([[2 * P, 1 * P, 6 * P, 4 * P], [0, 3 * P, 2 * P, 6 * P]], dtype=torch.float64)
    torch.testing.assert_close(res.boxes, expected)
    assert res.masks.shape == (2, gh, gw) and res.masks[0].sum() == 12
    iou = torch.diagonal(M.box_iou(res.boxes, expected))
    assert (iou > 0.99).all()
    gt = [expected[0:1], torch.tensor([[0.0, 0.0, 8.0, 8.0], expected[1].tolist()])]
    assert M.corloc(res.boxes, gt).tolist() == [1.0, 1.0]


def test_seed_component_is_4_connected():
    mask = torch.tensor([[[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]]], dtype=torch.bool)
    comp = _seed_component(mask, torch.tensor([0]))
    assert comp[0].nonzero().tolist() == [[0, 0], [0, 1], [1, 1]]  # the diagonal (2, 2) is not joined
    comp = _seed_component(mask, torch.tensor([10]))
    assert comp[0].nonzero().tolist() == [[2, 2], [2, 3], [3, 2]]


def test_box_iou_and_corloc():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    torch.testing.assert_close(M.box_iou(a, b), torch.tensor([[1 / 3, 1.0, 0.0]], dtype=torch.float64))
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 1.0, 1.0]])
    gt = [b[:1], b[2:], torch.zeros(0, 4)]
    hits = M.corloc(pred, gt, threshold=0.3)
    assert hits[:2].tolist() == [1.0, 0.0] and torch.isnan(hits[2])
    assert M.corloc(pred[:1], [b[:1]], threshold=0.5).item() == 0.0  # IoU 1/3 < 0.5


def _hooked_last_keys(model, images: torch.Tensor, k_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: (queries, keys) ``[B, heads, N, head_dim]`` of the last layer from
    its ``qkv`` output in timm's own layout, keys through ``k_norm`` (when asked)."""
    attn = model.blocks[-1].attn
    seen = []
    h = attn.qkv.register_forward_hook(lambda _m, _i, o: seen.append(o))
    with torch.no_grad():
        model.forward_features(images)
    h.remove()
    B, N, _ = seen[0].shape
    qkv = seen[0].reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    k = qkv[1]
    if k_norm and hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    return qkv[0], k


def _concat_heads(k: torch.Tensor) -> torch.Tensor:
    B, h, N, d = k.shape
    return k.transpose(1, 2).reshape(B, N, h * d)


def test_recorded_keys_reproduce_attention_of_our_model():
    """The keys TokenCut reads (analysis.encoder, heads concatenated in head order) are the ones
    the last layer's attention uses."""
    model = tiny_model(seed=5)
    images = torch.randn(2, 3, IMG, IMG)
    _, rec = encoder.attention_pass(model, images, layers=[-1], keys=True)
    keys = rec.keys[0]
    assert keys.shape == (2, 17, 192)
    q, _ = _hooked_last_keys(model, images)
    k = keys.reshape(2, 17, model.blocks[-1].attn.num_heads, -1).transpose(1, 2)
    recomputed = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
    torch.testing.assert_close(recomputed, rec.weights[0], rtol=1e-4, atol=1e-6)


def _assert_same_cut(a: M.TokenCut, b: M.TokenCut) -> None:
    torch.testing.assert_close(a.boxes, b.boxes)
    assert torch.equal(a.masks, b.masks) and torch.equal(a.seeds, b.seeds)
    torch.testing.assert_close(a.eigenvectors, b.eigenvectors)


def test_discover_objects_uses_the_last_layers_patch_keys_of_our_model():
    model = tiny_model(seed=5)
    images = torch.randn(2, 3, IMG, IMG)
    _, k = _hooked_last_keys(model, images)
    _assert_same_cut(M.discover_objects(model, images), M.tokencut(_concat_heads(k)[:, 1:], (4, 4), 8))


def test_discover_objects_timm_with_k_norm():
    torch.manual_seed(6)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=IMG, patch_size=8, embed_dim=48, depth=2, num_heads=3, qk_norm=True, num_classes=0).eval()
    images = torch.randn(2, 3, IMG, IMG)
    _, k = _hooked_last_keys(vit, images)
    found = M.discover_objects(vit, images)
    _assert_same_cut(found, M.tokencut(_concat_heads(k)[:, 1:], (4, 4), 8))
    _, raw = _hooked_last_keys(vit, images, k_norm=False)
    without = M.tokencut(_concat_heads(raw)[:, 1:], (4, 4), 8)
    assert not torch.allclose(found.eigenvectors.abs(), without.eigenvectors.abs(), atol=1e-3)  # k_norm matters


def test_discover_objects_drops_registers():
    """cls + 4 registers: the cut runs on the 16 patch keys only (tokens 5…20)."""
    vit_registers = tiny_timm_vit(reg_tokens=4)
    images = torch.randn(2, 3, IMG, IMG)
    _, k = _hooked_last_keys(vit_registers, images)
    keys = _concat_heads(k)
    assert keys.shape[1] == 5 + 16
    found = M.discover_objects(vit_registers, images)
    assert found.masks.shape == (2, 4, 4)
    _assert_same_cut(found, M.tokencut(keys[:, 5:], (4, 4), 8))
