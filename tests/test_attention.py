"""Attention maps for display: which rows and columns each helper reads (any number of prefix
tokens), head aggregation, rollout, overlays — and the weights they draw, for our model and its
timm export alike."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file

import rmae
from analysis.attention import (
    aggregate_heads,
    cls_maps,
    normalise_for_display,
    patch_query_maps,
    query_index,
    rollout,
    rollout_maps,
    upsample,
)
from analysis.encoder import attention_pass
from conftest import IMG, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(depth=3)


def test_attention_pass_gives_every_layer_of_whole_images(model):
    images = torch.randn(2, 3, IMG, IMG)
    _, rec = attention_pass(model, images)
    attn = rec.weights
    assert len(attn) == 3 and all(a.shape == (2, 3, 17, 17) for a in attn)
    assert torch.allclose(attn[0].sum(-1), torch.ones(2, 3, 17), atol=1e-5)
    _, last = attention_pass(model, images, layers=[-1])
    assert len(last.weights) == 1 and torch.allclose(last.weights[0], attn[-1])


def test_same_maps_for_our_model_and_its_timm_export(model, tmp_path):
    name, kwargs = rmae.export_timm(model, tmp_path / "enc.safetensors")
    vit = timm.create_model(name, **kwargs).eval()
    vit.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=True)
    assert vit.blocks[0].attn.fused_attn  # timm's fused kernel hides the weights…
    images = torch.randn(2, 3, IMG, IMG)
    ours, theirs = attention_pass(model, images)[1].weights, attention_pass(vit, images)[1].weights  # …recorded anyway
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    grid = model.patch_embed.grid_size
    torch.testing.assert_close(rollout_maps(ours, grid, query=5), rollout_maps(theirs, grid, query=5), atol=1e-5, rtol=0)


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


def _marked(num_prefix: int, grid: tuple[int, int] = (2, 3)) -> torch.Tensor:
    """``[1, 2, N, N]`` where every entry is unique: ``attn[..., i, j] = 100·i + j`` (head 1: + 0.5),
    so a map shows exactly which token row and key columns a helper read."""
    N = num_prefix + grid[0] * grid[1]
    i, j = torch.meshgrid(torch.arange(N, dtype=torch.float64), torch.arange(N, dtype=torch.float64), indexing="ij")
    return torch.stack([100 * i + j, 100 * i + j + 0.5])[None]


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])  # none (no cls), cls, cls + distillation/register, cls + 4 registers
def test_maps_read_token_rows_and_patch_key_columns_after_the_prefix(num_prefix):
    grid = (2, 3)
    attn = _marked(num_prefix, grid)
    keys = torch.arange(num_prefix, num_prefix + 6, dtype=torch.float64).reshape(2, 3)  # key columns of patches 0..5
    q = patch_query_maps(attn, 4, grid, num_prefix=num_prefix)  # patch 4 is token num_prefix + 4
    torch.testing.assert_close(q[0, 0], 100 * (num_prefix + 4) + keys)
    torch.testing.assert_close(q[0, 1], 100 * (num_prefix + 4) + keys + 0.5)
    per_image = patch_query_maps(attn.expand(2, -1, -1, -1), torch.tensor([0, 5]), grid, num_prefix=num_prefix)
    torch.testing.assert_close(per_image[1, 0], 100 * (num_prefix + 5) + keys)
    if num_prefix == 0:
        with pytest.raises(ValueError, match="no cls token"):
            cls_maps(attn, grid, num_prefix=0)
        with pytest.raises(ValueError, match="no cls token"):
            rollout_maps([attn.float()], grid, num_prefix=0)
    else:
        torch.testing.assert_close(cls_maps(attn, grid, num_prefix=num_prefix)[0, 0], keys)  # row 0 = cls
    with pytest.raises(ValueError, match="prefix"):
        patch_query_maps(attn, 0, grid, num_prefix=num_prefix + 1)  # one token too few for the grid


@pytest.mark.parametrize("num_prefix", [1, 2])
def test_rollout_maps_take_the_patch_part_of_the_full_rollout(num_prefix):
    torch.manual_seed(1)
    grid = (2, 2)
    N = num_prefix + 4
    layers = [torch.rand(1, 3, N, N).softmax(-1) for _ in range(2)]
    r = rollout(layers)  # [1, N, N], identity and row normalisation over all N tokens
    torch.testing.assert_close(rollout_maps(layers, grid, num_prefix=num_prefix), r[:, 0, num_prefix:].reshape(1, 2, 2))
    torch.testing.assert_close(rollout_maps(layers, grid, query=3, num_prefix=num_prefix),
                               r[:, num_prefix + 3, num_prefix:].reshape(1, 2, 2))


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


def test_upsample_keeps_patch_blocks():
    m = torch.arange(4.0).reshape(1, 2, 2)
    up = upsample(m, (4, 4))
    assert up.shape == (1, 4, 4) and up[0, 0, 0] == 0 and up[0, 3, 3] == 3 and up[0, 1, 1] == 0


def test_normalise_for_display_per_map():
    m = torch.stack([torch.tensor([[1.0, 3.0], [2.0, 5.0]]), torch.full((2, 2), 7.0)])
    out = normalise_for_display(m)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert (out[1] == 0).all()  # a flat map stays finite
