"""Interactive segmentation protocol: ownership, clicks, pasting, baselines, curve, device."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rmae
from analysis.groundtruth import patch_labels
from analysis.interactive import (
    BASELINES,
    baseline_predictions,
    choose_clicks,
    clicked_patches_mask,
    fh_baseline,
    interactive_curve,
    predict_from_clicks,
    propagate_through_segments,
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


def test_curve_is_one_fixed_set_of_pairs_with_enough_pairs_behind_every_point(val_batch):
    models = {"rae": tiny_model("rae_vit_tiny_patch8", img_size=64, depth=1),
              "mae": tiny_model("mae_vit_tiny_patch8", img_size=64, depth=1)}
    curve = interactive_curve(models, [val_batch], clicks=(1, 2, 4, 100), min_pairs=4)
    assert set(curve.iou) == {"rae", *BASELINES}  # MAE has no region decoder
    assert 100 in curve.dropped and "100" in curve.dropped[100] and 100 not in curve.clicks
    owned = {(i, k) for i, k in zip(curve.image_ids, curve.instance_ids)}
    assert len(owned) == curve.n_pairs >= 4
    # every point over the same pairs: no NaN, one value per pair at every click count
    for name in curve.iou:
        for n in curve.clicks:
            assert len(curve.iou[name][n]) == curve.n_pairs and not any(math.isnan(v) for v in curve.iou[name][n])
    # ... and those pairs are exactly the instances owning at least the largest kept click count
    owner = patch_labels(val_batch["instances"], 8)
    for img, inst_id in owned:
        assert int((owner[img] == inst_id).sum()) >= curve.clicks[-1]
    # nested clicks: the pasted-only baseline rises
    paste = curve.mean("paste_only")
    assert all(paste[a] < paste[b] for a, b in zip(curve.clicks, curve.clicks[1:]))
    assert curve.strongest_baseline()[0] in BASELINES and curve.table("rae").shape == (curve.n_pairs, len(curve.clicks))
    again = interactive_curve(models, [val_batch], clicks=(1, 2, 4, 100), min_pairs=4)
    assert again.iou["rae"][2] == curve.iou["rae"][2] and again.image_ids == curve.image_ids  # deterministic


def test_choose_clicks_drops_from_the_top_until_enough_pairs():
    counts = [1] * 50 + [3] * 20 + [9] * 5
    assert choose_clicks(counts, (1, 2, 4, 8), min_pairs=10) == ((1, 2), {8: "only 5 instance(s) own ≥ 8 patches "
                                                                          "(fewer than 10 pairs)",
                                                                          4: "only 5 instance(s) own ≥ 4 patches "
                                                                          "(fewer than 10 pairs)"})
    assert choose_clicks(counts, (4, 2, 1, 2), min_pairs=1)[0] == (1, 2, 4)  # sorted, unique
    assert choose_clicks([], (1, 4), min_pairs=5)[0] == (1,)  # the smallest is always kept


def test_a_model_that_predicts_nothing_scores_exactly_the_paste_only_baseline(val_batch):
    """The model's prediction has the ground truth of its visible patches pasted in; so does every
    baseline. A decoder that says "background" everywhere therefore equals paste_only exactly —
    the baselines get exactly the model's information, no less (they once got less and lost)."""
    model = tiny_model("rae_vit_tiny_patch8", img_size=64, depth=1)
    with torch.no_grad():
        model.region_pred[-1].weight.zero_()
        model.region_pred[-1].bias.fill_(-50.0)  # sigmoid ≈ 0 everywhere
    for negatives, image in ((0, "all"), (3, "clicks")):
        curve = interactive_curve({"nothing": model}, [val_batch], clicks=(1, 2, 4), min_pairs=1,
                                  negatives=negatives, image=image)
        for n in curve.clicks:
            assert curve.iou["nothing"][n] == pytest.approx(curve.iou["paste_only"][n], abs=1e-6), (negatives, n)


def test_segments_propagate_only_what_the_clicks_revealed():
    seg = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    known = torch.zeros(4, 4, dtype=torch.bool)
    known[0, 0] = known[0, 2] = known[0, 3] = known[3, 3] = True
    positive = torch.zeros(4, 4, dtype=torch.bool)
    positive[0, 0] = positive[0, 2] = True  # segment 0: 1 of 1 known positive; segment 1: 1 of 2; segment 3: 0 of 1
    out = propagate_through_segments(seg, known, positive)
    expected = seg == 0  # filled; segment 1 (a tie) and 3 (negative) stay background except known positives
    expected[0, 2] = True
    assert torch.equal(out, expected)


def test_baselines_see_the_pasted_pixels_of_every_visible_patch(val_batch):
    image = (denormalize(val_batch["images"][0]) * 255).round().byte().permute(1, 2, 0).numpy()
    mask = val_batch["instances"][0] == 1
    visible = torch.tensor([0, 27, 45])
    preds = baseline_predictions(image, mask, visible, 8, (8, 8))
    known = clicked_patches_mask(visible, 8, (8, 8))
    assert torch.equal(preds["paste_only"], mask & known)
    assert torch.equal(preds["fh"] & known, mask & known)  # FH fills only what the clicks leave unknown


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

    loader = [batch]
    plain = interactive_curve({"rae": model}, loader, clicks=(1, 2, 4, 8), min_pairs=20)
    assert plain.clicks == (1, 2, 4, 8) and plain.n_pairs >= 20
    rae = plain.mean("rae")
    assert rae[1] < rae[2] < rae[4] < rae[8], rae
    # negative clicks, with the visibility the model was pre-trained with: the decoder segments
    # beyond what the clicks revealed — better than every baseline given the same information
    neg = interactive_curve({"rae": model}, loader, clicks=(1, 2, 4, 8), min_pairs=20, negatives=8, image="clicks")
    rae, best = neg.mean("rae"), {n: max(neg.mean(b)[n] for b in BASELINES) for n in neg.clicks}
    assert rae[1] < rae[2] < rae[4] < rae[8], rae
    assert all(rae[n] > best[n] for n in neg.clicks), (rae, best)


def test_negative_clicks_and_image_protocols(val_batch):
    model = tiny_model("rae_vit_tiny_patch8", img_size=64, depth=1)
    masks = val_batch["instances"][:2] == 1
    clicks = torch.tensor([[0, 5, 63], [3, 9, 40]])
    a = predict_from_clicks(model, val_batch["images"][:2], masks, clicks, image="all")
    b = predict_from_clicks(model, val_batch["images"][:2], masks, clicks, image="clicks")
    assert not torch.allclose(a, b)  # the pixel encoder saw different patches
    with pytest.raises(ValueError, match="'all' or 'clicks'"):
        predict_from_clicks(model, val_batch["images"][:2], masks, clicks, image="none")
    plain = interactive_curve({"rae": model}, [val_batch], clicks=(1, 2), baselines=False, min_pairs=1)
    neg = interactive_curve({"rae": model}, [val_batch], clicks=(1, 2), negatives=3, image="clicks", baselines=False,
                            min_pairs=1)
    assert neg.image_ids == plain.image_ids and neg.iou["rae"][2] != plain.iou["rae"][2]


def test_curve_follows_the_model_device(val_batch):
    """Model and data on the CPU while new tensors default to the meta device: anything the curve
    (clicks, noise, masks, baselines, IoUs) made without naming its device would fail the run;
    the numbers equal the plain run's."""
    models = {"rae": tiny_model("rae_vit_tiny_patch8", img_size=64, depth=1)}
    plain = interactive_curve(models, [val_batch], clicks=(1, 2), negatives=2, min_pairs=1)
    torch.set_default_device("meta")
    try:
        meta = interactive_curve(models, [val_batch], clicks=(1, 2), negatives=2, min_pairs=1)
    finally:
        torch.set_default_device(None)
    assert meta.image_ids == plain.image_ids
    assert meta.iou == plain.iou  # NaN-free here: every pair has the 2 clicks and 2 negatives
    assert not any(math.isnan(v) for name in plain.iou for v in plain.iou[name][2])
    with pytest.raises(ValueError, match="elsewhere"):
        interactive_curve(models, [val_batch], clicks=(1,), device="meta")
