"""Interactive segmentation protocol: ownership, clicks, pasting, baselines, curve, device."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rmae
from analysis.groundtruth import patch_labels
from analysis.interactive import (
    clicked_patches_mask,
    fh_baseline,
    interactive_curve,
    predict_from_clicks,
    segments_under_clicks,
)
from conftest import tiny_model
from rmae.data import FelzenszwalbSource, RegionDataset, build_dataset, collate_regions, denormalize


def test_patch_ownership_majority_vote():
    """The ownership the curve picks instances and clicks with (analysis.groundtruth.patch_labels)."""
    inst = torch.zeros(1, 4, 4, dtype=torch.long)
    inst[0, :2, :2] = 3  # patch (0,0) fully instance 3
    inst[0, :2, 2] = 5  # patch (0,1): half 5, half background → tie: the lower id, background
    inst[0, 2:, 2:] = 7
    inst[0, 3, 3] = 0  # patch (1,1): 3 of 4 pixels are 7
    assert patch_labels(inst, 2).tolist() == [[3, 0, 0, 7]]


def test_ownership_equals_the_torch_mode_rule_it_replaced():
    """This module used to own its patches by ``torch.mode`` over each patch's pixels. On the CPU
    torch.mode breaks ties towards the smallest value — the same rule as groundtruth's
    majority vote (ties → lowest id) — so the two agree everywhere, ties included: no pair, and
    no click, of the curve changed. (torch.mode's tie rule is undocumented on CUDA; patch_labels
    is the same on every device.)"""
    g = torch.Generator().manual_seed(0)
    inst = torch.randint(0, 3, (64, 8, 8), generator=g)  # 3 ids over 4-pixel patches: many ties
    blocks = inst.reshape(64, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(64, 16, 4)
    counts = torch.nn.functional.one_hot(blocks, 3).sum(-2)
    assert (counts.max(-1).values.unsqueeze(-1) == counts).sum(-1).gt(1).sum() > 100  # ties are common here
    assert torch.equal(patch_labels(inst, 2), torch.mode(blocks, dim=-1).values)


def test_clicked_patches_mask():
    grid, p = (2, 3), 4
    m = clicked_patches_mask([1, 5], p, grid)
    assert m.shape == (8, 12) and m.dtype == torch.bool
    expected = torch.zeros(8, 12, dtype=torch.bool)
    expected[0:4, 4:8] = True  # patch 1 = cell (0, 1)
    expected[4:8, 8:12] = True  # patch 5 = cell (1, 2)
    assert torch.equal(m, expected)
    batch = clicked_patches_mask(torch.tensor([[1, 5], [0, 0]]), p, grid)  # [P, n] → [P, H, W]
    assert batch.shape == (2, 8, 12) and torch.equal(batch[0], expected) and batch[1].sum() == 16
    with pytest.raises(ValueError, match="0..5"):
        clicked_patches_mask([6], p, grid)


def test_segments_under_clicks_reads_each_clicked_patch_centre():
    grid, p = (2, 2), 4
    seg = torch.zeros(8, 8, dtype=torch.long)
    seg[:, 4:] = 1
    seg[2, 2] = 2  # the centre pixel (p//2, p//2) of patch 0
    seg[6:, :] = 3  # covers the centre (6, 2) of patch 2 and the centre (6, 6) of patch 3
    assert torch.equal(segments_under_clicks(seg, [0], p, grid), seg == 2)  # one pixel segment, not patch 0's majority
    assert torch.equal(segments_under_clicks(seg, [1, 3], p, grid), (seg == 1) | (seg == 3))
    assert torch.equal(segments_under_clicks(seg.numpy(), [2], p, grid), seg == 3)  # a numpy label map works too


@pytest.fixture(scope="module")
def val_batch():
    ds = RegionDataset(build_dataset("scenes:val:8", image_size=64), source=None, cache=None, image_size=64,
                       train=False, crop_pct=1.0)
    return collate_regions([ds[i] for i in range(8)])


def test_fh_baseline_is_clicked_patches_and_the_segments_under_them(val_batch):
    image = (denormalize(val_batch["images"][0]) * 255).round().byte().permute(1, 2, 0).numpy()
    fh = FelzenszwalbSource(scales=(1000.0,))
    clicks = [0, 27, 45]
    got = fh_baseline(image, clicks, 8, (8, 8), fh)
    # the loop this module used to run (and the dashboard had a copy of), as the reference
    seg = fh.compute({"image": image})[0]
    ref = np.zeros(seg.shape, dtype=bool)
    for q in clicks:
        y, x = divmod(q, 8)
        ref[y * 8:(y + 1) * 8, x * 8:(x + 1) * 8] = True
        ref |= seg == seg[y * 8 + 4, x * 8 + 4]
    assert got.shape == (64, 64) and torch.equal(got, torch.from_numpy(ref))
    assert got.sum() > clicked_patches_mask(clicks, 8, (8, 8)).sum()  # segments add pixels beyond the clicks


@pytest.mark.parametrize("variant", ["length", "batch", "channel"])
def test_predict_from_clicks_pastes_the_clicked_patches(variant, val_batch):
    model = tiny_model("rae_vit_tiny_patch8", img_size=64, depth=1, region_variant=variant, num_regions=4)
    masks = (val_batch["instances"][:2] == 1)
    clicks = torch.tensor([[0, 5], [3, 9]])
    prob = predict_from_clicks(model, val_batch["images"][:2], masks, clicks)
    assert prob.shape == (2, 64, 64) and ((0 <= prob) & (prob <= 1)).all()
    for i, (q0, q1) in enumerate(clicks.tolist()):
        for q in (q0, q1):
            y, x = divmod(q, 8)
            assert torch.equal(prob[i, y * 8:(y + 1) * 8, x * 8:(x + 1) * 8], masks[i, y * 8:(y + 1) * 8, x * 8:(x + 1) * 8].float())
    # every patch clicked: the user gave the whole mask
    everything = torch.arange(64).expand(2, 64)
    assert torch.equal(predict_from_clicks(model, val_batch["images"][:2], masks, everything) > 0.5, masks)


def test_mae_has_no_region_decoder(val_batch):
    mae = tiny_model("mae_vit_tiny_patch8", img_size=64, depth=1)
    with pytest.raises(ValueError, match="no region decoder"):
        predict_from_clicks(mae, val_batch["images"][:1], val_batch["instances"][:1] == 1, torch.tensor([[0]]))


def test_curve_on_the_same_clicks_for_every_model(val_batch):
    models = {"rae": tiny_model("rae_vit_tiny_patch8", img_size=64, depth=1),
              "mae": tiny_model("mae_vit_tiny_patch8", img_size=64, depth=1)}
    curve = interactive_curve(models, [val_batch], clicks=(1, 2, 4, 100))
    assert set(curve.iou) == {"rae", "clicked", "fh"}  # MAE has no region decoder
    n_pairs = len(curve.image_ids)
    assert n_pairs >= 8 and all(len(curve.iou[k][n]) == n_pairs for k in curve.iou for n in curve.clicks)
    assert all(math.isnan(v) for v in curve.iou["clicked"][100])  # no instance owns 100 of 64 patches
    # on the pairs with at least 4 patches, nested click sets make the clicked-only IoU rise
    common = [i for i, v in enumerate(curve.iou["clicked"][4]) if not math.isnan(v)]
    assert len(common) >= 4
    clicked = {n: sum(curve.iou["clicked"][n][i] for i in common) for n in (1, 2, 4)}
    assert clicked[1] < clicked[2] < clicked[4]
    fh = {n: sum(curve.iou["fh"][n][i] for i in common) for n in (1, 2, 4)}
    assert fh[1] > clicked[1]  # FH segments under one click cover more of the object than the click
    again = interactive_curve(models, [val_batch], clicks=(1, 2, 4, 100))
    assert again.iou["rae"][2] == curve.iou["rae"][2]  # deterministic clicks


@pytest.mark.slow
def test_trained_rae_segments_from_clicks(tmp_path):
    """A ViT-Tiny/8 RAE (6 blocks) trained for 1,200 steps on ground-truth instance regions.

    The region loss covers removed patches only (as in the paper), so the decoder's raw output on
    visible patches is untrained; what is measured is the mask assembled from the clicked patches
    and the decoder's prediction of the rest. IoU rises with clicks; with negative clicks under
    the pre-training visibility the decoder segments far beyond what was clicked."""
    from rmae.train import load_config, pretrain

    cfg = load_config("demo", ["model=rae_vit_tiny_patch8", "region_source=gt", "steps=1200", "base_lr=3e-3",
                               "warmup_steps=60", "depth=6", "num_workers=2", "figure_every=0",
                               "checkpoint_every=600", f"region_cache={tmp_path / 'cache'}"])
    model = rmae.load_model(pretrain(cfg, tmp_path / "rae", progress=False).run).eval()
    ds = RegionDataset(build_dataset("scenes:val:96", image_size=64), source=None, cache=None, image_size=64,
                       train=False, crop_pct=1.0)
    batch = collate_regions([ds[i] for i in range(96)])

    def means(curve):  # over the (image, instance) pairs that own at least 8 patches
        common = [i for i, v in enumerate(curve.iou["clicked"][8]) if not math.isnan(v)]
        assert len(common) >= 20
        return {k: {n: sum(curve.iou[k][n][i] for i in common) / len(common) for n in (1, 2, 4, 8)} for k in curve.iou}

    plain = means(interactive_curve({"rae": model}, [batch], clicks=(1, 2, 4, 8)))
    assert plain["rae"][1] < plain["rae"][2] < plain["rae"][4] < plain["rae"][8], plain
    # negative clicks, with the visibility the model was pre-trained with
    neg = means(interactive_curve({"rae": model}, [batch], clicks=(1, 2, 4, 8), negatives=8, image="clicks"))
    assert neg["rae"][1] < neg["rae"][2] < neg["rae"][4] < neg["rae"][8], neg
    assert all(neg["rae"][n] > neg["clicked"][n] for n in (1, 2, 4, 8)), neg
    assert neg["rae"][1] > 3 * neg["clicked"][1] and neg["rae"][8] > 0.6, neg


def test_negative_clicks_and_image_protocols(val_batch):
    model = tiny_model("rae_vit_tiny_patch8", img_size=64, depth=1)
    masks = val_batch["instances"][:2] == 1
    clicks = torch.tensor([[0, 5, 63], [3, 9, 40]])
    a = predict_from_clicks(model, val_batch["images"][:2], masks, clicks, image="all")
    b = predict_from_clicks(model, val_batch["images"][:2], masks, clicks, image="clicks")
    assert not torch.allclose(a, b)  # the pixel encoder saw different patches
    with pytest.raises(ValueError, match="'all' or 'clicks'"):
        predict_from_clicks(model, val_batch["images"][:2], masks, clicks, image="none")
    plain = interactive_curve({"rae": model}, [val_batch], clicks=(1, 2), baselines=False)
    neg = interactive_curve({"rae": model}, [val_batch], clicks=(1, 2), negatives=3, image="clicks", baselines=False)
    assert neg.image_ids == plain.image_ids and neg.iou["rae"][2] != plain.iou["rae"][2]


def test_curve_follows_the_model_device(val_batch):
    """Model and data on the CPU while new tensors default to the meta device: anything the curve
    (clicks, noise, masks, baselines, IoUs) made without naming its device would fail the run;
    the numbers equal the plain run's."""
    models = {"rae": tiny_model("rae_vit_tiny_patch8", img_size=64, depth=1)}
    plain = interactive_curve(models, [val_batch], clicks=(1, 2), negatives=2)
    torch.set_default_device("meta")
    try:
        meta = interactive_curve(models, [val_batch], clicks=(1, 2), negatives=2)
    finally:
        torch.set_default_device(None)
    assert meta.image_ids == plain.image_ids
    assert meta.iou == plain.iou  # NaN-free here: every pair has the 2 clicks and 2 negatives
    assert not any(math.isnan(v) for name in plain.iou for v in plain.iou[name][2])
    with pytest.raises(ValueError, match="elsewhere"):
        interactive_curve(models, [val_batch], clicks=(1,), device="meta")
