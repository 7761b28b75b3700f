"""Instruments a reviewer would trust (issue 10): the locality-corrected instance metric and its
controls, DINO's protocol, and tests that catch the plausible bugs each instrument could have."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from analysis import encoder
from analysis import metrics as M
from analysis.attention import rollout_maps
from analysis.metrics.discovery import bipartition, tokencut
from conftest import make_run


def _with_cls(rows: torch.Tensor) -> torch.Tensor:
    """patch→patch rows ``[B, h, L, L]`` → ``[B, h, 1+L, 1+L]`` with a cls token taking 0.2."""
    B, h, L, _ = rows.shape
    a = torch.zeros(B, h, 1 + L, 1 + L, dtype=torch.float64)
    a[..., 0] = 0.2
    a[..., 1:, 1:] = 0.8 * rows.double()
    a[:, :, 0, 1:] = 0.8 / L
    return a


def _layouts(n: int, side: int = 8, patch: int = 4, seed: int = 0) -> torch.Tensor:
    """n instance maps ``[n, side·p, side·p]``: two random 3×3-patch squares each (may overlap)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, side * patch, side * patch, dtype=torch.long)
    for i in range(n):
        for inst in (1, 2):
            r, c = torch.randint(0, side - 2, (2,), generator=g).tolist()
            out[i, r * patch:(r + 3) * patch, c * patch:(c + 3) * patch] = inst
    return out


def _window(side: int = 8, sigma: float | None = None) -> torch.Tensor:
    """Content-free local attention ``[L, L]``: a 3×3 window (sigma None) or a Gaussian."""
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([r, c], -1).reshape(-1, 2).double()
    if sigma is None:
        w = ((pos[:, None] - pos[None]).abs().max(-1).values <= 1).double()
    else:
        w = torch.exp(-((pos[:, None] - pos[None]) ** 2).sum(-1) / (2 * sigma**2))
    return w / w.sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------------
# instance_selectivity: ≈ 0 for content-free attention however local, > 0 for instance attention


@pytest.mark.parametrize("sigma", [None, 1.0])
def test_selectivity_is_zero_for_content_free_local_attention_that_maxes_out_mass(sigma):
    inst = _layouts(64)
    attn = _with_cls(_window(8, sigma).expand(64, 1, 64, 64))
    mass = M.instance_awareness(attn, inst, 4).mass
    sel = M.instance_selectivity(attn, inst, 4)
    # the figures: a 3×3 window scores a mass of ~0.6, a σ=1 Gaussian the same — "instance-aware"
    assert np.nanmean(mass.numpy()) > 0.5
    # selectivity sees through it: its mean over images is 0 within its own sampling error
    s = sel.numpy()
    assert abs(np.nanmean(s)) < 3 * np.nanstd(s) / math.sqrt(np.isfinite(s).sum()) + 1e-3, np.nanmean(s)


def test_selectivity_known_answer_for_attention_on_the_own_instance():
    # two images on a 1×6 grid of 4-px patches; image 0: instance = patches 0-3, image 1: patches 2-5
    inst = torch.zeros(2, 4, 24, dtype=torch.long)
    inst[0, :, 0:16] = 1
    inst[1, :, 8:24] = 1
    rows = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    for b, own in enumerate(([0, 1, 2, 3], [2, 3, 4, 5])):
        for q in range(6):
            rows[b, 0, q, own if q in own else [q]] = 1.0
    rows /= rows.sum(-1, keepdim=True)
    sel = M.instance_selectivity(_with_cls(rows), inst, 4)
    # queries 2, 3 are inside an instance in both images: observed 1, null = overlap 2/4 → 0.5;
    # queries 0, 1 (image 0) and 4, 5 (image 1) have no other layout with them inside: left out
    torch.testing.assert_close(sel, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # one image alone has no null: undefined
    assert torch.isnan(M.instance_selectivity(_with_cls(rows[:1]), inst[:1], 4)).all()
    # attention that avoids its own instance is negative
    avoid = torch.zeros_like(rows)
    avoid[0, 0, 2, [4, 5]] = avoid[0, 0, 3, [4, 5]] = 0.5
    avoid[1, 0, 2, [0, 1]] = avoid[1, 0, 3, [0, 1]] = 0.5
    avoid[..., [0, 1, 4, 5], [0, 1, 4, 5]] = 1.0
    assert (M.instance_selectivity(_with_cls(avoid), inst, 4) < 0).all()


def test_controls_through_the_whole_pipeline_show_null_and_ceiling(tmp_path):
    from analysis.analyze import AnalyzeConfig, analyze

    run = make_run(tmp_path / "mae", name="mae_vit_tiny_patch8", img_size=64)
    res = analyze([run], AnalyzeConfig(data="scenes:val:64", batch_size=32, probes=(), clicks=(), cka=False,
                                       controls=True, device="cpu"), tmp_path / "rep", progress=False)
    assert res.run_names("control") == ["control:content-free", "control:local", "control:random-init",
                                        "control:oracle"]
    sel = {n: res.metric(n, "instance_selectivity") for n in res.runs}
    mass = {n: res.metric(n, "instance_mass").value for n in res.runs}
    for null in ("control:content-free", "control:local", "control:random-init", "mae"):  # mae: random init
        lo, hi = sel[null].ci
        assert lo < 0.03 and hi > -0.03, (null, sel[null].value, sel[null].ci)  # ≈ 0: the null
    assert sel["control:oracle"].ci[0] > 0.3  # the ceiling, clearly above
    assert mass["control:local"] > 2 * mass["control:content-free"]  # what mass rewards: locality
    assert res.metric("control:oracle", "instance_mass").value == pytest.approx(1.0)
    # DINO's protocol at pixel resolution on an 8×8 grid: patch boundaries cap even the oracle near 0.55
    assert res.metric("control:oracle", "cls_jaccard").value > 3 * res.metric("control:content-free", "cls_jaccard").value
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "control:oracle" in md and "instance_selectivity" in md
    assert not any("control" in comp for comp in res.differences)  # controls are references, not runs


# ------------------------------------------------------------------------------------------
# the plausible bugs (each test names the mutation it catches)


def test_tokencut_keeps_only_the_seeds_connected_component():
    """Mutation: TokenCut without its connected-component step (the box would span both blobs)."""
    u, v = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    keys = v.expand(1, 16, 3).clone()
    keys[0, 0], keys[0, 15] = u, u  # two corner blobs of the same kind, not 4-connected
    res = tokencut(keys, (4, 4), 4)
    assert res.masks[0].sum() == 1 and int(res.seeds[0]) in (0, 15)
    corner = res.boxes[0].tolist()
    assert corner in ([0.0, 0.0, 4.0, 4.0], [12.0, 12.0, 16.0, 16.0])


def test_tokencut_splits_at_the_mean_of_the_eigenvector():
    """Mutation: the split at 0 instead of the mean (TokenCut's rule) — 0.1 lies between them."""
    part, seeds, signed = bipartition(torch.tensor([[4.0, 0.1, -1.0, -1.0, -1.0]], dtype=torch.float64))
    assert part.tolist() == [[True, False, False, False, False]] and seeds.tolist() == [0]
    part, seeds, signed = bipartition(torch.tensor([[-4.0, -0.1, 1.0, 1.0, 1.0]], dtype=torch.float64))
    assert part.tolist() == [[True, False, False, False, False]] and signed[0, 0] == 4.0  # flipped to hold the seed


def test_recorded_keys_and_fallback_weights_apply_q_norm_and_k_norm():
    """Mutation: timm attention weights / keys without ``q_norm`` / ``k_norm``."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            depth=2, qk_norm=True).eval()
    with torch.no_grad():  # norms far from identity, so leaving them out changes every number
        for blk in vit.blocks:
            blk.attn.q_norm.weight.uniform_(0.2, 3.0)
            blk.attn.k_norm.weight.uniform_(0.2, 3.0)
            blk.attn.k_norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 3, 32, 32)
    _, rec = encoder.attention_pass(vit, x, keys=True)  # timm's own explicit path: the truth
    attn = vit.blocks[-1].attn
    seen = []
    h = attn.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        vit.forward_features(x)
    h.remove()
    with torch.no_grad():
        recomputed = encoder._recompute_weights(attn, seen[0])  # the fallback for layers without attn_drop
        B, N, _ = seen[0].shape
        k = attn.k_norm(attn.qkv(seen[0]).reshape(B, N, 3, attn.num_heads, -1)[:, :, 1])
    torch.testing.assert_close(recomputed, rec.weights[-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rec.keys[-1], k.reshape(B, N, -1), atol=1e-5, rtol=1e-4)


def test_attention_distance_reads_rows_as_height_and_columns_as_width():
    """Mutation: ``(p_h, p_w)`` (or the grid's (h, w)) swapped in the attention distance."""
    grid, patch = (2, 3), (4, 10)  # non-square grid and non-square patches
    L = 6

    def one_move(query: int, key: int) -> float:
        rows = torch.eye(L, dtype=torch.float64)[None, None].clone()
        rows[0, 0, query] = 0.0
        rows[0, 0, query, key] = 1.0  # every other patch attends itself (distance 0)
        return M.mean_attention_distance(_with_cls(rows), grid, patch).item() * L

    assert one_move(0, 1) == pytest.approx(10.0)  # right neighbour: one patch width
    assert one_move(1, 4) == pytest.approx(4.0)  # the patch below: one patch height
    assert one_move(0, 5) == pytest.approx(math.hypot(4.0, 20.0))  # down 1 row, right 2 columns


def test_rollout_reads_the_query_row_after_the_prefix_tokens():
    """Mutation: the rollout query off by one (or by the prefix count)."""
    for P in (1, 2):
        N = P + 6
        layer = torch.eye(N, dtype=torch.float64)[None, None].clone()  # every token attends itself
        m = rollout_maps([layer, layer], (2, 3), query=4, num_prefix=P)
        assert m.shape == (1, 2, 3) and m[0].argmax().item() == 4 and m[0, 1, 1] == pytest.approx(1.0)


def test_linear_probe_normalises_features_before_the_linear_layer():
    """Mutation: the linear probe's BatchNorm removed — raw features with a large, shared offset
    and small informative dimensions defeat plain SGD at every lr of the grid."""
    from analysis.probes import linear_probe

    g = torch.Generator().manual_seed(0)
    n, dim = 400, 16
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, dim, generator=g) * 0.01
    x[torch.arange(n), y] += 0.05  # the class sits in a tiny informative dimension
    x[:, 8:] += 1000.0  # a huge offset in others (as un-normed intermediate layers have)
    res = linear_probe(x[:300], y[:300], x[300:], y[300:], epochs=20, seed=0)
    assert res.value > 0.9, res.value
