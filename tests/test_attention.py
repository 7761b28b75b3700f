"""Attention extraction (ours and timm), maps, head aggregation, rollout."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file

import rmae
from analysis.attention import (
    AttentionExtractor,
    aggregate_heads,
    cls_maps,
    patch_query_maps,
    query_index,
    rollout,
    rollout_maps,
    stream,
    upsample,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return rmae.create_model("rmae_vit_tiny_patch8", img_size=32, depth=3).eval()


def test_extractor_shapes_and_rows(tiny):
    images = torch.randn(2, 3, 32, 32)
    attn = AttentionExtractor(tiny)(images)
    assert len(attn) == 3 and all(a.shape == (2, 3, 17, 17) for a in attn)
    assert torch.allclose(attn[0].sum(-1), torch.ones(2, 3, 17), atol=1e-5)
    only_last = AttentionExtractor(tiny, layers=[-1])(images)
    assert len(only_last) == 1 and torch.allclose(only_last[0], attn[-1])


def test_same_maps_for_our_model_and_its_timm_export(tiny, tmp_path):
    name, kwargs = rmae.export_timm(tiny, tmp_path / "enc.safetensors")
    vit = timm.create_model(name, **kwargs).eval()
    vit.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=True)
    assert vit.blocks[0].attn.fused_attn  # timm's fused kernel hides the weights…
    images = torch.randn(2, 3, 32, 32)
    ours, theirs = AttentionExtractor(tiny)(images), AttentionExtractor(vit)(images)  # …we recompute them
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5)


def test_patch_query_and_cls_maps_index_the_right_rows():
    B, h, grid = 1, 2, (2, 3)
    N = 1 + 6
    attn = torch.zeros(B, h, N, N)
    attn[:, :, 0, 1 + 5] = 1.0  # cls looks at patch 5 = cell (1, 2)
    attn[:, :, 1 + 4, 1 + 0] = 1.0  # patch 4 looks at patch 0 = cell (0, 0)
    assert cls_maps(attn, grid)[0, 0, 1, 2] == 1.0
    q = patch_query_maps(attn, 4, grid)
    assert q.shape == (1, 2, 2, 3) and q[0, 1, 0, 0] == 1.0 and q.sum() == 2.0
    assert query_index(9.5, 17.0, 8, grid) == 1 * 3 + 2


def test_head_aggregation():
    maps = torch.stack([torch.ones(2, 2), 3 * torch.ones(2, 2)]).unsqueeze(0)  # [1, 2 heads, 2, 2]
    assert aggregate_heads(maps, "mean").unique().item() == 2.0
    assert aggregate_heads(maps, "max").unique().item() == 3.0
    assert aggregate_heads(maps, 1).unique().item() == 3.0
    with pytest.raises(ValueError, match="head aggregation"):
        aggregate_heads(maps, "median")


def test_rollout_equals_manual_product_and_rows_stay_stochastic():
    torch.manual_seed(0)
    layers = [torch.rand(2, 3, 5, 5).softmax(-1) for _ in range(3)]
    expected = None
    for a in layers:
        m = 0.5 * a.mean(1) + 0.5 * torch.eye(5)
        m = m / m.sum(-1, keepdim=True)
        expected = m if expected is None else m @ expected
    got = rollout(layers)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(2, 5), atol=1e-6)
    # vit-explain's normalisation (no keepdim) broadcasts the sums along the wrong axis:
    # With max head fusion rows no longer sum to 1 before normalising, which is where the
    # normalisation axis matters. vit-explain divides [N, N] by [N] (no keepdim): column j by
    # row j's sum, so its rows do not sum to 1; ours do.
    assert torch.allclose(rollout(layers, head_fusion="max").sum(-1), torch.ones(2, 5), atol=1e-6)
    m = (0.5 * layers[0].max(1).values + 0.5 * torch.eye(5))[0]  # one image, [N, N]
    wrong = m / m.sum(dim=-1)
    assert not torch.allclose(wrong.sum(-1), torch.ones(5), atol=1e-3)
    assert rollout_maps(layers, (2, 2)).shape == (2, 2, 2)


def test_stream_reduces_batch_by_batch(tiny):
    batches = [{"images": torch.randn(2, 3, 32, 32)} for _ in range(3)]
    seen = list(stream(tiny, batches, lambda b, f, a: (f.shape[0], len(a), a[0].shape)))
    assert seen == [(2, 3, (2, 3, 17, 17))] * 3


def test_upsample_keeps_patch_blocks():
    m = torch.arange(4.0).reshape(1, 2, 2)
    up = upsample(m, (4, 4))
    assert up.shape == (1, 4, 4) and up[0, 0, 0] == 0 and up[0, 3, 3] == 3 and up[0, 1, 1] == 0
